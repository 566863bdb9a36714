"""Host-only simulation of KV memory under a bursty multi-model request stream.

No model runs: each step every running sequence of every model grows by one token, and the
only question is whose blocks fit where. That isolates what the KV allocator decides
(how many sequences run at once, how much memory sits idle) from kernel speed, so KV Slab
and its baselines can be compared on exactly the same stream in one process.

Workload (``Workload``, all parameters fixed by a seed):

* Arrivals: Poisson per step and model. Time is cut into phases of ``phase_steps``; in
  phase ``p`` model ``p % N`` is *hot* and gets ``hot_share`` of the offered KV demand, the
  others share the rest. Load thus alternates between the models in bursts.
* Lengths: ShareGPT-like, lognormal, means 161 prompt and 338 output tokens (the ShareGPT
  means reported in the vLLM paper, Kwon et al. 2023), log-space sigmas 1.0 and 0.9 (our
  assumption: long right tails), clipped to [4, 2048] each.
* Rate: ``load`` is the offered KV demand over the pool in every phase, by Little's law: a
  request holds on average ``P + (O + 1) / 2`` tokens for ``O`` steps, so model ``m`` at
  full share arrives at
  ``rate_m = load * pool_bytes / (E[O * (P + (O + 1) / 2)] * token bytes of m)``
  per step. Models of smaller formats thus get more requests for the same bytes, and each
  phase offers the same demand whichever model is hot. At ``load = 1`` the pool would be
  exactly full if memory were perfectly shared.

Scheduling (identical for every allocator): one FCFS queue per model. A request is admitted
when the blocks for its prompt (plus tokens generated before a preemption) fit; it then
grows one block at a time. Whenever blocks do not fit, the allocator is first asked to
``compact_for`` them (KV Slab packs other models' sparse slabs; the baselines never move
anything); the moves it returns are applied to the requests' block lists and counted. When a
growth still fails, the newest running request of that model is preempted (its blocks freed,
the request requeued at the front, its tokens recomputed on readmission) until the growth
fits or the growing request itself was the newest. A request that could never fit its
model's share of the pool is rejected on arrival.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np

from fineserve_jax.kvslab.allocator import KVAllocator

GIB = 1 << 30


def lognormal_lengths(rng: np.random.Generator, mean: float, sigma: float, n: int,
                      lo: int, hi: int) -> np.ndarray:
    """i32[n] token counts: the lognormal whose mean is ``mean``, rounded, clipped to [lo, hi]."""
    mu = np.log(mean) - sigma ** 2 / 2
    return np.clip(np.rint(rng.lognormal(mu, sigma, n)), lo, hi).astype(np.int32)


@dataclass(frozen=True)
class Workload:
    steps: int = 8000  # steps with arrivals; the run then drains what is left
    phase_steps: int = 2000  # length of one burst phase (steps)
    hot_share: float = 0.9  # fraction of arrivals to the phase's hot model
    load: float = 1.0  # offered KV demand / pool bytes (module docstring)
    prompt_mean: float = 161.0  # tokens
    prompt_sigma: float = 1.0  # lognormal sigma (log space)
    output_mean: float = 338.0  # tokens
    output_sigma: float = 0.9
    min_len: int = 4  # tokens, each of prompt and output
    max_len: int = 2048  # tokens, each of prompt and output
    seed: int = 0

    def __post_init__(self):
        for f in ("steps", "phase_steps", "min_len", "max_len"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ValueError(f"{f} must be a positive int")
        if self.min_len > self.max_len:
            raise ValueError("min_len > max_len")
        if not 0 < self.hot_share <= 1:
            raise ValueError("hot_share must be in (0, 1]")
        if not self.load > 0:
            raise ValueError("load must be > 0")

    def lengths(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(prompt i32[n], output i32[n]) token counts."""
        lo, hi = self.min_len, self.max_len
        return (lognormal_lengths(rng, self.prompt_mean, self.prompt_sigma, n, lo, hi),
                lognormal_lengths(rng, self.output_mean, self.output_sigma, n, lo, hi))

    def rates(self, token_bytes: list[float], pool_bytes: int) -> list[float]:
        """Arrivals per step of each model at full share, giving ``load`` (module docstring)."""
        p, o = self.lengths(np.random.default_rng([self.seed, 7]), 200_000)
        token_steps = float(np.mean(o * (p + (o + 1) / 2)))  # E[O (P + (O+1)/2)]
        return [self.load * pool_bytes / (token_steps * float(b)) for b in token_bytes]


@dataclass(frozen=True)
class Trace:
    arrival: np.ndarray  # i64[R] step of arrival, non-decreasing
    model: np.ndarray  # i32[R] index into the model list
    prompt: np.ndarray  # i32[R] prompt tokens
    output: np.ndarray  # i32[R] tokens to generate

    def __len__(self):
        return len(self.arrival)


