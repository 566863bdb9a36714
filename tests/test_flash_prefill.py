"""FP8 causal prefill flash attention: the generic Pallas kernel (interpret mode) and the
Hopper kernel (Mosaic GPU interpreter) against the plain-jnp oracle, the oracle against
unquantized float32 attention, and both kernels' CUDA lowerings.

Tolerances (per row: ||out - want|| / ||want|| over D):
* kernel vs oracle: ``KERNEL_TOL`` = 1e-2. Both round the same FP8 values; they differ in
  float32 summation order and exp2, which can move a rare P element across an E4M3
  rounding boundary (one step is 1/8 to 1/16 of that weight). In practice every row is
  far tighter, and the median row is checked against ``KERNEL_MEDIAN_TOL``.
* oracle vs float32 attention: ``FP8_TOL`` per row, the error FP8 Q, K, V and P bring.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fineserve_jax.quant.fp8 import quantize_per_token
from pallas_kernels import flash_prefill as fp
from tests.mosaic_gpu import lowers_for_cuda, mosaic_interpret
from tests.tiny_models import rel_err_rows

KERNEL_TOL = 1e-2
KERNEL_MEDIAN_TOL = 1e-5
FP8_TOL = 0.25
FP8_MEDIAN_TOL = 0.07


def _inputs(seed, B, T, H, Hkv, D, lengths, dtype=jnp.bfloat16, poison=True):
    """Random q, k, v with padding tokens (t >= length) set to NaN."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, D)).astype(np.float32)
    k = rng.standard_normal((B, T, Hkv, D)).astype(np.float32)
    v = rng.standard_normal((B, T, Hkv, D)).astype(np.float32)
    k[..., 3] *= 8.0  # an outlier channel in K, as after RoPE in real models
    if poison:
        for b, n in enumerate(lengths):
            for x in (q, k, v):
                x[b, n:] = np.nan
    return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
            jnp.asarray(lengths, jnp.int32))


def _row_err(out, want):
    a = np.asarray(jnp.asarray(out, jnp.float32))
    b = np.asarray(jnp.asarray(want, jnp.float32))
    assert np.isfinite(a).all(), "non-finite output"
    return rel_err_rows(a, b), np.linalg.norm(b, axis=-1) > 0


def _check_padding_zero(out, lengths):
    o = np.asarray(jnp.asarray(out, jnp.float32))
    for b, n in enumerate(np.asarray(lengths)):
        assert (o[b, n:] == 0).all(), f"padding rows of sequence {b} are not zero"


@functools.cache
def _oracle(block_kv: int):
    return jax.jit(functools.partial(fp.flash_prefill_reference, block_kv=block_kv))


def _check_kernel(out, q, k, v, lengths, block_kv):
    want = _oracle(block_kv)(q, k, v, lengths)
    err, live = _row_err(out, want)
    assert err.max() <= KERNEL_TOL, f"worst row {err.max():.3g}"
    assert np.median(err[live]) <= KERNEL_MEDIAN_TOL, f"median row {np.median(err[live]):.3g}"
    _check_padding_zero(out, lengths)
    return want


def test_quantize_inputs_layout_and_scales():
    q, k, v, lens = _inputs(0, 2, 24, 4, 2, 64, [24, 10])
    x, (q8, sq) = jax.jit(lambda *a: (fp.quantize_inputs(*a), quantize_per_token(a[0])))(
        q, k, v, lens)
    np.testing.assert_array_equal(np.asarray(x.q8[0], np.float32), np.asarray(q8[0], np.float32))
    # qk_scale = sq * sk(head h // 2) * D**-0.5 * log2(e), sk = absmax over valid tokens / 448
    sk = np.nanmax(np.abs(np.asarray(k[1, :10], np.float32)), axis=(0, 2)) / 448.0
    want = np.asarray(sq)[1, :10, :, 0].T * np.repeat(sk, 2)[:, None] * 64 ** -0.5 * fp.LOG2E
    np.testing.assert_allclose(np.asarray(x.qk_scale[1, :, :10]), want, rtol=1e-6)
    assert (np.asarray(x.qk_scale[1, :, 10:]) == 0).all()
    assert (np.asarray(x.out_scale[1, :, 10:]) == 0).all()
    for a in (x.q8, x.k8, x.v8):
        assert (np.asarray(a[1, 10:], np.float32) == 0).all()


