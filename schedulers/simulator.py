"""Discrete-event simulation of a cluster serving many models, driven by step-cost models.

Plain Python (no JAX). Each device group (one device, or ``tp`` devices running their
models tensor-parallel) runs the engine's own host loop (``fineserve_jax.engine.Engine``)
over the *same* objects the engine uses: one KV allocator (``engine.alloc.make_allocator``)
shared by the group's models, a ``schedulers.batching.ModelScheduler`` per model and the
group's local scheduler (``schedulers.local``). Only the model is not run: a step's
duration comes from the model's ``StepCost`` on that group (``schedulers.costmodel``).

One iteration of a group at simulated time ``t`` (``Engine.step``):

1. requests that arrived up to ``t`` are in their models' queues (routed on arrival);
2. ``next_step(scheds, t)`` picks the model and its batch (blocks allocated; KV Slab may
   compact other models' slabs to make room, as ``Engine._reclaim`` does); requests it
   shed finish as *dropped* at ``t``;
3. nothing runnable: if no sequence of the group holds KV, the head request of every
   model with waiting work can never fit and *fails* (``Engine._fail_unschedulable``),
   and the group tries again; otherwise the group idles until its next arrival;
4. the step runs for ``prefill_time(chunks, contexts)`` or ``decode_time(contexts)``
   seconds (contexts: tokens in KV after the step);
5. at its end (``Engine._postprocess``): every row that completes its feed samples a
   token (the first one sets the first-token time), and a request that has generated its
   trace's output length finishes and frees its blocks. Preemption (recompute) happens
   inside ``ModelScheduler`` exactly as in the engine.

Groups advance together on one event queue (step ends, then arrivals, at equal times),
so routing sees every replica's state at the arrival time. A request for a model with
several replicas goes to the replica with the least outstanding work: the fewest tokens
of that model still to feed there (prompt tokens not in KV plus outputs not generated),
then the fewest outstanding requests of the whole group, then the first group listed.
A request for a model no group serves is a miss (``unplaced``), as is one whose prompt
plus output can never fit its model's share of the pool (``failed`` on arrival, as the
engine's ``submit`` rejects it).

``simulate`` returns a ``SimResult``: one ``RequestRecord`` per trace request and per-group
counters; ``SimResult.metrics()`` gives SLO attainment (requests meeting both SLOs over
all requests; dropped, failed, unplaced and unfinished ones are misses), output tokens/s,
TTFT / TPOT percentiles, drops and preemptions, overall and per model.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fineserve_jax.engine.alloc import make_allocator
from fineserve_jax.kvslab import BlockFormat, StaticPartitionAllocator, choose_slab_bytes
from schedulers.batching import (
    DECODE,
    SLO,
    BatchLimits,
    ModelScheduler,
    RequestMetrics,
    Scheduled,
    Seq,
    moves_by_model,
)
from schedulers.local import make_local_scheduler
from schedulers.moving import MoveRecord, Replacer, SimMoves
from schedulers.workload import Request

FINISHED, DROPPED, FAILED, UNPLACED, UNFINISHED = (
    "finished", "dropped", "failed", "unplaced", "unfinished")
STATUSES = (FINISHED, DROPPED, FAILED, UNPLACED, UNFINISHED)
PERCENTILES = (50, 90, 99)


# ------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class ModelSpec:
    """What the simulator needs of one model, wherever it is placed."""

    name: str
    block: BlockFormat  # its KV block format (precision and shape)
    limits: BatchLimits
    slo: SLO = field(default_factory=SLO)
    max_model_len: int | None = None  # prompt + output cap of one sequence

    def __post_init__(self):
        if not isinstance(self.block, BlockFormat):
            raise TypeError(f"model {self.name!r}: block must be a BlockFormat")
        if not isinstance(self.limits, BatchLimits):
            raise TypeError(f"model {self.name!r}: limits must be a BatchLimits")


@dataclass(frozen=True)
class GroupSpec:
    """One device group: the devices (``tp`` of them) that run ``models`` over one pool.

    ``partitions`` (static allocator only): each model's share of the pool's rows
    (default: equal shares, as ``make_allocator("static", ...)`` gives).
    ``reserve_blocks``: per-model reserves (default: the engine's, one full prefill step).
    ``move_bytes_per_s``: when set, KV Slab's compaction copies cost
    ``2 * bytes moved / move_bytes_per_s`` seconds, added to the step that needed them.
    ``own_headroom``: admission leaves headroom for each model's own running decodes
    only, not the other models' on the shared pool (the rule before ``peers``; an
    ablation, never the engine's behaviour)."""

    name: str
    models: tuple[str, ...]
    kv_budget_bytes: int  # the group's KV pool (per device of the group)
    devices: tuple[int, ...] = (0,)
    tp: int = 1
    allocator: str = "kvslab"  # "kvslab" | "static" | "fixed-page"
    partitions: Mapping[str, float] | None = None
    reserve_blocks: Mapping[str, int] | None = None
    move_bytes_per_s: float | None = None
    own_headroom: bool = False

    def __post_init__(self):
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "devices", tuple(self.devices))
        if not self.models or len(set(self.models)) != len(self.models):
            raise ValueError(f"group {self.name!r}: models must be listed once each, got "
                             f"{self.models!r}")
        if not isinstance(self.kv_budget_bytes, int) or self.kv_budget_bytes < 1:
            raise ValueError(f"group {self.name!r}: kv_budget_bytes must be a positive int, "
                             f"got {self.kv_budget_bytes!r}")
        if self.tp < 1 or len(self.devices) != self.tp:
            raise ValueError(f"group {self.name!r}: {len(self.devices)} devices for tp "
                             f"{self.tp}")


