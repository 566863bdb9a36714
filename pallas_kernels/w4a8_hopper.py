"""INT4 x FP8 GEMM for Hopper (H100 / H200): Pallas Mosaic GPU, TMA and FP8 wgmma.

Same semantics and weight type as ``pallas_kernels.w4a8`` (read its docstring): FP8
activations ``xq`` with a per-token scale ``xs``, a ``W4A8Weight`` in the "split halves"
layout, per-group scales (and offsets for asymmetric groups), a column scale, and the
residual and gated-SiLU epilogues. Results equal ``w4a8_reference`` up to float32
summation order (bit for bit on ``exact_case``).

One launch = one block of ``block_m`` tokens x ``block_n`` weight rows; a single
warpgroup per block runs a TMA pipeline over the K tiles (``tile_k`` = 128) with
``num_stages`` tiles in flight. Per K tile:

* TMA brings the activation tile in segments ``[block_m, seg]`` and the packed codes in
  ``[block_n, seg]`` byte tiles (``seg = min(group, tile_k / 2)``: 64 for group 128,
  32 for group 32); a byte tile holds the codes of two segments, its low nibbles the one
  in the first half of the K tile, its high nibbles the one in the second half.
* The codes are unpacked in registers to exact small-integer FP8 values (``c - 8`` for
  symmetric groups, ``c`` for asymmetric ones; Hopper has no INT4 MMA) and written to an
  FP8 SMEM tile ``[block_n, seg]``: K contiguous, the K-major B operand FP8 wgmma needs.
* Per group: FP8 x FP8 wgmmas of that group's segments into a zeroed float32
  accumulator, then ``acc += partial * S[group, n]`` (``+ xsum[m, group] * b[group, n]``
  for asymmetric groups, with the exact per-group activation sums computed beside the
  kernel) in registers.

The epilogue applies ``xs[m] * cs[n]``, the gate (``silu(gate) * up``, gate and up rows
interleaved per ``tile_n`` as ``fuse_gate_up`` lays them out) and the residual, and
stores BF16 by TMA. With ``split_k > 1`` (decode: few output tiles) each output tile's K
range is shared by ``split_k`` blocks that store float32 partial sums; the wrapper adds
them and applies the same epilogue in XLA.

Scales and offsets are read transposed (``[groups, N]``) so that one group's row is a
contiguous TMA box; the wrapper transposes them per call, an XLA transpose of 1/64 of the
code bytes for group 128 and 1/4 for group 32 with offsets (read and written once more
per call: a pre-transposed weight layout would save that).

``interpret=True`` is the variant the Mosaic GPU interpreter runs: the unpacked weight
tile is stored ``[seg, block_n]`` (N contiguous) and used as B directly, because the
interpreter does not model ``transpose_ref`` on a wgmma operand, while a real FP8 wgmma
rejects an N-major B; register layout casts (which the interpreter lacks) are skipped.
Everything else (TMA pipeline, unpacking, wgmma per group, scaling, epilogues) is the
same code; the default variant is checked by lowering it for CUDA, which runs the Mosaic
GPU layout, transfer and wgmma operand checks (not ptxas: register use is unverified).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from fineserve_jax.linear import register_linear
from fineserve_jax.quant.fp8 import E4M3
from pallas_kernels import w4a8
from pallas_kernels.w4a8 import W4A8Weight, _epilogue_ref, quantize_activations

HOPPER_KINDS = ("H100", "H200", "H800", "GH200")


def is_hopper(device_kind: str) -> bool:
    """Whether a device kind (``jax.devices()[0].device_kind``) is a Hopper GPU."""
    return any(k in device_kind for k in HOPPER_KINDS)


HOPPER_LAYOUT = w4a8.LAYOUT + "+groups-major-scales"


@partial(jax.tree_util.register_dataclass,
         data_fields=["packed", "scales_t", "offsets_t", "col_scale"],
         meta_fields=["group", "k", "symmetric", "tile_k", "gated", "tile_n", "act"])
@dataclass(frozen=True, repr=False)
class W4A8HopperWeight(w4a8.PackedShape):
    """A ``W4A8Weight`` with its group scales and offsets stored groups-major, made once
    offline by ``from_w4a8``: the layout the Mosaic kernel reads by TMA, so that a call
    does not transpose them. Codes, column scale and meta fields as in ``W4A8Weight``."""

    packed: jax.Array  # u8[..., N, Kt/2], split halves per tile_k
    scales_t: jax.Array  # [..., Kt/group, N]
    offsets_t: jax.Array | None  # like scales_t (asymmetric), else None
    col_scale: jax.Array  # f32[..., N]
    group: int
    k: int
    symmetric: bool
    tile_k: int
    gated: bool = False
    tile_n: int = 0
    act: str | None = "fp8"

    @classmethod
    def from_w4a8(cls, w: W4A8Weight) -> W4A8HopperWeight:
        t = None if w.offsets is None else jnp.swapaxes(w.offsets, -1, -2)
        return cls(w.packed, jnp.swapaxes(w.scales, -1, -2), t, w.col_scale, w.group, w.k,
                   w.symmetric, w.tile_k, w.gated, w.tile_n, w.act)

    def to_w4a8(self) -> W4A8Weight:
        t = None if self.offsets_t is None else jnp.swapaxes(self.offsets_t, -1, -2)
        return W4A8Weight(self.packed, jnp.swapaxes(self.scales_t, -1, -2), t, self.col_scale,
                          self.group, self.k, self.symmetric, self.tile_k, self.gated,
                          self.tile_n, self.act)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """``[..., N, K]`` (so ``w4a8_reference`` takes this weight too)."""
        return self.to_w4a8().dequantize(dtype)

    @property
    def layout(self) -> str:
        return HOPPER_LAYOUT

    def __repr__(self) -> str:
        if not hasattr(self.packed, "shape"):
            return f"W4A8HopperWeight(group={self.group}, k={self.k})"
        return f"W4A8HopperWeight(shape={self.shape}, group={self.group}, gated={self.gated})"


def _hopper_linear(x: jax.Array, w: W4A8HopperWeight, residual: jax.Array | None) -> jax.Array:
    """``linear`` on a ``W4A8HopperWeight``: the Mosaic kernel where ``linear`` would run
    it for the ``W4A8Weight`` (a Hopper GPU), else that weight's path."""
    if not (jax.default_backend() == "gpu" and w4a8.KERNEL_MODE != "interpret"
            and w4a8.gpu_backend(w) == "mosaic"):
        return w4a8._matmul(x, w.to_w4a8(), residual)
    q, s = quantize_activations(x)
    r = None if residual is None else residual.reshape(-1, w.out_features)
    dtype = x.dtype if residual is None else residual.dtype
    y = w4a8_matmul_hopper(q, s, w, r, out_dtype=dtype)
    return y.reshape(*x.shape[:-1], w.out_features)


