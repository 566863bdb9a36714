"""Quantized KV formats: byte widths, round-trip bounds, exact bytes, and the paged pool.

Each quantized format (fp8, int4, int4-g32, int4-asym) is checked three ways: its bytes
against a NumPy/ml_dtypes re-computation and hand-written rows (nibble order, scale
position); its round trip against the format's error bound, with exactness on its own grid
and no NaN/inf for zeros and huge values; and through ``PagedKVCache`` on a NaN-poisoned
pool with random page tables, where the K/V read back must be exactly the format's round
trip and attention must equal attention over the same fake-quantized K/V held densely; and
a model's chunked prefill and decode through the pool must equal one pass over
``DenseKVCache(fmt=...)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fineserve_jax.config import ModelConfig
from fineserve_jax.model import DenseKVCache, DenseKVMeta, forward, init_params, lm_head
from fineserve_jax.model.kv_formats import kv_format
from fineserve_jax.model.paged import PagedKVCache, PagedKVMeta

QUANT = ["fp8", "int4", "int4-g32", "int4-asym"]
INT4 = ["int4", "int4-g32", "int4-asym"]
BT = 4  # tokens per block in the paged tests

SMOLLM2 = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                      num_heads=9, num_kv_heads=3, head_dim=64)
LLAMA3_8B = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128)

# name -> (value_bytes, scale bytes per (token, KV head) as a function of head_dim)
EXPECTED = {
    "f32": (4, lambda d: 0),
    "bf16": (2, lambda d: 0),
    "fp8": (1, lambda d: 2),
    "int4": (0.5, lambda d: 2),
    "int4-g32": (0.5, lambda d: 2 * d // 32),
    "int4-asym": (0.5, lambda d: 4),
}


def _kv_rows(rng, n, h, d, dtype=np.float32):
    """K/V-like rows: magnitudes spread over 6 decades per (token, head), outliers, zeros."""
    x = rng.standard_normal((n, h, d)) * 10.0 ** rng.uniform(-3, 3, (n, h, 1))
    x *= np.where(rng.random((n, h, d)) < 0.02, 20.0, 1.0)  # a few outlier channels
    x[rng.random((n, h, d)) < 0.05] = 0.0
    return x.astype(dtype)


def _side(fmt, scale_bytes, h, d):
    """Decoded bf16 side data: scales f32[N, H, G] (asym: (scales, mins))."""
    g = fmt.groups(d) if hasattr(fmt, "groups") else 1
    b = np.ascontiguousarray(np.asarray(scale_bytes)).view(ml_dtypes.bfloat16).astype(np.float32)
    if getattr(fmt, "asymmetric", False):
        b = b.reshape(-1, h, g, 2)
        return b[..., 0], b[..., 1]
    return b.reshape(-1, h, g)


def _groups(x, fmt):
    n, h, d = x.shape
    g = fmt.groups(d) if hasattr(fmt, "groups") else 1
    return x.reshape(n, h, g, d // g)


def _pack_nibbles(q):
    """u8[..., D] of 4-bit codes -> u8[..., D/2]: element 2i low nibble, 2i+1 high."""
    q = q.astype(np.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


# Formats run jitted, as the engine runs them (and compiling a few ops beats compiling
# every eager op on its own).
_encode = jax.jit(lambda fmt, x: fmt.encode(x), static_argnums=0)
_decode = jax.jit(lambda fmt, v, s, h, d: fmt.decode(v, s, h, d), static_argnums=(0, 3, 4))
_fake_quant = jax.jit(lambda fmt, x: fmt.fake_quant(x), static_argnums=0)


def _round_trip(fmt, x):
    vals, scales = _encode(fmt, jnp.asarray(x))
    y = np.asarray(_decode(fmt, vals, scales, *x.shape[1:]))
    return np.asarray(vals), np.asarray(scales), y


# ------------------------------------------------------------------ byte widths

@pytest.mark.parametrize("cfg", [SMOLLM2, LLAMA3_8B], ids=["smollm2", "llama3-8b"])
@pytest.mark.parametrize("name", list(EXPECTED))
def test_encode_widths_equal_block_rows(cfg, name):
    fmt = kv_format(name)
    blk = fmt.block_format(cfg, 16)
    vb, sb = EXPECTED[name]
    assert (blk.value_bytes, blk.scale_bytes, blk.name) == (vb, sb(cfg.head_dim), name)
    x = _kv_rows(np.random.default_rng(0), 5, cfg.num_kv_heads, cfg.head_dim)
    vals, scales = _encode(fmt, jnp.asarray(x))
    assert vals.dtype == scales.dtype == jnp.uint8
    assert vals.shape == (5, blk.value_row_bytes) and scales.shape == (5, blk.scale_row_bytes)
    # decode takes any leading dims: [B, S, bytes] as the paged gather gives them.
    y = _decode(fmt, vals[:4].reshape(2, 2, -1), scales[:4].reshape(2, 2, -1),
                cfg.num_kv_heads, cfg.head_dim)
    assert y.shape == (2, 2, cfg.num_kv_heads, cfg.head_dim)
    y = np.asarray(y, np.float32).reshape(4, *x.shape[1:])
    # Rows land where they were: each within 1/14 of its head's absmax (the loosest format).
    amax = np.abs(x[:4]).max(-1, keepdims=True)
    assert (np.abs(y - x[:4]) <= amax / 14 * 1.01).all()


@pytest.mark.parametrize("cfg", [SMOLLM2, LLAMA3_8B], ids=["smollm2", "llama3-8b"])
def test_block_bytes_include_scales(cfg):
    bf16 = kv_format("bf16").block_format(cfg, 16).block_bytes
    d, h = cfg.head_dim, cfg.num_kv_heads
    for name in QUANT:
        blk = kv_format(name).block_format(cfg, 16)
        vb, sb = EXPECTED[name]
        assert blk.block_bytes == cfg.num_layers * 2 * 16 * h * (int(d * vb) + sb(d))
    for name in INT4:
        assert kv_format(name).block_format(cfg, 16).block_bytes <= 0.3 * bf16, name
    assert kv_format("fp8").block_format(cfg, 16).block_bytes <= 0.52 * bf16


def test_unknown_names_and_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"unknown KV format 'int3'.*'int4-g32'"):
        kv_format("int3")
    cfg48 = ModelConfig(vocab_size=16, hidden_size=96, intermediate_size=8, num_layers=1,
                        num_heads=2, num_kv_heads=2, head_dim=48)
    with pytest.raises(ValueError, match="not a multiple of its group size 32"):
        kv_format("int4-g32").block_format(cfg48, 16)
    with pytest.raises(ValueError, match=r"encode takes \[N, Hkv, D\]"):
        kv_format("fp8").encode(jnp.zeros((2, 3, 4, 8)))
    from fineserve_jax.model.kv_formats import Int4KVFormat
    with pytest.raises(ValueError, match="group_size must be an even int"):
        Int4KVFormat("int4-g3", group_size=3)


# --------------------------------------------------------- exact bytes, by hand

def test_fp8_bytes_by_hand():
    x = np.zeros((1, 2, 8), np.float32)
    x[0, 0, :3] = [448.0, -1.0, 0.5]  # absmax 448: scale 1.0
    x[0, 1, :2] = [-896.0, 2.0]  # absmax 896: scale 2.0
    vals, scales, y = _round_trip(kv_format("fp8"), x)
    assert list(vals[0, :3]) == [0x7E, 0xB8, 0x30] and (vals[0, 3:8] == 0).all()
    assert list(vals[0, 8:10]) == [0xFE, 0x38] and (vals[0, 10:] == 0).all()
    assert list(scales[0]) == [0x80, 0x3F, 0x00, 0x40]  # bf16 1.0, 2.0 little-endian
    np.testing.assert_array_equal(y, x)


def test_int4_nibble_order_and_scale_position_by_hand():
    x = np.zeros((1, 1, 64), np.float32)
    x[0, 0, :4] = [7.0, 0.0, -7.0, 1.0]  # group 0 (elements 0..31): absmax 7 -> scale 1
    x[0, 0, 32:34] = [0.0, 14.0]  # group 1: absmax 14 -> scale 2 (int4-g32)
    vals, scales, y = _round_trip(kv_format("int4-g32"), x)
    # Stored q + 8: [15, 8, 1, 9] -> element 2i low nibble, 2i+1 high nibble.
    assert list(vals[0, :2]) == [0x8F, 0x91] and (vals[0, 2:16] == 0x88).all()
    assert vals[0, 16] == 0xF8 and (vals[0, 17:] == 0x88).all()
    assert list(scales[0]) == [0x80, 0x3F, 0x00, 0x40]  # group 0 scale 1.0, group 1 2.0
    np.testing.assert_array_equal(y, x)

    vals, scales, y = _round_trip(kv_format("int4"), x)  # one group: scale 14/7 = 2
    assert list(scales[0]) == [0x00, 0x40]
    assert list(vals[0, :2]) == [0x8C, 0x84]  # round(7/2) = 4 (even), round(-7/2) = -4


def test_int4_asym_bytes_by_hand():
    x = np.full((1, 1, 8), 3.0, np.float32)
    x[0, 0, :4] = [0.0, 15.0, 3.0, 1.0]  # min 0, max 15 -> scale 1
    vals, scales, y = _round_trip(kv_format("int4-asym"), x)
    assert list(vals[0]) == [0xF0, 0x13, 0x33, 0x33]
    assert list(scales[0]) == [0x80, 0x3F, 0x00, 0x00]  # (scale 1.0, min 0.0)
    np.testing.assert_array_equal(y, x)
    x = np.full((1, 1, 8), -2.0, np.float32)  # a constant group: scale 1, min -2, q 0
    vals, scales, y = _round_trip(kv_format("int4-asym"), x)
    assert list(scales[0]) == [0x80, 0x3F, 0x00, 0xC0] and (vals == 0).all()
    np.testing.assert_array_equal(y, x)


# ------------------------------------------------------------- round-trip bounds

def _check_scale_is_rounded_up(s, need, rel_slack=0.0):
    """s is the smallest bf16 >= need: s >= need and the bf16 below s is < need."""
    live = need > 0
    below = (s.astype(ml_dtypes.bfloat16).view(np.uint16) - 1).view(ml_dtypes.bfloat16)
    assert (s[live] >= need[live] * (1 - rel_slack)).all()
    assert (below.astype(np.float64)[live] < need[live] * (1 + rel_slack)).all()
    assert (s[~live] == 1.0).all()


def test_fp8_round_trip_bound_and_bytes():
    fmt = kv_format("fp8")
    x = _kv_rows(np.random.default_rng(1), 256, 4, 64)
    vals, scales, y = _round_trip(fmt, x)
    s = _side(fmt, scales, 4, 64)[..., 0]  # (N, H)
    _check_scale_is_rounded_up(s, np.abs(x).max(-1).astype(np.float64) / 448.0)
    # The bytes are E4M3 (round to nearest even) of x / scale, computed independently.
    ref = np.clip(x / s[..., None], -448, 448).astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(vals, ref.view(np.uint8).reshape(256, -1))
    # 3 mantissa bits: half an ulp is 2**-4 of a normal value; below E4M3's smallest
    # normal (2**-6) the step is 2**-9, so half of it times the scale bounds the rest.
    err = np.abs(y - x)
    bound = (2.0 ** -4 * np.abs(x) + 2.0 ** -10 * s[..., None]) * (1 + 1e-6)
    assert (err <= bound).all(), (err / bound).max()
    assert (y[x == 0] == 0).all()
    # The bound is tight: some normal values come close to it.
    assert (err / np.maximum(np.abs(x), 1e-30))[np.abs(x) > s[..., None]].max() > 0.05


@pytest.mark.parametrize("name", INT4)
def test_int4_round_trip_bound_and_bytes(name):
    fmt = kv_format(name)
    x = _kv_rows(np.random.default_rng(2), 256, 4, 64)
    vals, scales, y = _round_trip(fmt, x)
    xg, yg = _groups(x, fmt), _groups(y, fmt)  # (N, H, G, g)
    if fmt.asymmetric:
        s, m = _side(fmt, scales, 4, 64)
        lo = xg.min(-1)
        assert (m <= lo).all() and (m > lo - 2.0 ** -7 * np.abs(lo) - 1e-38).all()
        # max - min is rounded to float32 before the scale is taken from it.
        _check_scale_is_rounded_up(s, (xg.max(-1).astype(np.float64) - m) / 15.0, 2.0 ** -23)
        q = np.clip(np.rint((xg - m[..., None]) / s[..., None]), 0, 15)
        slack = 1e-6 * (np.abs(xg) + np.abs(m[..., None]))
    else:
        s = _side(fmt, scales, 4, 64)
        _check_scale_is_rounded_up(s, np.abs(xg).max(-1).astype(np.float64) / 7.0)
        q = np.clip(np.rint(xg / s[..., None]), -8, 7) + 8
        slack = 1e-6 * np.abs(xg)
        assert (y[x == 0] == 0).all()
    np.testing.assert_array_equal(vals, _pack_nibbles(q.reshape(x.shape)).reshape(256, -1))
    err = np.abs(yg - xg)
    bound = 0.5 * s[..., None] * (1 + 1e-6) + slack
    assert (err <= bound).all(), (err / bound).max()
    assert (err / bound).max() > 0.9  # and the bound is reached


def _grid(rng, name, n, h, d):
    """Inputs exactly on the format's grid (bf16 scale), with each group's extreme present."""
    fmt = kv_format(name)
    g = fmt.groups(d) if name != "fp8" else 1
    size = d // g
    bf16 = lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float32)
    s = bf16(2.0 ** rng.uniform(-7, 0, (n, h, g, 1)))
    if name == "fp8":
        v = rng.uniform(-448, 448, (n, h, g, size)).astype(ml_dtypes.float8_e4m3fn)
        v = v.astype(np.float32)
        v[..., 0] = 448.0 * rng.choice([-1, 1], (n, h, g))
        return (v * s).reshape(n, h, d)
    if fmt.asymmetric:
        q = rng.integers(0, 16, (n, h, g, size)).astype(np.float32)
        q[..., 0], q[..., 1] = 0, 15
        m = bf16(-rng.uniform(0, 4, (n, h, g, 1)))
        return (q * s + m).reshape(n, h, d)
    q = rng.integers(-7, 8, (n, h, g, size)).astype(np.float32)
    q[..., 0] = 7 * rng.choice([-1, 1], (n, h, g))
    return (q * s).reshape(n, h, d)


@pytest.mark.parametrize("name", QUANT)
def test_values_on_the_grid_round_trip_exactly(name):
    x = _grid(np.random.default_rng(3), name, 64, 3, 64)
    _, _, y = _round_trip(kv_format(name), x)
    np.testing.assert_array_equal(y, x)
    y = _fake_quant(kv_format(name), jnp.asarray(x))
    assert y.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y), x)


@pytest.mark.parametrize("name", QUANT)
def test_zeros_and_huge_values_stay_finite(name):
    fmt = kv_format(name)
    x = np.zeros((7, 2, 64), np.float32)
    x[1, 0, 5], x[1, 1, :] = 1e4, -1e4
    x[2, 0, 3], x[2, 0, 4], x[2, 1, 9] = 3e38, -3e38, 1.0
    x[3, 0, :] = 3e38
    x[4, 0, 0], x[4, 1, 0] = np.inf, -np.inf
    x[5, 0, :] = 1e-30
    x[6, :, ::2] = -1e-41  # denormal inputs
    _, scales, y = _round_trip(fmt, x)
    assert np.isfinite(y).all()
    # The all-zero rows: zeros back, scale 1.0.
    np.testing.assert_array_equal(y[0], 0)
    asym = getattr(fmt, "asymmetric", False)
    side = _side(fmt, scales, 2, 64)
    np.testing.assert_array_equal(side[0][0] if asym else side[0], 1.0)
    # Huge values come back within the format's bound, saturated at its clip (asym:
    # +-1e38, where a group's max - min stays finite); +-inf saturates the same way.
    hi = 1e38 if asym else 3e38
    rel = {"fp8": 2.0 ** -4, "int4": 0.5 / 7, "int4-g32": 0.5 / 7, "int4-asym": 0.5 * 2 / 15}
    for r in (1, 2, 3):
        big = np.abs(x[r]) >= 1e4
        want = np.clip(x[r][big], -hi, hi)
        assert (np.abs(y[r][big] - want) <= rel[name] * np.abs(want) * 1.01).all(), name
    assert (np.abs(y[4]) <= hi * 1.01).all() and (np.sign(y[4, :, 0]) == [1, -1]).all()
    assert (np.abs(y[4, :, 0]) >= hi * 0.9).all()
    assert (np.abs(y[5, 0] - 1e-30) <= 1e-30 * 0.07).all()
    y16 = _fake_quant(fmt, jnp.asarray(x, jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16 and np.isfinite(np.asarray(y16, np.float32)).all()


# ------------------------------------------------------------------ the paged pool

def _cache(cfg, fmt_name, bpr=3, pad=64):
    fmt = kv_format(fmt_name)
    blk = fmt.block_format(cfg, BT)
    return PagedKVCache(fmt, blk, bpr, blk.block_bytes + pad, cfg.sliding_window)


def _poisoned_pool(kv, rows):
    return np.full((rows, kv.blocks_per_row * kv.stride), 0xFF, np.uint8)


def _random_pages(rng, lens, P, handles):
    """Distinct random blocks per sequence; unused page-table slots point anywhere."""
    perm = rng.permutation(handles)
    page_table = np.zeros((len(lens), P), np.int32)
    used = 0
    for b, n_tok in enumerate(lens):
        n = -(-n_tok // BT)
        page_table[b, :n] = perm[used:used + n]
        page_table[b, n:] = rng.integers(0, handles, P - n)
        used += n
    return page_table


def _written_mask(kv, pool_shape, page_table, lens, layer):
    """Bytes a write of positions < lens to ``layer`` must touch: values and scales."""
    written = np.zeros(pool_shape, bool)
    blk = kv.block
    vrow, srow = blk.value_row_bytes, blk.scale_row_bytes
    for b in range(len(lens)):
        for p in range(lens[b]):
            h = page_table[b, p // BT]
            r = h // kv.blocks_per_row
            seg = (h % kv.blocks_per_row) * kv.stride + layer * blk.layer_bytes
            for part in (0, BT):  # K then V of this slot
                a = seg + (part + p % BT) * vrow
                written[r, a:a + vrow] = True
                a = seg + 2 * BT * vrow + (part + p % BT) * srow
                written[r, a:a + srow] = True
    return written


# Attention through the pool vs a float64 NumPy attention over the dense fake-quantized
# K/V: the same stored values, so only float rounding may differ (bf16: the softmax weights
# and output are rounded to bf16). Against unquantized K/V: the format's own error on these
# inputs (measured 0.05-0.08 fp8, 0.28-0.44 int4, 0.13-0.33 int4-g32 and int4-asym),
# bounded with margin; a lost scale or a wrong nibble is far outside it.
TIGHT = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
LOOSE = {"fp8": 0.15, "int4": 0.6, "int4-g32": 0.5, "int4-asym": 0.5}


@jax.jit(static_argnums=(0, 1))
def _paged_step(kv, layer, pool, k, v, q, lens, positions, page_table):
    """K/V written through the pool and read back: (pool, gathered K/V, paged attention)."""
    pool = kv.update(pool, layer, k, v, PagedKVMeta(positions, lens, page_table))
    kg, vg = kv.gather(pool, layer, page_table)
    qpos = (lens - 1)[:, None]
    out = kv.attend(pool, layer, q, PagedKVMeta(qpos, lens, page_table), q.shape[-1] ** -0.5)
    return pool, kg.astype(k.dtype), vg.astype(v.dtype), out


def _np_attention(q, k, v, lens):
    """float64 GQA attention of q (B, 1, H, D) over the first lens[b] slots of k, v."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    qg = q.reshape(B, T, Hkv, H // Hkv, D)
    s = np.einsum("btkgd,bskd->bkgts", qg, k) * D ** -0.5
    live = np.arange(k.shape[1])[None, :] < lens[:, None]  # (B, S)
    s = np.where(live[:, None, None, None, :], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    v = np.where(live[:, :, None, None], v, 0.0)
    return np.einsum("bkgts,bskd->btkgd", p, v).reshape(B, T, H, D)


# Every format runs KV heads 4, 2 and 1 (GQA 1, then 3 or 4, then 8) and both dtypes;
# across the formats every GQA ratio runs in both dtypes.
_F32, _BF16 = jnp.float32, jnp.bfloat16
_PAGED_CASES = [
    pytest.param(f, h, kvh, dt, id=f"{f}-gqa{h // kvh}-{'f32' if dt == _F32 else 'bf16'}")
    for f, cases in [
        ("fp8", [(4, 4, _F32), (6, 2, _BF16), (8, 1, _F32)]),
        ("int4", [(4, 4, _BF16), (8, 2, _F32), (8, 1, _BF16)]),
        ("int4-g32", [(4, 4, _F32), (8, 2, _BF16), (8, 1, _F32)]),
        ("int4-asym", [(4, 4, _BF16), (6, 2, _F32), (8, 1, _BF16)])]
    for h, kvh, dt in cases]


@pytest.mark.parametrize("fmt_name,heads,kv_heads,dtype", _PAGED_CASES)
def test_paged_attention_equals_dense_fake_quant(fmt_name, heads, kv_heads, dtype):
    rng = np.random.default_rng(heads * 10 + kv_heads)
    D, P, rows, layer = 64, 5, 6, 1
    cfg = ModelConfig(vocab_size=16, hidden_size=heads * D, intermediate_size=8, num_layers=2,
                      num_heads=heads, num_kv_heads=kv_heads, head_dim=D)
    kv = _cache(cfg, fmt_name)
    lens = np.array([1, BT - 1, BT, BT + 1, P * BT], np.int32)  # awkward lengths; P*BT = max
    B, S = len(lens), P * BT
    # Per-(token, head) magnitudes differ (each row gets its own scale), a few outliers.
    k = rng.standard_normal((B, S, kv_heads, D))
    k *= 10.0 ** rng.uniform(-0.5, 0.5, (B, S, kv_heads, 1))
    k = jnp.asarray(k * np.where(rng.random(k.shape) < 0.02, 4.0, 1.0), dtype)
    v = jnp.asarray(rng.standard_normal((B, S, kv_heads, D)), dtype)
    q = jnp.asarray(rng.standard_normal((B, 1, heads, D)), dtype)
    page_table = _random_pages(rng, lens, P, rows * kv.blocks_per_row)
    positions = np.where(np.arange(S)[None] < lens[:, None], np.arange(S)[None], -1)
    positions = positions.astype(np.int32)
    pool, kg, vg, out = _paged_step(kv, layer, _poisoned_pool(kv, rows), k, v, q, lens,
                                    positions, page_table)
    kf, vf = _fake_quant(kv.fmt, k), _fake_quant(kv.fmt, v)

    # What the pool gives back for live slots is exactly the format's round trip.
    kg, vg, kf, vf = (np.asarray(a, np.float32) for a in (kg, vg, kf, vf))
    for b in range(B):
        n = lens[b]
        np.testing.assert_array_equal(kg[b, :n], kf[b, :n])
        np.testing.assert_array_equal(vg[b, :n], vf[b, :n])

    out = np.asarray(out, np.float64)
    ref, exact = _np_attention(q, kf, vf, lens), _np_attention(q, k, v, lens)
    assert np.isfinite(out).all()

    def err(a, b):
        return np.abs(a - b).max(axis=(1, 2, 3)) / np.abs(b).max(axis=(1, 2, 3))

    assert (err(out, ref) < TIGHT[dtype]).all(), err(out, ref)
    e = err(out, exact)
    assert (e < LOOSE[fmt_name]).all() and e.max() > TIGHT[jnp.float32], e

    # The write touched exactly the live slots' values and scales of this layer.
    written = _written_mask(kv, pool.shape, page_table, lens, layer)
    pool_np = np.asarray(pool)
    assert (pool_np[~written] == 0xFF).all()
    blk = kv.block
    assert written.sum() == 2 * lens.sum() * (blk.value_row_bytes + blk.scale_row_bytes)


MODEL = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                    num_heads=6, num_kv_heads=2, head_dim=32, max_position_embeddings=128)


