"""Re-placement while serving: when observed request rates drift, plan a new placement
and the model moves that reach it from the current one.

Plain Python (no JAX); the server's ``Rebalancer`` (``fineserve_jax.server.rebalance``)
drives it:

- ``RateTracker``: arrivals per model over a sliding window (explicit timestamps, so it is
  tested and simulated without clocks), plus the mean prompt and output lengths of
  recently finished requests;
- ``drifted``: whether any model's observed rate moved more than a relative threshold from
  the rate the current placement was planned for;
- ``replan``: the global scheduler (``plan_parallelism`` + ``place_slab_greedy``) run again
  with the observed rates, one replica per model on single devices (``ServingDevice``s
  when the engines' pools are fixed: weights only where they fit beside a pool), its
  device groups then relabelled onto the current ones (``align``) so that interchangeable
  devices do not turn a no-op into a reshuffle;
- ``overloaded``: why the current placement no longer admits the observed rates (empty
  when it still does: a re-plan would move models for nothing); ``replan_if_needed``
  puts the two together, as the server and ``DriftPolicy`` decide;
- ``plan_moves``: the models whose device group changes, in an order where a move into a
  device comes after the moves out of it (they free its memory first);
- ``MoveSchedule``: which of the planned moves can run now beside the ones running (a move
  starts when its destination has room for its weights), so that moves run at once;
- ``DriftPolicy``: the server's decision (track rates, check drift, re-plan, plan moves)
  without engines, for the simulator (``schedulers.simulator.simulate(replacer=...)``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from schedulers.placement import (
    Device,
    ModelDemand,
    Placement,
    PlacementConfig,
    PlacementGroup,
    device_key,
    place_slab_greedy,
    plan_parallelism,
    still_fits,
)
from schedulers.planning import pool_bytes


@dataclass(frozen=True)
class ServingDevice:
    """A device that already runs an engine, as the global scheduler sees it when it
    re-places: ``memory_bytes`` in all, of which ``kv_pool_bytes`` is the engine's KV pool,
    allocated at start and fixed (models move between fixed pools, so the weights a
    placement puts there must fit in the rest)."""

    name: str
    memory_bytes: float
    kv_pool_bytes: float

    def __post_init__(self):
        if not (self.memory_bytes > 0 and 0 <= self.kv_pool_bytes <= self.memory_bytes):
            raise ValueError(f"device {self.name!r}: need 0 <= kv_pool_bytes <= memory_bytes "
                             f"> 0, got {self.kv_pool_bytes!r} of {self.memory_bytes!r}")


# ------------------------------------------------------------------------ rates
class RateTracker:
    """Per-model arrival rates over the last ``window_s`` seconds.

    ``record(model, t)`` counts one accepted request at time ``t`` (seconds on any clock,
    non-decreasing per model); ``rates(now)`` divides the arrivals in ``(now - window_s,
    now]`` by the window, or by the time since ``start`` while that is shorter (so the
    first minute of a server is not read as a fraction of its traffic).
    ``observe_lengths`` keeps the last ``length_samples`` finished requests' prompt and
    output token counts per model, which the planner uses as mean lengths. ``first`` is
    the time of the first arrival recorded (None before it).
    """

    def __init__(self, window_s: float = 60.0, start: float = 0.0, length_samples: int = 256):
        if not (window_s > 0 and math.isfinite(window_s)):
            raise ValueError(f"window_s must be a positive number of seconds, got {window_s!r}")
        if length_samples < 1:
            raise ValueError(f"length_samples must be >= 1, got {length_samples!r}")
        self.window_s = float(window_s)
        self.start = float(start)
        self.first: float | None = None
        self._arrivals: dict[str, deque[float]] = {}
        self._last: dict[str, float] = {}  # latest arrival per model, kept after pruning
        self._lengths: dict[str, deque[tuple[int, int]]] = {}
        self._length_samples = length_samples

    def record(self, model: str, t: float) -> None:
        last = self._last.get(model, -math.inf)
        if t < last:
            raise ValueError(f"arrival of {model!r} at {t} is before the previous one "
                             f"({last}); times must not go back")
        self._arrivals.setdefault(model, deque()).append(float(t))
        self._last[model] = float(t)
        if self.first is None:
            self.first = float(t)

    def observe_lengths(self, model: str, prompt_tokens: int, output_tokens: int) -> None:
        q = self._lengths.setdefault(model, deque(maxlen=self._length_samples))
        q.append((int(prompt_tokens), int(output_tokens)))

    def _prune(self, now: float) -> None:
        lo = now - self.window_s
        for q in self._arrivals.values():
            while q and q[0] <= lo:
                q.popleft()

    def rates(self, now: float) -> dict[str, float]:
        """Requests per second of every model seen so far (0.0 when none in the window)."""
        self._prune(now)
        span = min(self.window_s, now - self.start)
        if span <= 0:
            return {m: 0.0 for m in self._arrivals}
        return {m: sum(1 for t in q if t <= now) / span for m, q in self._arrivals.items()}

    def mean_lengths(self, model: str) -> tuple[float, float] | None:
        """(mean prompt tokens, mean output tokens) of the recent finished requests, or
        None before the first one finished."""
        q = self._lengths.get(model)
        if not q:
            return None
        return (sum(p for p, _ in q) / len(q), sum(o for _, o in q) / len(q))


def drift(planned: Mapping[str, float], observed: Mapping[str, float],
          min_rate: float = 0.0) -> dict[str, float]:
    """Relative rate change per model, ``|observed - planned| / max(planned, min_rate)``,
    over the models of either map (a missing rate is 0). Models below ``min_rate`` in both
    are left out (noise); a model planned at 0 that now has traffic drifts infinitely when
    ``min_rate`` is 0."""
    if min_rate < 0:
        raise ValueError(f"min_rate must be >= 0, got {min_rate}")
    out = {}
    for m in sorted(set(planned) | set(observed)):
        p, o = float(planned.get(m, 0.0)), float(observed.get(m, 0.0))
        if max(p, o) <= min_rate:
            continue
        base = max(p, min_rate)
        out[m] = abs(o - p) / base if base > 0 else math.inf
    return out


def drifted(planned: Mapping[str, float], observed: Mapping[str, float], threshold: float,
            min_rate: float = 0.0) -> bool:
    """True when some model's rate moved by more than ``threshold`` (relative, e.g. 0.5 =
    50%) from its planned rate (see ``drift``)."""
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold!r}")
    return any(d > threshold for d in drift(planned, observed, min_rate).values())


# --------------------------------------------------------------------- planning
class FreeSteps:
    """A step cost of zero: for models without a cost model, placement then weighs their
    memory (weights and the KV their rate needs) and not their compute."""

    def prefill_time(self, chunks, contexts) -> float:
        return 0.0

    def decode_time(self, contexts) -> float:
        return 0.0


def single_replica_plans(demands: Sequence[ModelDemand], device: Device,
                         config: PlacementConfig) -> dict:
    """Each model's plan at tp 1 with one replica: a rate that would need several replicas
    takes that many replicas' compute (capped at ``config.headroom``)."""
    plans = {}
    for d in demands:
        p = plan_parallelism(d, device, (1,), config)
        if p.replicas > 1:
            p = replace(p, replicas=1, utilisation=min(config.headroom,
                                                       p.utilisation * p.replicas))
        plans[d.name] = p
    return plans


