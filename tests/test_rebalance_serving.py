"""Re-placement while serving, on engines: models joining and leaving running engines
without a failed request, and the server's rebalancer deciding and running moves.

Moves between two devices end to end: ``test_rebalance_two_devices.py``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import jax
import jax.monitoring
import numpy as np
import pytest
from tiny_models import byte_tokenizer_json

from fineserve_jax.config import ModelConfig
from fineserve_jax.engine import Engine, EngineConfig, RequestRejected
from fineserve_jax.engine.admission import ModelRetiring
from fineserve_jax.model import init_params
from fineserve_jax.sampling import SamplingParams
from fineserve_jax.tokenizer import Tokenizer
from schedulers.placement import Placement, PlacementConfig, PlacementGroup
from schedulers.roofline import DeviceSpec

ROOT = Path(__file__).resolve().parents[1]
CFG_A = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=128)
CFG_B = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=128)
SMALL = {"kv_budget_bytes": 2**20, "block_tokens": 4, "max_seqs": 4, "max_prefill_seqs": 2,
         "prefill_token_budget": 16, "max_model_len": 64, "decode_buckets": (4,),
         "prefill_row_buckets": (2,), "chunk_buckets": (16,), "context_buckets": (16,),
         "warmup": False, "pool_fill": 0xFF}
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def _pl(groups: dict[int, list[str]]) -> Placement:
    return Placement("slab-greedy", tuple(PlacementGroup((d,), 1, tuple(ms), 1000)
                                          for d, ms in sorted(groups.items())))


# ------------------------------------------------------------------------ engine
@pytest.fixture(scope="module")
def tiny():
    pa = jax.tree.map(np.asarray, init_params(CFG_A, jax.random.key(0)))
    pb = jax.tree.map(np.asarray, init_params(CFG_B, jax.random.key(1)))
    tok = Tokenizer.from_json(byte_tokenizer_json(), {"eos_token_ids": [257]})
    return pa, pb, tok


def _alone(cfg, params, tok, prompts, sp=GREEDY) -> list[list[int]]:
    e = Engine(EngineConfig(**SMALL))
    e.add_model("m", cfg, params, tok, dtype="float32")
    e.start(thread=False)
    hs = [e.submit("m", p, sp) for p in prompts]
    e.run_until_idle()
    return [h.token_ids for h in hs]


def _assert_no_blocks(e: Engine):
    st = e.stats()
    assert st.pool.rows_free == st.pool.rows_total
    assert all(m.blocks_held == 0 for m in st.models.values())


def test_attach_to_a_running_engine_while_another_model_streams(tiny):
    pa, pb, tok = tiny
    compiles: list[float] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: compiles.append(secs)
        if name.endswith("backend_compile_duration") else None)
    prompts_a = [[1, 2, 3, i] for i in range(6)]
    prompts_b = [[40, 41, 42], list(range(50, 70))]  # the second is a chunked prefill
    want_a = _alone(CFG_A, pa, tok, prompts_a)
    want_b = _alone(CFG_B, pb, tok, prompts_b)
    e = Engine(EngineConfig(**SMALL))
    e.add_model("a", CFG_A, pa, tok, dtype="float32")
    e.start()
    try:
        long = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        streaming = e.submit("a", [9, 9, 9], long)
        deadline = time.monotonic() + 120
        while not streaming.token_ids and time.monotonic() < deadline:
            time.sleep(0.01)  # "a" is being served before "b" arrives
        assert streaming.token_ids
        ha = [e.submit("a", p, GREEDY) for p in prompts_a[:3]]
        t = e.attach_model("b", CFG_B, pb, tok, dtype="float32", precompile=True)
        assert e.model_state("b") in ("warming", "serving")
        hb = [e.submit("b", p, GREEDY) for p in prompts_b]  # queue until "b" is warm
        ha += [e.submit("a", p, GREEDY) for p in prompts_a[3:]]
        assert t.wait(timeout=300) and e.model_ready("b")
        assert t.seconds > 0
        compiled_when_ready = len(compiles)
        got_b = [h.result().token_ids for h in hb]
        got_a = [h.result().token_ids for h in ha]
        assert streaming.result().finish_reason == "length"
        # sampled and log-probability requests of "b" use executables compiled ahead
        h = e.submit("b", [5, 6], SamplingParams(max_tokens=6, temperature=0.8, top_k=5,
                                                 logprobs=2, seed=1, ignore_eos=True))
        assert h.result().finish_reason == "length"
        assert len(compiles) == compiled_when_ready  # nothing compiled in the loop for "b"
    finally:
        e.shutdown()
    assert got_a == want_a and got_b == want_b
    st = e.stats()
    assert st.models["a"].failed == st.models["b"].failed == 0
    assert st.models["b"].finished == 3
    _assert_no_blocks(e)


def test_attach_refuses_a_reserve_the_pool_cannot_hold(tiny):
    pa, pb, tok = tiny
    e = Engine(EngineConfig(**SMALL))
    e.add_model("a", CFG_A, pa, tok, dtype="float32")
    e.start(thread=False)
    before = e.stats().pool
    with pytest.raises(ValueError, match="reserve"):
        e.attach_model("b", CFG_B, pb, tok, dtype="float32", reserve_blocks=10**6)
    with pytest.raises(ValueError, match="already on this engine"):
        e.attach_model("a", CFG_A, pa, tok, dtype="float32")
    assert e.models == ("a",) and e.alloc.models == ("a",)
    assert e.stats().pool == before
    with pytest.raises(RuntimeError, match="started"):
        Engine(EngineConfig(**SMALL)).attach_model("b", CFG_B, pb, tok)


def test_retire_lets_requests_finish_then_frees_every_block(tiny):
    pa, pb, tok = tiny
    e = Engine(EngineConfig(**SMALL))
    e.add_model("a", CFG_A, pa, tok, dtype="float32")
    e.add_model("b", CFG_B, pb, tok, dtype="float32")
    e.start(thread=False)
    prompts = [[7, 8, 9], list(range(30, 50)), [3], [4, 4], [5, 6, 7, 8], [1]]
    hb = [e.submit("b", p, GREEDY) for p in prompts]  # 6 > max_seqs: some wait
    ha = e.submit("a", [1, 2, 3], GREEDY)
    for _ in range(4):
        e.step()
    assert e.alloc.used_blocks("b") > 0
    r = e.retire_model("b")
    assert e.retire_model("b") is r
    with pytest.raises(ModelRetiring, match="retired") as err:
        e.submit("b", [1], GREEDY)
    assert isinstance(err.value, RequestRejected) and err.value.param == "model"
    e.step()
    assert not r.done and e.model_state("b") == "retiring"  # still running requests
    e.run_until_idle()
    assert r.done and r.wait(0)
    assert [h.result().finish_reason for h in hb] == ["length"] * len(prompts)
    assert [h.token_ids for h in hb] == _alone(CFG_B, pb, tok, prompts)
    assert ha.result().finish_reason == "length"
    assert e.models == ("a",) and e.alloc.models == ("a",) and e.model_state("b") is None
    _assert_no_blocks(e)
    with pytest.raises(KeyError, match="not served"):
        e.submit("b", [1], GREEDY)
    # the freed room takes a model again: attach it back and serve it
    t = e.attach_model("b", CFG_B, pb, tok, dtype="float32")
    e.step()
    assert t.done and e.model_ready("b")
    h = e.submit("b", prompts[0], GREEDY)
    e.run_until_idle()
    assert h.token_ids == _alone(CFG_B, pb, tok, prompts[:1])[0]


# ----------------------------------------------------------------- server side
def _rebalancer(tiny, **cfg):
    from fineserve_jax.server.rebalance import RebalanceConfig, Rebalancer

    pa, pb, tok = tiny
    e0, e1 = Engine(EngineConfig(**SMALL)), Engine(EngineConfig(**SMALL))
    e0.add_model("a", CFG_A, pa, tok, dtype="float32")
    e0.add_model("b", CFG_A, pa, tok, dtype="float32")
    e1.add_model("c", CFG_B, pb, tok, dtype="float32")
    e0.start(thread=False)
    e1.start(thread=False)
    pool = e0.stats().pool.pool_bytes
    dev = DeviceSpec("cpu", 8 * pool, 0, 0, 0)
    now = [0.0]
    rb = Rebalancer({0: e0, 1: e1}, {0: dev, 1: dev}, _pl({0: ["a", "b"], 1: ["c"]}),
                    RebalanceConfig(interval_s=1, threshold=0.5, window_s=10,
                                    placement=PlacementConfig(reserve_fraction=0.0), **cfg),
                    planned_rates={"a": 1.0, "b": 1.0, "c": 1.0}, clock=lambda: now[0])
    return rb, e0, e1, now


def test_rebalancer_plans_a_move_only_past_the_threshold(tiny):
    rb, e0, e1, now = _rebalancer(tiny, output_tokens=64, prompt_tokens=64)
    for i in range(10):  # 1 req/s each over the 10 s window: as planned
        for m in "abc":
            now[0] = i + 0.5
            rb.observe(m)
    d = rb.check(10.0)
    assert d.action == "none" and d.moves == [] and "within" in d.reason
    for i in range(60):  # a and b busy now, c as before
        now[0] = 10.0 + i * 0.05
        rb.observe("a")
        rb.observe("b")
    d = rb.check(14.0)
    assert d.action == "replanned", d.reason
    assert d.drift["a"] > 0.5 and d.drift["b"] > 0.5
    moved = {mv.model: mv for mv in d.moves}
    assert moved and "a" not in moved  # a keeps its device; one of its neighbours leaves
    assert rb.planned_rates == d.observed  # the new baseline
    assert rb.check(14.0).action == "none"
    status = rb.status()
    assert status["routes"] == {"a": e0.device, "b": e0.device, "c": e1.device}
    assert [x["action"] for x in status["decisions"]] == ["none", "replanned", "none"]


def test_the_first_plan_waits_for_a_whole_window_of_traffic(tiny):
    """Without planned rates (a placement file has none) the rebalancer plans only once
    it has seen ``window_s`` of arrivals: a few seconds' count is noise."""
    rb, e0, e1, now = _rebalancer(tiny, output_tokens=64, prompt_tokens=64)
    rb.planned_rates = None
    assert rb.check(30.0).reason == "no traffic yet"
    for i in range(200):  # from 30 s on, 20 req/s of a and b: past what device 0 holds
        now[0] = 30.0 + i / 20
        rb.observe("a")
        rb.observe("b")
    d = rb.check(35.0)  # 5 s of arrivals of the 10 s window
    assert d.action == "none" and d.moves == [] and "5 s of arrivals observed" in d.reason
    assert rb.planned_rates is None
    d = rb.check(40.0)
    assert d.action == "replanned" and d.reason.startswith("first rates observed"), d.reason
    assert rb.planned_rates == d.observed