# (D, H, Hkv, lengths, input dtype): GQA ratios 1 and 4; T = 100 is not a multiple of
# either block; rows at and past a length are padding (NaN in the inputs); a length-0
# sequence has no keys at all.
PALLAS_CASES = [(64, 4, 4, [100, 37], jnp.bfloat16), (128, 4, 1, [61, 0], jnp.float32)]


@pytest.mark.parametrize("D,H,Hkv,lens,dtype", PALLAS_CASES)
def test_pallas_interpret_matches_reference(D, H, Hkv, lens, dtype):
    q, k, v, lens = _inputs(3 + D + Hkv, 2, 100, H, Hkv, D, lens, dtype)
    cfg = fp.FlashPrefillConfig(block_q=32, block_kv=16)
    run = jax.jit(lambda *a: fp.flash_prefill(*a, backend="pallas", interpret=True, config=cfg))
    out = run(q, k, v, lens)
    assert out.shape == q.shape and out.dtype == jnp.bfloat16
    want = _check_kernel(out, q, k, v, lens, cfg.block_kv)
    # The oracle against unquantized attention: the error FP8 brings ...
    err, live = _row_err(want, jax.jit(fp.float_attention)(q, k, v, lens))
    assert err[live].max() <= FP8_TOL, f"worst row {err[live].max():.3g}"
    assert np.median(err[live]) <= FP8_MEDIAN_TOL
    # ... and a metric that would not pass with V replaced by K.
    err, live = _row_err(_oracle(cfg.block_kv)(q, k, k, lens), want)
    assert np.median(err[live]) > 10 * FP8_MEDIAN_TOL


def test_mosaic_interpret_matches_reference():
    # Tiny, as the interpreter simulates every block (H x q tiles x B = 2 x 5 x 2). T = 300,
    # 5 tiles of 64: sequence 0's last q tile runs 5 KV tiles (ring refills inside the
    # loop); sequence 1 (130 tokens) has padding rows, and q tiles of padding rows only,
    # which run no KV tile and write zeros.
    q, k, v, lens = _inputs(5, 2, 300, 2, 1, 64, [300, 130])
    cfg = fp.FlashPrefillConfig(block_q=64, block_kv=64, num_stages=2)
    with mosaic_interpret(num_cores=2):
        out = fp.flash_prefill(q, k, v, lens, backend="mosaic", interpret=True, config=cfg)
        out = jax.block_until_ready(out)
    _check_kernel(out, q, k, v, lens, cfg.block_kv)


def test_pallas_lowers_for_cuda():
    q, k, v, lens = _inputs(6, 2, 256, 8, 2, 128, [256, 100], poison=False)
    cfg = fp.FlashPrefillConfig(block_q=64, block_kv=64)
    text = lowers_for_cuda(
        lambda *a: fp.flash_prefill(*a, backend="pallas", interpret=False, config=cfg),
        q, k, v, lens)
    assert "flash_prefill_fp8" in text


@pytest.mark.parametrize("D,block_kv,stages", [(64, 64, 2), (128, 64, 3), (128, 128, 2)])
def test_mosaic_lowers_for_cuda(D, block_kv, stages):
    q, k, v, lens = _inputs(7, 2, 256, 8, 2, D, [256, 100], poison=False)
    cfg = fp.FlashPrefillConfig(block_q=64, block_kv=block_kv, num_stages=stages)
    text = lowers_for_cuda(
        lambda *a: fp.flash_prefill(*a, backend="mosaic", interpret=False, config=cfg),
        q, k, v, lens)
    assert "mosaic_gpu" in text.lower()


def test_config_and_inputs_are_validated():
    with pytest.raises(ValueError):
        fp.FlashPrefillConfig(block_q=48)
    with pytest.raises(ValueError):
        fp.FlashPrefillConfig(block_q=32).check_mosaic()
    q, k, v, lens = _inputs(8, 1, 16, 3, 2, 64, [16], poison=False)
    with pytest.raises(ValueError):
        fp.flash_prefill(q, k, v, lens, backend="pallas")


def test_flops_and_bytes():
    flops, nbytes = fp.flops_and_bytes(jnp.array([4, 2]), 4, 8, 2, 64)
    assert flops == 4 * 8 * 64 * (10 + 3)
    assert nbytes == 2 * 4 * 12 * 64 + 8 * 2 * 8 * 4 + 2 * 2 * 4 * 8 * 64
