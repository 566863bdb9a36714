"""Time every compiled step shape of a started engine: the points of the cost model.

``measure_steps(engine)`` runs each model's jitted step on the engine's own pool at every
(rows, tokens per row, page-table width) bucket, on realistic inputs: random valid token
ids, positions that end each row's context at the page table's full width, and page
tables that point to blocks allocated to that model from the pool. Before timing, those
blocks are filled with the model's real K/V (prefill steps, then block copies), so
attention reads real context (not zeros, not the poison a test pool starts with). The
blocks are freed again at the end; sequences the engine is running keep theirs untouched.

The records feed ``schedulers.costmodel.ProfiledCost``; ``python -m schedulers.profile``
writes them as a cost-model JSON.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Iterable, Sequence

import numpy as np

from fineserve_jax.engine.runner import StepBatch
from fineserve_jax.sampling import GREEDY, SamplingArrays


def measure_steps(engine, reps: int = 5, models: Iterable[str] | None = None,
                  seed: int = 0, progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Median seconds of one step at every compiled shape of each model.

    ``engine``: started with ``thread=False`` (the caller owns the loop, so nothing else
    donates the pool meanwhile); warmed up, or the untimed first run of a shape compiles it.
    Each shape runs once untimed, then ``reps`` timed runs, each until its sampled tokens
    are ready. The timed runs go in rounds (every shape of the model once per round, not
    one shape's runs back to back), so a slow spell of the host (another process, a
    neighbour on a shared machine) lands on one run of many shapes, which the median
    drops, rather than on every run of one shape. Returns ``{model, precision, kind:
    "prefill"|"decode", rows, tokens, context_blocks, seconds}`` records, one per shape, in
    ``Buckets.shapes()`` order; ``progress`` (optional) is called with each record as its
    model's rounds end.
    """
    if not engine.started:
        raise RuntimeError("start the engine (thread=False) before measuring it")
    if engine._thread is not None:
        raise RuntimeError("the engine runs its own loop thread; measure an engine started "
                           "with thread=False")
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    names = list(engine.models if models is None else models)
    rng = np.random.default_rng(seed)
    out = []
    for name in names:
        m = engine._model(name)
        bk = m.buckets
        shapes = ([("decode", B, 1, P) for B in bk.decode for P in bk.context]
                  + [("prefill", R, T, P) for R in bk.prefill_rows for T in bk.chunks
                     for P in bk.context])  # the order of ``Buckets.shapes()``
        handles = _allocate(engine, name, max(B * P for _, B, _, P in shapes))
        try:
            _fill(engine, m, handles, rng)
            batches = [_batch(m, B, T, P, handles, rng) for _, B, T, P in shapes]
            for batch in batches:  # untimed (compiles a shape the warm-up left out)
                _run(engine, m.runner, batch)
            times = [[] for _ in shapes]
            for _ in range(reps):  # one round runs every shape once
                for ts, batch in zip(times, batches):
                    ts.append(_run(engine, m.runner, batch))
            for (kind, B, T, P), ts in zip(shapes, times):
                out.append({"model": name, "precision": m.precision, "kind": kind,
                            "rows": B, "tokens": T, "context_blocks": P,
                            "seconds": float(statistics.median(ts))})
                if progress is not None:
                    progress(out[-1])
        finally:
            engine.alloc.free(name, handles)
    return out


def _allocate(engine, name: str, want: int) -> list[int]:
    """Up to ``want`` blocks of ``name`` (what the pool can give; rows share them if fewer)."""
    n = min(want, engine.alloc.free_blocks(name))
    if n < 1:
        raise RuntimeError(f"model {name!r} can get no KV block from the pool to measure with")
    return engine.alloc.allocate(name, n)


def _table(handles: Sequence[int], rows: int, width: int) -> np.ndarray:
    """i32[rows, width]: row r's page j is handle (r * width + j) mod len (distinct blocks
    while the pool gives enough)."""
    idx = (np.arange(rows)[:, None] * width + np.arange(width)[None, :]) % len(handles)
    return np.asarray(handles, np.int32)[idx]


def _batch(m, B: int, T: int, P: int, handles: Sequence[int], rng: np.random.Generator,
           start: int | None = None) -> StepBatch:
    """Every row feeds ``min(T, P * block_tokens)`` tokens ending at the table's full
    context, or from position ``start`` on (as many as fit); other columns are padding."""
    cap = P * m.runner.kv.block.block_tokens
    a = cap - min(T, cap) if start is None else start
    c = min(T, cap - a)
    tokens = np.zeros((B, T), np.int32)
    tokens[:, :c] = rng.integers(0, m.config.vocab_size, size=(B, c))
    positions = np.full((B, T), -1, np.int32)
    positions[:, :c] = np.arange(a, a + c)
    seq_lens = np.full(B, a + c, np.int32)
    logits_idx = np.full(B, c - 1, np.int32)
    return StepBatch(tokens, positions, seq_lens, _table(handles, B, P), logits_idx,
                     SamplingArrays.build([], [], [], B), GREEDY)


def _fill(engine, m, handles: Sequence[int], rng: np.random.Generator) -> None:
    """Write real K/V into every measured block: prefill steps at the model's largest
    prefill shape fill its first rows x width blocks (sequences of the widest table), and
    the engine's block mover copies them over the rest (a forward pass over every block
    would cost as much as the measurements themselves)."""
    bk = m.buckets
    R, T, P = bk.prefill_rows[-1], bk.chunks[-1], bk.context[-1]
    cap = P * m.runner.kv.block.block_tokens
    for start in range(0, cap, T):
        b = _batch(m, R, T, P, handles, rng, start=start)
        nxt, engine.pool, _ = m.runner.step(engine.pool, b)
    nxt.block_until_ready()
    filled = min(R * P, len(handles))
    bpr, stride = engine.alloc.layout(m.name)
    where = [(h // bpr, h % bpr * stride) for h in handles]
    moves = [(*where[i % filled], *where[i]) for i in range(filled, len(handles))]
    if moves:
        engine.pool = engine._mover(engine.pool, moves, engine.alloc.fmt(m.name).block_bytes)


def _run(engine, runner, batch: StepBatch) -> float:
    """Seconds of one step, until its sampled tokens are ready."""
    t0 = time.perf_counter()
    nxt, engine.pool, _ = runner.step(engine.pool, batch)
    nxt.block_until_ready()
    return time.perf_counter() - t0
