"""Each weight described once: its path in the params tree and its shape.

Random init, checkpoint conversion (shape checks, missing keys) and Orbax restore
targets are all derived from ``param_specs``. Per-layer weights are stacked along a
leading ``num_layers`` axis so the forward pass scans over layers (one compiled
layer body, fast to compile).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from fineserve_jax.config import ModelConfig


@dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    kind: str  # "embed" | "linear" | "norm" | "bias"
    stacked: bool  # leading axis is the layer index


def param_specs(cfg: ModelConfig) -> dict:
    """Nested dict of ParamSpec mirroring the params pytree."""
    d, f, hd, L = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_layers
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd

    def lin(n, k):
        return ParamSpec((L, n, k), "linear", True)

    def vec(n, kind):
        return ParamSpec((L, n), kind, True)

    layers = {
        "attn_norm": vec(d, "norm"),
        "wq": lin(q, d), "wk": lin(kv, d), "wv": lin(kv, d), "wo": lin(d, q),
        "mlp_norm": vec(d, "norm"),
        "w_gate": lin(f, d), "w_up": lin(f, d), "w_down": lin(d, f),
    }
    if cfg.attention_bias:
        layers.update(bq=vec(q, "bias"), bk=vec(kv, "bias"), bv=vec(kv, "bias"), bo=vec(d, "bias"))
    if cfg.mlp_bias:
        layers.update(b_gate=vec(f, "bias"), b_up=vec(f, "bias"), b_down=vec(d, "bias"))
    specs = {
        "embed": ParamSpec((cfg.vocab_size, d), "embed", False),
        "layers": layers,
        "final_norm": ParamSpec((d,), "norm", False),
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((cfg.vocab_size, d), "linear", False)
    return specs


def flat_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """``{"layers.wq": spec, "embed": spec, ...}``."""
    out = {}
    for k, v in param_specs(cfg).items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def unflatten(flat: dict) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        head, _, tail = path.partition(".")
        if tail:
            tree.setdefault(head, {})[tail] = v
        else:
            tree[head] = v
    return tree


def abstract_params(cfg: ModelConfig, dtype) -> dict:
    """ShapeDtypeStruct tree: the restore target for a checkpoint."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)),
                        param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """Random params at real shapes (speed benchmarks, tests)."""
    flat = flat_specs(cfg)
    keys = jax.random.split(key, len(flat))
    out = {}
    for k_, (path, spec) in zip(keys, sorted(flat.items())):
        if spec.kind == "norm":
            out[path] = jnp.ones(spec.shape, dtype)
        elif spec.kind == "bias":
            out[path] = (0.02 * jax.random.normal(k_, spec.shape)).astype(dtype)
        else:
            fan_in = spec.shape[-1]
            out[path] = (jax.random.normal(k_, spec.shape) / np.sqrt(fan_in)).astype(dtype)
    return unflatten(out)