def overloaded(demands: Sequence[ModelDemand], devices: Sequence[Device], current: Placement,
               config: PlacementConfig | None = None) -> list[str]:
    """Why ``current`` no longer serves ``demands`` at their rates (``still_fits`` on the
    plans ``replan`` would make); empty when it still does, so a re-plan can only move
    models for nothing."""
    config = config or PlacementConfig()
    plans = single_replica_plans(demands, devices[0], config)
    return still_fits(demands, plans, devices, current, config)


def replan_if_needed(demands: Sequence[ModelDemand], devices: Sequence[Device],
                     current: Placement, config: PlacementConfig | None = None,
                     weights: Mapping[str, float] | None = None,
                     keep_if_fits: bool = True) -> tuple[Placement | None, str]:
    """The decision once rates drifted past the threshold: ``(new placement, "")``, or
    ``(None, why current stays)``: it still admits the rates (with ``keep_if_fits``), or
    the new plan leaves a model unplaced."""
    if keep_if_fits and not overloaded(demands, devices, current, config):
        return None, "drift past the threshold, but the current placement still fits"
    new = replan(demands, devices, current, config, weights)
    if new.unplaced:
        return None, ("the new placement leaves " + "; ".join(u.reason for u in new.unplaced)
                      + " unplaced: keeping the current one")
    return new, ""


