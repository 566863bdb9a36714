"""The local scheduler: one per device, it decides every step of every model on it.

Plain Python, no JAX: the engine (``fineserve_jax.engine``) and the simulator
(``schedulers.simulator``) call the same ``next_step``. Each call sees the device's
``ModelScheduler``s (one per model, sharing the device's KV allocator) and the current
time, and returns the model to step and its batch (blocks allocated), or None. Requests it
sheds are left in each model's ``dropped`` list for the caller to finish.

Three policies with this interface:

``FCFS``
    What one serving process per model does, sharing a device: each model takes its
    prompts in arrival order and alternates prefill and decode; models take turns
    (least recently stepped first). Nothing is dropped.

``PrismStyle``
    Deadline checks in queue order: each model walks its queue in arrival order,
    predicting each request's first-token time from the cost model and the prompts
    ahead of it in the same queue, and drops the ones that would miss their TTFT SLO.
    The model whose oldest request is due first steps next; each model alternates
    prefill and decode.

``SLOAware`` (FineServe's SLO-aware adaptive batching)
    Every call:

    1. *Feasibility*, device-wide: waiting requests of every model in deadline order.
       A request's first token is predicted at ``now + W / (1 - u)``, where ``W`` is the
       time to prefill its prompt and those ahead of it in full steps (partly prefilled
       ones first, then earlier deadlines that are kept; its own model's tokens batched),
       plus each other model's work that step 2 runs first (only a model with a prompt
       due no later than the request's: its partly prefilled prompts and its kept ones
       due by then), and ``u`` the share of the device the running decodes need to keep
       their TPOT SLOs (``sum(decode_time / tpot)`` over models, at most 0.9). A request
       whose prediction is past its deadline is dropped at once (``on_miss="reject"``:
       the client hears why) or kept behind every feasible request and counted as a miss
       (``on_miss="best-effort"``): its prompt runs after every prompt, on any model, that
       can still meet its deadline, in steps cut to end within ``best_effort_share`` of the
       tightest TTFT target on the device; once decoding it sets no TPOT pace; and a
       decode short of KV blocks preempts it before any other sequence of its model.
    2. *Which step*: each model with prompts offers a prefill batch, built in deadline
       order (partly prefilled sequences first) under the guards (running sequences,
       rows and tokens of one step, prompts in flight), then shrunk by evicting the
       longest prompt while a member whose prompt completes in this step would miss its
       deadline, and cut (chunk halved, rows dropped) to end before the next running
       decode is due when some cut can (adaptive batch size). The prefill whose
       earliest member is due first runs, unless running it would make some model's
       decode late: then that decode runs first, as often as it would, while the
       prompt can wait for it (the prefill, run after the decode, still gives its
       earliest member its first token by its deadline). Between the two deadlines
       the first token's is the hard one: a TPOT target is a mean, and a decode run
       ahead of a prompt banks slack against its pace, so decodes cannot tile the
       device for long (each one moves its model's due time a whole ``tpot`` on for
       one step's time). With no prefill to run, the decode due first runs (least
       recently stepped when no TPOT is set); a model whose decoding sequences are all
       best-effort, never due, takes its turn before the decodes that are not yet due
       when its step ends before the next one is.

       A model's decode is due when the sequence furthest behind its pace needs its next
       token, less the step's time: a sequence's pace is one token per ``tpot``
       (x ``tpot_margin``) after its first, which is what a mean time-per-output-token
       target allows. A sequence that got tokens early (a quiet spell) has that much
       slack for the next burst; pacing each token from the one before would spend that
       slack on nothing and make the model due again a full ``tpot`` after every step.

    Models without SLOs get the same treatment with infinite deadlines: arrival order,
    no drops, and decodes interleaved round-robin.

The predictions need a cost model per model (``ModelScheduler.cost``, a
``schedulers.costmodel.StepCost``); a model without one is never dropped and its steps
are taken to cost nothing.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from schedulers.batching import DECODE, PREFILL, ModelScheduler, Scheduled, Seq

ON_MISS = ("reject", "best-effort")
DROP_REASON = ("cannot meet the model's time-to-first-token SLO ({slo:.3g} s) at the "
               "current load")  # the server's 503 adds the advice to retry


# ------------------------------------------------------------------ cost helpers
def prefill_chunks(seq: Seq, budget: int) -> list[tuple[int, int]]:
    """(chunk, context after) of each prefill step ``seq`` still needs, alone, with
    ``budget`` tokens per step."""
    out, done, total = [], seq.num_computed, len(seq.tokens)
    while done < total:
        c = min(budget, total - done)
        done += c
        out.append((c, done))
    return out


def solo_prefill_time(sched: ModelScheduler, seq: Seq) -> float:
    """Seconds of the prefill steps of ``seq``'s remaining prompt, run alone."""
    if sched.cost is None:
        return 0.0
    return sum(sched.cost.prefill_time([c], [ctx])
               for c, ctx in prefill_chunks(seq, sched.limits.prefill_token_budget))


