"""Cluster simulator: exact hand-computed schedules, drops, routing, memory, determinism."""

from __future__ import annotations

from dataclasses import asdict, replace

import pytest

from fineserve_jax.kvslab import BlockFormat
from schedulers.batching import SLO, BatchLimits
from schedulers.simulator import GroupSpec, ModelSpec, simulate
from schedulers.workload import LengthDist, Request, WorkloadSpec

BLOCK = BlockFormat(2, 2, 16, 16, 2, 0, "bf16")  # 2 KiB per 16-token block
LIMITS = BatchLimits(max_seqs=8, max_prefill_seqs=4, prefill_token_budget=256)
MIB = 1 << 20


class ConstCost:
    """Every prefill step takes ``prefill`` s and every decode step ``decode`` s."""

    def __init__(self, prefill: float = 1.0, decode: float = 0.5):
        self.prefill, self.decode = prefill, decode

    def prefill_time(self, chunks, contexts) -> float:
        return self.prefill

    def decode_time(self, contexts) -> float:
        return self.decode


class TokenCost:
    """Prefill costs ``per_token`` s per fed token; decode a constant."""

    def __init__(self, per_token: float = 0.01, decode: float = 0.05):
        self.per_token, self.decode = per_token, decode

    def prefill_time(self, chunks, contexts) -> float:
        return self.per_token * sum(chunks)

    def decode_time(self, contexts) -> float:
        return self.decode


NO_SLO = SLO()


def one_device(models=("m",), slo=NO_SLO, pool=64 * MIB, allocator="kvslab", limits=LIMITS):
    specs = {m: ModelSpec(m, BLOCK, limits, slo) for m in models}
    return [GroupSpec("g0", tuple(models), pool, allocator=allocator)], specs


def times(res):
    return [(r.first_token, r.finished, r.status) for r in res.records]


def test_hand_computed_schedule_one_model():
    # FCFS alternates prefill and decode while both have work. By hand:
    #   t=0   prefill A (100 tok)              -> 1.0  A's first token
    #   t=1   decode A                          -> 1.5  A: 2 tokens
    #   t=1.5 prefill B (50 tok; arrived 0.2)   -> 2.5  B's first token
    #   t=2.5 decode A, B                       -> 3.0  A: 3 tokens (done), B: 2 (done)
    #   t=3   prefill C, first 256 of 300 tok   -> 4.0  (C arrived 2.2)
    #   t=4   prefill C, last 44 tok            -> 5.0  C's first and only token (done)
    groups, models = one_device(slo=SLO(ttft_s=2.5, tpot_s=1.0))
    trace = [Request(0.0, "m", 100, 3), Request(0.2, "m", 50, 2), Request(2.2, "m", 300, 1)]
    res = simulate(groups, models, {("m", "g0"): ConstCost()}, trace, scheduler="fcfs")
    assert times(res) == [(1.0, 3.0, "finished"), (2.5, 3.0, "finished"),
                          (5.0, 5.0, "finished")]
    assert [r.generated for r in res.records] == [3, 2, 1]
    # A: TTFT 1.0, TPOT 1.0; B: TTFT 2.3, TPOT 0.5; C: TTFT 2.8 > 2.5.
    assert [r.slo_met for r in res.records] == [True, True, False]
    m = res.metrics()
    assert m["slo_attainment"] == pytest.approx(2 / 3)
    assert res.end_s == 5.0 and m["output_tokens"] == 6
    assert m["output_tok_s"] == pytest.approx(6 / 5.0)
    assert m["ttft_s"]["p50"] == pytest.approx(2.3)
    assert res.groups["g0"].steps == 6 and res.groups["g0"].busy_s == pytest.approx(5.0)


def test_hand_computed_schedule_two_models_share_a_device():
    # Models take turns (least recently stepped first, then by name):
    #   t=0 prefill a -> 1.0; t=1 prefill b -> 2.0; t=2 decode a -> 2.5 (a done);
    #   t=2.5 decode b -> 3.0 (b done). The idle gap until c arrives at 4.0 is skipped:
    #   t=4 prefill c (model a) -> 5.0, its only token.
    groups, models = one_device(models=("a", "b"))
    costs = {("a", "g0"): ConstCost(), ("b", "g0"): ConstCost()}
    trace = [Request(0.0, "b", 10, 2), Request(0.0, "a", 10, 2), Request(4.0, "a", 10, 1)]
    res = simulate(groups, models, costs, trace, scheduler="fcfs")
    by = {(r.model, r.arrival): (r.first_token, r.finished) for r in res.records}
    assert by == {("a", 0.0): (1.0, 2.5), ("b", 0.0): (2.0, 3.0), ("a", 4.0): (5.0, 5.0)}
    assert res.metrics()["slo_attainment"] == 1.0  # no SLO set: every finished one meets it


