"""Re-placement planning: rate tracking, drift, placements that still fit, re-plans and
the moves that reach them, and the simulator's policy (no engines; those are in
``test_rebalance_serving.py``)."""

from __future__ import annotations

import math

import pytest

from schedulers.placement import ModelDemand, Placement, PlacementConfig, PlacementGroup
from schedulers.rebalance import (
    DriftPolicy,
    FreeSteps,
    Move,
    MoveSchedule,
    RateTracker,
    ServingDevice,
    align,
    apply_move,
    drift,
    drifted,
    overloaded,
    plan_moves,
    replan,
)
from schedulers.roofline import DeviceSpec


# ------------------------------------------------------------------ rates, drift
def test_rate_tracker_counts_a_sliding_window_on_explicit_times():
    tr = RateTracker(window_s=10.0, start=100.0)
    for t in (101.0, 102.0, 103.0, 104.0):
        tr.record("a", t)
    tr.record("b", 104.5)
    # 4 s after start: divided by the 4 s served so far, not the 10 s window
    assert tr.rates(104.0) == {"a": 1.0, "b": 0.0}
    assert tr.rates(105.0) == {"a": 4 / 5, "b": 1 / 5}
    # at 112 the window is (102, 112]: a's arrivals at 101 and 102 have left it
    assert tr.rates(112.0) == {"a": 2 / 10, "b": 1 / 10}
    assert tr.rates(200.0) == {"a": 0.0, "b": 0.0}
    with pytest.raises(ValueError, match="must not go back"):
        tr.record("a", 103.0)
    assert tr.mean_lengths("a") is None
    tr.observe_lengths("a", 10, 4)
    tr.observe_lengths("a", 30, 8)
    assert tr.mean_lengths("a") == (20.0, 6.0)
    with pytest.raises(ValueError, match="window_s"):
        RateTracker(window_s=0)


def test_drift_is_relative_to_the_planned_rate_with_a_noise_floor():
    planned = {"a": 2.0, "b": 1.0}
    assert drift(planned, {"a": 3.0, "b": 1.0}) == {"a": 0.5, "b": 0.0}
    assert not drifted(planned, {"a": 3.0, "b": 1.0}, threshold=0.5)  # exactly 50%: not past
    assert drifted(planned, {"a": 3.2, "b": 1.0}, threshold=0.5)
    assert drifted(planned, {"a": 2.0, "b": 0.4}, threshold=0.5)  # falling counts too
    # a model planned at 0 that gets traffic: infinite drift, unless under the floor
    assert drift({"a": 1.0}, {"a": 1.0, "c": 0.2})["c"] == math.inf
    assert drift({"a": 1.0}, {"a": 1.0, "c": 0.2}, min_rate=0.5) == {"a": 0.0}
    assert drift({"a": 1.0}, {"a": 1.0, "c": 1.0}, min_rate=0.5)["c"] == 2.0  # (1 - 0) / 0.5
    assert not drifted({}, {}, 0.1)
    with pytest.raises(ValueError, match="threshold"):
        drifted(planned, planned, -1)


# ------------------------------------------------------------------------ moves
def _pl(groups: dict[int, list[str]]) -> Placement:
    return Placement("slab-greedy", tuple(PlacementGroup((d,), 1, tuple(ms), 1000)
                                          for d, ms in sorted(groups.items())))


def test_plan_moves_leaves_models_in_place_and_orders_moves_out_first():
    old = _pl({0: ["a", "b"], 1: ["c"], 2: ["d"]})
    assert plan_moves(old, old) == []
    # "a" moves into device 1, which "c" leaves: "c" goes first although "a" sorts first
    new = _pl({0: ["b"], 1: ["a"], 2: ["c", "d"]})
    assert plan_moves(old, new) == [Move("c", (1,), (2,)), Move("a", (0,), (1,))]
    # a swap is a cycle: the first name goes first, the list is the same every time
    swap = _pl({0: ["c", "b"], 1: ["a"], 2: ["d"]})
    assert plan_moves(old, swap) == [Move("a", (0,), (1,)), Move("c", (1,), (0,))]
    # a model only in one of them is not a move
    assert plan_moves(old, _pl({0: ["a", "b"], 1: ["c"], 2: ["e"]})) == []
    with pytest.raises(ValueError, match="one replica"):
        plan_moves(_pl({0: ["a"], 1: ["a"]}), old)
    # applying the moves reaches the new placement
    p = old
    for mv in plan_moves(old, new):
        p = apply_move(p, mv)
    assert {g.devices: set(g.models) for g in p.groups} == {
        g.devices: set(g.models) for g in new.groups}


