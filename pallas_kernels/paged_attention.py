"""Paged attention straight from the shared KV byte pool, dequantizing K/V in the kernel.

    out[b, t, h] = softmax_s(scale * q[b, t, h] . K[b, s, h // g]) @ V[b, s, h // g]
                   over slots s < seq_lens[b], s <= positions[b, t]
                   (and s > positions[b, t] - sliding_window)

K and V live in the device's ``uint8[R, row_bytes]`` pool in one model's format
(``fineserve_jax.model.kv_formats``): a layer of a block is one segment
``K values | V values | K scales | V scales`` at (row, byte offset) given by the block's
handle (``PagedKVCache._block_base``). The kernel reads only the bytes of the positions
it needs, through the page table, and decodes them with integer ops and same-width
bitcasts: f32 from four bytes, bf16 from two (shifted into the top of a float32), FP8
E4M3 from one byte, INT4 from a nibble, scales as bf16 byte pairs. The XLA reference
(``PagedKVCache.gather`` then ``paged_reference_attention``) gathers every block of the
table first.

Grid ``(B, Hkv, query tiles, splits)``. One program takes one KV head and a tile of
``block_q`` query rows of it (rows are (token, head of the group) pairs, token-major), so
each K/V byte is read once per KV head and query tile. It walks the sequence's KV range
``[lo, hi)`` in steps of ``block_kv`` tokens with an online softmax in float32; ``hi`` is
``min(seq_len, last query position + 1)`` and ``lo`` the sliding window's start, so the
trip count follows the sequence's length and nothing at or past it is read (gathers are
clamped to the last live token, scores past it are masked, V is zeroed there). The split
axis cuts each sequence's range into ``num_splits`` equal parts; every split writes its
unnormalized output with its running max and sum, and ``merge_splits`` combines them
(log-sum-exp weights) in plain jnp.

Backends: ``paged_attention(..., interpret=True)`` runs the Pallas interpreter (CPU);
on a GPU the kernel lowers through Triton. ``PagedKVCache.attend`` picks the kernel on
GPU and the XLA reference elsewhere; ``KERNEL_MODE = "interpret"`` forces the kernel in
the interpreter on any backend (tests), ``"xla"`` the reference. ``kv_bytes_read`` gives
the pool bytes a decode call reads (for bandwidth figures).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from fineserve_jax.quant.fp8 import E4M3

# ``PagedKVCache.attend``: None = the kernel on GPU and the XLA reference elsewhere;
# "interpret" = the kernel in the Pallas interpreter on every backend (tests);
# "xla" = the XLA reference on every backend (comparisons on a GPU).
KERNEL_MODE: str | None = None

_NEG = -1e30  # running max before any live score: finite, so rescaling never gives NaN


def _pow2(n: int) -> bool:
    return n >= 1 and not n & (n - 1)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class AttentionConfig:
    """Tile sizes and split count of one launch (Triton needs powers of two, and dots of
    at least 16 on every side)."""

    block_q: int = 16  # query rows (token x head of a KV group) per program
    block_kv: int = 32  # KV tokens per loop step (may span several blocks)
    num_splits: int = 1  # programs each sequence's KV range is split over
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for f in ("block_q", "block_kv"):
            v = getattr(self, f)
            if v < 16 or not _pow2(v):
                raise ValueError(f"AttentionConfig.{f} must be a power of two >= 16, got {v}")
        if self.num_splits < 1:
            raise ValueError(f"AttentionConfig.num_splits must be >= 1, got {self.num_splits}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError(f"bad num_warps/num_stages: {self.num_warps}, {self.num_stages}")


def default_config(batch: int, kv_heads: int, rows: int, max_tokens: int,
                   num_cores: int | None = None) -> AttentionConfig:
    """A config for ``batch`` sequences of ``rows = T * H / Hkv`` query rows per KV head
    over at most ``max_tokens`` KV tokens. Splits fill about two programs per core when
    batch x heads x query tiles alone would not, keeping at least 4 KV steps per split."""
    bq = min(64, max(16, _next_pow2(rows)))
    bkv = 64 if max_tokens >= 1024 else 32
    if num_cores is None:
        dev = jax.devices()[0]
        num_cores = getattr(dev, "core_count", 0) if dev.platform == "gpu" else 0
        num_cores = num_cores or 132
    programs = batch * kv_heads * -(-rows // bq)
    steps = -(-max_tokens // bkv)
    splits = max(1, min(32, -(-2 * num_cores // programs), steps // 4))
    return AttentionConfig(block_q=bq, block_kv=bkv, num_splits=splits,
                           num_warps=4 if bq * bkv <= 2048 else 8)


# ---------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class _Layout:
    """Static description of one layer segment of a block, as the kernel decodes it."""

    kind: str  # "f32" | "bf16" | "fp8" | "int4"
    block_tokens: int
    head_dim: int
    value_row: int  # bytes of one token's K (or V) values, all KV heads
    scale_row: int  # bytes of one token's K (or V) scales, all KV heads
    head_values: int  # bytes of one head's values in a row
    head_scales: int  # bytes of one head's scales in a row
    groups: int = 1  # scale groups per head (int4)
    asymmetric: bool = False  # int4 (scale, min) pairs
    window: int | None = None

    @property
    def v_values(self) -> int:  # offset of V values in the segment
        return self.block_tokens * self.value_row

    @property
    def k_scales(self) -> int:
        return 2 * self.block_tokens * self.value_row

    @property
    def v_scales(self) -> int:
        return self.k_scales + self.block_tokens * self.scale_row


def _layout(cache: Any) -> _Layout:
    """The kernel's view of a ``PagedKVCache``'s format; raises for formats it can't read."""
    from fineserve_jax.model.kv_formats import Fp8KVFormat, Int4KVFormat, PlainKVFormat

    fmt, b = cache.fmt, cache.block
    common = dict(block_tokens=b.block_tokens, head_dim=b.head_dim, value_row=b.value_row_bytes,
                  scale_row=b.scale_row_bytes, head_values=b.value_row_bytes // b.kv_heads,
                  head_scales=b.scale_bytes, window=cache.sliding_window)
    if isinstance(fmt, PlainKVFormat) and jnp.dtype(fmt.dtype) in (jnp.float32, jnp.bfloat16):
        return _Layout("f32" if jnp.dtype(fmt.dtype) == jnp.float32 else "bf16", **common)
    if isinstance(fmt, Fp8KVFormat):
        return _Layout("fp8", **common)
    if isinstance(fmt, Int4KVFormat):
        return _Layout("int4", groups=fmt.groups(b.head_dim), asymmetric=fmt.asymmetric,
                       **common)
    raise NotImplementedError(f"paged_attention: no in-kernel decoder for KV format {fmt!r}")


