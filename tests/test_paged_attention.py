"""The paged attention kernel (``pallas_kernels.paged_attention``) in Pallas interpret mode
against ``PagedKVCache.attend`` (the XLA reference), its lowering for CUDA, and its use
through the real model path.

Every pool starts as 0xFF (bf16 / f32 NaN, FP8 NaN): free blocks, slots past a length and
unused page-table entries hold poison, so a read at or past a sequence's length shows up
as NaN. Page tables are random permutations; unused table slots hold random handles,
some out of the pool's range. Lengths are 1, block - 1, block, block + 1 and the table's
maximum, plus a padding row (length 0).

Tolerances (per row: max |out - ref| / max |ref|): float32 queries 2e-6 for every KV
format (the kernel decodes the same bytes as the reference, so only the summation order
differs); bfloat16 queries 2e-2 (the kernel rounds unnormalized probabilities to bf16,
the reference normalized ones); measured at most 2.5e-7 and 5.2e-3. Rows with no
visible key must be exactly 0 in both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fineserve_jax.config import ModelConfig
from fineserve_jax.model import forward, init_params, lm_head
from fineserve_jax.model.kv_formats import kv_format
from fineserve_jax.model.paged import PagedKVCache, PagedKVMeta
from pallas_kernels import paged_attention as pa
from pallas_kernels.paged_attention import (AttentionConfig, default_config, kv_bytes_read,
                                            paged_attention)
from tests.mosaic_gpu import lowers_for_cuda

BT = 4  # tokens per block
P = 5  # page-table width: the longest sequence has P * BT tokens
BPR = 3  # blocks per pool row
ROWS = 12  # pool rows
TOL = {jnp.float32: 2e-6, jnp.bfloat16: 2e-2}


def _cache(fmt_name, heads, kv_heads, head_dim, window=None):
    cfg = ModelConfig(vocab_size=16, hidden_size=heads * head_dim, intermediate_size=8,
                      num_layers=2, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)
    fmt = kv_format(fmt_name)
    blk = fmt.block_format(cfg, BT)
    return PagedKVCache(fmt, blk, BPR, blk.block_bytes + 40, window)


def _case(kv, heads, T, seed, qdtype):
    """Pool with layer 1 of 6 sequences written, and a step of T query tokens per row.

    Returns pool, q (B, T, H, D), meta. Row 5 is padding (length 0, positions -1); row 3
    has fewer new tokens than T (its tail is padding, position -1)."""
    rng = np.random.default_rng(seed)
    D, Hkv = kv.block.head_dim, kv.block.kv_heads
    lens = np.array([1, BT - 1, BT, BT + 1, P * BT, 0], np.int32)
    B, S = len(lens), P * BT
    handles = rng.permutation(ROWS * BPR)
    table = rng.integers(-3, ROWS * BPR + 3, size=(B, P)).astype(np.int32)  # unused: junk
    used = 0
    for b in range(B):
        n = -(-lens[b] // BT)
        table[b, :n] = handles[used:used + n]
        used += n
    pool = jnp.full((ROWS, BPR * kv.stride), 0xFF, jnp.uint8)
    k = rng.standard_normal((B, S, Hkv, D)).astype(np.float32)
    v = rng.standard_normal((B, S, Hkv, D)).astype(np.float32)
    k[:, :, :, 0] *= 4  # one larger channel so scales differ between heads and groups
    all_pos = np.where(np.arange(S)[None] < lens[:, None], np.arange(S)[None], -1)
    write = jax.jit(lambda pool, k, v, meta: kv.update(pool, 1, k, v, meta))  # one compile
    pool = write(pool, k, v, PagedKVMeta(all_pos.astype(np.int32), lens, table))
    pos = np.full((B, T), -1, np.int32)
    for b in range(B):
        n = min(T, int(lens[b])) - (1 if b == 3 and T > 1 else 0)
        pos[b, :n] = np.arange(lens[b] - n, lens[b])
    q = rng.standard_normal((B, T, heads, D)).astype(np.float32)
    return pool, jnp.asarray(q, qdtype), PagedKVMeta(jnp.asarray(pos), jnp.asarray(lens),
                                                     jnp.asarray(table))


def _both(kv, pool, q, meta, scale, cfg):
    """(kernel in interpret mode, XLA reference), each one jitted call on layer 1."""
    got = jax.jit(lambda pool, q, meta: paged_attention(pool, jnp.int32(1), q, meta, kv, scale,
                                                        config=cfg, interpret=True))
    ref = jax.jit(lambda pool, q, meta: kv.attend(pool, jnp.int32(1), q, meta, scale))
    return got(pool, q, meta), ref(pool, q, meta)


def _check(out, ref, qdtype):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert out.shape == ref.shape
    assert np.isfinite(ref).all() and np.isfinite(out).all()
    B = out.shape[0]
    o, r = out.reshape(B, -1), ref.reshape(B, -1)
    scale = np.abs(r).max(axis=1)
    empty = scale == 0
    assert (o[empty] == 0).all()  # padding rows are exactly 0, as in the reference
    err = np.abs(o - r).max(axis=1)[~empty] / scale[~empty]
    assert (err < TOL[qdtype]).all(), err
    return err


# (format, heads, kv_heads, head_dim, T, q dtype, splits): every format, decode (T = 1)
# and prefill chunks (T = 3: 24 query rows for GQA 8, two query tiles), GQA 1, 3, 4, 8,
# split-K off and on (3 splits over 2 KV steps leaves one split empty).
CASES = [
    ("f32", 2, 2, 16, 1, jnp.float32, 3),
    ("f32", 8, 2, 16, 3, jnp.float32, 1),
    ("bf16", 8, 1, 16, 3, jnp.bfloat16, 2),
    ("fp8", 8, 2, 16, 1, jnp.float32, 2),
    ("int4", 8, 1, 16, 1, jnp.float32, 4),
    ("int4", 6, 2, 16, 3, jnp.float32, 1),
    ("int4-g32", 2, 2, 64, 1, jnp.bfloat16, 1),
    ("int4-g32", 8, 2, 64, 3, jnp.float32, 3),
    ("int4-asym", 6, 2, 16, 1, jnp.float32, 2),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-g{c[1] // c[2]}-T{c[4]}-"
                         f"{jnp.dtype(c[5]).name}-s{c[6]}")
def test_kernel_equals_reference(case):
    fmt_name, heads, kv_heads, D, T, qdtype, splits = case
    kv = _cache(fmt_name, heads, kv_heads, D)
    pool, q, meta = _case(kv, heads, T, seed=heads * 10 + T, qdtype=qdtype)
    cfg = AttentionConfig(block_q=16, block_kv=16, num_splits=splits)
    out, ref = _both(kv, pool, q, meta, D ** -0.5, cfg)
    assert out.dtype == q.dtype
    _check(out, ref, qdtype)


def test_sliding_window_and_default_config():
    """A window shorter than the context: the longest row's first query (position 17)
    sees positions 15..17, so the kernel must start at the KV step holding 15 and may
    skip none of it (a step of 16 tokens: 15 is the last of the first step)."""
    kv = _cache("bf16", 4, 2, 16, window=3)
    pool, q, meta = _case(kv, 4, 3, seed=7, qdtype=jnp.float32)
    out, ref = _both(kv, pool, q, meta, 0.25, AttentionConfig(block_kv=16, num_splits=2))
    _check(out, ref, jnp.float32)
    # default_config: no splits for a 20-token table, several for 4096 tokens and few rows
    assert default_config(6, 2, 3 * 2, P * BT, num_cores=132).num_splits == 1
    cfg = default_config(6, 2, 3 * 2, 4096, num_cores=132)
    assert cfg.num_splits > 1 and cfg.block_kv == 64


def test_rejects_bad_inputs():
    kv = _cache("f32", 4, 2, 16)
    pool, q, meta = _case(kv, 4, 1, seed=0, qdtype=jnp.float32)
    with pytest.raises(ValueError, match="head_dim"):
        paged_attention(pool, 1, q[..., :8], meta, kv, 1.0, interpret=True)
    with pytest.raises(TypeError, match="pool"):
        paged_attention(pool.astype(jnp.int8), 1, q, meta, kv, 1.0, interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        AttentionConfig(block_kv=24)


def test_bytes_read_per_decode_step():
    kv = _cache("int4-g32", 8, 2, 64)
    b = kv.block
    # K and V: 2 heads x 32 bytes of nibbles + 2 heads x 2 groups x 2 bytes of scales each
    assert 2 * (b.value_row_bytes + b.scale_row_bytes) == 2 * (64 + 8)
    assert kv_bytes_read(kv, [1, 4, 0]) == 5 * 2 * (64 + 8)


@pytest.mark.parametrize("fmt_name,window,pool_gib", [
    ("f32", None, 0), ("bf16", None, 0), ("fp8", None, 0), ("int4", None, 0),
    ("int4-g32", None, 0), ("int4-asym", 64, 6), ("bf16", None, 3)])
def test_lowers_for_cuda(fmt_name, window, pool_gib):
    """The whole Triton lowering runs on CPU for every format (compiling needs a GPU):
    bf16 queries at a realistic head size, split-K on, a prefill-sized query tile; one
    case with a sliding window and a 6 GiB pool (64-bit addressing). A 3 GiB pool, which
    the lowering would address with 32-bit signed offsets, takes the XLA reference."""
    D, heads, kv_heads, T, B, Pw = 128, 8, 2, 4, 3, 8
    kv = _cache(fmt_name, heads, kv_heads, D, window)
    R = max(6, (pool_gib << 30) // (BPR * kv.stride))
    s = jax.ShapeDtypeStruct
    meta = PagedKVMeta(s((B, T), jnp.int32), s((B,), jnp.int32), s((B, Pw), jnp.int32))
    cfg = AttentionConfig(block_q=16, block_kv=32, num_splits=2)
    text = lowers_for_cuda(
        lambda pool, layer, q, meta: paged_attention(pool, layer, q, meta, kv, D ** -0.5,
                                                     config=cfg, interpret=False),
        s((R, BPR * kv.stride), jnp.uint8), s((), jnp.int32), s((B, T, heads, D), jnp.bfloat16),
        meta)
    kernel = "paged_attention" in text and "xla.gpu.triton" in text
    assert kernel == (pool_gib not in (2, 3, 4))


def test_model_path_kernel_equals_reference(monkeypatch):
    """A tiny model on an FP8 pool: a prefill chunk over earlier context gives the same
    logits with the kernel forced (interpret) through ``PagedKVCache.attend`` as with the
    XLA reference."""
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=2,
                      num_heads=6, num_kv_heads=2, head_dim=16, max_position_embeddings=64)
    params = init_params(cfg, jax.random.key(0))
    fmt = kv_format("fp8")
    blk = fmt.block_format(cfg, BT)
    kv = PagedKVCache(fmt, blk, BPR, blk.block_bytes + 8)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, size=(2, 7)).astype(np.int32)
    table = rng.permutation(ROWS * BPR)[:6].reshape(2, 3).astype(np.int32)
    calls = []
    kernel = pa.paged_attention
    monkeypatch.setattr(pa, "paged_attention", lambda *a, **k: calls.append(k) or kernel(*a, **k))

    def step(pool, a, b, mode):
        monkeypatch.setattr(pa, "KERNEL_MODE", mode)  # read when the step is traced
        pos = np.broadcast_to(np.arange(a, b), (2, b - a)).astype(np.int32)
        run = jax.jit(lambda pool, ids: _logits(cfg, params, kv, pool, ids, pos, table))
        out, pool = run(pool, ids[:, a:b])
        return np.asarray(out), pool

    pool = jnp.full((ROWS, BPR * kv.stride), 0xFF, jnp.uint8)
    _, pool = step(pool, 0, 4, None)  # earlier context (written by the reference step)
    ref, _ = step(pool, 4, 7, None)
    assert not calls
    got, _ = step(pool, 4, 7, "interpret")
    assert [c["interpret"] for c in calls] == [True]  # the layer scan traces it once
    assert np.isfinite(ref).all()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def _logits(cfg, params, kv, pool, ids, pos, table):
    lens = np.full((pos.shape[0],), pos[0, -1] + 1, np.int32)
    h, pool = forward(cfg, params, ids, pos, kv, pool, PagedKVMeta(pos, lens, table))
    return lm_head(cfg, params, h), pool
