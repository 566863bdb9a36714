"""The INT4 x FP8 GEMM kernel (``pallas_kernels.w4a8``) in Pallas interpret mode, its
lowering for CUDA, and its use by ``linear`` and the model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fineserve_jax.linear import linear, linear_residual
from fineserve_jax.quant import Int4Weight, quantize_int4, reference_linear
from pallas_kernels import w4a8
from pallas_kernels.w4a8 import (BlockConfig, W4A8Weight, exact_case, fuse_gate_up,
                                 kernel_layout, quantize_activations, w4a8_matmul,
                                 w4a8_reference)
from tests.tiny_models import rel_err_rows

FORMATS = {"fireq": dict(group=128, symmetric=True, scale_dtype="fp8"),
           "fireq-g32": dict(group=32, symmetric=False, scale_dtype="f16")}


def as_np(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.float32))


def random_weight(rng, n, k, fmt) -> Int4Weight:
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    w[:, rng.integers(0, k, 3)] *= 8  # a few outlier input channels
    return quantize_int4(jnp.asarray(w), act="fp8", **FORMATS[fmt])


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("m", [1, 17])
def test_exact_inputs_give_the_reference_bit_for_bit(fmt, m):
    sym = FORMATS[fmt]["symmetric"]
    xq, xs, w = exact_case(np.random.default_rng(m), m, 256, 384, FORMATS[fmt]["group"], sym)
    got = w4a8_matmul(xq, xs, w, interpret=True, config=BlockConfig(16, 128))
    want = w4a8_reference(xq, xs, w)
    assert np.count_nonzero(as_np(want)) > want.size // 2
    np.testing.assert_array_equal(as_np(got), as_np(want))


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("m", [1, 3, 17, 128])
def test_random_inputs_match_the_int4_reference(fmt, m):
    # K = 384 and N = 640: multiples of 128, not powers of two.
    rng = np.random.default_rng(100 + m)
    wi = random_weight(rng, 640, 384, fmt)
    x = jnp.asarray(rng.standard_normal((m, 384)), jnp.bfloat16)
    want = as_np(reference_linear(x, wi))  # FP8 activations, dequantized weight, f32 dot
    q, s = quantize_activations(x)
    got = as_np(w4a8_matmul(q, s, W4A8Weight.from_int4(wi), interpret=True))
    err = rel_err_rows(got, want)
    assert err.max() < 1e-2, err.max()  # BF16 output rounding; FP8 tolerance is 2**-4
    # and the kernel equals its own f32 reference up to summation order:
    ref = as_np(w4a8_reference(q, s, W4A8Weight.from_int4(wi)))
    assert rel_err_rows(got, ref).max() < 8e-3


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_gated_and_residual_epilogues(fmt):
    rng = np.random.default_rng(7)
    k, f, m = 384, 192, 5
    g, u = (W4A8Weight.from_int4(random_weight(rng, f, k, fmt)) for _ in range(2))
    gu = fuse_gate_up(g, u, tile_n=128)
    assert gu.gated and gu.out_features == f and gu.shape == (2 * f, k)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    q, s = quantize_activations(x)
    yg, yu = (as_np(w4a8_reference(q, s, w, out_dtype=jnp.float32)) for w in (g, u))
    want = yg / (1 + np.exp(-yg)) * yu
    got = as_np(w4a8_matmul(q, s, gu, interpret=True))
    assert rel_err_rows(got, want).max() < 8e-3
    # Residual: added in float32 before the one rounding to BF16.
    wd = W4A8Weight.from_int4(random_weight(rng, 256, k, fmt))
    r = jnp.asarray(rng.standard_normal((m, 256)) * 4, jnp.bfloat16)
    want = as_np(w4a8_reference(q, s, wd, out_dtype=jnp.float32)) + as_np(r)
    got = as_np(w4a8_matmul(q, s, wd, r, interpret=True))
    assert rel_err_rows(got, want).max() < 8e-3
    with pytest.raises(ValueError, match="block_n = tile_n"):
        w4a8_matmul(q, s, gu, config=BlockConfig(16, 64), interpret=True)


def test_layout_round_trips_and_rejects_bad_input():
    rng = np.random.default_rng(3)
    for fmt in FORMATS:
        wi = random_weight(rng, 128, 576, fmt)  # SmolLM2's K: padded to 640
        wk = W4A8Weight.from_int4(wi)
        assert wk.packed.shape == (128, 320) and wk.k == 576
        np.testing.assert_array_equal(as_np(wk.dequantize()), as_np(wi.dequantize()))
    with pytest.raises(ValueError, match="FP8 activations"):
        W4A8Weight.from_int4(quantize_int4(jnp.ones((8, 128)), act=None))
    xq, xs, w = exact_case(rng, 4, 128, 256)
    with pytest.raises(ValueError, match="K = 128"):
        w4a8_matmul(xq[:, :128], xs, w, interpret=True)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        w4a8_matmul(xq.astype(jnp.bfloat16), xs, w, interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        BlockConfig(block_m=24)


def _struct(a):
    return None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype)


@pytest.mark.parametrize("case", ["fireq", "fireq-g32+residual", "fireq-gated"])
def test_kernel_lowers_for_cuda(case):
    """The whole Triton lowering runs on CPU (compiling needs a GPU)."""
    fmt = case.split("+")[0].replace("-gated", "")
    xq, xs, w = exact_case(np.random.default_rng(0), 17, 256, 384, FORMATS[fmt]["group"],
                           FORMATS[fmt]["symmetric"])
    if case.endswith("gated"):
        w = fuse_gate_up(w, w)
    r = jnp.zeros((17, w.out_features), jnp.bfloat16) if "residual" in case else None
    f = jax.jit(lambda xq, xs, w, r: w4a8_matmul(xq, xs, w, r))
    low = f.trace(_struct(xq), _struct(xs), jax.tree.map(_struct, w), _struct(r)).lower(
        lowering_platforms=("cuda",))
    assert "w4a8_matmul" in low.as_text()


def test_linear_dispatch_and_model_layout(smollm2_f32, monkeypatch):
    """``kernel_layout`` on the real model: linear weights reordered, gate and up fused;
    one layer's logits through the kernel (interpret mode) match the Int4Weight path."""
    import dataclasses

    from fineserve_jax.precisions import PRECISIONS
    from fineserve_jax.quant.model import quantize_linears
    from fineserve_jax.runner import DenseRunner, backend_weights

    llm = smollm2_f32
    cfg = dataclasses.replace(llm.config, num_layers=1)
    params = jax.tree.map(lambda a: a, llm.runner.params)
    params = {**params, "layers": jax.tree.map(lambda a: a[:1], params["layers"])}
    served = quantize_linears(params, PRECISIONS["fireq"])
    fused = backend_weights(served, jnp.float32, backend="gpu")
    lay = fused["layers"]
    assert "w_gate" not in lay and isinstance(lay["w_gate_up"], W4A8Weight)
    assert lay["w_gate_up"].gated and all(isinstance(lay[n], W4A8Weight)
                                          for n in ("wq", "wk", "wv", "wo", "w_down"))
    assert kernel_layout(fused)["layers"].keys() == lay.keys()  # idempotent
    toks = np.array([[504, 3575, 282, 4649, 314, 7042, 30, 198]])
    want = np.asarray(DenseRunner(cfg, served, "float32").logits(toks))[0]
    ref = np.asarray(DenseRunner(cfg, fused, "float32").logits(toks))[0]  # XLA reference
    monkeypatch.setattr(w4a8, "KERNEL_MODE", "interpret")
    calls = []
    kernel = w4a8.w4a8_matmul
    monkeypatch.setattr(w4a8, "w4a8_matmul", lambda *a, **k: calls.append(k) or kernel(*a, **k))
    got = np.asarray(DenseRunner(cfg, fused, "float32").logits(toks))[0]
    assert len(calls) == 6 and all(k["interpret"] for k in calls)  # q k v o gate_up down
    assert rel_err_rows(ref, want).max() < 2e-3
    assert rel_err_rows(got, want).max() < 2e-3
    # linear / linear_residual on a bare kernel weight, leading axes kept
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 576)), jnp.float32)
    wk = lay["wo"] if lay["wo"].packed.ndim == 2 else jax.tree.map(lambda a: a[0], lay["wo"])
    y = linear(x, wk)
    assert y.shape == (2, 3, 576)
    np.testing.assert_allclose(as_np(linear_residual(x, wk, x)), as_np(x + y), rtol=1e-5,
                               atol=1e-5)