def test_fineserve_sheds_a_hopeless_burst_fcfs_serves_it_late():
    # Prefill costs 0.01 s a token. A burst of 10 prompts of 80 tokens at t=0 (0.8 s each
    # alone) against a 1 s TTFT: only the first can make it. Then short prompts arrive.
    groups, models = one_device(slo=SLO(ttft_s=1.0, tpot_s=0.5))
    trace = ([Request(0.0, "m", 80, 4) for _ in range(10)]
             + [Request(2.0 + 0.5 * i, "m", 30, 4) for i in range(6)])
    costs = {("m", "g0"): TokenCost()}
    fcfs = simulate(groups, models, costs, trace, scheduler="fcfs").metrics()
    ours = simulate(groups, models, costs, trace, scheduler="fineserve").metrics()
    assert fcfs["dropped"] == 0 and fcfs["finished"] == 16
    assert ours["dropped"] >= 8 and ours["dropped"] + ours["finished"] == 16
    assert ours["slo_attainment"] > fcfs["slo_attainment"]
    # Every late arrival meets its SLO once the hopeless burst is shed.
    assert ours["slo_met"] >= 7
    # Dropped requests count in the denominator, as misses.
    assert ours["slo_attainment"] == pytest.approx(ours["slo_met"] / 16)
    # Best-effort serves the burst after the others instead: the same requests meet their
    # SLOs (each late one still in time: the burst's steps are cut to half the TTFT
    # target), and the rest finish late instead of being dropped.
    late = simulate(groups, models, costs, trace, scheduler="fineserve", on_miss="best-effort")
    m = late.metrics()
    assert m["dropped"] == 0 and m["finished"] == 16 and m["slo_met"] == ours["slo_met"]
    assert all(r.slo_met for r in late.records if r.arrival >= 2.0)


def test_routing_to_least_outstanding_replica_and_unplaced_models():
    models = {"m": ModelSpec("m", BLOCK, LIMITS), "x": ModelSpec("x", BLOCK, LIMITS)}
    groups = [GroupSpec("g0", ("m",), 64 * MIB, devices=(0,)),
              GroupSpec("g1", ("m", "x"), 64 * MIB, devices=(1,))]
    costs = lambda m, g: ConstCost()
    trace = [Request(0.0, "m", 100, 10),  # tie: first group
             Request(0.0, "m", 50, 10),  # g0 has 110 tokens to feed, g1 none
             Request(0.0, "m", 20, 10),  # g0 110 vs g1 60
             Request(0.0, "m", 20, 10),  # g0 110 vs g1 90
             Request(0.0, "nobody", 20, 10)]
    res = simulate(groups, models, costs, trace, scheduler="fcfs")
    assert [r.group for r in res.records] == ["g0", "g1", "g1", "g1", None]
    assert res.records[-1].status == "unplaced"
    m = res.metrics()
    assert m["unplaced"] == 1 and m["slo_attainment"] == pytest.approx(4 / 5)
    assert m["per_model"]["nobody"]["slo_attainment"] == 0.0


def test_preemption_under_a_small_pool_still_finishes_everything():
    # 64 blocks of 16 tokens; eight sequences growing to ~300 tokens each need ~150.
    pool = 64 * BLOCK.block_bytes
    limits = BatchLimits(max_seqs=8, max_prefill_seqs=8, prefill_token_budget=128)
    groups, models = one_device(pool=pool, limits=limits)
    groups = [GroupSpec("g0", ("m",), pool, reserve_blocks={"m": 0})]
    trace = [Request(0.01 * i, "m", 40, 260) for i in range(8)]
    res = simulate(groups, models, {("m", "g0"): TokenCost()}, trace, scheduler="fcfs")
    m = res.metrics()
    assert m["finished"] == 8 and m["preemptions"] > 0
    assert all(r.generated == 260 for r in res.records)


def test_a_request_that_can_never_fit_fails_on_arrival():
    pool = 64 * BLOCK.block_bytes  # 1024 tokens
    groups = [GroupSpec("g0", ("m",), pool, reserve_blocks={"m": 0})]
    models = {"m": ModelSpec("m", BLOCK, LIMITS)}
    trace = [Request(0.0, "m", 900, 200), Request(0.5, "m", 100, 2)]
    res = simulate(groups, models, {("m", "g0"): ConstCost()}, trace, scheduler="fcfs")
    assert [r.status for r in res.records] == ["failed", "finished"]
    assert res.records[0].finished == 0.0 and res.records[1].first_token == 1.5


