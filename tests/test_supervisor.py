"""``Supervisor`` recovery logic over stand-in workers (no Ray): which worker a lost
model goes to, what happens when workers refuse it, and the retry at each ping."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from fineserve_jax.raycluster.supervisor import Supervisor


class FakeWorker:
    def __init__(self, name, models, free, refuse=0):
        self.worker, self.node, self.device = name, f"node-{name}", f"{name}/cpu:0"
        self.specs = {m: {"name": m, "source": "/nowhere"} for m in models}
        self.free, self.refuse = free, refuse  # refuse the first `refuse` attaches
        self.running, self.lost_reason, self.on_lost = True, None, []
        self.attached = []

    @property
    def models(self):
        return tuple(self.specs)

    async def free_kv_bytes(self):
        return self.free

    async def check(self):
        return self.running

    async def attach(self, spec, timeout_s):
        if self.refuse:
            self.refuse -= 1
            raise RuntimeError("out of KV memory")
        self.specs[spec["name"]] = spec
        self.attached.append(spec["name"])


def _server(workers, routes):
    return SimpleNamespace(routes=routes, engines=list(workers),
                           metrics=SimpleNamespace(engines=list(workers)))


def test_lost_models_go_to_the_most_free_worker_and_refusals_fall_through():
    dead = FakeWorker("d", ["m", "n"], 0)
    big, small = FakeWorker("big", [], 10, refuse=1), FakeWorker("small", [], 5)
    sup = Supervisor([dead, big, small])
    server = _server([dead, big, small], {"m": dead, "n": dead})
    sup.use_server(server)

    async def go():
        sup.start()
        dead.running = False
        try:
            return await sup.recover(dead)
        finally:
            await sup.stop()

    out = asyncio.run(go())
    # big (most free) refused m, so m went to small; n then fit on big
    assert out == {"m": small.device, "n": big.device}
    assert server.routes == {"m": small, "n": big} and sup.pending == {}
    assert dead not in server.engines and dead not in server.metrics.engines
    kinds = [e["kind"] for e in sup.events]
    assert kinds == ["worker_lost", "replaced", "replaced"]


def test_a_model_no_worker_takes_stays_pending_and_is_retried_at_the_next_ping():
    dead, live = FakeWorker("d", ["m"], 0), FakeWorker("w", [], 10, refuse=3)
    sup = Supervisor([dead, live], interval_s=0.01)
    server = _server([dead, live], {"m": dead})
    sup.use_server(server)

    async def go():
        sup.start()
        dead.running = False
        first = await sup.recover(dead)
        status = sup.status()
        for _ in range(500):  # the watch loop tries again
            if not sup.pending:
                break
            await asyncio.sleep(0.01)
        await sup.stop()
        return first, status

    first, status = asyncio.run(go())
    assert first["m"].startswith("not placed: w refused it (RuntimeError: out of KV")
    assert status["pending"] == ["m"] and status["routes"] == {"m": dead.device}
    assert sup.pending == {} and server.routes["m"] is live and live.attached == ["m"]
    assert live in server.engines and live in server.metrics.engines
    kinds = [e["kind"] for e in sup.events]
    assert kinds == ["worker_lost", "not_placed", "replaced"]  # 3 refusals, 1 reason
    assert sup.status()["routes"] == {"m": live.device}


class _Call:
    """``actor.method.remote(...)`` of a stand-in actor: an awaitable that never answers
    unless told to."""

    def __init__(self, value=None, hang=False):
        self.value, self.hang, self.calls = value, hang, 0

    def remote(self, *a):
        self.calls += 1

        async def answer():
            if self.hang:
                await asyncio.sleep(3600)
            return self.value
        return answer()


def test_remote_stats_on_the_event_loop_never_wait_for_the_worker():
    from fineserve_jax.raycluster.remote import RemoteEngine

    pool = SimpleNamespace(rows_free=3, row_bytes=100)
    old, new = SimpleNamespace(pool=pool, tag="old"), SimpleNamespace(pool=pool, tag="new")
    actor = SimpleNamespace(stats=_Call(new, hang=True))
    e = RemoteEngine(actor, {"worker": "w", "node": "n", "config": None, "device": "cpu:0",
                             "models": {}, "specs": {}}, stats_interval_s=0.0)
    e._keep_stats(old)

    async def go():
        t0 = time.monotonic()
        first = e.stats()  # stale: a refresh starts in the background, the old is returned
        waited = time.monotonic() - t0
        await asyncio.sleep(0.05)
        hung = e.stats()  # the worker still has not answered
        assert actor.stats.calls == 1  # one refresh in flight, not one per call
        e._refreshing.cancel()
        actor.stats.hang = False
        assert await e.refresh_stats() and e.stats().tag == "new"
        actor.stats.hang = True
        free = await e.free_kv_bytes(timeout_s=0.05)  # no answer in time
        return first, waited, hung, free

    first, waited, hung, free = asyncio.run(go())
    assert first.tag == "old" and hung.tag == "old" and waited < 0.05
    assert free == -1 and e.running  # slow is not dead
