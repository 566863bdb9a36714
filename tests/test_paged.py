"""Paged KV over the shared byte pool: writes land in their blocks, attention equals dense.

Free blocks and every byte not written are NaN (0xFF), page tables are random
permutations, lengths are awkward (1, block +/- 1, the maximum): a sequence must never
read a position at or past its length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fineserve_jax.config import ModelConfig
from fineserve_jax.kvslab import BlockFormat
from fineserve_jax.model import DenseKVCache, DenseKVMeta, forward, init_params, lm_head
from fineserve_jax.model.kv import reference_attention
from fineserve_jax.model.kv_formats import kv_format
from fineserve_jax.model.paged import PagedKVCache, PagedKVMeta, paged_reference_attention

BT = 4  # tokens per block


def _cache(cfg, fmt_name, bpr=3, pad=64):
    fmt = kv_format(fmt_name)
    blk = fmt.block_format(cfg, BT)
    return PagedKVCache(fmt, blk, bpr, blk.block_bytes + pad, cfg.sliding_window)


def _poisoned_pool(kv, rows):
    return jnp.full((rows, kv.blocks_per_row * kv.stride), 0xFF, jnp.uint8)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 2), (8, 1)])  # GQA 1, 3, 4, 8
@pytest.mark.parametrize("fmt_name,tol", [("f32", 1e-6), ("bf16", 1e-2)])
def test_paged_attention_equals_dense(heads, kv_heads, fmt_name, tol):
    rng = np.random.default_rng(heads * 10 + kv_heads)
    D, P, rows = 8, 5, 6
    cfg = ModelConfig(vocab_size=16, hidden_size=heads * D, intermediate_size=8, num_layers=2,
                      num_heads=heads, num_kv_heads=kv_heads, head_dim=D)
    kv = _cache(cfg, fmt_name)
    lens = np.array([1, BT - 1, BT, BT + 1, P * BT], np.int32)  # awkward lengths; P*BT = max
    B = len(lens)
    S = P * BT
    k = rng.standard_normal((B, S, kv_heads, D)).astype(np.float32)
    v = rng.standard_normal((B, S, kv_heads, D)).astype(np.float32)
    q = rng.standard_normal((B, 1, heads, D)).astype(np.float32)
    # Each sequence gets random distinct blocks; unused page-table slots point anywhere.
    perm = rng.permutation(rows * kv.blocks_per_row)
    page_table = np.zeros((B, P), np.int32)
    used = 0
    for b in range(B):
        n = -(-lens[b] // BT)
        page_table[b, :n] = perm[used:used + n]
        page_table[b, n:] = rng.integers(0, rows * kv.blocks_per_row, P - n)
        used += n
    pool = _poisoned_pool(kv, rows)
    positions = np.where(np.arange(S)[None] < lens[:, None], np.arange(S)[None], -1).astype(np.int32)
    meta = PagedKVMeta(positions, lens, page_table)
    pool = kv.update(pool, 1, jnp.asarray(k), jnp.asarray(v), meta)

    # Queries at the last position of each sequence attend through the page table...
    qpos = (lens - 1)[:, None].astype(np.int32)
    out = kv.attend(pool, 1, jnp.asarray(q), PagedKVMeta(qpos, lens, page_table), D ** -0.5)
    # ...and equal attention over the dense K/V (stored values: bf16-rounded for bf16).
    ks = np.asarray(jnp.asarray(k).astype(kv.fmt.dtype).astype(jnp.float32))
    vs = np.asarray(jnp.asarray(v).astype(kv.fmt.dtype).astype(jnp.float32))
    mask = np.arange(S)[None, None, :] < lens[:, None, None]
    ref = reference_attention(jnp.asarray(q), jnp.asarray(ks), jnp.asarray(vs), mask, D ** -0.5)
    out, ref = np.asarray(out, np.float32), np.asarray(ref)
    assert np.isfinite(out).all()
    err = np.abs(out - ref).max(axis=(1, 2, 3)) / np.abs(ref).max(axis=(1, 2, 3))
    assert (err < tol).all(), err

    # The write touched exactly the live slots of layer 1: everything else is still poison.
    written = np.zeros(pool.shape, bool)
    blk = kv.block
    seg = blk.layer_bytes
    for b in range(B):
        for p in range(lens[b]):
            h = page_table[b, p // BT]
            r, off = h // kv.blocks_per_row, (h % kv.blocks_per_row) * kv.stride + seg
            for part in (0, BT):  # K then V values of this slot
                a = off + (part + p % BT) * blk.value_row_bytes
                written[r, a:a + blk.value_row_bytes] = True
    pool_np = np.asarray(pool)
    assert (pool_np[~written] == 0xFF).all()
    assert written.sum() == 2 * lens.sum() * blk.value_row_bytes


def test_paged_reference_ignores_nan_past_length():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 1, 2, 4)).astype(np.float32)
    k = rng.standard_normal((1, 6, 1, 4)).astype(np.float32)
    v = rng.standard_normal((1, 6, 1, 4)).astype(np.float32)
    k[:, 3:], v[:, 3:] = np.nan, np.nan
    out = paged_reference_attention(q, k, v, np.array([[2]]), np.array([3]), 0.5)
    ref = paged_reference_attention(q, k[:, :3], v[:, :3], np.array([[2]]), np.array([3]), 0.5)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6)
    assert np.isfinite(np.asarray(out)).all()


def test_model_on_paged_pool_equals_dense_pass():
    """Chunked prefill then decode through the pool gives the dense full-pass logits."""
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=3,
                      num_heads=6, num_kv_heads=2, head_dim=16, max_position_embeddings=128)
    params = init_params(cfg, jax.random.key(0))
    kv = _cache(cfg, "f32")
    rows = 12
    pool = _poisoned_pool(kv, rows)
    ids = np.random.default_rng(0).integers(0, 128, size=(2, 21)).astype(np.int32)
    pos = np.broadcast_to(np.arange(21), (2, 21)).astype(np.int32)
    state = DenseKVCache.init(3, 2, 21, 2, 16, jnp.float32)
    h, _ = forward(cfg, params, ids, pos, DenseKVCache(), state, DenseKVMeta(pos, np.array([21, 21])))
    full = np.asarray(lm_head(cfg, params, h))
    page_table = np.random.default_rng(1).permutation(rows * 3)[:16].reshape(2, 8).astype(np.int32)
    outs = []
    for a, b in [(0, 9), (9, 17), (17, 18), (18, 21)]:
        p = pos[:, a:b]
        h, pool = forward(cfg, params, ids[:, a:b], p, kv, pool,
                          PagedKVMeta(p, np.array([b, b], np.int32), page_table))
        outs.append(np.asarray(lm_head(cfg, params, h)))
    out = np.concatenate(outs, axis=1)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, full, rtol=1e-5, atol=1e-5)


def test_block_format_bytes_match_encoding():
    cfg = ModelConfig(vocab_size=16, hidden_size=32, intermediate_size=8, num_layers=3,
                      num_heads=4, num_kv_heads=2, head_dim=8)
    for name, size in [("f32", 4), ("bf16", 2)]:
        blk = kv_format(name).block_format(cfg, BT)
        assert blk == BlockFormat(3, 2, 8, BT, size, 0, name)
        vals, scales = kv_format(name).encode(jnp.ones((5, 2, 8)))
        assert vals.shape == (5, blk.value_row_bytes) and scales.shape == (5, 0)
