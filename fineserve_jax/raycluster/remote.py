"""The front end's stand-in for a worker actor: the interface the server uses of an Engine.

``RemoteEngine.submit`` returns an ordinary ``RequestHandle`` at once; a task on the
server's event loop consumes the actor's streaming generator and pushes its deltas into
the handle, so the server streams remote requests exactly as local ones. Aborting the
handle (a client that left) cancels that task and tells the worker to free the request.

When the worker dies, every request in flight on it ends with finish reason
``worker_lost`` and a message saying to retry (the server answers 503 with
``Retry-After``), ``running`` turns False and ``on_lost`` callbacks run (the supervisor
places its models again).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fineserve_jax.engine.admission import ModelRetiring, check_prompt
from fineserve_jax.engine.handle import LOST, RequestHandle, StreamDelta

log = logging.getLogger(__name__)
_ids = itertools.count()


class WorkerLost(ModelRetiring):
    """``submit`` to a worker that died: the server routes the request again (to where
    the supervisor placed the model since) or answers 503, retry."""

    def __init__(self, message: str):
        super().__init__(message, "model")


def _current_task():
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop (a stats() call from another thread)
        return None


def _actor_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rex

    return (rex.RayActorError, rex.ActorUnavailableError, rex.WorkerCrashedError,
            rex.NodeDiedError, rex.ObjectLostError)


@dataclass(frozen=True)
class _BlockShape:
    block_bytes: int
    block_tokens: int


@dataclass(frozen=True)
class RemoteModelSpec:
    """What the rebalancer reads of a model on a worker (``live.ModelSpec``'s fields it
    uses); ``kwargs()`` is what another worker's ``attach_model`` takes."""

    precision: str
    slo: object
    cost: object
    weight_bytes: float
    spec: dict

    def kwargs(self) -> dict:
        return {"spec": self.spec}


class RefTransition:
    """A worker call in progress, awaited like an ``engine.live.Transition``."""

    def __init__(self, ref, on_done: Callable[[Any], Any] | None = None):
        self.ref = ref
        self.started = time.perf_counter()
        self.seconds = 0.0
        self._on_done = on_done

    async def wait_async(self, timeout: float | None = None) -> bool:
        async def result():
            return await self.ref

        try:
            out = await asyncio.wait_for(result(), timeout)
        except asyncio.TimeoutError:
            return False
        except Exception as e:  # noqa: BLE001 - the worker refused or died
            raise RuntimeError(f"{type(e).__name__}: {e}") from e
        self.seconds = time.perf_counter() - self.started
        if self._on_done is not None:
            self._on_done(out)
        return True


