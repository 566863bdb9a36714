"""Whole models in each precision: memory, quantized checkpoints, two precisions in one pool."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from fineserve_jax.precisions import PRECISIONS, Precision, get_precision
from fineserve_jax.quant import Fp8Weight, Int4Weight

CALIB = "512"  # calibration tokens for the tests (the recipes' default is 20,480)


def test_memory_command_meets_the_bars(capsys):
    from fineserve_jax.bench.__main__ import main

    assert main(["memory"]) == 0
    text = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in text.splitlines()[2:] if line.strip()
            and line.split()[0] in PRECISIONS}
    assert set(rows) == set(PRECISIONS)
    from fineserve_jax.bench.memory import figures, model_config

    figs = {r["precision"]: r for r in figures(model_config("smollm2-135m"))}
    assert figs["fireq"]["linear_weight_vs_bf16"] <= 0.3  # INT4 weights with their scales
    assert figs["fireq"]["kv_vs_bf16"] <= 0.3  # INT4 KV with its scales
    assert figs["fp8"]["linear_weight_vs_bf16"] == pytest.approx(0.5, abs=0.01)
    assert figs["bf16"]["kv_bytes_per_token"] == 30 * 3 * 64 * 2 * 2


def test_recipes_round_trip_through_metadata():
    for p in PRECISIONS.values():
        assert Precision.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(ValueError, match="unknown precision"):
        get_precision("int3")
    with pytest.raises(ValueError, match="asymmetric"):
        PRECISIONS["fireq"].weights.__class__("int4", 32, symmetric=False, scale_dtype="fp8")


@pytest.fixture(scope="module")
def fireq_checkpoint(tmp_path_factory):
    """SmolLM2 converted to fireq (float32 unquantized tensors) by the CLI."""
    from checkpoints.convert import main

    out = tmp_path_factory.mktemp("ckpt") / "smollm2-fireq"
    assert main(["smollm2-135m", "--precision", "fireq", "--dtype", "float32",
                 "--calib-tokens", CALIB, "--out", str(out), "--quiet"]) == 0
    return out


def _leaves(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def test_quantized_checkpoint_round_trips_bit_for_bit(fireq_checkpoint, capsys):
    from checkpoints import load_model, orbax_io, quantize_loaded
    from checkpoints.orbax_io import read_metadata
    from pallas_kernels.w4a8 import LAYOUT, W4A8Weight

    meta = read_metadata(fireq_checkpoint)
    rec = Precision.from_dict(meta["precision_recipe"])
    assert meta["precision"] == "fireq" and rec.smoothing.calib_tokens == int(CALIB)
    assert rec.weights == PRECISIONS["fireq"].weights and rec.kv_format == "int4"
    assert meta["quantization"]["calibration_tokens"] == int(CALIB)
    assert meta["weight_layout"] == {"name": LAYOUT, "tile_k": 128, "tile_n": 128}
    stored = orbax_io.load(fireq_checkpoint)[0]["layers"]  # as the GPU kernel reads them
    assert isinstance(stored["w_gate_up"], W4A8Weight) and "w_gate" not in stored
    restored = load_model(fireq_checkpoint, "float32", progress=False).params
    again = quantize_loaded(load_model("smollm2-135m", "float32", progress=False), rec,
                            "float32", progress=False).params
    assert isinstance(restored["layers"]["wq"], Int4Weight)
    assert restored["layers"]["wq"].group == 128 and restored["layers"]["wq"].act == "fp8"
    a, b = _leaves(restored), _leaves(again)
    assert [k for k, _ in a] == [k for k, _ in b]
    for (path, x), (_, y) in zip(a, b):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)  # bit for bit


def test_an_unknown_weight_layout_is_refused_by_name(fireq_checkpoint, tmp_path):
    import shutil

    from checkpoints import load_model
    from checkpoints.errors import CheckpointError

    bad = tmp_path / "ck"
    shutil.copytree(fireq_checkpoint, bad)
    files = [f for f in (bad / "metadata").rglob("*") if f.is_file()
             and "w4a8-split-halves-v1" in f.read_text(errors="ignore")]
    assert files, "the metadata names the layout"
    for f in files:
        f.write_text(f.read_text().replace("w4a8-split-halves-v1", "w4a8-interleaved-v9"))
    with pytest.raises(CheckpointError, match="'w4a8-interleaved-v9' is not known"):
        load_model(bad, "float32", progress=False)


def test_converted_checkpoint_serves_without_requantizing(fireq_checkpoint, monkeypatch):
    import fineserve_jax.quant.model as qm
    from fineserve_jax import LLM
    from fineserve_jax.sampling import SamplingParams

    def forbidden(*a, **k):
        raise AssertionError("a quantized checkpoint must not be quantized again")

    monkeypatch.setattr(qm, "quantize_model", forbidden)
    llm = LLM(str(fireq_checkpoint), dtype="float32", progress=False)
    assert llm.precision == "fireq" and llm.engine.model_info("model")["kv_format"] == "int4"
    out = llm.generate(["The capital of France is"],
                       SamplingParams(max_tokens=8, temperature=0))[0]
    assert "Paris" in out.text  # (the fireq model then ends its answer)
    with pytest.raises(ValueError, match="holds 'fireq' weights"):
        LLM(str(fireq_checkpoint), precision="fp8", progress=False)


def test_bf16_and_fireq_tenants_share_one_pool(fireq_checkpoint, smollm2_f32):
    from checkpoints import load_model
    from fineserve_jax.engine import Engine, EngineConfig
    from fineserve_jax.sampling import SamplingParams

    fq = load_model(fireq_checkpoint, "float32", progress=False)
    e = Engine(EngineConfig(kv_budget_bytes=64 * 2**20, max_model_len=256, warmup=False))
    e.add_model("plain", smollm2_f32.config, smollm2_f32.engine.weights("model"),
                smollm2_f32.tokenizer, dtype="float32")
    e.add_model("fireq", fq.config, fq.params, fq.tokenizer, dtype="float32",
                precision=Precision.from_dict(fq.metadata["precision_recipe"]))
    e.start(thread=False)
    assert e.alloc.fmt("fireq").block_bytes < 0.3 * e.alloc.fmt("plain").block_bytes
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = ["The capital of France is", "Water boils at"]
    hs = [e.submit(m, p, sp) for p in prompts for m in ("plain", "fireq")]
    peak = {"plain": 0, "fireq": 0}
    while e.step():
        for m, rows in e.stats().pool.rows_by_owner.items():
            peak[m] = max(peak[m], rows)
    assert peak["plain"] > 0 and peak["fireq"] > 0  # both held slabs of the one pool
    together = [h.result().token_ids for h in hs]
    alone = []
    for p in prompts:
        for m in ("plain", "fireq"):
            h = e.submit(m, p, sp)
            e.run_until_idle()
            alone.append(h.result().token_ids)
    # The float32 tenant is batch-invariant token for token. The fireq tenant rounds its
    # activations and queries to FP8: a last-bit difference between batch shapes (page-table
    # widths, decode buckets) can flip one rounding and, later, a near-tie, so only its first
    # token is compared; its answer must still be right.
    assert together[0::2] == alone[0::2]
    assert [t[0] for t in together[1::2]] == [t[0] for t in alone[1::2]]
    assert "Paris" in fq.tokenizer.decode(together[1])
    assert together[0] != together[1] or together[2] != together[3]  # two different models
    with pytest.raises(ValueError, match="needs quantized"):
        e2 = Engine(EngineConfig(warmup=False))
        e2.add_model("x", smollm2_f32.config, smollm2_f32.engine.weights("model"),
                     smollm2_f32.tokenizer, precision="fireq")


def test_fp8_weight_type_in_a_model():
    from fineserve_jax.config import ModelConfig
    from fineserve_jax.model import init_params
    from fineserve_jax.quant.model import quantize_linears

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64)
    params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0)))
    q = quantize_linears(params, PRECISIONS["fp8"])
    assert isinstance(q["layers"]["w_down"], Fp8Weight)
    assert q["layers"]["w_down"].shape == params["layers"]["w_down"].shape
    assert q["embed"] is params["embed"]  # embeddings and norms are never quantized
