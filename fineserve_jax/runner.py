"""Jitted model steps over a dense KV cache, for the notebook API and evaluation.

One factory per (config, dtype): the steps close over the static config, take the
params and the KV state explicitly and donate the KV state. Shapes are bucketed by the
caller, so each (batch, tokens, cache length, sampler) compiles once.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from fineserve_jax.config import ModelConfig
from fineserve_jax.model.kv import DenseKVCache, DenseKVMeta, DenseKVState
from fineserve_jax.model.transformer import forward, lm_head
from fineserve_jax.sampling import SamplingArrays, sample


def bucket(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum)."""
    b = minimum
    while b < n:
        b *= 2
    return b


def backend_weights(params, dtype, backend: str | None = None):
    """Weights as the backend multiplies them best.

    XLA:CPU has no bfloat16 dot: it converts bf16 weights to f32 inside every step (all
    layers' weights on every decode step). On CPU, bf16 weights are therefore held as f32
    arrays carrying the same bf16 values; activations stay bf16 and the dot accumulated in
    f32 as before, so results are unchanged and decode is several times faster.
    On GPU, INT4 weights with FP8 activations go to the INT4 x FP8 kernel's layout
    (``pallas_kernels.w4a8.kernel_layout``; a checkpoint may already store it), and on
    Hopper to the Mosaic GPU kernel's scale layout (``hopper_weights``).
    """
    backend = backend or jax.default_backend()
    if backend == "gpu":
        if _has_fp8_int4(params):
            # INT4 x FP8 weights in the Pallas kernel's layout, gate and up fused.
            from pallas_kernels.w4a8 import kernel_layout

            params = kernel_layout(params)
        return hopper_weights(params)
    if backend == "cpu" and jnp.dtype(dtype) == jnp.bfloat16:
        return jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a,
                            params)
    return params


def hopper_weights(params, device_kind: str | None = None):
    """On a Hopper GPU, kernel-layout weights the Mosaic GPU kernel takes get their group
    scales stored groups-major (``W4A8HopperWeight``), once, so no call transposes them;
    elsewhere (or with ``w4a8.GPU_BACKEND = "triton"``) params are returned as they are."""
    from pallas_kernels import w4a8, w4a8_hopper

    kind = device_kind if device_kind is not None else jax.devices()[0].device_kind
    if w4a8.GPU_BACKEND == "triton" or not w4a8_hopper.is_hopper(kind):
        return params
    layers = params.get("layers", {}) if isinstance(params, dict) else {}
    new = {name: w4a8_hopper.W4A8HopperWeight.from_w4a8(w) for name, w in layers.items()
           if isinstance(w, w4a8.W4A8Weight) and w4a8_hopper.supports(w)}
    return {**params, "layers": {**layers, **new}} if new else params


def _has_fp8_int4(params) -> bool:
    from fineserve_jax.quant import Int4Weight

    layers = params.get("layers", {}) if isinstance(params, dict) else {}
    return any(isinstance(w, Int4Weight) and w.act == "fp8" for w in layers.values())


class DenseRunner:
    """Prefill/decode steps and full-sequence scoring for one model."""

    def __init__(self, cfg: ModelConfig, params, dtype, *, kv_format=None,
                 query_fp8: bool = False):
        """``kv_format`` (a ``model.kv_formats`` format, optional): K/V pass through its
        encoding as they are stored, so scoring sees what the paged pool would hold;
        ``query_fp8``: queries rounded to FP8 (the precision's setting)."""
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        self.params = backend_weights(params, self.dtype)
        self.kv = (DenseKVCache(sliding_window=cfg.sliding_window) if kv_format is None else
                   DenseKVCache(sliding_window=cfg.sliding_window, fmt=kv_format))
        q8 = bool(query_fp8)
        self._step = jax.jit(partial(_step, cfg, self.kv, self.dtype, q8),
                             static_argnames=("mode",), donate_argnames=("kv_state",))
        self._logits = jax.jit(partial(_all_logits, cfg, self.kv, self.dtype, q8))
        self._logprobs = jax.jit(partial(_target_logprobs, cfg, self.kv, self.dtype, q8))

    def new_cache(self, batch: int, max_len: int) -> DenseKVState:
        c = self.cfg
        return DenseKVCache.init(c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim,
                                 self.dtype)

    def step(self, kv_state, tokens, positions, seq_lens, logits_idx, sampling: SamplingArrays,
             mode: str):
        """-> (next token i32[B], kv_state). See ``_step``."""
        return self._step(self.params, kv_state, tokens, positions, seq_lens, logits_idx,
                          sampling, mode=mode)

    def logits(self, tokens):
        """tokens i32[B, T] (a fresh context) -> f32[B, T, vocab]."""
        return self._logits(self.params, tokens)

    def target_logprobs(self, tokens):
        """tokens i32[B, T] -> f32[B, T-1]: log p(tokens[:, t+1] | tokens[:, :t+1])."""
        return self._logprobs(self.params, tokens)


def _step(cfg, kv, dtype, q8, params, kv_state, tokens, positions, seq_lens, logits_idx,
          sampling, mode):
    # tokens, positions i32[B, T]; seq_lens i32[B] (KV length after the step);
    # logits_idx i32[B]: which of the T tokens predicts the next one.
    h, kv_state = forward(cfg, params, tokens, positions, kv, kv_state,
                          DenseKVMeta(positions, seq_lens), dtype, q8)
    last = jnp.take_along_axis(h, logits_idx[:, None, None], axis=1)[:, 0]  # (B, D)
    logits = lm_head(cfg, params, last)
    return sample(logits, sampling, mode), kv_state


def _fresh_forward(cfg, kv, dtype, q8, params, tokens):
    B, T = tokens.shape
    state = DenseKVCache.init(cfg.num_layers, B, T, cfg.num_kv_heads, cfg.head_dim, dtype)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    meta = DenseKVMeta(positions, jnp.full((B,), T, jnp.int32))
    h, _ = forward(cfg, params, tokens, positions, kv, state, meta, dtype, q8)
    return h


def _all_logits(cfg, kv, dtype, q8, params, tokens):
    return lm_head(cfg, params, _fresh_forward(cfg, kv, dtype, q8, params, tokens))


def _target_logprobs(cfg, kv, dtype, q8, params, tokens):
    logits = lm_head(cfg, params, _fresh_forward(cfg, kv, dtype, q8, params, tokens))[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