def _run_waves(plan: MoveSchedule) -> list[list[str]]:
    """Every move that can start starts; then they all end (moved) before the next."""
    waves = []
    while not plan.finished:
        ready = plan.start()
        waves.append([mv.model for mv in ready])
        for mv in ready:
            plan.end(mv, moved=True)
    return waves


def test_move_schedule_starts_a_move_where_its_weights_have_room():
    # devices hold 10 bytes of weights each; every model weighs 4
    old = _pl({0: ["a", "b"], 1: ["c", "d"], 2: ["e"]})
    new = _pl({0: ["a", "c"], 1: ["d", "e"], 2: ["b"]})
    moves = plan_moves(old, new)  # b 0->2, c 1->0, e 2->1, in some order
    w = dict.fromkeys("abcde", 4.0)
    plan = MoveSchedule(moves, old, w, {0: 10.0, 1: 10.0, 2: 10.0})
    # held 8 / 8 / 4 bytes: only device 2 has room for one more model
    first = plan.start()
    assert {mv.model for mv in first} == {"b"}  # 4 + 4 <= 10 on device 2 only
    assert plan.held == {0: 8.0, 1: 8.0, 2: 8.0}
    assert plan.start() == []  # nothing else fits until b's source drains
    plan.end(first[0], moved=True)  # device 0 frees b's 4 bytes
    assert [mv.model for mv in plan.start()] == ["c"]
    # with room for everything, all three run at once
    plan = MoveSchedule(moves, old, w, {0: 12.0, 1: 12.0, 2: 12.0})
    assert _run_waves(plan) == [[mv.model for mv in moves]]
    # a refused move frees what it took on its destination
    plan = MoveSchedule(moves, old, w, {0: 12.0, 1: 12.0, 2: 12.0})
    before = dict(plan.held)
    ready = plan.start()
    dst = ready[0].dst_group[0]
    assert plan.held[dst] == before[dst] + 4.0
    plan.end(ready[0], moved=False)
    assert plan.held[dst] == before[dst] and not plan.finished


def test_a_refused_move_waits_for_the_models_leaving_its_destination():
    """A swap with room for both models' weights runs both moves at once; a destination
    that refuses (its KV pool still held by the model leaving) gets the move again once
    that model has drained, and only once."""
    a_to_1, b_to_0 = Move("a", (0,), (1,)), Move("b", (1,), (0,))
    old = _pl({0: ["a"], 1: ["b"]})
    plan = MoveSchedule([a_to_1, b_to_0], old, {"a": 4.0, "b": 4.0}, {0: 10.0, 1: 10.0})
    assert plan.start() == [a_to_1, b_to_0]
    assert plan.retry(a_to_1)  # b still leaves device 1
    assert plan.held == {0: 8.0, 1: 4.0} and plan.pending == [a_to_1]  # a took nothing there
    assert plan.start() == []  # not while b runs
    plan.end(b_to_0, moved=True)
    assert plan.start() == [a_to_1]
    assert not plan.retry(a_to_1) and plan.finished  # refused again: it ends
    # nothing leaving the destination: a refusal ends the move at once
    plan = MoveSchedule([a_to_1], old, {"a": 4.0, "b": 4.0}, {0: 10.0, 1: 10.0})
    assert plan.start() == [a_to_1]
    assert not plan.retry(a_to_1) and plan.finished and plan.held == {0: 4.0, 1: 4.0}


