"""Online correction of a step-time cost model from the steps an engine actually ran.

A cost model profiled at start (or loaded from a file) is a snapshot: the same steps can
run 10-35% slower or faster an hour later (other processes, clocks, memory placement), and
every prediction the local scheduler makes (drop, evict, cut, which model steps next)
inherits that error. ``OnlineCalibration`` wraps a ``StepCost`` and scales its predictions
by one factor per step kind, learned from the engine's step log:

    cost = OnlineCalibration(profiled, weight=0.05)
    ...
    cost.observe("prefill", chunks, contexts, measured_seconds)  # after each step
    cost.prefill_time(chunks, contexts)  # profiled prediction x learned prefill factor

Each observation moves the factor's logarithm ``weight`` of the way towards
``log(measured / predicted)`` (an exponentially weighted geometric mean, so a 2x slow step
and a 2x fast one cancel). One ratio is clamped to ``bounds`` before it counts, and so is
the factor: a stray step (a garbage-collection pause, a page fault) moves the factor by at
most ``weight * log(bounds[1])``, and a broken measurement cannot scale predictions past
the bounds. Steps whose base prediction is zero (a model without a real cost) are ignored.

``frozen()`` returns the current correction as a fixed ``ScaledCost``: what the simulator
replays a trace with, so its prediction uses what the engine had learned before the run.

Plain Python (no JAX, no NumPy); one engine loop thread calls ``observe`` and reads the
predictions, so it holds no lock.
"""

from __future__ import annotations

import math
from typing import Sequence

from schedulers.costmodel import DECODE, PREFILL, StepCost

__all__ = ["ScaledCost", "OnlineCalibration"]

KINDS = (PREFILL, DECODE)


class ScaledCost:
    """``base``'s step times times a fixed factor per step kind."""

    def __init__(self, base: StepCost, prefill: float = 1.0, decode: float = 1.0):
        for kind, f in ((PREFILL, prefill), (DECODE, decode)):
            if not (math.isfinite(f) and f > 0):
                raise ValueError(f"{kind} factor must be a positive number, got {f!r}")
        self.base = base
        self.factors = {PREFILL: float(prefill), DECODE: float(decode)}

    def prefill_time(self, chunks: Sequence[int], contexts: Sequence[int]) -> float:
        return self.base.prefill_time(chunks, contexts) * self.factors[PREFILL]

    def decode_time(self, contexts: Sequence[int]) -> float:
        return self.base.decode_time(contexts) * self.factors[DECODE]

    def __repr__(self):
        return (f"{type(self).__name__}({self.base!r}, prefill x{self.factors[PREFILL]:.3f}, "
                f"decode x{self.factors[DECODE]:.3f})")


class OnlineCalibration(ScaledCost):
    """A ``ScaledCost`` whose factors follow the measured/predicted ratio of observed steps.

    ``weight`` (0 < weight <= 1): how far one step moves the factor's logarithm towards
    its own ratio (about the last ``1 / weight`` steps of a kind count). ``bounds``: the
    range one ratio and the factor are clamped to.
    """

    def __init__(self, base: StepCost, weight: float = 0.05,
                 bounds: tuple[float, float] = (0.5, 2.0)):
        super().__init__(base)
        if not 0 < weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {weight!r}")
        lo, hi = bounds
        if not 0 < lo <= 1 <= hi < math.inf:
            raise ValueError(f"bounds must satisfy 0 < low <= 1 <= high < inf, got {bounds!r}")
        self.weight = float(weight)
        self.bounds = (float(lo), float(hi))
        self.observed = {PREFILL: 0, DECODE: 0}  # steps that counted, per kind

    def observe(self, kind: str, chunks: Sequence[int] | None, contexts: Sequence[int],
                seconds: float) -> float:
        """Count one step the engine ran (``chunks`` is ignored for decode): ``seconds``
        against the base prediction of the same batch. Returns the kind's new factor."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        pred = (self.base.decode_time(contexts) if kind == DECODE
                else self.base.prefill_time(chunks, contexts))
        if not (pred > 0 and seconds > 0 and math.isfinite(seconds)):
            return self.factors[kind]
        lo, hi = self.bounds
        ratio = min(max(seconds / pred, lo), hi)
        log_f = (1 - self.weight) * math.log(self.factors[kind]) + self.weight * math.log(ratio)
        self.factors[kind] = min(max(math.exp(log_f), lo), hi)
        self.observed[kind] += 1
        return self.factors[kind]

    def frozen(self) -> ScaledCost:
        """The correction as it stands now, fixed."""
        return ScaledCost(self.base, self.factors[PREFILL], self.factors[DECODE])