def test_bench_kernels_quick_record(tmp_path):
    """The GPU benchmark's plumbing, in interpret mode: every row timed and checked."""
    import json

    from fineserve_jax.bench.__main__ import main

    out = tmp_path / "k.json"
    assert main(["kernels", "--quick", "--m", "3", "--impls", "xla-bf16", "w4a8-fireq-g32",
                 "--out", str(out)]) == 0
    assert w4a8.KERNEL_MODE is None  # restored
    rec = json.loads(out.read_text())
    rows = rec["results"]
    assert {r["impl"] for r in rows} == {"xla-bf16", "w4a8-fireq-g32"}
    assert len(rows) == 2 * 4  # four linear shapes
    for r in rows:
        assert r["seconds"] > 0 and r["flops"] == 2 * r["m"] * r["n"] * r["k"]
        if r["impl"] == "w4a8-fireq-g32":
            assert r["max_row_rel_err"] < 1e-2 and r["speedup_vs_bf16"] > 0
    assert [f["m"] for f in rec["ffn"]] == [3] and rec["e2e"] is None
    with pytest.raises(SystemExit, match="GPU"):
        main(["kernels", "--out", str(out)])


def test_tuned_table_is_used_for_its_device(tmp_path, monkeypatch):
    import json

    xq, xs, w = exact_case(np.random.default_rng(2), 5, 256, 384)
    kind = jax.devices()[0].device_kind
    key = w4a8.tuning_key(5, 256, 384, "fireq", False)
    assert key == "fireq:256x384:m16"
    path = tmp_path / "t.json"
    path.write_text(json.dumps({kind: {key: {"block_m": 32, "block_n": 64, "num_warps": 8,
                                             "num_stages": 2, "seconds": 1e-5}},
                                "other-gpu": {}}))
    monkeypatch.setattr(w4a8, "TUNED_PATH", path)
    w4a8.read_tuned.cache_clear()
    try:
        assert w4a8.pick_config(5, w) == BlockConfig(32, 64, 8, 2)
        assert w4a8.pick_config(100, w) == w4a8.default_config(100, 256)  # no entry
    finally:
        w4a8.read_tuned.cache_clear()
