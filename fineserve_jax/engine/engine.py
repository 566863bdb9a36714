"""The per-device engine: several models, one KV pool, one Python host loop.

    engine = Engine(EngineConfig(kv_budget_bytes=512 * 2**20))
    engine.add_model("smol-bf16", loaded.config, loaded.params, loaded.tokenizer)
    engine.start()                                   # allocator, pool, warm-up, loop thread
    h = engine.submit("smol-bf16", "Hello", SamplingParams(max_tokens=20))
    for delta in h: print(delta.text, end="")        # or `async for` inside an event loop
    engine.stats()                                   # waiting/running per model, slabs by owner

Each iteration (``step``) reads like the design: take submissions and aborts, ask the
local scheduler (``schedulers.local``) which model steps and with which batch (it may shed
requests that cannot meet their SLO), allocate that batch's blocks, run the
model's jitted step on the shared pool (donated and returned), hand out the tokens, free
what finished. Submissions and aborts from other threads go through an inbox that the
loop drains first, so blocks of an aborted request are free before the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fineserve_jax.config import ModelConfig
from fineserve_jax.engine.config import EngineConfig, pick
from fineserve_jax.engine.costs import CompiledSteps
from fineserve_jax.engine.handle import RequestHandle, StreamDelta
from fineserve_jax.engine.logprobs import (record_prompt_logprobs, step_logprobs,
                                           token_logprob)
from fineserve_jax.engine.runner import (LOGPROBS, PROMPT_LOGPROBS, SAMPLER, PagedRunner,
                                         StepBatch, TopLogprobs)
from fineserve_jax.engine.stats import EngineModelStats, EngineStats
from fineserve_jax.engine.steplog import StepLog, StepRecord
from fineserve_jax.engine.admission import ModelRetiring, check_prompt
from fineserve_jax.engine.alloc import make_allocator
from fineserve_jax.engine.live import LIVE_MESSAGES, LiveModels
from fineserve_jax.engine.pool import BlockMover, new_pool
from fineserve_jax.model.kv_formats import kv_format
from fineserve_jax.model.paged import PagedKVCache
from fineserve_jax.precisions import Precision, get_precision
from fineserve_jax.sampling import SamplingArrays, SamplingParams, batch_mode
from fineserve_jax.sequence import SequenceState
from fineserve_jax.tokenizer import Tokenizer
from schedulers.batching import (DECODE, SLO, BatchLimits, ModelScheduler, Scheduled, Seq,
                                 moves_by_model)
from schedulers.calibration import DeviceSpeed
from schedulers.local import LocalScheduler, make_local_scheduler

log = logging.getLogger(__name__)

DEFAULT_KV_FORMAT = {"float32": "f32", "bfloat16": "bf16"}


@dataclass
class _Model:
    name: str
    config: ModelConfig
    params: object
    tokenizer: Tokenizer
    dtype: str
    kv_format: str
    precision: str
    reserve_blocks: int | None
    cap_blocks: int | None
    query_fp8: bool = False
    slo: SLO | None = None
    cost: object = None  # schedulers.costmodel.StepCost of this model on this device
    max_len: int = 0  # prompt + output cap of one sequence
    buckets: object = None  # config.Buckets
    runner: PagedRunner | None = None
    sched: ModelScheduler | None = None
    max_blocks: int = 0  # most blocks one sequence may ever get (pool empty)
    steps: int = 0
    tokens_out: int = 0
    finished: int = 0
    aborted: int = 0
    dropped: int = 0  # shed by ``drop`` (SLO)
    failed: int = 0
    peak_running: int = 0
    blocks_moved: int = 0  # relocated by compaction
    seqs: dict = field(default_factory=dict)  # request id -> Seq, while live
    warm: bool = True  # False while an attached model's steps compile (``live``)
    retiring: bool = False  # refusing requests until its last one ends (``live``)


class Engine(LiveModels, CompiledSteps):
    """Continuous batching of several models on one device over one shared KV pool.

    Models join a started engine with ``attach_model`` and leave with ``retire_model``
    (``engine.live``)."""

    def __init__(self, config: EngineConfig | None = None,
                 scheduler: LocalScheduler | None = None, device: jax.Device | None = None,
                 mesh: jax.sharding.Mesh | None = None, speed: DeviceSpeed | None = None):
        """``scheduler``: the device's local scheduler (default: ``config.scheduler``).
        ``device``: where the pool and every model's weights live (default: JAX's).
        ``mesh``: instead, a 1-D ``"tp"`` mesh (``engine.sharding.tp_mesh``): every model
        is sharded tensor-parallel over its devices and the pool replicated on them.
        ``speed``: the device's speed factor, shared by the online cost corrections of all
        its models (``schedulers.calibration.DeviceSpeed``); pass one object to engines
        that share a device. Default: this engine's own (weight
        ``config.cost_calibration``; none when that is 0)."""
        if device is not None and mesh is not None:
            raise ValueError("Engine: give a device or a mesh, not both")
        self.config = config or EngineConfig()
        if speed is None and self.config.cost_calibration:
            speed = DeviceSpeed(weight=self.config.cost_calibration)
        self.speed = speed
        self._device = device
        self._mesh = mesh
        self.scheduler = scheduler or make_local_scheduler(self.config.scheduler,
                                                           self.config.on_slo_miss)
        self._models: dict[str, _Model] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._iteration = 0
        self._rng = np.random.default_rng()
        self.alloc = None
        self.pool = None
        self._mover = BlockMover()
        self.started = False
        self.device: str | None = None  # where the pool lives, once started
        self.jax_device = None  # the same, as a jax.Device
        self.warmup_seconds = 0.0
        self.step_log = StepLog()  # what each iteration ran and how long it took
        self._init_live()

    def __repr__(self):
        return (f"Engine(models={list(self._models)}, allocator={self.config.allocator!r}, "
                f"kv_budget={self.config.kv_budget_bytes / 2**20:.0f} MiB, "
                f"started={self.started})")

    # ----------------------------------------------------------------- setup
    def add_model(self, name: str, config: ModelConfig, params, tokenizer: Tokenizer, *,
                  dtype: str = "bfloat16", kv_format_name: str | None = None,
                  precision: str | Precision = "bf16", reserve_blocks: int | None = None,
                  cap_blocks: int | None = None, slo: SLO | None = None,
                  cost=None) -> None:
        """Register a model before ``start``. ``params`` are already in ``precision``
        (``quant.quantize_model`` or a converted checkpoint); the precision picks the KV
        format (``kv_format_name`` overrides it) and whether queries are rounded to FP8.
        ``reserve_blocks`` defaults to one full prefill step's blocks; ``cap_blocks``
        (optional) bounds what the model may hold. ``slo`` sets its latency targets and
        ``cost`` (a ``schedulers.costmodel.StepCost``) predicts its step times for the
        local scheduler."""
        if self.started:
            raise RuntimeError("add models before start() (attach_model adds to a started "
                               "engine)")
        if name in self._models:
            raise ValueError(f"model {name!r} already added")
        self._models[name] = self._make_model(
            name, config, params, tokenizer, dtype=dtype, kv_format_name=kv_format_name,
            precision=precision, reserve_blocks=reserve_blocks, cap_blocks=cap_blocks,
            slo=slo, cost=cost)

    def _make_model(self, name: str, config: ModelConfig, params, tokenizer: Tokenizer, *,
                    dtype: str = "bfloat16", kv_format_name: str | None = None,
                    precision: str | Precision = "bf16", reserve_blocks: int | None = None,
                    cap_blocks: int | None = None, slo: SLO | None = None,
                    cost=None) -> _Model:
        """A checked ``_Model`` (arguments as ``add_model``), not yet in the engine."""
        prec = get_precision(precision)
        w = params["layers"]["wq"]
        if prec.quantized == isinstance(w, (np.ndarray, jax.Array)):
            raise ValueError(f"{name}: precision {prec.name!r} needs "
                             f"{'quantized' if prec.quantized else 'unquantized'} linear "
                             f"weights, got {type(w).__name__} (quantize with "
                             f"fineserve_jax.quant.quantize_model or load a checkpoint "
                             f"converted with --precision {prec.name})")
        fmt_name = (kv_format_name or prec.kv_format
                    or DEFAULT_KV_FORMAT.get(str(jnp.dtype(dtype))))
        kv_format(fmt_name)  # validates
        return _Model(name, config, params, tokenizer, str(jnp.dtype(dtype)), fmt_name,
                      prec.name, reserve_blocks, cap_blocks, query_fp8=prec.query_fp8,
                      slo=slo, cost=cost)

    def start(self, thread: bool = True) -> "Engine":
        """Build the allocator and pool, warm up every bucket, start the loop thread.

        With ``thread=False`` nothing runs in the background: call ``step`` or
        ``run_until_idle`` yourself (deterministic tests, notebooks)."""
        if self.started:
            raise RuntimeError("engine already started")
        if not self._models:
            raise RuntimeError("no models added")
        c = self.config
        formats = {m.name: kv_format(m.kv_format).block_format(m.config, c.block_tokens)
                   for m in self._models.values()}
        self.alloc = make_allocator(c.allocator, c.kv_budget_bytes, formats)
        limits = BatchLimits(c.max_seqs, c.max_prefill_seqs, c.prefill_token_budget)
        for m in self._models.values():
            blk = formats[m.name]
            reserve = m.reserve_blocks
            if reserve is None:  # one full prefill step of this model
                reserve = min(c.max_prefill_seqs, c.prefill_token_budget) + blk.blocks_for(
                    c.prefill_token_budget)
            self.alloc.add_model(m.name, blk, reserve_blocks=reserve, cap_blocks=m.cap_blocks)
            m.reserve_blocks = reserve
        for m in self._models.values():
            blk = formats[m.name]
            layout = self.alloc.layout(m.name)
            kv = PagedKVCache(kv_format(m.kv_format), blk, layout.blocks_per_row, layout.stride,
                              m.config.sliding_window)
            m.max_len = min(c.max_model_len, m.config.max_position_embeddings)
            m.buckets = c.buckets(m.max_len)
            m.runner = PagedRunner(m.config, m.params, m.dtype, kv, m.query_fp8,
                                   device=self._device, mesh=self._mesh)
            m.params = None  # the runner holds the device copy
            m.sched = ModelScheduler(m.name, self.alloc, blk, limits, self._reclaim,
                                     slo=m.slo, cost=self._scheduler_cost(m.cost),
                                     peers=self._schedulers)
            m.max_blocks = self.alloc.free_blocks(m.name)
        self._new_pool()
        # The pool array is donated by every step: other threads read the device here.
        self.jax_device = next(iter(self.pool.devices()))
        self.device = str(self.jax_device)
        if c.warmup:
            self.warmup()
        self.started = True
        need = [m.name for m in self._models.values()
                if m.cost is None and m.slo is not None and m.slo != SLO()]
        if need and c.profile_reps:
            self.profile_costs(c.profile_reps, need)
        if thread:
            self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
            self._thread.start()
        return self

    def _schedulers(self) -> list[ModelScheduler]:
        """Every model's scheduler on this device (``ModelScheduler.peers``)."""
        return [m.sched for m in list(self._models.values()) if m.sched is not None]

    def _new_pool(self) -> None:
        """Allocate the device pool; sequences holding KV in an old one are recomputed."""
        for m in self._models.values():
            for seq in list(m.sched.running):
                m.sched.preempt(seq)
        self.pool = new_pool(self.alloc.num_rows, self.alloc.row_bytes, self.config.pool_fill,
                             self._device, mesh=self._mesh)

    def _reclaim(self, name: str, n: int) -> bool:
        """Compact other models' sparse slabs until ``n`` blocks fit ``name`` (if they can):
        copy the moved blocks in the pool and rewrite the running sequences' page tables."""
        moves = self.alloc.compact_for(name, n)
        if not moves:
            return False
        for mname, remap in moves_by_model(moves).items():
            m = self._models[mname]
            m.sched.relocate(remap)
            fmt, (bpr, stride) = self.alloc.fmt(mname), self.alloc.layout(mname)
            copies = [(s // bpr, s % bpr * stride, d // bpr, d % bpr * stride)
                      for s, d in remap.items()]
            try:
                self.pool = self._mover(self.pool, copies, fmt.block_bytes)
            except Exception:
                log.exception("moving %d KV blocks of %s failed; its sequences are recomputed",
                              len(copies), mname)
                if self.pool.is_deleted():
                    self._new_pool()
                for seq in list(m.sched.running):
                    m.sched.preempt(seq)
                continue
            m.blocks_moved += len(remap)
        return self.alloc.can_allocate(name, n)

    def set_slo(self, name: str, slo: SLO | None) -> None:
        """Change a model's latency targets; requests that arrive from now on get them."""
        m = self._model(name)
        m.slo = slo
        if m.sched is not None:
            with self._lock:
                m.sched.slo = slo or SLO()

    def shutdown(self, wait: bool = True) -> None:
        """Stop the loop thread (requests still running are left unfinished)."""
        self._stop = True
        self._wake.set()
        if wait and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    @property
    def running(self) -> bool:
        """Started and its loop thread (if any) still alive."""
        return self.started and not self._stop and (
            self._thread is None or self._thread.is_alive())

    def weights(self, name: str):
        """The device weights a model's steps run on (after ``start``)."""
        return self._model(name).runner.params

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self._models)

    def kv_plan(self) -> dict[str, dict]:
        """How the KV budget serves each model (after ``start``): block size, reserve, and
        the most tokens one model may hold when the others hold only their reserves."""
        out = {}
        for m in self._models.values():
            f = self.alloc.fmt(m.name)
            out[m.name] = {"kv_format": m.kv_format, "block_tokens": f.block_tokens,
                           "block_bytes": f.block_bytes, "reserve_blocks": m.reserve_blocks,
                           "reserve_tokens": m.reserve_blocks * f.block_tokens,
                           "max_tokens": m.max_blocks * f.block_tokens}
        return out

    def model_info(self, name: str) -> dict:
        m = self._model(name)
        return {"name": name, "precision": m.precision, "dtype": m.dtype,
                "kv_format": m.kv_format, "max_model_len": m.max_len or None,
                "max_blocks_per_seq": m.max_blocks or None,
                "config": m.config, "tokenizer": m.tokenizer}

    def compiled_steps(self) -> int:
        """Traces (compilations) of this engine's model steps, shared ones counted once,
        plus the process-wide sampler's: constant once warm-up is done."""
        runners = {id(m.runner._step): m.runner for m in self._models.values() if m.runner}
        return (sum(r.traces for r in runners.values()) + SAMPLER.traces + self._mover.traces
                + LOGPROBS.traces + PROMPT_LOGPROBS.traces)

    # -------------------------------------------------------------- requests
    def submit(self, model: str, prompt: str | Sequence[int], params: SamplingParams | None = None,
               *, request_id: str | None = None, sync: bool | None = None) -> RequestHandle:
        """Queue a request; returns its handle at once. Raises ValueError on bad input.

        The handle streams to ``async for`` when submitted from a running event loop and
        to a plain ``for`` otherwise; ``sync=True`` forces the latter (a notebook cell
        runs inside an event loop but wants blocking iteration)."""
        m = self._model(model)
        params = params or SamplingParams()
        if isinstance(prompt, str):
            text, ids = prompt, m.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(i) for i in prompt]
        self._check_prompt(m, ids, params)
        loop = None
        if not sync:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                pass
        rid = request_id or uuid.uuid4().hex
        handle = RequestHandle(rid, model, text, ids, self.abort, loop)
        seed = params.seed if params.seed is not None else int(self._rng.integers(2**31))
        state = SequenceState(m.tokenizer, params, ids, text, max_total_len=m.max_len or None)
        seq = Seq(rid, state, seed, handle, list(ids), metrics=handle.metrics)
        with self._admit:  # a retire posted after this put finds the request queued
            if m.retiring:
                raise ModelRetiring(f"model {model!r} is being retired from this engine "
                                    f"and takes no new requests", "model")
            self._inbox.put(("submit", model, seq))
        self._wake.set()
        return handle

    def abort(self, request_id: str) -> None:
        """Stop a request; its blocks are freed before the engine's next step."""
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def drop(self, request_id: str, reason: str) -> None:
        """Shed a request the engine will not serve (e.g. it cannot meet its SLO): it
        finishes with ``finish_reason="dropped"`` and ``reason`` as its error, its blocks
        freed before the next step; the server answers 503 with ``Retry-After``."""
        self._inbox.put(("drop", request_id, reason))
        self._wake.set()

    def _check_prompt(self, m: _Model, ids: list[int], params: SamplingParams) -> None:
        max_len = m.max_len or min(self.config.max_model_len, m.config.max_position_embeddings)
        check_prompt(ids, params, m.config.vocab_size, max_len,
                     m.runner.kv.block.block_tokens if self.started else None, m.max_blocks)

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        while not self._stop:
            try:
                ran = self.step()
            except Exception:  # the loop must survive anything one step does
                log.exception("engine iteration failed")
                ran = False
            if not ran:
                self._wake.wait(timeout=0.5)
                self._wake.clear()

    def run_until_idle(self, max_steps: int = 1_000_000) -> int:
        """Step in this thread until no model has work (for ``thread=False`` engines)."""
        n = 0
        while n < max_steps and self.step():
            n += 1
        return n

    def step(self) -> bool:
        """One iteration: drain the inbox, schedule one model, run, postprocess."""
        t_start = time.monotonic()
        with self._lock:
            self._drain_inbox()
            if self._retiring:
                self._finish_retired()
            picked = self._schedule()
            if picked is None:
                self._fail_unschedulable()
                return False
            m, work = picked
            batch = self._build_batch(m, work)
            chunks = tuple(c for _, c in work.rows)
            contexts = tuple(s.num_computed + c for s, c in work.rows)
        try:
            t_run = time.monotonic()
            nxt, self.pool, aux = m.runner.step(self.pool, batch)
            nxt = np.asarray(nxt)
            t_ran = time.monotonic()
            lps = step_logprobs(m.runner, work.rows, batch, nxt, aux)
        except Exception as e:
            log.exception("step of model %s failed", m.name)
            with self._lock:
                for seq, _ in work.rows:
                    self._finish(m, seq, StreamDelta("", [], "error", error=f"{type(e).__name__}: {e}"))
                if self.pool.is_deleted():  # donated to the failed step: the KV is gone
                    self._new_pool()
            return True
        with self._lock:
            self._postprocess(m, work, nxt, lps)
            observe = getattr(m.sched.cost, "observe", None)
            if observe is not None:
                observe(work.kind, chunks, contexts, t_ran - t_run)
        self.step_log.add(StepRecord(m.name, work.kind, chunks, contexts, t_start, t_run, t_ran,
                                     time.monotonic()))
        return True

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "submit":
                _, name, seq = msg
                m = self._models[name]
                m.seqs[seq.id] = seq
                m.sched.add(seq)
            elif msg[0] in LIVE_MESSAGES:  # a model attached or retired while serving
                self._live_message(msg)
            else:  # ("abort", id) from the caller, ("drop", id, reason) from a scheduler
                rid = msg[1]
                for m in self._models.values():
                    seq = m.seqs.get(rid)
                    if seq is None:
                        continue
                    if msg[0] == "drop":
                        m.dropped += 1
                        self._finish(m, seq, self._final(seq, "dropped", msg[2]))
                    else:
                        m.aborted += 1
                        self._finish(m, seq, self._final(seq, "abort"))

    def _schedule(self) -> tuple[_Model, Scheduled] | None:
        now = time.monotonic()
        got = self.scheduler.next_step([m.sched for m in self._models.values() if m.warm],
                                       now)
        for m in self._models.values():
            for seq, reason in m.sched.take_dropped():
                m.dropped += 1
                self._finish(m, seq, self._final(seq, "dropped", reason))
        if got is None:
            return None
        sched, work = got
        self._iteration += 1
        for seq, _ in work.rows:
            seq.metrics.first_scheduled = seq.metrics.first_scheduled or now
        return self._models[sched.name], work

    def _fail_unschedulable(self) -> None:
        # Nothing could run: if no sequence holds blocks anywhere, the head request of a
        # stuck model can never fit (the pool is as empty as it gets), so it fails.
        if any(m.sched.running for m in self._models.values()):
            return
        for m in self._models.values():
            if m.sched.waiting and m.warm:  # a warming model's requests wait for it
                seq = m.sched.waiting[0]
                m.failed += 1
                self._finish(m, seq, self._final(seq, "error", "the request does not fit the "
                                                 "KV pool"))

    def _build_batch(self, m: _Model, work: Scheduled) -> StepBatch:
        bk = m.buckets
        n = len(work.rows)
        if work.kind == DECODE:
            B, T = pick(bk.decode, n, "decode batch"), 1
        else:
            B = pick(bk.prefill_rows, n, "prefill rows")
            T = pick(bk.chunks, max(c for _, c in work.rows), "prefill chunk")
        P = pick(bk.context, max(len(s.blocks) for s, _ in work.rows), "context blocks")
        tokens = np.zeros((B, T), np.int32)
        positions = np.full((B, T), -1, np.int32)
        seq_lens = np.zeros(B, np.int32)
        page_table = np.zeros((B, P), np.int32)
        logits_idx = np.zeros(B, np.int32)
        for i, (seq, c) in enumerate(work.rows):
            a = seq.num_computed
            tokens[i, :c] = seq.tokens[a:a + c]
            positions[i, :c] = np.arange(a, a + c)
            seq_lens[i] = a + c
            page_table[i, :len(seq.blocks)] = seq.blocks
            logits_idx[i] = c - 1
        seqs = [s for s, _ in work.rows]
        params = [s.state.params for s in seqs]
        sampling = SamplingArrays.build(params, [s.seed for s in seqs],
                                        [len(s.state.output_ids) for s in seqs], B)
        return StepBatch(tokens, positions, seq_lens, page_table, logits_idx, sampling,
                         batch_mode(params))

    def _postprocess(self, m: _Model, work: Scheduled, nxt: np.ndarray,
                     lps: tuple[TopLogprobs | None, TopLogprobs | None] = (None, None)) -> None:
        m.steps += 1
        m.peak_running = max(m.peak_running, len(m.sched.running))
        now = time.monotonic()
        gen_lp, prompt_lp = lps
        for i, (seq, c) in enumerate(work.rows):
            if seq.id not in m.seqs:
                continue
            params = seq.state.params
            if prompt_lp is not None and params.prompt_logprobs is not None:
                record_prompt_logprobs(seq, c, i, prompt_lp)
            if not m.sched.advance(seq, c):
                continue
            first = not seq.state.output_ids and not seq.prompt_sent
            prompt_out = None
            if first and params.prompt_logprobs is not None:
                prompt_out = [None] + seq.prompt_lps
                seq.prompt_sent = True
            if params.max_tokens == 0:  # scoring the prompt only
                seq.metrics.first_token = seq.metrics.first_token or now
                m.finished += 1
                self._finish(m, seq, StreamDelta("", [], "length", len(seq.state.prompt_ids), 0,
                                                 prompt_logprobs=prompt_out))
                continue
            tok = int(nxt[i])
            seq.metrics.first_token = seq.metrics.first_token or now
            text = seq.state.append(tok)
            seq.tokens.append(tok)
            m.tokens_out += 1
            d = StreamDelta(text, [tok], seq.state.finish_reason, len(seq.state.prompt_ids),
                            len(seq.state.output_ids), prompt_logprobs=prompt_out)
            if gen_lp is not None and params.logprobs is not None:
                d.logprobs = [token_logprob(gen_lp, i, tok, params.logprobs)]
            if seq.state.finished:
                m.finished += 1
                self._finish(m, seq, d)
            else:
                seq.sink.push(d)

    def _final(self, seq: Seq, reason: str, error: str | None = None) -> StreamDelta:
        return StreamDelta("", [], reason, len(seq.state.prompt_ids), len(seq.state.output_ids),
                           error)

    def _finish(self, m: _Model, seq: Seq, last: StreamDelta) -> None:
        m.sched.remove(seq)  # frees its blocks now
        m.seqs.pop(seq.id, None)
        seq.sink.push(last)

    # ---------------------------------------------------------- introspection
    def _model(self, name: str) -> _Model:
        try:
            return self._models[name]
        except KeyError:
            raise KeyError(f"model {name!r} is not served; served: {list(self._models)}") from None

    def stats(self) -> EngineStats:
        """A consistent snapshot: per model queues and counters, the pool by owner."""
        with self._lock:
            models = {}
            for m in self._models.values():
                s = m.sched
                scale = self.cost_factors(m.name)
                models[m.name] = EngineModelStats(
                    name=m.name, precision=m.precision, kv_format=m.kv_format,
                    waiting=len(s.waiting) if s else 0, running=len(s.running) if s else 0,
                    prefilling=s.prefilling if s else 0,
                    preempted_waiting=sum(q.preemptions > 0 for q in s.waiting) if s else 0,
                    preemptions=s.preemptions if s else 0, finished=m.finished,
                    aborted=m.aborted, dropped=m.dropped, failed=m.failed, steps=m.steps,
                    tokens_generated=m.tokens_out, peak_running=m.peak_running,
                    blocks_held=s.blocks_held() if s else 0, blocks_moved=m.blocks_moved,
                    slo_misses=s.slo_misses if s else 0,
                    cost_scale_prefill=scale["prefill"], cost_scale_decode=scale["decode"])
            live = {m.name: m.sched.live_tokens() for m in self._models.values() if m.sched}
            pool = self.alloc.stats(live) if self.alloc is not None else None
            return EngineStats(models, pool, self._iteration, self.compiled_steps())

