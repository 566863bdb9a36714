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
- ``AnalyticCost``: a roofline model (``max(flops / achieved FLOP/s, bytes / achieved
  bytes/s)`` plus a fixed step overhead and tensor-parallel all-reduces) for GPU-scale
  shapes this machine cannot measure.

``CostModel`` keys them by (model, precision, device kind) and saves / loads them as JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

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


def _check_rows(chunks: Sequence[int] | None, contexts: Sequence[int]) -> None:
    if chunks is not None and len(chunks) != len(contexts):
        raise ValueError(f"{len(chunks)} chunks but {len(contexts)} contexts")
    if any(c < 0 for c in contexts) or (chunks is not None and any(c < 1 for c in chunks)):
        raise ValueError("chunks must be >= 1 and contexts >= 0")
    if chunks is not None and any(c > x for c, x in zip(chunks, contexts)):
        raise ValueError("a row's context (tokens in KV after the step) includes its chunk")


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
            raise ValueError(f"point kinds must be 'prefill' or 'decode', got {sorted(map(str, bad))}")
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
        _check_rows(None, contexts)
        if not contexts:
            return 0.0
        n, b = len(contexts), self.buckets
        if b is None:
            return self._decode(n, self._context(contexts))
        return self._decode(snap(b.decode, n), snap(b.context, b.blocks(max(contexts))))

    def prefill_time(self, chunks: Sequence[int], contexts: Sequence[int]) -> float:
        _check_rows(chunks, contexts)
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


# --------------------------------------------------------------------- analytic
@dataclass(frozen=True)
class ModelShape:
    """The shapes of a Llama-family decoder that decide its cost."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = False

    def __post_init__(self):
        for f in ("layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ModelShape.{f} must be a positive int, got {v!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} must be a multiple of kv_heads {self.kv_heads}")

    @classmethod
    def llama3_8b(cls) -> ModelShape:
        return cls("llama-3-8b", 32, 4096, 14336, 32, 8, 128, 128256)

    @classmethod
    def llama3_70b(cls) -> ModelShape:
        return cls("llama-3-70b", 80, 8192, 28672, 64, 8, 128, 128256)

    @classmethod
    def llama2_7b(cls) -> ModelShape:
        return cls("llama-2-7b", 32, 4096, 11008, 32, 32, 128, 32000)

    @classmethod
    def smollm2_135m(cls) -> ModelShape:
        return cls("smollm2-135m", 30, 576, 1536, 9, 3, 64, 49152, tied_embeddings=True)

    @property
    def linear_params(self) -> int:
        """Weights of every layer's q, k, v, o, gate, up and down projections."""
        H, D = self.hidden, self.head_dim
        attn = H * self.heads * D * 2 + H * self.kv_heads * D * 2
        return self.layers * (attn + 3 * H * self.intermediate)

    @property
    def embedding_params(self) -> int:
        """Embedding table plus a separate LM head unless tied."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden


@dataclass(frozen=True)
class PrecisionCost:
    """What a precision costs in bytes and which tensor-core rate its matmuls run at."""

    name: str
    weight_bytes: float  # per linear weight (INT4: 0.5)
    group: int = 0  # linear weights per scale group along K (0: one scale per channel)
    group_scale_bytes: float = 0.0  # bytes of scale (+ offset) per group, or per channel
    kv_value_bytes: float = 2.0  # per K or V element in the cache
    kv_scale_bytes: int = 0  # per (token, KV head), for K and for V each
    matmul: str = "bf16"  # tensor-core rate of the linear layers: "bf16" | "fp8"
    attention: str = "bf16"  # rate of attention's two matmuls


# Bytes follow the stored formats (fineserve_jax.precisions, fineserve_jax.quant, and the KV
# formats of fineserve_jax.model.kv_formats). Embeddings, norms and the LM head stay bf16.
PRECISION_COSTS: dict[str, PrecisionCost] = {
    "bf16": PrecisionCost("bf16", 2.0),
    # E4M3 weights with one f32 scale per output channel; FP8 KV with a bf16 scale per head.
    "fp8": PrecisionCost("fp8", 1.0, 0, 4.0, 1.0, 2, "fp8", "fp8"),
    # INT4 asymmetric, group 128, f16 scale + f16 zero point per group; BF16 KV; BF16 matmul.
    "w4a16": PrecisionCost("w4a16", 0.5, 128, 4.0, 2.0, 0, "bf16", "bf16"),
    # INT4 symmetric, group 128, one FP8 scale per group; INT4 KV + bf16 scale; FP8 matmuls.
    "fireq": PrecisionCost("fireq", 0.5, 128, 1.0, 0.5, 2, "fp8", "fp8"),
    # INT4 asymmetric, group 32, f16 scale + f16 offset per group; as fireq otherwise.
    "fireq-g32": PrecisionCost("fireq-g32", 0.5, 32, 4.0, 0.5, 2, "fp8", "fp8"),
}


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator's datasheet ceilings (dense tensor-core rates, no sparsity)."""

    name: str
    memory_bytes: float
    hbm_bytes_per_s: float
    bf16_flops: float
    fp8_flops: float
    link_bytes_per_s: float = 0.0  # per-GPU NVLink bandwidth (one direction counted)

    @classmethod
    def h100_sxm(cls) -> DeviceSpec:
        # NVIDIA H100 SXM5 datasheet: 80 GB HBM3 at 3.35 TB/s; 989.4 TFLOP/s BF16 and
        # 1978.9 TFLOP/s FP8 dense (the sheet's 1979 / 3958 are with sparsity); NVLink 4
        # 900 GB/s total, 450 GB/s each way.
        return cls("H100-SXM", 80e9, 3.35e12, 989.4e12, 1978.9e12, 450e9)

    @classmethod
    def h200(cls) -> DeviceSpec:
        # NVIDIA H200 SXM datasheet: 141 GB HBM3e at 4.8 TB/s; same tensor cores and NVLink
        # as the H100 SXM.
        return cls("H200-SXM", 141e9, 4.8e12, 989.4e12, 1978.9e12, 450e9)


