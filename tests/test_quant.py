"""Quantization numerics: FP8 casts and per-token scales, INT4 nibble packing, the power-of-two
multiplier, symmetric and asymmetric groups (GGUF Q4_1 kept bit for bit), and the reference
``linear`` paths against an independent NumPy dequantize-then-dot.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fineserve_jax.linear import linear
from fineserve_jax.quant import (E4M3, Fp8Weight, Int4Weight, fake_quant_per_token, pack_int4,
                                 pow2_exponent, quantize_fp8_weight, quantize_int4,
                                 quantize_per_token, to_e4m3, unpack_int4)

F32 = np.float32
N, K = 96, 576  # SmolLM2's K: padded to 640 with group 128


# ---- independent NumPy references -------------------------------------------------------

def _np_codes(packed) -> np.ndarray:
    p = np.asarray(packed)
    out = np.empty(p.shape[:-1] + (2 * p.shape[-1],), np.uint8)
    out[..., 0::2], out[..., 1::2] = p & 0xF, p >> 4
    return out


def _np_dequant(w) -> np.ndarray:
    """float32 [..., N, K] from the stored arrays, following the documented formats."""
    if isinstance(w, Fp8Weight):
        return np.asarray(w.values).astype(F32) * np.asarray(w.scales)[..., None]
    c = _np_codes(w.packed).astype(F32)
    *lead, n, kp = c.shape
    c = c.reshape(*lead, n, kp // w.group, w.group)
    s = np.asarray(w.scales).astype(F32)
    if w.symmetric:
        s = np.ldexp(s, -np.asarray(w.exponent)[..., None, None]).astype(F32)
        out = (c - 8) * s[..., None]
    else:
        out = c * s[..., None] + np.asarray(w.offsets).astype(F32)[..., None]
    return out.reshape(*lead, n, kp)[..., : w.k]


def _np_fake_quant(x: np.ndarray) -> np.ndarray:
    amax = np.abs(x).max(-1, keepdims=True)
    scale = np.where(amax > 0, amax * F32(1 / 448), F32(1)).astype(F32)
    q = np.clip(x * (F32(1) / scale), -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return q.astype(F32) * scale


def _weights(rng, shape, decades=3.0) -> np.ndarray:
    """Gaussian rows (times 0.05) whose magnitudes span ``decades`` decades."""
    w = rng.standard_normal(shape) * 10.0 ** rng.uniform(-decades, 0, shape[:-1] + (1,))
    return (0.05 * w).astype(F32)


def _row_rel_err(y, ref) -> np.ndarray:
    return np.linalg.norm(y - ref, axis=-1) / np.linalg.norm(ref, axis=-1)


# ---- INT4 packing -----------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2,), (1, 2), (3, 34), (2, 5, 130)])
def test_pack_unpack_round_trip(shape):
    rng = np.random.default_rng(0)
    q = rng.permutation(np.arange(np.prod(shape)) % 16).astype(np.uint8).reshape(shape)
    p = pack_int4(q)
    assert p.dtype == jnp.uint8 and p.shape == shape[:-1] + (shape[-1] // 2,)
    np.testing.assert_array_equal(p, q[..., 0::2] | (q[..., 1::2] << 4))
    np.testing.assert_array_equal(unpack_int4(p), q)
    np.testing.assert_array_equal(jax.jit(lambda a: unpack_int4(pack_int4(a)))(q), q)


def test_pack_nibble_order_and_errors():
    np.testing.assert_array_equal(pack_int4(np.array([[3, 12, 15, 0]], np.uint8)), [[0xC3, 0x0F]])
    with pytest.raises(ValueError, match="even length"):
        pack_int4(np.zeros((2, 3), np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        unpack_int4(np.zeros((2, 3), np.int32))


# ---- FP8 --------------------------------------------------------------------------------

def test_to_e4m3_saturates_and_never_makes_nan():
    big = float(np.finfo(F32).max)
    x = np.array([0.0, -0.0, 1e-30, -1e-30, 2.0 ** -10, 447, 448, 449, 470, 500, -500, 1e30,
                  -1e30, big, -big, np.inf, -np.inf], F32)
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        y = np.asarray(to_e4m3(jnp.asarray(x).astype(dtype))).astype(F32)
        assert not np.isnan(y).any(), dtype
        assert np.abs(y).max() == 448
        np.testing.assert_array_equal(y[-8:], [448, -448, 448, -448, 448, -448, 448, -448])
        np.testing.assert_array_equal(y[:2], [0, 0])
    # What the clip protects against: a plain cast of 500 is NaN in float8_e4m3fn.
    assert np.isnan(np.asarray(jnp.asarray(500.0, jnp.float32).astype(E4M3)).astype(F32))


def test_per_token_scale_is_absmax_over_448_and_error_is_bounded():
    rng = np.random.default_rng(1)
    # Per token and head: (tokens, heads, head_dim), magnitudes over 8 decades.
    x = (rng.standard_normal((6, 4, 64)) * 10.0 ** rng.uniform(-4, 4, (6, 4, 1))).astype(F32)
    x[2, 1] = 0
    q, scale = quantize_per_token(jnp.asarray(x))
    assert q.dtype == E4M3 and scale.shape == (6, 4, 1) and scale.dtype == jnp.float32
    amax = np.abs(x).max(-1, keepdims=True)
    expect = amax * F32(1 / 448)  # absmax / 448 as compiled: times the rounded reciprocal
    np.testing.assert_allclose(expect, amax / F32(448), rtol=2.0 ** -23)
    expect[2, 1] = 1.0
    np.testing.assert_array_equal(scale, expect)

    y = np.asarray(fake_quant_per_token(jnp.asarray(x)))
    assert y.dtype == F32 and not np.any(y[2, 1])
    err, s = np.abs(y - x), np.broadcast_to(expect, x.shape)
    normal = np.abs(x) / s >= 2.0 ** -6
    # 3 mantissa bits: half an ulp is 2**-4 relative; below 2**-6 the spacing is 2**-9.
    assert np.all(err[normal] <= 2.0 ** -4 * np.abs(x[normal]) * (1 + 1e-6))
    assert np.all(err[~normal] <= 2.0 ** -10 * s[~normal] * (1 + 1e-6))
    nonzero = np.abs(x).max(-1) > 0  # (6, 4): every token and head but the zero one
    rows = _row_rel_err(y[nonzero], x[nonzero])
    assert rows.max() <= 2.0 ** -4 and rows.mean() < 2.0 ** -5
    np.testing.assert_array_equal(y, _np_fake_quant(x))

    xb = jnp.asarray(x, jnp.bfloat16)
    assert fake_quant_per_token(xb).dtype == jnp.bfloat16
    assert fake_quant_per_token(xb, dtype=jnp.float32).dtype == jnp.float32


def test_per_token_non_finite_and_tiny_values_give_no_nan():
    x = jnp.asarray([[1.0, -2.0, np.inf, 0.5],
                     [-np.inf, 0.0, 0.0, 0.0],
                     [1e38, -3e38, 0.0, 1.0],
                     [1e-42, 0.0, 0.0, 0.0]], jnp.float32)
    _, scale = quantize_per_token(x)
    y = np.asarray(fake_quant_per_token(x))
    assert not np.isnan(y).any()
    # An infinity saturates at the row's largest finite magnitude (448 * scale).
    np.testing.assert_allclose(y[0], [1.0, -2.0, 2.0, 0.5], rtol=2.0 ** -4)
    assert y[0, 2] == np.float32(448) * np.asarray(scale)[0, 0]
    np.testing.assert_array_equal(y[1], [-448.0, 0, 0, 0])  # no finite value: scale 1
    assert np.isfinite(y[2]).all() and abs(y[2, 1] / -3e38 - 1) < 1e-6


# ---- the power-of-two multiplier --------------------------------------------------------

def _brute_force_pow2(s: np.ndarray, ms) -> int:
    s = np.abs(s.astype(np.float64)).ravel()
    over = {m: int((s * 2.0 ** m > 448).sum()) for m in ms}
    feasible = [m for m in ms if over[m] == 0]
    if not feasible:
        return min(ms)
    return min(feasible, key=lambda m: (int((s * 2.0 ** m < 2.0 ** -6).sum()), -m))


@pytest.mark.parametrize("seed", range(8))
def test_pow2_exponent_matches_brute_force_and_closed_form(seed):
    rng = np.random.default_rng(seed)
    lo = rng.uniform(-13, 0)
    s = (10.0 ** rng.uniform(lo, lo + rng.uniform(1, 10), (40, 7))).astype(F32)
    m = int(pow2_exponent(jnp.asarray(s)))
    ms = range(-30, 31)
    assert m == _brute_force_pow2(s, ms)
    scaled = s.astype(np.float64) * 2.0 ** m
    assert scaled.max() <= 448  # no overflow
    closed = int(np.floor(np.log2(448 / np.float64(s.max()))))
    if closed in ms:
        assert m == closed and scaled.max() * 2 > 448  # m + 1 would overflow
    else:
        assert m == 30 and closed > 30
    def underflows(k: int) -> int:
        return int((s.astype(np.float64) * 2.0 ** k < 2.0 ** -6).sum())

    assert underflows(m) <= underflows(m - 1)


def test_pow2_exponent_edges_and_vmap():
    def m_of(*s, **kw) -> int:
        return int(pow2_exponent(jnp.asarray(s, jnp.float32), **kw))

    assert m_of(0.0, 0.0) == 30  # nothing to overflow, nothing to gain: the largest m
    assert m_of(1e12, 2e12) == -30  # every m overflows: the smallest
    assert m_of(448.0, 1.0) == 0 and m_of(449.0, 1.0) == -1
    assert m_of(3.0, 1.0, search_range=range(3)) == 2
    assert m_of(1.0, 2.0 ** -40) == 8  # the tiny scale underflows for every m: no say
    s = jnp.asarray([[1e-3, 2e-3], [10.0, 1.0], [300.0, 1e-6]], jnp.float32)
    got = jax.jit(jax.vmap(pow2_exponent))(s)
    np.testing.assert_array_equal(got, [_brute_force_pow2(np.asarray(r), range(-30, 31))
                                        for r in s])
    with pytest.raises(ValueError, match="search_range"):
        pow2_exponent(s, search_range=range(0))


# ---- symmetric groups -------------------------------------------------------------------

def _effective_step(qw: Int4Weight) -> np.ndarray:
    """Per element [..., N, K]: the effective group scale S / 2**m."""
    s = np.ldexp(np.asarray(qw.scales).astype(F32), -np.asarray(qw.exponent)[..., None, None])
    return np.repeat(s, qw.group, axis=-1)[..., : qw.k]


def test_symmetric_fp8_scales_g128_padded_k():
    rng = np.random.default_rng(3)
    w = _weights(rng, (N, K))
    w[0, :128] = 0  # an all-zero group
    w[1, :128] *= 1e-9  # a group whose scale underflows E4M3 even after the multiplier
    qw = quantize_int4(jnp.asarray(w))  # symmetric, group 128, FP8 scales
    assert qw.shape == (N, K) and qw.k == 576
    assert qw.packed.shape == (N, 320) and qw.scales.shape == (N, 5)  # Kp = 640
    assert qw.scales.dtype == E4M3 and qw.offsets is None and qw.exponent.shape == ()
    stored = np.asarray(qw.scales).astype(F32)
    assert np.isfinite(stored).all() and stored.min() >= 2.0 ** -9 and stored.max() <= 448
    assert int(qw.exponent) == int(np.floor(np.log2(448 * 7 / np.float64(np.abs(w).max()))))
    assert stored[1, 0] == 2.0 ** -9  # clamped from below, not flushed to zero
    err = np.abs(np.asarray(qw.dequantize()) - w)
    assert np.all(err <= 0.5 * _effective_step(qw) * (1 + 1e-6))
    np.testing.assert_array_equal(_np_codes(qw.packed)[:, 576:], 8)  # padding holds code 0
    assert qw.dequantize(jnp.bfloat16).dtype == jnp.bfloat16


def test_symmetric_bf16_scales():
    rng = np.random.default_rng(4)
    w = _weights(rng, (N, K))
    qw = quantize_int4(jnp.asarray(w), group=64, scale_dtype="bf16", act=None)
    assert qw.scales.dtype == jnp.bfloat16 and int(qw.exponent) == 0
    err = np.abs(np.asarray(qw.dequantize()) - w)
    assert np.all(err <= 0.5 * _effective_step(qw) * (1 + 1e-6))


STACK = 3


@functools.cache
def _stacked() -> tuple[np.ndarray, Int4Weight]:
    """Three layers [3, N, K] whose magnitudes differ by 100x, quantized FireQ-style."""
    w = _weights(np.random.default_rng(5), (STACK, N, K), decades=1)
    w *= (100.0 ** np.arange(STACK, dtype=F32))[:, None, None]
    return w, quantize_int4(jnp.asarray(w))


def test_stacked_layers_are_quantized_per_tensor():
    w, qw = _stacked()
    assert qw.shape == (STACK, N, K) and qw.exponent.shape == (STACK,)
    assert len(set(np.asarray(qw.exponent).tolist())) == STACK  # one multiplier per layer
    for layer in range(STACK):
        alone = quantize_int4(jnp.asarray(w[layer]))
        for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(qw)):
            np.testing.assert_array_equal(a, b[layer])


# ---- asymmetric groups ------------------------------------------------------------------

def _q4_1(rng, n: int, k: int) -> np.ndarray:
    """GGUF Q4_1 data: per 32-block f16 step d > 0 and min m, w = m + q * d in float32."""
    nb = k // 32
    d = rng.uniform(1e-3, 2e-2, (n, nb)).astype(np.float16).astype(F32)
    m = (-rng.uniform(4, 12, (n, nb)) * d).astype(np.float16).astype(F32)
    q = rng.integers(0, 16, (n, nb, 32))
    # Half the blocks use only codes lo..lo+span (their min is then off the f16 grid); some
    # of those only their two end values.
    lo = rng.integers(1, 10, (n, nb, 1))
    span = rng.integers(1, 16 - lo)
    narrow = lo + rng.integers(0, span + 1, (n, nb, 32))
    narrow[..., 0], narrow[..., 1] = lo[..., 0], (lo + span)[..., 0]
    two = np.where(rng.random((n, nb, 32)) < 0.5, lo, lo + span)
    kind = rng.integers(0, 4, (n, nb, 1))
    q = np.where(kind == 0, narrow, np.where(kind == 1, two, q))
    w = m[..., None] + q.astype(F32) * d[..., None]
    return w.reshape(n, k).astype(F32)


def test_asymmetric_fit_grid_reproduces_q4_1_exactly():
    w = _q4_1(np.random.default_rng(6), N, K)
    qw = quantize_int4(jnp.asarray(w), group=32, symmetric=False, act=None)
    assert qw.scales.dtype == jnp.float16 and qw.offsets.dtype == jnp.float16
    assert qw.offsets.shape == qw.scales.shape == (N, K // 32)
    np.testing.assert_array_equal(np.asarray(qw.dequantize()), w)
    np.testing.assert_array_equal(_np_dequant(qw), w)
    # Re-rounding to (max - min) / 15 loses the grid of the blocks not using all 16 codes.
    plain = quantize_int4(jnp.asarray(w), group=32, symmetric=False, fit_grid=False, act=None)
    assert not np.array_equal(np.asarray(plain.dequantize()), w)


@pytest.mark.parametrize("zero,group", [("int", 128), ("float", 32), ("float", 128)])
def test_asymmetric_within_half_a_step(zero, group):
    rng = np.random.default_rng(7)
    w = _weights(rng, (N, K))  # K = 576: the last group of 128 is half padding
    qw = quantize_int4(jnp.asarray(w), group=group, symmetric=False, zero=zero)
    s = np.repeat(np.asarray(qw.scales).astype(F32), group, axis=-1)[:, :K]
    err = np.abs(np.asarray(qw.dequantize()) - w)
    # Half a step, plus what rounding the step and offset to f16 shifts the grid's ends by.
    assert np.all(err <= 0.5 * s * (1 + 2.0 ** -4))
    if zero == "int":
        z = -np.asarray(qw.offsets).astype(F32) / np.asarray(qw.scales).astype(F32)
        assert np.all(np.abs(z - np.round(z)) < 0.01) and z.min() > -0.01 and z.max() < 15.01
    if zero == "float":  # continuous data lies on no grid: fitting must change nothing
        plain = quantize_int4(jnp.asarray(w), group=group, symmetric=False, fit_grid=False)
        np.testing.assert_array_equal(qw.packed, plain.packed)


def test_invalid_arguments_raise():
    w = jnp.zeros((4, 64))
    with pytest.raises(ValueError, match="asymmetric groups need scale_dtype"):
        quantize_int4(w, symmetric=False, scale_dtype="fp8")
    with pytest.raises(ValueError, match="group must be one of"):
        quantize_int4(w, group=48)
    with pytest.raises(ValueError, match="zero must be"):
        quantize_int4(w, symmetric=False, zero="none")
    with pytest.raises(ValueError, match="act must be"):
        quantize_int4(w, act="int8")
    with pytest.raises(ValueError, match="float weight"):
        quantize_int4(jnp.zeros(64))


# ---- the reference linear paths ---------------------------------------------------------

KINDS = {
    "fireq": {"group": 128},  # symmetric, FP8 group scales, FP8 activations
    "int4-sym-bf16": {"group": 64, "scale_dtype": "bf16", "act": None},
    "w4a16": {"group": 128, "symmetric": False, "zero": "int", "act": None},
    "fireq-g32": {"group": 32, "symmetric": False},
    "fp8": "fp8",
    "fp8-weight-only": None,
}


@functools.cache
def _quantized(kind: str):
    w = jnp.asarray(_weights(np.random.default_rng(8), (N, K), decades=1))
    spec = KINDS[kind]
    if spec is None or isinstance(spec, str):
        return quantize_fp8_weight(w, act=spec)
    return quantize_int4(w, **spec)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("lead", [(3,), (2, 5)])
@pytest.mark.parametrize("kind", list(KINDS))
def test_linear_matches_numpy_dequantize_then_dot(kind, lead, dtype):
    qw = _quantized(kind)
    x = jnp.asarray(np.random.default_rng(9).standard_normal(lead + (K,)), dtype)
    y = jax.jit(linear)(x, qw)
    assert y.shape == lead + (N,) and y.dtype == dtype
    xf = np.asarray(x.astype(jnp.float32))
    if qw.act == "fp8":
        xf = _np_fake_quant(xf)
    ref = xf.astype(np.float64) @ _np_dequant(qw).astype(np.float64).T
    y = np.asarray(y.astype(jnp.float32))
    if dtype == jnp.float32:
        assert _row_rel_err(y, ref).max() < 2e-6  # float32 sums over K: ~6e-7 here
    else:  # the float32 result rounded once to bfloat16
        ref16 = ref.astype(F32).astype(ml_dtypes.bfloat16).astype(F32)
        slack = 1e-6 * np.abs(ref).max()  # float32 accumulation, for outputs near 0
        assert np.all(np.abs(y - ref16) <= 2.0 ** -7 * np.abs(ref16) + slack)  # one ulp
        assert np.mean(y == ref16) > 0.99


def test_linear_inside_scan_over_stacked_layers():
    _, qw = _stacked()
    x = jnp.asarray(np.random.default_rng(10).standard_normal((4, K)), jnp.float32)

    def layer(carry, w_l):
        return carry, linear(carry, w_l)

    _, ys = jax.jit(lambda x, w: jax.lax.scan(layer, x, w))(x, qw)
    ref = _np_fake_quant(np.asarray(x)).astype(np.float64) @ np.swapaxes(_np_dequant(qw), 1, 2)
    assert ys.shape == (STACK, 4, N) and _row_rel_err(np.asarray(ys), ref).max() < 2e-6
    with pytest.raises(ValueError, match="slice stacked layers"):
        linear(x, qw)
    with pytest.raises(ValueError, match="K = 100"):
        linear(jnp.zeros((2, 100)), jax.tree.map(lambda a: a[0], qw))


# ---- sizes and reprs --------------------------------------------------------------------

def _fireq_nbytes(n: int, k: int) -> int:
    kp = -(-k // 128) * 128
    return n * kp // 2 + n * kp // 128 + 4  # codes, e4m3 scales, one exponent


def test_nbytes_counts_every_stored_array():
    assert _quantized("fireq").nbytes == _fireq_nbytes(N, K)
    assert _quantized("fireq-g32").nbytes == N * K // 2 + 2 * 2 * N * K // 32 + 4
    assert _quantized("fp8").nbytes == N * K + 4 * N


@pytest.mark.parametrize("n,k", [(576, 576), (1536, 576), (576, 1536)])
def test_fireq_weights_take_under_0_3x_bf16_bytes(n, k):
    # Shapes only (the arrays are what test_nbytes_counts_every_stored_array checks).
    qw = jax.eval_shape(quantize_int4, jax.ShapeDtypeStruct((n, k), jnp.bfloat16))
    assert qw.nbytes == _fireq_nbytes(n, k) and qw.nbytes <= 0.3 * n * k * 2


def test_reprs_name_the_format():
    qw = _quantized("fireq")
    text = repr(qw)
    for part in ("shape=(96, 576)", "K padded to 640", "group=128", "symmetric",
                 "float8_e4m3fn", "act='fp8'"):
        assert part in text, text
    assert "asymmetric" in repr(_quantized("w4a16")) and "float16" in repr(_quantized("w4a16"))
    assert repr(_quantized("fp8-weight-only")) == (
        "Fp8Weight(shape=(96, 576), scales=per-channel f32, act=None)")


def test_without_pow2_small_scales_sit_at_the_fp8_floor():
    from fineserve_jax.quant import quantize_int4

    w = np.random.default_rng(7).normal(size=(8, 256)).astype(np.float32) * 1e-4
    on = quantize_int4(w, group=128)
    off = quantize_int4(w, group=128, pow2=False)
    assert int(off.exponent) == 0 and int(on.exponent) > 0
    err_on = np.abs(np.asarray(on.dequantize()) - w).max()
    err_off = np.abs(np.asarray(off.dequantize()) - w).max()
    assert err_on < 0.2 * err_off  # the multiplier is what keeps tiny groups representable