def batched_prefill_time(sched: ModelScheduler, tokens: int) -> float:
    """Seconds to prefill ``tokens`` prompt tokens of this model in full steps of
    ``prefill_token_budget`` tokens (one row per step: a lower bound on the rows' cost,
    as a batch of short prompts costs about one row of their total)."""
    if sched.cost is None or tokens <= 0:
        return 0.0
    budget = sched.limits.prefill_token_budget
    full, rest = divmod(tokens, budget)
    t = full * sched.cost.prefill_time([budget], [budget]) if full else 0.0
    return t + (sched.cost.prefill_time([rest], [rest]) if rest else 0.0)


def batch_time(sched: ModelScheduler, rows: Sequence[tuple[Seq, int]]) -> float:
    """Seconds of one prefill step feeding ``rows`` (sequence, chunk)."""
    if sched.cost is None or not rows:
        return 0.0
    return sched.cost.prefill_time([c for _, c in rows], [s.num_computed + c for s, c in rows])


def last_token_at(sched: ModelScheduler) -> float:
    """When the decodable sequence waiting longest for its next token got its last one
    (-inf if unknown: the decode is due at once)."""
    ts = [s.last_token_at for s in sched.running if not s.prefilling]
    return min((t if t is not None else -math.inf) for t in ts) if ts else math.inf


def paced_due(sched: ModelScheduler, tpot: float) -> float:
    """When the decodable sequence furthest behind its TPOT pace needs its next token:
    ``tpot`` per token after its first (what a mean-TPOT target allows), so a sequence
    that got tokens early has that much slack. A sequence whose first token the local
    scheduler did not see is paced from its latest token (-inf when that is unknown
    too); inf when no sequence decodes. A sequence already counted as a miss
    (best-effort) sets no pace: it decodes with its model's others, or when nothing
    else is due."""
    due = math.inf
    for q in sched.running:
        if q.prefilling or q.slo_missed:
            continue
        if q.paced_from is None:
            t = q.last_token_at + tpot if q.last_token_at is not None else -math.inf
        else:
            t = q.paced_from + tpot * (q.paced_tokens + 1)
        due = min(due, t)
    return due


def decode_time(sched: ModelScheduler) -> float:
    """Seconds of this model's next decode step (its decodable running sequences)."""
    if sched.cost is None:
        return 0.0
    ctx = [s.num_computed + 1 for s in sched.running if not s.prefilling]
    return sched.cost.decode_time(ctx) if ctx else 0.0


# ------------------------------------------------------------------- policies
class LocalScheduler:
    """Base: bookkeeping shared by the policies; subclasses implement ``_pick``."""

    name = "base"

    def next_step(self, scheds: Sequence[ModelScheduler], now: float
                  ) -> tuple[ModelScheduler, Scheduled] | None:
        """The model to step and its batch (blocks allocated), or None if none can run.

        Requests shed on the way are in their model's ``dropped`` list."""
        scheds = list(scheds)
        busy = [s for s in scheds if s.has_work()]
        got = self._pick(busy, now) if busy else None
        if got is not None:
            sched, work = got
            # Turn order lives on the models (a step marks its model one past the
            # device's latest), not in this object: a scheduler swapped in on a device
            # that has served carries on the turns the models had.
            sched.last_step = max(s.last_step for s in scheds) + 1
            for seq, fed in work.rows:
                if fed == seq.remaining:  # this step samples its next token
                    seq.last_token_at = now
                    if seq.paced_from is None:
                        seq.paced_from = now
                    else:
                        seq.paced_tokens += 1
        return got

    def _pick(self, scheds: list[ModelScheduler], now: float):
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}()"


