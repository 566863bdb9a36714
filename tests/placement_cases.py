"""Hand-computable placement cases shared by the placement tests: a linear step cost,
a device, a model's demand and a parallelism plan."""

from __future__ import annotations

from schedulers.placement import ModelDemand, ParallelPlan, PlacementConfig
from schedulers.roofline import DeviceSpec

GB = 1e9


class LinearCost:
    """A step cost with hand-computable times: decode ``a + b * rows`` (+ per context
    token), prefill ``p`` per prompt token; ``tp`` divides everything but ``a``."""

    def __init__(self, a=0.01, b=0.001, p=0.1 / 100, per_ctx=0.0, tp=1):
        self.a, self.b, self.p, self.per_ctx, self.tp = a, b, p, per_ctx, tp

    def decode_time(self, contexts):
        return self.a + (self.b * len(contexts) + self.per_ctx * sum(contexts)) / self.tp

    def prefill_time(self, chunks, contexts):
        return self.a + self.p * sum(chunks) / self.tp


def device(mem_gb=100.0, name="gpu"):
    return DeviceSpec(name, mem_gb * GB, 1e12, 1e15, 2e15, 1e11)


def demand(name, weights_gb=10.0, kv_per_token=1e5, rate=1.0, prompt=99, output=2,
           ttft=1.0, tpot=0.05, block_bytes=None, **cost_kw):
    return ModelDemand(name, "bf16", weights_gb * GB, kv_per_token, rate, prompt, output,
                       ttft, tpot, cost=lambda tp: LinearCost(tp=tp, **cost_kw),
                       block_bytes=block_bytes)


NO_RESERVE = PlacementConfig(reserve_fraction=0.0)


def plan(tp=1, replicas=1, conc=10, util=0.1):
    return ParallelPlan(tp, replicas, max(conc, 1), 1, conc, util)
