"""Worker actors from a placement file: one actor per device group, on the group's node.

A placement group may name its node (``"node": "10.0.0.5"`` or a custom resource the node
was started with, ``ray start --resources '{"gpu-node-1": 1}'``); its actor is then
scheduled there. ``device`` / ``devices`` give how many devices the actor owns (Ray picks
which free GPUs of the node; on CPU nodes the actor uses the default device).
"""

from __future__ import annotations

import ipaddress
import logging

from fineserve_jax.raycluster.remote import RemoteEngine
from fineserve_jax.raycluster.worker import EngineWorker

log = logging.getLogger(__name__)


def node_resource(node: str) -> str:
    """The Ray resource that pins an actor to ``node``: ``node:<ip>`` for an address,
    else the custom resource of that name."""
    try:
        ipaddress.ip_address(node)
    except ValueError:
        return node
    return f"node:{node}"


def group_device_count(g: dict) -> int:
    return len(g["devices"]) if "devices" in g else 1


def start_workers(groups: list[dict], specs: dict[str, dict], engine_config: dict, *,
                  use_gpus: bool = False, cache_dir: str | None = None,
                  log_level: str = "info", runtime_env: dict | None = None,
                  num_cpus: float = 0.0, ready_timeout_s: float = 1800.0
                  ) -> list[RemoteEngine]:
    """One ``EngineWorker`` actor per placement group (its models loaded and warmed up),
    returned as ``RemoteEngine``s once all are ready. ``specs``: model name -> serve.py
    model spec; ``engine_config``: ``EngineConfig`` fields (the group's
    ``kv_budget_bytes`` overrides that one)."""
    import ray

    actor_cls = ray.remote(EngineWorker)
    actors = []
    for i, g in enumerate(groups):
        node = g.get("node")
        n_dev = group_device_count(g)
        opts = dict(name=None, num_cpus=num_cpus, num_gpus=n_dev if use_gpus else 0,
                    max_restarts=0, max_concurrency=1000)
        if node:
            opts["resources"] = {node_resource(str(node)): 0.001}
        if runtime_env:
            opts["runtime_env"] = runtime_env
        cfg = dict(engine_config, kv_budget_bytes=g.get("kv_budget_bytes",
                                                        engine_config.get("kv_budget_bytes")))
        name = f"worker-{i}" + (f"@{node}" if node else "")
        actors.append(actor_cls.options(**opts).remote(
            name, cfg, [specs[m] for m in g["models"]], cache_dir=cache_dir,
            device_count=n_dev if use_gpus else None, log_level=log_level))
    descs = ray.get([a.describe.remote() for a in actors], timeout=ready_timeout_s)
    engines = [RemoteEngine(a, d) for a, d in zip(actors, descs)]
    stats = ray.get([a.stats.remote() for a in actors], timeout=ready_timeout_s)
    for e, st in zip(engines, stats):
        e._keep_stats(st)  # known from the start: the server's handlers never wait for it
        log.info("worker %s on node %s: %s on %s", e.worker, e.node[:12], list(e.models),
                 e.device)
    return engines


def make_rebalancer(engines: list[RemoteEngine], config, *, planned_rates=None,
                    clock=None, memory_bytes: float | None = None):
    """``server.rebalance.Rebalancer`` over the workers, worker i as device i: the global
    scheduler re-places models across nodes from observed rates, moving them through the
    workers (load on the destination's node, drain the source). A worker's memory is its
    device's limit (``memory_bytes`` overrides it), of which its KV pool is fixed; CPU
    workers report no limit and take any model's weights (``serving_device``)."""
    import time

    from fineserve_jax.server.rebalance import Rebalancer, serving_device
    from schedulers.placement import Placement

    placement = Placement.from_dict({"algorithm": "file", "devices": [
        {"device": i, "models": list(e.models), "kv_budget_bytes": e.config.kv_budget_bytes}
        for i, e in enumerate(engines)]})
    weights = sum(sum(e.description["weight_bytes"].values()) for e in engines)
    specs = {}
    for i, e in enumerate(engines):
        d = e.description
        specs[i] = serving_device(d["device_kind"], memory_bytes or d["memory_bytes"],
                                  d["pool_bytes"], weights, config.placement)
    return Rebalancer(dict(enumerate(engines)), specs, placement, config,
                      planned_rates=planned_rates, clock=clock or time.monotonic)
