"""The engine's compiled step shapes and what they cost.

``CompiledSteps`` is a part of ``Engine`` (a mixin, as ``engine.live.LiveModels`` is):

- ``warmup`` compiles every (rows, tokens, page-table width) bucket of every model, with
  the samplers and log-probability functions, so nothing compiles while serving;
- ``profile_costs`` times every bucket on the engine's own pool
  (``engine.profile.measure_steps``) and makes the result the model's cost model;
- the local scheduler predicts with that cost model corrected online from the steps the
  engine runs (``schedulers.calibration.OnlineCalibration``, weight
  ``EngineConfig.cost_calibration``; one factor for the device's speed, shared by its
  models (``Engine.speed``), then one per step kind and one per compiled shape);
  ``cost_factors`` reads the per-kind correction, ``cost_snapshot`` the whole of it fixed.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np

from fineserve_jax.engine.runner import LOGPROBS, StepBatch
from fineserve_jax.sampling import FILTERED, GREEDY, RANDOM, SamplingArrays

log = logging.getLogger(__name__)


class CompiledSteps:
    """Warm-up, step profiling and the scheduler's cost model of an ``Engine``."""

    def warmup(self) -> None:
        """Compile every (rows, tokens, context) bucket of every model."""
        t0 = time.perf_counter()
        shapes = sum(len(list(m.buckets.shapes())) for m in self._models.values())
        log.info("warm-up: compiling %d step shapes of %d models", shapes, len(self._models))
        for m in self._models.values():
            for (B, T, P) in m.buckets.shapes():
                for mode in ((GREEDY, RANDOM, FILTERED) if P == m.buckets.context[0] else
                             (GREEDY,)):  # samplers depend on B only
                    batch = StepBatch(np.zeros((B, T), np.int32), np.full((B, T), -1, np.int32),
                                      np.zeros(B, np.int32), np.zeros((B, P), np.int32),
                                      np.zeros(B, np.int32), SamplingArrays.build([], [], [], B),
                                      mode)
                    nxt, self.pool, aux = m.runner.step(self.pool, batch)
                if P != m.buckets.context[0]:
                    continue
                # Log-probabilities: per batch size, and per prefill (rows, tokens).
                LOGPROBS.fn(aux.logits, nxt)
                if T > 1:
                    m.runner.prompt_logprobs(aux, np.zeros((B, T), np.int32))
            nxt.block_until_ready()
        self.pool = self._mover.warmup(self.pool, [self.alloc.fmt(n).block_bytes
                                                   for n in self._models])
        self.warmup_seconds = time.perf_counter() - t0

    def profile_costs(self, reps: int = 5, models: Sequence[str] | None = None) -> dict:
        """Time every compiled step shape of ``models`` (default: all) on this engine's
        pool and make the result their cost model (``ProfiledCost``), which the local
        scheduler predicts with. Call on a started engine before its loop thread runs
        (``start`` does this for models that have SLOs and no cost model)."""
        from fineserve_jax.engine.profile import measure_steps
        from schedulers.costmodel import EngineBuckets, ProfiledCost

        t0 = time.perf_counter()
        names = list(models or self._models)
        records = measure_steps(self, reps=reps, models=names)
        out = {}
        for name in names:
            m = self._models[name]
            bk = m.buckets
            pts = [r for r in records if r["model"] == name]
            m.cost = ProfiledCost(pts, EngineBuckets(
                self.config.block_tokens, bk.decode, bk.prefill_rows, bk.chunks, bk.context))
            m.sched.cost = self._scheduler_cost(m.cost)
            out[name] = m.cost
        log.info("profiled %d step shapes of %s in %.1f s", len(records), names,
                 time.perf_counter() - t0)
        return out

    def _scheduler_cost(self, cost):
        """What the local scheduler predicts with: ``cost`` itself, or with
        ``cost_calibration`` on, ``cost`` corrected online from the steps this engine runs.
        ``_Model.cost`` keeps the uncorrected one (what ``model_spec`` hands on)."""
        if cost is None or not self.config.cost_calibration:
            return cost
        from schedulers.calibration import OnlineCalibration
        return OnlineCalibration(cost, weight=self.config.cost_calibration, speed=self.speed)

    def cost_snapshot(self, name: str):
        """What the scheduler predicts a model's steps with, fixed as it stands now: a
        ``ScaledCost`` of the profile and the correction learned so far, per kind and per
        compiled shape (factors of 1 when the correction is off); None without a cost
        model."""
        from schedulers.calibration import ScaledCost
        sched = self._model(name).sched
        cost = sched.cost if sched is not None else None
        if cost is None:
            return None
        frozen = getattr(cost, "frozen", None)
        return frozen() if frozen is not None else ScaledCost(cost)

    def cost_factors(self, name: str) -> dict[str, float]:
        """The online correction of a model's cost model: measured/predicted step time
        per step kind as it stands (1.0 each when off or not yet observed)."""
        sched = self._model(name).sched
        factors = getattr(sched.cost if sched is not None else None, "factors", None)
        return dict(factors or {"prefill": 1.0, "decode": 1.0})