register_linear(W4A8HopperWeight)(lambda x, w: _hopper_linear(x, w, None))
register_linear(W4A8HopperWeight, residual=True)(_hopper_linear)


def supports(w: W4A8Weight | W4A8HopperWeight) -> bool:
    """Whether ``w4a8_matmul_hopper`` takes this weight (else use ``w4a8_matmul``)."""
    n = w.packed.shape[-2]
    bn_ok = w.tile_n in (64, 128) if w.gated else n % 32 == 0
    return w.tile_k == 128 and w.group in (32, 64, 128) and bn_ok


@dataclass(frozen=True)
class HopperConfig:
    """Tile sizes of one Mosaic GPU launch. ``block_m``: tokens per block, a multiple of
    64 (wgmma's M; M is padded to it); ``block_n``: weight rows per block, dividing N
    (a gated weight's ``tile_n``); ``num_stages``: K tiles in flight in the TMA pipeline;
    ``split_k``: blocks sharing one output tile along K (it must divide the K tiles), so
    that few output tiles (decode) still fill the GPU; their float32 partial sums are
    added and the epilogue applied beside the kernel."""

    block_m: int = 64
    block_n: int = 128
    num_stages: int = 3
    split_k: int = 1

    def __post_init__(self):
        if self.block_m not in (64, 128):
            raise ValueError(f"HopperConfig.block_m must be 64 or 128, got {self.block_m}")
        if self.block_n not in (32, 64, 128):
            raise ValueError(f"HopperConfig.block_n must be 32, 64 or 128, got {self.block_n}")
        if self.block_m * self.block_n > 64 * 128:
            raise ValueError("block_m * block_n > 64 * 128: the float32 sums and one "
                             "group's partial would not fit one warpgroup's registers")
        if not 1 <= self.num_stages <= 8:
            raise ValueError(f"HopperConfig.num_stages must be in [1, 8], got {self.num_stages}")
        if self.split_k < 1:
            raise ValueError(f"HopperConfig.split_k must be >= 1, got {self.split_k}")


