"""The precisions a model can be served in, each one frozen recipe.

A precision says how every linear weight is stored (``WeightRecipe``), whether the
activations entering each linear layer and the attention queries are rounded to FP8, which
KV format the model's blocks use in the shared pool, and which outlier smoothing is folded
in before the weights are rounded (``SmoothingConfig``). Every field of a recipe is
recorded in a quantized checkpoint's metadata (``Precision.to_dict``), so a checkpoint says
exactly how it was made and can be served without re-quantizing.

=========== ========================================= ========== ========= =========
name        linear weights                            activations KV cache  queries
=========== ========================================= ========== ========= =========
bf16        as loaded (bf16 or float32)               as loaded   bf16/f32  as loaded
fp8         FP8 E4M3, per output channel               FP8/token   fp8       as loaded
w4a16       INT4 asym, group 128, int zero points      bf16        bf16      as loaded
fireq       INT4 sym, group 128, FP8 scales x 2^-m     FP8/token   int4      FP8
fireq-g32   INT4 asym, group 32, f16 scales + offsets  FP8/token   int4      FP8
=========== ========================================= ========== ========= =========

``fireq`` is FireQ's W4A8KV4 recipe as published, with all its smoothing. ``fireq-g32``
keeps FP8 activations and queries and the INT4 KV cache with its RoPE-aware key scaling, but
stores weights in asymmetric groups of 32 with float offsets: a model that arrives on a
4-bit grid (GGUF Q4_1, as SmolLM2 does) keeps its grid exactly instead of being rounded a
second, coarser time. Embeddings and the LM head stay in the model's dtype everywhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class WeightRecipe:
    """How linear weights are stored. ``kind``: "none" (as loaded), "fp8" or "int4"."""

    kind: str = "none"
    group: int = 128  # INT4: weights per group along K
    symmetric: bool = True  # INT4: q in [-8, 7] x scale; else q in [0, 15] x scale + offset
    scale_dtype: str = "fp8"  # INT4 group scales: "fp8" (with the pow2 multiplier), "bf16", "f16"
    zero: str = "float"  # INT4 asymmetric offsets: "float" (group min) or "int" (zero point)
    fit_grid: bool = True  # INT4 asymmetric: keep a 4-bit grid the weights already lie on
    pow2: bool = True  # INT4 FP8 scales: the per-tensor power-of-two multiplier (else 2^0)

    def __post_init__(self):
        if self.kind not in ("none", "fp8", "int4"):
            raise ValueError(f"weight kind must be none, fp8 or int4, got {self.kind!r}")
        if self.kind == "int4":
            if self.group not in (32, 64, 128):
                raise ValueError(f"INT4 group must be 32, 64 or 128, got {self.group}")
            if self.scale_dtype not in ("fp8", "bf16", "f16"):
                raise ValueError(f"scale_dtype must be fp8, bf16 or f16, got {self.scale_dtype!r}")
            if not self.symmetric and self.scale_dtype == "fp8":
                raise ValueError("asymmetric INT4 keeps its scales and offsets in bf16 or f16")
            if self.zero not in ("float", "int"):
                raise ValueError(f"zero must be float or int, got {self.zero!r}")


@dataclass(frozen=True)
class SmoothingConfig:
    """FireQ's outlier smoothing, every hyperparameter in one place (``quant.smoothing``).

    Channel-wise scales are folded offline into producer -> consumer pairs: the consumer's
    input channel ``j`` is multiplied by ``s_j = c / mean_i |W_ij|`` (mean over the
    consumer's output rows, the fused consumers' rows together) and the producer (RMSNorm
    gain or the producing linear's output row) divided by it. Pairs: input norm -> q/k/v
    (``c_qkv``), v -> o (``c_vo``; one scale per V channel, shared by the query heads of its
    group), post-attention norm -> gate/up (``c_gate_up``), up -> down (``c_down``); a pair
    whose ``c`` is 0 is off. ``v_mul`` scales V down and O up by the same factor first.

    Pre-RoPE: each key channel pair (i, i + D/2) of KV head h is multiplied by
    ``alpha / M[h, i]``, ``M`` the largest joint magnitude ``sqrt(k_i^2 + k_{i+D/2}^2)`` over
    the calibration tokens (RoPE rotates inside the pair, so the scale commutes with it);
    the queries of the group get the inverse; both are folded into the q/k projections.
    Post-RoPE: per KV head, the ``post_rope_topk`` channels with the largest magnitude
    after RoPE and their RoPE partners are multiplied by ``beta / Kmax`` online (after RoPE,
    before the KV cache and the query rounding), the queries by the inverse; those channels
    keep a pre-RoPE scale of 1. Statistics come from the unquantized model on
    ``calib_tokens`` tokens of the packaged Wikipedia text starting at ``calib_start``
    (disjoint from evaluation, which reads the corpus from its start), in sequences of
    ``calib_seq_len``. Defaults are FireQ's published settings.
    """

    c_qkv: float = 0.0
    c_vo: float = 0.0
    c_gate_up: float = 0.0096
    c_down: float = 0.015
    v_mul: float = 0.9
    pre_rope: bool = True
    alpha: float = 8.0
    post_rope: bool = True
    post_rope_topk: int = 8
    beta: float = 8.0
    calib_tokens: int = 20480
    calib_start: int = 262144
    calib_seq_len: int = 2048

    @property
    def channel(self) -> bool:
        return bool(self.c_qkv or self.c_vo or self.c_gate_up or self.c_down
                    or self.v_mul != 1.0)

    @property
    def needs_calibration(self) -> bool:
        return self.pre_rope or self.post_rope

    def without_channel(self) -> SmoothingConfig:
        return dataclasses.replace(self, c_qkv=0.0, c_vo=0.0, c_gate_up=0.0, c_down=0.0,
                                   v_mul=1.0)


@dataclass(frozen=True)
class Precision:
    name: str
    weights: WeightRecipe = field(default_factory=WeightRecipe)
    act_fp8: bool = False  # activations entering every quantized linear: FP8 per token
    kv_format: str | None = None  # None: the model dtype's plain format (bf16 / f32)
    query_fp8: bool = False  # attention queries rounded to FP8 per token and head
    smoothing: SmoothingConfig | None = None

    @property
    def quantized(self) -> bool:
        return self.weights.kind != "none"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Precision:
        d = dict(d)
        d["weights"] = WeightRecipe(**d.get("weights") or {})
        if d.get("smoothing") is not None:
            d["smoothing"] = SmoothingConfig(**d["smoothing"])
        return cls(**d)

    def replace(self, **changes) -> Precision:
        return dataclasses.replace(self, **changes)


PRECISIONS: dict[str, Precision] = {
    "bf16": Precision("bf16"),
    "fp8": Precision("fp8", WeightRecipe("fp8"), act_fp8=True, kv_format="fp8"),
    "w4a16": Precision("w4a16", WeightRecipe("int4", 128, symmetric=False, scale_dtype="f16",
                                             zero="int", fit_grid=False), kv_format="bf16"),
    "fireq": Precision("fireq", WeightRecipe("int4", 128, symmetric=True, scale_dtype="fp8"),
                       act_fp8=True, kv_format="int4", query_fp8=True,
                       smoothing=SmoothingConfig()),
    "fireq-g32": Precision("fireq-g32", WeightRecipe("int4", 32, symmetric=False,
                                                     scale_dtype="f16", zero="float"),
                           act_fp8=True, kv_format="int4", query_fp8=True,
                           smoothing=SmoothingConfig().without_channel()),
}


def get_precision(name: str | Precision) -> Precision:
    if isinstance(name, Precision):
        return name
    try:
        return PRECISIONS[name]
    except KeyError:
        raise ValueError(f"unknown precision {name!r}; choose from {sorted(PRECISIONS)}") from None