# ---------------------------------------------------------------------------- kernel
def _bytes(pool_ref, row, addr):
    """i32 of the pool bytes at (row, addr) (broadcast shapes): a gather of single bytes."""
    row = jnp.broadcast_to(row, addr.shape)
    return pool_ref[row, addr].astype(jnp.int32) & 0xFF


def _bf16_at(pool_ref, row, addr):
    """f32 of the little-endian bf16 at (row, addr): its 16 bits moved to a float32's top."""
    bits = _bytes(pool_ref, row, addr) | (_bytes(pool_ref, row, addr + 1) << 8)
    return jax.lax.bitcast_convert_type(bits << 16, jnp.float32)


def _decode(pool_ref, row, base, scale_base, d, lay: _Layout):
    """K or V of a KV tile in float32: (N, Dp) from values at ``base`` (N, 1) and scales
    at ``scale_base`` (N, 1) (this head's, this token's); ``d`` (1, Dp) column indices
    already clamped below head_dim."""
    if lay.kind == "f32":
        a = base + 4 * d
        w = _bytes(pool_ref, row, a)
        for j in (1, 2, 3):
            w = w | (_bytes(pool_ref, row, a + j) << (8 * j))
        return jax.lax.bitcast_convert_type(w, jnp.float32)
    if lay.kind == "bf16":
        return _bf16_at(pool_ref, row, base + 2 * d)
    if lay.kind == "fp8":
        raw = pool_ref[jnp.broadcast_to(row, (row.shape[0], d.shape[1])), base + d]
        x = jax.lax.bitcast_convert_type(raw, E4M3).astype(jnp.float32)
        return x * _bf16_at(pool_ref, row, scale_base)
    # int4: element d in byte d // 2, low nibble for even d
    byte = _bytes(pool_ref, row, base + d // 2)
    nib = (byte >> ((d & 1) * 4)) & 0xF
    pair = 4 if lay.asymmetric else 2
    sa = scale_base if lay.groups == 1 else scale_base + (d // (lay.head_dim // lay.groups)) * pair
    scale = _bf16_at(pool_ref, row, sa)
    if lay.asymmetric:
        return nib.astype(jnp.float32) * scale + _bf16_at(pool_ref, row, sa + 2)
    return (nib - 8).astype(jnp.float32) * scale


def _kernel(lens_ref, qpos_ref, q_ref, rows_ref, offs_ref, pool_ref, o_ref, m_ref, l_ref, *,
            lay: _Layout, block_kv: int, num_splits: int, scale: float):
    # lens_ref i32[B]; qpos_ref i32[bq] (-1: padding row); q_ref [bq, Dp];
    # rows_ref, offs_ref i32[B, P]: each page's pool row and this layer's segment offset;
    # pool_ref u8[R, row_bytes]; o_ref f32[bq, Dp]; m_ref, l_ref f32[bq].
    b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(3)
    bq, dp = q_ref.shape
    D, bt = lay.head_dim, lay.block_tokens
    seq_len = lens_ref[b]
    qpos = qpos_ref[...]
    hi = jnp.minimum(seq_len, jnp.max(qpos) + 1)  # KV tokens [lo, hi) can be visible
    lo = jnp.int32(0)
    if lay.window is not None:
        first = jnp.min(jnp.where(qpos >= 0, qpos, jnp.iinfo(jnp.int32).max))
        lo = jnp.maximum(first - (lay.window - 1), 0)
    hi = jnp.maximum(hi, lo)
    t_lo, t_hi = lo // block_kv, (hi + block_kv - 1) // block_kv
    chunk = (t_hi - t_lo + num_splits - 1) // num_splits
    start = t_lo + s * chunk
    end = jnp.minimum(start + chunk, t_hi)

    q = q_ref[...]
    d = jnp.minimum(jax.lax.broadcasted_iota(jnp.int32, (1, dp), 1), D - 1)  # (1, Dp)
    last = jnp.maximum(hi - 1, 0)

    def body(i, carry):
        acc, m, l = carry
        tok = i * block_kv + jax.lax.broadcasted_iota(jnp.int32, (block_kv,), 0)  # (N,)
        tc = jnp.minimum(tok, last)  # never gather at or past the length
        page = tc // bt
        row = rows_ref[b, page][:, None]  # (N, 1)
        seg = offs_ref[b, page][:, None]
        slot = (tc % bt)[:, None]
        vbase = seg + slot * lay.value_row + h * lay.head_values
        sbase = seg + slot * lay.scale_row + h * lay.head_scales
        live = (tok < seq_len)[:, None]  # (N, 1)
        k = _decode(pool_ref, row, vbase, sbase + lay.k_scales, d, lay)
        v = _decode(pool_ref, row, vbase + lay.v_values, sbase + lay.v_scales, d, lay)
        k = jnp.where(live, k, 0.0).astype(q.dtype)
        v = jnp.where(live, v, 0.0).astype(q.dtype)
        sc = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32) * scale  # (bq, N)
        vis = (tok[None, :] <= qpos[:, None]) & (tok[None, :] < seq_len)
        if lay.window is not None:
            vis &= tok[None, :] > qpos[:, None] - lay.window
        sc = jnp.where(vis, sc, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(sc, axis=1))
        p = jnp.exp(sc - m_new[:, None])
        alpha = jnp.exp(m - m_new)
        pv = jax.lax.dot_general(p.astype(q.dtype), v, (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)  # (bq, Dp)
        return acc * alpha[:, None] + pv, m_new, l * alpha + jnp.sum(p, axis=1)

    init = (jnp.zeros((bq, dp), jnp.float32), jnp.full((bq,), _NEG, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(start, end, body, init)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


# --------------------------------------------------------------------------- wrapper
def _tables(cache: Any, pool_rows: int, layer, page_table: jax.Array):
    """i32[B, P] pool row and byte offset of this layer's segment for each page; handles
    are clamped into the pool so unused table slots can never address outside it."""
    h = jnp.clip(page_table.astype(jnp.int32), 0, pool_rows * cache.blocks_per_row - 1)
    rows = h // cache.blocks_per_row
    offs = (h % cache.blocks_per_row) * cache.stride + layer * cache.block.layer_bytes
    return rows.astype(jnp.int32), offs.astype(jnp.int32)


def paged_attention_partials(pool: jax.Array, layer, q: jax.Array, meta: Any, cache: Any,
                             scale: float, *, config: AttentionConfig,
                             interpret: bool = False):
    """The kernel launch: per split unnormalized outputs f32[S, B, Hkv, Mp, Dp] and their
    row max and sum f32[S, B, Hkv, Mp] (rows: token x group head, token-major)."""
    B, T, H, D = q.shape
    lay = _layout(cache)
    Hkv = cache.block.kv_heads
    g = H // Hkv
    cfg = config
    bq, S = cfg.block_q, cfg.num_splits
    rows = T * g
    mp = -(-rows // bq) * bq
    dp = max(16, _next_pow2(D))
    qk = q.reshape(B, T, Hkv, g, D).transpose(0, 2, 1, 3, 4).reshape(B, Hkv, rows, D)
    qk = jnp.pad(qk, ((0, 0), (0, 0), (0, mp - rows), (0, dp - D)))
    qpos = jnp.repeat(meta.positions.astype(jnp.int32), g, axis=1)  # (B, rows)
    qpos = jnp.pad(qpos, ((0, 0), (0, mp - rows)), constant_values=-1)
    lens = meta.seq_lens.astype(jnp.int32)
    prow, poff = _tables(cache, pool.shape[0], layer, meta.page_table)
    P = meta.page_table.shape[1]
    grid = (B, Hkv, mp // bq, S)
    whole = lambda *shape: pl.BlockSpec(shape, lambda b, h, i, s: (0,) * len(shape))
    in_specs = [
        whole(B),
        pl.BlockSpec((None, bq), lambda b, h, i, s: (b, i)),
        pl.BlockSpec((None, None, bq, dp), lambda b, h, i, s: (b, h, i, 0)),
        whole(B, P),
        whole(B, P),
        pl.BlockSpec(memory_space=pl.ANY),
    ]
    out_specs = [
        pl.BlockSpec((None, None, None, bq, dp), lambda b, h, i, s: (s, b, h, i, 0)),
        pl.BlockSpec((None, None, None, bq), lambda b, h, i, s: (s, b, h, i)),
        pl.BlockSpec((None, None, None, bq), lambda b, h, i, s: (s, b, h, i)),
    ]
    out_shape = [jax.ShapeDtypeStruct((S, B, Hkv, mp, dp), jnp.float32),
                 jax.ShapeDtypeStruct((S, B, Hkv, mp), jnp.float32),
                 jax.ShapeDtypeStruct((S, B, Hkv, mp), jnp.float32)]
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as pl_triton

        params["compiler_params"] = pl_triton.CompilerParams(num_warps=cfg.num_warps,
                                                             num_stages=cfg.num_stages)
    kern = partial(_kernel, lay=lay, block_kv=cfg.block_kv, num_splits=S, scale=float(scale))
    return pl.pallas_call(kern, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, interpret=interpret, name="paged_attention",
                          **params)(lens, qpos, qk, prow, poff, pool)


def merge_splits(o: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Combine split partials o f32[S, ..., Dp], m, l f32[S, ...] -> f32[..., Dp]; rows no
    split saw a visible key for come out 0 (as the reference's padding rows)."""
    m_all = jnp.max(m, axis=0)
    w = jnp.exp(m - m_all[None])  # an empty split has m = _NEG and l = 0
    den = jnp.sum(w * l, axis=0)
    num = jnp.sum(w[..., None] * o, axis=0)
    return num / jnp.where(den > 0, den, 1.0)[..., None]


def paged_attention(pool: jax.Array, layer, q: jax.Array, meta: Any, cache: Any,
                    scale: float, *, config: AttentionConfig | None = None,
                    interpret: bool | None = None) -> jax.Array:
    """Attention of q (B, T, H, D) over the K/V a ``PagedKVCache`` keeps in ``pool``.

    pool: u8[R, row_bytes], the device's KV pool. layer: int or traced i32 scalar.
    meta: ``PagedKVMeta`` (positions i32[B, T] with -1 padding, seq_lens i32[B] with 0 for
    a padding row, page_table i32[B, P]). cache: the model's ``PagedKVCache`` (format,
    block layout and sliding window are static). Returns (B, T, H, D) in q.dtype, equal to
    ``cache.attend`` up to float32 summation order (rows with no visible key are 0).
    ``interpret``: None runs the interpreter unless the default backend is a GPU.
    """
    B, T, H, D = q.shape
    blk = cache.block
    if D != blk.head_dim or H % blk.kv_heads:
        raise ValueError(f"paged_attention: q {q.shape} does not fit KV heads {blk.kv_heads} "
                         f"x head_dim {blk.head_dim}")
    if meta.positions.shape != (B, T) or meta.seq_lens.shape != (B,) or \
            meta.page_table.ndim != 2 or meta.page_table.shape[0] != B:
        raise ValueError(f"paged_attention: metadata shapes {meta.positions.shape}, "
                         f"{meta.seq_lens.shape}, {meta.page_table.shape} do not fit q {q.shape}")
    if pool.dtype != jnp.uint8 or pool.ndim != 2:
        raise TypeError(f"paged_attention: pool must be u8[R, row_bytes], got {pool.dtype}"
                        f"{list(pool.shape)}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if not interpret and 2 ** 31 <= pool.size <= 2 ** 32:
        # The Triton lowering addresses a ref of at most 2**32 bytes with 32-bit offsets,
        # which pointer arithmetic sign-extends: bytes past 2 GiB would be misaddressed.
        from fineserve_jax.model.paged import paged_reference_attention

        k, v = cache.gather(pool, layer, meta.page_table)
        return paged_reference_attention(q, k, v, meta.positions, meta.seq_lens, scale,
                                         cache.sliding_window)
    g = H // blk.kv_heads
    cfg = config or default_config(B, blk.kv_heads, T * g,
                                   meta.page_table.shape[1] * blk.block_tokens)
    o, m, l = paged_attention_partials(pool, layer, q, meta, cache, scale, config=cfg,
                                       interpret=interpret)
    out = merge_splits(o, m, l)[..., :T * g, :D]  # (B, Hkv, T * g, D)
    out = out.reshape(B, blk.kv_heads, T, g, D).transpose(0, 2, 1, 3, 4)
    return out.reshape(B, T, H, D).astype(q.dtype)


def kv_bytes_read(cache: Any, seq_lens, query_tiles: int = 1) -> int:
    """Pool bytes one decode call reads for sequences of ``seq_lens`` tokens (host ints):
    K and V values and scales of every visible token (the last ``sliding_window`` with a
    window), once per query tile (1 for decode: ``T * H / Hkv <= block_q``). Tail steps
    past a length re-read the last live token (a cache hit), so this is the DRAM traffic
    but for the page table, queries and outputs (each under 1% at decode sizes)."""
    b, w = cache.block, cache.sliding_window
    per_token = 2 * (b.value_row_bytes + b.scale_row_bytes)
    tokens = sum(min(int(n), w) if w else int(n) for n in seq_lens)
    return tokens * per_token * query_tiles


__all__ = ["AttentionConfig", "KERNEL_MODE", "default_config", "kv_bytes_read",
           "merge_splits", "paged_attention", "paged_attention_partials"]