def make_trace(w: Workload, rates: list[float]) -> Trace:
    """The bursty stream of the module docstring; ``rates[m]``: model m's full-share rate."""
    n = len(rates)
    rng = np.random.default_rng([w.seed, 1])
    hot = (np.arange(w.steps) // w.phase_steps) % n  # i64[steps]
    arrival, model = [], []
    for m, r in enumerate(rates):
        cold = (1 - w.hot_share) / (n - 1) if n > 1 else 0.0
        share = np.where(hot == m, w.hot_share if n > 1 else 1.0, cold)
        counts = rng.poisson(r * share)  # i64[steps]
        arrival.append(np.repeat(np.arange(w.steps), counts))
        model.append(np.full(int(counts.sum()), m, np.int32))
    arrival, model = np.concatenate(arrival), np.concatenate(model)
    order = np.argsort(arrival, kind="stable")  # by step, then model
    prompt, output = w.lengths(np.random.default_rng([w.seed, 2]), len(arrival))
    return Trace(arrival[order].astype(np.int64), model[order], prompt, output)


@dataclass(frozen=True)
class SimResult:
    kind: str  # the allocator's kind
    steps: int  # steps run, arrival window plus drain
    window: tuple[int, int]  # [start, end) steps the time averages are over
    running: np.ndarray  # i32[steps, N] running sequences per model after each step
    waiting: np.ndarray  # i32[steps, N] queued requests per model after each step
    live_tokens: np.ndarray  # i64[steps, N] live tokens per model after each step
    fragmentation: np.ndarray  # f64[samples] from stats() every stats_every steps
    padding_fraction: np.ndarray  # f64[samples] padding / reserved bytes
    sample_steps: np.ndarray  # i64[samples]
    arrived: int
    admitted: int  # admissions, readmissions after preemption included
    completed: int
    completed_in_window: int
    preempted: int
    rejected: int  # could never fit their model's share of the pool
    moved_blocks: int  # blocks relocated by compaction
    moved_bytes: int
    wait_steps: np.ndarray  # i64[completed] first admission - arrival, per completed request
    pool_bytes: int
    packed_tokens: dict  # model -> tokens that fit if it held all it may ever hold
    worst_padding: float  # max over models of a row's (or page's) bytes no block can use

    def metrics(self, phase_steps: int | None = None) -> dict:
        """JSON-safe summary over the window (time averages) and the whole run (counts).

        With ``phase_steps`` (the trace's), also the running sequences of the model that is
        hot in each step's phase: on average, on average over the steps where it has
        requests waiting (``hot_saturated_running``: how many sequences the pool lets the
        busy model run when it has more work than fits, the concurrency an allocator
        decides), and the mean over phases of each phase's peak.
        """
        a, b = self.window
        run = self.running[a:b].sum(axis=1)
        phase = {}
        if phase_steps:
            steps = np.arange(a, b)
            hot_m = (steps // phase_steps) % self.running.shape[1]
            hot = self.running[steps, hot_m]
            busy = self.waiting[steps, hot_m] > 0
            peaks = [int(hot[steps // phase_steps == p].max())
                     for p in np.unique(steps // phase_steps)]
            phase = {"hot_running_mean": float(hot.mean()),
                     "cold_running_mean": float((run - hot).mean()),
                     "hot_saturated_steps": int(busy.sum()),
                     "hot_saturated_running": float(hot[busy].mean()) if busy.any() else None,
                     "hot_phase_peak_mean": float(np.mean(peaks))}
        live = self.live_tokens[a:b].sum(axis=1)
        inw = (self.sample_steps >= a) & (self.sample_steps < b)
        frag, pad = self.fragmentation[inw], self.padding_fraction[inw]
        gib = self.pool_bytes / GIB
        return {
            "kind": self.kind, "steps": self.steps, "window": list(self.window),
            "peak_running": int(run.max()), "mean_running": float(run.mean()),
            "mean_running_by_model": [float(x) for x in self.running[a:b].mean(axis=0)],
            **phase,
            "peak_live_tokens_per_gib": float(live.max() / gib),
            "mean_live_tokens_per_gib": float(live.mean() / gib),
            "packed_tokens_per_gib": {k: v / gib for k, v in self.packed_tokens.items()},
            "fragmentation_mean": float(frag.mean()),
            "fragmentation_p95": float(np.percentile(frag, 95)),
            "padding_fraction_mean": float(pad.mean()), "worst_padding": self.worst_padding,
            "arrived": self.arrived, "admitted": self.admitted, "completed": self.completed,
            "completed_in_window": self.completed_in_window, "preempted": self.preempted,
            "rejected": self.rejected, "moved_blocks": self.moved_blocks,
            "moved_gib": self.moved_bytes / GIB,
            "wait_steps_mean": float(self.wait_steps.mean()) if len(self.wait_steps) else 0.0,
            "wait_steps_p95": (float(np.percentile(self.wait_steps, 95))
                               if len(self.wait_steps) else 0.0),
        }

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not isinstance(v, np.ndarray)}


class _Req:
    __slots__ = ("arrival", "blocks", "done", "first_admit", "generated", "model", "output",
                 "prompt", "seq", "start", "tokens0")

    def __init__(self, arrival, model, prompt, output):
        self.arrival, self.model, self.prompt, self.output = arrival, model, prompt, output
        self.generated = 0  # tokens generated before the current admission
        self.blocks: list[int] = []  # handles held
        self.seq = -1  # admission number while running (orders age), -1 when not running
        self.start = 0  # step of the current admission
        self.tokens0 = 0  # tokens held at admission (prompt + generated)
        self.first_admit = -1
        self.done = False


class _Sim:
    """The event loop: one instance per (allocator, trace) run."""

    def __init__(self, alloc: KVAllocator, models: list[str], trace: Trace):
        self.a, self.models = alloc, models
        self.T = [alloc.fmt(m).block_tokens for m in models]  # tokens per block, per model
        self.max_blocks = [alloc.free_blocks(m) for m in models]  # on the empty pool
        self.reqs = [_Req(int(t), int(m), int(p), int(o)) for t, m, p, o in
                     zip(trace.arrival, trace.model, trace.prompt, trace.output)]
        self.queues = [deque() for _ in models]  # waiting request ids, FCFS
        self.running: list[dict[int, None]] = [{} for _ in models]  # rid -> None, in admission order
        self.base = [0] * len(models)  # sum over running of tokens0 - start
        self.holder: list[dict[int, int]] = [{} for _ in models]  # block handle -> rid
        self.events: list[tuple[int, int, int, int]] = []  # (step, 0 finish/1 grow, seq, rid)
        self.n_seq = 0
        self.counts = {"admitted": 0, "completed": 0, "completed_in_window": 0,
                       "preempted": 0, "rejected": 0, "moved_blocks": 0, "moved_bytes": 0}

    def live_tokens(self, step: int) -> list[int]:
        return [b + len(r) * step for b, r in zip(self.base, self.running)]

    def _schedule(self, rid: int, step: int):
        r = self.reqs[rid]
        tokens = r.tokens0 + step - r.start
        finish = r.start + r.output - r.generated  # the step its last token comes
        grow = step + len(r.blocks) * self.T[r.model] - tokens + 1  # first step over capacity
        heapq.heappush(self.events, (finish, 0, r.seq, rid) if finish <= grow
                       else (grow, 1, r.seq, rid))

    def admit(self, step: int):
        """Per-model FCFS; models visited by the arrival time of their queue's head."""
        blocked = set()
        while True:
            heads = [(self.reqs[q[0]].arrival, i) for i, q in enumerate(self.queues)
                     if q and i not in blocked]
            if not heads:
                return
            _, i = min(heads)
            rid = self.queues[i][0]
            r = self.reqs[rid]
            tokens = r.prompt + r.generated
            need = -(-tokens // self.T[i])
            if not self.fits(i, need):
                blocked.add(i)
                continue
            self.queues[i].popleft()
            r.blocks = self.a.allocate(self.models[i], need)
            self.holder[i].update(dict.fromkeys(r.blocks, rid))
            r.seq, r.start, r.tokens0 = self.n_seq, step, tokens
            self.n_seq += 1
            r.first_admit = step if r.first_admit < 0 else r.first_admit
            self.running[i][rid] = None
            self.base[i] += tokens - step
            self.counts["admitted"] += 1
            self._schedule(rid, step)

    def fits(self, i: int, n: int) -> bool:
        """Can model ``i`` allocate ``n`` blocks, after compaction if that helps."""
        name = self.models[i]
        if self.a.can_allocate(name, n):
            return True
        moves = self.a.compact_for(name, n)
        if moves:
            self.apply_moves(moves)
        return self.a.can_allocate(name, n)

    def apply_moves(self, moves):
        """Rewrite the moved handles in the running requests' block lists."""
        by_model: dict[str, dict[int, int]] = {}
        for mv in moves:
            by_model.setdefault(mv.model, {})[mv.src] = mv.dst
        for name, remap in by_model.items():
            holder = self.holder[self.models.index(name)]
            for src, dst in remap.items():
                blocks = self.reqs[holder[src]].blocks
                blocks[blocks.index(src)] = dst
            for src, dst in remap.items():  # sources and destinations are disjoint
                holder[dst] = holder.pop(src)
            self.counts["moved_blocks"] += len(remap)
            self.counts["moved_bytes"] += len(remap) * self.a.fmt(name).block_bytes

    def _release(self, rid: int, step: int):
        r = self.reqs[rid]
        self.a.free(self.models[r.model], r.blocks)
        holder = self.holder[r.model]
        for h in r.blocks:
            del holder[h]
        r.blocks = []
        del self.running[r.model][rid]
        self.base[r.model] -= r.tokens0 - r.start
        r.seq = -1

    def preempt(self, rid: int, step: int):
        r = self.reqs[rid]
        r.generated += step - r.start  # recomputed on readmission (vLLM's recompute mode)
        self._release(rid, step)
        self.queues[r.model].appendleft(rid)
        self.counts["preempted"] += 1

    def run_events(self, step: int, window_end: int):
        while self.events and self.events[0][0] == step:
            _, kind, seq, rid = heapq.heappop(self.events)
            r = self.reqs[rid]
            if r.seq != seq:
                continue  # preempted since this event was scheduled
            if kind == 0:
                self._release(rid, step)
                r.done = True
                self.counts["completed"] += 1
                self.counts["completed_in_window"] += step < window_end
                continue
            name = self.models[r.model]
            while r.seq == seq:
                if not self.fits(r.model, 1):
                    self.preempt(next(reversed(self.running[r.model])), step)
                    continue
                (h,) = self.a.allocate(name, 1)
                r.blocks.append(h)
                self.holder[r.model][h] = rid
                self._schedule(rid, step)
                break


def simulate(alloc: KVAllocator, models: list[str], trace: Trace, *, warmup: int = 0,
             window_end: int | None = None, max_steps: int | None = None,
             stats_every: int = 10) -> SimResult:
    """Replay ``trace`` (model index i -> ``models[i]``, already added to ``alloc``).

    Runs until every request has finished or was rejected (or ``max_steps``); time averages
    are over steps ``[warmup, window_end)``, by default the arrival window. Every
    ``stats_every`` steps ``alloc.stats(live tokens)`` is sampled, which also checks that
    the allocator's figures add up.
    """
    sim = _Sim(alloc, list(models), trace)
    end = int(trace.arrival[-1]) + 1 if len(trace) else 1
    window_end = end if window_end is None else window_end
    max_steps = max_steps or 100 * end + 10_000
    run_rows, wait_rows, live_rows, samples = [], [], [], []
    nxt = 0
    step = 0
    for step in range(max_steps):
        while nxt < len(trace) and sim.reqs[nxt].arrival == step:
            r = sim.reqs[nxt]
            if -(-(r.prompt + r.output) // sim.T[r.model]) > sim.max_blocks[r.model]:
                sim.counts["rejected"] += 1
            else:
                sim.queues[r.model].append(nxt)
            nxt += 1
        sim.run_events(step, window_end)
        sim.admit(step)
        live = sim.live_tokens(step)
        run_rows.append([len(r) for r in sim.running])
        wait_rows.append([len(q) for q in sim.queues])
        live_rows.append(live)
        if step % stats_every == 0:
            st = alloc.stats(dict(zip(models, live)))
            samples.append((step, st.fragmentation, st.padding_fraction))
        if nxt == len(trace) and not sim.events and not any(sim.queues):
            break
    return _result(alloc, sim, trace, step + 1, (warmup, window_end), run_rows, wait_rows,
                   live_rows, samples)


def _result(alloc, sim, trace, steps, window, run_rows, wait_rows, live_rows,
            samples) -> SimResult:
    s = np.array(samples, dtype=np.float64).reshape(-1, 3)
    waits = [r.first_admit - r.arrival for r in sim.reqs if r.done]
    packed, worst = {}, 0.0
    for m, mx in zip(sim.models, sim.max_blocks):
        f, lay = alloc.fmt(m), alloc.layout(m)
        packed[m] = mx * f.block_tokens
        row_or_page = lay.stride if alloc.kind == "fixed-page" else alloc.row_bytes
        worst = max(worst, (row_or_page - (row_or_page // lay.stride) * f.block_bytes)
                    / row_or_page)
    return SimResult(
        kind=alloc.kind, steps=steps, window=window,
        running=np.array(run_rows, np.int32).reshape(-1, len(sim.models)),
        waiting=np.array(wait_rows, np.int32).reshape(-1, len(sim.models)),
        live_tokens=np.array(live_rows, np.int64).reshape(-1, len(sim.models)),
        fragmentation=s[:, 1], padding_fraction=s[:, 2], sample_steps=s[:, 0].astype(np.int64),
        arrived=len(trace), wait_steps=np.array(waits, np.int64), pool_bytes=alloc.pool_bytes,
        packed_tokens=packed, worst_padding=worst, **sim.counts)
