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

One factor per kind carries the bias of whatever batches were seen last into every other
shape: factors learned while a queue drains at batch 1 then mispredict the batch-16 steps
of the next burst. So a cost model that knows the engine's compiled shapes (``ProfiledCost``
with buckets, whose ``bucket_shape`` names the shape a batch pads to) also gets one factor
per (kind, shape), learned the same way from that shape's steps alone. A shape's prediction
blends the two in log space, ``(m * log f_shape + k * log f_kind) / (m + k)``, where ``m``
is how many of that shape's steps count (at most ``1 / weight``) and ``k`` is
``shape_prior``: a shape seen once leans on the kind's factor, a shape seen often stands on
its own steps, and a shape never seen uses the kind's factor alone.

Much of what moves is the device, not the model: on a shared host every step runs slower
or faster together, prefill and decode and every model alike. ``DeviceSpeed`` is that one
factor, shared by the corrections of every model on a device (and by several engines on one
device): each step moves it ``weight`` of the way towards the step's residual (measured
over what was predicted), and the model's own factors then learn what is left, more
slowly (``OWN_SHARE`` of the weight), so that they keep the profile's error for that
model and the speed takes what the whole device does. A model that
has not stepped for minutes is predicted at the device's speed of now, from the other
models' steps, instead of the speed of its own last step:

    speed = DeviceSpeed(weight=0.05)
    a = OnlineCalibration(profiled_a, speed=speed)
    b = OnlineCalibration(profiled_b, speed=speed)  # b's predictions follow a's steps too

``frozen()`` returns the current correction as a fixed ``ScaledCost``: what the simulator
replays a trace with, so its prediction uses what the engine had learned before the run.
``ScaledCost.fit(base, steps)`` is the same kind of correction fitted to steps already run
(measured over predicted seconds, summed per kind and shape): replaying a run with it tests
the simulator's batching and queueing apart from how well the step costs were predicted.

Plain Python (no JAX, no NumPy); one engine loop thread calls a model's ``observe`` and
reads its predictions, so ``OnlineCalibration`` holds no lock; a ``DeviceSpeed`` shared by
engines (one loop thread each) takes a lock to update.
"""

from __future__ import annotations

import math
import threading
from typing import Mapping, Sequence

from schedulers.costmodel import DECODE, PREFILL, StepCost

__all__ = ["DeviceSpeed", "ScaledCost", "OnlineCalibration"]

KINDS = (PREFILL, DECODE)
OWN_SHARE = 0.25  # a model's own factors learn at this share of the weight, beside a speed


def _shape_of(base: StepCost):
    """``base.bucket_shape`` when ``base`` pads batches to compiled shapes, else None."""
    if getattr(base, "buckets", None) is None:
        return None
    return getattr(base, "bucket_shape", None)


def _check(weight: float, bounds: tuple[float, float]) -> tuple[float, tuple[float, float]]:
    if not 0 < weight <= 1:
        raise ValueError(f"weight must be in (0, 1], got {weight!r}")
    lo, hi = bounds
    if not 0 < lo <= 1 <= hi < math.inf:
        raise ValueError(f"bounds must satisfy 0 < low <= 1 <= high < inf, got {bounds!r}")
    return float(weight), (float(lo), float(hi))


class DeviceSpeed:
    """How fast a device runs now against its profiled step costs: one factor, shared by
    the ``OnlineCalibration`` of every model on the device.

    ``observe(residual)`` takes a step's ``log(measured / predicted)`` (the prediction
    already at this speed) and moves the factor's logarithm ``weight`` of the way along
    it; the factor stays within ``bounds``. Safe to share between engine threads."""

    def __init__(self, weight: float = 0.05, bounds: tuple[float, float] = (0.5, 2.0)):
        self.weight, self.bounds = _check(weight, bounds)
        self.factor = 1.0
        self.observed = 0  # steps that counted
        self._lock = threading.Lock()

    def observe(self, log_residual: float) -> float:
        """Count one step's residual; returns the new factor."""
        if not math.isfinite(log_residual):
            return self.factor
        lo, hi = self.bounds
        with self._lock:
            f = math.exp(math.log(self.factor) + self.weight * log_residual)
            self.factor = min(max(f, lo), hi)
            self.observed += 1
            return self.factor

    def __repr__(self):
        return f"DeviceSpeed(x{self.factor:.3f}, {self.observed} steps, weight {self.weight})"