@pytest.mark.parametrize("keep_if_fits", [True, False])
def test_rebalancer_keeps_a_placement_that_still_fits(tiny, keep_if_fits):
    """Rates twice the planned ones are past the threshold, but the two devices still
    admit them: by default nothing is re-planned (moves would only cost loads and
    drains); with ``keep_if_fits=False`` the rebalancer re-plans on drift alone."""
    rb, e0, e1, now = _rebalancer(tiny, output_tokens=64, prompt_tokens=64,
                                  keep_if_fits=keep_if_fits)
    for i in range(20):  # 2 req/s each over the 10 s window
        for m in "abc":
            now[0] = i / 2
            rb.observe(m)
    d = rb.check(10.0)
    assert min(d.drift.values()) > 0.5
    if keep_if_fits:
        assert d.action == "kept" and "still fits" in d.reason and d.moves == []
        assert rb.planned_rates == {"a": 1.0, "b": 1.0, "c": 1.0}
    else:
        assert d.action == "replanned", d.reason
        assert rb.planned_rates == d.observed


@pytest.mark.parametrize("overcommit", [True, False])
def test_rebalancer_overcommits_a_model_only_when_told(tiny, overcommit):
    """At 100 req/s each model alone takes a device's whole compute headroom: two
    devices cannot hold three models within it. The re-plan puts the third past the
    headroom beside another and says so, or (``overcommit=False``) leaves a model
    unplaced, so the current placement is kept."""
    rb, e0, e1, now = _rebalancer(tiny, output_tokens=64, prompt_tokens=64)
    rb.config = replace(rb.config, placement=PlacementConfig(reserve_fraction=0.0,
                                                             overcommit=overcommit))
    for i in range(1000):
        for m in "abc":
            now[0] = i / 100
            rb.observe(m)
    d = rb.check(10.0)
    if overcommit:
        assert d.action == "replanned", d.reason
        assert "past the planned load (no device had room for them)" in d.reason
    else:
        assert d.action == "kept" and "unplaced: keeping the current one" in d.reason
        assert d.moves == []


