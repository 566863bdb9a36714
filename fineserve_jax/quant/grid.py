"""Asymmetric INT4 groups, ``w = c * s + b``, and keeping a 4-bit grid a weight already has.

Scale ``s`` and offset ``b`` are stored per group in bfloat16 or float16, and the codes
``c = clip(round((w - b) / s), 0, 15)`` are computed with the stored (rounded) values, so
``dequantize`` reproduces what the codes were chosen for.

* ``zero="float"``: ``b`` is the group minimum and ``s = (max - min) / 15`` (1 for a constant
  group). With ``fit_grid``, a group whose values already lie on a grid ``b + k * d`` (k in
  0..15) keeps that grid: a checkpoint that arrives 4-bit quantized (GGUF Q4_1 with its f16
  ``d`` and ``m`` per 32 elements, AWQ, GPTQ) is reproduced bit for bit instead of re-rounded.
* ``zero="int"`` (AWQ): ``s = (max - min) / 15``, an integer zero point
  ``z = clip(round(-min / s), 0, 15)`` and ``b = -z * s``.

Divisions by a per-group value are products with its reciprocal, as XLA would compile them
anyway (see ``fp8``); codes of values on a grid are still exact integers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# How far (w - min) / d may sit from an integer for a group to count as lying on a grid.
GRID_TOL = 1e-3


def round_to(x: jax.Array, dtype) -> jax.Array:
    """Round float32 ``x`` to a 16-bit float ``dtype``, saturating instead of overflowing."""
    top = float(jnp.finfo(dtype).max)
    return jnp.clip(x, -top, top).astype(dtype)


def positive_scale(s: jax.Array, dtype) -> jax.Array:
    """Round a non-negative scale to ``dtype``, never to 0 (so ``w / s`` stays finite)."""
    fi = jnp.finfo(dtype)
    lo = float(fi.smallest_subnormal if jnp.dtype(dtype) == jnp.float16 else fi.tiny)
    return round_to(jnp.maximum(s, lo), dtype)


def quantize_asymmetric(wg: jax.Array, valid: jax.Array, dtype, zero: str, fit_grid: bool):
    """wg f32[B, N, G, group], valid bool[G, group] (False on padding)
    -> (codes u8[B, N, G, group], s [B, N, G], b [B, N, G]) with s and b in ``dtype``."""
    mn = jnp.min(jnp.where(valid, wg, jnp.inf), axis=-1)  # (B, N, G)
    mx = jnp.max(jnp.where(valid, wg, -jnp.inf), axis=-1)
    rng = mx - mn
    s = jnp.where(rng > 0, rng / 15.0, 1.0)
    if zero == "int":
        s_st = positive_scale(s, dtype)
        z = jnp.clip(jnp.round(-mn / s_st.astype(jnp.float32)), 0, 15)
        b = -z * s_st.astype(jnp.float32)
    else:
        b = mn
        if fit_grid:
            s, b = fit_4bit_grid(wg, valid, mn, rng, s, dtype)
        s_st = positive_scale(s, dtype)
    b_st = round_to(b, dtype)
    return _codes(wg, s_st, b_st).astype(jnp.uint8), s_st, b_st


def fit_4bit_grid(wg, valid, mn, rng, s, dtype) -> tuple[jax.Array, jax.Array]:
    """Per group, the step and origin (f32 [B, N, G]) of a 4-bit grid its values lie on.

    A group lies on a grid of step ``d = (max - min) / j`` when every ``(w - min) / d`` is
    within ``GRID_TOL`` of an integer; j runs from 15 down to 1. First choice, the largest j
    whose step is in ``dtype`` up to float32 noise (2 ulp) and that has an origin
    ``min - i * d`` (i in 0..15 - j) exact in ``dtype``, confirmed by reconstructing the group
    bit for bit: a Q4_1 block is found this way even when its codes do not reach 0 (its min
    is then off the f16 grid).
    Second, the largest fitting j with the group min as origin. Otherwise ``(s, min)``.
    """
    f32 = jnp.float32
    off = wg - mn[..., None]
    below = jnp.arange(16, dtype=f32)  # candidate origins: 0..15 steps below the min
    has_rng = rng > 0

    def try_step(carry, j):  # j: f32 scalar, 15 down to 1
        exact, loose, s_exact, b_exact, s_loose = carry
        d = jnp.where(has_rng, rng * (1.0 / j), 1.0)
        r = off * (1.0 / d)[..., None]
        on_grid = jnp.where(valid, jnp.abs(r - jnp.round(r)) <= GRID_TOL, True)
        fits = has_rng & jnp.all(on_grid, axis=-1)
        d_st = round_to(d, dtype).astype(f32)
        origins = mn[..., None] - below * d_st[..., None]  # (B, N, G, 16)
        ok = (round_to(origins, dtype).astype(f32) == origins) & (below <= 15 - j)
        origin = jnp.take_along_axis(origins, jnp.argmax(ok, axis=-1)[..., None], -1)[..., 0]
        # The step of a real 4-bit grid is exact in dtype; d only carries float32 rounding.
        step_ok = jnp.abs(d_st - d) <= 2.0 ** -22 * d
        new = fits & step_ok & jnp.any(ok, axis=-1) & ~exact
        return (exact | new, loose | fits, jnp.where(new, d_st, s_exact),
                jnp.where(new, origin, b_exact), jnp.where(fits & ~loose, d, s_loose)), None

    none = jnp.zeros(mn.shape, bool)
    (exact, _, s_exact, b_exact, s_loose), _ = jax.lax.scan(
        try_step, (none, none, s, mn, s), jnp.arange(15, 0, -1, dtype=f32))
    # (w - min) is rounded in float32, which can make an exact-looking origin the wrong one:
    # keep the first choice only where it reconstructs every element exactly.
    s_st, b_st = round_to(s_exact, dtype), round_to(b_exact, dtype)
    rec = (_codes(wg, s_st, b_st) * s_st.astype(f32)[..., None]
           + b_st.astype(f32)[..., None])
    exact &= jnp.all(jnp.where(valid, rec == wg, True), axis=-1)
    return jnp.where(exact, s_exact, s_loose), jnp.where(exact, b_exact, mn)


def _codes(wg: jax.Array, s_st: jax.Array, b_st: jax.Array) -> jax.Array:
    """f32 codes in [0, 15] for wg [B, N, G, group] with stored s, b [B, N, G]."""
    s = s_st.astype(jnp.float32)[..., None]
    b = b_st.astype(jnp.float32)[..., None]
    return jnp.clip(jnp.round((wg - b) * (1.0 / s)), 0, 15)
