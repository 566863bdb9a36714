"""Models joining and leaving a running engine: the engine half of re-placement.

    t = engine.attach_model("b", cfg, params, tok, precision="fp8")   # engine already started
    t.wait()                       # its step shapes are compiled; it is being scheduled
    r = engine.retire_model("a")   # refuses new requests to "a" at once
    r.wait()                       # "a"'s requests finished; its blocks and weights are gone

``attach_model`` takes the same arguments as ``Engine.add_model``. Under the engine's lock
the allocator takes the model (its KV reserve must fit what the other models leave free,
else ``ValueError`` and nothing changes); the weights go to the engine's device (or mesh)
in the caller's thread; the model enters the engine *warming*: it accepts requests, which
queue, but the local scheduler does not see it. Its step shapes are then compiled ahead of
time in a background thread (``jax.jit(...).lower(...).compile()`` on the same arguments
the loop will pass, so the loop's first call of each shape finds the executable in JAX's
cache), while the loop keeps serving the other models. The pool is never touched there:
a step donates the pool, so only the loop thread runs steps on it; lowering reads only the
pool's shape, type and sharding. When every shape is compiled the loop marks the model
*serving* and its queued requests are scheduled like any other.

``retire_model`` marks a model *retiring*: ``submit`` refuses it (``ModelRetiring``, a
``RequestRejected``), its running and waiting requests finish normally, then the loop
returns its blocks and reserve to the allocator and drops its runner (and with it the
device weights). A request submitted just before the retire is never lost: the refusal and
the retire message are ordered by one lock and the engine's inbox (FIFO).

Both return a ``Transition``: poll ``done``, block on ``wait``, or ``await wait_async``.
Engines that never attach or retire behave exactly as before: every model is *serving*.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

import jax
import numpy as np

log = logging.getLogger(__name__)

WARMING, SERVING, RETIRING = "warming", "serving", "retiring"  # ``model_state``
LIVE_MESSAGES = ("ready", "warm-failed", "retire")


class Transition:
    """Progress of one attach (done when the model is served) or retire (done when it is
    gone). ``error``: why it failed (the attach's compilation), else None."""

    def __init__(self, model: str, kind: str):
        self.model = model
        self.kind = kind  # "attach" | "retire"
        self.started = time.perf_counter()
        self.seconds: float | None = None  # from the call until done
        self.error: BaseException | None = None
        self._event = threading.Event()

    def __repr__(self):
        state = "failed" if self.error else "done" if self.done else "pending"
        return f"Transition({self.kind} {self.model!r}: {state})"

    @property
    def done(self) -> bool:
        return self._event.is_set()

    def _finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self.seconds = time.perf_counter() - self.started
        self._event.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until done (True) or ``timeout`` seconds pass (False); raises
        ``RuntimeError`` from ``error`` if it failed."""
        if not self._event.wait(timeout):
            return False
        if self.error is not None:
            raise RuntimeError(f"{self.kind} of model {self.model!r} failed: "
                               f"{self.error}") from self.error
        return True

    async def wait_async(self, timeout: float | None = None) -> bool:
        """``wait`` without blocking the event loop."""
        return await asyncio.to_thread(self.wait, timeout)


@dataclass(frozen=True)
class ModelSpec:
    """What ``attach_model`` needs to serve a model elsewhere (``Engine.model_spec``)."""

    name: str
    config: object  # ModelConfig
    params: object  # the serving engine's device weights (copied by the new engine)
    tokenizer: object
    dtype: str
    kv_format_name: str
    precision: str
    reserve_blocks: int | None
    cap_blocks: int | None
    slo: object = None
    cost: object = None

    def kwargs(self) -> dict:
        """Keyword arguments of ``attach_model`` / ``add_model`` besides the name."""
        return {"config": self.config, "params": self.params, "tokenizer": self.tokenizer,
                "dtype": self.dtype, "kv_format_name": self.kv_format_name,
                "precision": self.precision, "reserve_blocks": self.reserve_blocks,
                "cap_blocks": self.cap_blocks, "slo": self.slo, "cost": self.cost}


class LiveModels:
    """``Engine``'s verbs for models that join or leave while it serves (see the module).

    Uses the engine's ``_models``, ``_lock``, ``_inbox``, ``_wake``, ``alloc`` and
    ``pool``; the loop calls ``_live_message`` for the messages in ``LIVE_MESSAGES`` and
    ``_finish_retired`` after draining its inbox."""

    def _init_live(self) -> None:
        self._admit = threading.Lock()  # orders a submit's check against a retire
        self._retiring: set[str] = set()  # retires the loop has seen, not yet complete
        self._transitions: dict[tuple[str, str], Transition] = {}

    # ------------------------------------------------------------------ attach
    def attach_model(self, name: str, config, params, tokenizer, *,
                     precompile: bool | None = None, **kw) -> Transition:
        """Add a model to a started engine (arguments as ``add_model``); returns its
        attach ``Transition``, done once the model is scheduled. ``precompile``: compile its
        step shapes before it is scheduled (default: the engine's ``warmup`` setting;
        otherwise each shape compiles in the loop on first use). Raises ``ValueError``
        (nothing changed) if the name is taken or its KV reserve does not fit the pool."""
        if not self.started:
            raise RuntimeError("attach_model is for a started engine; use add_model")
        from fineserve_jax.engine.runner import PagedRunner
        from fineserve_jax.model.kv_formats import kv_format
        from fineserve_jax.model.paged import PagedKVCache
        from schedulers.batching import BatchLimits, ModelScheduler

        m = self._make_model(name, config, params, tokenizer, **kw)
        c = self.config
        precompile = c.warmup if precompile is None else bool(precompile)
        blk = kv_format(m.kv_format).block_format(m.config, c.block_tokens)
        reserve = m.reserve_blocks
        if reserve is None:  # one full prefill step of this model (as ``start``)
            reserve = (min(c.max_prefill_seqs, c.prefill_token_budget)
                       + blk.blocks_for(c.prefill_token_budget))
        with self._lock:
            if name in self._models:
                state = self.model_state(name)
                raise ValueError(f"model {name!r} is already on this engine ({state})")
            self.alloc.add_model(name, blk, reserve_blocks=reserve, cap_blocks=m.cap_blocks)
            m.reserve_blocks = reserve
            m.max_blocks = self._max_blocks(name)
        try:
            layout = self.alloc.layout(name)
            kv = PagedKVCache(kv_format(m.kv_format), blk, layout.blocks_per_row,
                              layout.stride, m.config.sliding_window)
            m.max_len = min(c.max_model_len, m.config.max_position_embeddings)
            m.buckets = c.buckets(m.max_len)
            m.runner = PagedRunner(m.config, m.params, m.dtype, kv, m.query_fp8,
                                   device=self._device, mesh=self._mesh)
        except BaseException:
            with self._lock:
                self.alloc.remove_model(name)
            raise
        m.params = None  # the runner holds the device copy
        limits = BatchLimits(c.max_seqs, c.max_prefill_seqs, c.prefill_token_budget)
        m.sched = ModelScheduler(m.name, self.alloc, blk, limits, self._reclaim,
                                 slo=m.slo, cost=self._scheduler_cost(m.cost),
                                 peers=self._schedulers)
        t = Transition(name, "attach")
        m.warm = False
        with self._lock:
            self._models[name] = m
            self._transitions[(name, "attach")] = t
        log.info("attaching %s: reserve %d blocks of %d B, compiling %s", name, reserve,
                 blk.block_bytes, "its step shapes" if precompile else "nothing")
        if not precompile:
            self._post(("ready", name, m))
        else:
            threading.Thread(target=self._warm, args=(m, t), name=f"warm-{name}",
                             daemon=True).start()
        return t

    def _max_blocks(self, name: str) -> int:
        """Most blocks one sequence of ``name`` may ever get: with the pool empty, all
        rows but the other models' reserves, within its cap (KV Slab); otherwise what is
        free now."""
        a = self.alloc
        return a.max_blocks(name) if a.kind == "kvslab" else a.free_blocks(name)

    def _warm(self, m, t: Transition) -> None:
        """Compile ``m``'s step shapes ahead of time (background thread), then hand the
        model to the loop."""
        try:
            n = compile_model(m.runner, m.buckets, lambda: self.pool, self._mover,
                              m.runner.kv.block.block_bytes,
                              committed=self._device is not None or self._mesh is not None,
                              stop=lambda: m.sched is None)  # retired meanwhile
            log.info("attach %s: %d executables compiled in %.1f s", m.name, n,
                     time.perf_counter() - t.started)
            self._post(("ready", m.name, m))
        except Exception as e:  # reported through the attach transition
            log.exception("compiling model %s for attach failed", m.name)
            self._post(("warm-failed", m.name, m, e))

    def _post(self, msg: tuple) -> None:
        self._inbox.put(msg)
        self._wake.set()

    def model_ready(self, name: str) -> bool:
        """Whether ``name`` is being scheduled (not warming, not gone)."""
        m = self._models.get(name)
        return m is not None and m.warm

    def model_state(self, name: str) -> str | None:
        """``RETIRING``, ``WARMING``, ``SERVING``, or None when not on this engine."""
        m = self._models.get(name)
        if m is None:
            return None
        return RETIRING if m.retiring else SERVING if m.warm else WARMING

    # ------------------------------------------------------------------ retire
    def retire_model(self, name: str) -> Transition:
        """Stop taking requests for ``name``; its requests in flight finish, then its KV
        and weights are released. Returns its retire ``Transition`` (the same one if the
        model is already retiring)."""
        m = self._model(name)
        with self._admit:
            t = self._transitions.get((name, "retire"))
            if t is not None and m.retiring:
                return t
            t = Transition(name, "retire")
            self._transitions[(name, "retire")] = t
            m.retiring = True
            self._post(("retire", name, m))  # after every submit that saw it serving
        log.info("retiring %s: %d requests in flight finish first", name, len(m.seqs))
        return t

    def model_spec(self, name: str) -> ModelSpec:
        """What another engine's ``attach_model`` needs to serve ``name`` (its device
        weights included; they are copied, so take it before retiring the model here)."""
        m = self._model(name)
        if m.runner is None:
            raise RuntimeError(f"model {name!r}: start the engine first")
        return ModelSpec(name, m.config, m.runner.params, m.tokenizer, m.dtype, m.kv_format,
                         m.precision, m.reserve_blocks, m.cap_blocks, m.slo, m.cost)

    # ------------------------------------------------------------ loop hooks
    def _live_message(self, msg: tuple) -> None:
        """An inbox message of ``LIVE_MESSAGES`` (loop thread, lock held)."""
        kind, name, m = msg[0], msg[1], msg[2]
        if self._models.get(name) is not m:
            return  # retired (and perhaps attached again) meanwhile
        t = self._transitions.get((name, "attach"))
        if kind == "ready":
            m.warm = True
            if t is not None and not t.done:
                t._finish()
                log.info("model %s is served (attached in %.1f s)", name, t.seconds)
        elif kind == "warm-failed":
            for seq in list(m.sched.waiting):
                m.failed += 1
                self._finish(m, seq, self._final(seq, "error", f"model {name!r} could not "
                                                 f"be compiled on this engine"))
            self._remove(m)
            if t is not None:
                t._finish(msg[3])
        else:  # "retire"
            self._retiring.add(name)

    def _finish_retired(self) -> None:
        """Remove retiring models with nothing left to run (loop thread, lock held). A
        model still warming with requests queued finishes warming and serves them first."""
        for name in sorted(self._retiring):
            m = self._models.get(name)
            if m is None:
                self._retiring.discard(name)
                continue
            if m.sched.waiting or m.sched.running:
                continue
            self._remove(m)
            self._retiring.discard(name)
            t = self._transitions.pop((name, "retire"), None)
            if t is not None:
                t._finish()
                log.info("model %s retired after %.1f s", name, t.seconds)

    def _remove(self, m) -> None:
        self.alloc.remove_model(m.name)  # raises if a block is still held: a bug
        del self._models[m.name]
        a = self._transitions.pop((m.name, "attach"), None)
        if a is not None and not a.done:
            a._finish(RuntimeError(f"model {m.name!r} was retired before it was ready"))
        m.runner = None  # the device weights go with it
        m.sched = None


# ----------------------------------------------------------- ahead-of-time compiles
def compile_model(runner, buckets, pool, mover, block_bytes: int, committed: bool,
                  stop=lambda: False) -> int:
    """Compile, without running, every executable ``Engine.warmup`` would make for one
    model: each (rows, tokens, context) step shape, the samplers and log-probability
    functions per batch, and the block mover for the model's block size. The arguments
    are those the loop passes (host int32 arrays, the device weights; ``pool()`` returns
    the engine's current pool, read for its type and sharding only: it may already be
    donated), so JAX's call cache holds the executables before the first step. A step's
    outputs are placed on its device (``committed``: the engine was given a device or a
    mesh) or left to JAX's default device, and JAX compiles per placement, so the
    samplers are compiled for the same one. Stops early when ``stop()``. Returns the
    number of executables compiled."""

    def _abstract(x) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                    sharding=x.sharding if committed else None)

    from fineserve_jax.engine.pool import MOVE_BUCKETS
    from fineserve_jax.engine.runner import (
        LOGPROBS,
        PROMPT_LOGPROBS,
        SAMPLER,
        StepBatch,
    )
    from fineserve_jax.sampling import FILTERED, GREEDY, RANDOM, SamplingArrays

    n = 0
    for (B, T, P) in buckets.shapes():
        if stop():
            return n
        b = StepBatch(np.zeros((B, T), np.int32), np.full((B, T), -1, np.int32),
                      np.zeros(B, np.int32), np.zeros((B, P), np.int32), np.zeros(B, np.int32),
                      SamplingArrays.build([], [], [], B), GREEDY)
        step = runner._step.fn.lower(runner.params, pool(), b.tokens, b.positions, b.seq_lens,
                                     b.page_table, b.logits_idx).compile()
        logits, _, hidden = (_abstract(o) for o in step.out_info)
        n += 1
        if P != buckets.context[0]:
            continue
        nxt = None
        for mode in (GREEDY, RANDOM, FILTERED):  # samplers depend on B only
            s = SAMPLER.fn.lower(logits, b.sampling, mode=mode).compile()
            nxt = nxt or _abstract(s.out_info)
            n += 1
        LOGPROBS.fn.lower(logits, nxt).compile()
        n += 1
        if T > 1:
            PROMPT_LOGPROBS.fn.lower(runner.head_weight, hidden, np.zeros((B, T), np.int32)
                                     ).compile()
            n += 1
    for k in MOVE_BUCKETS:
        a = np.zeros((4, k), np.int32)
        mover._fn(block_bytes).lower(pool(), *a).compile()
        n += 1
    return n
