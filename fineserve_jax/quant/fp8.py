"""FP8 E4M3 numerics: a saturating cast, per-token dynamic scaling, per-channel FP8 weights.

Format. ``float8_e4m3fn`` has 4 exponent bits (bias 7), 3 mantissa bits and no infinities:
finite values span +-448, normal values start at 2**-6 and subnormals step by 2**-9. A plain
cast of anything beyond +-464 gives NaN, so every cast here goes through ``to_e4m3``, which
clips to +-448 first (infinities become +-448).

Scaled tensors. ``x`` is stored as ``q = to_e4m3(x / scale)`` with a float32
``scale = absmax / 448`` taken over one axis (the token's K for activations, ``head_dim`` for
queries, K for each output channel of a weight) and dequantized as
``q.astype(float32) * scale``. An all-zero slice gets ``scale = 1``. The absmax ignores
non-finite values, so an infinite element saturates at ``+-448 * scale`` (the slice's largest
finite magnitude) instead of turning the whole slice into NaN; a NaN input stays NaN.
Rounding is to nearest: relative error at most 2**-4 for values whose ``|x| / scale`` is at
least 2**-6, absolute error at most ``2**-10 * scale`` below that.

Divisions are written as products with a reciprocal (``absmax * float32(1/448)``,
``x * (1 / scale)``): XLA rewrites a division by a broadcast value into exactly that, so
writing it out makes the result the same on every backend and in NumPy references.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
E4M3_MIN_NORMAL = 2.0 ** -6
E4M3_MIN_SUBNORMAL = 2.0 ** -9

# Smallest normal float32: keeps ``x / scale`` finite when a slice's absmax is itself tiny.
_F32_TINY = float(jnp.finfo(jnp.float32).tiny)


def to_e4m3(x) -> jax.Array:
    """Saturating cast to E4M3: finite values clipped to [-448, 448], +-inf to +-448."""
    x = jnp.asarray(x)
    return jnp.clip(x, -E4M3_MAX, E4M3_MAX).astype(E4M3)


def quantize_per_token(x, axis: int = -1) -> tuple[jax.Array, jax.Array]:
    """x [..., D, ...] -> (q e4m3 like x, scale f32 with ``axis`` kept at size 1).

    ``scale = absmax / 448`` over ``axis`` (finite values only), 1.0 where that is 0.
    """
    xf = jnp.asarray(x).astype(jnp.float32)
    mag = jnp.where(jnp.isfinite(xf), jnp.abs(xf), 0.0)
    amax = jnp.max(mag, axis=axis, keepdims=True)
    scale = jnp.where(amax > 0, jnp.maximum(amax * (1.0 / E4M3_MAX), _F32_TINY), 1.0)
    return to_e4m3(xf * (1.0 / scale)), scale


def dequantize(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    """``q * scale`` in float32, cast to ``dtype``; scale broadcasts against q."""
    return (q.astype(jnp.float32) * scale).astype(dtype)


def fake_quant_per_token(x: jax.Array, axis: int = -1, dtype=None) -> jax.Array:
    """Round x through per-token FP8 and back, returning ``dtype`` (default: x.dtype).

    ``dtype=float32`` keeps the exact product ``q * scale`` (what an FP8 kernel multiplies);
    casting it back to bfloat16 would round it a second time.
    """
    q, scale = quantize_per_token(x, axis)
    return dequantize(q, scale, dtype or x.dtype)


def _check_act(act) -> None:
    if act not in ("fp8", None):
        raise ValueError(f"act must be 'fp8' (FP8 per-token activations) or None, got {act!r}")


@partial(jax.tree_util.register_dataclass, data_fields=["values", "scales"],
         meta_fields=["act"])
@dataclass(frozen=True, repr=False)
class Fp8Weight:
    """FP8 E4M3 weight with one float32 scale per output channel: ``w ~ values * scales``."""

    values: jax.Array  # e4m3[..., N, K]
    scales: jax.Array  # f32[..., N]: absmax over K / 448, 1.0 for an all-zero row
    act: str | None = "fp8"  # "fp8": activations quantized per token before the matmul

    def __post_init__(self):
        _check_act(self.act)

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical weight shape [..., N, K]."""
        return tuple(self.values.shape)

    @property
    def nbytes(self) -> int:
        return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(self))

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """[..., N, K] in ``dtype``: ``values * scales`` computed in float32."""
        return dequantize(self.values, self.scales[..., None], dtype)

    def __repr__(self) -> str:
        shape = tuple(self.values.shape) if hasattr(self.values, "shape") else "?"
        return f"Fp8Weight(shape={shape}, scales=per-channel f32, act={self.act!r})"


def quantize_fp8_weight(w, act: str | None = "fp8") -> Fp8Weight:
    """Float weight [..., N, K] -> ``Fp8Weight`` with per-output-channel scales."""
    _check_act(act)
    w = jnp.asarray(w)
    if w.ndim < 2:
        raise ValueError(f"quantize_fp8_weight: expected a weight [..., N, K], got shape {w.shape}")
    q, scale = quantize_per_token(w, axis=-1)
    return Fp8Weight(values=q, scales=scale[..., 0], act=act)
