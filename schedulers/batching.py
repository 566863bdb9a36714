"""Continuous batching for one model: admission, chunked prefill, decode, preemption.

Plain Python (no JAX): the engine and the simulator (``schedulers.simulator``) run this
same code. Each engine iteration for a model is one step of one kind:

- *prefill*: chunks of prompts (partially prefilled sequences first, then waiting ones in
  arrival order) up to ``prefill_token_budget`` tokens and ``max_prefill_seqs`` rows; a
  long prompt is split across steps, so decode steps of running sequences run between
  its chunks;
- *decode*: one token for every running sequence whose prompt is in KV.

A waiting sequence is admitted only when the blocks of its whole prompt fit beside a
block of headroom for each running decode, though it is fed a chunk at a time; on a
shared pool (KV Slab, fixed pages) that counts the other models' running decodes too.

Left to itself (``schedule()``) the two kinds alternate while both have work, so a burst
of long prompts delays decodes by at most one prefill step; a device's local scheduler
(``schedulers.local``) may instead name the kind and the order of the prompts to admit,
and shed requests (``drop``). When a decode needs a block and the pool has none for this
model, the newest running sequence (one served best-effort, if any, first) is preempted
by recompute: its blocks are freed and it goes back to the front of the queue with its
prompt *and* generated tokens, which are prefilled again when memory returns; the
sampler's per-step keys make the result the same as without the preemption.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from fineserve_jax.kvslab import BlockFormat

PREFILL, DECODE = "prefill", "decode"


def moves_by_model(moves) -> dict[str, dict[int, int]]:
    """An allocator's block moves (``model``, ``src``, ``dst``) as model -> {src: dst}."""
    out: dict[str, dict[int, int]] = {}
    for mv in moves:
        out.setdefault(mv.model, {})[mv.src] = mv.dst
    return out


@dataclass
class RequestMetrics:
    """Timings (``time.monotonic()`` seconds, or simulated time) and counts of one request."""

    arrival: float  # submitted
    first_scheduled: float | None = None  # first step that fed any of its tokens
    first_token: float | None = None
    finished: float | None = None
    preemptions: int = 0  # times its KV was freed and recomputed

    @property
    def ttft(self) -> float | None:
        """Seconds from submission to the first token."""
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def queued(self) -> float | None:
        """Seconds from submission to the first step that ran it."""
        return None if self.first_scheduled is None else self.first_scheduled - self.arrival


@dataclass(eq=False)
class Seq:
    """One request's sequence as the engine tracks it."""

    id: str
    state: Any  # stop rules and streamed text (``SequenceState``; None in the simulator)
    seed: int
    sink: Any  # receives deltas (``RequestHandle``)
    tokens: list[int]  # prompt + generated ids; while decoding the last is not in KV yet
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.monotonic()))
    num_computed: int = 0  # tokens whose K/V are in the pool
    blocks: list[int] = field(default_factory=list)  # block handles, in position order
    prompt_lps: list = field(default_factory=list)  # TokenLogprob of prompt tokens 1.., if asked
    prompt_sent: bool = False  # prompt logprobs delivered
    deadline: float = float("inf")  # first token due (arrival + the model's TTFT SLO)
    slo_missed: bool = False  # judged unable to meet its TTFT SLO and served best-effort
    last_token_at: float | None = None  # start of the step that sampled its latest token
    paced_from: float | None = None  # start of the step that sampled its first token
    paced_tokens: int = 0  # tokens sampled since that one (the local scheduler's TPOT pace)

    @property
    def arrival(self) -> float:
        return self.metrics.arrival

    @property
    def preemptions(self) -> int:
        return self.metrics.preemptions

    @property
    def remaining(self) -> int:
        """Tokens to feed before the next sample: 1 when decoding, more while prefilling."""
        return len(self.tokens) - self.num_computed

    @property
    def prefilling(self) -> bool:
        n = self.num_computed  # (remaining > 1 or nothing in KV), inlined: a hot path
        return n == 0 or len(self.tokens) - n > 1


@dataclass
class Scheduled:
    """One step's work for one model: (sequence, tokens fed) rows in batch order."""

    kind: str  # PREFILL | DECODE
    rows: list[tuple[Seq, int]]

    @property
    def num_tokens(self) -> int:
        return sum(c for _, c in self.rows)


@dataclass(frozen=True)
class SLO:
    """A model's latency targets in seconds (None: no target)."""

    ttft_s: float | None = None  # submission to first token
    tpot_s: float | None = None  # mean time per output token after the first

    def __post_init__(self):
        for f in ("ttft_s", "tpot_s"):
            v = getattr(self, f)
            if v is not None and not v > 0:
                raise ValueError(f"SLO {f} must be > 0 seconds, got {v!r}")

    def met(self, m: RequestMetrics, output_tokens: int) -> bool:
        """Whether a finished request met both targets (a one-token output meets any TPOT)."""
        if m.first_token is None or m.finished is None:
            return False
        if self.ttft_s is not None and m.first_token - m.arrival > self.ttft_s:
            return False
        if self.tpot_s is not None and output_tokens > 1:
            return (m.finished - m.first_token) / (output_tokens - 1) <= self.tpot_s
        return True


