"""KV storage formats on the device: how K/V values become bytes of the shared pool.

Every model on a device stores its K and V in one ``uint8`` pool (see ``paged.py``);
a *format* says how one token's K (or V) of one layer, ``[Hkv, D]``, is encoded into
``value_row_bytes`` bytes of values and ``scale_row_bytes`` bytes of scales, and how
to decode them back. The host-side size of a block in a format is its
``BlockFormat`` (``fineserve_jax.kvslab``): ``value_bytes`` per element and
``scale_bytes`` per (token, KV head), so block byte sizes include the scales.

K is stored after RoPE. Byte layout of one token's row, per format (little-endian, as
``lax.bitcast_convert_type`` lays out wider types on every backend we run on):

========== ============================================= ===================================
name       values row (``Hkv*D*value_bytes`` bytes)       scales row (per KV head, in order)
========== ============================================= ===================================
f32        f32[Hkv, D]                                    none
bf16       bf16[Hkv, D]                                   none
fp8        E4M3[Hkv, D], 1 byte each                      bf16 scale (2 B)
int4       u8[Hkv, D/2]: element 2i in the low nibble,    bf16 scale (2 B)
           2i+1 in the high nibble, each stored q+8
int4-g32   as int4                                        bf16 scale per 32 elements (2*D/32 B)
int4-asym  u8[Hkv, D/2]: q in [0, 15], same nibbles       bf16 (scale, min) pair (4 B)
========== ============================================= ===================================

Decoded values: fp8 ``e4m3 * scale``; int4 ``q * scale`` with q in [-8, 7]; int4-asym
``q * scale + min``; all in float32. Every scale is rounded *up* to bfloat16 (so no value
leaves the grid's range after the division) and is 1.0 for an all-zero group; an asymmetric
min is rounded *down* (so ``x - min >= 0``). Inputs beyond the largest value a format can
bring back finite saturate there (``_CLIP``, ``_ASYM_CLIP``); valid data never decodes to
NaN or inf. Poison bytes (0xFF) decode to NaN through their bf16 scale, which the paged
attention masks (positions past a sequence's length are never read).

``fake_quant(x)`` is ``decode(encode(x))`` in ``x``'s dtype: the values the pool gives back,
for reference computations and for evaluation on the dense cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from fineserve_jax.config import ModelConfig
from fineserve_jax.kvslab import BlockFormat
from fineserve_jax.quant.fp8 import E4M3, E4M3_MAX, to_e4m3
from fineserve_jax.quant.int4 import pack_int4, unpack_int4

# |x| saturates here before quantizing: a scale rounded up to bf16 (at most 2**-7 above
# absmax / qmax) times qmax stays below the float32 maximum (3.40e38).
_CLIP = 3.0e38
# Asymmetric groups hold max - min: keep that range finite in float32 too.
_ASYM_CLIP = 1.0e38
# Smallest scale used: the smallest normal float (bf16 shares float32's exponent range).
# A group so small that absmax / qmax underflows is stored on this scale instead of 0
# (which would divide to inf); XLA on CPU flushes denormals, so none are relied upon.
_TINY_SCALE = float(np.finfo(np.float32).tiny)


def _bf16_mag_up(x: jax.Array) -> jax.Array:
    """float32 -> bfloat16 with the magnitude rounded up (exact: the result is in float32).

    For x >= 0 this is the ceiling; for x < 0 the floor. Finite inputs below the bf16
    maximum stay finite.
    """
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    up = (bits + jnp.uint32(0xFFFF)) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(up, jnp.float32).astype(jnp.bfloat16)


def _bf16_floor(x: jax.Array) -> jax.Array:
    """float32 -> the largest bfloat16 <= x (finite x)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    trunc = jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFF0000), jnp.float32)
    return jnp.where(x < 0, _bf16_mag_up(x), trunc.astype(jnp.bfloat16))


def _bf16_neighbor(s: jax.Array, step: int) -> jax.Array:
    """The bf16 next to s >= 0: one code up (step=1) or down (step=-1)."""
    bits = jax.lax.bitcast_convert_type(s, jnp.uint16)
    return jax.lax.bitcast_convert_type(bits + jnp.uint16(1) if step > 0
                                        else bits - jnp.uint16(1), jnp.bfloat16)


def _scale_for(amax: jax.Array, qmax: float) -> jax.Array:
    """The smallest bf16 >= amax / qmax (amax >= 0, finite): 1.0 where amax is 0, never 0.

    Under jit XLA turns a division by a constant into a product with its (rounded)
    reciprocal, so the quotient may be an ulp off, and rounding it up to bf16 could land
    one bf16 step too high or too low. The candidate is fixed up exactly instead:
    ``c * qmax`` is exact in float32 (8 significant bits times at most 4).
    """
    c = _bf16_mag_up(amax * (1.0 / qmax))
    prev, nxt = _bf16_neighbor(c, -1), _bf16_neighbor(c, 1)  # prev is NaN when c == 0
    c = jnp.where(prev.astype(jnp.float32) * qmax >= amax, prev,
                  jnp.where(c.astype(jnp.float32) * qmax < amax, nxt, c))
    s = jnp.maximum(c, jnp.bfloat16(_TINY_SCALE))
    return jnp.where(amax > 0, s, jnp.bfloat16(1.0))


