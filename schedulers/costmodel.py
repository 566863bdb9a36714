"""Step-time cost models: what one engine step of a model costs, for schedulers and simulators.

Plain Python and NumPy (no JAX): the local scheduler sizes batches with it, the global
scheduler sizes memory and placement with it, and the discrete-event simulator advances
its clock with it.

    cm = CostModel.load("benchmarks/results/profile_cpu.json")
    cost = cm.get("smollm2-135m-bf16", "bf16", "cpu")
    cost.decode_time([300] * 8)                 # one decode step of 8 sequences
    cost.prefill_time([256], [256])             # one prefill step, one 256-token chunk
    solo_ttft(cost, 1000, chunk_budget=256)     # a 1000-token prompt alone, chunked

Two implementations of ``StepCost``:

- ``ProfiledCost``: measured step times of one (model, precision, device kind), as the
  engine profiler records them. With the engine's shape buckets it predicts the way the
  engine runs: the batch is padded to its compiled bucket (rows, longest chunk, widest
  page table) and the measured time of that bucket is used.
- ``AnalyticCost`` (``schedulers.roofline``, re-exported here): a roofline model
  (``max(flops / achieved FLOP/s, bytes / achieved bytes/s)`` plus a fixed step overhead
  and tensor-parallel all-reduces) for GPU-scale shapes this machine cannot measure.

``CostModel`` keys them by (model, precision, device kind) and saves / loads them as JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from schedulers.roofline import (PRECISION_COSTS, AnalyticCost, DeviceSpec, Efficiency,
                                 ModelShape, PrecisionCost, check_rows)

__all__ = ["StepCost", "ProfiledCost", "EngineBuckets", "CostModel", "solo_ttft", "solo_tpot",
           "AnalyticCost", "ModelShape", "PrecisionCost", "PRECISION_COSTS", "DeviceSpec",
           "Efficiency"]

FORMAT = "fineserve-costmodel"
FORMAT_VERSION = 1
PREFILL, DECODE = "prefill", "decode"


class StepCost(Protocol):
    """Seconds of one engine step of one model."""

    def prefill_time(self, chunks: Sequence[int], contexts: Sequence[int]) -> float:
        """One prefill step: row i feeds ``chunks[i]`` prompt tokens and holds
        ``contexts[i]`` tokens in KV after the step."""
        ...

    def decode_time(self, contexts: Sequence[int]) -> float:
        """One decode step over ``len(contexts)`` sequences; ``contexts[i]`` = tokens in KV
        after the step."""
        ...


def solo_ttft(cost: StepCost, prompt_tokens: int, chunk_budget: int) -> float:
    """Seconds of the prefill steps of one prompt running alone, chunked by
    ``chunk_budget`` tokens per step (the last chunk samples the first token)."""
    if prompt_tokens < 1 or chunk_budget < 1:
        raise ValueError(f"need prompt_tokens >= 1 and chunk_budget >= 1, got "
                         f"{prompt_tokens} and {chunk_budget}")
    total, done = 0.0, 0
    while done < prompt_tokens:
        c = min(chunk_budget, prompt_tokens - done)
        done += c
        total += cost.prefill_time([c], [done])
    return total


def solo_tpot(cost: StepCost, context: int) -> float:
    """Seconds per output token of one sequence decoding alone at ``context`` tokens."""
    return cost.decode_time([context])


# --------------------------------------------------------------------- profiled
@dataclass(frozen=True)
class EngineBuckets:
    """The compiled shapes of the engine that was profiled (``EngineConfig.buckets``)."""

    block_tokens: int
    decode: tuple[int, ...]  # decode batch sizes
    prefill_rows: tuple[int, ...]  # rows of prefill steps
    chunks: tuple[int, ...]  # tokens per row of prefill steps
    context: tuple[int, ...]  # page-table widths, in blocks

    def __post_init__(self):
        if not isinstance(self.block_tokens, int) or self.block_tokens < 1:
            raise ValueError(f"block_tokens must be a positive int, got {self.block_tokens!r}")
        for f in ("decode", "prefill_rows", "chunks", "context"):
            v = tuple(int(x) for x in getattr(self, f))
            if not v or list(v) != sorted(set(v)) or v[0] < 1:
                raise ValueError(f"buckets.{f} must be increasing positive ints, got {v!r}")
            object.__setattr__(self, f, v)

    def blocks(self, context_tokens: int) -> int:
        return max(1, -(-int(context_tokens) // self.block_tokens))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping) -> EngineBuckets:
        return cls(int(d["block_tokens"]), *(tuple(d[k]) for k in
                                              ("decode", "prefill_rows", "chunks", "context")))


def snap(buckets: Sequence[int], n: float) -> float:
    """The smallest bucket >= n (the shape the engine pads to); n itself past the last."""
    for b in buckets:
        if b >= n:
            return float(b)
    return float(n)


class _Grid:
    """A monotone table on a rectilinear grid, read by multilinear interpolation.

    Measured values are first made non-decreasing along every axis (running maximum: a
    larger shape never predicts less time than a smaller one, whatever the timing noise).
    Below an axis's first point the value is held (clamped); past its last point it grows
    linearly with the relative slope of the last segment at the grid's far corner, as a
    factor ``1 + r * (x - last)`` shared by every other coordinate, which keeps the result
    monotone in each argument and linear along each axis.
    """

    def __init__(self, axes: Sequence[np.ndarray], values: np.ndarray):
        self.axes = [np.asarray(a, float) for a in axes]
        v = np.asarray(values, float)
        for ax in range(v.ndim):
            v = np.maximum.accumulate(v, axis=ax)
        self.values = v
        corner = v[(-1,) * v.ndim]
        self.rel_slope = []
        for ax, a in enumerate(self.axes):
            if len(a) < 2 or corner <= 0:
                self.rel_slope.append(0.0)
                continue
            prev = v[(-1,) * ax + (-2,) + (-1,) * (v.ndim - ax - 1)]
            self.rel_slope.append(float((corner - prev) / (corner * (a[-1] - a[-2]))))

    def __call__(self, *x: float) -> float:
        idx, wts, factor = [], [], 1.0
        for a, xi, r in zip(self.axes, x, self.rel_slope):
            if xi >= a[-1]:
                factor *= 1.0 + r * (xi - a[-1])
                idx.append((len(a) - 1, len(a) - 1))
                wts.append((1.0, 0.0))
            elif xi <= a[0]:
                idx.append((0, 0))
                wts.append((1.0, 0.0))
            else:
                j = int(np.searchsorted(a, xi, side="right")) - 1
                t = (xi - a[j]) / (a[j + 1] - a[j])
                idx.append((j, j + 1))
                wts.append((1.0 - t, t))
        total = 0.0
        for corner in np.ndindex(*(2,) * len(self.axes)):
            w = math.prod(wts[d][c] for d, c in enumerate(corner))
            if w:
                total += w * self.values[tuple(idx[d][c] for d, c in enumerate(corner))]
        return float(total * factor)


def _grid_from(points: Sequence[tuple[tuple[float, ...], float]], names: Sequence[str],
               what: str) -> _Grid:
    """Points ((coordinates), seconds) that fill a rectilinear grid -> ``_Grid`` (repeated
    coordinates are averaged). Raises ValueError naming the missing grid points."""
    if not points:
        raise ValueError(f"no {what} points measured")
    axes = [np.array(sorted({p[0][d] for p in points}), float) for d in range(len(names))]
    sums = np.zeros([len(a) for a in axes])
    counts = np.zeros_like(sums)
    for coords, sec in points:
        if not (sec > 0 and math.isfinite(sec)):
            raise ValueError(f"{what} point {dict(zip(names, coords))}: seconds must be "
                             f"positive, got {sec!r}")
        i = tuple(int(np.searchsorted(a, c)) for a, c in zip(axes, coords))
        sums[i] += sec
        counts[i] += 1
    missing = [dict(zip(names, (float(axes[d][j]) for d, j in enumerate(i))))
               for i in zip(*np.nonzero(counts == 0))]
    if missing:
        raise ValueError(f"{what} points do not fill the grid of {dict(zip(names, axes))}: "
                         f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    return _Grid(axes, sums / counts)


class ProfiledCost:
    """Measured step times of one (model, precision, device kind).

    ``points``: records ``{kind: "prefill"|"decode", rows, tokens (per row), seconds,
    context_blocks or context (tokens)}``, as ``fineserve_jax.engine.profile.measure_steps``
    returns them.

    With ``buckets`` (the engine's compiled shapes) a step is predicted the way the engine
    runs it: decode pads to (decode bucket of the batch size, context bucket of the widest
    page table), prefill to (row bucket, chunk bucket of the longest chunk, context bucket),
    and the measured time of that shape is returned; a batch past the largest buckets is
    extrapolated along the exceeded axes. The points must then cover every bucket shape.

    Without buckets the points are read as a table over (batch, context) for decode and
    (total prefill tokens, context) for prefill, interpolated linearly; ``context_stat``
    says which context of a mixed batch counts: ``"max"`` (rows padded to the longest, as
    this engine's XLA path does) or ``"mean"`` (a kernel that reads only live blocks).
    """

    def __init__(self, points: Sequence[Mapping], buckets: EngineBuckets | None = None, *,
                 block_tokens: int | None = None, context_stat: str = "max",
                 info: Mapping | None = None):
        if context_stat not in ("max", "mean"):
            raise ValueError(f"context_stat must be 'max' or 'mean', got {context_stat!r}")
        self.points = [dict(p) for p in points]
        self.buckets = buckets
        self.block_tokens = buckets.block_tokens if buckets else block_tokens
        self.context_stat = context_stat
        self.info = dict(info or {})
        dec = [p for p in self.points if p["kind"] == DECODE]
        pre = [p for p in self.points if p["kind"] == PREFILL]
        if len(dec) + len(pre) != len(self.points):
            bad = {p.get("kind") for p in self.points} - {DECODE, PREFILL}
            raise ValueError(f"point kinds must be 'prefill' or 'decode', got "
                             f"{sorted(map(str, bad))}")
        if buckets is not None:
            self._check_covers(dec, pre)
            self._decode = _grid_from([((p["rows"], self._blocks(p)), p["seconds"]) for p in dec],
                                      ("rows", "context_blocks"), "decode")
            self._prefill = _grid_from(
                [((p["rows"], p["tokens"], self._blocks(p)), p["seconds"]) for p in pre],
                ("rows", "tokens", "context_blocks"), "prefill")
        else:
            self._decode = _grid_from([((p["rows"], self._tokens(p)), p["seconds"]) for p in dec],
                                      ("batch", "context"), "decode")
            self._prefill = _grid_from(
                [((p["rows"] * p["tokens"], self._tokens(p)), p["seconds"]) for p in pre],
                ("total_tokens", "context"), "prefill")

    def _blocks(self, p: Mapping) -> int:
        if "context_blocks" in p:
            return int(p["context_blocks"])
        return self.buckets.blocks(p["context"])

    def _tokens(self, p: Mapping) -> float:
        if "context" in p:
            return float(p["context"])
        if self.block_tokens is None:
            raise ValueError("points give context_blocks: pass block_tokens (or buckets)")
        return float(p["context_blocks"] * self.block_tokens)

    def _check_covers(self, dec: list, pre: list) -> None:
        b = self.buckets
        have_d = {(p["rows"], self._blocks(p)) for p in dec}
        have_p = {(p["rows"], p["tokens"], self._blocks(p)) for p in pre}
        want_d = {(r, c) for r in b.decode for c in b.context}
        want_p = {(r, t, c) for r in b.prefill_rows for t in b.chunks for c in b.context}
        missing = sorted(want_d - have_d) + sorted(want_p - have_p)
        if missing:
            raise ValueError(f"the points miss bucket shapes (rows, [tokens,] context_blocks): "
                             f"{missing[:8]}{' ...' if len(missing) > 8 else ''}")

    def _context(self, contexts: Sequence[int]) -> float:
        return float(max(contexts) if self.context_stat == "max" else np.mean(contexts))

    # ------------------------------------------------------------------ StepCost
    def decode_time(self, contexts: Sequence[int]) -> float:
        check_rows(None, contexts)
        if not contexts:
            return 0.0
        n, b = len(contexts), self.buckets
        if b is None:
            return self._decode(n, self._context(contexts))
        return self._decode(snap(b.decode, n), snap(b.context, b.blocks(max(contexts))))

    def prefill_time(self, chunks: Sequence[int], contexts: Sequence[int]) -> float:
        check_rows(chunks, contexts)
        if not chunks:
            return 0.0
        b = self.buckets
        if b is None:
            return self._prefill(sum(chunks), self._context(contexts))
        return self._prefill(snap(b.prefill_rows, len(chunks)), snap(b.chunks, max(chunks)),
                             snap(b.context, b.blocks(max(contexts))))

    def bucket_shape(self, kind: str, chunks: Sequence[int] | None,
                     contexts: Sequence[int]) -> tuple[int, int, int]:
        """The (rows, tokens per row, page-table width) the engine pads a batch to."""
        b = self.buckets
        if b is None:
            raise ValueError("this profile has no engine buckets")
        P = int(snap(b.context, b.blocks(max(contexts))))
        if kind == DECODE:
            return int(snap(b.decode, len(contexts))), 1, P
        return int(snap(b.prefill_rows, len(chunks))), int(snap(b.chunks, max(chunks))), P

    # --------------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        return {"type": "profiled", "buckets": self.buckets.to_dict() if self.buckets else None,
                "block_tokens": self.block_tokens, "context_stat": self.context_stat,
                "info": self.info, "points": self.points}

    @classmethod
    def from_dict(cls, d: Mapping) -> ProfiledCost:
        b = d.get("buckets")
        return cls(d["points"], EngineBuckets.from_dict(b) if b else None,
                   block_tokens=d.get("block_tokens"),
                   context_stat=d.get("context_stat", "max"), info=d.get("info"))

    def __repr__(self):
        return (f"ProfiledCost({len(self.points)} points, "
                f"{'bucketed' if self.buckets else 'interpolated'})")


# ------------------------------------------------------------------ collection
_TYPES = {"profiled": ProfiledCost, "analytic": AnalyticCost}


@dataclass
class CostModel:
    """Step costs keyed by (model, precision, device kind), saved as versioned JSON.

    ``machine`` and ``engine`` record where and how the profiled entries were measured.
    """

    entries: dict[tuple[str, str, str], Any] = field(default_factory=dict)
    machine: dict = field(default_factory=dict)
    engine: dict = field(default_factory=dict)

    def add(self, model: str, precision: str, device_kind: str, cost: StepCost) -> None:
        if not hasattr(cost, "to_dict"):
            raise TypeError(f"{type(cost).__name__} cannot be saved (no to_dict)")
        self.entries[(model, precision, device_kind)] = cost

    def get(self, model: str, precision: str, device_kind: str) -> StepCost:
        try:
            return self.entries[(model, precision, device_kind)]
        except KeyError:
            have = ", ".join(f"({m}, {p}, {d})" for m, p, d in sorted(self.entries)) or "none"
            raise KeyError(f"no cost for model {model!r} at precision {precision!r} on "
                           f"{device_kind!r}; the cost model has: {have}") from None

    def keys(self) -> list[tuple[str, str, str]]:
        return sorted(self.entries)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, "machine": self.machine,
                "engine": self.engine,
                "entries": [{"model": m, "precision": p, "device_kind": d, **c.to_dict()}
                            for (m, p, d), c in sorted(self.entries.items())]}

    @classmethod
    def from_dict(cls, d: Mapping) -> CostModel:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a cost model: format is {d.get('format')!r}, "
                             f"expected {FORMAT!r}")
        if d.get("version") != FORMAT_VERSION:
            raise ValueError(f"cost model version {d.get('version')!r} is not supported "
                             f"(this code reads version {FORMAT_VERSION})")
        out = cls(machine=dict(d.get("machine") or {}), engine=dict(d.get("engine") or {}))
        for e in d["entries"]:
            kind = e.get("type")
            if kind not in _TYPES:
                raise ValueError(f"entry ({e.get('model')}, {e.get('precision')}): unknown "
                                 f"type {kind!r}; known {sorted(_TYPES)}")
            out.add(e["model"], e["precision"], e["device_kind"], _TYPES[kind].from_dict(e))
        return out

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return p

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