def default_hopper_config(m: int, w: W4A8Weight, num_sms: int = 132) -> HopperConfig:
    """64 x 128 tiles (128 rows: a gated weight's ``tile_n``; the float32 sums and a
    group's partial take 128 of a thread's registers). Fewer blocks than half the SMs
    (decode) split K up to ``num_sms // blocks`` ways, keeping 4 K tiles per block."""
    n = w.packed.shape[-2]
    if w.gated:
        bn = w.tile_n
    else:
        bn = next(b for b in (128, 64, 32) if n % b == 0) if n % 32 == 0 else 0
        if not bn:
            raise ValueError(f"w4a8_matmul_hopper: N = {n} is not a multiple of 32")
    bm = 64 if bn > 64 or m <= 64 else 128
    blocks = -(-m // bm) * (n // bn)
    n_tiles = w.packed.shape[-1] * 2 // w.tile_k
    want = num_sms // blocks if 2 * blocks <= num_sms else 1
    split = max(d for d in range(1, n_tiles + 1)
                if n_tiles % d == 0 and d <= want and (n_tiles // d >= 4 or d == 1))
    return HopperConfig(block_m=bm, block_n=bn, split_k=split)


HOPPER_TUNED_PATH = Path(__file__).with_name("w4a8_hopper_tuned.json")


def _tuned(device_kind: str) -> dict[str, HopperConfig]:
    return w4a8.read_tuned(HOPPER_TUNED_PATH, device_kind, HopperConfig)


def pick_hopper_config(m: int, w: W4A8Weight | W4A8HopperWeight) -> HopperConfig:
    """The tuned config for this device and problem (``python -m pallas_kernels.tune_w4a8
    --backend mosaic`` writes the table, keyed like ``w4a8``'s), else the default."""
    n = w.packed.shape[-2]
    key = w4a8.tuning_key(m, n, w.k, "fireq" if w.symmetric else "fireq-g32", w.gated)
    return _tuned(jax.devices()[0].device_kind).get(key) or default_hopper_config(m, w, num_sms())


def num_sms() -> int:
    """SMs of the device kernels run on (the abstract device's under an abstract mesh,
    as in the interpreter); 132 (an H100 SXM) when it is no GPU."""
    mesh = jax.sharding.get_abstract_mesh()
    dev = getattr(mesh, "abstract_device", None)
    if dev is not None and getattr(dev, "num_cores", None):
        return dev.num_cores
    d = jax.devices()[0]
    return getattr(d, "core_count", 0) or 132 if d.platform == "gpu" else 132


@dataclass(frozen=True)
class _Plan:
    """Static shape of one launch (derived from the weight and the config)."""

    bm: int
    bn: int
    tile_k: int
    group: int
    n_tiles: int  # K tiles
    symmetric: bool
    gated: bool
    residual: bool
    interpret: bool
    stages: int
    split: int  # blocks along K; > 1: the kernel writes float32 partial sums
    rows: int  # output rows a block stores: bm, or M rounded up to 8 when M <= bm

    @property
    def seg(self) -> int:  # K elements per wgmma operand tile
        return min(self.group, self.tile_k // 2)

    @property
    def n_seg(self) -> int:  # segments per K tile
        return self.tile_k // self.seg

    @property
    def gpt(self) -> int:  # groups per K tile
        return self.tile_k // self.group

    @property
    def parts(self) -> tuple[tuple[int, int], ...]:  # (first row, rows): gate, up
        h = self.bn // 2
        return ((0, h), (h, h)) if self.gated else ((0, self.bn),)


def _smem_tiles(cols: int, itemsize: int):
    """Tiling and swizzle of an SMEM tile whose rows are ``cols`` elements: one swizzle
    atom per row (32, 64 or 128 bytes), the layout TMA and wgmma share."""
    sw = cols * itemsize
    return (plgpu.TilingTransform((8, sw // itemsize)), plgpu.SwizzleTransform(sw))


def _layout(x: jax.Array, layout, interpret: bool) -> jax.Array:
    """``x`` in a register layout (a no-op in the interpreter, which has no layouts).
    Right after a load, the load itself uses the layout."""
    return x if interpret else plgpu.layout_cast(x, layout)


def _row_vec(ref, interpret: bool) -> jax.Array:
    """A ``[rows]`` vector in the layout that broadcasts along a wgmma tile's columns."""
    return _layout(ref[...], plgpu.Layout.WGMMA.reduce(1), interpret)


def _col_vec(ref, interpret: bool) -> jax.Array:
    """A ``[cols]`` vector in the layout that broadcasts along a wgmma tile's rows."""
    return _layout(ref[...], plgpu.Layout.WGMMA.reduce(0), interpret)


# --------------------------------------------------------------------------- kernel
def _kernel(*refs, plan: _Plan):
    it = iter(refs)
    x_gmem = next(it)  # e4m3[Mp, Kt]
    p_gmem = next(it)  # u8[N, Kt/2], split halves per tile_k
    s_gmem = next(it)  # [G, N] group scales (transposed)
    b_gmem = None if plan.symmetric else next(it)  # [G, N] group offsets (transposed)
    xsum_gmem = None if plan.symmetric else next(it)  # f32[G, Mp] activation group sums
    epi_gmem = [] if plan.split > 1 else [next(it), next(it)]  # xs f32[Mp], cs f32[N]
    if plan.residual and plan.split == 1:
        epi_gmem.append(next(it))  # residual [Mo, N_out]
    o_gmem = next(it)  # [Mo, N_out]; split: f32[split, Mo, N]; Mo: M padded (plan.rows)
    w_smem = next(it)  # e4m3[n_seg, bn, seg] unpacked codes ([n_seg, seg, bn] interpreted)
    o_smem = next(it)  # [bm, N_out / (N / bn)]; split: f32[bm, bn]
    epi_smem = list(it)  # xs f32[bm], cs f32[bn], (residual [bm, bo]), barrier

    bm, bn, gpt = plan.bm, plan.bn, plan.gpt
    mi, ni = lax.axis_index("m"), lax.axis_index("n")
    m0, n0 = mi * bm, ni * bn
    bo = o_smem.shape[1]
    # Only the rows holding tokens go to and from GMEM (decode: 8 of the 64).
    o_rows, o_slice = pl.ds(0, plan.rows), (pl.ds(m0, plan.rows), pl.ds(ni * bo, bo))
    if plan.split == 1:  # the epilogue's inputs come in by TMA while the K loop runs
        srcs = [epi_gmem[0].at[pl.ds(m0, bm)], epi_gmem[1].at[pl.ds(n0, bn)]]
        srcs += [g.at[o_slice] for g in epi_gmem[2:]]
        dsts = epi_smem[:2] + [r.at[o_rows] for r in epi_smem[2:-1]]
        for src, dst in zip(srcs, dsts):
            plgpu.copy_gmem_to_smem(src, dst, epi_smem[-1])

    # This block's K range: tiles [k_idx * tiles, (k_idx + 1) * tiles).
    tiles = plan.n_tiles // plan.split
    k_idx = lax.axis_index("k")
    ks, gs = pl.ds(k_idx * tiles * plan.tile_k, tiles * plan.tile_k), pl.ds(k_idx * tiles * gpt,
                                                                          tiles * gpt)
    x_tiles = _smem_tiles(plan.seg, 1)
    n_seg, half, seg = plan.n_seg, plan.n_seg // 2, plan.seg
    specs = [plgpu.BlockSpec((bm, seg), lambda t, i=i: (0, t * n_seg + i), transforms=x_tiles)
             for i in range(n_seg)]
    specs += [plgpu.BlockSpec((bn, seg), lambda t, j=j: (0, t * half + j), transforms=x_tiles)
              for j in range(half)]
    gm = [x_gmem.at[pl.ds(m0, bm), ks]] * n_seg
    gm += [p_gmem.at[pl.ds(n0, bn), pl.ds(k_idx * tiles * plan.tile_k // 2,
                                          tiles * plan.tile_k // 2)]] * half
    specs.append(plgpu.BlockSpec((gpt, bn), lambda t: (t, 0)))
    gm.append(s_gmem.at[gs, pl.ds(n0, bn)])
    if not plan.symmetric:
        specs += [plgpu.BlockSpec((gpt, bn), lambda t: (t, 0)),
                  plgpu.BlockSpec((gpt, bm), lambda t: (t, 0))]
        gm += [b_gmem.at[gs, pl.ds(n0, bn)], xsum_gmem.at[gs, pl.ds(m0, bm)]]
    init = tuple(_layout(jnp.zeros((bm, rn), jnp.float32), plgpu.Layout.WGMMA, plan.interpret)
                 for _, rn in plan.parts)
    pipeline = plgpu.emit_pipeline(partial(_step, w_smem=w_smem, plan=plan), grid=(tiles,),
                                   in_specs=specs, init_carry=init,
                                   max_concurrent_steps=min(plan.stages, tiles))
    accs = pipeline(*gm)

    if plan.split > 1:  # float32 partial sums; the epilogue runs beside the kernel
        for acc, (r0, rn) in zip(accs, plan.parts):
            o_smem[:, pl.ds(r0, rn)] = acc
        dst = o_gmem.at[k_idx, pl.ds(m0, plan.rows), pl.ds(n0, bn)]
    else:
        o_smem[...] = _epilogue(accs, epi_smem, plan).astype(o_smem.dtype)
        dst = o_gmem.at[o_slice]
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem.at[o_rows], dst)
    plgpu.wait_smem_to_gmem(0)


def _step(_, *args, w_smem, plan: _Plan):
    """One K tile: unpack its codes to FP8 in SMEM, then per group a wgmma into a zeroed
    accumulator, scaled (and offset) into the running float32 sums ``carry``."""
    *bufs, carry = args
    bm, seg, n_seg = plan.bm, plan.seg, plan.n_seg
    half = n_seg // 2
    x_refs = bufs[:n_seg]  # n_seg x e4m3[bm, seg]
    p_refs = bufs[n_seg:n_seg + half]  # half x u8[bn, seg]
    s_ref = bufs[n_seg + half]  # [gpt, bn]
    b_ref, xsum_ref = (None, None) if plan.symmetric else bufs[n_seg + half + 1:]
    # Every thread reads this stage's scales before the barrier in commit_smem: after the
    # step the pipeline refills the stage by TMA, with no barrier of its own.
    scales, offsets, xsums = [], [], []
    for g in range(plan.gpt):
        scales.append([_col_vec(s_ref.at[g, pl.ds(r0, rn)], plan.interpret).astype(jnp.float32)
                       for r0, rn in plan.parts])
        if not plan.symmetric:
            offsets.append([_col_vec(b_ref.at[g, pl.ds(r0, rn)],
                                     plan.interpret).astype(jnp.float32)
                            for r0, rn in plan.parts])
            xsums.append(_row_vec(xsum_ref.at[g], plan.interpret))  # f32[bm]
    # Byte tile j holds segment j (low nibbles) and segment half + j (high nibbles).
    for j, p_ref in enumerate(p_refs):
        p = p_ref[...]  # u8[bn, seg]
        # Only bitwise ops on 8-bit values: no shift, the high nibble is scaled down.
        # float16 (exact for these integers) converts to E4M3 two values at a time.
        lo = (p & 0x0F).astype(jnp.float16)
        hi = (p & 0xF0).astype(jnp.float16) * (1 / 16)
        for i, v in ((j, lo), (half + j, hi)):
            v = (v - 8 if plan.symmetric else v).astype(E4M3)  # exact: integers in [-8, 15]
            w_smem[i] = v.T if plan.interpret else v
    plgpu.commit_smem()  # the stores, visible to the wgmmas

    def b_operand(i: int, r0: int, rn: int):
        """Segment ``i``'s weight rows ``[r0, r0 + rn)`` as the ``[seg, rn]`` B operand."""
        if plan.interpret:
            return w_smem.at[i, :, pl.ds(r0, rn)]
        return plgpu.transpose_ref(w_smem.at[i, pl.ds(r0, rn)], (1, 0))  # K-major

    accs = list(carry)
    for g in range(plan.gpt):
        segs = [i for i in range(n_seg) if i * seg // plan.group == g]
        for p_i, (r0, rn) in enumerate(plan.parts):
            def mma(acc_ref, segs=segs, r0=r0, rn=rn):
                for i in segs:
                    plgpu.wgmma(acc_ref, x_refs[i], b_operand(i, r0, rn))
                plgpu.wgmma_wait(0)
                return acc_ref[...]

            part = pl.run_scoped(mma, plgpu.ACC((bm, rn), jnp.float32))  # f32[bm, rn]
            y = part * lax.broadcast_in_dim(scales[g][p_i], (bm, rn), (1,))
            if not plan.symmetric:
                y = y + (lax.broadcast_in_dim(xsums[g], (bm, rn), (0,))
                         * lax.broadcast_in_dim(offsets[g][p_i], (bm, rn), (1,)))
            accs[p_i] = accs[p_i] + y
    return tuple(accs)


def _epilogue(accs, epi_smem, plan: _Plan) -> jax.Array:
    """Per-token and column scales, the gate, the residual: f32[bm, bo]."""
    xs_smem, cs_smem, *r_smem, barrier = epi_smem
    plgpu.barrier_wait(barrier)
    bm = plan.bm
    xs = lax.broadcast_in_dim(_row_vec(xs_smem, plan.interpret), (bm, plan.parts[0][1]), (0,))
    ys = []
    for acc, (r0, rn) in zip(accs, plan.parts):
        cs = _col_vec(cs_smem.at[pl.ds(r0, rn)], plan.interpret)
        ys.append(acc * xs * lax.broadcast_in_dim(cs, (bm, rn), (1,)))
    if plan.gated:
        gate, up = ys
        y = gate / (1.0 + jnp.exp(-gate)) * up
    else:
        (y,) = ys
    if r_smem:  # (rows past plan.rows hold stale data; they are not stored)
        y = y + r_smem[0][...].astype(jnp.float32)
    return y


# -------------------------------------------------------------------------- wrapper
def w4a8_matmul_hopper(xq: jax.Array, xs: jax.Array, w: W4A8Weight | W4A8HopperWeight,
                       residual: jax.Array | None = None, *,
                       config: HopperConfig | None = None, interpret: bool = False,
                       out_dtype=jnp.bfloat16) -> jax.Array:
    """``xq`` e4m3[M, K], ``xs`` f32[M] or [M, 1] -> ``[M, N]`` (``N / 2`` when gated),
    the Mosaic GPU (Hopper) kernel; same results as ``w4a8.w4a8_matmul``.

    ``residual`` ``[M, N_out]`` is added before the rounding to ``out_dtype``. A
    ``W4A8HopperWeight`` saves the per-call transpose of the scales and offsets.
    ``interpret``: the variant for the Mosaic GPU interpreter (module docstring); on a
    GPU leave it False.
    """
    if w.packed.ndim != 2:
        raise ValueError(f"w4a8_matmul_hopper: one [N, K] weight, got {w.shape}")
    m, k = xq.shape
    if k != w.k:
        raise ValueError(f"w4a8_matmul_hopper: x has K = {k}, the weight {w.k}")
    if xq.dtype != E4M3:
        raise TypeError(f"w4a8_matmul_hopper: activations must be float8_e4m3fn, got {xq.dtype}")
    if not supports(w):
        raise ValueError(f"w4a8_matmul_hopper: needs tile_k = 128, group 32, 64 or 128 and "
                         f"N a multiple of 32, got {w!r}")
    n, n_out = w.packed.shape[0], w.out_features
    kt = 2 * w.packed.shape[1]
    cfg = config or pick_hopper_config(m, w)
    bm, bn = cfg.block_m, cfg.block_n
    if w.gated and bn != w.tile_n:
        raise ValueError(f"a gated weight needs block_n = tile_n = {w.tile_n}, got {bn}")
    if n % bn:
        raise ValueError(f"block_n = {bn} does not divide N = {n}")
    if (kt // w.tile_k) % cfg.split_k:
        raise ValueError(f"split_k = {cfg.split_k} does not divide the {kt // w.tile_k} K tiles")
    if residual is not None and residual.shape != (m, n_out):
        raise ValueError(f"residual must be {(m, n_out)}, got {residual.shape}")
    mp = -(-m // bm) * bm
    rows = bm if mp > bm else -(-m // 8) * 8
    mo = mp if mp > bm else rows  # output rows (M padded)
    plan = _Plan(bm=bm, bn=bn, tile_k=w.tile_k, group=w.group, n_tiles=kt // w.tile_k,
                 symmetric=w.symmetric, gated=w.gated, residual=residual is not None,
                 interpret=interpret, stages=cfg.num_stages, split=cfg.split_k, rows=rows)
    xq = jnp.pad(xq, ((0, mp - m), (0, kt - k)))
    xs = jnp.pad(xs.reshape(-1).astype(jnp.float32), (0, mp - m))
    # A TMA copy moves a multiple of 128 bytes: narrow blocks of FP8 scales go as float32.
    if isinstance(w, W4A8HopperWeight):
        st, ot = w.scales_t, w.offsets_t
    else:
        st, ot = w.scales.T, None if w.offsets is None else w.offsets.T
    if plan.gpt * bn * jnp.dtype(st.dtype).itemsize % 128:
        st, ot = (None if a is None else a.astype(jnp.float32) for a in (st, ot))
    inputs = [xq, w.packed, st]
    if not w.symmetric:
        # Exact: at most 32 E4M3 values per group, within float32's 24-bit mantissa.
        xsum = xq.astype(jnp.float32).reshape(mp, kt // w.group, w.group).sum(-1)
        inputs += [ot, xsum.T]
    cs = w.col_scale.astype(jnp.float32)
    if plan.split > 1:
        partial_sums = _call(plan, inputs, mp, mo, n, n_out, out_dtype, residual)
        y = partial_sums.sum(0)[:m] * xs[:m, None] * cs[None, :]
        return _epilogue_ref(y, w, residual, out_dtype)
    inputs += [xs, cs]
    if residual is not None:
        inputs.append(jnp.pad(residual, ((0, mo - m), (0, 0))))
    return _call(plan, inputs, mp, mo, n, n_out, out_dtype, residual)[:m]


def _call(plan: _Plan, inputs, mp, mo, n, n_out, out_dtype, residual):
    """One ``plgpu.kernel`` launch over (M blocks, N blocks, K splits)."""
    bm, bn = plan.bm, plan.bn
    w_tile = (plan.n_seg, plan.seg, bn) if plan.interpret else (plan.n_seg, bn, plan.seg)
    # The interpreter ignores tiling; the K-major tile shares the activations' swizzle.
    w_tf = () if plan.interpret else _smem_tiles(plan.seg, 1)
    scratch = [plgpu.SMEM(w_tile, E4M3, transforms=w_tf)]
    if plan.split > 1:
        out = jax.ShapeDtypeStruct((plan.split, mo, n), jnp.float32)
        tf = () if plan.interpret else _smem_tiles(32, 4)  # f32 rows: 128-byte swizzle
        scratch.append(plgpu.SMEM((bm, bn), jnp.float32, transforms=tf))
    else:
        out = jax.ShapeDtypeStruct((mo, n_out), out_dtype)
        bo = bn // 2 if plan.gated else bn
        tf = () if plan.interpret else _smem_tiles(min(bo, 64), 2)  # 16-bit rows
        scratch += [plgpu.SMEM((bm, bo), out_dtype, transforms=tf),
                    plgpu.SMEM((bm,), jnp.float32), plgpu.SMEM((bn,), jnp.float32)]
        if residual is not None:
            scratch.append(plgpu.SMEM((bm, bo), residual.dtype, transforms=tf))
        scratch.append(plgpu.Barrier(num_arrivals=len(scratch) - 2))
    call = plgpu.kernel(partial(_kernel, plan=plan), out_type=out,
                        grid=(mp // bm, n // bn, plan.split), grid_names=("m", "n", "k"),
                        scratch_types=scratch)
    return call(*inputs)


__all__ = ["HOPPER_KINDS", "HOPPER_LAYOUT", "HOPPER_TUNED_PATH", "HopperConfig",
           "W4A8HopperWeight", "default_hopper_config", "is_hopper", "num_sms",
           "pick_hopper_config", "supports", "w4a8_matmul_hopper"]