def test_rebalancer_refuses_tensor_parallel_groups_and_wrong_engines(tiny):
    from fineserve_jax.server.rebalance import Rebalancer

    rb, e0, e1, _ = _rebalancer(tiny)
    dev = rb.devices[0]
    tp = Placement("x", (PlacementGroup((0, 1), 2, ("a",), 1),))
    with pytest.raises(ValueError, match="tensor-parallel"):
        Rebalancer({0: e0, 1: e1}, {0: dev, 1: dev}, tp)
    with pytest.raises(ValueError, match="whose engine serves"):
        Rebalancer({0: e0, 1: e1}, {0: dev, 1: dev}, _pl({0: ["c"], 1: ["a", "b"]}))


def test_serve_options_build_a_rebalancer_over_the_placement(tiny):
    sys.path.insert(0, str(ROOT))
    import serve

    with pytest.raises(SystemExit):
        serve.parse_args(["--rebalance-interval", "30"])  # needs --placement
    args = serve.parse_args(["--placement", "p.json", "--rebalance-interval", "30",
                             "--rebalance-threshold", "0.25"])
    assert serve.parse_args([]).rebalance_interval == 0  # off by default
    pa, pb, tok = tiny
    e = Engine(EngineConfig(**SMALL))
    e.add_model("a", CFG_A, pa, tok, dtype="float32")
    e.add_model("b", CFG_B, pb, tok, dtype="float32")
    e.start(thread=False)
    groups = [{"device": 0, "models": ["a", "b"], "kv_budget_bytes": SMALL["kv_budget_bytes"]}]
    rb = serve.make_rebalancer(args, groups, [e], jax.devices())
    assert (rb.config.interval_s, rb.config.threshold, rb.config.window_s) == (30, 0.25, 60)
    assert rb.config.placement.overcommit  # the SLO-aware scheduler sheds what is late
    fcfs = serve.parse_args(["--placement", "p.json", "--rebalance-interval", "30",
                             "--scheduler", "fcfs"])
    assert not serve.rebalance_config(fcfs).placement.overcommit
    short = serve.parse_args(["--placement", "p.json", "--rebalance-interval", "5",
                              "--rebalance-window", "10"])
    assert serve.rebalance_config(short).window_s == 10  # default: max(5, 60)
    assert serve.rebalance_config(serve.parse_args(
        ["--placement", "p.json", "--rebalance-interval", "90"])).window_s == 90
    for bad in ("0", "-5", "inf"):
        with pytest.raises(SystemExit):
            serve.parse_args(["--placement", "p.json", "--rebalance-interval", "5",
                              "--rebalance-window", bad])
    assert rb.routes == {"a": e, "b": e}
    assert rb.devices[0].memory_bytes >= e.stats().pool.pool_bytes
    assert rb.devices[0].kv_pool_bytes == e.stats().pool.pool_bytes  # the running pool, fixed
    with pytest.raises(ValueError, match="single-device"):
        serve.make_rebalancer(args, [{"devices": [0, 1], "models": ["a", "b"],
                                      "kv_budget_bytes": 1}], [e], jax.devices())


