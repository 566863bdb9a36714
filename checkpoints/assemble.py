"""Strict assembly of a params tree from a stream of named source tensors.

Each source tensor is mapped to (param path, layer, transform), checked against the
param spec's shape, cast to the target dtype and written into a preallocated stacked
array; nothing else is held, so peak memory stays near one copy of the weights.
Unknown, duplicate and missing tensors raise with their names.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from checkpoints.errors import CheckpointError
from checkpoints.gguf_source import unpermute_rope_rows
from fineserve_jax.config import ModelConfig
from fineserve_jax.model.params import flat_specs, unflatten

Transform = Callable[[np.ndarray], np.ndarray] | None

# Source name -> our param name (per-layer names are under model.layers.{i} / blk.{i}).
HF_LAYER = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "wq", "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv", "self_attn.o_proj.weight": "wo",
    "self_attn.q_proj.bias": "bq", "self_attn.k_proj.bias": "bk",
    "self_attn.v_proj.bias": "bv", "self_attn.o_proj.bias": "bo",
    "post_attention_layernorm.weight": "mlp_norm",
    "mlp.gate_proj.weight": "w_gate", "mlp.up_proj.weight": "w_up",
    "mlp.down_proj.weight": "w_down",
    "mlp.gate_proj.bias": "b_gate", "mlp.up_proj.bias": "b_up", "mlp.down_proj.bias": "b_down",
}
HF_TOP = {"model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm",
           "lm_head.weight": "lm_head"}
_HF_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

GGUF_LAYER = {
    "attn_norm.weight": "attn_norm",
    "attn_q.weight": "wq", "attn_k.weight": "wk", "attn_v.weight": "wv",
    "attn_output.weight": "wo",
    "attn_q.bias": "bq", "attn_k.bias": "bk", "attn_v.bias": "bv", "attn_output.bias": "bo",
    "ffn_norm.weight": "mlp_norm",
    "ffn_gate.weight": "w_gate", "ffn_up.weight": "w_up", "ffn_down.weight": "w_down",
    "ffn_gate.bias": "b_gate", "ffn_up.bias": "b_up", "ffn_down.bias": "b_down",
}
GGUF_TOP = {"token_embd.weight": "embed", "output_norm.weight": "final_norm",
             "output.weight": "lm_head"}


class NameMap:
    """Source naming scheme -> (param path, layer index or None, transform)."""

    def __init__(self, cfg: ModelConfig, fmt: str):
        if fmt not in ("hf", "gguf"):
            raise ValueError(fmt)
        self.cfg, self.fmt = cfg, fmt
        self.top, self.layer = (HF_TOP, HF_LAYER) if fmt == "hf" else (GGUF_TOP, GGUF_LAYER)
        self.prefix = re.compile(r"model\.layers\.(\d+)\.(.+)" if fmt == "hf" else r"blk\.(\d+)\.(.+)")

    def map(self, name: str) -> tuple[str, int | None, Transform] | None:
        """None for a tensor to skip knowingly; raises for an unknown one."""
        if self.fmt == "hf" and _HF_IGNORED.fullmatch(name):
            return None
        if name in self.top:
            path = self.top[name]
            if path == "lm_head" and self.cfg.tie_word_embeddings:
                return None  # a tied model may also store its (identical) head
            return path, None, None
        m = self.prefix.fullmatch(name)
        if m and m.group(2) in self.layer:
            path = "layers." + self.layer[m.group(2)]
            return path, int(m.group(1)), self._transform(path)
        raise CheckpointError(f"unknown tensor {name!r} in {self.fmt} checkpoint")

    def _transform(self, path: str) -> Transform:
        if self.fmt == "gguf" and path in ("layers.wq", "layers.bq"):
            return lambda w: unpermute_rope_rows(w, self.cfg.num_heads)
        if self.fmt == "gguf" and path in ("layers.wk", "layers.bk"):
            return lambda w: unpermute_rope_rows(w, self.cfg.num_kv_heads)
        return None

    def source_name(self, path: str, layer: int | None) -> str:
        table = self.top if layer is None else self.layer
        key = next((k for k, v in table.items() if v == path.split(".")[-1]), path)
        if layer is None:
            return key
        return f"model.layers.{layer}.{key}" if self.fmt == "hf" else f"blk.{layer}.{key}"


def assemble(cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]], fmt: str,
             dtype: str, *, total: int | None = None, progress: bool = True) -> dict:
    """Build the params tree (numpy arrays of ``dtype``) from (name, array) pairs."""
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    specs = flat_specs(cfg)
    names = NameMap(cfg, fmt)
    out: dict[str, np.ndarray] = {}
    seen: dict[tuple[str, int | None], str] = {}
    for name, arr in tqdm(tensors, total=total, desc="tensors", unit="t", disable=not progress,
                          leave=False):
        mapped = names.map(name)
        if mapped is None:
            continue
        path, layer, transform = mapped
        spec = specs.get(path)
        if spec is None:
            raise CheckpointError(f"unexpected tensor {name!r}: the config has no {path} "
                                  f"(check attention_bias / mlp_bias / tie_word_embeddings)")
        if (layer is None) == spec.stacked:
            raise CheckpointError(f"tensor {name!r} maps to {path} with the wrong layering")
        if layer is not None and not 0 <= layer < cfg.num_layers:
            raise CheckpointError(f"tensor {name!r}: layer {layer} out of range "
                                  f"(num_layers={cfg.num_layers})")
        if (path, layer) in seen:
            raise CheckpointError(f"duplicate tensor {name!r} (also given as {seen[path, layer]!r})")
        expected = spec.shape[1:] if spec.stacked else spec.shape
        if tuple(arr.shape) != expected:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(arr.shape)}, "
                                  f"expected {expected}")
        if not np.issubdtype(arr.dtype, np.floating) and arr.dtype not in (
                np.dtype(ml_dtypes.bfloat16),):
            raise CheckpointError(f"tensor {name!r} has non-float dtype {arr.dtype}")
        if transform is not None:
            arr = transform(np.asarray(arr))
        if path not in out:
            out[path] = np.empty(spec.shape, np_dtype)
        # Assignment casts in place: no second full-size temporary per tensor.
        if layer is None:
            out[path][...] = arr
        else:
            out[path][layer] = arr
        seen[path, layer] = name
    missing = [names.source_name(p, l)
               for p, s in specs.items()
               for l in (range(cfg.num_layers) if s.stacked else [None])
               if (p, l) not in seen]
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise CheckpointError(f"missing tensors: {', '.join(missing[:8])}{more}")
    return unflatten(out)
