"""INT4 weights: nibble packing, FireQ's power-of-two multiplier and the ``Int4Weight`` pytree.

Storage. A weight ``w [..., N, K]`` is split into groups of ``group`` (32, 64 or 128)
consecutive elements along K; K is zero-padded up to ``Kp``, a multiple of the group (SmolLM2's
K = 576 with group 128 becomes 640), and the padding is sliced off again by ``dequantize``.
Each element is a 4-bit code ``c`` in 0..15; codes are packed two a byte along K: element
``2i`` in the low nibble of byte ``i``, element ``2i + 1`` in the high nibble.

Symmetric (``symmetric=True``): ``w = (c - 8) * s_eff`` with one effective scale per group.
With FP8 group scales (FireQ) the stored scale is ``S = e4m3(max(s * 2**m, 2**-9))`` where
``s = absmax / 7`` and ``m`` is one integer per tensor (``exponent``) chosen by
``pow2_exponent``: the largest group scale lands in [224, 448], so none overflows E4M3 and as
few as possible fall below its normal range. ``s_eff = S / 2**m``; a kernel multiplies by ``S``
and divides its output by ``2**m``. With bfloat16 / float16 scales ``m = 0`` and ``S`` is ``s``
rounded. Codes are rounded with ``s_eff`` itself, so dequantization is exactly what the
codes were chosen for.

Asymmetric (``symmetric=False``): ``w = c * s + b`` with a per-group scale ``s`` and offset
``b``, both stored in bfloat16 or float16 (see ``grid.py`` for how they are chosen).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from fineserve_jax.quant.fp8 import (E4M3, E4M3_MAX, E4M3_MIN_NORMAL, E4M3_MIN_SUBNORMAL,
                                     _check_act, to_e4m3)
from fineserve_jax.quant.grid import positive_scale, quantize_asymmetric

GROUP_SIZES = (32, 64, 128)
SCALE_DTYPES = {"fp8": E4M3, "bf16": jnp.bfloat16, "f16": jnp.float16}


def pack_int4(q) -> jax.Array:
    """Codes uint8[..., K] in 0..15 (K even) -> uint8[..., K/2], element 2i in the low nibble."""
    q = jnp.asarray(q)
    if q.ndim == 0 or q.shape[-1] % 2:
        raise ValueError(f"pack_int4: the last axis must have even length, got shape {q.shape}")
    q = q.astype(jnp.uint8) & 0xF
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(p) -> jax.Array:
    """uint8[..., K/2] -> codes uint8[..., K]: the exact inverse of ``pack_int4``."""
    p = jnp.asarray(p)
    if p.dtype != jnp.uint8:
        raise TypeError(f"unpack_int4: expected uint8 nibble pairs, got {p.dtype}")
    codes = jnp.stack([p & 0xF, p >> 4], axis=-1)  # (..., K/2, 2)
    return codes.reshape(*p.shape[:-1], 2 * p.shape[-1])


def exp2i(n) -> jax.Array:
    """Exactly ``2.0**n`` in float32 for integers n in [-126, 127], built from exponent bits.

    (``jnp.ldexp`` and ``2.0 ** n`` go through a float power, which need not be exact.)
    """
    n = jnp.clip(jnp.asarray(n, jnp.int32), -126, 127)
    return jax.lax.bitcast_convert_type((n + 127) << 23, jnp.float32)


def pow2_exponent(scales, search_range=range(-30, 31)) -> jax.Array:
    """FireQ's per-tensor multiplier: int32 ``m`` for the scales of one tensor (any shape).

    Among the ``m`` in ``search_range`` for which no ``|s| * 2**m`` exceeds 448, the one with
    the fewest ``|s| * 2**m`` below E4M3's smallest normal (2**-6); ties go to the largest
    ``m``. That is ``floor(log2(448 / max|s|))`` whenever it lies in the range (all zeros:
    the largest ``m``). If every ``m`` overflows, the smallest ``m`` (the caller's cast then
    saturates, by as little as the range allows). Scales must be finite. The underflow
    counts of all candidates are one vectorised compare-and-sum; works under jit and vmap.
    """
    ms = tuple(int(m) for m in search_range)
    if not ms or min(ms) < -126 or max(ms) > 127:
        raise ValueError(f"pow2_exponent: search_range must be non-empty within [-126, 127], "
                         f"got {search_range!r}")
    return _pow2_exponent(scales, ms)


@partial(jax.jit, static_argnums=1)
def _pow2_exponent(scales, ms: tuple[int, ...]) -> jax.Array:
    s = jnp.abs(jnp.asarray(scales, jnp.float32)).reshape(-1)  # (M,)
    m_all = np.asarray(ms, np.int64)  # (R,)
    # |s| * 2**m > 448 <=> |s| > 448 * 2**-m, and likewise for underflow: exact thresholds.
    over_at = jnp.asarray(np.minimum(np.ldexp(E4M3_MAX, -m_all), np.finfo(np.float32).max),
                          jnp.float32)
    under_at = jnp.asarray(np.ldexp(E4M3_MIN_NORMAL, -m_all), jnp.float32)
    feasible = jnp.max(s, initial=0.0) <= over_at  # (R,) no scale overflows
    n_under = jnp.sum(s[None, :] < under_at[:, None], axis=1)  # (R,) scales below normal
    under = jnp.where(feasible, n_under, s.size + 1)
    best = feasible & (under == jnp.min(under))
    m = jnp.max(jnp.where(best, jnp.asarray(m_all, jnp.int32), jnp.iinfo(jnp.int32).min))
    return jnp.where(jnp.any(feasible), m, jnp.int32(min(ms)))


@partial(jax.tree_util.register_dataclass,
         data_fields=["packed", "scales", "offsets", "exponent"],
         meta_fields=["group", "k", "symmetric", "act"])
@dataclass(frozen=True, repr=False)
class Int4Weight:
    """INT4 weight [..., N, K], nibble-packed, with one scale (and offset) per group along K.

    Leading axes (a stacked layer axis) are batched: ``lax.scan`` may slice them off every
    data field, so the static fields hold nothing that depends on them.
    """

    packed: jax.Array  # u8[..., N, Kp/2]: codes, element 2i in the low nibble of byte i
    scales: jax.Array  # [..., N, Kp/group] e4m3 (symmetric only), bf16 or f16: S
    offsets: jax.Array | None  # [..., N, Kp/group] like scales: b (asymmetric), else None
    exponent: jax.Array  # i32[...]: m per tensor, s_eff = S / 2**m (0 unless FP8 scales)
    group: int  # elements per group along K
    k: int  # logical K; Kp = 2 * packed.shape[-1] is K padded to a multiple of group
    symmetric: bool  # w = (c - 8) * S / 2**m, else w = c * S + b
    act: str | None  # "fp8": activations quantized per token before the matmul, or None

    def __post_init__(self):
        _check_act(self.act)
        if self.group <= 0 or self.group % 2:
            raise ValueError(f"Int4Weight: group must be a positive even number, got {self.group}")

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical weight shape [..., N, K] (without the padding of K)."""
        return tuple(self.packed.shape[:-1]) + (self.k,)

    @property
    def nbytes(self) -> int:
        """Bytes of all stored arrays (codes, scales, offsets, exponents)."""
        return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(self))

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """[..., N, K] in ``dtype``, computed in float32; the padding of K is sliced off."""
        codes = unpack_int4(self.packed).astype(jnp.float32)  # (..., N, Kp)
        *lead, n, kp = codes.shape
        c = codes.reshape(*lead, n, kp // self.group, self.group)  # (..., N, G, group)
        scales = self.scales.astype(jnp.float32)  # (..., N, G)
        if self.symmetric:
            s_eff = scales * exp2i(-self.exponent)[..., None, None]  # exact: times 2**-m
            w = (c - 8.0) * s_eff[..., None]
        else:
            w = c * scales[..., None] + self.offsets.astype(jnp.float32)[..., None]
        return w.reshape(*lead, n, kp)[..., : self.k].astype(dtype)

    def __repr__(self) -> str:
        if not hasattr(self.packed, "shape"):
            return f"Int4Weight(group={self.group}, k={self.k}, symmetric={self.symmetric})"
        kp = 2 * self.packed.shape[-1]
        pad = f" (K padded to {kp})" if kp != self.k else ""
        kind = "symmetric" if self.symmetric else "asymmetric"
        scale = jnp.dtype(self.scales.dtype).name
        if self.symmetric and self.scales.dtype == E4M3:
            scale += " / 2**exponent"
        return (f"Int4Weight(shape={self.shape}{pad}, group={self.group}, {kind}, "
                f"scales={scale}, act={self.act!r})")


def quantize_int4(w, *, group: int = 128, symmetric: bool = True, scale_dtype: str | None = None,
                  zero: str = "float", fit_grid: bool = True, act: str | None = "fp8",
                  pow2: bool = True) -> Int4Weight:
    """Float weight [..., N, K] -> ``Int4Weight``; leading axes are separate tensors.

    symmetric: codes for ``round(w / s_eff)`` in [-8, 7], ``s = absmax / 7`` per group;
    ``scale_dtype`` "fp8" (default: E4M3 with the per-tensor power-of-two multiplier), "bf16"
    or "f16". Asymmetric: ``w = c * s + b`` with c in [0, 15]; ``scale_dtype`` "f16" (default)
    or "bf16"; ``zero`` "float" (b is the group minimum, or the origin of a 4-bit grid the
    group already lies on when ``fit_grid``) or "int" (AWQ: ``b = -z * s`` with an integer
    zero point z in [0, 15]). ``pow2=False`` keeps FP8 scales unmultiplied (exponent 0:
    small group scales then sit at the E4M3 floor; for ablations). Compiled once per shape
    and configuration.
    """
    scale_dtype = scale_dtype or ("fp8" if symmetric else "f16")
    _check_args(group, symmetric, scale_dtype, zero, act)
    w = jnp.asarray(w)
    if w.ndim < 2 or not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"quantize_int4: expected a float weight [..., N, K], "
                         f"got {w.dtype} {w.shape}")
    packed, scales, offsets, exponent = _quantize_int4(
        w, group=group, symmetric=symmetric, scale_dtype=scale_dtype, zero=zero,
        fit_grid=fit_grid and not symmetric and zero == "float", pow2=bool(pow2))
    return Int4Weight(packed=packed, scales=scales, offsets=offsets, exponent=exponent,
                      group=group, k=w.shape[-1], symmetric=symmetric, act=act)


