"""Hopper kernel of FP8 causal prefill attention (Pallas Mosaic GPU, ``plgpu.kernel``).

The ``"mosaic"`` backend of ``pallas_kernels.flash_prefill`` (whose docstring describes the
algorithm, the warpgroup pipeline and the interpreter's operand layout): the same
quantized inputs (``QuantizedPrefill``), the same config, bf16 out.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from fineserve_jax.quant.fp8 import E4M3
from pallas_kernels.flash_prefill import P_SHIFT, FlashPrefillConfig, QuantizedPrefill


def _smem(shape, dtype, minor: int):
    """An SMEM buffer tiled and swizzled for wgmma / TMA (swizzle from the minor extent)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(minor * bits)
    tiling = plgpu.TilingTransform((8, swizzle * 8 // bits))
    return plgpu.SMEM(shape, dtype, transforms=(tiling, plgpu.SwizzleTransform(swizzle)))


def _kernel(q_ref, k_ref, v_ref, qs_ref, os_ref, len_ref, o_ref,
                   q_smem, k_smem, v_smem, p_smem, o_smem, qs_smem, os_smem,
                   bars, k_bars, v_bars, *, group: int, block_kv: int, stages: int,
                   interpret: bool):
    # GMEM: q_ref e4m3[B, T, H, D]; kmajor: k_ref e4m3[B, T, Hkv, D], v_ref V^T e4m3[B, Hkv, D, T]
    # (else k_ref K^T [B, Hkv, D, T], v_ref [B, T, Hkv, D]); qs_ref, os_ref f32[B, H, T];
    # len_ref i32[B]; o_ref bf16[B, T, H, D].
    # SMEM: q_smem [bq, D]; k_smem [S, bk, D] (K^T: [S, D, bk]); v_smem [S, D, bk] (V: [S, bk, D]);
    # p_smem e4m3[2, bq, bk]; o_smem bf16[bq, D]; qs_smem, os_smem f32[bq].
    from jax.experimental.pallas import mosaic_gpu as plgpu

    bq, d = q_smem.shape
    bk, S = block_kv, stages
    kmajor = not interpret
    wg = plgpu.Layout.WGMMA
    row = wg.reduce(1)
    # Register layouts are hints for the lowering; the interpreter has no rule for them.
    cast = (lambda x, _: x) if interpret else plgpu.layout_cast

    def iota(dim):
        if interpret:
            return lax.broadcasted_iota(jnp.int32, (bq, bk), dim)
        return plgpu.broadcasted_iota(jnp.int32, (bq, bk), dim, layout=wg)
    h, qi, b = lax.axis_index("h"), lax.axis_index("q"), lax.axis_index("b")
    kvh = lax.div(h, jnp.int32(group))
    q0 = qi * bq
    n = len_ref[b]
    n_kv = jnp.minimum(lax.div(q0 + (bq + bk - 1), jnp.int32(bk)),
                       lax.div(n + (bk - 1), jnp.int32(bk)))
    n_kv = jnp.where(q0 < n, n_kv, 0)  # a q tile of padding rows only: no KV tile
    slot = lambda j: lax.rem(j, jnp.int32(S))

    n_tiles = q_ref.shape[1] // bk  # KV tiles in the (padded) sequence

    def load_k(j):
        if isinstance(j, int) and j >= n_tiles:  # a static tile past the end: never needed
            return
        src = (k_ref.at[b, pl.ds(j * bk, bk), kvh] if kmajor
               else k_ref.at[b, kvh, :, pl.ds(j * bk, bk)])
        plgpu.copy_gmem_to_smem(src, k_smem.at[slot(j)], k_bars.at[slot(j)])

    def load_v(j):
        if isinstance(j, int) and j >= n_tiles:
            return
        src = (v_ref.at[b, kvh, :, pl.ds(j * bk, bk)] if kmajor
               else v_ref.at[b, pl.ds(j * bk, bk), kvh])
        plgpu.copy_gmem_to_smem(src, v_smem.at[slot(j)], v_bars.at[slot(j)])

    # B operands of the two wgmmas, [K, N]: K^T [D, bk] and V [bk, D]; K-major in SMEM on
    # hardware (a transposed view of the K tile and of the V^T tile).
    k_op = lambda s: plgpu.transpose_ref(k_smem.at[s], (1, 0)) if kmajor else k_smem.at[s]
    v_op = lambda s: plgpu.transpose_ref(v_smem.at[s], (1, 0)) if kmajor else v_smem.at[s]

    plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, bq), h], q_smem, bars.at[0])
    plgpu.copy_gmem_to_smem(qs_ref.at[b, h, pl.ds(q0, bq)], qs_smem, bars.at[1])
    plgpu.copy_gmem_to_smem(os_ref.at[b, h, pl.ds(q0, bq)], os_smem, bars.at[2])
    for t in range(S):  # fill both rings
        @pl.when(t < n_kv)
        def _(t=t):  # pl.when runs the body now; t is bound for clarity
            load_k(t)
            load_v(t)
    plgpu.barrier_wait(bars.at[0])
    plgpu.barrier_wait(bars.at[1])
    qs = cast(qs_smem[...], row)  # (bq,) base-2 logit scale per row

    def softmax(i, s, m, l, masked: bool):
        """Tile i's scores -> (P_i rounded to E4M3, new max, alpha, new l)."""
        s = s * lax.broadcast_in_dim(qs, (bq, bk), [0])
        if masked:  # causal
            s = jnp.where(iota(1) + i * bk <= iota(0) + q0, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, (bq, bk), [0]))
        p8 = (p * P_SHIFT).astype(E4M3)
        l = l * alpha + p8.astype(jnp.float32).sum(axis=1)
        return p8, m_new, alpha, l

    def step(i, carry, *, has_next: bool, has_prev: bool):
        """KV iteration i: issue QK^T of tile i + 1 and PV of tile i - 1 (async wgmmas),
        run tile i's softmax meanwhile, then wait for both. Every wgmma here is issued
        unconditionally (the first and last iterations are separate traces), so no
        in-flight accumulator crosses a branch."""
        s, m, l, o, alpha_prev = carry

        def overlapped(*accs):
            acc = iter(accs)
            acc_s = next(acc) if has_next else None
            acc_o = next(acc) if has_prev else None
            if has_next:
                plgpu.barrier_wait(k_bars.at[slot(i + 1)])
                plgpu.wgmma(acc_s, q_smem, k_op(slot(i + 1)))
            if has_prev:  # P_{i-1} was stored by the previous iteration
                plgpu.barrier_wait(v_bars.at[slot(i - 1)])
                plgpu.wgmma(acc_o, p_smem.at[lax.rem(i + 1, 2)], v_op(slot(i - 1)))
            # Under both wgmmas. Only the last KV tile of a q tile meets the diagonal (64
            # rows; KV tiles are multiples of 64 and start at multiples of them).
            p8, m_new, alpha, l_new = softmax(i, s, m, l, masked=not has_next)
            p_smem.at[lax.rem(i, 2)][...] = p8
            plgpu.commit_smem()
            pv = acc_o[...] if has_prev else None  # waits for the wgmmas
            s_next = acc_s[...] if has_next else s
            return s_next, m_new, l_new, alpha, pv

        accs = ([plgpu.ACC((bq, bk), jnp.float32)] if has_next else []) + (
            [plgpu.ACC((bq, d), jnp.float32)] if has_prev else [])
        s_next, m, l, alpha, pv = pl.run_scoped(overlapped, *accs)
        if has_prev:
            o = o * lax.broadcast_in_dim(alpha_prev, (bq, d), [0]) + pv

        @pl.when(i + S + 1 < n_kv)  # K_{i+1} is consumed: its slot takes K_{i+S+1}
        def _():
            load_k(i + S + 1)

        if has_prev:
            @pl.when(i - 1 + S < n_kv)  # V_{i-1} is consumed
            def _():
                load_v(i - 1 + S)

        return s_next, m, l, o, alpha

    def first_qk(acc_s):
        plgpu.barrier_wait(k_bars.at[0])
        plgpu.wgmma(acc_s, q_smem, k_op(0))
        return acc_s[...]

    def last_pv(last, o, alpha):
        def body(acc_o):
            plgpu.barrier_wait(v_bars.at[slot(last)])
            plgpu.wgmma(acc_o, p_smem.at[lax.rem(last, 2)], v_op(slot(last)))
            return acc_o[...]
        pv = pl.run_scoped(body, plgpu.ACC((bq, d), jnp.float32))
        return o * lax.broadcast_in_dim(alpha, (bq, d), [0]) + pv

    def finish(o, l):
        plgpu.barrier_wait(bars.at[2])
        scale = cast(os_smem[...], row) / jnp.maximum(l, 1.0)
        o_smem[...] = (o * lax.broadcast_in_dim(scale, (bq, d), [0])).astype(jnp.bfloat16)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, pl.ds(q0, bq), h])
        plgpu.wait_smem_to_gmem(0)

    def init(s0):
        return (s0, cast(jnp.full((bq,), -jnp.inf, jnp.float32), row),
                cast(jnp.zeros((bq,), jnp.float32), row),
                cast(jnp.zeros((bq, d), jnp.float32), wg), cast(jnp.ones((bq,), jnp.float32), row))

    zero_o = lambda: cast(jnp.zeros((bq, d), jnp.float32), wg)

    @pl.when(n_kv == 0)  # a q tile past the sequence's end: zeros
    def _():
        finish(zero_o(), cast(jnp.zeros((bq,), jnp.float32), row))

    @pl.when(n_kv == 1)
    def _():
        carry = step(0, init(pl.run_scoped(first_qk, plgpu.ACC((bq, bk), jnp.float32))),
                     has_next=False, has_prev=False)
        _, _, l, o, alpha = carry
        finish(last_pv(0, o, alpha), l)

    @pl.when(n_kv >= 2)
    def _():
        s0 = pl.run_scoped(first_qk, plgpu.ACC((bq, bk), jnp.float32))

        @pl.when(S < n_kv)  # K_0 is consumed: slot 0 takes K_S
        def _():
            load_k(S)

        carry = step(0, init(s0), has_next=True, has_prev=False)
        carry = lax.fori_loop(1, n_kv - 1, functools.partial(step, has_next=True, has_prev=True),
                              carry)
        carry = step(n_kv - 1, carry, has_next=False, has_prev=True)
        _, _, l, o, alpha = carry
        finish(last_pv(n_kv - 1, o, alpha), l)


