"""The Ray backend on a local cluster: a head and two worker nodes on loopback.

Each node runs one worker actor (its own engine, KV pool and scheduler) with a tiny HF
model loaded from disk by its source path, as on a real cluster; the HTTP front end is the
same app the single-host server runs, over ``RemoteEngine``s. The tests run in order: the
last one kills a worker.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")

from serve_process import wait_healthy  # noqa: E402
from tiny_models import make_hf_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENGINE = dict(kv_budget_bytes=16 * 2**20, block_tokens=4, max_seqs=4, max_prefill_seqs=2,
              prefill_token_budget=16, max_model_len=256, decode_buckets=(4,),
              prefill_row_buckets=(2,), chunk_buckets=(16,), context_buckets=(16, 128),
              warmup=True, batch_invariant=True)  # one compiled shape per step kind


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray.cluster_utils import Cluster

    from fineserve_jax.raycluster.launch import start_workers

    src = tmp_path_factory.mktemp("hf") / "tiny"
    # big enough that 200 tokens take a while on a CPU (the kill lands mid-stream)
    make_hf_model(src, seed=0, hidden_size=512, intermediate_size=1536, num_hidden_layers=8)
    c = Cluster(initialize_head=True,  # no dashboard: nothing here reads it
                head_node_args={"num_cpus": 0, "include_dashboard": False})
    for node in ("node-a", "node-b"):
        c.add_node(num_cpus=1, resources={node: 1})
    ray.init(address=c.address, logging_level="warning", runtime_env={
        "env_vars": {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}})
    specs = {m: {"name": m, "source": str(src), "precision": "bf16", "dtype": "float32"}
             for m in ("a", "b")}
    groups = [{"node": "node-a", "device": 0, "models": ["a"]},
              {"node": "node-b", "device": 0, "models": ["b"]}]
    engines = start_workers(groups, specs, ENGINE)
    try:
        yield engines
    finally:
        for e in engines:
            e.shutdown()
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def served(cluster):
    """The HTTP front end over the two workers, on loopback (uvicorn in a thread)."""
    import socket
    import threading

    import uvicorn

    from fineserve_jax.raycluster.supervisor import Supervisor
    from fineserve_jax.server import build_app

    sup = Supervisor(cluster, interval_s=0.5)
    app = build_app(cluster, supervisor=sup)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield {"url": f"http://127.0.0.1:{port}", "sup": sup}
    finally:
        server.should_exit = True
        thread.join(30)


def _run(served, body):
    async def main():
        async with httpx.AsyncClient(base_url=served["url"], timeout=300) as c:
            return await body(c)
    return asyncio.run(main())


def _on_server(served, coro):
    """Runs ``coro`` on the server's event loop (where the supervisor lives)."""
    return asyncio.run_coroutine_threadsafe(coro, served["sup"]._loop).result(600)