@jax.jit(static_argnums=(0,))
def _model_step(kv, params, ids, pos, kv_state, meta):
    h, kv_state = forward(MODEL, params, ids, pos, kv, kv_state, meta)
    return lm_head(MODEL, params, h), kv_state


@pytest.fixture(scope="module")
def model_params():
    return jax.jit(init_params, static_argnums=0)(MODEL, jax.random.key(0))


@pytest.mark.parametrize("fmt_name", QUANT)
def test_model_on_quantized_pool_equals_dense_fake_quant_pass(fmt_name, model_params):
    """Chunked prefill then decode through the pool gives the dense pass on fake-quant KV."""
    params = model_params
    kv = _cache(MODEL, fmt_name)
    rows = 12
    pool = _poisoned_pool(kv, rows)
    ids = np.random.default_rng(0).integers(0, 128, size=(2, 21)).astype(np.int32)
    pos = np.broadcast_to(np.arange(21), (2, 21)).astype(np.int32)
    lens = np.array([21, 21], np.int32)

    def dense(fmt):
        state = DenseKVCache.init(MODEL.num_layers, 2, 21, 2, 32, jnp.float32)
        logits, _ = _model_step(DenseKVCache(fmt=fmt), params, ids, pos, state,
                                DenseKVMeta(pos, lens))
        return np.asarray(logits)

    full, unquantized = dense(kv.fmt), dense(None)
    page_table = np.random.default_rng(1).permutation(rows * 3)[:16].reshape(2, 8).astype(np.int32)
    # Prefill 9 + 9 tokens, then decode one at a time. Every step is padded to 9 columns
    # (position -1, a junk token), as the engine pads to a shape bucket: one compile, and
    # padding must write nothing.
    outs = []
    for a, b in [(0, 9), (9, 18), (18, 19), (19, 20), (20, 21)]:
        p = np.full((2, 9), -1, np.int32)
        t = np.full((2, 9), 7, np.int32)
        p[:, :b - a], t[:, :b - a] = pos[:, a:b], ids[:, a:b]
        logits, pool = _model_step(kv, params, t, p, pool,
                                   PagedKVMeta(p, np.array([b, b], np.int32), page_table))
        outs.append(np.asarray(logits)[:, :b - a])
    out = np.concatenate(outs, axis=1)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, full, rtol=1e-5, atol=1e-5)
    # The quantization is really there: the unquantized pass differs (on this random-weight
    # model by 0.09 of the largest logit for fp8, 0.23-0.26 for the int4 formats).
    d = np.abs(out - unquantized).max() / np.abs(unquantized).max()
    assert 1e-5 < d < 0.4, d