def test_move_schedule_without_sizes_waits_for_the_moves_out_of_a_destination():
    c_out, a_in, e_in = Move("c", (1,), (2,)), Move("a", (0,), (1,)), Move("e", (3,), (4,))
    plan = MoveSchedule([c_out, a_in, e_in])
    # a waits for c, which leaves a's destination; e is independent of both
    assert plan.start() == [c_out, e_in]
    plan.end(e_in, moved=True)
    assert plan.start() == []  # c still running: its source holds memory until drained
    plan.end(c_out, moved=True)
    assert plan.start() == [a_in]
    plan.end(a_in, moved=True)
    assert plan.finished
    # a swap waits on itself: the first pending move goes alone, the other after it
    a_to_1, c_to_0 = Move("a", (0,), (1,)), Move("c", (1,), (0,))
    assert _run_waves(MoveSchedule([a_to_1, c_to_0])) == [["a"], ["c"]]
    # a move the schedule knows the size of but not the device's room: the same rule
    assert _run_waves(MoveSchedule([c_out, a_in, e_in], weights={"a": 1.0})) == [
        ["c", "e"], ["a"]]
    assert _run_waves(MoveSchedule([])) == []


def test_align_relabels_interchangeable_devices_only():
    old = _pl({0: ["a", "b"], 1: ["c"]})
    flipped = _pl({0: ["c"], 1: ["a", "b"]})  # the same grouping on swapped devices
    assert plan_moves(old, align(old, flipped)) == []
    # devices of different kinds are not interchangeable: the swap stays
    kinds = ["h100", "h200"]
    assert len(plan_moves(old, align(old, flipped, kinds))) == 3
    # keeps the heaviest model's group where it is
    split = _pl({0: ["a"], 1: ["b", "c"]})
    got = align(_pl({0: ["a", "b"], 1: ["c"]}), _pl({0: ["b", "c"], 1: ["a"]}),
                weights={"a": 10.0, "b": 1.0, "c": 1.0})
    assert got == split


def _demand(name, rate, weight=1e9, kv_per_token=1.2e5):
    return ModelDemand(name, "bf16", weight, kv_per_token, rate, 100.0, 100.0, 1.0, 0.1,
                       cost=lambda tp: FreeSteps())


def test_replan_separates_models_whose_traffic_grew():
    devices = [DeviceSpec("cpu", 10e9, 0, 0, 0)] * 2
    cfg = PlacementConfig(reserve_fraction=0.0)
    old = _pl({0: ["a", "b"], 1: ["c"]})
    # with a and b busy, their KV (rate x output x TPOT sequences, up to what a device
    # holds) no longer fits one device beside their weights
    busy = [_demand("a", 400.0), _demand("b", 300.0), _demand("c", 1.0)]
    new = replan(busy, devices, old, cfg)
    assert not new.unplaced
    where = {m: g.devices for g in new.groups for m in g.models}
    assert where["a"] != where["b"]
    assert where["a"] == (0,)  # the heaviest traffic stays put (aligned), b moves
    moves = plan_moves(old, new)
    assert "b" in [mv.model for mv in moves] and "a" not in [mv.model for mv in moves]
    # a model no device can hold is reported unplaced (the rebalancer then keeps the
    # current placement)
    huge = [_demand("a", 1.0, weight=20e9), _demand("b", 1.0), _demand("c", 1.0)]
    assert [u.model for u in replan(huge, devices, old, cfg).unplaced] == ["a"]


