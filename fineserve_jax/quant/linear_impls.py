"""Reference ``linear`` paths for the quantized weight types: dequantize, then dot in float32.

These are what every fast kernel is tested against. With ``w.act == "fp8"`` the activations
are first rounded per token through FP8 E4M3 (scale = absmax / 448 over K) and kept in
float32, so the product sees exactly ``q_x * scale_x`` as an FP8 kernel would. The weight is
dequantized to float32 and the dot accumulates in float32; the result is cast to x.dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fineserve_jax.linear import register_linear
from fineserve_jax.quant.fp8 import Fp8Weight, fake_quant_per_token
from fineserve_jax.quant.int4 import Int4Weight


def reference_linear(x: jax.Array, w: Int4Weight | Fp8Weight) -> jax.Array:
    """x [..., K] @ w[N, K].T -> [..., N] in x.dtype."""
    if len(w.shape) != 2:
        raise ValueError(f"linear: {type(w).__name__} must be one [N, K] weight, got shape "
                         f"{w.shape}; slice stacked layers first (lax.scan does)")
    if x.shape[-1] != w.shape[-1]:
        raise ValueError(f"linear: x has K = {x.shape[-1]} but the weight has shape {w.shape}")
    xf = fake_quant_per_token(x, -1, jnp.float32) if w.act == "fp8" else x.astype(jnp.float32)
    wf = w.dequantize(jnp.float32)  # (N, K)
    y = jax.lax.dot_general(xf, wf, (((xf.ndim - 1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


register_linear(Int4Weight)(reference_linear)
register_linear(Fp8Weight)(reference_linear)
