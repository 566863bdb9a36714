"""FP8 causal prefill flash attention (FireQ's prefill attention): E4M3 Q, K, V and P,
float32 accumulation, BF16 output.

Inputs: ``q`` [B, T, H, D], ``k`` and ``v`` [B, T, Hkv, D] (bf16 or f32, K after RoPE),
``lengths`` i32[B]. Token ``t`` of sequence ``b`` is valid when ``t < lengths[b]``; query
``i`` attends keys ``j <= i`` (prefill from position 0). Query head ``h`` reads KV head
``h // (H / Hkv)`` (GQA). Outputs of padding rows (``t >= lengths[b]``) are 0, and padding
tokens are never attended to, whatever they hold (NaN included).

Quantization (``quantize_inputs``, plain jnp, shared by every backend):

* Q: one float32 scale per (token, head), ``sq = absmax over D / 448``;
  ``q8 = e4m3(q / sq)`` (``fineserve_jax.quant.fp8.quantize_per_token``, the model's
  FP8 query rounding).
* K and V: one float32 scale per (sequence, KV head) over its valid tokens,
  ``sk = absmax / 448``; ``k8 = e4m3(k / sk)`` (same for V). A per-head V scale keeps
  P @ V a pure FP8 x FP8 product (a per-token V scale cannot leave the sum over keys).
  Padding tokens are set to 0 in q8, k8 and v8.
* The scales reach the kernels folded into two row vectors, f32[B, H, T]:
  ``qk_scale = sq * sk[h // g] * sm_scale * log2(e)`` (base-2 logits) and
  ``out_scale = sv[h // g]`` on valid rows, 0 on padding rows.

Attention (per row ``i``, over KV tiles of ``block_kv`` keys in order, online softmax):

    s_j   = (q8_i . k8_j, f32 accumulation) * qk_scale_i,  -inf where j > i
    m'    = max(m, max_j s_j)                    (m starts at -inf)
    alpha = exp2(m - m')
    p8_j  = e4m3(exp2(s_j - m') * 2**8)          (p in [0, 1]: 2**8 puts it in E4M3's
                                                  normal range, at most 256 < 448)
    l     = l * alpha + sum_j f32(p8_j)          (the sum of the *rounded* weights)
    o     = o * alpha + sum_j p8_j * v8_j        (FP8 x FP8, f32 accumulation)
    out_i = bf16(o * (out_scale_i / max(l, 1)))

The 2**8 cancels between ``o`` and ``l``, so the output is a convex combination of the
dequantized values with exactly the FP8 weights the tensor cores multiplied. Key 0 is
visible to every row, so ``m`` is finite after the first tile and ``l >= 256``.
``flash_prefill_reference`` is this recipe in plain jnp (the oracle; it depends on
``block_kv`` because P is rounded against the running max).

Backends (``flash_prefill(..., backend=)``):

* ``"pallas"``: generic Pallas kernel, one program per (batch, q tile, head), a KV loop
  up to the last tile the q tile can see (causal tile skipping, no tile past the
  sequence's length, none for a q tile of padding rows). Interpret mode on CPU, the
  Triton lowering on a GPU.
* ``"mosaic"``: Hopper kernel (Pallas Mosaic GPU, ``plgpu.kernel``; in
  ``flash_prefill_hopper.py``), one warpgroup per
  (head, q tile of 64 rows, batch). K and V tiles arrive by TMA into ``num_stages``-deep
  SMEM rings with one barrier per slot. Both products are asynchronous FP8 wgmmas, and
  iteration ``i`` of the KV loop issues QK^T of tile ``i + 1`` and PV of tile ``i - 1``
  before it runs the softmax of tile ``i``: the three stages overlap (the first and last
  iterations are traced on their own, so every wgmma is issued unconditionally and no
  in-flight accumulator crosses a branch). Each wgmma accumulates into a fresh
  accumulator; O stays in registers and takes ``O * alpha + PV`` (the interpreter cannot
  rescale an accumulator in place). P goes through SMEM (double-buffered). FP8 wgmma
  needs K-major B operands: B = K^T is the K tile [bk, D] viewed transposed, and B = V is
  the V^T tile [D, bk], so the wrapper passes V^T [B, Hkv, D, T]. The Mosaic GPU
  interpreter of JAX 0.10.2 cannot apply transposed SMEM views, so ``interpret=True``
  feeds the same kernel B operands already laid out (K, N) (K^T [B, Hkv, D, T] and V
  [B, T, Hkv, D]; a layout the hardware rejects for FP8) and drops the register layout
  hints (the interpreter has no rule for them).
* ``"reference"``: ``flash_prefill_reference``.
* ``"auto"``: ``pick_backend()``: "mosaic" on Hopper, "pallas" on other GPUs with FP8
  tensor cores (sm89+), the reference elsewhere.

Cost of one call (for throughput): with ``n_b = lengths[b]``, causal FLOPs are
``sum_b 4 * H * D * n_b * (n_b + 1) / 2`` (QK^T and PV, 2 FLOPs per multiply-add); the
kernels read ``B * T * (H + 2 * Hkv) * D`` FP8 bytes plus 8 bytes per (b, h, t) of row
scales, and write ``2 * B * T * H * D`` bytes (``flops_and_bytes``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from fineserve_jax.quant.fp8 import E4M3, E4M3_MAX, quantize_per_token, to_e4m3

LOG2E = math.log2(math.e)
P_SHIFT = 2.0 ** 8  # P in [0, 1] is rounded to E4M3 as P * 2**8 (at most 256 < 448)
_F32_TINY = float(jnp.finfo(jnp.float32).tiny)


@dataclass(frozen=True)
class FlashPrefillConfig:
    """Tile sizes of one launch. T is padded to a multiple of ``max(block_q, block_kv)``.

    ``block_q``: query rows per program (the Mosaic kernel needs 64: one warpgroup's
    wgmma M). ``block_kv``: keys per KV tile (a multiple of 64 for the Mosaic kernel, so
    P's SMEM tile fits a 64-byte swizzle). ``num_warps`` / ``num_stages``: Triton's for the
    generic kernel; ``num_stages`` is also the depth of the Mosaic kernel's K and V rings.
    The Mosaic kernel holds S_i, S_{i+1}, O and PV_{i-1} in registers: at D = 128 keep
    ``block_kv = 64`` (about 200 f32 registers a thread by count; 128 would spill).
    """

    block_q: int = 64
    block_kv: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for f in ("block_q", "block_kv"):
            v = getattr(self, f)
            if v < 16 or v & (v - 1):
                raise ValueError(f"FlashPrefillConfig.{f} must be a power of two >= 16, got {v}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be a power of two <= 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")

    def check_mosaic(self) -> None:
        if self.block_q != 64 or self.block_kv % 64 or self.num_stages < 2:
            raise ValueError("the Mosaic kernel needs block_q = 64, block_kv a multiple of 64 "
                             f"and num_stages >= 2, got {self}")


# ---------------------------------------------------------------------- quantization
@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["q8", "k8", "v8", "qk_scale", "out_scale", "lengths"],
                   meta_fields=[])
@dataclass(frozen=True)
class QuantizedPrefill:
    """What every kernel reads: FP8 tensors and two float32 row vectors (module docstring)."""

    q8: jax.Array  # e4m3[B, T, H, D], padding rows 0
    k8: jax.Array  # e4m3[B, T, Hkv, D], padding tokens 0
    v8: jax.Array  # e4m3[B, T, Hkv, D], padding tokens 0
    qk_scale: jax.Array  # f32[B, H, T]: sq * sk * sm_scale * log2(e), 0 on padding rows
    out_scale: jax.Array  # f32[B, H, T]: sv on valid rows, 0 on padding rows
    lengths: jax.Array  # i32[B]


def _head_scale(x: jax.Array, valid: jax.Array) -> jax.Array:
    """x [B, T, Hkv, D], valid bool[B, T] -> f32[B, Hkv]: absmax / 448 over valid tokens
    (finite values only), 1.0 where that is 0."""
    xf = x.astype(jnp.float32)
    ok = valid[:, :, None, None] & jnp.isfinite(xf)
    amax = jnp.max(jnp.where(ok, jnp.abs(xf), 0.0), axis=(1, 3))
    return jnp.where(amax > 0, jnp.maximum(amax * (1.0 / E4M3_MAX), _F32_TINY), 1.0)


def quantize_inputs(q, k, v, lengths, sm_scale: float | None = None) -> QuantizedPrefill:
    """Round q, k, v to E4M3 and fold every scale into the kernels' row vectors."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    g = H // Hkv
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    lengths = jnp.clip(jnp.asarray(lengths, jnp.int32).reshape(B), 0, T)
    valid = jnp.arange(T)[None, :] < lengths[:, None]  # (B, T)
    q8, sq = quantize_per_token(q, axis=-1)  # (B, T, H, D), (B, T, H, 1)
    sk = _head_scale(k, valid)  # (B, Hkv)
    sv = _head_scale(v, valid)
    k8 = to_e4m3(k.astype(jnp.float32) * (1.0 / sk)[:, None, :, None])
    v8 = to_e4m3(v.astype(jnp.float32) * (1.0 / sv)[:, None, :, None])
    zero8 = jnp.zeros((), E4M3)
    vmask = valid[:, :, None, None]
    q8, k8, v8 = (jnp.where(vmask, x, zero8) for x in (q8, k8, v8))
    sk_h = jnp.repeat(sk, g, axis=1)  # (B, H)
    sv_h = jnp.repeat(sv, g, axis=1)
    vrow = valid[:, None, :]  # (B, 1, T)
    qk = sq[..., 0].transpose(0, 2, 1) * (sk_h * (sm_scale * LOG2E))[:, :, None]
    qk_scale = jnp.where(vrow, qk, 0.0)
    out_scale = jnp.where(vrow, sv_h[:, :, None], 0.0)
    return QuantizedPrefill(q8, k8, v8, qk_scale, out_scale, lengths)


def _pad_t(x: QuantizedPrefill, tp: int) -> QuantizedPrefill:
    t = x.q8.shape[1]
    if tp == t:
        return x
    p4 = ((0, 0), (0, tp - t), (0, 0), (0, 0))
    p3 = ((0, 0), (0, 0), (0, tp - t))
    return QuantizedPrefill(jnp.pad(x.q8, p4), jnp.pad(x.k8, p4), jnp.pad(x.v8, p4),
                            jnp.pad(x.qk_scale, p3), jnp.pad(x.out_scale, p3), x.lengths)


# ------------------------------------------------------------------------- reference
def reference_from_quantized(x: QuantizedPrefill, block_kv: int) -> jax.Array:
    """The module docstring's recipe on quantized inputs -> bf16[B, T, H, D]."""
    B, T, H, D = x.q8.shape
    Hkv = x.k8.shape[2]
    g = H // Hkv
    tp = -(-T // block_kv) * block_kv
    x = _pad_t(x, tp)
    qf = x.q8.astype(jnp.float32).reshape(B, tp, Hkv, g, D)
    kf = x.k8.astype(jnp.float32)
    vf = x.v8
    hi = lax.Precision.HIGHEST
    rows = jnp.arange(tp)[:, None]
    c = x.qk_scale.reshape(B, Hkv, g, tp)[..., None]  # (B, Hkv, g, T, 1)

    def tile(carry, j):
        o, m, l = carry
        kt = lax.dynamic_slice_in_dim(kf, j * block_kv, block_kv, axis=1)
        vt = lax.dynamic_slice_in_dim(vf, j * block_kv, block_kv, axis=1)
        raw = jnp.einsum("btkgd,bskd->bkgts", qf, kt, precision=hi)
        s = raw * c
        cols = j * block_kv + jnp.arange(block_kv)[None, :]
        s = jnp.where(cols <= rows, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        alpha = jnp.exp2(m - m_new)
        p8 = (jnp.exp2(s - m_new[..., None]) * P_SHIFT).astype(E4M3)
        l = l * alpha + jnp.sum(p8.astype(jnp.float32), axis=-1)
        pv = jnp.einsum("bkgts,bskd->bkgtd", p8.astype(jnp.float32),
                        vt.astype(jnp.float32), precision=hi)
        return (o * alpha[..., None] + pv, m_new, l), None

    init = (jnp.zeros((B, Hkv, g, tp, D), jnp.float32),
            jnp.full((B, Hkv, g, tp), -jnp.inf, jnp.float32),
            jnp.zeros((B, Hkv, g, tp), jnp.float32))
    (o, _, l), _ = lax.scan(tile, init, jnp.arange(tp // block_kv))
    scale = x.out_scale.reshape(B, Hkv, g, tp) / jnp.maximum(l, 1.0)
    out = (o * scale[..., None]).astype(jnp.bfloat16)  # (B, Hkv, g, T, D)
    return out.reshape(B, H, tp, D).transpose(0, 2, 1, 3)[:, :T]


def flash_prefill_reference(q, k, v, lengths, *, sm_scale: float | None = None,
                            block_kv: int = 64) -> jax.Array:
    """Plain-jnp semantics of the kernels (module docstring), bf16[B, T, H, D]."""
    return reference_from_quantized(quantize_inputs(q, k, v, lengths, sm_scale), block_kv)


def float_attention(q, k, v, lengths, *, sm_scale: float | None = None) -> jax.Array:
    """Unquantized causal GQA attention in float32 (padding rows 0): the FP8 error yardstick."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    lengths = jnp.asarray(lengths, jnp.int32).reshape(B)
    valid = jnp.arange(T)[None, :] < lengths[:, None]
    zero = lambda x: jnp.where(valid[:, :, None, None], x.astype(jnp.float32), 0.0)
    qf = zero(q).reshape(B, T, Hkv, H // Hkv, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qf, zero(k), precision=lax.Precision.HIGHEST)
    causal = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]
    s = jnp.where(causal, s * sm_scale, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bkgts,bskd->btkgd", p, zero(v), precision=lax.Precision.HIGHEST)
    return jnp.where(valid[:, :, None, None], o.reshape(B, T, H, D), 0.0)


# --------------------------------------------------------------- generic Pallas kernel
def _pallas_kernel(q_ref, k_ref, v_ref, qs_ref, os_ref, len_ref, o_ref, *, block_kv: int):
    # q_ref e4m3[bq, D]; k_ref, v_ref e4m3[T, D] (this KV head); qs_ref, os_ref f32[bq];
    # len_ref i32[1]; o_ref bf16[bq, D]
    bq, d = q_ref.shape
    q0 = pl.program_id(1) * bq
    n = len_ref[0]
    # causal tile skipping; a q tile of padding rows only (q0 >= n) runs no tile at all
    n_kv = jnp.where(q0 < n, jnp.minimum(pl.cdiv(q0 + bq, block_kv), pl.cdiv(n, block_kv)), 0)
    q = q_ref[...]
    c = qs_ref[...][:, None]  # (bq, 1)
    rows = q0 + lax.broadcasted_iota(jnp.int32, (bq, block_kv), 0)

    def body(j, carry):
        o, m, l = carry
        k = k_ref[pl.ds(j * block_kv, block_kv), :]  # (bk, D)
        v = v_ref[pl.ds(j * block_kv, block_kv), :]
        raw = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.float32)  # (bq, bk)
        cols = j * block_kv + lax.broadcasted_iota(jnp.int32, (bq, block_kv), 1)
        s = jnp.where(cols <= rows, raw * c, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p8 = (jnp.exp2(s - m_new[:, None]) * P_SHIFT).astype(E4M3)
        l = l * alpha + jnp.sum(p8.astype(jnp.float32), axis=1)
        pv = jnp.dot(p8, v, preferred_element_type=jnp.float32)  # (bq, D)
        return o * alpha[:, None] + pv, m_new, l

    init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    o, _, l = lax.fori_loop(0, n_kv, body, init)
    scale = os_ref[...] / jnp.maximum(l, 1.0)
    o_ref[...] = (o * scale[:, None]).astype(o_ref.dtype)


def _pallas_call(x: QuantizedPrefill, cfg: FlashPrefillConfig, interpret: bool) -> jax.Array:
    B, tp, H, D = x.q8.shape
    Hkv = x.k8.shape[2]
    g = H // Hkv
    bq = cfg.block_q
    q_spec = pl.BlockSpec((None, bq, None, D), lambda b, i, h: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, tp, None, D), lambda b, i, h: (b, 0, h // g, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda b, i, h: (b, h, i))
    len_spec = pl.BlockSpec((None, 1), lambda b, i, h: (b, 0))
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as pl_triton

        if cfg.block_kv < 32:  # P @ V contracts over block_kv: Triton's FP8 dot wants >= 32
            raise ValueError(f"the Triton kernel needs block_kv >= 32, got {cfg.block_kv}")

        params["compiler_params"] = pl_triton.CompilerParams(num_warps=cfg.num_warps,
                                                             num_stages=cfg.num_stages)
    return pl.pallas_call(
        functools.partial(_pallas_kernel, block_kv=cfg.block_kv),
        grid=(B, tp // bq, H),
        in_specs=[q_spec, kv_spec, kv_spec, row_spec, row_spec, len_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct((B, tp, H, D), jnp.bfloat16),
        interpret=interpret, name="flash_prefill_fp8", **params,
    )(x.q8, x.k8, x.v8, x.qk_scale, x.out_scale, x.lengths.reshape(B, 1))


# ------------------------------------------------------------------------- entry point
def _compute_capability() -> tuple[int, int]:
    dev = jax.devices()[0]
    cc = str(getattr(dev, "compute_capability", "")) if dev.platform == "gpu" else ""
    major, _, minor = cc.partition(".")
    return (int(major), int(minor or 0)) if major.isdigit() else (0, 0)


def pick_backend() -> str:
    """"mosaic" on Hopper (sm90), "pallas" on other GPUs with FP8 tensor cores (sm89+),
    "reference" elsewhere (CPU, older GPUs)."""
    cc = _compute_capability()
    return "mosaic" if cc[0] == 9 else "pallas" if cc >= (8, 9) else "reference"


def _check_shapes(q_shape, k_shape, v_shape, lengths_shape) -> None:
    if len(q_shape) != 4 or len(k_shape) != 4 or tuple(k_shape) != tuple(v_shape):
        raise ValueError(f"flash_prefill: q [B, T, H, D], k, v [B, T, Hkv, D]; got "
                         f"{q_shape}, {k_shape}, {v_shape}")
    B, T, H, D = q_shape
    if tuple(k_shape[:2]) != (B, T) or k_shape[3] != D or H % k_shape[2]:
        raise ValueError(f"flash_prefill: k, v {k_shape} do not match q {q_shape} "
                         "(same B, T, D; H a multiple of Hkv)")
    if tuple(lengths_shape) != (B,):
        raise ValueError(f"flash_prefill: lengths must be [B] = [{B}], got {lengths_shape}")


def flash_prefill_quantized(x: QuantizedPrefill, *, backend: str = "pallas",
                            interpret: bool | None = None,
                            config: FlashPrefillConfig | None = None) -> jax.Array:
    """The kernels on already quantized inputs (``quantize_inputs``) -> bf16[B, T, H, D].

    ``backend``: "pallas", "mosaic" or "reference". ``interpret`` (default: not on a GPU)
    runs the generic kernel in the Pallas interpreter; for "mosaic" it selects the Mosaic
    GPU interpreter's operand layout (call it inside that interpreter)."""
    _check_shapes(x.q8.shape, x.k8.shape, x.v8.shape, x.lengths.shape)
    cfg = config or FlashPrefillConfig()
    if backend == "reference":
        return reference_from_quantized(x, cfg.block_kv)
    if backend not in ("pallas", "mosaic"):
        raise ValueError(f"flash_prefill: unknown backend {backend!r}")
    interpret = (jax.default_backend() != "gpu") if interpret is None else interpret
    T = x.q8.shape[1]
    blk = max(cfg.block_q, cfg.block_kv)
    x = _pad_t(x, -(-T // blk) * blk)
    if backend == "mosaic":
        from pallas_kernels.flash_prefill_hopper import mosaic_call as call
    else:
        call = _pallas_call
    return call(x, cfg, interpret)[:, :T]


def flash_prefill(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *,
                  backend: str = "auto", interpret: bool | None = None,
                  config: FlashPrefillConfig | None = None,
                  sm_scale: float | None = None) -> jax.Array:
    """FP8 causal prefill attention: q [B, T, H, D], k, v [B, T, Hkv, D] (bf16 or f32),
    lengths i32[B] -> bf16[B, T, H, D] (module docstring).

    ``backend``: "pallas" (generic kernel), "mosaic" (Hopper kernel), "reference", or
    "auto" (``pick_backend``). ``interpret``: as in ``flash_prefill_quantized``.
    ``sm_scale`` defaults to ``D ** -0.5``.
    """
    _check_shapes(q.shape, k.shape, v.shape, jnp.shape(lengths))
    if backend == "auto":
        backend = pick_backend()
    if backend not in ("pallas", "mosaic", "reference"):
        raise ValueError(f"flash_prefill: unknown backend {backend!r}")
    x = quantize_inputs(q, k, v, lengths, sm_scale)
    return flash_prefill_quantized(x, backend=backend, interpret=interpret, config=config)


def flops_and_bytes(lengths, seq_len: int, num_heads: int, num_kv_heads: int,
                    head_dim: int) -> tuple[int, int]:
    """(useful causal FLOPs, bytes) of one kernel call: 4 * H * D * n (n + 1) / 2 FLOPs per
    sequence of n valid tokens; bytes count each tensor once (FP8 q, k, v and the two f32
    row vectors read, bf16 out written); K/V tiles re-read per q tile and head come from L2
    and are not counted."""
    lens = [int(n) for n in jnp.asarray(lengths).reshape(-1)]
    flops = sum(4 * num_heads * head_dim * n * (n + 1) // 2 for n in lens)
    b, t = len(lens), seq_len
    read = b * t * (num_heads + 2 * num_kv_heads) * head_dim + 8 * b * num_heads * t
    return flops, read + 2 * b * t * num_heads * head_dim


__all__ = ["FlashPrefillConfig", "QuantizedPrefill", "flash_prefill", "flash_prefill_quantized",
           "flash_prefill_reference", "float_attention", "flops_and_bytes", "pick_backend",
           "quantize_inputs", "reference_from_quantized"]
