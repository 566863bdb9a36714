"""A roofline step-time model for GPU-scale shapes this machine cannot measure.

``AnalyticCost`` implements ``schedulers.costmodel.StepCost`` from a model's shapes
(``ModelShape``), a precision's storage and tensor-core rate (``PrecisionCost``), a GPU's
datasheet ceilings (``DeviceSpec``), a tensor-parallel degree and documented efficiency
factors (``Efficiency``). The cluster simulator and the global scheduler use it; the global
scheduler sizes memory with ``weight_bytes()`` and ``kv_bytes_per_token()``.

Plain Python (no JAX, no NumPy needed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence


def check_rows(chunks: Sequence[int] | None, contexts: Sequence[int]) -> None:
    """Validate one step's rows (``chunks`` None: a decode step)."""
    if chunks is not None and len(chunks) != len(contexts):
        raise ValueError(f"{len(chunks)} chunks but {len(contexts)} contexts")
    if any(c < 0 for c in contexts) or (chunks is not None and any(c < 1 for c in chunks)):
        raise ValueError("chunks must be >= 1 and contexts >= 0")
    if chunks is not None and any(c > x for c, x in zip(chunks, contexts)):
        raise ValueError("a row's context (tokens in KV after the step) includes its chunk")


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
    def llama2_13b(cls) -> ModelShape:
        return cls("llama-2-13b", 40, 5120, 13824, 40, 40, 128, 32000)

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
        check_rows(chunks, contexts)
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
                "precision_cost": asdict(self.precision), "device": asdict(self.device),
                "tp": self.tp, "efficiency": asdict(self.eff)}

    @classmethod
    def from_dict(cls, d: Mapping) -> AnalyticCost:
        return cls(ModelShape(**d["shape"]), PrecisionCost(**d["precision_cost"]),
                   DeviceSpec(**d["device"]), int(d["tp"]), Efficiency(**d["efficiency"]))

    def __repr__(self):
        return (f"AnalyticCost({self.shape.name}, {self.precision.name}, {self.device.name}, "
                f"tp={self.tp})")