def _round_robin(scheds: Sequence[ModelScheduler]) -> list[ModelScheduler]:
    return sorted(scheds, key=lambda s: (s.last_step, s.name))


class FCFS(LocalScheduler):
    """Arrival order per model, models in turn, alternating prefill and decode, no drops."""

    name = "fcfs"

    def _pick(self, scheds, now):
        for s in _round_robin(scheds):
            work = s.schedule()
            if work is not None:
                return s, work
        return None


class PrismStyle(LocalScheduler):
    """Deadline check in queue order per model; the model due first steps next."""

    name = "prism"

    def __init__(self, on_miss: str = "reject"):
        super().__init__()
        self.on_miss = _check_on_miss(on_miss)

    def _check(self, sched: ModelScheduler, now: float) -> None:
        ahead = sum(solo_prefill_time(sched, s) for s in sched.running if s.prefilling)
        for seq in list(sched.waiting):
            p = solo_prefill_time(sched, seq)
            if seq.slo_missed or now + ahead + p <= seq.deadline:
                ahead += p
                continue
            _miss(sched, seq, self.on_miss)
            if self.on_miss == "best-effort":
                ahead += p  # served in queue order all the same

    def _pick(self, scheds, now):
        for s in scheds:
            self._check(s, now)

        def due(s: ModelScheduler):
            heads = [q.deadline for q in s.prefill_candidates()[:1]]
            if s.decodable() and s.slo.tpot_s is not None:
                heads.append(last_token_at(s) + s.slo.tpot_s)
            return (min(heads, default=math.inf), s.last_step, s.name)

        for s in sorted(scheds, key=due):
            work = s.schedule()
            if work is not None:
                return s, work
        return None