def slo_from_ms(ttft_ms: float | None, tpot_ms: float | None) -> SLO | None:
    """An ``SLO`` from millisecond targets (a model spec's ``ttft_slo_ms``,
    ``tpot_slo_ms``); None when neither is set."""
    if ttft_ms is None and tpot_ms is None:
        return None
    return SLO(ttft_s=None if ttft_ms is None else ttft_ms / 1e3,
               tpot_s=None if tpot_ms is None else tpot_ms / 1e3)


@dataclass(frozen=True)
class BatchLimits:
    max_seqs: int  # running sequences (the largest decode batch)
    max_prefill_seqs: int  # rows of one prefill step
    prefill_token_budget: int  # tokens of one prefill step (and the longest chunk)


class ModelScheduler:
    """Waiting and running sequences of one model, and the blocks they hold.

    ``alloc`` is the device's KV allocator (``kvslab.KVAllocator``), shared with the other
    models on the device; this scheduler only allocates and frees under its own name.
    ``reclaim(name, n)``, when given, is asked before giving up on ``n`` blocks that do not
    fit (the engine compacts other models' sparse slabs); it returns whether they now fit.
    ``peers()``, when given, names the schedulers of every model on the device (this one
    may be among them): on a pool the models share, admission leaves headroom for their
    running decodes as well as this model's own.
    """

    def __init__(self, name: str, alloc, block: BlockFormat, limits: BatchLimits,
                 reclaim: Callable[[str, int], bool] | None = None, *,
                 slo: SLO | None = None, cost: Any = None,
                 peers: Callable[[], Iterable[ModelScheduler]] | None = None):
        self.name = name
        self.alloc = alloc
        self.reclaim = reclaim
        self.peers = peers
        self.block = block
        self.limits = limits
        self.slo = slo or SLO()
        self.cost = cost  # ``schedulers.costmodel.StepCost`` of this model on this device
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []  # admission order
        self.preemptions = 0
        self.dropped: list[tuple[Seq, str]] = []  # shed by ``drop``, for the caller to finish
        self.slo_misses = 0  # requests judged unable to meet their TTFT SLO
        self.last_step = -1  # device iteration at which this model last stepped
        self._last_kind = DECODE

    # ---------------------------------------------------------------- queries
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def prefilling(self) -> int:
        return sum(s.prefilling for s in self.running)

    def blocks_held(self) -> int:
        return sum(len(s.blocks) for s in self.running)

    def live_tokens(self) -> int:
        return sum(s.num_computed for s in self.running)

    # ----------------------------------------------------------------- verbs
    def add(self, seq: Seq) -> None:
        if self.slo.ttft_s is not None:
            seq.deadline = seq.arrival + self.slo.ttft_s
        self.waiting.append(seq)

    def drop(self, seq: Seq, reason: str) -> None:
        """Shed a waiting sequence; the caller finishes it (``take_dropped``)."""
        self.waiting.remove(seq)
        self._free(seq)
        self.dropped.append((seq, reason))

    def take_dropped(self) -> list[tuple[Seq, str]]:
        out, self.dropped = self.dropped, []
        return out

    def remove(self, seq: Seq) -> None:
        """Drop a sequence wherever it is (finished or aborted) and free its blocks now."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)

    def schedule(self, kind: str | None = None, order: list[Seq] | None = None,
                 budget: int | None = None) -> Scheduled | None:
        """The next step for this model, with its blocks allocated; None if it can't run.

        ``kind`` forces a step kind (default: alternate while both have work); ``order``
        is the prefill candidates in the order to feed them (default: sequences partly
        prefilled, then waiting ones in arrival order); ``budget`` caps the tokens of a
        prefill step below ``limits.prefill_token_budget``."""
        if kind is None:
            order_kinds = [PREFILL, DECODE] if self._last_kind == DECODE else [DECODE, PREFILL]
        else:
            order_kinds = [kind]
        for k in order_kinds:
            if k == PREFILL and self.has_prefill():
                rows = self._schedule_prefill(order, budget)
            elif k == DECODE and self.decodable():
                rows = self._schedule_decode()
            else:
                continue
            if rows:
                self._last_kind = k
                return Scheduled(k, rows)
        return None

    @property
    def last_kind(self) -> str:
        """The kind of this model's last step (DECODE before any)."""
        return self._last_kind

    def decodable(self) -> bool:
        return any(not s.prefilling for s in self.running)

    def has_prefill(self) -> bool:
        return bool(self.waiting) or any(s.prefilling for s in self.running)

    def prefill_candidates(self) -> list[Seq]:
        """Sequences partly prefilled (admission order), then waiting ones (queue order)."""
        return [s for s in self.running if s.prefilling] + list(self.waiting)

    def advance(self, seq: Seq, fed: int) -> bool:
        """After a step fed ``fed`` tokens of ``seq``: True if it now samples a token."""
        seq.num_computed += fed
        return seq.num_computed == len(seq.tokens)

    # ------------------------------------------------------------- internals
    def _blocks_needed(self, seq: Seq, tokens_after: int) -> int:
        return max(0, self.block.blocks_for(tokens_after) - len(seq.blocks))

    @property
    def decoding(self) -> int:
        """Running sequences whose prompt is in KV (each grows by a block now and then)."""
        return len(self.running) - self.prefilling

    def _peer_headroom(self) -> int:
        """Blocks of this model's size that the other models' running decodes may take
        from the pool at their next block: one block each, converted by the bytes a block
        takes in the pool. Nothing on static partitions, where no model draws on
        another's blocks. (A model with running decodes holds blocks, so it is still in
        the allocator.)"""
        if self.peers is None or self.alloc.kind == "static":
            return 0
        nbytes = 0
        for p in self.peers():
            if p is not self and (n := p.decoding):
                nbytes += n * self.alloc.layout(p.name).stride
        return -(-nbytes // self.alloc.layout(self.name).stride) if nbytes else 0

    def _fits(self, n: int) -> bool:
        if self.alloc.can_allocate(self.name, n):
            return True
        return self.reclaim is not None and self.reclaim(self.name, n)

    def _grow(self, seq: Seq, tokens_after: int) -> bool:
        need = self._blocks_needed(seq, tokens_after)
        if need and not self._fits(need):
            return False
        if need:
            seq.blocks.extend(self.alloc.allocate(self.name, need))
        return True

    def _free(self, seq: Seq) -> None:
        if seq.blocks:
            self.alloc.free(self.name, seq.blocks)
            seq.blocks = []

    def relocate(self, remap: dict[int, int]) -> None:
        """Rewrite running sequences' block handles after the allocator moved blocks
        (``src -> dst``, KV Slab compaction)."""
        for seq in self.running:
            seq.blocks = [remap.get(h, h) for h in seq.blocks]

    def preempt(self, seq: Seq) -> None:
        """Free a running sequence's blocks and requeue it first, to be recomputed."""
        self.running.remove(seq)
        self._free(seq)
        seq.num_computed = 0
        seq.metrics.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _schedule_decode(self) -> list[tuple[Seq, int]]:
        rows: list[tuple[Seq, int]] = []
        for seq in list(self.running):
            if seq.prefilling or seq not in self.running:
                continue
            while not self._grow(seq, seq.num_computed + 1):
                # newest admitted, best-effort ones (already counted as misses) first
                victim = next((q for q in reversed(self.running) if q.slo_missed),
                              self.running[-1])
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                rows.append((seq, 1))
        return rows

    def _schedule_prefill(self, order: list[Seq] | None = None,
                          budget: int | None = None) -> list[tuple[Seq, int]]:
        lim = self.limits
        budget = lim.prefill_token_budget if budget is None else min(budget,
                                                                     lim.prefill_token_budget)
        rows: list[tuple[Seq, int]] = []
        bt = self.block.block_tokens
        # A new sequence is admitted only when its whole prompt (every token still to
        # compute, not just this step's chunk) fits while the running ones keep a block
        # each of headroom for their next decode step: a sequence admitted on its first
        # chunk alone takes the blocks the running ones grow into with its later chunks,
        # and a decode short of blocks preempts the newest (itself), again and again.
        # On a shared pool the other models' decodes grow into the same free blocks.
        headroom = None  # counted at the first admission
        for seq in self.prefill_candidates() if order is None else order:
            if len(rows) == lim.max_prefill_seqs or budget == 0:
                break
            admitting = seq not in self.running
            if admitting and len(self.running) >= lim.max_seqs:
                break
            chunk = min(seq.remaining, budget)
            if admitting and headroom is None:
                headroom = self.decoding + self._peer_headroom()
            if admitting and not self._fits(
                    self._blocks_needed(seq, len(seq.tokens)) + headroom):
                break  # admitting it now would preempt a running sequence at its next block
            if not self._grow(seq, seq.num_computed + chunk):
                # Take what fits in the blocks this model can still get.
                fit = (len(seq.blocks) + self.alloc.free_blocks(self.name)) * bt - seq.num_computed
                chunk = min(chunk, fit)
                if chunk <= 0 or not self._grow(seq, seq.num_computed + chunk):
                    break  # queue order: nothing behind it jumps ahead
            if admitting:
                self.waiting.remove(seq)
                self.running.append(seq)
            rows.append((seq, chunk))
            budget -= chunk
        return rows
