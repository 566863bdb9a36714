"""The same model in HF ``transformers``: our ModelConfig + params tree -> LlamaForCausalLM.

Used by benchmarks (and usable by tests) as the reference implementation. The mapping is
strict: every tensor of ``param_specs`` must be present with its exact shape, and a key the
spec does not know raises. Weights are stored ``[out, in]`` in both layouts, so nothing is
transposed; per-layer weights are unstacked from the leading ``num_layers`` axis.

    hf_cfg = hf_llama_config(cfg)
    model = build_hf_model(cfg, params, torch.float32)   # eval mode, weights loaded
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_dtypes
import numpy as np

from checkpoints.assemble import HF_LAYER, HF_TOP
from fineserve_jax.config import ModelConfig
from fineserve_jax.model.params import flat_specs

# Our param name -> HF name (per layer: under ``model.layers.{i}.``): the converter's table inverted.
HF_LAYER_NAMES = {ours: hf for hf, ours in HF_LAYER.items()}
HF_TOP_NAMES = {ours: hf for hf, ours in HF_TOP.items()}


def hf_llama_config(cfg: ModelConfig):
    """A ``transformers.LlamaConfig`` computing what ``cfg`` computes.

    Raises ValueError for what HF Llama cannot express: GGUF per-frequency RoPE divisors
    (``rope_freq_factors``) and Mistral sliding-window attention.
    """
    from transformers import LlamaConfig

    if cfg.rope_freq_factors is not None:
        raise ValueError("rope_freq_factors (GGUF rope_freqs) has no LlamaConfig equivalent")
    if cfg.sliding_window is not None:
        raise ValueError("sliding-window attention is not expressible as a LlamaConfig")
    rope: dict[str, Any] = {"rope_type": "default"}
    if cfg.rope_scaling is not None:
        rope = {"rope_type": "llama3", **dataclasses.asdict(cfg.rope_scaling)}
    kwargs = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=cfg.attention_bias,
        mlp_bias=cfg.mlp_bias, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    if "rope_parameters" in getattr(LlamaConfig, "__dataclass_fields__", {}):
        # transformers >= 5: theta and scaling live together in rope_parameters.
        kwargs["rope_parameters"] = {**rope, "rope_theta": cfg.rope_theta}
    else:  # transformers 4.x
        kwargs["rope_theta"] = cfg.rope_theta
        kwargs["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    return LlamaConfig(**kwargs)


def hf_state_dict(cfg: ModelConfig, params: dict) -> dict:
    """params tree (numpy or JAX arrays, float32 or bfloat16) -> {HF name: torch.Tensor}.

    Tensors keep the params' dtype. A tied model gets no ``lm_head.weight`` (HF ties it).
    """
    specs = flat_specs(cfg)
    flat = _flatten(params)
    unknown = sorted(set(flat) - set(specs))
    missing = sorted(set(specs) - set(flat))
    if unknown or missing:
        raise ValueError(f"params do not match the config: unknown {unknown}, missing {missing}")
    out = {}
    for path, spec in specs.items():
        arr = np.asarray(flat[path])
        if arr.shape != spec.shape:
            raise ValueError(f"{path}: shape {arr.shape}, config expects {spec.shape}")
        if spec.stacked:
            name = HF_LAYER_NAMES[path.split(".", 1)[1]]
            for i in range(cfg.num_layers):
                out[f"model.layers.{i}.{name}"] = _to_torch(arr[i])
        else:
            out[HF_TOP_NAMES[path]] = _to_torch(arr)
    return out


def build_hf_model(cfg: ModelConfig, params: dict, torch_dtype):
    """``LlamaForCausalLM`` in ``torch_dtype`` with our weights, in eval mode, on CPU."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(hf_llama_config(cfg)).to(torch_dtype)
    sd = {k: v.to(torch_dtype) for k, v in hf_state_dict(cfg, params).items()}
    res = model.load_state_dict(sd, strict=False)
    missing = set(res.missing_keys) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    if missing or res.unexpected_keys:
        raise ValueError(f"state dict mismatch: missing {sorted(missing)}, "
                         f"unexpected {sorted(res.unexpected_keys)}")
    if cfg.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise ValueError("config ties the embeddings but the HF model did not tie lm_head")
    return model.eval()


def _flatten(params: dict) -> dict:
    out = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def _to_torch(arr: np.ndarray):
    """A torch copy (arrays from JAX are read-only; torch wants writable memory)."""
    import torch

    arr = np.array(arr, copy=True, order="C")
    if arr.dtype == np.dtype(ml_dtypes.bfloat16):  # torch cannot read numpy's bf16 directly
        return torch.from_numpy(arr.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(arr)