_STATIC = ("group", "symmetric", "scale_dtype", "zero", "fit_grid", "pow2")


@partial(jax.jit, static_argnames=_STATIC)
def _quantize_int4(w, *, group, symmetric, scale_dtype, zero, fit_grid, pow2=True):
    """The arrays of ``quantize_int4`` (validated arguments): packed, scales, offsets, exponent."""
    *lead, n, k = w.shape
    kp = -(-k // group) * group
    ng = kp // group
    wf = jnp.pad(w.astype(jnp.float32).reshape(-1, n, k), ((0, 0), (0, 0), (0, kp - k)))
    wg = wf.reshape(-1, n, ng, group)  # (B, N, G, group), B = prod(lead)
    if symmetric:
        codes, scales, exponent = _quantize_symmetric(wg, scale_dtype, pow2)
        offsets = None
    else:
        valid = (jnp.arange(kp) < k).reshape(ng, group)  # False on the padding of K
        codes, scales, offsets = quantize_asymmetric(wg, valid, SCALE_DTYPES[scale_dtype],
                                                     zero, fit_grid)
        offsets = offsets.reshape(*lead, n, ng)
        exponent = jnp.zeros(wg.shape[0], jnp.int32)
    return (pack_int4(codes.reshape(*lead, n, kp)), scales.reshape(*lead, n, ng), offsets,
            exponent.reshape(tuple(lead)))


def _check_args(group, symmetric, scale_dtype, zero, act) -> None:
    if group not in GROUP_SIZES:
        raise ValueError(f"quantize_int4: group must be one of {GROUP_SIZES}, got {group!r}")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"quantize_int4: scale_dtype must be one of {tuple(SCALE_DTYPES)}, "
                         f"got {scale_dtype!r}")
    if not symmetric and scale_dtype == "fp8":
        raise ValueError("quantize_int4: asymmetric groups need scale_dtype 'f16' or 'bf16'; "
                         "FP8 scales (with the power-of-two multiplier) are for symmetric groups")
    if zero not in ("float", "int"):
        raise ValueError(f"quantize_int4: zero must be 'float' or 'int', got {zero!r}")
    _check_act(act)


def _quantize_symmetric(wg: jax.Array, scale_dtype: str, pow2: bool = True):
    """wg f32[B, N, G, group] -> (codes u8[B, N, G, group], S [B, N, G], m i32[B])."""
    s = jnp.max(jnp.abs(wg), axis=-1) / 7.0  # (B, N, G)
    if scale_dtype == "fp8":
        m = (jax.vmap(pow2_exponent)(s) if pow2  # (B,): one multiplier per tensor
             else jnp.zeros(s.shape[0], jnp.int32))
        mb = m[:, None, None]
        stored = to_e4m3(jnp.maximum(s * exp2i(mb), E4M3_MIN_SUBNORMAL))
        s_eff = stored.astype(jnp.float32) * exp2i(-mb)
    else:
        m = jnp.zeros(s.shape[0], jnp.int32)
        stored = positive_scale(s, SCALE_DTYPES[scale_dtype])
        s_eff = stored.astype(jnp.float32)
    q = jnp.clip(jnp.round(wg * (1.0 / s_eff)[..., None]), -8, 7)
    return (q + 8).astype(jnp.uint8), stored, m
