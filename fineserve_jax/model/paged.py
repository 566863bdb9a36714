"""Paged KV over the shared device pool: writes into blocks, the reference attention.

The pool is one ``uint8[R, row_bytes]`` array per device shared by every model on it.
A model's block with handle ``h`` starts at row ``h // blocks_per_row``, byte
``(h % blocks_per_row) * stride`` (``kvslab.BlockLayout``); inside a block each layer
is one contiguous segment of ``layer_bytes`` (``kvslab.format`` gives the layout), so a
layer's K/V of a sequence is gathered as ``P`` segments through its page table.

Sequences read only positions below their length: slots past it (free blocks, freed
data of other requests, NaN poison in tests) are masked in the scores and zeroed in V.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from fineserve_jax.kvslab import BlockFormat
from fineserve_jax.model.kv import reference_attention


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVMeta:
    positions: jax.Array  # i32[B, T] absolute position of each new token; -1 = padding
    seq_lens: jax.Array  # i32[B] tokens held for the sequence after this step (0 = pad row)
    page_table: jax.Array  # i32[B, P] block handles of the sequence, in order


@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """``KVCacheOps`` over the byte pool for one model: its format and block layout."""

    fmt: Any  # a KV format (``kv_formats``): encode / decode
    block: BlockFormat  # host-side byte sizes of this model's blocks
    blocks_per_row: int  # kvslab.BlockLayout of this model
    stride: int
    sliding_window: int | None = None

    # ------------------------------------------------------------- addressing
    def _block_base(self, handles: jax.Array, layer) -> tuple[jax.Array, jax.Array]:
        """(row, byte offset of this layer's segment) for block handles i32[...]."""
        row = handles // self.blocks_per_row
        off = (handles % self.blocks_per_row) * self.stride + layer * self.block.layer_bytes
        return row, off

    def update(self, pool: jax.Array, layer, k, v, meta: PagedKVMeta) -> jax.Array:
        """Write this step's K/V (B, T, Hkv, D) into their blocks; padding is dropped."""
        B, T = meta.positions.shape
        bt = self.block.block_tokens
        pos = meta.positions
        valid = pos >= 0
        blk = jnp.take_along_axis(meta.page_table, jnp.where(valid, pos // bt, 0), axis=1)
        row, base = self._block_base(blk, layer)  # (B, T)
        row = jnp.where(valid, row, pool.shape[0])  # out of range -> dropped by the scatter
        slot = jnp.where(valid, pos % bt, 0)
        vrow, srow = self.block.value_row_bytes, self.block.scale_row_bytes
        kv_vals = 2 * bt * vrow  # the values part of a segment; scales follow
        kb, ks = self.fmt.encode(k.reshape(B * T, *k.shape[2:]))
        vb, vs = self.fmt.encode(v.reshape(B * T, *v.shape[2:]))
        row, base, slot = row.reshape(-1), base.reshape(-1), slot.reshape(-1)
        pool = write_rows(pool, row, base + slot * vrow, kb)
        pool = write_rows(pool, row, base + bt * vrow + slot * vrow, vb)
        if srow:
            pool = write_rows(pool, row, base + kv_vals + slot * srow, ks)
            pool = write_rows(pool, row, base + kv_vals + bt * srow + slot * srow, vs)
        return pool

    def gather(self, pool: jax.Array, layer, page_table: jax.Array):
        """K, V [B, P*bt, Hkv, D] of every slot of the page table's blocks (unmasked)."""
        B, P = page_table.shape
        b = self.block
        bt, vrow, srow = b.block_tokens, b.value_row_bytes, b.scale_row_bytes
        row, off = self._block_base(page_table, layer)
        seg = read_rows(pool, row.reshape(-1), off.reshape(-1), b.layer_bytes)
        seg = seg.reshape(B, P, b.layer_bytes)
        kv_vals = 2 * bt * vrow
        kvals = seg[..., :bt * vrow].reshape(B, P * bt, vrow)
        vvals = seg[..., bt * vrow:kv_vals].reshape(B, P * bt, vrow)
        kscl = seg[..., kv_vals:kv_vals + bt * srow].reshape(B, P * bt, srow)
        vscl = seg[..., kv_vals + bt * srow:].reshape(B, P * bt, srow)
        k = self.fmt.decode(kvals, kscl, b.kv_heads, b.head_dim)
        v = self.fmt.decode(vvals, vscl, b.kv_heads, b.head_dim)
        return k, v

    def attend(self, pool: jax.Array, layer, q, meta: PagedKVMeta, scale: float):
        """Attention of q (B, T, H, D) over the blocks: the Pallas kernel on GPU, the XLA
        reference elsewhere (``pallas_kernels.paged_attention.KERNEL_MODE`` overrides)."""
        from pallas_kernels import paged_attention as kernel  # lazy: kernels import the model

        mode = kernel.KERNEL_MODE
        if mode == "interpret" or (mode is None and jax.default_backend() == "gpu"):
            return kernel.paged_attention(pool, layer, q, meta, self, scale,
                                          interpret=kernel.KERNEL_MODE == "interpret")
        k, v = self.gather(pool, layer, meta.page_table)
        return paged_reference_attention(q, k, v, meta.positions, meta.seq_lens, scale,
                                         self.sliding_window)


    def attend_fp8_prefill(self, pool: jax.Array, layer, q, k, v, meta: PagedKVMeta,
                           scale: float):
        """FireQ's prefill attention, for models whose queries are FP8 (``fireq``): when
        every row of the step starts at position 0 (whole prompts or their first chunks,
        padding rows aside), each row attends only to this step's own K/V, so causal FP8
        flash attention over the fresh q, k, v (``pallas_kernels.flash_prefill``) replaces
        reading them back from the pool; a later chunk, with earlier context in blocks,
        takes ``attend``. The choice is made on the device (``lax.cond``). GPU only:
        elsewhere, and with a sliding window, this is ``attend`` (``FP8_PREFILL_MODE =
        "interpret"`` runs the generic kernel in the interpreter on any backend)."""
        mode = FP8_PREFILL_MODE
        if self.sliding_window is not None or not (
                mode == "interpret" or (mode is None and jax.default_backend() == "gpu")):
            return self.attend(pool, layer, q, meta, scale)
        from pallas_kernels.flash_prefill import flash_prefill

        lengths = jnp.sum(meta.positions >= 0, axis=1).astype(jnp.int32)
        fresh = jnp.all(meta.positions[:, 0] <= 0)  # every row from 0 (or a padding row)

        def flash():
            return flash_prefill(q, k, v, lengths, sm_scale=scale,
                                 backend="pallas" if mode == "interpret" else "auto",
                                 interpret=mode == "interpret").astype(q.dtype)

        return jax.lax.cond(fresh, flash, lambda: self.attend(pool, layer, q, meta, scale))


# ``PagedKVCache.attend_fp8_prefill``: None = FP8 flash prefill on GPU only; "interpret" = the
# generic kernel in the Pallas interpreter on every backend (tests); "off" = never.
FP8_PREFILL_MODE: str | None = None


def paged_reference_attention(q, k, v, positions, seq_lens, scale: float,
                              sliding_window: int | None = None):
    """q (B, T, H, D) over gathered k, v (B, S, Hkv, D) where slot s holds position s.

    Causal by absolute position, limited to ``seq_lens``; V past the length is zeroed so
    garbage there (even NaN) cannot reach the output through a zero weight.
    """
    S = k.shape[1]
    kv_pos = jnp.arange(S)[None, :]  # (1, S)
    live = kv_pos < seq_lens[:, None]  # (B, S)
    v = jnp.where(live[:, :, None, None], v, jnp.zeros((), v.dtype))
    k = jnp.where(live[:, :, None, None], k, jnp.zeros((), k.dtype))
    q_pos = positions[:, :, None]  # (B, T, 1)
    mask = (kv_pos[:, None, :] <= q_pos) & live[:, None, :]
    if sliding_window is not None:
        mask &= kv_pos[:, None, :] > q_pos - sliding_window
    return reference_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, scale)


_ROW_BYTES = jax.lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(0,),
                                            start_index_map=(0, 1))
_ROW_BYTES_SCATTER = jax.lax.ScatterDimensionNumbers(update_window_dims=(1,),
                                                     inserted_window_dims=(0,),
                                                     scatter_dims_to_operand_dims=(0, 1))


def read_rows(pool, rows, offsets, size: int):
    """u8[N, size]: pool[rows[i], offsets[i]:offsets[i] + size] for each i."""
    idx = jnp.stack([rows, offsets], axis=-1).astype(jnp.int32)
    return jax.lax.gather(pool, idx, _ROW_BYTES, (1, size),
                          mode=jax.lax.GatherScatterMode.CLIP)


def write_rows(pool, rows, offsets, data):
    """pool[rows[i], offsets[i]:offsets[i] + n] = data[i]; rows out of range are dropped."""
    idx = jnp.stack([rows, offsets], axis=-1).astype(jnp.int32)
    return jax.lax.scatter(pool, idx, data, _ROW_BYTES_SCATTER,
                           indices_are_sorted=False, unique_indices=False,
                           mode=jax.lax.GatherScatterMode.FILL_OR_DROP)
