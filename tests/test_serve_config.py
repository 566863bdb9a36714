"""serve.py's options: model specs, config files, placement files; engines on a chosen device."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import serve


def test_model_spec_keys_and_errors():
    m = serve.parse_model_spec("a=smollm2-135m,precision=fireq-g32,ttft-slo=250,"
                               "tpot-slo=40,calib-tokens=2048,dtype=float32")
    assert m == {"name": "a", "source": "smollm2-135m", "precision": "fireq-g32",
                 "dtype": "float32", "ttft_slo_ms": 250.0, "tpot_slo_ms": 40.0,
                 "calib_tokens": 2048}
    for bad, msg in [("a", "NAME=SOURCE"), ("a=x,colour=red", "unknown option"),
                     ("a=x,calib-tokens=lots", "not valid"), ("a=x,dtype=int8", "dtype")]:
        with pytest.raises(argparse.ArgumentTypeError, match=msg):
            serve.parse_model_spec(bad)


def test_default_is_bf16_and_fireq_g32_sharing_one_pool():
    args = serve.parse_args([])
    assert [(m["name"], m["precision"]) for m in args.models] == [
        ("smollm2-135m-bf16", "bf16"), ("smollm2-135m-fireq-g32", "fireq-g32")]
    assert args.host == "127.0.0.1" and args.port == 8000 and args.placement is None


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_config_file_sets_models_and_options_and_flags_win(tmp_path, suffix):
    models = [{"name": "x", "source": "smollm2-135m", "precision": "fp8", "ttft_slo_ms": 300}]
    p = tmp_path / f"cfg{suffix}"
    if suffix == ".json":
        p.write_text(json.dumps({"port": 9001, "kv_budget": 1 << 26, "models": models}))
    else:
        p.write_text('port = 9001\nkv_budget = 67108864\n[[models]]\nname = "x"\n'
                     'source = "smollm2-135m"\nprecision = "fp8"\nttft_slo_ms = 300\n')
    args = serve.parse_args(["--config", str(p), "--port", "9002"])
    assert args.port == 9002 and args.kv_budget == 1 << 26  # the flag wins, the file fills
    (m,) = args.models
    assert (m["name"], m["precision"], m["ttft_slo_ms"]) == ("x", "fp8", 300.0)


def test_scheduler_options_and_model_slos(tmp_path):
    from fineserve_jax.engine import EngineConfig
    from schedulers.batching import SLO
    from schedulers.costmodel import CostModel, ProfiledCost
    args = serve.parse_args([])
    assert (args.scheduler, args.on_slo_miss, args.cost_model) == ("fineserve", "reject", None)
    args = serve.parse_args(["--scheduler", "prism", "--on-slo-miss", "best-effort"])
    assert (args.scheduler, args.on_slo_miss) == ("prism", "best-effort")
    with pytest.raises(SystemExit):
        serve.parse_args(["--scheduler", "edf"])
    # The online cost correction: on by default, its weight reaches the engine's config.
    assert serve.engine_fields(args, 1 << 20)["cost_calibration"] == 0.05
    off = serve.parse_args(["--cost-calibration", "0"])
    assert EngineConfig(**serve.engine_fields(off, 1 << 20)).cost_calibration == 0
    with pytest.raises(ValueError, match="cost_calibration"):
        EngineConfig(**serve.engine_fields(serve.parse_args(["--cost-calibration", "2"]), 1))
    assert serve.model_slo(serve.parse_model_spec("a=x")) is None
    assert serve.model_slo(serve.parse_model_spec("a=x,ttft-slo=250")) == SLO(ttft_s=0.25)
    assert serve.model_slo(serve.parse_model_spec("a=x,tpot-slo=40,ttft-slo=500")) == SLO(
        0.5, 0.04)
    cm = CostModel()
    pts = [{"kind": k, "rows": 1, "tokens": t, "context": 16, "seconds": 0.1}
           for k, t in (("decode", 1), ("prefill", 16))]
    cm.add("a", "bf16", "cpu", ProfiledCost(pts))

    class Dev:
        device_kind = "cpu"
    assert serve.stored_cost(cm, "a", "bf16", Dev()) is cm.get("a", "bf16", "cpu")
    assert serve.stored_cost(cm, "b", "bf16", Dev()) is None  # profiled at start instead
    assert serve.stored_cost(None, "a", "bf16", Dev()) is None


def test_config_file_errors_name_what_is_wrong(tmp_path, capsys):
    p = tmp_path / "c.json"
    p.write_text('{"prot": 1}')
    with pytest.raises(SystemExit):
        serve.parse_args(["--config", str(p)])
    assert "unknown keys ['prot']" in capsys.readouterr().err
    p.write_text('{"models": [{"name": "a", "source": "s", "colour": 1}]}')
    with pytest.raises(SystemExit):
        serve.parse_args(["--config", str(p)])
    assert "unknown model key 'colour'" in capsys.readouterr().err
    p.write_text("{not json")
    with pytest.raises(SystemExit, match="not valid JSON"):
        serve.parse_args(["--config", str(p)])
    with pytest.raises(SystemExit):
        serve.parse_args(["--model", "a=x", "--model", "a=y"])
    assert "duplicate model names" in capsys.readouterr().err


def test_placement_file_checked(tmp_path):
    p = tmp_path / "place.json"
    p.write_text(json.dumps({"devices": [{"device": 0, "models": ["a"]},
                                         {"device": 1, "models": ["b"],
                                          "kv_budget_bytes": 1024}]}))
    got = serve.read_placement(str(p), ["a", "b"], 4096)
    assert got == [{"device": 0, "models": ["a"], "kv_budget_bytes": 4096},
                   {"device": 1, "models": ["b"], "kv_budget_bytes": 1024}]
    with pytest.raises(SystemExit, match=r"not placed: \['c'\]"):
        serve.read_placement(str(p), ["a", "b", "c"], 4096)
    p.write_text(json.dumps({"devices": [{"models": ["a"]}]}))
    with pytest.raises(SystemExit, match="KeyError"):
        serve.read_placement(str(p), ["a"], 4096)


ON_DEVICE_1 = textwrap.dedent("""
    import jax, numpy as np
    from fineserve_jax.config import ModelConfig
    from fineserve_jax.engine import Engine, EngineConfig
    from fineserve_jax.model import init_params
    from fineserve_jax.sampling import SamplingParams
    from fineserve_jax.tokenizer import Tokenizer
    from tiny_models import byte_tokenizer_json

    cfg = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=128)
    params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0)))
    tok = Tokenizer.from_json(byte_tokenizer_json(), {"eos_token_ids": [257]})
    dev = jax.devices()[1]
    e = Engine(EngineConfig(kv_budget_bytes=2**20, block_tokens=4, max_seqs=2,
                            max_prefill_seqs=1, prefill_token_budget=16, max_model_len=64,
                            warmup=False), device=dev)
    e.add_model("m", cfg, params, tok, dtype="float32")
    e.start(thread=False)
    h = e.submit("m", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    e.run_until_idle()
    assert len(h.token_ids) == 4
    assert e.pool.devices() == {dev}, e.pool.devices()
    assert all(a.devices() == {dev} for a in jax.tree.leaves(e.weights("m")))
    print("ok", e.device)
""")


def test_engine_runs_on_the_device_it_is_given():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    r = subprocess.run([sys.executable, "-c", ON_DEVICE_1], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["ok", "cpu:1"]


def test_ray_is_optional_and_imported_only_for_a_cluster():
    code = ("import sys; sys.path.insert(0, '.'); import serve, fineserve_jax.server.app, "
            "fineserve_jax.engine, fineserve_jax.raycluster; "
            "a = serve.parse_args(['--ray', 'auto']); print(a.ray, 'ray' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["auto", "False"]
    a = serve.parse_args(["--ray", "auto", "--placement", "p.json", "--rebalance-interval",
                          "30"])  # re-placement across the cluster's workers
    assert (a.ray, a.rebalance_interval) == ("auto", 30)
