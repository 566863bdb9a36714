"""Models moving between two devices on real engines, end to end: each script runs in a
subprocess with ``--xla_force_host_platform_device_count=2`` (the flag must be set before
JAX starts) and prints one JSON line of what it saw. Moves on one engine at a time, and
the rebalancer's decisions, are tested in ``test_rebalance_serving.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_on_two_devices(script: str) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    r = subprocess.run([sys.executable, "-c", script], env=env, check=False,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


MOVE_WHILE_SERVING = textwrap.dedent("""
    import asyncio, json, sys, threading
    import httpx, jax, numpy as np
    import fineserve_jax.engine.live as live
    from fineserve_jax.config import ModelConfig
    from fineserve_jax.engine import Engine, EngineConfig
    from fineserve_jax.model import init_params
    from fineserve_jax.server import build_app
    from fineserve_jax.server.rebalance import RebalanceConfig, Rebalancer
    from fineserve_jax.tokenizer import Tokenizer
    from schedulers.placement import Placement, PlacementConfig
    from schedulers.roofline import DeviceSpec
    from tiny_models import byte_tokenizer_json

    cfg = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=128)
    # b's own shapes: device 1 has compiled nothing for it when it moves there
    cfgs = {"a": cfg, "b": ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                       num_layers=2, num_heads=2, num_kv_heads=1,
                                       head_dim=16, max_position_embeddings=128), "c": cfg}
    tok = Tokenizer.from_json(byte_tokenizer_json(), {"eos_token_ids": [257]})
    params = {m: jax.tree.map(np.asarray, init_params(cfgs[m], jax.random.key(i)))
              for i, m in enumerate("abc")}
    # hold the destination's compilation until a request has arrived while b warms there
    gate, compile_model = threading.Event(), live.compile_model

    def gated(*args, **kw):
        gate.wait(300)
        return compile_model(*args, **kw)

    live.compile_model = gated
    ec = EngineConfig(kv_budget_bytes=2**20, block_tokens=4, max_seqs=4, max_prefill_seqs=2,
                      prefill_token_budget=16, max_model_len=64, decode_buckets=(4,),
                      prefill_row_buckets=(2,), chunk_buckets=(16,), context_buckets=(16,),
                      warmup=False)  # the move still compiles b ahead on device 1
    devs = jax.devices()
    e0, e1 = Engine(ec, device=devs[0]), Engine(ec, device=devs[1])
    for e, names in ((e0, "ab"), (e1, "c")):
        for m in names:
            e.add_model(m, cfgs[m], params[m], tok, dtype="float32")
        e.start()
    placement = Placement.from_dict({"devices": [
        {"device": 0, "models": ["a", "b"], "kv_budget_bytes": 2**20},
        {"device": 1, "models": ["c"], "kv_budget_bytes": 2**20}]})
    spec = DeviceSpec("cpu", 64 * 2**20, 0, 0, 0)
    now = [0.0]  # the rebalancer's clock: rates do not depend on how fast this host runs
    rb = Rebalancer({0: e0, 1: e1}, {0: spec, 1: spec}, placement,
                    RebalanceConfig(interval_s=3600, threshold=0.5, window_s=600,
                                    placement=PlacementConfig(reserve_fraction=0.0),
                                    keep_if_fits=False),  # move though a, b still fit
                    planned_rates={"a": 0.01, "b": 0.01, "c": 0.01}, clock=lambda: now[0])
    for i in range(4000):  # a and b got busy: 400 and 300 req/s over 10 s
        now[0] = i / 400
        rb.observe("a")
        if i % 4:
            rb.observe("b")
    now[0] = 10.0  # the streamed requests below count at 10 s, on top
    app = build_app([e0, e1], rebalancer=rb)
    PROMPTS = ["hello", "the cat sat", "rebalance me"]
    results, failures = [], []
    stop = asyncio.Event()

    async def request(c, model, prompt, max_tokens=6):
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, "stream": True}
        text, done, finish, on_1 = "", False, None, rb.routes[model] is e1
        try:
            async with c.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    failures.append((model, r.status_code, await r.aread()))
                    return False
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        ev = json.loads(line[6:])
                        if "error" in ev:
                            failures.append((model, "error event", ev))
                        for ch in ev.get("choices", []):
                            text += ch["text"]
                            finish = ch["finish_reason"] or finish
        except Exception as ex:
            failures.append((model, "exception", repr(ex)))
            return False
        if not done or finish != "length":
            failures.append((model, "incomplete", done, finish))
            return False
        results.append((model, prompt, text, on_1, max_tokens))
        return True

    async def client(c, model, k):
        i = 0
        while not stop.is_set():
            await request(c, model, PROMPTS[(i + k) % len(PROMPTS)])
            i += 1
            await asyncio.sleep(0.05)  # continuous, without taking every core from the move

    async def main():
        t = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=t, base_url="http://x", timeout=600) as c:
            load = [asyncio.create_task(client(c, m, k))
                    for k, m in enumerate(["a", "b", "b"])]  # c idles on device 1
            while sum(r[0] == "b" for r in results) < 4:  # b streams on device 0 first
                await asyncio.sleep(0.05)
            long = asyncio.create_task(request(c, "b", "in flight", max_tokens=40))
            move = asyncio.create_task(rb.rebalance_once())
            for _ in range(30000):  # the gate holds b warming on device 1
                if e1.model_state("b") == "warming" or move.done():
                    break
                await asyncio.sleep(0.01)
            # arrives while b warms on device 1: device 0 serves it
            during = await request(c, "b", PROMPTS[0]) and rb.routes["b"] is e0
            gate.set()
            dec = await move
            long_ok = await long
            b_before = sum(r[0] == "b" and not r[3] for r in results)
            # and on device 1 after: requests routed there (some already in flight
            # when the move finished were routed to device 0 and do not count)
            while sum(r[0] == "b" and r[3] for r in results) < 4:
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*load)
            placement = (await c.get("/admin/placement")).json()
        return dec, b_before, placement, during, long_ok

    dec, b_before, placement, during, long_ok = asyncio.run(main())
    texts = {}
    for model, prompt, text, _, k in results:
        texts.setdefault((model, prompt, k), set()).add(text)
    out = {"failures": [repr(f) for f in failures], "action": dec.action,
           "reason": dec.reason, "moves": [str(m) for m in dec.moves], "outcomes": dec.done,
           "b_route_dev1": rb.routes["b"] is e1, "e0_models": list(e0.models),
           "e1_models": list(e1.models), "b_before": b_before,
           "b_on_1": sum(r[0] == "b" and r[3] for r in results), "requests": len(results),
           "distinct_texts": max(len(v) for v in texts.values()),
           "e1_b_finished": e1.stats().models["b"].finished,
           "failed": sum(m.failed for e in (e0, e1) for m in e.stats().models.values()),
           "admin_b": placement["routes"]["b"], "e1_device": e1.device,
           "e0_free": e0.stats().pool.rows_free == e0.stats().pool.rows_total,
           "served_during_warm": during, "long_ok": long_ok}
    for e in (e0, e1):
        e.shutdown()
    print(json.dumps(out))