def replan(demands: Sequence[ModelDemand], devices: Sequence[Device], current: Placement,
           config: PlacementConfig | None = None,
           weights: Mapping[str, float] | None = None) -> Placement:
    """A new placement of ``demands`` on ``devices`` (indices as in ``current``).

    This server runs one replica per model on one device: parallelism is planned at
    tp = 1 only, and a model whose rate would need several replicas is planned as one
    that takes that many replicas' compute (capped at ``config.headroom``). Placement is
    ``place_slab_greedy``; its groups are then relabelled onto ``current``'s devices by
    ``align`` (moving ``weights`` bytes, default 1 per model, as little as it can).
    ``config`` defaults to ``PlacementConfig()``."""
    config = config or PlacementConfig()
    plans = single_replica_plans(demands, devices[0], config)
    new = place_slab_greedy(demands, plans, devices, config)
    kinds = [device_key(dev) for dev in devices]
    return align(current, new, kinds, weights)


def align(old: Placement, new: Placement, kinds: Sequence | None = None,
          weights: Mapping[str, float] | None = None) -> Placement:
    """``new`` with its single-device groups moved onto other devices of the same kind
    (``kinds[i]``: any comparable description of device i; default all alike) so that
    the most model weight stays where ``old`` has it. Greedy by kept weight, ties to
    keeping a group on its own device, then to lower indices; groups of tp > 1 and
    devices they use stay as they are."""
    w = (lambda m: 1.0) if weights is None else (lambda m: float(weights.get(m, 1.0)))
    at = {g.devices[0]: set(g.models) for g in old.groups if g.tp == 1}
    singles = [g for g in new.groups if g.tp == 1]
    fixed = {i for g in new.groups if g.tp > 1 for i in g.devices}
    fixed |= {i for g in old.groups if g.tp > 1 for i in g.devices}
    kind = (lambda i: None) if kinds is None else (lambda i: kinds[i])
    free = sorted(set(at) | {g.devices[0] for g in singles})
    free = [i for i in free if i not in fixed]
    pairs = []
    for g in singles:
        src = g.devices[0]
        for d in free:
            if kind(d) != kind(src):
                continue
            kept = sum(w(m) for m in g.models if m in at.get(d, ()))
            pairs.append((-kept, d != src, src, d))
    pairs.sort()
    target: dict[int, int] = {}
    taken: set[int] = set()
    for _, _, src, d in pairs:
        if src not in target and d not in taken:
            target[src] = d
            taken.add(d)
    out = []
    for g in new.groups:
        if g.tp == 1:
            g = replace(g, devices=(target.get(g.devices[0], g.devices[0]),))
        out.append(g)
    return replace(new, groups=tuple(sorted(out, key=lambda g: g.devices)))


# ------------------------------------------------------------------------ moves
@dataclass(frozen=True)
class Move:
    """Serve ``model`` on ``dst_group`` instead of ``src_group`` (device index tuples)."""

    model: str
    src_group: tuple[int, ...]
    dst_group: tuple[int, ...]

    def __str__(self):
        return f"{self.model}: {list(self.src_group)} -> {list(self.dst_group)}"


def _group_of(p: Placement, what: str) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for g in p.groups:
        for m in g.models:
            if m in out:
                raise ValueError(f"{what} placement has model {m!r} on {list(out[m])} and "
                                 f"{list(g.devices)}; moves are planned for one replica each")
            out[m] = g.devices
    return out


def plan_moves(old: Placement, new: Placement) -> list[Move]:
    """The moves from ``old`` to ``new``: every model whose device group differs (models
    placed in only one of them are not moves). Order: a move into a group runs after the
    pending moves out of that group (which free its memory), ties and cycles by model
    name, so the list is deterministic."""
    before, after = _group_of(old, "old"), _group_of(new, "new")
    pending = sorted((Move(m, before[m], after[m]) for m in before
                      if m in after and before[m] != after[m]), key=lambda mv: mv.model)
    out: list[Move] = []
    while pending:
        leaving = {mv.src_group for mv in pending}
        ready = [mv for mv in pending if mv.dst_group not in leaving]
        nxt = ready[0] if ready else pending[0]  # a cycle: the first name goes first
        out.append(nxt)
        pending.remove(nxt)
    return out