def test_server_sends_a_request_for_a_retiring_model_to_its_new_engine(tiny):
    import asyncio

    import httpx

    from fineserve_jax.server import build_app

    pa, pb, tok = tiny
    e0, e1 = Engine(EngineConfig(**SMALL)), Engine(EngineConfig(**SMALL))
    e0.add_model("a", CFG_A, pa, tok, dtype="float32")
    e1.add_model("c", CFG_B, pb, tok, dtype="float32")
    e0.start(thread=False)  # never steps: "a" stays retiring on it
    e1.start()
    try:
        app = build_app([e0, e1])
        server = app.state.server
        assert e1.attach_model("a", **e0.model_spec("a").kwargs()).wait(60)
        e0.retire_model("a")
        server.routes["a"] = e1
        stale = server._route
        server._route = lambda body: ("a", e0)  # a handler that read the route before the move

        async def go():
            t = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=t, base_url="http://x") as c:
                r = await c.post("/v1/completions", json={
                    "model": "a", "prompt": [1, 2, 3], "max_tokens": 5, "temperature": 0})
                server._route = stale
                return r, (await c.get("/admin/placement")).json()

        r, placement = asyncio.run(go())
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 5
        assert e1.stats().models["a"].finished == 1 and e0.stats().models["a"].finished == 0
        assert placement == {"routes": {"a": e1.device, "c": e1.device}, "rebalancer": None}
    finally:
        e1.shutdown()