def test_horizon_leaves_requests_unfinished():
    groups, models = one_device()
    trace = [Request(0.0, "m", 10, 100)]
    res = simulate(groups, models, {("m", "g0"): ConstCost()}, trace, scheduler="fcfs",
                   horizon_s=3.0)
    r = res.records[0]
    assert r.status == "unfinished" and 1 < r.generated < 100 and not r.slo_met
    assert res.metrics()["unfinished"] == 1


@pytest.mark.parametrize("allocator", ["kvslab", "static", "fixed-page"])
def test_deterministic(allocator):
    names = ("a", "b", "c")
    spec = WorkloadSpec(names, total_rate=6.0, duration_s=20.0, seed=5)
    trace = spec.generate()
    slo = SLO(ttft_s=2.0, tpot_s=0.2)
    models = {m: ModelSpec(m, BLOCK, LIMITS, slo) for m in names}
    groups = [GroupSpec("g0", ("a", "b"), 4 * MIB, allocator=allocator),
              GroupSpec("g1", ("a", "c"), 4 * MIB, devices=(1,), allocator=allocator)]
    costs = lambda m, g: TokenCost(per_token=2e-4, decode=0.02)
    runs = [simulate(groups, models, costs, trace, scheduler="fineserve") for _ in range(2)]
    assert [asdict(r) for r in runs[0].records] == [asdict(r) for r in runs[1].records]
    m = runs[0].metrics()
    assert m["requests"] == len(trace) and 0 <= m["slo_attainment"] <= 1
    assert sum(m[s] for s in ("finished", "dropped", "failed", "unplaced", "unfinished")) \
        == len(trace)
    assert {r.group for r in runs[0].records if r.model == "a"} == {"g0", "g1"}


def test_bad_inputs_name_what_is_wrong():
    groups, models = one_device()
    with pytest.raises(ValueError, match="has no ModelSpec"):
        simulate([GroupSpec("g0", ("zz",), MIB)], models, {}, [])
    with pytest.raises(KeyError, match="no step cost for model 'm' on group 'g0'"):
        simulate(groups, models, {}, [])
    with pytest.raises(ValueError, match="unique"):
        simulate(groups * 2, models, {("m", "g0"): ConstCost()}, [])
    with pytest.raises(ValueError, match="2 devices for tp 1"):
        GroupSpec("g", ("m",), MIB, devices=(0, 1))


def test_fineserve_prefill_is_not_starved_by_several_models_decoding():
    # Three models decode on one device: 2 ms a step against an 8 ms TPOT, so each one's
    # decode is due 8 - 2 = 6 ms after its last token, and the three take 6 ms in
    # turn if each decodes only when due, and a 3 ms prefill would never end before the
    # next due decode. But a decode that runs early banks slack against its pace: with
    # no prompt waiting the decodes run back to back and get ahead of their pace, so
    # when the prompt arrives it waits at most for the step in flight and one decode
    # per model (2 + 3 * 2 ms), then its 3 ms prefill.
    slo = SLO(ttft_s=0.05, tpot_s=0.008)
    groups, models = one_device(models=("a", "b", "c"), slo=slo)
    costs = lambda m, g: ConstCost(prefill=0.003, decode=0.002)
    trace = [Request(0.0, m, 10, 200) for m in ("a", "b", "c")] + [Request(0.1, "a", 10, 2)]
    res = simulate(groups, models, costs, trace, scheduler="fineserve")
    late = res.records[-1]
    assert late.status == "finished" and late.ttft <= 0.011 + 1e-9
    assert all(r.slo_met for r in res.records)


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
                                    "placements": ["slab-greedy", "slab-greedy+overcommit"]}
    assert parts["static+fineserve"] == {"placement": "slab-greedy", "allocator": "static",
                                         "scheduler": "fineserve", "on_miss": "reject",
                                         "placements": ["slab-greedy+overcommit"]}
    assert parts["fineserve+best-effort"] == {**parts["fineserve"], "on_miss": "best-effort"}
    assert sorted({r["system"] for r in rec["results"]}) == sorted(systems)
    res = {(r["system"], r["rate"]): r for r in rec["results"]}
    for rate in rec["config"]["rates"]:  # best-effort sheds nothing
        assert res["fineserve+best-effort", rate]["dropped"] == 0
        assert res["fineserve+best-effort", rate]["requests"] == res["fineserve", rate]["requests"]
    assert not (tmp_path / "ablation.png").exists()  # --plot '' draws nothing


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