class MoveSchedule:
    """Which moves of one re-plan may run at once, as they start and end.

    ``moves`` in ``plan_moves`` order; ``placement``: where the models are when the
    first one starts (single-device groups); ``weights``: each model's weight bytes;
    ``room``: per device index, the bytes weights may take there (beside a fixed KV
    pool). A move starts once its destination has room for its weights beside what the
    device holds: the models placed there, the ones moving in, and the ones moving out
    until their source has drained. Without ``weights`` and ``room`` for a move, it
    starts once no move out of its destination is pending or running (``plan_moves``
    puts those first because they free the memory). Moves into different devices, or
    into a device with room, run at once: a re-plan takes about one load and one drain
    rather than one of each per move. When nothing runs and nothing can start (models
    swapping devices wait on each other), the first pending move starts, as
    ``plan_moves`` orders a cycle; its destination may refuse it.

    A destination may still refuse a move that had room for its weights: its KV pool
    cannot reserve the model's blocks while a model leaving it still holds its own.
    ``retry`` then puts the move back, to start once the moves out of that destination
    have ended (once; a second refusal ends it).

        plan = MoveSchedule(moves, placement, weights, room)
        while not plan.finished:
            for mv in plan.start(): ...             # begin these moves
            ...; plan.end(mv, moved=True)           # one drained (or failed: False)
    """

    def __init__(self, moves: Sequence[Move], placement: Placement | None = None,
                 weights: Mapping[str, float] | None = None,
                 room: Mapping[int, float] | None = None):
        self.pending: list[Move] = list(moves)
        self.running: list[Move] = []
        self.weights = dict(weights or {})
        self.room = dict(room or {})
        self.held: dict[int, float] = {}
        self.retried: set[Move] = set()  # refused once: waits for the moves out of its dst
        for g in (placement.groups if placement is not None else ()):
            for m in g.models:
                self.held[g.devices[0]] = self.held.get(g.devices[0], 0.0) + self.weights.get(
                    m, 0.0)

    @property
    def finished(self) -> bool:
        return not self.pending and not self.running

    def _leaving(self, mv: Move) -> bool:
        """Whether a move out of ``mv``'s destination is pending or running."""
        return any(m.src_group == mv.dst_group for m in (*self.pending, *self.running)
                   if m is not mv)

    def _can_start(self, mv: Move) -> bool:
        if mv in self.retried:
            return not self._leaving(mv)
        dst = mv.dst_group[0]
        if mv.model in self.weights and dst in self.room:
            return self.held.get(dst, 0.0) + self.weights[mv.model] <= self.room[dst] * (
                1 + 1e-9)
        return all(m.src_group != mv.dst_group for m in (*self.pending, *self.running))

    def _run(self, mv: Move) -> None:
        self.pending.remove(mv)
        self.running.append(mv)
        dst = mv.dst_group[0]
        self.held[dst] = self.held.get(dst, 0.0) + self.weights.get(mv.model, 0.0)

    def start(self) -> list[Move]:
        """The pending moves that can start now, in order; they count as running."""
        out = []
        for mv in list(self.pending):
            if self._can_start(mv):
                self._run(mv)
                out.append(mv)
        if not out and not self.running and self.pending:
            out.append(self.pending[0])
            self._run(out[0])
        return out

    def retry(self, mv: Move) -> bool:
        """Running ``mv`` was refused by its destination. If a move out of that
        destination is pending or running (and ``mv`` was not retried before), ``mv``
        goes back to pending, to start once those have ended: True. Otherwise it ends,
        not moved: False."""
        again = mv not in self.retried and self._leaving(mv)
        self.end(mv, moved=False)
        if again:
            self.retried.add(mv)
            self.pending.append(mv)
        return again

    def end(self, mv: Move, moved: bool | None) -> None:
        """``mv`` ended: ``moved`` (its source drained: the memory there is free), not
        (skipped or refused: what it took on the destination is free again), or None
        (failed part-way: both sides stay counted)."""
        self.running.remove(mv)
        if moved is not None:
            side = mv.src_group[0] if moved else mv.dst_group[0]
            self.held[side] = self.held.get(side, 0.0) - self.weights.get(mv.model, 0.0)