@pytest.mark.parametrize("a_moves", [True, False])
def test_rebalancer_runs_moves_at_once_where_the_destination_has_room(a_moves):
    """``rebalance_once`` starts every move whose destination has room for its weights
    beside what the device holds, and the others as the moves out of their destination
    drain: a and b load together; c (into device 0, full until a or b has left) starts
    when a ends, while b still runs. If a's move is skipped instead (``moved=False``), a
    stays on device 0 and c waits for b. Moves are stood in for by events the test
    sets."""
    import asyncio
    from types import SimpleNamespace

    from fineserve_jax.server.rebalance import (Decision, MoveOutcome, RebalanceConfig,
                                                Rebalancer)
    from schedulers.rebalance import Move, ServingDevice

    engines = {i: SimpleNamespace(models=ms, device=f"dev{i}")
               for i, ms in enumerate([["a", "b"], ["c"], ["d"]])}
    dev = ServingDevice("gpu", 100.0, 90.0)  # room for 10 bytes of weights
    rb = Rebalancer(engines, dict.fromkeys(engines, dev), _pl({0: ["a", "b"], 1: ["c"],
                                                               2: ["d"]}),
                    RebalanceConfig(placement=PlacementConfig(reserve_fraction=0.0)))
    rb._weight_bytes = dict.fromkeys("abcd", 4.0)
    moves = [Move("a", (0,), (1,)), Move("b", (0,), (2,)), Move("c", (1,), (0,))]
    rb.check = lambda now=None: Decision(0.0, {}, None, {}, "replanned", "", moves)
    started, finish = [], {m.model: asyncio.Event() for m in moves}

    async def move(mv):
        started.append(mv.model)
        await finish[mv.model].wait()
        if mv.model == "a" and not a_moves:
            return MoveOutcome(f"{mv}: skipped", moved=False)
        return MoveOutcome(f"{mv}: moved", moved=True)

    rb.move = move

    async def settle():
        for _ in range(5):
            await asyncio.sleep(0)
        return list(started)

    async def main():
        task = asyncio.create_task(rb.rebalance_once())
        seen = [await settle()]
        finish["a"].set()
        seen.append(await settle())
        for m in ("c", "b") if a_moves else ("b", "c"):
            finish[m].set()
            seen.append(await settle())
        return seen, await task

    seen, dec = asyncio.run(main())
    assert seen[0] == ["a", "b"]  # device 1 holds 4 + 4, device 2 4 + 4 of 10
    done = [f"{moves[0]}: moved" if a_moves else f"{moves[0]}: skipped"]
    if a_moves:
        assert seen[1] == ["a", "b", "c"]  # a drained: device 0 holds 4 (b) + 4 (c)
        done += [f"{moves[2]}: moved", f"{moves[1]}: moved"]
    else:
        assert seen[1] == ["a", "b"]  # a stayed: device 0 holds 4 (a) + 4 (b) until b drains
        assert seen[2] == ["a", "b", "c"]
        done += [f"{moves[1]}: moved", f"{moves[2]}: moved"]
    assert dec.done == done and all(isinstance(o, MoveOutcome) for o in dec.done)
    assert rb.moving == []



def test_a_move_refused_by_a_destination_still_draining_is_tried_again():
    """A swap with room for both models' weights starts both moves; the destination
    refuses a (say its KV pool cannot reserve a's blocks while c, leaving it, holds its
    own): a starts again once c has moved out, and moves. Moves are stood in for by
    events the test sets."""
    import asyncio
    from types import SimpleNamespace

    from fineserve_jax.server.rebalance import (Decision, MoveOutcome, RebalanceConfig,
                                                Rebalancer)
    from schedulers.rebalance import Move, ServingDevice

    engines = {i: SimpleNamespace(models=ms, device=f"dev{i}")
               for i, ms in enumerate([["a"], ["c"]])}
    dev = ServingDevice("gpu", 100.0, 90.0)  # room for 10 bytes of weights
    rb = Rebalancer(engines, dict.fromkeys(engines, dev), _pl({0: ["a"], 1: ["c"]}),
                    RebalanceConfig(placement=PlacementConfig(reserve_fraction=0.0)))
    rb._weight_bytes = dict.fromkeys("ac", 4.0)
    moves = [Move("a", (0,), (1,)), Move("c", (1,), (0,))]
    rb.check = lambda now=None: Decision(0.0, {}, None, {}, "replanned", "", moves)
    started, c_drained = [], asyncio.Event()

    async def move(mv):
        started.append(mv.model)
        if mv.model == "c":
            await c_drained.wait()
            return MoveOutcome(f"{mv}: moved", moved=True)
        if started.count("a") == 1:
            return MoveOutcome(f"{mv}: skipped, the destination refused it", False,
                               refused=True)
        return MoveOutcome(f"{mv}: moved", moved=True)

    rb.move = move

    async def main():
        task = asyncio.create_task(rb.rebalance_once())
        for _ in range(5):
            await asyncio.sleep(0)
        before = list(started)
        c_drained.set()
        return before, await task

    before, dec = asyncio.run(main())
    assert before == ["a", "c"]  # both at once; a refused, waiting for c
    assert started == ["a", "c", "a"]
    assert dec.done == [f"{moves[1]}: moved", f"{moves[0]}: moved"]
