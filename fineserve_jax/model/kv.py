"""How attention reads and writes KV: one small interface, swappable per cache layout.

The transformer calls exactly two verbs per layer:

    state = kv.update(state, layer, k, v, meta)      # store this step's K/V (post-RoPE)
    out   = kv.attend(state, layer, q, meta, scale)  # attention of q over the stored K/V

``state`` is the cache arrays (explicit state, donated by the jitted step); ``meta`` is
the cache's own per-step metadata pytree; ``layer`` is a traced int32 (the layer loop is
a ``lax.scan``). ``DenseKVCache`` is the contiguous reference layout used by the
notebook API; the paged KV Slab plugs in through the same two verbs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp


class KVCacheOps(Protocol):
    def update(self, state: Any, layer: jax.Array, k: jax.Array, v: jax.Array,
               meta: Any) -> Any: ...

    def attend(self, state: Any, layer: jax.Array, q: jax.Array, meta: Any,
               scale: float) -> jax.Array: ...


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseKVMeta:
    positions: jax.Array  # i32[B, T] absolute position of each new token; -1 = padding
    seq_lens: jax.Array  # i32[B] tokens held for the sequence after this step


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseKVState:
    k: jax.Array  # [L, B, S, Hkv, D]
    v: jax.Array  # [L, B, S, Hkv, D]


@dataclasses.dataclass(frozen=True)
class DenseKVCache:
    """Contiguous per-sequence cache: slot b holds sequence b, position p at index p.

    With ``fmt`` (a KV format of ``kv_formats``) set, K/V are stored as that format gives
    them back (``fmt.fake_quant``), so a full pass on this cache sees exactly the values
    the paged pool would return for that format.
    """

    sliding_window: int | None = None
    fmt: Any = None  # a KV format whose round trip K/V go through; None: stored as given

    @staticmethod
    def init(num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
             dtype) -> DenseKVState:
        shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
        return DenseKVState(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def update(self, state: DenseKVState, layer, k, v, meta: DenseKVMeta) -> DenseKVState:
        B, T = meta.positions.shape
        S = state.k.shape[2]
        # Padding tokens (position -1) are sent out of range and dropped.
        pos = jnp.where(meta.positions >= 0, meta.positions, S)
        b = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
        lyr = jnp.full((B, T), layer, jnp.int32)
        if self.fmt is not None:
            k, v = self.fmt.fake_quant(k), self.fmt.fake_quant(v)
        new_k = state.k.at[lyr, b, pos].set(k.astype(state.k.dtype), mode="drop")
        new_v = state.v.at[lyr, b, pos].set(v.astype(state.v.dtype), mode="drop")
        return DenseKVState(new_k, new_v)

    def attend(self, state: DenseKVState, layer, q, meta: DenseKVMeta, scale: float):
        k = jax.lax.dynamic_index_in_dim(state.k, layer, 0, keepdims=False)  # (B, S, Hkv, D)
        v = jax.lax.dynamic_index_in_dim(state.v, layer, 0, keepdims=False)
        S = k.shape[1]
        kv_pos = jnp.arange(S)[None, None, :]  # (1, 1, S)
        q_pos = meta.positions[:, :, None]  # (B, T, 1)
        mask = (kv_pos <= q_pos) & (kv_pos < meta.seq_lens[:, None, None])
        if self.sliding_window is not None:
            mask &= kv_pos > q_pos - self.sliding_window
        return reference_attention(q, k, v, mask, scale)


def reference_attention(q, k, v, mask, scale: float):
    """Plain GQA attention. q (B, T, H, D); k, v (B, S, Hkv, D); mask bool (B, T, S).

    Scores and softmax in float32; rows with no visible key (padding) return zeros.
    """
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    g = H // Hkv
    qg = q.reshape(B, T, Hkv, g, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    m = mask[:, None, None, :, :]  # (B, 1, 1, T, S)
    s = jnp.where(m, s, -jnp.inf)
    s_max = jnp.max(s, axis=-1, keepdims=True)
    s_max = jnp.where(jnp.isfinite(s_max), s_max, 0.0)
    p = jnp.where(m, jnp.exp(s - s_max), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(B, T, H, D).astype(q.dtype)