class ScaledCost:
    """``base``'s step times times a fixed factor per step kind, and per (kind, shape)
    where ``shapes`` gives one (``{(kind, rows, tokens, context_blocks): factor}``, the
    shapes of ``base.bucket_shape``; other shapes take their kind's factor)."""

    def __init__(self, base: StepCost, prefill: float = 1.0, decode: float = 1.0,
                 shapes: Mapping[tuple, float] | None = None):
        for kind, f in ((PREFILL, prefill), (DECODE, decode)):
            if not (math.isfinite(f) and f > 0):
                raise ValueError(f"{kind} factor must be a positive number, got {f!r}")
        self.base = base
        self._factors = {PREFILL: float(prefill), DECODE: float(decode)}
        self._shape = _shape_of(base)
        self.shapes: dict[tuple, float] = {}
        for key, f in (shapes or {}).items():
            key = tuple(key)
            if len(key) != 4 or key[0] not in KINDS:
                raise ValueError(f"a shape key is (kind, rows, tokens, context_blocks) with "
                                 f"kind in {KINDS}, got {key!r}")
            if not (math.isfinite(f) and f > 0):
                raise ValueError(f"shape {key} factor must be a positive number, got {f!r}")
            self.shapes[(key[0], *map(int, key[1:]))] = float(f)
        if self.shapes and self._shape is None:
            raise ValueError("per-shape factors need a base cost with engine buckets "
                             "(bucket_shape)")

    @classmethod
    def fit(cls, base: StepCost, steps) -> ScaledCost:
        """The fixed correction that makes ``base`` describe measured ``steps``
        (``(kind, chunks, contexts, seconds)`` each; decode ignores ``chunks``): per kind
        and, where ``base`` has engine buckets, per compiled shape, the measured seconds
        over the predicted ones, each summed over the steps. Kinds and shapes without
        steps keep a factor of 1 (the kind's). What a replay of the steps an engine ran
        uses, as against a prediction.

        A ratio of sums and not a typical (median) ratio: a replay has to spend the time
        the engine spent. Step times are skewed to the slow side (a slow spell, a pause),
        and under load the queue carries every slow step into the next request's wait, so
        a median of the ratios replays queues that drain too soon."""
        shape_of = _shape_of(base)
        sums: dict[tuple, list[float]] = {}  # key -> [measured s, predicted s]
        for kind, chunks, contexts, seconds in steps:
            if kind not in KINDS:
                raise ValueError(f"step kind must be one of {KINDS}, got {kind!r}")
            t = base.prefill_time(chunks, contexts) if kind == PREFILL else \
                base.decode_time(contexts)
            if not (t > 0 and seconds > 0):
                continue
            keys = [(kind,)] if shape_of is None else \
                [(kind,), (kind, *shape_of(kind, chunks, contexts))]
            for key in keys:
                acc = sums.setdefault(key, [0.0, 0.0])
                acc[0] += seconds
                acc[1] += t
        fac = {k: m / p for k, (m, p) in sums.items()}
        return cls(base, fac.get((PREFILL,), 1.0), fac.get((DECODE,), 1.0),
                   {k: f for k, f in fac.items() if len(k) == 4})

    @property
    def factors(self) -> dict[str, float]:
        """The factor per step kind (``{"prefill": f, "decode": f}``)."""
        return self._factors

    def factor(self, kind: str, chunks: Sequence[int] | None, contexts: Sequence[int]) -> float:
        """The factor a batch of ``kind`` is predicted with."""
        if self.shapes:
            return self.shapes.get((kind, *self._shape(kind, chunks, contexts)),
                                   self._factors[kind])
        return self._factors[kind]

    def prefill_time(self, chunks: Sequence[int], contexts: Sequence[int]) -> float:
        t = self.base.prefill_time(chunks, contexts)
        return t * self.factor(PREFILL, chunks, contexts) if t else t

    def decode_time(self, contexts: Sequence[int]) -> float:
        t = self.base.decode_time(contexts)
        return t * self.factor(DECODE, None, contexts) if t else t

    def shape_factors(self) -> dict[str, float]:
        """The per-shape factors as JSON-friendly ``{"kind:rows:tokens:blocks": f}``."""
        return {":".join(map(str, k)): f for k, f in sorted(self.shapes.items())}

    def __repr__(self):
        return (f"{type(self).__name__}({self.base!r}, prefill x{self.factors[PREFILL]:.3f}, "
                f"decode x{self.factors[DECODE]:.3f}, {len(self.shapes)} shapes)")