def _bf16_bytes(s: jax.Array) -> jax.Array:
    """bf16[N, ...] -> u8[N, 2 * prod(...)] (each value's two bytes, little-endian)."""
    return jax.lax.bitcast_convert_type(s, jnp.uint8).reshape(s.shape[0], -1)


def _bf16_from_bytes(b: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """u8[..., 2 * prod(shape)] -> float32[..., *shape]."""
    pairs = b.reshape(*b.shape[:-1], *shape, 2)
    return jax.lax.bitcast_convert_type(pairs, jnp.bfloat16).astype(jnp.float32)


def _check_rows(name: str, x: jax.Array) -> None:
    if x.ndim != 3:
        raise ValueError(f"KV format {name!r}: encode takes [N, Hkv, D], got shape {x.shape}")


class _KVFormatBase:
    """What every format derives from its ``value_bytes`` and ``head_scale_bytes``."""

    name: str

    def head_scale_bytes(self, head_dim: int) -> int:
        """Bytes of scales per (token, KV head) for K (and for V): ``BlockFormat.scale_bytes``."""
        raise NotImplementedError

    def block_format(self, cfg: ModelConfig, block_tokens: int) -> BlockFormat:
        return BlockFormat(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_tokens,
                           self.value_bytes, self.head_scale_bytes(cfg.head_dim), self.name)

    def fake_quant(self, x: jax.Array) -> jax.Array:
        """``decode(encode(x))`` in ``x.dtype``; x [..., Hkv, D]."""
        *lead, H, D = x.shape
        vals, scales = self.encode(x.reshape(-1, H, D))
        y = self.decode(vals.reshape(*lead, vals.shape[-1]),
                        scales.reshape(*lead, scales.shape[-1]), H, D)
        return y.astype(x.dtype)


@dataclass(frozen=True)
class PlainKVFormat(_KVFormatBase):
    """K/V stored as-is in ``dtype`` (no scales): the float32 and BF16 formats."""

    name: str
    dtype: str  # numpy/JAX dtype name of the stored values

    @property
    def value_bytes(self) -> float:
        return np.dtype(jnp.dtype(self.dtype)).itemsize

    @property
    def scale_bytes(self) -> int:
        return 0

    def head_scale_bytes(self, head_dim: int) -> int:
        return 0

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [N, Hkv, D] -> (values u8[N, Hkv*D*itemsize], scales u8[N, 0])."""
        N = x.shape[0]
        b = jax.lax.bitcast_convert_type(x.astype(self.dtype), jnp.uint8)
        return b.reshape(N, -1), jnp.zeros((N, 0), jnp.uint8)

    def decode(self, values: jax.Array, scales: jax.Array, kv_heads: int,
               head_dim: int) -> jax.Array:
        """values u8[..., Hkv*D*itemsize] (scales unused) -> [..., Hkv, D] in ``dtype``."""
        del scales
        size = int(self.value_bytes)
        lead = values.shape[:-1]
        v = values.reshape(*lead, kv_heads, head_dim, size)
        if size == 1:
            return jax.lax.bitcast_convert_type(v[..., 0], self.dtype)
        return jax.lax.bitcast_convert_type(v, self.dtype)

    def fake_quant(self, x: jax.Array) -> jax.Array:
        """The stored value: a cast to ``dtype`` and back."""
        return x.astype(self.dtype).astype(x.dtype)


@dataclass(frozen=True)
class Fp8KVFormat(_KVFormatBase):
    """FP8 E4M3 values with one bf16 scale per (token, KV head): absmax / 448, rounded up."""

    name: str = "fp8"

    @property
    def value_bytes(self) -> float:
        return 1

    def head_scale_bytes(self, head_dim: int) -> int:
        return 2

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [N, Hkv, D] -> (values u8[N, Hkv*D] E4M3 bits, scales u8[N, Hkv*2] bf16 bits)."""
        _check_rows(self.name, x)
        N = x.shape[0]
        xf = jnp.clip(x.astype(jnp.float32), -_CLIP, _CLIP)
        scale = _scale_for(jnp.max(jnp.abs(xf), axis=-1), E4M3_MAX)  # bf16[N, Hkv]
        q = to_e4m3(xf / scale.astype(jnp.float32)[..., None])
        vals = jax.lax.bitcast_convert_type(q, jnp.uint8).reshape(N, -1)
        return vals, _bf16_bytes(scale)

    def decode(self, values: jax.Array, scales: jax.Array, kv_heads: int,
               head_dim: int) -> jax.Array:
        """values u8[..., Hkv*D], scales u8[..., Hkv*2] -> float32[..., Hkv, D]."""
        lead = values.shape[:-1]
        v = values.reshape(*lead, kv_heads, head_dim)
        v = jax.lax.bitcast_convert_type(v, E4M3).astype(jnp.float32)
        return v * _bf16_from_bytes(scales, (kv_heads,))[..., None]


@dataclass(frozen=True)
class Int4KVFormat(_KVFormatBase):
    """INT4 nibble-packed along head_dim, bf16 scale (and min if asymmetric) per group.

    Symmetric: q = clip(round(x / scale), -8, 7), stored q + 8, scale = absmax / 7 rounded
    up to bf16. Asymmetric: min rounded down to bf16, scale = (max - min) / 15 rounded up,
    q = clip(round((x - min) / scale), 0, 15). Groups are ``group_size`` consecutive
    elements of one head (None: the whole head).
    """

    name: str
    group_size: int | None = None  # elements per scale along head_dim; None = head_dim
    asymmetric: bool = False

    def __post_init__(self):
        g = self.group_size
        if g is not None and (not isinstance(g, int) or g < 2 or g % 2):
            raise ValueError(f"KV format {self.name!r}: group_size must be an even int >= 2 "
                             f"(two values a byte) or None for the whole head, got {g!r}")

    @property
    def value_bytes(self) -> float:
        return 0.5

    def groups(self, head_dim: int) -> int:
        """Scale groups per KV head; raises if head_dim does not split into them."""
        if head_dim % 2:
            raise ValueError(f"KV format {self.name!r} packs two values a byte: head_dim "
                             f"must be even, got {head_dim}")
        g = self.group_size or head_dim
        if head_dim % g:
            raise ValueError(f"KV format {self.name!r}: head_dim {head_dim} is not a multiple "
                             f"of its group size {g}")
        return head_dim // g

    def head_scale_bytes(self, head_dim: int) -> int:
        return 2 * self.groups(head_dim) * (2 if self.asymmetric else 1)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [N, Hkv, D] -> (values u8[N, Hkv*D/2], scales u8[N, Hkv*head_scale_bytes])."""
        _check_rows(self.name, x)
        N, H, D = x.shape
        G = self.groups(D)
        xg = x.astype(jnp.float32).reshape(N, H, G, D // G)
        if self.asymmetric:
            xg = jnp.clip(xg, -_ASYM_CLIP, _ASYM_CLIP)
            lo = _bf16_floor(jnp.min(xg, axis=-1))  # bf16[N, H, G]
            lof = lo.astype(jnp.float32)
            scale = _scale_for(jnp.max(xg, axis=-1) - lof, 15.0)
            q = jnp.round((xg - lof[..., None]) / scale.astype(jnp.float32)[..., None])
            q = jnp.clip(q, 0, 15)
            side = jnp.stack([scale, lo], axis=-1)  # bf16[N, H, G, 2]: (scale, min)
        else:
            xg = jnp.clip(xg, -_CLIP, _CLIP)
            scale = _scale_for(jnp.max(jnp.abs(xg), axis=-1), 7.0)
            q = jnp.clip(jnp.round(xg / scale.astype(jnp.float32)[..., None]), -8, 7) + 8
            side = scale
        packed = pack_int4(q.astype(jnp.uint8).reshape(N, H, D))  # 2i low, 2i+1 high nibble
        return packed.reshape(N, -1), _bf16_bytes(side)

    def decode(self, values: jax.Array, scales: jax.Array, kv_heads: int,
               head_dim: int) -> jax.Array:
        """values u8[..., Hkv*D/2], scales u8[..., Hkv*head_scale_bytes] -> f32[..., Hkv, D]."""
        lead = values.shape[:-1]
        G = self.groups(head_dim)
        q = unpack_int4(values.reshape(*lead, kv_heads, head_dim // 2)).astype(jnp.float32)
        q = q.reshape(*lead, kv_heads, G, head_dim // G)
        if self.asymmetric:
            side = _bf16_from_bytes(scales, (kv_heads, G, 2))
            x = q * side[..., 0:1] + side[..., 1:2]
        else:
            x = (q - 8.0) * _bf16_from_bytes(scales, (kv_heads, G))[..., None]
        return x.reshape(*lead, kv_heads, head_dim)


KV_FORMATS = {
    "f32": PlainKVFormat("f32", "float32"),
    "bf16": PlainKVFormat("bf16", "bfloat16"),
    "fp8": Fp8KVFormat("fp8"),
    "int4": Int4KVFormat("int4"),
    "int4-g32": Int4KVFormat("int4-g32", group_size=32),
    "int4-asym": Int4KVFormat("int4-asym", asymmetric=True),
}


def kv_format(name: str):
    try:
        return KV_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown KV format {name!r}; known: {sorted(KV_FORMATS)}") from None
