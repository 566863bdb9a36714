"""Cluster simulator: exact hand-computed schedules, drops, routing, memory, determinism."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from fineserve_jax.kvslab import BlockFormat
from schedulers.batching import SLO, BatchLimits
from schedulers.simulator import GroupSpec, ModelSpec, simulate
from schedulers.workload import Request, WorkloadSpec

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


def test_admission_headroom_counts_the_other_models_decodes_on_a_shared_pool():
    # A pool of 8 blocks, no reserves; FCFS. A (model a, 64-token prompt in 4 blocks, 4
    # output tokens) is prefilled 0 -> 1; B (model b, 64 tokens, 2 output tokens) arrives
    # at 0.5. At t=1 A's next decode needs a fifth block. Device-wide headroom: B's 4
    # blocks + 1 for A's decode > 4 free, so B waits; A decodes 1 -> 2.5 (done), B is
    # prefilled 2.5 -> 3.5 and decodes 3.5 -> 4. Own headroom only (the ablation): B is
    # admitted at t=1 (4 <= 4 free, prefill 1 -> 2), A's decode at t=2 finds no block and
    # A is preempted; B decodes 2 -> 2.5, A is prefilled again 2.5 -> 3.5 with its first
    # token, and decodes 3.5 -> 4.5.
    specs = {m: ModelSpec(m, BLOCK, LIMITS, NO_SLO) for m in "ab"}
    trace = [Request(0.0, "a", 64, 4), Request(0.5, "b", 64, 2)]
    costs = {(m, "g0"): ConstCost() for m in "ab"}
    got = {}
    for own in (False, True):
        group = GroupSpec("g0", ("a", "b"), 8 * BLOCK.block_bytes, allocator="kvslab",
                          reserve_blocks={"a": 0, "b": 0}, own_headroom=own)
        res = simulate([group], specs, costs, trace, scheduler="fcfs")
        got[own] = ([r.preemptions for r in res.records], times(res))
    assert got[False] == ([0, 0], [(1.0, 2.5, "finished"), (3.5, 4.0, "finished")])
    assert got[True] == ([1, 0], [(1.0, 4.5, "finished"), (2.0, 2.5, "finished")])
