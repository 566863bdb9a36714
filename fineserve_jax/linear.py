"""The one entry point for every matrix multiply by a weight: ``linear(x, w)``.

Weights are stored ``[out, in]`` (as in HF and GGUF). Plain arrays take the XLA dot
path; quantized weight types register their own implementation with
``register_linear`` so the model code never changes when a precision is added.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

_IMPLS: list[tuple[type, Callable]] = []
_RESIDUAL_IMPLS: list[tuple[type, Callable]] = []


def register_linear(weight_type: type, *, residual: bool = False):
    """Decorator: ``@register_linear(MyQuantWeight) def impl(x, w): ...``; with
    ``residual=True`` it registers ``impl(x, w, r)`` for ``linear_residual`` instead (a
    kernel that adds the residual in its epilogue)."""

    def deco(fn):
        (_RESIDUAL_IMPLS if residual else _IMPLS).insert(0, (weight_type, fn))
        return fn

    return deco


def linear(x: jax.Array, w) -> jax.Array:
    """``x @ w.T``: x [..., K], w [N, K] (or a registered weight type) -> [..., N] in x.dtype."""
    for cls, fn in _IMPLS:
        if isinstance(w, cls):
            return fn(x, w)
    if not hasattr(w, "shape") or w.ndim != 2:
        raise TypeError(f"linear: unsupported weight {type(w).__name__}")
    # A weight stored wider than the activations (bf16 values held in f32 on CPU) is
    # multiplied in its own dtype; the result is rounded back to the activation dtype.
    y = jax.lax.dot_general(x.astype(w.dtype), w, (((x.ndim - 1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def linear_residual(x: jax.Array, w, residual: jax.Array) -> jax.Array:
    """``residual + x @ w.T`` in ``residual.dtype``: fused where the weight type registers
    a residual implementation, else exactly ``residual + linear(x, w)``."""
    for cls, fn in _RESIDUAL_IMPLS:
        if isinstance(w, cls):
            return fn(x, w, residual)
    return residual + linear(x, w).astype(residual.dtype)
