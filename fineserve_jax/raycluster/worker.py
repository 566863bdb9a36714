"""The Ray actor behind one device worker: its device, models, KV pool and scheduler.

``EngineWorker`` is a plain class; ``launch.worker_actor`` wraps it with ``ray.remote``
(so importing this module needs no Ray). Inside the actor it is an asyncio actor: the
engine's loop thread runs the steps, and ``generate`` streams each request's deltas from
the engine's asyncio handle as Ray streaming-generator items, in order.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


class EngineWorker:
    """One ``Engine`` on this node's devices (``device_count`` of them, as Ray assigned
    them; None: the default device), with its models loaded from their sources
    (``serve.py`` model specs: name, source, precision, dtype, SLOs)."""

    def __init__(self, name: str, engine_config: dict, models: list[dict], *,
                 cache_dir: str | None = None, device_count: int | None = None,
                 log_level: str = "info"):
        logging.basicConfig(level=log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        import jax

        from fineserve_jax.engine import Engine, EngineConfig

        self.name = name
        self.cache_dir = cache_dir
        self.specs: dict[str, dict] = {}
        self.weight_bytes: dict[str, int] = {}
        cfg = EngineConfig(**engine_config)
        devs = jax.local_devices()[:device_count] if device_count else []
        if len(devs) > 1:  # a tensor-parallel group: one engine over a mesh of them
            from fineserve_jax.engine.sharding import tp_mesh

            self.engine = Engine(cfg, mesh=tp_mesh(devs))
        else:
            self.engine = Engine(cfg, device=devs[0]) if devs else Engine(cfg)
        t0 = time.perf_counter()
        for spec in models:
            self._load(spec, attach=False)
        self.engine.start()
        log.info("worker %s: %s on %s, started in %.1f s", name, sorted(self.specs),
                 self.engine.device, time.perf_counter() - t0)

    def _load(self, spec: dict, attach: bool):
        from checkpoints.cache import load_served
        from schedulers.batching import slo_from_ms

        loaded, prec = load_served(spec, self.cache_dir, progress=False)
        kw = dict(dtype=spec.get("dtype") or "bfloat16", precision=prec,
                  slo=slo_from_ms(spec.get("ttft_slo_ms"), spec.get("tpot_slo_ms")))
        import jax

        add = self.engine.attach_model if attach else self.engine.add_model
        out = add(spec["name"], loaded.config, loaded.params, loaded.tokenizer, **kw)
        self.specs[spec["name"]] = dict(spec)
        self.weight_bytes[spec["name"]] = int(sum(x.nbytes
                                                  for x in jax.tree.leaves(loaded.params)))
        return out

    # ------------------------------------------------------------------ queries
    def describe(self) -> dict:
        """What the front end needs to route to this worker and serve its models."""
        import ray

        e = self.engine
        serving = [m for m in e.models if e.model_state(m) == "serving"]
        plan = e.kv_plan()
        dev = e.jax_device  # not e.pool: the loop thread donates it at every step
        limit = (dev.memory_stats() or {}).get("bytes_limit")
        return {"worker": self.name, "device": e.device, "config": e.config,
                "node": ray.get_runtime_context().get_node_id(),
                "device_kind": dev.device_kind,
                "memory_bytes": limit, "pool_bytes": e.stats().pool.pool_bytes,
                "models": {m: e.model_info(m) for m in serving},
                "kv_plan": {m: plan[m] for m in serving if m in plan},
                "weight_bytes": {m: self.weight_bytes.get(m, 0) for m in serving},
                "specs": {m: self.specs[m] for m in serving if m in self.specs}}

    def stats(self):
        return self.engine.stats()

    def ping(self) -> str:
        return self.name

    # ----------------------------------------------------------------- requests
    async def generate(self, request_id: str, model: str, prompt_ids: list[int], params):
        """Streams ``StreamDelta``s of one request; the first item is ``None`` once the
        engine accepted it, or the exception ``submit`` raised (passed back, not raised,
        so the front end can answer it as it answers a local engine's)."""
        try:
            h = self.engine.submit(model, prompt_ids, params, request_id=request_id)
        except (ValueError, RuntimeError) as e:  # RequestRejected, ModelRetiring, ...
            yield e
            return
        yield None
        try:
            async for d in h:
                yield d
        finally:
            h.abort()  # no-op once finished; the front end went away otherwise

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    # ------------------------------------------------------------- re-placement
    async def attach(self, spec: dict, timeout_s: float = 600.0) -> dict:
        """Loads ``spec``'s model and starts serving it here (compiled before it takes
        requests); returns ``describe()``. Raises when it cannot (memory, a bad source).
        Requests of the models already here keep streaming meanwhile."""
        import asyncio

        name = spec["name"]
        if (name in self.engine.models and self.engine.model_state(name) == "serving"
                and self.specs.get(name) == dict(spec)):
            return self.describe()  # a retry of an attach that took effect: nothing to do
        t = await asyncio.to_thread(self._load, spec, True)
        if not await t.wait_async(timeout_s):
            self.engine.retire_model(spec["name"])
            raise RuntimeError(f"model {spec['name']} not ready on {self.name} after "
                               f"{timeout_s:g} s")
        return self.describe()

    async def retire(self, model: str, timeout_s: float = 600.0) -> bool:
        """Stops taking requests for ``model``; returns once its requests in flight ended
        and its KV and weights are released."""
        self.specs.pop(model, None)
        return await self.engine.retire_model(model).wait_async(timeout_s)

    def shutdown(self) -> None:
        self.engine.shutdown()
