"""FireQ smoothing is exact algebra: folded into an unquantized model it changes no logits."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fineserve_jax.config import ModelConfig
from fineserve_jax.model import init_params
from fineserve_jax.model.kv import DenseKVCache, DenseKVMeta
from fineserve_jax.model.transformer import apply_rope, forward, lm_head, rope_tables
from fineserve_jax.precisions import SmoothingConfig
from fineserve_jax.quant.smoothing import key_stats, smooth

# GQA with 3 query heads per KV head, so the v -> o pairing is exercised.
CFG = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=3,
                  num_heads=6, num_kv_heads=2, head_dim=16, max_position_embeddings=256)
EVERYTHING = SmoothingConfig(c_qkv=0.02, c_vo=0.03, c_gate_up=0.0096, c_down=0.015, v_mul=0.9,
                             alpha=8.0, beta=8.0, post_rope_topk=2)


def logits(cfg, params, tokens):
    tokens = jnp.asarray(tokens, jnp.int32)[None]
    T = tokens.shape[1]
    pos = jnp.arange(T, dtype=jnp.int32)[None]
    kv = DenseKVCache()
    state = kv.init(cfg.num_layers, 1, T, cfg.num_kv_heads, cfg.head_dim, jnp.float32)
    h, _ = forward(cfg, params, tokens, pos, kv, state,
                   DenseKVMeta(pos, jnp.full((1,), T, jnp.int32)), jnp.float32)
    return np.asarray(lm_head(cfg, params, h)[0])


def skewed_params(seed=0):
    """Random weights with outlier channels, like real models have."""
    p = jax.tree.map(np.asarray, init_params(CFG, jax.random.key(seed)))
    rng = np.random.default_rng(seed)
    lay = dict(p["layers"])
    lay["attn_norm"] = lay["attn_norm"] * rng.lognormal(0, 1, lay["attn_norm"].shape)
    lay["wk"] = lay["wk"] * rng.lognormal(0, 1, lay["wk"].shape[:2])[..., None]
    lay["w_up"] = lay["w_up"] * rng.lognormal(0, 1, lay["w_up"].shape[:2])[..., None]
    return {**p, "layers": {k: np.asarray(v, np.float32) for k, v in lay.items()}}


@pytest.mark.parametrize("sm", [
    EVERYTHING,
    EVERYTHING.without_channel(),
    dataclasses.replace(EVERYTHING, pre_rope=False),
    dataclasses.replace(EVERYTHING, post_rope=False, c_qkv=0.0),
])
def test_smoothing_alone_leaves_logits_unchanged(sm):
    params = skewed_params()
    rng = np.random.default_rng(1)
    calib = rng.integers(0, 256, (2, 48))
    stats = key_stats(CFG, params, calib, progress=False)
    assert stats.pair_max.shape == (3, 2, 8) and stats.chan_max.shape == (3, 2, 16)
    assert (stats.pair_max > 0).all()
    smoothed = smooth(CFG, params, sm, stats)
    toks = rng.integers(0, 256, 40)
    want, got = logits(CFG, params, toks), logits(CFG, smoothed, toks)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
    # ... while the weights really moved
    moved = {"wk": sm.pre_rope or sm.c_qkv, "w_down": sm.c_down, "wo": sm.c_vo or sm.v_mul != 1}
    for name, should in moved.items():
        assert np.allclose(smoothed["layers"][name], params["layers"][name]) == (not should)
    assert ("k_post" in smoothed["layers"]) == sm.post_rope


def test_key_scales_flatten_the_keys():
    params = skewed_params(2)
    calib = np.random.default_rng(3).integers(0, 256, (2, 48))
    stats = key_stats(CFG, params, calib, progress=False)
    sm = EVERYTHING.without_channel()
    after = key_stats(CFG, smooth(CFG, params, sm, stats), calib, progress=False)
    # Pre-RoPE: every unselected pair now peaks at alpha (same data, scales folded in).
    # Post-RoPE: the selected channels peak at beta (the statistics see the keys the cache
    # stores, after k_post).
    top = np.argsort(-stats.chan_max, axis=-1, kind="stable")[..., :sm.post_rope_topk]
    sel = np.zeros_like(stats.chan_max, bool)
    for idx in (top, (top + CFG.head_dim // 2) % CFG.head_dim):
        np.put_along_axis(sel, idx, True, axis=-1)
    pair_sel = sel[..., :CFG.head_dim // 2] | sel[..., CFG.head_dim // 2:]
    np.testing.assert_allclose(after.pair_max[~pair_sel], sm.alpha, rtol=1e-4)
    np.testing.assert_allclose(after.chan_max[sel], sm.beta, rtol=1e-4)
    assert (after.chan_max[sel] < stats.chan_max[sel]).mean() > 0.5  # outliers came down


def test_pair_scales_commute_with_rope():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(1, 7, 2, 16)), jnp.float32)
    cos, sin = rope_tables(CFG, jnp.arange(7)[None] * 13)
    a = rng.lognormal(0, 1, (2, 8))
    pair = jnp.asarray(np.concatenate([a, a], axis=-1), jnp.float32)
    np.testing.assert_allclose(apply_rope(x * pair, cos, sin), apply_rope(x, cos, sin) * pair,
                               rtol=1e-5, atol=1e-6)
    unpaired = jnp.asarray(rng.lognormal(0, 1, (2, 16)), jnp.float32)
    assert not np.allclose(apply_rope(x * unpaired, cos, sin),
                           apply_rope(x, cos, sin) * unpaired, rtol=1e-3)


def test_smoothing_the_real_model_keeps_its_logits(smollm2_f32):
    llm = smollm2_f32
    cfg, params = llm.config, jax.tree.map(np.asarray, llm.runner.params)
    toks = llm.tokenizer.encode("The capital of France is Paris. The river Seine flows")
    stats = key_stats(cfg, params, np.asarray([toks * 4]), progress=False)
    smoothed = smooth(cfg, params, EVERYTHING, stats)
    want, got = logits(cfg, params, toks), logits(cfg, smoothed, toks)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_smoothing_without_statistics_is_refused():
    with pytest.raises(ValueError, match="calibration"):
        smooth(CFG, skewed_params(), EVERYTHING, None)