async def _stream(c, model, prompt, max_tokens, on_event=None):
    """(text, finish reason or error code) of one streamed completion; ``on_event(i)``
    is called on its i-th event as it arrives."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    text, end, i = "", None, 0
    async with c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            i += 1
            if on_event is not None:
                on_event(i)
            if "error" in ev:
                return text, ev["error"]["code"]
            for ch in ev["choices"]:
                text += ch["text"]
                end = ch["finish_reason"] or end
    return text, end


def test_openai_client_streams_from_models_on_two_nodes(cluster, served):
    a, b = cluster
    assert a.node != b.node and a.models == ("a",) and b.models == ("b",)

    async def body(c):
        client = openai.AsyncOpenAI(base_url=served["url"] + "/v1", api_key="unused",
                                    max_retries=0)
        out = {}
        for m in ("a", "b"):
            whole = await client.completions.create(model=m, prompt="hello there",
                                                    max_tokens=12, temperature=0)
            stream = await client.completions.create(model=m, prompt="hello there",
                                                     max_tokens=12, temperature=0, stream=True)
            pieces = [ch.choices[0].text async for ch in stream]
            out[m] = (whole.choices[0].text, "".join(pieces), whole.usage.completion_tokens)
        models = (await client.models.list()).data
        placement = (await c.get("/admin/placement")).json()
        return out, models, placement

    out, models, placement = _run(served, body)
    for m, (whole, streamed, n) in out.items():
        assert streamed == whole and n == 12, m  # same greedy text, streamed or not
    assert out["a"][0] == out["b"][0]  # the same weights on both nodes
    assert {m.id for m in models} == {"a", "b"}
    assert placement["routes"] == {"a": a.device, "b": b.device}
    assert len({w["node"] for w in placement["workers"]}) == 2


def test_a_model_moves_between_workers_under_load(cluster, served):
    a, b = cluster
    sup = served["sup"]

    async def body(c):
        results, stop = [], asyncio.Event()

        async def client(k):
            while not stop.is_set():
                results.append(await _stream(c, "a", f"load {k}", 16))

        load = [asyncio.create_task(client(k)) for k in range(3)]
        while len(results) < 3 and not any(t.done() for t in load):
            await asyncio.sleep(0.02)
        msg = await asyncio.to_thread(_on_server, served, sup.move("a", b))
        n = len(results)
        while len(results) < n + 3 and not any(t.done() for t in load):  # on node b now
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.gather(*load)
        return msg, results

    msg, results = _run(served, body)
    assert msg == f"a: {a.device} -> {b.device}"
    assert all(end == "length" for _, end in results), results  # none failed
    assert sup.routes["a"] is b and set(b.models) == {"a", "b"} and "a" not in a.models
    assert ray.get(a.actor.describe.remote())["models"] == {}  # drained and released
    # and back, so the next test finds one model per node again
    _on_server(served, sup.move("a", a))
    assert a.models == ("a",) and b.models == ("b",)


def test_serve_py_on_the_cluster(cluster, served, tmp_path):
    """``python serve.py --ray ADDRESS --placement FILE`` as a user starts it: a driver of
    its own, a worker actor on the node the placement names, the HTTP front end."""
    import socket
    import subprocess
    import sys

    src = cluster[0].specs["a"]["source"]
    (tmp_path / "p.json").write_text(json.dumps(
        {"devices": [{"node": "node-b", "device": 0, "models": ["c"],
                      "kv_budget_bytes": 8 * 2**20}]}))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "serve.py", "--ray", ray.get_runtime_context().gcs_address,
         "--placement", str(tmp_path / "p.json"), "--port", str(port),
         "--model", f"c={src},precision=bf16,dtype=float32", "--max-model-len", "64",
         "--max-seqs", "2", "--max-prefill-tokens", "16", "--batch-invariant",
         "--log-level", "warning"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log, 300)
        r = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": "c", "prompt": "hello there", "max_tokens": 12, "temperature": 0})
        placement = httpx.get(f"{url}/admin/placement", timeout=30).json()
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 12
    (worker,) = placement["workers"]
    assert worker["node"] == cluster[1].node and worker["models"] == ["c"]
    same = httpx.post(f"{served['url']}/v1/completions", timeout=120, json={
        "model": "a", "prompt": "hello there", "max_tokens": 12, "temperature": 0})
    assert r.json()["choices"][0]["text"] == same.json()["choices"][0]["text"]  # same weights


def test_the_global_scheduler_re_places_models_across_nodes(cluster, tmp_path):
    """The rate-driven ``Rebalancer`` over workers of two nodes: two busy models share
    node a, so the new plan splits them, and the moves run through the workers."""
    from fineserve_jax.raycluster.launch import make_rebalancer, start_workers
    from fineserve_jax.sampling import SamplingParams
    from fineserve_jax.server.rebalance import RebalanceConfig
    from schedulers.placement import PlacementConfig

    make_hf_model(tmp_path / "small", seed=1)  # small KV per token: room for the plan
    specs = {m: {"name": m, "source": str(tmp_path / "small"), "precision": "bf16",
                 "dtype": "float32"} for m in ("x", "y", "z")}
    engines = start_workers([{"node": "node-a", "device": 0, "models": ["x", "z"]},
                             {"node": "node-b", "device": 0, "models": ["y"]}], specs, ENGINE)
    try:
        now = [0.0]
        rb = make_rebalancer(engines, RebalanceConfig(
            interval_s=3600, threshold=0.5, window_s=600,
            placement=PlacementConfig(reserve_fraction=0.0)),
            planned_rates={m: 0.01 for m in specs}, clock=lambda: now[0],
            memory_bytes=64 * 2**20)
        # x and z got busy: 2.5 and 2 req/s over 10 s. Each worker's 16 MiB pool is fixed;
        # the plan's KV for x (64 sequences of 320 tokens at 512 B) and z (52) is 10 and
        # 8 MiB: not both in one pool.
        for i in range(100):
            now[0] = i / 10
            if i % 4 == 0:
                rb.observe("x")
            if i % 5 == 0:
                rb.observe("z")
        now[0] = 10.0

        async def go():
            dec = await rb.rebalance_once()
            outs = {}
            for m, e in rb.routes.items():  # each model answers where it is now
                h = e.submit(m, [1, 2, 3], SamplingParams(max_tokens=4, temperature=0))
                outs[m] = [t for d in [d async for d in h] for t in d.token_ids]
            return dec, outs

        dec, outs = asyncio.run(go())
        assert dec.action == "replanned" and dec.moves, dec.reason
        assert all("moved" in o for o in dec.done), dec.done
        placed = {m: i for i, e in enumerate(engines) for m in e.models}
        assert placed["x"] != placed["z"]  # the busy pair split across the nodes
        for m, i in placed.items():
            assert rb.routes[m] is engines[i]
            assert set(ray.get(engines[i].actor.describe.remote())["models"]) >= {m}
        assert all(len(v) == 4 for v in outs.values()) and len(outs) == 3
    finally:
        for e in engines:
            e.shutdown()


def test_a_dead_worker_fails_its_requests_retryably_and_its_model_moves(cluster, served):
    a, b = cluster
    sup = served["sup"]

    async def body(c):
        def kill(i):  # b's worker dies two tokens into the stream
            if i == 2:
                ray.kill(b.actor)

        other = asyncio.create_task(_stream(c, "a", "keep going", 200))
        doomed_res = await _stream(c, "b", "doomed", 200, kill)
        other_res = await other
        deadline = time.monotonic() + 300
        while sup.routes["b"] is b:  # the supervisor places b on node a
            assert time.monotonic() < deadline, json.dumps(sup.status(), default=str)
            await asyncio.sleep(0.1)
        again = await _stream(c, "b", "hello", 8)
        return (doomed_res, other_res, again, (await c.get("/health")).json(),
                (await c.get("/admin/placement")).json())

    doomed, other, again, health, placement = _run(served, body)
    assert doomed[1] == "worker_lost"  # a clear, retryable error event
    assert other == (other[0], "length") and len(other[0]) > 0  # the other node carried on
    assert again[1] == "length"  # served again, from node a
    assert not b.running and sup.routes["b"] is a and set(a.models) == {"a", "b"}
    assert health["status"] == "ok"
    kinds = [e["kind"] for e in placement["events"]]
    assert "worker_lost" in kinds and kinds[-1] == "replaced", placement["events"]
    assert placement["pending"] == []
    assert placement["routes"]["b"] == a.device


def test_worker_describe_and_a_repeated_attach_survive_the_running_loop(cluster, tmp_path):
    """``describe`` runs beside the engine loop, which donates the pool array at every
    step: it must not read that array. An attach retried after it took effect (its reply
    lost) answers like the first one instead of failing as a duplicate."""
    import jax.numpy as jnp

    from fineserve_jax.raycluster.worker import EngineWorker

    make_hf_model(tmp_path / "m", seed=3)
    spec = {"name": "p", "source": str(tmp_path / "m"), "precision": "bf16",
            "dtype": "float32"}
    w = EngineWorker("local", ENGINE, [spec])
    try:
        pool = w.engine.pool
        gone = jnp.zeros(4)
        gone.delete()  # what a donated pool looks like from another thread
        w.engine.pool = gone
        try:
            d = w.describe()
        finally:
            w.engine.pool = pool
        assert d["device"] == w.engine.device and d["pool_bytes"] > 0
        q = dict(spec, name="q")
        first = asyncio.run(w.attach(q, 120))
        again = asyncio.run(w.attach(q, 120))
        assert sorted(first["models"]) == sorted(again["models"]) == ["p", "q"]
        with pytest.raises(ValueError, match="already on this engine"):
            asyncio.run(w.attach(dict(q, precision="fp8"), 120))  # another spec: refused
    finally:
        w.engine.shutdown()