""")


def test_a_model_moves_between_two_devices_while_requests_stream():
    out = _run_on_two_devices(MOVE_WHILE_SERVING)
    assert out["failures"] == [] and out["failed"] == 0, out
    assert out["action"] == "replanned", out
    assert any(m.startswith("b: [0] -> [1]") for m in out["moves"]), out
    assert all("moved" in o for o in out["outcomes"]), out
    assert out["b_route_dev1"] and "b" in out["e1_models"] and "b" not in out["e0_models"]
    assert out["b_before"] >= 4 and out["b_on_1"] >= 4 and out["e1_b_finished"] >= 4
    assert out["distinct_texts"] == 1  # every prompt's greedy text, whichever device
    assert out["served_during_warm"] and out["long_ok"]
    assert out["admin_b"] == out["e1_device"] == "cpu:1"


SWAP_WHILE_SERVING = textwrap.dedent("""
    import asyncio, json
    import jax, numpy as np
    from fineserve_jax.config import ModelConfig
    from fineserve_jax.engine import Engine, EngineConfig
    from fineserve_jax.model import init_params
    from fineserve_jax.sampling import SamplingParams
    from fineserve_jax.server.rebalance import (Decision, RebalanceConfig, Rebalancer,
                                                serving_device)
    from fineserve_jax.tokenizer import Tokenizer
    from schedulers.placement import Placement, PlacementConfig
    from schedulers.rebalance import Move
    from tiny_models import byte_tokenizer_json

    cfg = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=128)
    tok = Tokenizer.from_json(byte_tokenizer_json(), {"eos_token_ids": [257]})
    params = {m: jax.tree.map(np.asarray, init_params(cfg, jax.random.key(i)))
              for i, m in enumerate("abc")}
    ec = EngineConfig(kv_budget_bytes=2**20, block_tokens=4, max_seqs=4, max_prefill_seqs=2,
                      prefill_token_budget=16, max_model_len=64, decode_buckets=(4,),
                      prefill_row_buckets=(2,), chunk_buckets=(16,), context_buckets=(16,),
                      warmup=False)
    devs = jax.devices()
    e0, e1 = Engine(ec, device=devs[0]), Engine(ec, device=devs[1])
    for e, names in ((e0, "ab"), (e1, "c")):
        for m in names:
            e.add_model(m, cfg, params[m], tok, dtype="float32")
        e.start()
    placement = Placement.from_dict({"devices": [
        {"device": 0, "models": ["a", "b"], "kv_budget_bytes": 2**20},
        {"device": 1, "models": ["c"], "kv_budget_bytes": 2**20}]})
    pc = PlacementConfig(reserve_fraction=0.0)
    weights = {m: float(sum(x.nbytes for x in jax.tree.leaves(params[m]))) for m in "abc"}
    # host devices: room for every model's weights beside the pool
    spec = serving_device("cpu", None, 2**20, sum(weights.values()), pc)
    rb = Rebalancer({0: e0, 1: e1}, {0: spec, 1: spec}, placement,
                    RebalanceConfig(placement=pc))
    rb._weight_bytes = dict(weights)
    swap = [Move("b", (0,), (1,)), Move("c", (1,), (0,))]
    rb.check = lambda now=None: Decision(0.0, {}, None, {}, "replanned", "swap", list(swap))
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    in_flight = {m: rb.routes[m].submit(m, tok.encode("in flight"), greedy) for m in "bc"}
    seen = []

    async def main():
        task = asyncio.create_task(rb.rebalance_once())
        while not task.done():
            seen.append(sorted(mv.model for mv in rb.moving))
            await asyncio.sleep(0.01)
        return await task

    dec = asyncio.run(main())
    after = {m: rb.routes[m].submit(m, tok.encode("after"), greedy) for m in "bc"}
    outs = [h.result(timeout=300) for h in (*in_flight.values(), *after.values())]
    out = {"outcomes": dec.done, "both_at_once": ["b", "c"] in seen,
           "b_on_1": rb.routes["b"] is e1, "c_on_0": rb.routes["c"] is e0,
           "e0": sorted(e0.models), "e1": sorted(e1.models),
           "tokens": [len(o.token_ids) for o in outs],
           "failed": sum(m.failed for e in (e0, e1) for m in e.stats().models.values())}
    for e in (e0, e1):
        e.shutdown()
    print(json.dumps(out))
""")


def test_two_models_swap_devices_at_once_on_real_engines():
    """A swap on host devices (room for every model's weights): both moves run at once
    on real engines; requests submitted before the moves and after them complete, the
    routes and engines end swapped, nothing fails."""
    out = _run_on_two_devices(SWAP_WHILE_SERVING)
    assert all(": moved" in o for o in out["outcomes"]) and len(out["outcomes"]) == 2, out
    assert out["both_at_once"], out
    assert out["b_on_1"] and out["c_on_0"], out
    assert out["e0"] == ["a", "c"] and out["e1"] == ["b"], out
    assert out["tokens"] == [24, 24, 24, 24] and out["failed"] == 0, out
