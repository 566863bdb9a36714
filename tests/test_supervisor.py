"""``Supervisor`` recovery logic over stand-in workers (no Ray): which worker a lost
model goes to, what happens when workers refuse it, and the retry at each ping."""

from __future__ import annotations

import asyncio
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
    dead, live = FakeWorker("d", ["m"], 0), FakeWorker("w", [], 10, refuse=2)
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
    kinds = [e["kind"] for e in sup.events]
    assert kinds == ["worker_lost", "not_placed", "not_placed", "replaced"]
    assert sup.status()["routes"] == {"m": live.device}
