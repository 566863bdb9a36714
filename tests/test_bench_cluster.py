"""``python -m fineserve_jax.bench cluster``: its records, systems, placements per system,
workload options, and the goodput and knee definitions."""

from __future__ import annotations

from dataclasses import replace

import pytest

from schedulers.workload import LengthDist, WorkloadSpec


def test_bench_cluster_quick_record(tmp_path):
    import json

    from fineserve_jax.bench.__main__ import main

    out = tmp_path / "cluster.json"
    assert main(["cluster", "--quick", "--out", str(out)]) == 0  # the plot follows --out
    rec = json.loads(out.read_text())
    systems = list(rec["config"]["systems"])
    assert set(systems) == {"fineserve", "static", "dedicated", "fixed-page", "prism"}
    rows = rec["results"]
    assert len(rows) == len(systems) * len(rec["config"]["rates"])
    for r in rows:
        assert 0 <= r["slo_attainment"] <= 1 and r["output_tok_s"] >= 0
        assert r["slo_met"] <= r["finished"] <= r["requests"]
        assert sum(r[k] for k in ("finished", "dropped", "failed", "unplaced",
                                  "unfinished")) == r["requests"]
        assert r["slo_attainment"] == pytest.approx(r["slo_met"] / r["requests"])
    by_rate = {}
    for r in rows:  # every system replays the same trace at a rate
        by_rate.setdefault(r["rate"], set()).add(r["requests"])
    assert all(len(v) == 1 for v in by_rate.values())
    for s, g in rec["goodput"].items():
        assert 0 <= g["99"]["rate"] <= g["90"]["rate"] <= max(rec["config"]["rates"])
    for s in systems:
        f = rec["fewest_gpus"][s]
        assert f["gpus"] is None or (f["gpus"] in rec["config"]["gpu_grid"]
                                     and f["tried"][str(f["gpus"])] >= 0.99)
    assert (tmp_path / "cluster.png").stat().st_size > 0