# ----------------------------------------------------------------------- outputs
@dataclass
class RequestRecord:
    """What happened to one request of the trace."""

    index: int  # position in the trace (sorted by arrival)
    model: str
    arrival: float
    prompt_tokens: int
    output_tokens: int  # the trace's output length (it finishes there)
    group: str | None = None  # the replica it was routed to
    status: str = UNFINISHED
    first_token: float | None = None
    finished: float | None = None  # finish (or drop / failure) time
    generated: int = 0
    preemptions: int = 0
    slo_met: bool = False

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.status != FINISHED or self.generated < 2:
            return None
        return (self.finished - self.first_token) / (self.generated - 1)


@dataclass
class GroupCounters:
    steps: int = 0
    prefill_steps: int = 0
    busy_s: float = 0.0  # simulated seconds spent in steps
    blocks_moved: int = 0  # by compaction
    bytes_moved: int = 0
    stalls: int = 0  # idle with sequences holding KV (nothing could run)


@dataclass
class SimResult:
    records: list[RequestRecord]
    end_s: float  # simulated time of the last event
    groups: dict[str, GroupCounters]
    slos: dict[str, SLO]
    moves: list[MoveRecord] = field(default_factory=list)  # re-placement, in order

    def metrics(self) -> dict:
        """Overall and per-model figures (``summarize``)."""
        out = summarize(self.records, self.end_s)
        out["per_model"] = {m: summarize([r for r in self.records if r.model == m], self.end_s)
                            for m in sorted({r.model for r in self.records})}
        out["groups"] = {k: asdict(v) for k, v in self.groups.items()}
        out["moves"] = [asdict(m) for m in self.moves]
        return out