class SLOAware(LocalScheduler):
    """FineServe's SLO-aware adaptive batching (see the module docstring)."""

    name = "fineserve"

    def __init__(self, on_miss: str = "reject", tpot_margin: float = 1.0,
                 max_decode_share: float = 0.9, min_prefill_tokens: int = 16,
                 best_effort_share: float = 0.5):
        super().__init__()
        self.on_miss = _check_on_miss(on_miss)
        # A prefill step's best-effort rows are cut to end within this share of the
        # tightest TTFT target on the device: a prompt arriving while it runs keeps the
        # rest of its time (steps cannot be interrupted).
        self.best_effort_share = best_effort_share
        self.min_prefill_tokens = min_prefill_tokens  # a prefill step feeds at least this
        # A decode is due to end ``tpot_margin * tpot`` after its sequences' last token.
        # 1.0 (the target itself): in the cluster simulation 0.8 left too little room for
        # prefills beside tight-TPOT models (0.957 vs 0.986 attainment at 60 req/s).
        self.tpot_margin = tpot_margin
        self.max_decode_share = max_decode_share

    # ---------------------------------------------------------- predictions
    def decode_share(self, scheds: Sequence[ModelScheduler],
                     step_s: Mapping[str, float] | None = None) -> float:
        """Share of the device the running decodes need to keep their TPOT SLOs
        (``step_s``: each decodable model's next decode step, if already timed)."""
        u = sum((step_s[s.name] if step_s is not None else decode_time(s)) / s.slo.tpot_s
                for s in scheds if s.slo.tpot_s is not None
                and any(not q.prefilling and not q.slo_missed for q in s.running))
        return min(u, self.max_decode_share)

    def check_feasible(self, scheds: Sequence[ModelScheduler], now: float,
                       step_s: Mapping[str, float] | None = None) -> None:
        """Drop (or mark) every waiting request predicted to miss its TTFT deadline.

        The prefill work ahead of a request is its model's prompt tokens ahead of it
        (plus its own) run as full prefill steps (``batched_prefill_time``: prompts batch,
        so this is less than their solo times added up), plus the work of each other
        model that ``next_step`` would run first: a model prefills ahead of the request
        only if one of its prompts (partly prefilled, or waiting and kept) is due no
        later than the request, and then with its partly prefilled prompts (its batches
        take them first) and its waiting prompts due by then."""
        stretch = 1.0 / (1.0 - self.decode_share(scheds, step_s))
        # per model: tokens of its partly prefilled prompts plus the waiting ones kept so
        # far, the time to prefill them, and when the first of them is due
        tokens: dict[int, int] = {}
        work: dict[int, float] = {}
        first_due: dict[int, float] = {}
        for s in scheds:  # best-effort prompts run after these: not ahead of any
            partial = [q for q in s.running if q.prefilling and not q.slo_missed]
            tokens[id(s)] = sum(q.remaining for q in partial)
            work[id(s)] = batched_prefill_time(s, tokens[id(s)])
            first_due[id(s)] = min((q.deadline for q in partial), default=math.inf)
        waiting = sorted(((q.deadline, q.arrival, i, s, q) for i, s in enumerate(scheds)
                          for q in s.waiting if not q.slo_missed), key=lambda t: t[:3])
        for deadline, _, _, s, q in waiting:
            mine = batched_prefill_time(s, tokens[id(s)] + q.remaining)
            # requests come in deadline order, so every prompt another model has kept is
            # due no later than this one: its work is ahead once any of it is due first
            others = sum(work[id(o)] for o in scheds
                         if o is not s and first_due[id(o)] <= deadline)
            if now + (others + mine) * stretch <= deadline:
                tokens[id(s)] += q.remaining
                work[id(s)] = mine
                first_due[id(s)] = min(first_due[id(s)], deadline)
            else:
                _miss(s, q, self.on_miss)

    def prefill_batch(self, sched: ModelScheduler, now: float, slot_s: float = math.inf,
                      best_effort_s: float = math.inf) -> list[tuple[Seq, int]]:
        """The prefill rows this model would run now: deadline order under the guards,
        shrunk while a completing member would miss its deadline, best-effort rows (the
        last) cut while the step would outlast ``best_effort_s``, then, if the step would
        outlast ``slot_s`` (the time until some running decode is due), cut (last chunk
        halved, then the last row dropped, down to ``min_prefill_tokens``) to the first
        cut that fits; when no cut fits the batch runs whole."""
        lim = sched.limits
        partial = [s for s in sched.running if s.prefilling]
        waiting = sorted(sched.waiting, key=lambda q: (q.deadline, q.arrival))
        # Best-effort prompts (already counted as misses), partly prefilled or not, come
        # after every prompt that can still meet its deadline (a stable sort).
        order = sorted(partial + waiting, key=lambda q: q.slo_missed)
        budget, rows = lim.prefill_token_budget, []
        in_flight = len(partial)
        room = lim.max_seqs - len(sched.running)
        for seq in order:
            if len(rows) == lim.max_prefill_seqs or budget == 0:
                break
            if seq not in partial:
                if room == 0 or in_flight >= lim.max_prefill_seqs:
                    break
                room -= 1
                in_flight += 1
            c = min(seq.remaining, budget)
            rows.append((seq, c))
            budget -= c
        while len(rows) > 1:
            t_end = now + batch_time(sched, rows)
            late = [s for s, c in rows if c == s.remaining and not s.slo_missed
                    and t_end > s.deadline]
            if not late:
                break
            new = [(s, c) for s, c in rows if s not in partial or s.slo_missed]
            if not new:
                break
            # best-effort rows first, then the longest new prompt
            victim = max(new, key=lambda r: (r[0].slo_missed, r[0].remaining, r[0].arrival))
            rows.remove(victim)
        while (rows and rows[-1][0].slo_missed and batch_time(sched, rows) > best_effort_s
               and self._cut(rows)):
            pass
        if not rows or batch_time(sched, rows) <= slot_s:
            return rows
        cut = list(rows)
        while self._cut(cut):  # smaller steps, until one ends within the slot
            if batch_time(sched, cut) <= slot_s:
                return cut
        # No cut fits (a step's time is mostly fixed, e.g. reading the weights): smaller
        # steps would only add steps, so the batch runs whole.
        return rows

    def _cut(self, rows: list[tuple[Seq, int]]) -> bool:
        """Make the step of ``rows`` one cut smaller, in place: the last chunk halved
        (down to ``min_prefill_tokens``), else the last row dropped. False if neither
        can be."""
        seq, c = rows[-1]
        if c > self.min_prefill_tokens:
            rows[-1] = (seq, max(self.min_prefill_tokens, c // 2))
        elif len(rows) > 1:
            rows.pop()
        else:
            return False
        return True

    def _decode_due(self, s: ModelScheduler, step_s: float) -> float:
        """When ``s``'s decode, taking ``step_s``, must start to keep its TPOT pace."""
        if s.slo.tpot_s is None:  # no target: alternate with this model's prefills
            return -math.inf if s.last_kind == PREFILL else math.inf
        return paced_due(s, self.tpot_margin * s.slo.tpot_s) - step_s

    # ------------------------------------------------------------- decision
    def _pick(self, scheds, now):
        # Dropping waiting requests leaves the running ones, so their decode steps are
        # timed once for both.
        step_s = {s.name: decode_time(s) for s in scheds if s.decodable()}
        self.check_feasible(scheds, now, step_s)
        due = {s.name: self._decode_due(s, step_s[s.name]) for s in scheds if s.name in step_s}
        decodes = sorted((s for s in scheds if s.name in due),
                         key=lambda s: (due[s.name], s.last_step, s.name))
        timed = [due[d.name] for d in decodes if d.slo.tpot_s is not None]
        slot = min(timed) - now if timed else math.inf
        best_effort_s = self.best_effort_share * min(
            (s.slo.ttft_s for s in scheds if s.slo.ttft_s is not None), default=math.inf)
        prefills = []
        for s in scheds:
            if s.has_prefill():
                rows = self.prefill_batch(s, now, slot, best_effort_s)
                if rows:  # a batch of best-effort prompts alone runs after the others
                    first_due = min((q.deadline for q, _ in rows if not q.slo_missed),
                                    default=math.inf)
                    prefills.append((first_due, s.last_step, s.name, s, rows))
        prefills.sort(key=lambda t: t[:3])
        for _, _, _, s, rows in prefills:
            step = batch_time(s, rows)
            # A decode goes first only if the prompt can wait for it: its earliest
            # member (those already counted as misses aside) still meets its deadline.
            ttft_due = min((q.deadline for q, _ in rows if not q.slo_missed), default=math.inf)
            for d in decodes:
                if due[d.name] >= now + step or now + step_s[d.name] + step > ttft_due:
                    continue
                work = d.schedule(DECODE)
                if work is not None:
                    return d, work
            work = s.schedule(PREFILL, order=[q for q, _ in rows],
                              budget=sum(c for _, c in rows))
            if work is not None:
                return s, work
        # No prefill to run: the decodes due now, then a model whose decoding sequences
        # are all best-effort (none paced, so never due: without this turn they would
        # wait for an idle device) if its step ends before the next decode is due, then
        # the others ahead of their pace.
        late = [d for d in decodes if due[d.name] == math.inf and d.slo.tpot_s is not None
                and step_s[d.name] <= slot]
        for d in ([d for d in decodes if due[d.name] <= now] + late[:1]
                  + [d for d in decodes if due[d.name] > now]):
            work = d.schedule(DECODE)
            if work is not None:
                return d, work
        # Nothing planned could run (memory): fall back to each model's own choice.
        for s in _round_robin(scheds):
            work = s.schedule()
            if work is not None:
                return s, work
        return None

    def __repr__(self):
        return f"SLOAware(on_miss={self.on_miss!r})"


# ------------------------------------------------------------------- helpers
def _check_on_miss(v: str) -> str:
    if v not in ON_MISS:
        raise ValueError(f"on_miss must be one of {ON_MISS}, got {v!r}")
    return v


def _miss(sched: ModelScheduler, seq: Seq, on_miss: str) -> None:
    sched.slo_misses += 1
    if on_miss == "reject":
        sched.drop(seq, DROP_REASON.format(slo=sched.slo.ttft_s))
    else:
        seq.slo_missed = True


POLICIES = {"fcfs": FCFS, "prism": PrismStyle, "fineserve": SLOAware}


def make_local_scheduler(name: str, on_miss: str = "reject") -> LocalScheduler:
    """A local scheduler by name: ``fcfs``, ``prism`` or ``fineserve``."""
    if name not in POLICIES:
        raise ValueError(f"unknown local scheduler {name!r}; choose one of {list(POLICIES)}")
    return POLICIES[name]() if name == "fcfs" else POLICIES[name](on_miss=on_miss)