def weight_room(devices: Mapping[int, Device], config: PlacementConfig) -> dict[int, float]:
    """Per device index, the bytes weights may take beside its fixed KV pool (devices
    without a fixed pool are left out: their KV competes for the same memory)."""
    out = {}
    for i, dev in devices.items():
        pool = pool_bytes(dev)
        if pool is not None:
            out[i] = config.usable_bytes(dev) - pool
    return out


def apply_move(p: Placement, mv: Move) -> Placement:
    """``p`` with ``mv.model`` taken off its source group and put on its destination (a
    group on new devices is created, one left empty is dropped); budgets unchanged."""
    groups = []
    seen_dst = False
    for g in p.groups:
        models = tuple(m for m in g.models if m != mv.model)
        if g.devices == mv.dst_group:
            models += (mv.model,)
            seen_dst = True
        if models:
            groups.append(replace(g, models=models))
    if not seen_dst:
        groups.append(PlacementGroup(mv.dst_group, len(mv.dst_group), (mv.model,), 0))
    return replace(p, groups=tuple(sorted(groups, key=lambda g: g.devices)))


# ----------------------------------------------------------- policy, simulated
class DriftPolicy:
    """When and where to move models, as the server's ``Rebalancer`` decides it, for a
    simulation (``schedulers.simulator.Replacer``).

    ``placement``: what is served at the start (one replica per model on single devices,
    indices into ``devices``); ``demand(name, rate)``: the model's ``ModelDemand`` at that
    rate; ``planned_rates``: the rates ``placement`` was made for. Every ``interval_s`` the
    window's rates (``RateTracker``) are compared with the planned ones; past
    ``threshold`` (``drifted``, ignoring models below ``min_rate``) the global scheduler
    runs again (``replan``) and its moves (``plan_moves``) are returned, unless
    (``keep_if_fits``) the current placement still admits every model at the observed
    rates (``overloaded`` finds nothing): moving then buys nothing. A plan that leaves a
    model unplaced is not used. ``load_s(name, group)``: seconds before a moved
    model serves on its destination (weights and compilation). ``decisions`` logs every
    check: time, observed rates, action, moves.
    """

    def __init__(self, placement: Placement, devices: Sequence[Device],
                 demand, planned_rates: Mapping[str, float], load_s, *,
                 interval_s: float = 60.0, threshold: float = 0.5, window_s: float = 60.0,
                 min_rate: float = 0.05, config: PlacementConfig | None = None,
                 weights: Mapping[str, float] | None = None, keep_if_fits: bool = True):
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        _group_of(placement, "the starting")  # one replica per model
        self.placement = placement
        self.devices = list(devices)
        self.demand = demand
        self.planned = dict(planned_rates)
        self._load_s = load_s
        self.interval_s = float(interval_s)
        self.threshold, self.min_rate = float(threshold), float(min_rate)
        self.config = config or PlacementConfig()
        self.weights = dict(weights) if weights is not None else None
        self.keep_if_fits = keep_if_fits
        self.tracker = RateTracker(window_s)
        self.decisions: list[dict] = []

    def observe(self, model: str, t: float) -> None:
        self.tracker.record(model, t)

    def load_s(self, model: str, group) -> float:
        return float(self._load_s(model, group))

    def check(self, now: float) -> list[Move]:
        served = sorted(m for g in self.placement.groups for m in g.models)
        rates = self.tracker.rates(now)
        observed = {m: rates.get(m, 0.0) for m in served}
        dec = {"at": now, "observed": observed, "action": "none", "moves": []}
        self.decisions.append(dec)
        if not drifted(self.planned, observed, self.threshold, self.min_rate):
            return []
        new, why = replan_if_needed([self.demand(m, observed[m]) for m in served],
                                    self.devices, self.placement, self.config, self.weights,
                                    self.keep_if_fits)
        if new is None:
            dec["action"] = f"kept: {why}"
            return []
        moves = plan_moves(self.placement, new)
        self.planned = observed
        dec["action"], dec["moves"] = "replanned", [str(m) for m in moves]
        return moves

    def schedule(self, moves: Sequence[Move]) -> MoveSchedule:
        """How ``moves`` (from ``check``) run: ``MoveSchedule`` over the placement they
        start from, the model weights and the devices' room beside their pools."""
        return MoveSchedule(moves, self.placement, self.weights,
                            weight_room(dict(enumerate(self.devices)), self.config))

    def done(self, move: Move, outcome: str, now: float) -> None:
        if outcome == "moved":
            self.placement = apply_move(self.placement, move)

