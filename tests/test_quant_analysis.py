"""quant.analysis: per-layer quantization error of each FireQ smoothing step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fineserve_jax.config import ModelConfig
from fineserve_jax.model import init_params
from fineserve_jax.model.kv import DenseKVCache, DenseKVMeta
from fineserve_jax.model.transformer import forward, residual_stream, rms_norm
from fineserve_jax.precisions import PRECISIONS
from fineserve_jax.quant.analysis import LINEAR_NAMES, fireq_ablation, layer_errors
from fineserve_jax.quant.smoothing import key_stats

# K of every linear a multiple of 128 (FireQ's INT4 groups); GQA with 2 heads per KV head
CFG = ModelConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=256)


def skewed_params(seed=0):
    """Random weights with outlier channels in the norms, keys and up projections."""
    p = jax.tree.map(np.asarray, init_params(CFG, jax.random.key(seed)))
    rng = np.random.default_rng(seed)
    lay = dict(p["layers"])
    lay["attn_norm"] = lay["attn_norm"] * rng.lognormal(0, 1, lay["attn_norm"].shape)
    lay["wk"] = lay["wk"] * rng.lognormal(0, 1.5, lay["wk"].shape[:2])[..., None]
    lay["w_up"] = lay["w_up"] * rng.lognormal(0, 1, lay["w_up"].shape[:2])[..., None]
    return {**p, "layers": {k: np.asarray(v, np.float32) for k, v in lay.items()}}


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 48)).astype(np.int32)


@pytest.fixture(scope="module")
def ablation(tokens):
    params = skewed_params()
    calib = np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 64)).astype(np.int32)
    stats = key_stats(CFG, params, calib, progress=False)
    return layer_errors(CFG, params, tokens, stats=stats, progress=False)


def test_residual_stream_is_forwards_pass(tokens):
    params = skewed_params()
    t = jnp.asarray(tokens)
    B, T = t.shape
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    kv = DenseKVCache()
    state = kv.init(CFG.num_layers, B, T, CFG.num_kv_heads, CFG.head_dim, jnp.float32)
    meta = DenseKVMeta(pos, jnp.full((B,), T, jnp.int32))
    h, _ = forward(CFG, params, t, pos, kv, state, meta, jnp.float32)
    x0, mids, outs = residual_stream(CFG, params, t, pos, kv, state, meta, jnp.float32)
    assert x0.shape == (B, T, CFG.hidden_size)
    assert mids.shape == outs.shape == (CFG.num_layers, B, T, CFG.hidden_size)
    np.testing.assert_allclose(np.asarray(x0), params["embed"][tokens])
    np.testing.assert_array_equal(
        np.asarray(rms_norm(outs[-1], params["final_norm"], CFG.rms_norm_eps)), np.asarray(h))
    assert not np.allclose(np.asarray(mids[0]), np.asarray(x0))  # attention added something


def test_an_unquantized_precision_measures_no_error(tokens):
    e = layer_errors(CFG, skewed_params(), tokens, {"bf16": PRECISIONS["bf16"]}, progress=False)
    assert e.stream.shape == e.keys.shape == (1, CFG.num_layers)
    assert e.stream.max() < 1e-5 and e.keys.max() < 1e-5
    assert max(v.max() for v in e.linears.values()) < 1e-5
    assert e.calibration_tokens == 0 and e.tokens == tokens.size


def test_each_fireq_step_is_measured_per_layer(ablation):
    e = ablation
    assert e.steps == tuple(fireq_ablation()) and e.steps[-1] == "fireq"
    assert e.stream.shape == (5, CFG.num_layers) and set(e.linears) == set(LINEAR_NAMES)
    for a in (e.stream, e.keys, *e.linears.values()):
        assert np.all(np.isfinite(a)) and np.all(a > 0)  # W4A8KV4 always rounds something
        assert np.all(a < 1.0)
    # no key scaling in the first three steps: the same keys, the same key error (up to
    # the float32 rounding of the folded weights, which moves later layers' inputs a little)
    np.testing.assert_allclose(e.keys[1:3], np.broadcast_to(e.keys[0], (2, CFG.num_layers)),
                               rtol=1e-3)
    assert e.keys[1, 0] == e.keys[0, 0]  # layer 0 sees the embeddings themselves
    # the RoPE scalings flatten the outlier key channels: less error in the logits
    assert e.keys[3].mean() < e.keys[0].mean() and e.keys[4].mean() < e.keys[0].mean()
    # channel-wise smoothing moves the up projection's outliers into the down projection
    assert e.linears["w_up"][1].mean() < e.linears["w_up"][0].mean()
    # the stream error grows along the layers it passes (each adds its own rounding)
    assert np.all(e.stream[:, -1] > e.stream[:, 0] * 0.5)


def test_summary_table_repr_and_plot(ablation, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from fineserve_jax.plots import plot_layer_errors

    e = ablation
    rows = e.summary()
    assert [r["step"] for r in rows] == list(e.steps)
    assert rows[0]["stream_last"] == pytest.approx(e.stream[0, -1])
    assert rows[2]["w_down_mean"] == pytest.approx(e.linears["w_down"][2].mean())
    np.testing.assert_allclose(e.series("linears"),
                               np.mean([e.linears[n] for n in LINEAR_NAMES], axis=0))
    assert "5 steps x 3 layers" in repr(e) and "'fireq':" in repr(e)
    assert all(s in e.table() for s in e.steps)
    assert e.to_dict()["stream"] == e.stream.tolist()
    with pytest.raises(ValueError, match="unknown kind"):
        e.series("w_sideways")
    for kind in ("stream", "keys", "linears", "w_down"):
        ax = plot_layer_errors(e, kind)
        assert len(ax.get_lines()) == 5 and ax.get_yscale() == "log"
        ax.figure.savefig(tmp_path / f"{kind}.png")
        assert (tmp_path / f"{kind}.png").stat().st_size > 5_000
        matplotlib.pyplot.close(ax.figure)


def test_bad_inputs_are_refused(tokens):
    params = skewed_params()
    with pytest.raises(ValueError, match=r"i32\[B, T\]"):
        layer_errors(CFG, params, tokens[0], progress=False)
    with pytest.raises(ValueError, match="key statistics"):
        layer_errors(CFG, params, tokens, progress=False)  # the RoPE steps, no stats
    with pytest.raises(ValueError, match="no precisions"):
        layer_errors(CFG, params, tokens, {}, progress=False)
