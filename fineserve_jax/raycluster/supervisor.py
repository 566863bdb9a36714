"""Keeps every model served while workers come and go.

The supervisor watches the ``RemoteEngine``s behind a server (a ping every
``interval_s``, and at once when a request finds its worker dead). When a worker is
lost it is taken out of the server's engines (``/health`` stays green for the rest), and
each of its models is loaded again on the live worker with the most free KV memory
(the next one when a worker refuses it; models no live worker took are tried again at
every ping until one does). Until a worker serves it, requests for the model are
answered 503 with ``Retry-After``. ``move`` re-places a model between workers (of any
nodes) while it is serving: load on the destination, route new requests there, drain the
source.
"""

from __future__ import annotations

import asyncio
import logging
import time

from fineserve_jax.raycluster.remote import RemoteEngine

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self, engines: list[RemoteEngine], *, interval_s: float = 2.0,
                 attach_timeout_s: float = 600.0):
        self.engines = list(engines)
        self.interval_s = interval_s
        self.attach_timeout_s = attach_timeout_s
        self.server = None
        self.events: list[dict] = []  # what happened, for /admin/placement
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._recovering: set[asyncio.Task] = set()
        self.pending: dict[str, dict] = {}  # model -> spec: lost and not placed yet
        self._why_not: dict[str, str] = {}  # pending model -> the last reason recorded
        self._placing: asyncio.Lock | None = None
        for e in self.engines:
            e.on_lost.append(self._on_lost)

    def use_server(self, server) -> None:
        """``server.app.Server`` whose routes and engines this supervisor keeps."""
        self.server = server

    @property
    def routes(self) -> dict:
        return self.server.routes

    # ----------------------------------------------------------------- running
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._placing = asyncio.Lock()
        self._task = self._loop.create_task(self._watch())

    async def stop(self) -> None:
        for t in [self._task, *self._recovering]:
            if t is not None:
                t.cancel()
        self._task = None
        self._loop = None
        for e in self.engines:
            if self._on_lost in e.on_lost:
                e.on_lost.remove(self._on_lost)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await asyncio.gather(*(e.check() for e in self.engines if e.running))
            if self.pending:
                await self.place_pending()

    def _on_lost(self, engine: RemoteEngine) -> None:
        if self._loop is None or self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._spawn_recovery, engine)

    def _spawn_recovery(self, engine: RemoteEngine) -> None:
        t = self._loop.create_task(self.recover(engine))
        self._recovering.add(t)
        t.add_done_callback(self._recovering.discard)

    # ---------------------------------------------------------------- recovery
    def status(self) -> dict:
        return {"routes": {m: e.device for m, e in sorted(self.routes.items())},
                "pending": sorted(self.pending),
                "workers": [{"worker": e.worker, "node": e.node, "device": e.device,
                             "alive": e.running, "models": list(e.models)}
                            for e in self.engines],
                "events": self.events}

    def _event(self, **kw) -> None:
        kw["time"] = time.time()
        self.events.append(kw)
        log.info("supervisor: %s", kw)

    async def recover(self, dead: RemoteEngine) -> dict[str, str]:
        """Takes ``dead`` out of service and places its models again; returns model ->
        where it went (or why not yet: it stays pending and is tried again)."""
        if self.server is not None:
            for lst in (self.server.engines, self.server.metrics.engines):
                if dead in lst:
                    lst.remove(dead)
        self._event(kind="worker_lost", worker=dead.worker, reason=dead.lost_reason,
                    models=list(dead.models))
        for name in dead.models:
            if self.routes.get(name) is dead:  # else another replica serves it already
                self.pending[name] = dead.specs.get(name)
        return await self.place_pending()

    async def place_pending(self) -> dict[str, str]:
        """Tries each live worker, most free KV first, for every pending model."""
        async with self._placing:
            out = {}
            for name, spec in list(self.pending.items()):
                live = [e for e in self.engines if e.running]
                free = await asyncio.gather(*(e.free_kv_bytes() for e in live))
                out[name] = "not placed: no live worker"
                for i in sorted(range(len(live)), key=free.__getitem__, reverse=True):
                    e = live[i]
                    try:
                        await asyncio.wait_for(e.attach(spec, self.attach_timeout_s),
                                               self.attach_timeout_s + 30)
                    except Exception as ex:  # noqa: BLE001 - try the next worker
                        out[name] = (f"not placed: {e.worker} refused it "
                                     f"({type(ex).__name__}: {ex})")
                        continue
                    self._route(name, e)
                    del self.pending[name]
                    out[name] = e.device
                    break
                if name not in self.pending:
                    self._event(kind="replaced", model=name, to=out[name])
                    self._why_not.pop(name, None)
                elif self._why_not.get(name) != out[name]:  # once per reason, not per ping
                    self._why_not[name] = out[name]
                    self._event(kind="not_placed", model=name, to=out[name])
            return out

    def _route(self, model: str, e: RemoteEngine) -> None:
        """New requests for ``model`` go to ``e``, which the server now serves and scrapes."""
        self.routes[model] = e
        if self.server is not None:
            for lst in (self.server.engines, self.server.metrics.engines):
                if e not in lst:
                    lst.append(e)

    async def move(self, model: str, dst: RemoteEngine) -> str:
        """Re-place ``model`` onto ``dst`` while serving: load there, route new requests
        there, then drain and release it on its old worker."""
        src = self.routes[model]
        if src is dst:
            return f"{model}: already on {dst.device}"
        t0 = time.perf_counter()
        await dst.attach(src.specs[model], self.attach_timeout_s)
        self._route(model, dst)
        ready = time.perf_counter() - t0
        await src.retire(model, self.attach_timeout_s)
        self._event(kind="moved", model=model, src=src.device, dst=dst.device,
                    ready_s=round(ready, 2), drained_s=round(time.perf_counter() - t0, 2))
        return f"{model}: {src.device} -> {dst.device}"
