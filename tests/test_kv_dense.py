"""The KV interface over the dense cache: chunked prefill and decode equal one full pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fineserve_jax.config import ModelConfig
from fineserve_jax.model import DenseKVCache, DenseKVMeta, forward, init_params, lm_head

CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=3,
                  num_heads=6, num_kv_heads=2, head_dim=16, max_position_embeddings=128)


def _run(params, kv_state, tokens, positions, seq_lens, cfg=CFG):
    kv = DenseKVCache(sliding_window=cfg.sliding_window)
    h, kv_state = forward(cfg, params, jnp.asarray(tokens), jnp.asarray(positions), kv, kv_state,
                          DenseKVMeta(jnp.asarray(positions), jnp.asarray(seq_lens)))
    return np.asarray(lm_head(cfg, params, h)), kv_state


def _cache(batch, S=32, cfg=CFG):
    return DenseKVCache.init(cfg.num_layers, batch, S, cfg.num_kv_heads, cfg.head_dim, jnp.float32)


def test_chunked_prefill_and_decode_equal_full_pass():
    params = init_params(CFG, jax.random.key(0))
    ids = np.random.default_rng(0).integers(0, 128, size=20).astype(np.int32)
    full, _ = _run(params, _cache(1), ids[None], np.arange(20)[None], [20])

    # Prefill 7 tokens, then a chunk of 8, then decode one token at a time.
    out, kv = _run(params, _cache(1), ids[None, :7], np.arange(7)[None], [7])
    np.testing.assert_allclose(out[0], full[0, :7], rtol=1e-5, atol=1e-5)
    out, kv = _run(params, kv, ids[None, 7:15], np.arange(7, 15)[None], [15])
    np.testing.assert_allclose(out[0], full[0, 7:15], rtol=1e-5, atol=1e-5)
    for t in range(15, 20):
        out, kv = _run(params, kv, ids[None, t:t + 1], np.array([[t]]), [t + 1])
        np.testing.assert_allclose(out[0, 0], full[0, t], rtol=1e-5, atol=1e-5)


def test_padded_ragged_batch_equals_separate_sequences():
    params = init_params(CFG, jax.random.key(1))
    rng = np.random.default_rng(1)
    lens = [5, 12, 1]
    seqs = [rng.integers(0, 128, size=n).astype(np.int32) for n in lens]
    tokens = np.zeros((3, 12), np.int32)
    positions = np.full((3, 12), -1, np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
        positions[i, :len(s)] = np.arange(len(s))
    # Garbage in the padding slots must not leak into any sequence.
    tokens[positions < 0] = 77
    batched, _ = _run(params, _cache(3), tokens, positions, lens)
    for i, s in enumerate(seqs):
        alone, _ = _run(params, _cache(1), s[None], np.arange(len(s))[None], [len(s)])
        np.testing.assert_allclose(batched[i, :len(s)], alone[0], rtol=1e-5, atol=1e-5)


def test_sliding_window_limits_what_a_token_sees():
    cfg = ModelConfig(**{**CFG.to_dict(), "sliding_window": 4})
    params = init_params(cfg, jax.random.key(2))
    ids = np.random.default_rng(2).integers(0, 128, size=16).astype(np.int32)
    full, _ = _run(params, _cache(1, cfg=cfg), ids[None], np.arange(16)[None], [16], cfg)
    # Changing token 0 must not change position 15: 3 layers of window 4 reach back to 6...
    ids2 = ids.copy()
    ids2[0] = (ids[0] + 1) % 128
    other, _ = _run(params, _cache(1, cfg=cfg), ids2[None], np.arange(16)[None], [16], cfg)
    np.testing.assert_allclose(other[0, 15], full[0, 15], rtol=1e-6)
    # ...but it does change position 2, inside the window.
    assert np.abs(other[0, 2] - full[0, 2]).max() > 1e-4
