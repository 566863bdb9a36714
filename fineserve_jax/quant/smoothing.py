"""FireQ's outlier smoothing: scales folded into the weights, and the online key scale.

Everything here is exact algebra on an unquantized model: smoothing alone (no rounding)
leaves the logits unchanged up to float rounding; it only moves magnitude between
tensors so that the INT4 weights, the FP8 activations and queries and the INT4 keys that
follow lose less. The hyperparameters are ``precisions.SmoothingConfig``.

* Channel-wise (linear layers, weights only): for a producer -> consumer pair, the
  consumer's input channel ``j`` is multiplied by ``s_j = c / mean_i |W_ij|`` and the
  producer's output channel ``j`` divided by it. Producers are an RMSNorm gain (input norm
  -> q/k/v, post-attention norm -> gate/up) or a linear layer's output rows (v -> o,
  up -> down). Under GQA, V channel ``(g, d)`` feeds O's input channels ``(h, d)`` of every
  query head ``h`` of group ``g``, so those share one scale, computed over all of them.
* Pre-RoPE (keys): channel pair ``(i, i + D/2)`` of KV head ``h`` is multiplied by
  ``alpha / M[h, i]``, ``M`` the largest joint magnitude ``sqrt(k_i^2 + k_{i+D/2}^2)`` seen in
  calibration (RoPE rotates within the pair and keeps that magnitude, so the scale
  commutes with RoPE); the queries of the group are divided by it. Folded into the rows
  of the k and q projections.
* Post-RoPE (keys): the ``topk`` channels of each KV head with the largest magnitude after
  RoPE, and their RoPE partners, are multiplied online by ``beta / Kmax`` (and the queries
  divided), as ``layers.k_post`` [L, Hkv, D]; those channels keep a pre-RoPE scale of 1.

Calibration (``key_stats``) runs the model's own forward pass with a KV cache that
records, per layer, the two key statistics above.
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np

from fineserve_jax.config import ModelConfig
from fineserve_jax.model.kv import DenseKVCache, DenseKVMeta, DenseKVState
from fineserve_jax.precisions import SmoothingConfig


# ------------------------------------------------------------------ calibration
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _StatsState:
    kv: DenseKVState
    pair_max: jax.Array  # f32[L, Hkv, D/2] max joint magnitude of each RoPE pair
    chan_max: jax.Array  # f32[L, Hkv, D] max |k| after RoPE


@dataclasses.dataclass(frozen=True)
class _StatsKV:
    """A dense KV cache that also records key statistics (``KVCacheOps``)."""

    inner: DenseKVCache

    def update(self, state: _StatsState, layer, k, v, meta: DenseKVMeta) -> _StatsState:
        kf = k.astype(jnp.float32)  # (B, T, Hkv, D), after RoPE
        valid = (meta.positions >= 0)[:, :, None, None]
        kf = jnp.where(valid, kf, 0.0)
        half = kf.shape[-1] // 2
        pair = jnp.sqrt(kf[..., :half] ** 2 + kf[..., half:] ** 2).max(axis=(0, 1))
        chan = jnp.abs(kf).max(axis=(0, 1))
        pm = jax.lax.dynamic_index_in_dim(state.pair_max, layer, 0, keepdims=False)
        cm = jax.lax.dynamic_index_in_dim(state.chan_max, layer, 0, keepdims=False)
        return _StatsState(
            self.inner.update(state.kv, layer, k, v, meta),
            jax.lax.dynamic_update_index_in_dim(state.pair_max, jnp.maximum(pm, pair), layer, 0),
            jax.lax.dynamic_update_index_in_dim(state.chan_max, jnp.maximum(cm, chan), layer, 0))

    def attend(self, state: _StatsState, layer, q, meta: DenseKVMeta, scale: float):
        return self.inner.attend(state.kv, layer, q, meta, scale)


@dataclasses.dataclass(frozen=True)
class KeyStats:
    pair_max: np.ndarray  # f32[L, Hkv, D/2]
    chan_max: np.ndarray  # f32[L, Hkv, D]
    tokens: int


def key_stats(cfg: ModelConfig, params, sequences: np.ndarray, progress: bool = True
              ) -> KeyStats:
    """Key statistics of ``params`` (float32 recommended) over token ``sequences`` [N, S]."""
    from tqdm.auto import tqdm

    from fineserve_jax.model.transformer import forward

    sequences = np.asarray(sequences, np.int32)
    n, S = sequences.shape
    L, H, D = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    kv = _StatsKV(DenseKVCache(sliding_window=cfg.sliding_window))

    @jax.jit
    def run(params, tokens, pair_max, chan_max):
        pos = jnp.arange(S, dtype=jnp.int32)[None]
        dense = DenseKVCache.init(L, 1, S, H, D, jnp.float32)
        meta = DenseKVMeta(pos, jnp.full((1,), S, jnp.int32))
        _, st = forward(cfg, params, tokens, pos, kv, _StatsState(dense, pair_max, chan_max),
                        meta, jnp.float32)
        return st.pair_max, st.chan_max

    pm = jnp.zeros((L, H, D // 2), jnp.float32)
    cm = jnp.zeros((L, H, D), jnp.float32)
    for i in tqdm(range(n), desc="calibration", disable=not progress, leave=False):
        # Wait for each sequence: dispatch is asynchronous, and without the wait the loop
        # (and its bar) ends at once while the forward passes still run.
        pm, cm = jax.block_until_ready(run(params, jnp.asarray(sequences[i:i + 1]), pm, cm))
    return KeyStats(np.asarray(pm), np.asarray(cm), n * S)


# -------------------------------------------------------------------- folding
def _layers_np(params) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float64) for k, v in params["layers"].items()}


def _col_scale(c: float, ws: list[np.ndarray]) -> np.ndarray:
    """s_j = c / mean_i |W_ij| over the rows of every consumer in ``ws`` ([L, N, K] each)."""
    m = np.concatenate([np.abs(w) for w in ws], axis=1).mean(axis=1)  # [L, K]
    return np.where(m > 0, c / np.where(m > 0, m, 1.0), 1.0)


def smooth(cfg: ModelConfig, params: dict, sm: SmoothingConfig,
           stats: KeyStats | None = None) -> dict:
    """``params`` with ``sm``'s channel-wise and pre-RoPE scales folded in, plus the online
    post-RoPE key scale ``layers.k_post`` when ``sm.post_rope``. Returns a new tree in the
    input's dtype (the folding itself is done in float64)."""
    if (sm.pre_rope or sm.post_rope) and stats is None:
        raise ValueError("pre-/post-RoPE scaling needs calibration statistics (key_stats)")
    dtype = np.asarray(params["layers"]["wq"]).dtype
    lw = _layers_np(params)
    L, D, Hkv, H = cfg.num_layers, cfg.head_dim, cfg.num_kv_heads, cfg.num_heads
    G = H // Hkv

    def scale_rows(name, s):  # output channels of a linear (and its bias) times s [L, N]
        lw[name] = lw[name] * s[:, :, None]
        b = {"wq": "bq", "wk": "bk", "wv": "bv", "wo": "bo", "w_gate": "b_gate",
             "w_up": "b_up", "w_down": "b_down"}[name]
        if b in lw:
            lw[b] = lw[b] * s

    def scale_cols(name, s):  # input channels of a linear times s [L, K]
        lw[name] = lw[name] * s[:, None, :]

    # Channel-wise: every scale from the weights as loaded, then applied.
    if sm.v_mul != 1.0:
        scale_rows("wv", np.full(lw["wv"].shape[:2], sm.v_mul))
        scale_cols("wo", np.full((L, lw["wo"].shape[2]), 1.0 / sm.v_mul))
    s_qkv = _col_scale(sm.c_qkv, [lw["wq"], lw["wk"], lw["wv"]]) if sm.c_qkv else None
    s_gu = _col_scale(sm.c_gate_up, [lw["w_gate"], lw["w_up"]]) if sm.c_gate_up else None
    s_down = _col_scale(sm.c_down, [lw["w_down"]]) if sm.c_down else None
    s_vo = None
    if sm.c_vo:
        # O's input channel (h, d) is fed by V channel (h // G, d): one scale per V channel.
        wo = np.abs(lw["wo"]).reshape(L, -1, Hkv, G, D)  # [L, N, g, r, d]
        m = wo.mean(axis=(1, 3))  # [L, Hkv, D]
        s_vo = np.where(m > 0, sm.c_vo / np.where(m > 0, m, 1.0), 1.0).reshape(L, Hkv * D)
    if s_qkv is not None:
        for n in ("wq", "wk", "wv"):
            scale_cols(n, s_qkv)
        lw["attn_norm"] = lw["attn_norm"] / s_qkv
    if s_vo is not None:
        scale_rows("wv", 1.0 / s_vo)
        expand = np.broadcast_to(s_vo.reshape(L, Hkv, 1, D), (L, Hkv, G, D)).reshape(L, -1)
        scale_cols("wo", expand)
    if s_gu is not None:
        for n in ("w_gate", "w_up"):
            scale_cols(n, s_gu)
        lw["mlp_norm"] = lw["mlp_norm"] / s_gu
    if s_down is not None:
        scale_cols("w_down", s_down)
        scale_rows("w_up", 1.0 / s_down)

    # Keys: post-RoPE channels first (they keep a pre-RoPE scale of 1).
    post = np.ones((L, Hkv, D))
    selected = np.zeros((L, Hkv, D), bool)
    if sm.post_rope:
        cm = np.asarray(stats.chan_max, np.float64)
        top = np.argsort(-cm, axis=-1, kind="stable")[..., :sm.post_rope_topk]
        partners = (top + D // 2) % D
        for idx in (top, partners):
            np.put_along_axis(selected, idx, True, axis=-1)
        f = np.where(cm > 0, sm.beta / np.where(cm > 0, cm, 1.0), 1.0)
        post = np.where(selected, f, 1.0)
    if sm.pre_rope:
        pm = np.asarray(stats.pair_max, np.float64)
        a = np.where(pm > 0, sm.alpha / np.where(pm > 0, pm, 1.0), 1.0)  # [L, Hkv, D/2]
        k_scale = np.concatenate([a, a], axis=-1)
        k_scale = np.where(selected, 1.0, k_scale)  # [L, Hkv, D]
        scale_rows("wk", k_scale.reshape(L, Hkv * D))
        q_scale = np.broadcast_to((1.0 / k_scale)[:, :, None, :], (L, Hkv, G, D))
        scale_rows("wq", q_scale.reshape(L, H * D))

    layers = {k: np.asarray(v, dtype) for k, v in lw.items()}
    if sm.post_rope:
        layers["k_post"] = post.astype(np.float32)
    return {**params, "layers": layers}