def mosaic_call(x: QuantizedPrefill, cfg: FlashPrefillConfig, interpret: bool) -> jax.Array:
    from jax.experimental.pallas import mosaic_gpu as plgpu

    cfg.check_mosaic()
    B, tp, H, D = x.q8.shape
    Hkv = x.k8.shape[2]
    bq, bk, S = cfg.block_q, cfg.block_kv, cfg.num_stages
    kmajor = not interpret
    if kmajor:  # K tiles [bk, D] as they are, V as V^T [B, Hkv, D, T]
        k_in, v_in = x.k8, x.v8.transpose(0, 2, 3, 1)
        k_buf, v_buf = _smem((S, bk, D), E4M3, D), _smem((S, D, bk), E4M3, bk)
    else:  # the interpreter's (K, N) operands: K^T [B, Hkv, D, T], V as it is
        k_in, v_in = x.k8.transpose(0, 2, 3, 1), x.v8
        k_buf, v_buf = _smem((S, D, bk), E4M3, bk), _smem((S, bk, D), E4M3, D)
    kern = functools.partial(_kernel, group=H // Hkv, block_kv=bk, stages=S,
                             interpret=interpret)
    scratch = [
        _smem((bq, D), E4M3, D), k_buf, v_buf, _smem((2, bq, bk), E4M3, bk),
        _smem((bq, D), jnp.bfloat16, D),
        plgpu.SMEM((bq,), jnp.float32), plgpu.SMEM((bq,), jnp.float32),
        plgpu.Barrier(num_barriers=3), plgpu.Barrier(num_barriers=S),
        plgpu.Barrier(num_barriers=S),
    ]
    return plgpu.kernel(
        kern, out_type=jax.ShapeDtypeStruct((B, tp, H, D), jnp.bfloat16),
        scratch_types=scratch, grid=(H, tp // bq, B), grid_names=("h", "q", "b"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(x.q8, k_in, v_in, x.qk_scale, x.out_scale, x.lengths)
