"""Forward pass: embedding -> N x (RMSNorm, GQA attention, RMSNorm, SwiGLU) -> RMSNorm.

Pure functions over the params pytree of ``params.py``. Compute runs in the params'
dtype (float32 or bfloat16) with float32 norms, softmax and logits. The layer loop is
a ``lax.scan`` carrying the KV state, so a 30-layer model compiles one layer body.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fineserve_jax.config import ModelConfig
from fineserve_jax.linear import linear, linear_residual
from fineserve_jax.model.kv import KVCacheOps


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin f32[B, T, D/2] for absolute positions i32[B, T]."""
    inv_freq = jnp.asarray(cfg.inv_freq())  # (D/2,)
    ang = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """HF ``rotate_half`` RoPE: x (B, T, H, D); channel i pairs with i + D/2."""
    half = x.shape[-1] // 2
    x1 = x[..., :half].astype(jnp.float32)
    x2 = x[..., half:].astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def _proj(x, lp: dict, w: str, b: str, residual=None):
    """``x @ lp[w].T`` (+ bias ``lp[b]``), then ``residual +`` it when given (fused into
    the matmul's epilogue where the weight type has a kernel for it)."""
    if residual is not None and b not in lp:
        return linear_residual(x, lp[w], residual)
    y = linear(x, lp[w])
    y = y + lp[b].astype(y.dtype) if b in lp else y
    return y if residual is None else residual + y


def apply_k_post(q: jax.Array, k: jax.Array, k_post: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Post-RoPE key scaling (``quant.smoothing``): k (B, T, Hkv, D) times ``k_post``
    [Hkv, D], q (B, T, H, D) divided by it (query head h uses KV head h // G); q.k is
    unchanged."""
    H, Hkv = q.shape[2], k.shape[2]
    f = k_post.astype(jnp.float32)
    qf = jnp.repeat(f, H // Hkv, axis=0)
    return ((q.astype(jnp.float32) / qf).astype(q.dtype),
            (k.astype(jnp.float32) * f).astype(k.dtype))


def attention_block(cfg: ModelConfig, lp: dict, x, cos, sin, kv: KVCacheOps, kv_state,
                    layer, kv_meta, query_fp8: bool = False, residual=None):
    """Attention of normed ``x``; returns (output, kv_state), the output plus
    ``residual`` when given."""
    B, T, _ = x.shape
    hd = cfg.head_dim
    q = _proj(x, lp, "wq", "bq").reshape(B, T, cfg.num_heads, hd)
    k = _proj(x, lp, "wk", "bk").reshape(B, T, cfg.num_kv_heads, hd)
    v = _proj(x, lp, "wv", "bv").reshape(B, T, cfg.num_kv_heads, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if "k_post" in lp:  # a smoothed model: keys scaled after RoPE, queries inversely
        q, k = apply_k_post(q, k, lp["k_post"])
    if query_fp8:  # queries rounded to FP8 per token and head
        from fineserve_jax.quant.fp8 import fake_quant_per_token

        q = fake_quant_per_token(q)
    kv_state = kv.update(kv_state, layer, k, v, kv_meta)
    if query_fp8 and T > 1 and hasattr(kv, "attend_fp8_prefill"):  # FireQ's FP8 prefill
        o = kv.attend_fp8_prefill(kv_state, layer, q, k, v, kv_meta, hd ** -0.5)
    else:
        o = kv.attend(kv_state, layer, q, kv_meta, hd ** -0.5)  # (B, T, H, hd)
    return _proj(o.reshape(B, T, cfg.num_heads * hd), lp, "wo", "bo", residual), kv_state


def mlp_block(lp: dict, x, residual=None):
    """SwiGLU of normed ``x`` (plus ``residual`` when given). A fused ``w_gate_up`` weight
    (``pallas_kernels.w4a8.fuse_gate_up``) computes ``silu(gate) * up`` in one matmul."""
    if "w_gate_up" in lp:
        h = linear(x, lp["w_gate_up"])
    else:
        gate = _proj(x, lp, "w_gate", "b_gate")
        up = _proj(x, lp, "w_up", "b_up")
        h = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(x.dtype)
    return _proj(h, lp, "w_down", "b_down", residual)


def forward(cfg: ModelConfig, params: dict, tokens: jax.Array, positions: jax.Array,
            kv: KVCacheOps, kv_state: Any, kv_meta: Any, compute_dtype=None,
            query_fp8: bool = False) -> tuple[jax.Array, Any]:
    """tokens, positions i32[B, T] -> (final hidden [B, T, D], new kv_state).

    Activations are kept in ``compute_dtype`` (default: the embedding's dtype); weights may
    be stored wider (see ``runner.backend_weights``) without changing the arithmetic.
    Linear weights may be any registered weight type (``linear``); ``query_fp8`` rounds
    the attention queries to FP8 per token and head.
    """
    x, kv_state, _ = _layers(cfg, params, tokens, positions, kv, kv_state, kv_meta,
                             compute_dtype, query_fp8, collect=False)
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps), kv_state


def decoder_layer(cfg: ModelConfig, lp: dict, x, cos, sin, kv: KVCacheOps, kv_state, layer,
                  kv_meta, query_fp8: bool = False):
    """One layer on the residual stream ``x``: (stream after attention, stream after the
    MLP, kv_state)."""
    eps = cfg.rms_norm_eps
    mid, kv_state = attention_block(cfg, lp, rms_norm(x, lp["attn_norm"], eps), cos, sin,
                                    kv, kv_state, layer, kv_meta, query_fp8, residual=x)
    return mid, mlp_block(lp, rms_norm(mid, lp["mlp_norm"], eps), residual=mid), kv_state


def _layers(cfg, params, tokens, positions, kv, kv_state, kv_meta, compute_dtype, query_fp8,
            collect: bool):
    x = params["embed"][tokens]  # (B, T, D)
    x = x.astype(compute_dtype or x.dtype)
    x0 = x
    cos, sin = rope_tables(cfg, positions)

    def layer_fn(carry, lp):
        x, kv_state, layer = carry
        mid, x, kv_state = decoder_layer(cfg, lp, x, cos, sin, kv, kv_state, layer, kv_meta,
                                         query_fp8)
        return (x, kv_state, layer + 1), ((mid, x) if collect else None)

    (x, kv_state, _), ys = jax.lax.scan(layer_fn, (x, kv_state, jnp.int32(0)),
                                        params["layers"])
    return x, kv_state, (x0, *ys) if collect else None


def residual_stream(cfg: ModelConfig, params: dict, tokens: jax.Array, positions: jax.Array,
                    kv: KVCacheOps, kv_state: Any, kv_meta: Any, compute_dtype=None,
                    query_fp8: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The residual stream of ``forward``'s pass: (embeddings [B, T, D], after each
    layer's attention [L, B, T, D], after each layer [L, B, T, D]), for looking inside a
    model (``quant.analysis``)."""
    _, _, stream = _layers(cfg, params, tokens, positions, kv, kv_state, kv_meta,
                           compute_dtype, query_fp8, collect=True)
    return stream


def lm_head(cfg: ModelConfig, params: dict, h: jax.Array) -> jax.Array:
    """Hidden [..., D] -> float32 logits [..., vocab]."""
    w = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
    return jax.lax.dot_general(h.astype(w.dtype), w, (((h.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)