class Scripted:
    """A replacer that returns ``moves`` at its first check, then nothing."""

    def __init__(self, moves, interval_s=1.0, load_s=0.5):
        self.moves, self.interval_s, self._load = list(moves), interval_s, load_s
        self.seen, self.checks, self.outcomes = [], [], []

    def observe(self, model, t):
        self.seen.append((model, t))

    def check(self, now):
        self.checks.append(now)
        out, self.moves = self.moves, []
        return out

    def schedule(self, moves):
        from schedulers.rebalance import MoveSchedule

        return MoveSchedule(moves)

    def load_s(self, model, group):
        return self._load

    def done(self, move, outcome, now):
        self.outcomes.append((move.model, outcome, now))


def two_devices(pool1=64 * MIB):
    specs = {m: ModelSpec(m, BLOCK, LIMITS) for m in "abc"}
    return [GroupSpec("g0", ("a", "b"), 64 * MIB, devices=(0,)),
            GroupSpec("g1", ("c",), pool1, devices=(1,))], specs


def test_hand_computed_move_loads_switches_the_route_and_drains_the_source():
    from schedulers.rebalance import Move
    # By hand (FCFS, prefill 1 s, decode 0.5 s):
    #   g0: t=0 prefill A (a, arrived 0)          -> 1.0  A's first token
    #       t=1 decode A                          -> 1.5  A: 2 tokens
    #   t=1 the check moves a to g1: it loads until 1.5, when the route switches.
    #   B (a, arrives 1.2) still goes to g0:  t=1.5 prefill B -> 2.5  B's first token
    #       t=2.5 decode A, B                     -> 3.0  A done (3), B done (2)
    #   g0 holds no request of a at 3.0: a is removed there, the move is done.
    #   C (a, arrives 1.7) goes to g1: t=1.7 prefill C -> 2.7, decode -> 3.2 (done)
    #   The next check would be at 3.0 + 1.0, after the last arrival: none.
    groups, models = two_devices()
    trace = [Request(0.0, "a", 100, 3), Request(1.2, "a", 50, 2), Request(1.7, "a", 50, 2)]
    r = Scripted([Move("a", (0,), (1,))])
    res = simulate(groups, models, lambda m, g: ConstCost(), trace, scheduler="fcfs",
                   replacer=r)
    assert times(res) == [(1.0, 3.0, "finished"), (2.5, 3.0, "finished"),
                          (2.7, 3.2, "finished")]
    assert [rec.group for rec in res.records] == ["g0", "g0", "g1"]
    assert r.checks == [1.0] and r.seen == [("a", 0.0), ("a", 1.2), ("a", 1.7)]
    assert r.outcomes == [("a", "moved", 3.0)]
    (mv,) = res.moves
    assert (mv.model, mv.src, mv.dst, mv.started, mv.ready, mv.drained, mv.outcome) == (
        "a", "g0", "g1", 1.0, 1.5, 3.0, "moved")
    assert res.metrics()["moves"][0]["drained"] == 3.0


def test_moves_into_a_device_nothing_leaves_run_at_once():
    from schedulers.rebalance import Move
    # Nothing leaves g1, so a and b load there together from the check at 1.0; each
    # switches its route 0.5 s later and drains g0 when its last request there is done.
    groups, models = two_devices()
    trace = [Request(0.0, "a", 100, 3), Request(0.0, "b", 100, 3), Request(1.7, "b", 50, 2)]
    r = Scripted([Move("a", (0,), (1,)), Move("b", (0,), (1,))])
    res = simulate(groups, models, lambda m, g: ConstCost(), trace, scheduler="fcfs",
                   replacer=r)
    assert [(m.model, m.started, m.ready, m.outcome) for m in res.moves] == [
        ("a", 1.0, 1.5, "moved"), ("b", 1.0, 1.5, "moved")]
    assert [rec.group for rec in res.records] == ["g0", "g0", "g1"]
    assert all(rec.status == "finished" for rec in res.records)
    assert r.checks == [1.0]


