"""The engine's introspection snapshot, for notebooks, logs and the server's metrics."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineModelStats:
    name: str
    precision: str
    kv_format: str
    waiting: int  # queued, not admitted (preempted ones included)
    running: int  # admitted: prefilling or decoding
    prefilling: int
    preempted_waiting: int  # waiting because they were preempted
    preemptions: int  # total since start
    finished: int
    aborted: int
    dropped: int  # shed by the local scheduler (SLO) or Engine.drop
    failed: int
    steps: int  # engine steps this model ran
    tokens_generated: int
    peak_running: int
    blocks_held: int
    blocks_moved: int  # relocated by KV Slab compaction (to free slabs for other models)
    slo_misses: int = 0  # requests the local scheduler judged unable to meet the TTFT SLO
    # Online correction of the cost model (measured / predicted step time, per step kind).
    cost_scale_prefill: float = 1.0
    cost_scale_decode: float = 1.0


@dataclass(frozen=True)
class EngineStats:
    models: dict[str, EngineModelStats]
    pool: object  # kvslab PoolStats (None before start)
    iterations: int
    compiled_steps: int  # step traces so far: constant after warm-up

    def to_dict(self) -> dict:
        return {"models": {k: dataclasses.asdict(v) for k, v in self.models.items()},
                "pool": self.pool.to_dict() if self.pool is not None else None,
                "iterations": self.iterations, "compiled_steps": self.compiled_steps}

    def __repr__(self):
        lines = [f"EngineStats(iterations={self.iterations}, compiled_steps={self.compiled_steps})"]
        for m in self.models.values():
            lines.append(f"  {m.name} [{m.precision}, KV {m.kv_format}]: waiting={m.waiting} "
                         f"running={m.running} (prefilling {m.prefilling}) "
                         f"preempted={m.preempted_waiting}/{m.preemptions} finished={m.finished} "
                         f"aborted={m.aborted} blocks={m.blocks_held}")
        if self.pool is not None:
            lines.append("  " + repr(self.pool).replace("\n", "\n  "))
        return "\n".join(lines)