def _pct(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {f"p{p}": None for p in PERCENTILES}
    v = np.percentile(np.asarray(xs, float), PERCENTILES)
    return {f"p{p}": float(x) for p, x in zip(PERCENTILES, v)}


def summarize(records: Sequence[RequestRecord], span_s: float) -> dict:
    """Figures over ``records``; rates are over ``span_s`` simulated seconds.

    ``slo_attainment``: requests that met both SLOs over all requests (dropped, failed,
    unplaced and unfinished ones count as misses). ``output_tok_s``: tokens generated
    (by every request) per second; ``slo_output_tok_s``: tokens of the requests that met
    their SLOs per second. TTFT percentiles are over requests that got a first token,
    TPOT over finished requests of two or more tokens."""
    n = len(records)
    counts = {s: 0 for s in STATUSES}
    for r in records:
        counts[r.status] += 1
    met = sum(r.slo_met for r in records)
    gen = sum(r.generated for r in records)
    good = sum(r.generated for r in records if r.slo_met)
    span = max(span_s, 1e-12)
    return {
        "requests": n,
        "slo_attainment": met / n if n else None,
        "slo_met": met,
        **counts,
        "preemptions": sum(r.preemptions for r in records),
        "output_tokens": gen,
        "output_tok_s": gen / span,
        "slo_output_tok_s": good / span,
        "ttft_s": _pct([r.ttft for r in records if r.ttft is not None]),
        "tpot_s": _pct([r.tpot for r in records if r.tpot is not None]),
    }


# -------------------------------------------------------------------- internals
class _MemoCost:
    """A ``StepCost`` that remembers: one-row prefill times (the local schedulers ask for
    them for every waiting request at every step), and the last decode step asked for
    (the local scheduler and the simulator ask for the same batch several times a step).
    Results are the wrapped cost's, exactly."""

    def __init__(self, cost):
        self.cost = cost
        self._one: dict[tuple[int, int], float] = {}
        self._last_ctx: list[int] | None = None
        self._last_decode = 0.0

    def prefill_time(self, chunks, contexts) -> float:
        if len(chunks) == 1:
            key = (chunks[0], contexts[0])
            t = self._one.get(key)
            if t is None:
                t = self._one[key] = self.cost.prefill_time(chunks, contexts)
            return t
        return self.cost.prefill_time(chunks, contexts)

    def decode_time(self, contexts) -> float:
        if contexts != self._last_ctx:
            self._last_decode = self.cost.decode_time(contexts)
            self._last_ctx = list(contexts)
        return self._last_decode


@dataclass(eq=False)
class _Live:
    record: RequestRecord
    sched: ModelScheduler


def _engine_reserve(block: BlockFormat, lim: BatchLimits) -> int:
    """The engine's default reserve: one full prefill step of the model."""
    return min(lim.max_prefill_seqs, lim.prefill_token_budget) + block.blocks_for(
        lim.prefill_token_budget)


class _Group:
    """One device group's engine loop, with simulated time."""

    def __init__(self, spec: GroupSpec, models: Mapping[str, ModelSpec],
                 costs: Mapping[str, Any], scheduler: str, on_miss: str):
        self.spec = spec
        formats = {m: models[m].block for m in spec.models}
        if spec.allocator == "static" and spec.partitions is not None:
            # Separate processes each page their own share: rows as small as 1% padding
            # allows, not the shared pool's 2x-LCM slabs.
            fmts = list(formats.values())
            row = choose_slab_bytes([f.block_bytes for f in fmts], spec.kv_budget_bytes,
                                    lcm_first=False)
            self.alloc = StaticPartitionAllocator(spec.kv_budget_bytes, fmts, slab_bytes=row,
                                                  partitions=dict(spec.partitions))
        else:
            self.alloc = make_allocator(spec.allocator, spec.kv_budget_bytes, formats)
        self.scheds: dict[str, ModelScheduler] = {}
        self._peers = None if spec.own_headroom else self.scheds.values
        for m in spec.models:
            ms = models[m]
            reserve = (spec.reserve_blocks or {}).get(m, _engine_reserve(ms.block, ms.limits))
            try:
                self.alloc.add_model(m, ms.block, reserve_blocks=reserve)
            except ValueError as e:
                raise ValueError(f"group {spec.name!r}: {e}") from None
        for m in spec.models:
            ms = models[m]
            self.scheds[m] = ModelScheduler(m, self.alloc, ms.block, ms.limits, self._reclaim,
                                            slo=ms.slo, cost=_MemoCost(costs[m]),
                                            peers=self._peers)
        self.order = list(self.scheds.values())
        # Largest sequence each model may ever hold: what the empty pool gives it.
        self.max_blocks = {m: self.alloc.free_blocks(m) for m in spec.models}
        self.max_len = {m: models[m].max_model_len for m in spec.models}
        self.local = make_local_scheduler(scheduler, on_miss)
        self.live: dict[Seq, _Live] = {}
        self.pending: tuple[ModelScheduler, Scheduled] | None = None
        self.busy_until: float | None = None
        self.move_s = 0.0  # compaction copy time owed by the step being scheduled
        self.counters = GroupCounters()

    # ----------------------------------------------------------- the engine hooks
    def _reclaim(self, name: str, n: int) -> bool:
        moves = self.alloc.compact_for(name, n)
        if not moves:
            return False
        for mname, table in moves_by_model(moves).items():
            self.scheds[mname].relocate(table)
            nbytes = len(table) * self.alloc.fmt(mname).block_bytes
            self.counters.blocks_moved += len(table)
            self.counters.bytes_moved += nbytes
            if self.spec.move_bytes_per_s:
                self.move_s += 2.0 * nbytes / self.spec.move_bytes_per_s
        return self.alloc.can_allocate(name, n)

    # ------------------------------------------------------------ models moving
    def attach(self, ms: ModelSpec, cost) -> None:
        """Add a model while the group runs (``Engine.attach_model``; KV Slab pools only,
        which ``simulate`` checks): its reserve must fit beside the others' (ValueError
        otherwise, and nothing changes)."""
        if ms.name in self.scheds:
            raise ValueError(f"group {self.spec.name!r} already serves {ms.name!r}")
        self.alloc.add_model(ms.name, ms.block,
                             reserve_blocks=_engine_reserve(ms.block, ms.limits))
        sched = ModelScheduler(ms.name, self.alloc, ms.block, ms.limits, self._reclaim,
                               slo=ms.slo, cost=_MemoCost(cost), peers=self._peers)
        self.scheds[ms.name] = sched
        self.order.append(sched)
        self.max_len[ms.name] = ms.max_model_len
        self._resize()

    def holds(self, model: str) -> bool:
        """Whether requests of ``model`` are still queued or running here."""
        s = self.scheds.get(model)
        return s is not None and bool(s.waiting or s.running or s.dropped)

    def detach(self, model: str) -> None:
        """Remove a model that holds nothing here any more (``Engine.retire_model``)."""
        sched = self.scheds.pop(model)
        self.order.remove(sched)
        self.alloc.remove_model(model)
        del self.max_blocks[model], self.max_len[model]
        self._resize()

    def _resize(self) -> None:
        """Each model's largest sequence after the set of reserves changed."""
        self.max_blocks = {m: self.alloc.max_blocks(m) for m in self.scheds}

    # ------------------------------------------------------------------ requests
    def outstanding(self, model: str) -> tuple[int, int]:
        """(tokens of ``model`` still to feed here, requests outstanding on the group)."""
        s = self.scheds[model]
        tokens = 0
        for q in s.waiting:
            r = self.live[q].record
            tokens += r.prompt_tokens + r.output_tokens - q.num_computed
        for q in s.running:
            r = self.live[q].record
            tokens += r.prompt_tokens + r.output_tokens - q.num_computed
        return tokens, len(self.live)

    def admit(self, rec: RequestRecord) -> bool:
        """Queue a request (False: it can never fit and failed, as ``submit`` rejects)."""
        sched = self.scheds[rec.model]
        rec.group = self.spec.name
        total = rec.prompt_tokens + rec.output_tokens
        cap = self.max_len[rec.model]
        if (cap is not None and rec.prompt_tokens >= cap) or sched.block.blocks_for(
                total if cap is None else min(total, cap)) > self.max_blocks[rec.model]:
            rec.status, rec.finished = FAILED, rec.arrival
            return False
        seq = Seq(str(rec.index), None, 0, None, [0] * rec.prompt_tokens,
                  metrics=RequestMetrics(rec.arrival))
        self.live[seq] = _Live(rec, sched)
        sched.add(seq)
        return True

    # ---------------------------------------------------------------- one step
    def try_step(self, now: float) -> float | None:
        """Start the next step at ``now``; its end time, or None if the group idles."""
        while True:
            got = self.local.next_step(self.order, now)
            self._finish_dropped(now)
            if got is not None:
                break
            if not self._fail_unschedulable(now):
                if any(s.running for s in self.order):
                    self.counters.stalls += 1
                self.move_s = 0.0
                return None
        sched, work = got
        for seq, _ in work.rows:
            seq.metrics.first_scheduled = seq.metrics.first_scheduled or now
        cost = sched.cost
        if work.kind == DECODE:
            dt = cost.decode_time([s.num_computed + c for s, c in work.rows])
        else:
            dt = cost.prefill_time([c for _, c in work.rows],
                                   [s.num_computed + c for s, c in work.rows])
            self.counters.prefill_steps += 1
        dt += self.move_s
        self.move_s = 0.0
        if not dt > 0:
            raise ValueError(f"group {self.spec.name!r}: model {sched.name!r} step of kind "
                             f"{work.kind} costs {dt!r} s; step costs must be > 0")
        self.counters.steps += 1
        self.counters.busy_s += dt
        self.pending = (sched, work)
        self.busy_until = now + dt
        return self.busy_until

    def complete(self, now: float) -> None:
        """End the step in flight at ``now`` (``Engine._postprocess``)."""
        sched, work = self.pending
        self.pending, self.busy_until = None, None
        for seq, c in work.rows:
            if not sched.advance(seq, c):
                continue
            rec = self.live[seq].record
            if rec.first_token is None:
                rec.first_token = now
                seq.metrics.first_token = now
            seq.tokens.append(0)
            rec.generated += 1
            if rec.generated >= rec.output_tokens:
                seq.metrics.finished = now
                self._finish(seq, FINISHED, now)

    def _finish(self, seq: Seq, status: str, now: float) -> None:
        live = self.live.pop(seq)
        live.sched.remove(seq)
        rec = live.record
        rec.status, rec.finished, rec.preemptions = status, now, seq.metrics.preemptions
        rec.slo_met = status == FINISHED and live.sched.slo.met(seq.metrics, rec.generated)

    def _finish_dropped(self, now: float) -> None:
        for s in self.order:
            if s.dropped:
                for seq, _ in s.take_dropped():
                    self._finish(seq, DROPPED, now)

    def _fail_unschedulable(self, now: float) -> bool:
        if any(s.running for s in self.order):
            return False
        failed = False
        for s in self.order:
            if s.waiting:
                self._finish(s.waiting[0], FAILED, now)
                failed = True
        return failed

    def close(self, now: float) -> None:
        """Requests still in the group at the end of the run stay unfinished."""
        for seq, live in list(self.live.items()):
            rec = live.record
            rec.preemptions = seq.metrics.preemptions
            rec.status = UNFINISHED


# ---------------------------------------------------------------------- driver
def simulate(groups: Sequence[GroupSpec], models: Mapping[str, ModelSpec],
             costs: Mapping[tuple[str, str], Any] | Callable[[str, GroupSpec], Any],
             trace: Sequence[Request], scheduler: str = "fineserve",
             on_miss: str = "reject", horizon_s: float | None = None,
             replacer: Replacer | None = None) -> SimResult:
    """Replay ``trace`` on ``groups`` and return every request's fate.

    ``models``: name -> ``ModelSpec`` for every model that is or may be placed.
    ``costs``: the ``StepCost`` of each (model, group name), or a function
    ``(model, group) -> StepCost``. ``scheduler`` / ``on_miss``: every group's local
    scheduler (``schedulers.local.make_local_scheduler``). ``horizon_s``: stop at this
    simulated time (requests still in flight are ``unfinished``); default: run until
    every request is done. ``replacer``: re-place models while the trace runs (see
    ``Replacer``; moves between KV Slab groups only). Deterministic: the same inputs give
    the same result."""
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise ValueError(f"group names must be unique, got {names}")
    for g in groups:
        for m in g.models:
            if m not in models:
                raise ValueError(f"group {g.name!r} places {m!r}, which has no ModelSpec")
    cost_of = costs if callable(costs) else (lambda m, g: _lookup(costs, m, g))
    sims = [_Group(g, models, {m: cost_of(m, g) for m in g.models}, scheduler, on_miss)
            for g in groups]
    replicas: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        for m in g.models:
            replicas.setdefault(m, []).append(i)

    order = sorted(range(len(trace)), key=lambda i: (trace[i].arrival_s, i))
    records = [RequestRecord(k, trace[i].model, float(trace[i].arrival_s),
                             int(trace[i].prompt_tokens), int(trace[i].output_tokens))
               for k, i in enumerate(order)]
    moves = None
    if replacer is not None:
        if len({g.devices for g in groups}) != len(groups):
            raise ValueError("re-placement names groups by their devices: they must differ")
        if any(g.allocator != "kvslab" for g in groups):
            raise ValueError("re-placement moves models between KV Slab pools only; groups "
                             + ", ".join(repr(g.name) for g in groups if g.allocator != "kvslab")
                             + " use another allocator")
        moves = SimMoves(replacer, sims, models, cost_of, replicas,
                       records[-1].arrival if records else 0.0)
    heap: list[tuple[float, int]] = []  # (step end, group index)
    nxt, n, now = 0, len(records), 0.0
    inf = math.inf
    while True:
        t_arr = records[nxt].arrival if nxt < n else inf
        t_end = heap[0][0] if heap else inf
        t_ctl = moves.next_time() if moves is not None else inf
        t = min(t_arr, t_end, t_ctl)
        if t == inf or (horizon_s is not None and t > horizon_s):
            break
        now = t
        dirty: set[int] = set()
        while heap and heap[0][0] == t:
            _, gi = heapq.heappop(heap)
            sims[gi].complete(t)
            dirty.add(gi)
        if moves is not None:
            moves.fire(t)
        while nxt < n and records[nxt].arrival == t:
            rec = records[nxt]
            nxt += 1
            if replacer is not None:
                replacer.observe(rec.model, rec.arrival)
            where = replicas.get(rec.model)
            if not where:
                rec.status, rec.finished = UNPLACED, rec.arrival
                continue
            gi = where[0] if len(where) == 1 else min(
                where, key=lambda j: (*sims[j].outstanding(rec.model), j))
            if sims[gi].admit(rec) and sims[gi].busy_until is None:
                dirty.add(gi)
        for gi in sorted(dirty):
            g = sims[gi]
            if g.busy_until is None:
                end = g.try_step(t)
                if end is not None:
                    heapq.heappush(heap, (end, gi))
        if moves is not None:
            moves.poll(t)  # a step that just ended or shed may have drained a source
    for g in sims:
        g.close(now)
    slos = {m: s.slo for m, s in models.items()}
    return SimResult(records, now, {g.spec.name: g.counters for g in sims}, slos,
                     moves.records if moves is not None else [])


def _lookup(costs: Mapping[tuple[str, str], Any], model: str, group: GroupSpec):
    try:
        return costs[(model, group.name)]
    except KeyError:
        raise KeyError(f"no step cost for model {model!r} on group {group.name!r}") from None
