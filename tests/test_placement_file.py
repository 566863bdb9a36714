"""The placement file (``Placement`` JSON, read by ``serve.py --placement``) and the
``python -m schedulers.place`` command that writes it."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import serve
from placement_cases import GB, demand, device, plan
from schedulers import place as place_cli
from schedulers.placement import Placement, place_slab_greedy
from schedulers.roofline import DeviceSpec


# ----------------------------------------------------------- placement file
def test_json_round_trip_and_serve_reads_it(tmp_path):
    demands = [demand("a", 10), demand("b", 120), demand("c", 10)]
    plans = {"a": plan(), "b": plan(tp=2), "c": plan()}
    pl = place_slab_greedy(demands, plans, [device()] * 3)
    assert Placement.from_json(pl.to_json()) == pl
    raw = json.loads(pl.to_json())  # b (largest) first on two devices, then a and c
    assert raw["devices"][0]["devices"] == [0, 1] and raw["devices"][0]["tp"] == 2
    assert raw["devices"][1]["device"] == 2 and "tp" not in raw["devices"][1]
    path = tmp_path / "placement.json"
    path.write_text(pl.to_json())
    got = serve.read_placement(str(path), ["a", "b", "c"], 1)
    assert got == [{"devices": [0, 1], "models": ["b"],
                    "kv_budget_bytes": pl.groups[0].kv_budget_bytes},
                   {"device": 2, "models": ["a", "c"],
                    "kv_budget_bytes": pl.groups[1].kv_budget_bytes}]
    assert pl.groups[0].kv_budget_bytes == math.floor(90 * GB - 60 * GB)


def test_serve_rejects_bad_groups(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"devices": [{"devices": [0, 1], "tp": 4, "models": ["a"]}]}))
    with pytest.raises(SystemExit, match="tp must equal"):
        serve.read_placement(str(p), ["a"], 1)
    p.write_text(json.dumps({"devices": [{"device": 1, "models": ["a"]},
                                         {"devices": [1, 2], "models": ["b"]}]}))
    with pytest.raises(SystemExit, match=r"two groups.*\[1\]"):
        serve.read_placement(str(p), ["a", "b"], 1)
    p.write_text(json.dumps({"devices": [{"device": 0, "models": ["a"]},
                                         {"device": 1, "models": ["a"]}]}))
    with pytest.raises(SystemExit, match=r"placed more than once: \['a'\]"):
        serve.read_placement(str(p), ["a"], 1)


# ---------------------------------------------------------------------- CLI
def test_cli_places_the_example(tmp_path, capsys):
    out = tmp_path / "placement.json"
    rc = place_cli.main([str(ROOT / "examples" / "placement_models.toml"), "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    pl = Placement.from_json(out.read_text())
    assert pl.algorithm == "slab-greedy" and not pl.unplaced
    names = [m["name"] for m in place_cli.read_list(
        str(ROOT / "examples" / "placement_models.toml"))["models"]]
    serve.read_placement(str(out), names, 1)  # exactly what serve.py executes
    # The 70B BF16 model (141 GB) needs tensor parallelism on 80 GB devices.
    (g,) = pl.replicas("llama3-70b-bf16")
    assert g.tp >= 2
    assert "slab-greedy" in text and "llama3-70b-bf16" in text


def test_cli_balance_compute_from_the_flag_or_the_file(tmp_path, capsys):
    example = str(ROOT / "examples" / "placement_models.toml")
    out = tmp_path / "placement.json"
    data = place_cli.read_list(example)
    names = [m["name"] for m in data["models"]]
    plain_file = tmp_path / "plain.json"
    plain_file.write_text(json.dumps({**data, "balance_compute": False}))
    balanced_file = tmp_path / "balanced.json"
    balanced_file.write_text(json.dumps({**data, "balance_compute": True}))

    def placed(*argv):  # on six devices the two rules place the 8B models differently
        assert place_cli.main([*argv, "--devices", "6", "--out", str(out)]) == 0
        rule = "alone" if "--no-balance-compute" in argv or (
            str(plain_file) in argv and "--balance-compute" not in argv) else "weighted"
        assert f"algorithm slab-greedy (free KV blocks {rule}" in capsys.readouterr().out
        pl = Placement.from_json(out.read_text())
        assert not pl.unplaced
        serve.read_placement(str(out), names, 1)
        return pl

    # the flag overrides the file; the default is the balanced rule
    balanced = placed(example)
    assert balanced == placed(str(balanced_file)) == placed(str(plain_file), "--balance-compute")
    plain = placed(str(plain_file))
    assert plain == placed(example, "--no-balance-compute") == placed(
        str(balanced_file), "--no-balance-compute")
    assert plain.groups != balanced.groups
    bad = tmp_path / "m.json"
    bad.write_text(json.dumps({**data, "balance_compute": "yes"}))
    capsys.readouterr()
    assert place_cli.main([str(bad), "--out", str(out)]) == 2
    assert "balance_compute must be true or false" in capsys.readouterr().err


def test_cli_overcommits_unless_told_not_to(tmp_path, capsys):
    # Two 8B models at 30 req/s each need more than one H100's compute headroom (0.76 +
    # 0.43 at these lengths) but fit its memory together: served past the headroom by
    # default (exit 0, the file names b), reported unplaced with --no-overcommit (exit 1).
    model = {"shape": "llama3-8b", "rate": 30, "prompt_tokens": 512, "output_tokens": 256,
             "ttft_slo_ms": 1000, "tpot_slo_ms": 50}
    spec = tmp_path / "m.json"
    spec.write_text(json.dumps({"models": [{**model, "name": "a", "precision": "bf16"},
                                           {**model, "name": "b", "precision": "fp8"}]}))
    out = tmp_path / "placement.json"
    assert place_cli.main([str(spec), "--devices", "1", "--out", str(out)]) == 0
    assert "overcommitted b:" in capsys.readouterr().out
    pl = Placement.from_json(out.read_text())
    assert pl.groups[0].models == ("a", "b") and pl.overcommitted == ("b",)
    assert pl.groups[0].utilisation > 0.9 and not pl.unplaced
    serve.read_placement(str(out), ["a", "b"], 1)
    assert place_cli.main([str(spec), "--devices", "1", "--no-overcommit",
                           "--out", str(out)]) == 1
    assert "unplaced b (replica 0)" in capsys.readouterr().out
    assert Placement.from_json(out.read_text()).overcommitted == ()


def test_cli_errors_name_the_model_and_key(tmp_path, capsys):
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"models": [{"name": "x", "shape": "llama3-8b", "precision": "bf16",
                                         "rate": 1, "prompt_tokens": 10, "output_tokens": 10,
                                         "ttft_slo_ms": 100, "tpot_slo_ms": 10,
                                         "colour": "red"}]}))
    assert place_cli.main([str(p), "--out", str(tmp_path / "o.json")]) == 2
    assert "model 'x': unknown keys ['colour']" in capsys.readouterr().err
    p.write_text(json.dumps({"models": [{"name": "y", "shape": "llama9", "precision": "bf16",
                                         "rate": 1, "prompt_tokens": 10, "output_tokens": 10,
                                         "ttft_slo_ms": 100, "tpot_slo_ms": 10}]}))
    assert place_cli.main([str(p), "--out", str(tmp_path / "o.json")]) == 2
    assert "unknown shape 'llama9'" in capsys.readouterr().err


def test_cli_weight_size_overrides_the_shape(tmp_path):
    m = {"name": "w", "shape": "llama3-8b", "precision": "bf16", "rate": 1, "prompt_tokens": 10,
         "output_tokens": 10, "ttft_slo_ms": 1000, "tpot_slo_ms": 100, "weight_bytes": 7e9}
    d = place_cli.build_demand(m, DeviceSpec.h100_sxm(), 16)
    assert d.weight_bytes == 7e9 and d.kv_bytes_per_token == 32 * 2 * 8 * 128 * 2
    assert d.cost(2).tp == 2 and d.cost(2).decode_time([10]) < d.cost(1).decode_time([10])


def test_cli_with_a_profiled_cost_model(tmp_path, capsys):
    from schedulers.costmodel import CostModel, ProfiledCost

    # decode: 10 ms + 1 ms per row; prefill: 20 ms + 0.1 ms per token (any context)
    points = [{"kind": "decode", "rows": r, "tokens": 1, "context": c, "seconds": 0.01 + 0.001 * r}
              for r in (1, 64) for c in (16, 2048)]
    points += [{"kind": "prefill", "rows": 1, "tokens": t, "context": c,
                "seconds": 0.02 + 1e-4 * t} for t in (16, 2048) for c in (16, 2048)]
    cm = CostModel()
    cm.add("small-bf16", "bf16", "cpu", ProfiledCost(points, block_tokens=16))
    cm.save(tmp_path / "costs.json")
    models = {"models": [{"name": "small", "profile": "small-bf16", "precision": "bf16",
                          "rate": 2.0, "prompt_tokens": 100, "output_tokens": 100,
                          "ttft_slo_ms": 500, "tpot_slo_ms": 30, "weight_bytes": 3e8,
                          "kv_bytes_per_token": 1e4}]}
    (tmp_path / "m.json").write_text(json.dumps(models))
    out = tmp_path / "p.json"
    rc = place_cli.main([str(tmp_path / "m.json"), "--device-kind", "cpu",
                         "--device-memory-gib", "1", "--devices", "2",
                         "--cost-model", str(tmp_path / "costs.json"), "--out", str(out)])
    assert rc == 0, capsys.readouterr()
    (g,) = Placement.from_json(out.read_text()).groups
    # TPOT 30 ms: 10 + b ms -> batch 20; 2 req/s x (0.03 s + 100 x 0.03 / 20) < 0.9: one GPU
    assert (g.devices, g.tp, g.models) == ((0,), 1, ("small",))
    assert g.kv_budget_bytes == math.floor(0.9 * 2**30 - 3e8)
    # the profile is missing for another precision: an error naming the key
    models["models"][0]["precision"] = "fp8"
    (tmp_path / "m.json").write_text(json.dumps(models))
    assert place_cli.main([str(tmp_path / "m.json"), "--device-kind", "cpu",
                           "--device-memory-gib", "1", "--cost-model",
                           str(tmp_path / "costs.json"), "--out", str(out)]) == 2
    assert "no cost for model 'small-bf16' at precision 'fp8'" in capsys.readouterr().err