def test_bench_cluster_more_seeds_are_the_runs_of_those_seeds(tmp_path):
    import json

    from fineserve_jax.bench.__main__ import main

    common = ["cluster", "--quick", "--systems", "fineserve", "static", "--plot", ""]
    assert main([*common, "--more-seeds", "3", "--out", str(tmp_path / "a.json")]) == 0
    assert main([*common, "--seed", "3", "--out", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert "--more-seeds 3" in a["command"] and "seeds" not in b
    sd = a["seeds"]
    assert sd["seeds"] == [0, 3]
    main_rows = {(r["system"], r["rate"]): r["slo_attainment"] for r in a["results"]}
    seed3 = {(r["system"], r["rate"]): r["slo_attainment"] for r in b["results"]}
    assert len(sd["points"]) == len(main_rows) == 4
    for p in sd["points"]:
        key = (p["system"], p["rate"])
        assert p["slo_attainment"] == [main_rows[key], seed3[key]]
        assert p["mean"] == pytest.approx((main_rows[key] + seed3[key]) / 2)
    assert sd["by_seed"]["3"]["goodput"] == b["goodput"]
    assert sd["by_seed"]["0"]["goodput"] == a["goodput"]


def test_bench_cluster_ablations_take_one_part_of_fineserve_each(tmp_path):
    import json

    from fineserve_jax.bench.__main__ import main

    out = tmp_path / "ablation.json"
    systems = ["static", "kvslab+fcfs", "static+fineserve", "fineserve",
               "fineserve+best-effort"]
    assert main(["cluster", "--quick", "--systems", *systems, "--out", str(out), "--plot", ""]) == 0
    rec = json.loads(out.read_text())
    parts = rec["config"]["systems"]
    assert parts["kvslab+fcfs"] == {"placement": "slab-greedy", "allocator": "kvslab",
                                    "scheduler": "fcfs", "on_miss": "reject",
                                    "partitions": "planned",
                                    "placements": ["slab-greedy", "slab-greedy+overcommit"]}
    assert parts["static+fineserve"] == {"placement": "slab-greedy", "allocator": "static",
                                         "scheduler": "fineserve", "on_miss": "reject",
                                         "partitions": "planned",
                                         "placements": ["slab-greedy+overcommit"]}
    assert parts["fineserve+best-effort"] == {**parts["fineserve"], "on_miss": "best-effort"}
    assert sorted({r["system"] for r in rec["results"]}) == sorted(systems)
    res = {(r["system"], r["rate"]): r for r in rec["results"]}
    for rate in rec["config"]["rates"]:  # best-effort sheds nothing
        assert res["fineserve+best-effort", rate]["dropped"] == 0
        assert res["fineserve+best-effort", rate]["requests"] == res["fineserve", rate]["requests"]
    assert not (tmp_path / "ablation.png").exists()  # --plot '' draws nothing


def test_bench_cluster_static_partitions_planned_or_equal():
    """``static`` sizes each model's partition by its planned KV need, ``static-equal``
    gives every model on a device the same share; both hold at least one longest
    sequence per model, and both run the same placement and FCFS."""
    from fineserve_jax.bench.cluster import (
        SYSTEMS,
        Lengths,
        groups_of,
        kv_need,
        placements,
        setup_models,
    )
    from schedulers.placement import PlacementConfig

    config, lengths = PlacementConfig(), Lengths()
    models = setup_models(5.0, config)
    plans, pl = placements(models, WorkloadSpec(list(models), 60.0, 30.0, 1.0).mean_rates(),
                           10, config, lengths)
    p = pl[SYSTEMS["static"].placement_key]
    planned = groups_of(p, SYSTEMS["static"], plans, models, lengths)
    equal = groups_of(p, SYSTEMS["static-equal"], plans, models, lengths)
    assert SYSTEMS["static-equal"].placement_keys == SYSTEMS["static"].placement_keys
    assert [(g.models, g.kv_budget_bytes) for g in planned] == [
        (g.models, g.kv_budget_bytes) for g in equal]
    shared = [(a, b) for a, b in zip(planned, equal) if len(a.models) > 1]
    assert shared  # some device holds several models at this rate
    for a, b in shared:
        floor = {m: lengths.longest * models[m].kv_bytes_per_token for m in a.models}
        even = b.kv_budget_bytes / len(b.models)
        for g, weight in ((a, {m: kv_need(plans[m], models[m], lengths) for m in a.models}),
                          (b, {m: even for m in b.models})):
            need = {m: max(weight[m], floor[m]) for m in g.models}
            for m in g.models:
                assert g.partitions[m] == pytest.approx(need[m] / sum(need.values()))
    assert any(a.partitions != b.partitions for a, b in shared)
    # where no floor binds, equal shares are exactly equal
    assert any(len(set(round(v, 12) for v in b.partitions.values())) == 1 for _, b in shared)


def test_bench_cluster_overcommits_only_under_a_scheduler_that_sheds():
    """At 260 req/s ten GPUs cannot hold every model within the compute headroom: the
    SLO-aware systems' placement serves the one left over past it, the FCFS systems'
    first placement leaves it unplaced (they would serve its group late), and
    ``--no-overcommit`` gives everyone that one."""
    from fineserve_jax.bench.cluster import SYSTEMS, Lengths, placements, setup_models
    from schedulers.placement import PlacementConfig

    config = PlacementConfig()
    models = setup_models(5.0, config)
    rates = WorkloadSpec(list(models), 260.0, 30.0, 1.0).mean_rates()
    _, pl = placements(models, rates, 10, config, Lengths())
    ours, fcfs = (pl[SYSTEMS[s].placement_key] for s in ("fineserve", "static"))
    assert ours.overcommitted and not fcfs.overcommitted
    assert pl[SYSTEMS["static+fineserve"].placement_key] is ours
    assert pl[SYSTEMS["kvslab+fcfs"].placement_key] is fcfs
    assert not pl[SYSTEMS["prism"].placement_key].overcommitted
    for m in ours.overcommitted:  # left with no replica by the FCFS systems' placement
        assert not fcfs.replicas(m) and len(ours.replicas(m)) == 1
        assert any(u.model == m and u.replica == 0 for u in fcfs.unplaced)
    _, off = placements(models, rates, 10, replace(config, overcommit=False), Lengths())
    assert off[SYSTEMS["fineserve"].placement_key] == fcfs
    assert SYSTEMS["static"].placement_keys == ("slab-greedy", "slab-greedy+overcommit")
    assert pl["slab-greedy+overcommit"] is ours
    assert SYSTEMS["fineserve"].placement_keys == ("slab-greedy+overcommit",)


def test_bench_cluster_fcfs_systems_keep_the_placement_that_serves_them_better():
    """Where the placements with and without overcommitting differ, an FCFS system runs on
    both and keeps the better. At loose SLOs (25x solo latency) serving the model left
    over late beats leaving it unplaced, whose requests all miss; a shedding system and
    a placement pair that does not differ run once."""
    from fineserve_jax.bench.cluster import (
        Lengths,
        placements,
        run_point,
        run_system,
        setup_models,
    )
    from schedulers.placement import PlacementConfig

    # Llama-2 shapes, long outputs, 12 req/s on 6 GPUs: the planned load leaves models
    # with no replica unless overcommitted.
    config = PlacementConfig()
    lengths = Lengths(LengthDist(512, 0.8, 4, 4096), LengthDist(1024, 0.6, 4, 4096))
    models = setup_models(25.0, config, lengths, 12, "llama2")
    spec = WorkloadSpec(list(models), 12.0, 5.0, 1.0, 1.0, lengths.prompt, lengths.output, 0)
    trace = spec.generate()
    plans, pl = placements(models, spec.mean_rates(), 6, config, lengths)
    assert pl["slab-greedy"] != pl["slab-greedy+overcommit"]
    row = run_system("static", models, plans, pl, trace, 25.0, lengths)
    tried = row["placements_tried"]
    assert set(tried) == {"slab-greedy", "slab-greedy+overcommit"}
    assert row["placement"] == "slab-greedy+overcommit"
    assert tried["slab-greedy+overcommit"]["slo_attainment"] > tried["slab-greedy"]["slo_attainment"]
    assert tried["slab-greedy"]["unplaced"] > 0 == row["unplaced"]
    plain = run_point("static", models, plans, pl["slab-greedy"], trace, 25.0, lengths)
    assert plain["slo_attainment"] == tried["slab-greedy"]["slo_attainment"]
    assert row["slo_attainment"] == tried["slab-greedy+overcommit"]["slo_attainment"]
    shed = run_system("fineserve", models, plans, pl, trace, 25.0, lengths)
    assert shed["placement"] == "slab-greedy+overcommit" and "placements_tried" not in shed
    # The same placement twice is run once.
    same = {**pl, "slab-greedy": pl["slab-greedy+overcommit"]}
    once = run_system("static", models, plans, same, trace, 25.0, lengths)
    assert "placements_tried" not in once and once["placement"] == "slab-greedy"
    assert once["slo_attainment"] == row["slo_attainment"]


def test_goodput_and_knee_definitions():
    from fineserve_jax.bench.cluster_report import goodput, knee

    pts = [(10, 1.0), (20, 0.95), (30, 0.5)]
    assert goodput(pts, 0.90) == {"rate": pytest.approx(20 + 0.05 / 0.45 * 10), "saturated": True}
    assert goodput(pts, 0.99) == {"rate": pytest.approx(12.0), "saturated": True}
    assert goodput([(10, 0.95), (20, 1.0)], 0.9) == {"rate": 20, "saturated": False}
    assert goodput([(10, 0.5), (20, 1.0)], 0.9)["rate"] == 0.0  # must hold at every lower rate
    assert knee([(10, 1.0), (20, 0.95), (30, 0.85), (40, 0.2)]) == 30
    assert knee([(10, 0.8), (20, 0.85), (30, 0.8)]) is None


def test_bench_cluster_lengths_and_model_count_reach_the_workload(tmp_path):
    import json

    from fineserve_jax.bench.__main__ import main
    from fineserve_jax.bench.cluster import MODELS, model_list

    names = [m[0] for m in model_list(15)]
    assert names[:12] == [m[0] for m in MODELS] and len(set(names)) == 15
    assert [m[1:] for m in model_list(15)[12:]] == [("8b", "bf16"), ("8b", "fp8"), ("8b", "fireq")]
    out = tmp_path / "c.json"
    assert main(["cluster", "--quick", "--models", "14", "--prompt-mean", "700",
                 "--prompt-max", "3000", "--output-mean", "40", "--output-max", "64",
                 "--systems", "fineserve", "static", "--out", str(out), "--plot", ""]) == 0
    rec = json.loads(out.read_text())
    assert len(rec["models"]) == 14
    assert rec["config"]["prompt"]["mean"] == 700 and rec["config"]["prompt"]["hi"] == 3000
    assert rec["config"]["output"]["hi"] == 64
    assert "--models 14" in rec["command"] and "--prompt-mean 700" in rec["command"]
    # SLOs follow the longest prompt the workload draws: a 3,000-token solo prefill.
    from fineserve_jax.bench.cluster import setup_models
    from schedulers.placement import PlacementConfig

    short = setup_models(5.0, PlacementConfig())["chat-8b-bf16"]
    m = rec["models"]["chat-8b-bf16"]
    assert m["solo_ttft_s"] > 2 * short.solo_ttft_s  # 3,000 vs 1,024 prompt tokens
    assert m["slo"]["ttft_s"] == pytest.approx(5 * m["solo_ttft_s"])
    with pytest.raises(SystemExit, match="bad length options"):
        main(["cluster", "--quick", "--output-mean", "0", "--out", str(out), "--plot", ""])


def test_bench_cluster_llama2_family_swaps_the_shapes_and_quadruples_kv_per_token():
    """``--family llama2``: the same twelve roles on Llama-2-7B / 13B shapes, whose
    attention keeps a KV head per query head (32 vs Llama-3-8B's 8): 4x the KV bytes per
    token at the same precision."""
    from fineserve_jax.bench.cluster import model_list, setup_models
    from schedulers.placement import PlacementConfig

    l2 = model_list(14, "llama2")
    assert l2[0] == ("chat-7b-bf16", "7b", "bf16") and l2[2] == ("chat-13b-fireq", "13b", "fireq")
    assert l2[13] == ("tenant14-7b-fp8", "7b", "fp8")
    assert {m[1] for m in l2} == {"7b", "13b"}
    with pytest.raises(ValueError, match="unknown family"):
        model_list(3, "gpt")
    m3 = setup_models(5.0, PlacementConfig())
    m2 = setup_models(5.0, PlacementConfig(), family="llama2")
    assert m2["chat-7b-bf16"].kv_bytes_per_token == 4 * m3["chat-8b-bf16"].kv_bytes_per_token
    assert m2["chat-7b-fireq"].kv_bytes_per_token == 4 * m3["chat-8b-fireq"].kv_bytes_per_token
    assert m2["chat-13b-bf16"].solo_tp == 1 and m3["chat-70b-bf16"].solo_tp > 1


def test_bench_cluster_drift_plans_from_average_rates(tmp_path):
    """``--shift-s``: the trace drifts and the plans follow each model's average rate over
    the run. With 4 s of arrivals in 1 s phases the top model keeps the top rate for one
    phase only (its average falls), and the fourth model rises to the top in the last."""
    import json

    from fineserve_jax.bench.__main__ import main
    from schedulers.workload import WorkloadSpec

    plans = {}
    for shift in (None, 1):
        out = tmp_path / f"d{shift}.json"
        opt = [] if shift is None else ["--shift-s", str(shift)]
        assert main(["cluster", "--quick", *opt, "--systems", "fineserve", "static",
                     "--out", str(out), "--plot", ""]) == 0
        rec = json.loads(out.read_text())
        assert rec["config"]["shift_s"] == shift
        assert ("--shift-s 1" in rec["command"]) == (shift is not None)
        plans[shift] = next(r["plans"] for r in rec["results"] if r["rate"] == 20.0)
    names = list(rec["models"])
    spec = WorkloadSpec(names, 20.0, 4.0, shift_s=1.0)
    avg, first = spec.mean_rates(), spec.rates()
    assert avg[names[0]] < first[names[0]] and avg[names[3]] > first[names[3]]
    c = {k: {m: v[m]["concurrency"] for m in (names[0], names[3])} for k, v in plans.items()}
    assert c[1][names[0]] < c[None][names[0]] and c[1][names[3]] > c[None][names[3]], c
    with pytest.raises(SystemExit, match="shift-s"):
        main(["cluster", "--quick", "--shift-s", "-1", "--out", str(out), "--plot", ""])