class OnlineCalibration(ScaledCost):
    """A ``ScaledCost`` whose factors follow the measured/predicted ratio of observed steps.

    ``weight`` (0 < weight <= 1): how far one step moves the factor's logarithm towards
    its own ratio (about the last ``1 / weight`` steps of a kind count). ``bounds``: the
    range one ratio and the factor are clamped to. ``shape_prior`` (>= 0): how many steps
    of its own a compiled shape needs before its factor counts as much as its kind's
    (0: a shape's own factor alone once it has a step; ``None``: per-kind factors only).
    ``speed``: a ``DeviceSpeed`` shared with the other models on the device; each step
    moves it first, and this model's factors learn the ratio left over (predictions are
    the profile x the device's speed x this model's factor). ``None``: this model's
    factors alone. ``own_weight``: the weight of this model's own factors when the speed
    is shared (default ``weight * OWN_SHARE``): slower than the speed, so that what the
    whole device does goes to the speed, which every model reads, and a model's factors
    keep what is its own (the profile's error for it) instead of a share of whatever phase
    the device was in when the model last ran.
    """

    def __init__(self, base: StepCost, weight: float = 0.05,
                 bounds: tuple[float, float] = (0.5, 2.0), shape_prior: float | None = 4.0,
                 speed: DeviceSpeed | None = None, own_weight: float | None = None):
        super().__init__(base)
        self.weight, self.bounds = _check(weight, bounds)
        if own_weight is None:
            own_weight = weight * OWN_SHARE if speed is not None else weight
        self.own_weight, _ = _check(own_weight, bounds)
        if shape_prior is not None and not (math.isfinite(shape_prior) and shape_prior >= 0):
            raise ValueError(f"shape_prior must be a number >= 0 or None, got {shape_prior!r}")
        if speed is not None and not isinstance(speed, DeviceSpeed):
            raise TypeError(f"speed must be a DeviceSpeed or None, got {type(speed).__name__}")
        self.shape_prior = None if shape_prior is None else float(shape_prior)
        self.speed = speed
        self.observed = {PREFILL: 0, DECODE: 0}  # steps that counted, per kind
        self._shape_log: dict[tuple, list] = {}  # (kind, *shape) -> [log factor, steps]

    def _clamp(self, f: float) -> float:
        lo, hi = self.bounds
        return min(max(f, lo), hi)

    @property
    def factors(self) -> dict[str, float]:
        """The factor per step kind that predictions use: this model's own times the
        device's speed (when shared)."""
        if self.speed is None:
            return self._factors
        s = self.speed.factor
        return {k: self._clamp(f * s) for k, f in self._factors.items()}

    def _blend(self, kind: str, log_shape: float, n: int) -> float:
        m = min(n, 1.0 / self.own_weight)
        log_kind = math.log(self._factors[kind])
        log_f = (m * log_shape + self.shape_prior * log_kind) / (m + self.shape_prior) \
            if m + self.shape_prior > 0 else log_kind
        return self._clamp(math.exp(log_f))

    def _key(self, kind: str, chunks: Sequence[int] | None, contexts: Sequence[int]):
        """The (kind, *compiled shape) a batch's own factor is kept under; None when
        per-shape factors are off."""
        if self.shape_prior is None or self._shape is None:
            return None
        return (kind, *self._shape(kind, chunks, contexts))

    def _own(self, kind: str, key) -> float:
        """This model's factor for a batch (its shape's blend, else its kind's)."""
        got = self._shape_log.get(key) if key is not None else None
        return self._factors[kind] if got is None else self._blend(kind, got[0], got[1])

    def _scaled(self, f: float) -> float:
        return f if self.speed is None else self._clamp(f * self.speed.factor)

    def factor(self, kind: str, chunks: Sequence[int] | None, contexts: Sequence[int]) -> float:
        key = self._key(kind, chunks, contexts) if self._shape_log else None
        return self._scaled(self._own(kind, key))

    def observe(self, kind: str, chunks: Sequence[int] | None, contexts: Sequence[int],
                seconds: float) -> float:
        """Count one step the engine ran (``chunks`` is ignored for decode): ``seconds``
        against the base prediction of the same batch. Returns the kind's new factor."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        pred = (self.base.decode_time(contexts) if kind == DECODE
                else self.base.prefill_time(chunks, contexts))
        if not (pred > 0 and seconds > 0 and math.isfinite(seconds)):
            return self._scaled(self._factors[kind])
        log_r = math.log(self._clamp(seconds / pred))
        key = self._key(kind, chunks, contexts)
        if self.speed is not None:  # the device's share first, this model's the rest
            used = self._scaled(self._own(kind, key))
            log_r -= math.log(self.speed.observe(log_r - math.log(used)))
        w = self.own_weight
        log_f = (1 - w) * math.log(self._factors[kind]) + w * log_r
        self._factors[kind] = self._clamp(math.exp(log_f))
        self.observed[kind] += 1
        if key is not None:
            got = self._shape_log.setdefault(key, [0.0, 0])
            got[1] += 1
            w = max(self.own_weight, 1.0 / got[1])  # a plain mean until 1 / weight steps
            got[0] = (1 - w) * got[0] + w * log_r
        return self._scaled(self._factors[kind])

    def frozen(self) -> ScaledCost:
        """The correction as it stands now, fixed (each seen shape's blended factor, and
        the device's speed of now)."""
        shapes = {k: self._scaled(self._blend(k[0], lf, n))
                  for k, (lf, n) in self._shape_log.items()}
        f = self.factors
        return ScaledCost(self.base, f[PREFILL], f[DECODE], shapes)