def test_a_move_the_destination_cannot_take_is_skipped_and_serving_goes_on():
    from schedulers.rebalance import Move
    # g1's pool holds c's reserve and no room for a's: the move is refused at once.
    reserve_bytes = (4 + BLOCK.blocks_for(256)) * BLOCK.block_bytes  # the engine's reserve
    groups, models = two_devices(pool1=reserve_bytes + BLOCK.block_bytes * 8)
    trace = [Request(0.0, "a", 100, 3), Request(1.5, "a", 50, 2)]
    r = Scripted([Move("a", (0,), (1,)), Move("b", (1,), (0,))])
    res = simulate(groups, models, lambda m, g: ConstCost(), trace, scheduler="fcfs",
                   replacer=r)
    assert [rec.status for rec in res.records] == ["finished", "finished"]
    assert [rec.group for rec in res.records] == ["g0", "g0"]
    assert [m.outcome.split(":")[0] for m in res.moves] == [
        "skipped, the destination refused it", "skipped"]
    assert [o[0] for o in r.outcomes] == ["a", "b"] and r.checks == [1.0]
    # moves need KV Slab pools everywhere (a static partition cannot take a new model)
    static = [GroupSpec("g0", ("a", "b"), 64 * MIB, devices=(0,), allocator="static"),
              groups[1]]
    with pytest.raises(ValueError, match="KV Slab pools only; groups 'g0'"):
        simulate(static, models, lambda m, g: ConstCost(), trace, replacer=Scripted([]))


def test_bench_replace_more_seeds_are_the_runs_of_those_seeds(tmp_path):
    import json

    from fineserve_jax.bench.__main__ import main

    common = ["replace", "--quick", "--no-balance-compute", "--systems", "first-rates",
              "replace"]
    assert main([*common, "--more-seeds", "2", "--out", str(tmp_path / "a.json")]) == 0
    assert main([*common, "--seed", "2", "--out", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert "--more-seeds 2" in a["command"] and "seeds" not in b
    sd = a["seeds"]
    assert sd["seeds"] == [0, 2]
    first = {(r["system"], r["rate"]): r for r in a["results"]}
    seed2 = {(r["system"], r["rate"]): r for r in b["results"]}
    assert len(sd["points"]) == len(first) == 4
    for p in sd["points"]:
        key = (p["system"], p["rate"])
        assert p["slo_attainment"] == [first[key]["slo_attainment"],
                                       seed2[key]["slo_attainment"]]
        assert p["moves"] == [len(first[key]["moves"]), len(seed2[key]["moves"])]
        assert p["mean"] == pytest.approx(sum(p["slo_attainment"]) / 2)
    # the two traces differ, so the seeds' figures are not one run counted twice
    assert any(first[k]["requests"] != seed2[k]["requests"] for k in first)


def test_bench_replace_quick_record(tmp_path):
    """``bench replace --quick``: three systems on one drifting trace; the re-placing one
    makes moves that each load, switch and drain, and no request fails for a move."""
    import json

    from fineserve_jax.bench.__main__ import main

    out = tmp_path / "replace.json"
    # Free KV blocks alone (the compute-aware default spreads the quick run's models so
    # that its first placement serves every phase and nothing needs to move).
    assert main(["replace", "--quick", "--no-balance-compute", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["config"]["balance_compute"] is False
    assert rec["benchmark"] == "replace" and rec["config"]["rates"] == [12.0, 48.0]
    rows = {(r["system"], r["rate"]): r for r in rec["results"]}
    assert set(rows) == {(s, r) for s in ("first-rates", "mean-rates", "replace")
                         for r in (12.0, 48.0)}
    for rate in (12.0, 48.0):  # one trace per rate, replayed by every system
        assert len({rows[(s, rate)]["requests"] for s in ("first-rates", "mean-rates",
                                                          "replace")}) == 1
    for (system, _), r in rows.items():
        assert r["failed"] == 0 and r["unplaced"] == 0
        assert len(r["phases"]) == 3 and sum(p["requests"] for p in r["phases"]) == r[
            "requests"]
        if system != "replace":
            assert r["moves"] == []
    # the same first plan; the re-placing system moved something as popularity drifted
    assert rows[("replace", 48.0)]["placement"] == rows[("first-rates", 48.0)]["placement"]
    # at 12 req/s the first placement still fits every phase: nothing moves
    assert rows[("replace", 12.0)]["moves"] == []
    moves = rows[("replace", 48.0)]["moves"]
    # each started move switched its route after loading; one that has not drained by
    # the end of this short run is still running (a hot model drains for seconds)
    switched = [m for m in moves if m["ready"] is not None]
    assert switched, moves
    assert all(m["outcome"] in ("moved", "running") for m in moves), moves
    # the re-plans that made them are in the record, with their moves
    replans = [d for d in rows[("replace", 48.0)]["decisions"] if d["action"] == "replanned"]
    assert len(replans) == rows[("replace", 48.0)]["replans"] >= 1
    assert {m["model"] for m in moves} <= {mv.split(":")[0] for d in replans for mv in d["moves"]}
    for m in switched:
        assert m["started"] < m["ready"] and m["src"] != m["dst"]
        assert m["outcome"] == "running" or m["ready"] <= m["drained"]
