"""INT4 x FP8 GEMM (FireQ's linear layer): FP8 activations, INT4 weights, BF16 out.

    y[m, n] = xs[m] * cs[n] * sum_g S[n, g] * sum_{k in g} xq[m, k] * code(n, k)
              (+ xs[m] * cs[n] * b[n, g] * sum_{k in g} xq[m, k], asymmetric)

``xq`` is FP8 E4M3 ``[M, K]`` with one float32 scale ``xs`` per token; the weight is a
``W4A8Weight``: 4-bit codes in the kernel's layout, one scale ``S`` (and for asymmetric
groups an offset ``b``) per group of ``group`` elements along K, and a float32 column
scale ``cs`` (FireQ's ``2**-m``; 1 for asymmetric groups). Codes enter the tensor cores as
exact small integers in FP8 (``c - 8`` in [-8, 7] or ``c`` in [0, 15]); each group's FP8 x
FP8 partial dot (float32 accumulation) is multiplied by its scale, so the kernel computes
the dequantized weight's product exactly up to float32 summation order. The per-token and
column scales are applied once, in the epilogue.

Layout (``W4A8Weight.from_int4``, done once offline; ``layout`` names it in checkpoint
metadata). K is padded to a multiple of ``tile_k`` (zero codes, scale 1, offset 0;
activations are zero-padded to match). Within each K tile the low nibbles of its
``tile_k / 2`` bytes hold elements ``[0, tile_k / 2)`` and the high nibbles elements
``[tile_k / 2, tile_k)`` ("split halves"): the kernel does one dot per half against
contiguous activation columns, which every lowering accepts (an interleaved nibble
layout needs a register shuffle that Triton rejects).

Epilogues: ``residual`` adds a ``[M, N]`` tensor before the BF16 rounding (o_proj and
down_proj); a *gated* weight (``fuse_gate_up``) holds gate and up rows interleaved per
``tile_n`` rows (the first half of each tile gate, the second up) and the kernel returns
``silu(gate) * up`` ``[M, N / 2]`` from one pass over the activations.

Backends: ``w4a8_matmul`` is the generic Pallas kernel (interpret mode on CPU, the
Triton lowering on GPU); ``pallas_kernels.w4a8_hopper.w4a8_matmul_hopper`` the Mosaic GPU
kernel for Hopper, which ``linear`` picks there (``GPU_BACKEND``); ``w4a8_reference`` is
the plain-jnp semantics.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from fineserve_jax.linear import register_linear
from fineserve_jax.quant.fp8 import E4M3
from fineserve_jax.quant.int4 import Int4Weight, exp2i, pack_int4, unpack_int4

LAYOUT = "w4a8-split-halves-v1"


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes of one launch. ``block_n`` must divide N (a gated weight's ``tile_n``
    for gated weights); M is padded to ``block_m``."""

    block_m: int = 64
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for f in ("block_m", "block_n"):
            v = getattr(self, f)
            if v < 16 or v & (v - 1):
                raise ValueError(f"BlockConfig.{f} must be a power of two >= 16, got {v}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError(f"bad num_warps/num_stages: {self.num_warps}, {self.num_stages}")


M_BUCKETS = (16, 64, 256, 1024, 4096, 16384)
TUNED_PATH = Path(__file__).with_name("w4a8_tuned.json")


def tuning_key(m: int, n: int, k: int, fmt: str, gated: bool) -> str:
    """The tuned table's key: format, N x K, gated, and the smallest M bucket >= m."""
    mb = next((b for b in M_BUCKETS if m <= b), M_BUCKETS[-1])
    return f"{fmt}{'-gated' if gated else ''}:{n}x{k}:m{mb}"


@functools.cache
def read_tuned(path: Path, device_kind: str, config_cls) -> dict:
    """``{tuning key: config_cls}`` of one device kind from a tuning table (JSON keyed by
    device kind, then by ``tuning_key``); {} when the file is absent. Read once."""
    if not path.exists():
        return {}
    table = json.loads(path.read_text()).get(device_kind, {})
    names = [f.name for f in dataclasses.fields(config_cls)]
    return {key: config_cls(**{f: cfg[f] for f in names}) for key, cfg in table.items()}


def _tuned(device_kind: str) -> dict[str, BlockConfig]:
    return read_tuned(TUNED_PATH, device_kind, BlockConfig)


def pick_config(m: int, w: W4A8Weight) -> BlockConfig:
    """The tuned config for this device and problem (``python -m pallas_kernels.tune_w4a8``
    writes the table), else ``default_config``."""
    n = w.packed.shape[-2]
    fmt = "fireq" if w.symmetric else "fireq-g32"
    kind = jax.devices()[0].device_kind
    hit = _tuned(kind).get(tuning_key(m, n, w.k, fmt, w.gated))
    return hit or default_config(m, n, w.gated, w.tile_n)


def default_config(m: int, n: int, gated: bool = False, tile_n: int = 128) -> BlockConfig:
    """A block config for an ``[m, K] x [K, n]`` problem when no tuned entry exists:
    small M tiles for decode, 64 or 128 for prefill; ``block_n`` the largest of
    256/128/64 dividing n (a gated weight's ``tile_n``)."""
    bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 1024 else 128
    if gated:
        bn = tile_n
    else:
        bn = next((b for b in (256, 128, 64, 32, 16) if n % b == 0), 16)
    return BlockConfig(block_m=bm, block_n=bn, num_warps=4 if bm <= 64 else 8)


# --------------------------------------------------------------------------- weight
class PackedShape:
    """Shape of a kernel-layout weight from its ``packed`` codes and logical ``k``
    (``W4A8Weight`` and the Hopper layout share it)."""

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical ``[..., N, K]`` (N counts gate and up rows when gated)."""
        return tuple(self.packed.shape[:-1]) + (self.k,)

    @property
    def out_features(self) -> int:
        n = self.packed.shape[-2]
        return n // 2 if self.gated else n


@partial(jax.tree_util.register_dataclass,
         data_fields=["packed", "scales", "offsets", "col_scale"],
         meta_fields=["group", "k", "symmetric", "tile_k", "gated", "tile_n", "act"])
@dataclass(frozen=True, repr=False)
class W4A8Weight(PackedShape):
    """An INT4 weight ``[..., N, K]`` in the kernel's layout (leading axes: stacked layers).

    ``gated``: rows are gate and up interleaved per ``tile_n`` (``fuse_gate_up``) and
    ``linear`` returns ``silu(gate) * up`` with ``N / 2`` columns.
    """

    packed: jax.Array  # u8[..., N, Kt/2], split halves per tile_k; Kt = K padded to tile_k
    scales: jax.Array  # [..., N, Kt/group] e4m3, f16 or bf16
    offsets: jax.Array | None  # like scales (asymmetric), else None
    col_scale: jax.Array  # f32[..., N]: 2**-m of the row's tensor (1 if asymmetric)
    group: int
    k: int  # logical K
    symmetric: bool
    tile_k: int
    gated: bool = False
    tile_n: int = 0  # rows per gate/up tile when gated
    act: str | None = "fp8"

    @property
    def nbytes(self) -> int:
        return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(self))

    @property
    def layout(self) -> str:
        return LAYOUT

    @classmethod
    def from_int4(cls, w: Int4Weight, tile_k: int = 128) -> W4A8Weight:
        """Reorder an ``Int4Weight`` (any leading axes) into the kernel layout."""
        if w.act != "fp8":
            raise ValueError("W4A8Weight needs an Int4Weight with FP8 activations (act='fp8')")
        if tile_k % 32 or tile_k % w.group or tile_k < w.group:
            raise ValueError(f"tile_k must be a multiple of 32 and of the group ({w.group}), "
                             f"got {tile_k}")
        codes = unpack_int4(w.packed)  # (..., N, Kp)
        *lead, n, kp = codes.shape
        kt = -(-kp // tile_k) * tile_k
        pad_code = 8 if w.symmetric else 0  # a zero weight either way
        codes = jnp.pad(codes, [(0, 0)] * len(lead) + [(0, 0), (0, kt - kp)],
                        constant_values=pad_code)
        t = codes.reshape(*lead, n, kt // tile_k, 2, tile_k // 2)
        packed = (t[..., 0, :] | (t[..., 1, :] << 4)).reshape(*lead, n, kt // 2)
        g_extra = (kt - kp) // w.group
        pad_g = [(0, 0)] * len(lead) + [(0, 0), (0, g_extra)]
        scales = jnp.pad(w.scales, pad_g, constant_values=1)
        offsets = None if w.offsets is None else jnp.pad(w.offsets, pad_g)
        if w.symmetric:
            cs = exp2i(-jnp.asarray(w.exponent))[..., None] * jnp.ones((n,), jnp.float32)
        else:
            cs = jnp.ones((*lead, n), jnp.float32)
        return cls(packed.astype(jnp.uint8), scales, offsets, cs, w.group, w.k, w.symmetric,
                   tile_k, act=w.act)

    def codes(self) -> jax.Array:
        """u8[..., N, Kt] codes in logical K order (padding included)."""
        *lead, n, half = self.packed.shape
        t = self.packed.reshape(*lead, n, -1, self.tile_k // 2)
        c = jnp.stack([t & 0xF, t >> 4], axis=-2)  # (..., N, tiles, 2, tile_k/2)
        return c.reshape(*lead, n, 2 * half)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """``[..., N, K]`` in ``dtype`` (rows in stored order: interleaved when gated)."""
        c = self.codes().astype(jnp.float32)
        *lead, n, kt = c.shape
        c = c.reshape(*lead, n, kt // self.group, self.group)
        s = self.scales.astype(jnp.float32)[..., None]
        w = (c - 8.0) * s if self.symmetric else c * s + self.offsets.astype(jnp.float32)[..., None]
        w = w.reshape(*lead, n, kt) * self.col_scale[..., None]
        return w[..., : self.k].astype(dtype)

    def __repr__(self) -> str:
        if not hasattr(self.packed, "shape"):
            return f"W4A8Weight(group={self.group}, k={self.k})"
        kind = "symmetric" if self.symmetric else "asymmetric"
        g = f", gated tile_n={self.tile_n}" if self.gated else ""
        return (f"W4A8Weight(shape={self.shape}, group={self.group}, {kind}, "
                f"scales={jnp.dtype(self.scales.dtype).name}, tile_k={self.tile_k}{g})")


def fuse_gate_up(gate: W4A8Weight, up: W4A8Weight, tile_n: int = 128) -> W4A8Weight:
    """One gated weight from gate and up ``[..., F, K]``: per ``tile_n`` rows, the first
    half gate rows, the second the matching up rows (F must be a multiple of tile_n / 2)."""
    if tile_n < 32 or tile_n & (tile_n - 1):
        raise ValueError(f"tile_n must be a power of two >= 32, got {tile_n}")
    same = ("group", "k", "symmetric", "tile_k", "act")
    if any(getattr(gate, f) != getattr(up, f) for f in same) or gate.shape != up.shape:
        raise ValueError("fuse_gate_up: gate and up must have the same shape and format")
    if gate.gated or up.gated:
        raise ValueError("fuse_gate_up: already gated")
    f, h = gate.shape[-2], tile_n // 2
    if f % h:
        raise ValueError(f"fuse_gate_up: {f} rows is not a multiple of tile_n / 2 = {h}")

    def mix(a, b):  # (..., F, X) x2 -> (..., 2F, X), interleaved per h rows
        *lead, _, x = a.shape
        a = a.reshape(*lead, f // h, 1, h, x)
        b = b.reshape(*lead, f // h, 1, h, x)
        return jnp.concatenate([a, b], axis=-3).reshape(*lead, 2 * f, x)

    def mix_col(a, b):
        return mix(a[..., None], b[..., None])[..., 0]

    offsets = None if gate.offsets is None else mix(gate.offsets, up.offsets)
    return W4A8Weight(mix(gate.packed, up.packed), mix(gate.scales, up.scales), offsets,
                      mix_col(gate.col_scale, up.col_scale), gate.group, gate.k,
                      gate.symmetric, gate.tile_k, True, tile_n, gate.act)


# ------------------------------------------------------------------------ reference
def w4a8_reference(xq: jax.Array, xs: jax.Array, w: W4A8Weight,
                   residual: jax.Array | None = None, out_dtype=jnp.bfloat16) -> jax.Array:
    """Plain-jnp semantics of the kernel: float32 math on the dequantized weight."""
    x = xq.astype(jnp.float32) * xs.reshape(-1, 1).astype(jnp.float32)
    y = jnp.dot(x, w.dequantize(jnp.float32).T, precision=jax.lax.Precision.HIGHEST)
    return _epilogue_ref(y, w, residual, out_dtype)


def _epilogue_ref(y, w: W4A8Weight, residual, out_dtype):
    if w.gated:
        m, n = y.shape
        t = y.reshape(m, n // w.tile_n, 2, w.tile_n // 2)
        y = (jax.nn.silu(t[:, :, 0]) * t[:, :, 1]).reshape(m, n // 2)
    if residual is not None:
        y = y + residual.astype(jnp.float32)
    return y.astype(out_dtype)


# --------------------------------------------------------------------------- kernel
def _segments(tile_k: int, group: int) -> list[tuple[int, int, int, int]]:
    """(half, byte offset in the tile, length, group index in the tile) of one K tile:
    the pieces one dot each, cut at half and group boundaries."""
    half = tile_k // 2
    seg = min(group, half)
    out = []
    for h in (0, 1):
        for b in range(0, half, seg):
            out.append((h, b, seg, (h * half + b) // group))
    return out


def _kernel(*refs, tile_k: int, group: int, n_tiles: int, symmetric: bool, gated: bool,
            has_residual: bool):
    it = iter(refs)
    x_ref, xs_ref, w_ref, s_ref = next(it), next(it), next(it), next(it)
    b_ref = None if symmetric else next(it)
    cs_ref = next(it)
    r_ref = next(it) if has_residual else None
    o_ref = next(it)
    bm = x_ref.shape[0]
    bn = w_ref.shape[0]
    parts = ((0, bn // 2), (bn // 2, bn // 2)) if gated else ((0, bn),)
    gpt = tile_k // group  # groups per K tile
    segs = _segments(tile_k, group)

    def body(t, accs):
        accs = list(accs)
        for p, (r0, rn) in enumerate(parts):
            sums = [None] * gpt
            xsum = [None] * gpt
            for h, b0, ln, g in segs:
                k0 = t * tile_k + h * (tile_k // 2) + b0
                xv = x_ref[:, pl.ds(k0, ln)]
                byte = w_ref[pl.ds(r0, rn), pl.ds(t * (tile_k // 2) + b0, ln)].astype(jnp.int32)
                c = (byte & 0xF) if h == 0 else (byte >> 4)
                if symmetric:
                    c = c - 8
                wv = c.astype(jnp.float32).astype(E4M3)
                d = jax.lax.dot_general(xv, wv, (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32)
                sums[g] = d if sums[g] is None else sums[g] + d
                if not symmetric:
                    xr = jnp.sum(xv.astype(jnp.float32), axis=1, keepdims=True)
                    xsum[g] = xr if xsum[g] is None else xsum[g] + xr
            acc = accs[p]
            for g in range(gpt):
                gi = t * gpt + g
                s = s_ref[pl.ds(r0, rn), pl.ds(gi, 1)].astype(jnp.float32)  # (rn, 1)
                acc = acc + sums[g] * s.reshape(1, rn)
                if not symmetric:
                    b = b_ref[pl.ds(r0, rn), pl.ds(gi, 1)].astype(jnp.float32)
                    acc = acc + xsum[g] * b.reshape(1, rn)
            accs[p] = acc
        return tuple(accs)

    init = tuple(jnp.zeros((bm, rn), jnp.float32) for _, rn in parts)
    accs = jax.lax.fori_loop(0, n_tiles, body, init)
    xs = xs_ref[...].astype(jnp.float32)  # (bm, 1)
    outs = []
    for p, (r0, rn) in enumerate(parts):
        cs = cs_ref[pl.ds(r0, rn)].astype(jnp.float32).reshape(1, rn)
        outs.append(accs[p] * xs * cs)
    y = jax.nn.silu(outs[0]) * outs[1] if gated else outs[0]
    if has_residual:
        y = y + r_ref[...].astype(jnp.float32)
    o_ref[...] = y.astype(o_ref.dtype)


def w4a8_matmul(xq: jax.Array, xs: jax.Array, w: W4A8Weight, residual: jax.Array | None = None,
                *, config: BlockConfig | None = None, interpret: bool = False,
                out_dtype=jnp.bfloat16) -> jax.Array:
    """``xq`` e4m3[M, K], ``xs`` f32[M] or [M, 1] -> ``[M, N]`` (``N / 2`` when gated).

    One program per (block_m x block_n) output tile loops over K tiles. ``interpret``
    runs the Pallas interpreter (CPU); on a GPU the kernel lowers through Triton.
    """
    if w.packed.ndim != 2:
        raise ValueError(f"w4a8_matmul: one [N, K] weight, got {w.shape}; slice stacked layers")
    m, k = xq.shape
    if k != w.k:
        raise ValueError(f"w4a8_matmul: x has K = {k}, the weight {w.k}")
    if xq.dtype != E4M3:
        raise TypeError(f"w4a8_matmul: activations must be float8_e4m3fn, got {xq.dtype}")
    n = w.packed.shape[0]
    n_out = w.out_features
    cfg = config or pick_config(m, w)
    bn = cfg.block_n
    if w.gated and bn != w.tile_n:
        raise ValueError(f"a gated weight needs block_n = tile_n = {w.tile_n}, got {bn}")
    if n % bn:
        raise ValueError(f"block_n = {bn} does not divide N = {n}")
    kt = 2 * w.packed.shape[1]
    bm = cfg.block_m
    mp = -(-m // bm) * bm
    xq = jnp.pad(xq, ((0, mp - m), (0, kt - k)))
    xs = jnp.pad(xs.reshape(-1, 1).astype(jnp.float32), ((0, mp - m), (0, 0)))
    bo = bn // 2 if w.gated else bn
    inputs = [xq, xs, w.packed, w.scales]
    specs = [pl.BlockSpec((bm, kt), lambda i, j: (i, 0)),
             pl.BlockSpec((bm, 1), lambda i, j: (i, 0)),
             pl.BlockSpec((bn, kt // 2), lambda i, j: (j, 0)),
             pl.BlockSpec((bn, w.scales.shape[1]), lambda i, j: (j, 0))]
    if not w.symmetric:
        inputs.append(w.offsets)
        specs.append(pl.BlockSpec((bn, w.offsets.shape[1]), lambda i, j: (j, 0)))
    inputs.append(w.col_scale)
    specs.append(pl.BlockSpec((bn,), lambda i, j: (j,)))
    if residual is not None:
        if residual.shape != (m, n_out):
            raise ValueError(f"residual must be {(m, n_out)}, got {residual.shape}")
        inputs.append(jnp.pad(residual, ((0, mp - m), (0, 0))))
        specs.append(pl.BlockSpec((bm, bo), lambda i, j: (i, j)))
    kern = partial(_kernel, tile_k=w.tile_k, group=w.group, n_tiles=kt // w.tile_k,
                   symmetric=w.symmetric, gated=w.gated, has_residual=residual is not None)
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as pl_triton

        params["compiler_params"] = pl_triton.CompilerParams(num_warps=cfg.num_warps,
                                                             num_stages=cfg.num_stages)
    out = pl.pallas_call(
        kern, grid=(mp // bm, n // bn), in_specs=specs,
        out_specs=pl.BlockSpec((bm, bo), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, n_out), out_dtype),
        interpret=interpret, name="w4a8_matmul", **params)(*inputs)
    return out[:m]


# ------------------------------------------------------------------------- dispatch
# ``linear`` on a ``W4A8Weight``: the kernel on GPU, the XLA reference elsewhere; set to
# "interpret" to run the kernel in the Pallas interpreter on any backend (tests).
KERNEL_MODE: str | None = None
# Which GPU kernel ``linear`` runs: "mosaic" (``w4a8_hopper``, Mosaic GPU: TMA + FP8
# wgmma) or "triton" (``w4a8_matmul``); None picks mosaic on Hopper, triton elsewhere.
GPU_BACKEND: str | None = None


def gpu_backend(w: W4A8Weight) -> str:
    """The GPU kernel ``linear`` uses for ``w`` on this device (``GPU_BACKEND`` forces
    one; the Mosaic kernel also needs tile_k 128 and N a multiple of 32)."""
    from pallas_kernels import w4a8_hopper

    if GPU_BACKEND is not None:
        return GPU_BACKEND
    if not w4a8_hopper.is_hopper(jax.devices()[0].device_kind):
        return "triton"
    return "mosaic" if w4a8_hopper.supports(w) else "triton"


def _matmul(x: jax.Array, w: W4A8Weight, residual: jax.Array | None) -> jax.Array:
    q, s = quantize_activations(x)
    r = None if residual is None else residual.reshape(-1, w.out_features)
    dtype = x.dtype if residual is None else residual.dtype
    if KERNEL_MODE != "interpret" and jax.default_backend() == "gpu" and \
            gpu_backend(w) == "mosaic":
        from pallas_kernels.w4a8_hopper import w4a8_matmul_hopper

        y = w4a8_matmul_hopper(q, s, w, r, out_dtype=dtype)
    elif KERNEL_MODE == "interpret" or jax.default_backend() == "gpu":
        y = w4a8_matmul(q, s, w, r, out_dtype=dtype, interpret=KERNEL_MODE == "interpret")
    else:  # CPU: the XLA reference
        y = w4a8_reference(q, s, w, r, out_dtype=dtype)
    return y.reshape(*x.shape[:-1], w.out_features)


@register_linear(W4A8Weight)
def _linear_w4a8(x: jax.Array, w: W4A8Weight) -> jax.Array:
    return _matmul(x, w, None)


@register_linear(W4A8Weight, residual=True)
def _linear_residual_w4a8(x: jax.Array, w: W4A8Weight, residual: jax.Array) -> jax.Array:
    return _matmul(x, w, residual)


def kernel_layout(params: dict, tile_k: int = 128, tile_n: int = 128) -> dict:
    """A model's params with every FP8-activation ``Int4Weight`` of its layers in the
    kernel layout, gate and up fused into one gated ``w_gate_up`` where the hidden size
    allows (a multiple of ``tile_n / 2``). Other leaves are untouched."""
    layers = dict(params["layers"])
    for name, w in list(layers.items()):
        if isinstance(w, Int4Weight) and w.act == "fp8":
            layers[name] = W4A8Weight.from_int4(w, tile_k)
    g, u = layers.get("w_gate"), layers.get("w_up")
    if (isinstance(g, W4A8Weight) and isinstance(u, W4A8Weight) and "b_gate" not in layers
            and "b_up" not in layers and g.shape[-2] % (tile_n // 2) == 0):
        layers["w_gate_up"] = fuse_gate_up(g, u, tile_n)
        del layers["w_gate"], layers["w_up"]
    return {**params, "layers": layers}


def quantize_activations(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., K] -> (e4m3 [M, K], f32 [M]) per token, flattened over leading axes."""
    from fineserve_jax.quant.fp8 import quantize_per_token

    q, s = quantize_per_token(x.reshape(-1, x.shape[-1]), -1)
    return q, s[:, 0]


def exact_case(rng: np.random.Generator, m: int, n: int, k: int, group: int = 128,
               symmetric: bool = True) -> tuple[jax.Array, jax.Array, W4A8Weight]:
    """Inputs whose every product and partial sum is exact in float32: activations are
    small integers (exact in E4M3), group scales powers of two, scales 1 per token, so
    the kernel must equal the reference bit for bit."""
    xq = jnp.asarray(rng.integers(-4, 5, size=(m, k)).astype(np.float32)).astype(E4M3)
    xs = jnp.ones((m,), jnp.float32)
    codes = rng.integers(0, 16, size=(n, k)).astype(np.uint8)
    kp = -(-k // group) * group
    codes = np.pad(codes, ((0, 0), (0, kp - k)), constant_values=8 if symmetric else 0)
    exps = rng.integers(-2, 3, size=(n, kp // group)).astype(np.float32)
    if symmetric:
        scales = jnp.asarray(2.0 ** exps).astype(E4M3)
        offsets = None
        exponent = jnp.int32(1)
    else:
        scales = jnp.asarray(2.0 ** exps).astype(jnp.float16)
        offsets = jnp.asarray(-(2.0 ** exps) * rng.integers(0, 9, size=exps.shape)).astype(
            jnp.float16)
        exponent = jnp.int32(0)
    w = Int4Weight(pack_int4(jnp.asarray(codes)), scales, offsets, exponent, group, k,
                   symmetric, "fp8")
    return xq, xs, W4A8Weight.from_int4(w)


__all__ = ["BlockConfig", "LAYOUT", "W4A8Weight", "default_config", "exact_case",
           "fuse_gate_up", "kernel_layout", "quantize_activations", "w4a8_matmul", "w4a8_reference"]