def test_drift_policy_replans_past_the_threshold_and_follows_its_moves():
    """The simulator's policy decides as the server's rebalancer: rates over the window,
    drift past the threshold, the same re-plan and moves; a done move updates its
    placement, so the same rates then ask for nothing."""
    devices = [DeviceSpec("cpu", 10e9, 0, 0, 0)] * 2
    cfg = PlacementConfig(reserve_fraction=0.0)
    old = _pl({0: ["a", "b"], 1: ["c"]})
    quiet = {"a": 1.0, "b": 1.0, "c": 1.0}
    pol = DriftPolicy(old, devices, _demand, quiet, lambda m, g: 2.5, interval_s=5.0,
                      threshold=0.5, window_s=1.0, config=cfg)
    assert pol.interval_s == 5.0 and pol.load_s("a", None) == 2.5
    for m in "abc":  # 1 req/s each, as planned
        pol.observe(m, 0.5)
    assert pol.check(1.0) == [] and pol.decisions[-1]["action"] == "none"
    for m in "abc":  # 3 req/s each: past the threshold, but the placement still fits
        for i in range(3):
            pol.observe(m, 1.1 + i / 10)
    assert overloaded([_demand(m, 3.0) for m in "abc"], devices, old, cfg) == []
    assert pol.check(2.0) == [] and pol.decisions[-1]["action"].startswith("kept")
    assert pol.planned == quiet
    for m, n in (("a", 400), ("b", 300), ("c", 1)):
        for i in range(n):
            pol.observe(m, 2.5 + i / (2 * n))
    busy = [_demand(m, r) for m, r in (("a", 400.0), ("b", 300.0), ("c", 1.0))]
    (why,) = overloaded(busy, devices, old, cfg)  # a and b no longer share device 0
    assert why.startswith("b no longer fits on [0] beside ['a']")
    moves = pol.check(3.0)  # the window (2, 3]: 400, 300 and 1 req/s
    assert moves == plan_moves(old, replan(busy, devices, old, cfg))
    assert "b" in [mv.model for mv in moves] and "a" not in [mv.model for mv in moves]
    assert pol.decisions[-1]["action"] == "replanned" and pol.planned["a"] == 400.0
    for mv in moves:
        pol.done(mv, "moved", 4.0)
    assert plan_moves(old, pol.placement) == moves
    pol.done(Move("a", (0,), (1,)), "skipped, the destination refused it", 3.0)
    assert {m: g.devices for g in pol.placement.groups for m in g.models}["a"] == (0,)
    with pytest.raises(ValueError, match="one replica"):
        DriftPolicy(_pl({0: ["a"], 1: ["a"]}), devices, _demand, quiet, lambda m, g: 1.0)


def test_replan_keeps_fixed_pools_and_puts_weights_only_where_they_fit():
    cfg = PlacementConfig(reserve_fraction=0.0)
    old = _pl({0: ["a", "b"], 1: ["c"]})
    busy = [_demand("a", 400.0), _demand("b", 300.0, weight=1.5e9), _demand("c", 1.0)]
    # Pools sized freely: a and b split, c joins a, and b (the heavier) keeps device 0.
    free = replan(busy, [DeviceSpec("gpu", 10e9, 0, 0, 0)] * 2, old, cfg)
    assert {g.devices: set(g.models) for g in free.groups} == {(0,): {"b"}, (1,): {"a", "c"}}
    # Running engines: device 0's pool is fixed at 7.5 GB (2.5 GB left for weights),
    # device 1's at 8 GB (2 GB): b (1.5 GB) and c (1 GB) do not fit beside device 1's
    # pool together, so b goes there alone and c joins a.
    pools = [ServingDevice("gpu", 10e9, 7.5e9), ServingDevice("gpu", 10e9, 8e9)]
    new = replan(busy, pools, old, cfg)
    assert not new.unplaced
    assert {g.devices: set(g.models) for g in new.groups} == {(0,): {"a", "c"}, (1,): {"b"}}
    w = {d.name: d.weight_bytes for d in busy}
    for g in new.groups:
        assert g.kv_budget_bytes == pools[g.devices[0]].kv_pool_bytes
        assert sum(w[m] for m in g.models) <= 10e9 - pools[g.devices[0]].kv_pool_bytes
        assert g.kv_need_bytes <= g.kv_budget_bytes


def test_host_devices_take_any_weights_beside_their_pool():
    from fineserve_jax.server.rebalance import serving_device

    cfg = PlacementConfig()  # 10% reserve
    d = serving_device("cpu", None, pool_bytes=4e9, weight_bytes=6e9, config=cfg)
    assert d.kv_pool_bytes == 4e9
    assert 6e9 <= cfg.usable_bytes(d) - d.kv_pool_bytes < 6e9 + 10
    g = serving_device("gpu", 80e9, pool_bytes=50e9, weight_bytes=6e9, config=cfg)
    assert (g.memory_bytes, g.kv_pool_bytes) == (80e9, 50e9)