class RemoteEngine:
    """A worker actor (``worker.EngineWorker``) seen as an ``Engine`` by the server."""

    def __init__(self, actor, description: dict, *, stats_interval_s: float = 0.5):
        self.actor = actor
        self._describe(description)
        self._alive = True
        self._tasks: dict[str, asyncio.Task] = {}  # request id -> its pump
        self._handles: dict[str, RequestHandle] = {}
        self._stats = None
        self._stats_at = 0.0
        self._stats_interval = stats_interval_s
        self._refreshing: asyncio.Task | None = None
        self.on_lost: list[Callable[[RemoteEngine], Any]] = []
        self.lost_reason: str | None = None

    def _describe(self, d: dict) -> None:
        self.worker = d["worker"]
        self.node = d["node"]
        self.config = d["config"]
        self._device = d["device"]
        self._infos = d["models"]
        self.specs = d["specs"]
        self.description = d

    def __repr__(self):
        state = "serving" if self._alive else f"lost ({self.lost_reason})"
        return (f"RemoteEngine({self.worker} on node {self.node[:8]}, {self._device}, "
                f"models {list(self._infos)}, {state})")

    # --------------------------------------------------------- Engine interface
    @property
    def device(self) -> str:
        return f"{self.worker}/{self._device}"

    @property
    def running(self) -> bool:
        return self._alive

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self._infos)

    def model_info(self, name: str) -> dict:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"model {name!r} is not on worker {self.worker}") from None

    def model_state(self, name: str) -> str | None:
        return "serving" if name in self._infos and self._alive else None

    def submit(self, model: str, prompt_ids, params, *, request_id: str | None = None
               ) -> RequestHandle:
        """Queue ``prompt_ids`` on the worker; returns the handle at once (call from the
        event loop the handle is consumed on)."""
        if not self._alive:
            raise WorkerLost(f"worker {self.worker} was lost: {self.lost_reason}")
        if model not in self._infos:
            raise ModelRetiring(f"model {model!r} is not on worker {self.worker}", "model")
        info, cfg = self._infos[model], self._infos[model]["config"]
        ids = [int(t) for t in prompt_ids]
        max_len = info["max_model_len"] or min(self.config.max_model_len,
                                               cfg.max_position_embeddings)
        check_prompt(ids, params, cfg.vocab_size, max_len, self.config.block_tokens,
                     info["max_blocks_per_seq"])
        rid = request_id or f"{self.worker}-{next(_ids)}"
        loop = asyncio.get_running_loop()
        h = RequestHandle(rid, model, None, ids, self._abort, loop)
        self._tasks[rid] = loop.create_task(self._pump(h, model, ids, params))
        self._handles[rid] = h
        return h

    def stats(self):
        """The worker's ``EngineStats`` (the last one known once the worker is lost).

        On an event loop (the server's handlers, ``/metrics``) this never waits for the
        worker: it returns the last stats fetched and, when they are older than
        ``stats_interval_s``, starts fetching new ones in the background. Only the very
        first call, or a call from a thread without a running loop, asks and waits."""
        now = time.monotonic()
        stale = self._stats is None or now - self._stats_at > self._stats_interval
        if not (self._alive and stale):
            return self._stats
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or self._stats is None:
            import ray

            try:
                self._keep_stats(ray.get(self.actor.stats.remote(), timeout=30))
            except _actor_errors() as e:
                self._lost(f"stats failed: {e.__class__.__name__}")
            return self._stats
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = loop.create_task(self.refresh_stats())
        return self._stats

    async def refresh_stats(self, timeout_s: float = 10.0) -> bool:
        """Fetches the worker's stats without blocking the event loop; False when the
        worker did not answer in time or was lost."""
        if not self._alive:
            return False
        try:
            st = await asyncio.wait_for(self.actor.stats.remote(), timeout_s)
        except _actor_errors() as e:
            self._lost(f"stats failed: {e.__class__.__name__}")
            return False
        except asyncio.TimeoutError:
            return False
        self._keep_stats(st)
        return True

    def _keep_stats(self, st) -> None:
        self._stats, self._stats_at = st, time.monotonic()

    async def free_kv_bytes(self, timeout_s: float = 10.0) -> int:
        """Free KV memory of the worker's pool, asked without blocking the event loop
        (-1 when the worker does not answer in time)."""
        if not await self.refresh_stats(timeout_s):
            return -1
        return self._stats.pool.rows_free * self._stats.pool.row_bytes

    def shutdown(self, wait: bool = True) -> None:
        import ray

        for t in list(self._tasks.values()):
            t.cancel()
        if self._alive:
            try:
                ray.get(self.actor.shutdown.remote(), timeout=60)
            except _actor_errors():
                pass
        self._alive = False

    # ------------------------------------------------------------- re-placement
    async def attach(self, spec: dict, timeout_s: float = 600.0) -> None:
        """Loads ``spec``'s model on this worker and serves it here from now on."""
        d = await self.actor.attach.remote(spec, timeout_s)
        self._describe(d)

    async def retire(self, model: str, timeout_s: float = 600.0) -> bool:
        """Stops ``model`` here once its requests in flight have finished."""
        self._infos.pop(model, None)
        return await self.actor.retire.remote(model, timeout_s)

    # The interface ``server.rebalance.Rebalancer`` moves models through.
    @property
    def alloc(self):
        return self

    def fmt(self, name: str):
        """The KV block format of ``name`` (block_bytes, block_tokens)."""
        p = self.description["kv_plan"][name]
        return _BlockShape(p["block_bytes"], p["block_tokens"])

    def model_spec(self, name: str) -> RemoteModelSpec:
        from schedulers.batching import slo_from_ms

        spec = self.specs[name]
        return RemoteModelSpec(self._infos[name]["precision"],
                               slo_from_ms(spec.get("ttft_slo_ms"), spec.get("tpot_slo_ms")),
                               None, float(self.description["weight_bytes"][name]), spec)

    def attach_model(self, name: str, *, precompile=None, spec: dict, **_) -> RefTransition:
        """Starts loading ``spec``'s model on the worker (returns at once)."""
        return RefTransition(self.actor.attach.remote(spec), on_done=self._describe)

    def retire_model(self, name: str) -> RefTransition:
        """Stops routing ``name`` here; the worker drains and releases it."""
        self._infos.pop(name, None)
        return RefTransition(self.actor.retire.remote(name))

    async def check(self, timeout_s: float = 10.0) -> bool:
        """Ping the worker; a dead one is marked lost. True when alive."""
        if not self._alive:
            return False
        try:
            await asyncio.wait_for(self.actor.ping.remote(), timeout_s)
        except _actor_errors() as e:
            self._lost(f"{e.__class__.__name__}")
        except asyncio.TimeoutError:
            pass  # busy, not dead: Ray reports death as an error
        return self._alive

    # ---------------------------------------------------------------- internals
    def _abort(self, request_id: str) -> None:
        self._handles.pop(request_id, None)
        t = self._tasks.pop(request_id, None)
        if t is not None and not t.done():
            t.cancel()
            if self._alive:
                self.actor.abort.remote(request_id)

    async def _pump(self, h: RequestHandle, model: str, ids: list[int], params) -> None:
        gen = None
        try:
            gen = self.actor.generate.options(num_returns="streaming").remote(
                h.id, model, ids, params)
            first = True
            async for ref in gen:
                item = await ref
                if first:
                    first = False
                    if item is not None:  # the worker's engine refused it
                        h.push(StreamDelta("", [], finish_reason="error",
                                           error=f"{type(item).__name__}: {item}"))
                        return
                    continue
                h.push(item)
                if item.finish_reason is not None:
                    return
            if not h.finished:  # the stream ended without a last delta
                h.push(StreamDelta("", [], finish_reason="error",
                                   error="the worker's stream ended early"))
        except asyncio.CancelledError:
            if gen is not None:
                import ray

                try:
                    ray.cancel(gen)
                except Exception:  # noqa: BLE001 - best effort; abort() was sent too
                    pass
            raise
        except _actor_errors() as e:
            self._lost(f"{e.__class__.__name__} during a request")
        except Exception as e:  # noqa: BLE001 - anything else fails this request only
            log.exception("request %s on %s failed", h.id, self.worker)
            h.push(StreamDelta("", [], finish_reason="error", error=repr(e)))
        finally:
            self._tasks.pop(h.id, None)
            self._handles.pop(h.id, None)

    def _lost(self, reason: str) -> None:
        if not self._alive:
            return
        self._alive = False
        self.lost_reason = reason
        log.error("worker %s (%s) lost: %s", self.worker, self.device, reason)
        # every request in flight there ends now, whether or not its stream noticed
        for rid, h in list(self._handles.items()):
            t = self._tasks.pop(rid, None)
            if t is not None and t is not _current_task():
                t.cancel()
            if not h.finished:
                h.push(StreamDelta("", [], finish_reason=LOST,
                                   error=f"the worker serving it ({self.worker}) was lost"))
        self._handles.clear()
        for cb in list(self.on_lost):
            try:
                cb(self)
            except Exception:  # noqa: BLE001
                log.exception("on_lost callback failed")
