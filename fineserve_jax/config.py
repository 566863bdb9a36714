"""Model configuration: one frozen dataclass for the Llama family.

Read from an HF ``config.json`` (``ModelConfig.from_hf``) or from GGUF metadata
(``ModelConfig.from_gguf``). Everything that changes the computation lives here;
nothing is guessed from file names.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

# HF architectures whose forward pass is the Llama one (RMSNorm, RoPE with
# rotate_half, GQA attention, SwiGLU MLP).
SUPPORTED_HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_HF_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_GGUF_ARCHITECTURES = ("llama",)


class UnsupportedModelError(ValueError):
    """The checkpoint describes a model this engine does not implement."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (HF ``rope_scaling.rope_type == "llama3"``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self):
        if self.factor <= 0 or self.original_max_position_embeddings <= 0:
            raise ValueError(f"invalid llama3 rope_scaling: {self}")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("llama3 rope_scaling needs high_freq_factor > low_freq_factor")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of one Llama-family decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v/o projections
    mlp_bias: bool = False  # bias on gate/up/down projections
    rope_scaling: RopeScaling | None = None
    # Per-frequency divisors stored in a GGUF as ``rope_freqs.weight`` (how llama.cpp
    # records llama3 scaling); length head_dim // 2. Mutually exclusive with rope_scaling.
    rope_freq_factors: tuple[float, ...] | None = None
    sliding_window: int | None = None  # Mistral-style local attention window
    architecture: str = "llama"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None and self.rope_freq_factors is not None:
            raise ValueError("give rope_scaling or rope_freq_factors, not both")
        if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.head_dim // 2:
            raise ValueError(f"rope_freq_factors has {len(self.rope_freq_factors)} entries, "
                             f"expected head_dim // 2 = {self.head_dim // 2}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive, got {self.sliding_window}")

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        per_layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.num_layers * per_layer + self.vocab_size * d + d + head

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies, f32[head_dim // 2], scaling applied."""
        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
        if self.rope_freq_factors is not None:
            inv = inv / np.asarray(self.rope_freq_factors, np.float64)
        elif self.rope_scaling is not None:
            inv = _llama3_scale(inv, self.rope_scaling)
        return inv.astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.rope_freq_factors is not None:
            d["rope_freq_factors"] = list(self.rope_freq_factors)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        if d.get("rope_freq_factors") is not None:
            d["rope_freq_factors"] = tuple(float(x) for x in d["rope_freq_factors"])
        return cls(**d)

    # ------------------------------------------------------------------ readers
    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
        """From the dict of an HF ``config.json`` (Llama 2/3, Mistral)."""
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_HF_MODEL_TYPES or (
                archs and not any(a in SUPPORTED_HF_ARCHITECTURES for a in archs)):
            raise UnsupportedModelError(
                f"unsupported architecture: model_type={model_type!r}, architectures={archs}; "
                f"supported: {', '.join(SUPPORTED_HF_ARCHITECTURES)}")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"unsupported hidden_act {act!r}: only 'silu' (SwiGLU)")
        if cfg.get("pretraining_tp", 1) not in (1, None):
            raise UnsupportedModelError("pretraining_tp > 1 is not supported")
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = cfg.get("head_dim") or hidden // heads
        sliding = cfg.get("sliding_window") if model_type == "mistral" else None
        if model_type == "mistral" and cfg.get("use_sliding_window") is False:
            sliding = None
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
            rope_theta=float(cfg.get("rope_theta", _rope_params(cfg).get("rope_theta", 10000.0))),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            rope_scaling=_hf_rope_scaling(cfg),
            sliding_window=int(sliding) if sliding else None,
            architecture=model_type,
        )

    @classmethod
    def from_gguf(cls, fields: Mapping[str, Any], *, vocab_size: int, has_output: bool,
                  rope_freq_factors: np.ndarray | None = None) -> "ModelConfig":
        """From GGUF metadata already decoded to Python values.

        ``vocab_size`` comes from the token list, ``has_output`` says whether the file
        has a separate ``output.weight`` (otherwise the LM head is the embedding).
        """
        arch = fields.get("general.architecture")
        if arch not in SUPPORTED_GGUF_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported GGUF architecture {arch!r}; supported: {SUPPORTED_GGUF_ARCHITECTURES}")

        def get(key, default=None):
            full = f"{arch}.{key}"
            if full in fields:
                return fields[full]
            if default is None:
                raise ValueError(f"GGUF metadata is missing {full!r}")
            return default

        heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        head_dim = int(get("attention.key_length", hidden // heads))
        rope_dim = int(get("rope.dimension_count", head_dim))
        if rope_dim != head_dim:
            raise UnsupportedModelError(f"partial RoPE (rope.dimension_count={rope_dim} != "
                                        f"head_dim={head_dim}) is not supported")
        scaling = fields.get(f"{arch}.rope.scaling.type", "none")
        if scaling not in ("none", "", None):
            raise UnsupportedModelError(f"unsupported GGUF rope scaling type {scaling!r}")
        if int(get("expert_count", 0)) > 0:
            raise UnsupportedModelError("mixture-of-experts GGUF models are not supported")
        kv_heads = get("attention.head_count_kv", heads)
        factors = None
        if rope_freq_factors is not None:
            factors = tuple(float(x) for x in np.asarray(rope_freq_factors).reshape(-1))
        return cls(
            vocab_size=int(vocab_size),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=head_dim,
            max_position_embeddings=int(get("context_length", 2048)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            tie_word_embeddings=not has_output,
            rope_freq_factors=factors,
            architecture=arch,
        )


def _rope_params(cfg: Mapping[str, Any]) -> dict:
    # Newer HF configs may put rope settings under "rope_parameters".
    rp = cfg.get("rope_parameters")
    return dict(rp) if isinstance(rp, Mapping) else {}


def _hf_rope_scaling(cfg: Mapping[str, Any]) -> RopeScaling | None:
    rs = cfg.get("rope_scaling") or None
    if rs is None:
        rp = _rope_params(cfg)
        if rp.get("rope_type", "default") != "default":
            rs = rp
    if rs is None:
        return None
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise UnsupportedModelError(f"unsupported rope_scaling type {kind!r}: only 'llama3'")
    return RopeScaling(
        factor=float(rs["factor"]),
        low_freq_factor=float(rs["low_freq_factor"]),
        high_freq_factor=float(rs["high_freq_factor"]),
        original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
    )


def _llama3_scale(inv_freq: np.ndarray, rs: RopeScaling) -> np.ndarray:
    # Long wavelengths are slowed by `factor`, short ones kept, and the band between
    # the two cut-offs interpolated smoothly.
    old_ctx = rs.original_max_position_embeddings
    low_wavelen = old_ctx / rs.low_freq_factor
    high_wavelen = old_ctx / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (old_ctx / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)