@dataclass(frozen=True)
class Efficiency:
    """How far below the datasheet a real step runs (fractions and fixed costs).

    Defaults are typical of tuned serving kernels on Hopper: memory-bound GEMV and paged
    attention reach about 80% of HBM bandwidth, large GEMMs about 65% of dense peak
    (FP8 a little less, its epilogues and scaling cost more); a step pays a fixed
    overhead for kernel launches, sampling and host scheduling; a ring all-reduce reaches
    about 70% of NVLink bandwidth plus a fixed latency per collective.
    """

    bandwidth: float = 0.80
    bf16_flops: float = 0.65
    fp8_flops: float = 0.55
    link: float = 0.70
    step_overhead_s: float = 3e-4
    allreduce_latency_s: float = 1e-5

    def __post_init__(self):
        for f in ("bandwidth", "bf16_flops", "fp8_flops", "link"):
            v = getattr(self, f)
            if not 0 < v <= 1:
                raise ValueError(f"Efficiency.{f} must be in (0, 1], got {v!r}")
        if self.step_overhead_s < 0 or self.allreduce_latency_s < 0:
            raise ValueError("overheads must be >= 0")


class AnalyticCost:
    """Roofline step time of a model at a precision on ``tp`` GPUs of one kind.

    ``time = overhead + max(flops / achieved FLOP/s, bytes / achieved bytes/s) + comm``
    per GPU, where weights, FLOPs and KV bytes are split by ``tp`` (KV only as far as KV
    heads go: a head is not split) and ``comm`` is two ring all-reduces of the step's
    activations per layer (after attention and after the MLP). Bytes per step: weights
    read once (the LM head, not the embedding table: only fed rows of it are read), the KV
    read (sum of contexts x KV bytes per token) and the KV written (fed tokens). The LM
    head runs on each row's last token only, as the engine does. Activations are ignored.
    """

    def __init__(self, shape: ModelShape, precision: str | PrecisionCost, device: DeviceSpec,
                 tp: int = 1, efficiency: Efficiency | None = None):
        if isinstance(precision, str):
            try:
                precision = PRECISION_COSTS[precision]
            except KeyError:
                raise ValueError(f"unknown precision {precision!r}; known: "
                                 f"{sorted(PRECISION_COSTS)}") from None
        if not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tp must be a positive int, got {tp!r}")
        if shape.heads % tp:
            raise ValueError(f"tp {tp} must divide the {shape.heads} query heads")
        self.shape, self.precision, self.device, self.tp = shape, precision, device, tp
        self.eff = efficiency or Efficiency()

    # ------------------------------------------------------------- memory sizes
    def weight_bytes(self) -> float:
        """Bytes of all weights (over all ``tp`` GPUs): linears in the precision's format,
        embeddings / LM head / norms in bf16."""
        s, p = self.shape, self.precision
        lin = s.linear_params * p.weight_bytes
        if p.group:
            lin += s.linear_params / p.group * p.group_scale_bytes
        elif p.group_scale_bytes:  # one scale per output channel of every linear
            H, D = s.hidden, s.head_dim
            outs = s.heads * D + 2 * s.kv_heads * D + H + 2 * s.intermediate + H
            lin += s.layers * outs * p.group_scale_bytes
        return lin + 2.0 * (s.embedding_params + s.norm_params)

    def weight_bytes_per_device(self) -> float:
        return self.weight_bytes() / self.tp

    def kv_bytes_per_token(self) -> float:
        """KV cache bytes of one token (K and V, every layer, scales included; all GPUs)."""
        s, p = self.shape, self.precision
        return s.layers * 2 * s.kv_heads * (s.head_dim * p.kv_value_bytes + p.kv_scale_bytes)

    def _kv_shards(self) -> int:
        return min(self.tp, self.shape.kv_heads)

    def _step_weight_bytes(self) -> float:
        """Weights one step reads per GPU: all but the embedding table (unless tied)."""
        s = self.shape
        table = 0.0 if s.tied_embeddings else 2.0 * s.vocab * s.hidden
        return (self.weight_bytes() - table) / self.tp

    # ------------------------------------------------------------------- time
    def _rate(self, kind: str) -> float:
        d, e = self.device, self.eff
        return d.fp8_flops * e.fp8_flops if kind == "fp8" else d.bf16_flops * e.bf16_flops

    def step_time(self, chunks: Sequence[int], contexts: Sequence[int]) -> float:
        """Seconds of one step feeding ``chunks[i]`` tokens to row i (context after)."""
        _check_rows(chunks, contexts)
        if not chunks:
            return 0.0
        s, p, tp = self.shape, self.precision, self.tp
        tokens = float(sum(chunks))
        # Attention FLOPs: a fed token at position j attends to j + 1 keys, QK^T and PV.
        attended = sum(c * (x - c) + c * (c + 1) / 2 for c, x in zip(chunks, contexts))
        attn_flops = 4.0 * s.layers * s.heads * s.head_dim * attended / tp
        lin_flops = 2.0 * s.linear_params * tokens / tp
        head_flops = 2.0 * s.vocab * s.hidden * len(chunks) / tp
        compute = (lin_flops / self._rate(p.matmul) + attn_flops / self._rate(p.attention)
                   + head_flops / self._rate("bf16"))
        kv = self.kv_bytes_per_token() / self._kv_shards()
        nbytes = self._step_weight_bytes() + kv * (sum(contexts) + tokens)
        memory = nbytes / (self.device.hbm_bytes_per_s * self.eff.bandwidth)
        return self.eff.step_overhead_s + max(compute, memory) + self._allreduce(tokens)

    def _allreduce(self, tokens: float) -> float:
        """Two ring all-reduces of bf16 activations [tokens, hidden] per layer."""
        if self.tp == 1:
            return 0.0
        if self.device.link_bytes_per_s <= 0:
            raise ValueError(f"device {self.device.name} has no link bandwidth for tp > 1")
        moved = 2.0 * (self.tp - 1) / self.tp * tokens * self.shape.hidden * 2.0
        one = moved / (self.device.link_bytes_per_s * self.eff.link) + self.eff.allreduce_latency_s
        return 2 * self.shape.layers * one

    def prefill_time(self, chunks: Sequence[int], contexts: Sequence[int]) -> float:
        return self.step_time(chunks, contexts)

    def decode_time(self, contexts: Sequence[int]) -> float:
        return self.step_time([1] * len(contexts), contexts)

    # --------------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        return {"type": "analytic", "shape": asdict(self.shape),
                "precision": asdict(self.precision), "device": asdict(self.device),
                "tp": self.tp, "efficiency": asdict(self.eff)}

    @classmethod
    def from_dict(cls, d: Mapping) -> AnalyticCost:
        return cls(ModelShape(**d["shape"]), PrecisionCost(**d["precision"]),
                   DeviceSpec(**d["device"]), int(d["tp"]), Efficiency(**d["efficiency"]))

    def __repr__(self):
        return (f"AnalyticCost({self.shape.name}, {self.precision.name}, {self.device.name}, "
                f"tp={self.tp})")


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
