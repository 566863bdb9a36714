"""The Mosaic GPU (Hopper) INT4 x FP8 GEMM (``pallas_kernels.w4a8_hopper``) on CPU:
numerics in the Mosaic GPU interpreter, and the CUDA lowering of the variant a GPU runs.

The interpreter runs the kernel's ``interpret=True`` variant, whose unpacked weight tile
is stored N-major: the interpreter does not model ``transpose_ref`` on a wgmma operand,
and a real FP8 wgmma rejects anything but the K-major tile. Everything else (TMA
pipeline, nibble unpacking, a wgmma per group, scales, offsets, epilogues) is the same
code. The default (K-major) variant is checked by lowering it for CUDA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fineserve_jax.quant import quantize_int4, reference_linear
from pallas_kernels import w4a8, w4a8_hopper
from pallas_kernels.w4a8 import (W4A8Weight, exact_case, fuse_gate_up, quantize_activations,
                                 w4a8_reference)
from pallas_kernels.w4a8_hopper import HopperConfig, W4A8HopperWeight, w4a8_matmul_hopper
from tests.mosaic_gpu import lowers_for_cuda, mosaic_interpret
from tests.tiny_models import rel_err_rows

FORMATS = {"fireq": dict(group=128, symmetric=True, scale_dtype="fp8"),
           "fireq-g32": dict(group=32, symmetric=False, scale_dtype="f16")}


def as_np(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.float32))


def random_int4(rng, n, k, fmt):
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    w[:, rng.integers(0, k, 3)] *= 8  # a few outlier input channels
    return quantize_int4(jnp.asarray(w), act="fp8", **FORMATS[fmt])


def random_weight(rng, n, k, fmt) -> W4A8Weight:
    return W4A8Weight.from_int4(random_int4(rng, n, k, fmt))


def interpreted(*args, **kw) -> np.ndarray:
    with mosaic_interpret(num_cores=2):
        return as_np(w4a8_matmul_hopper(*args, interpret=True, **kw))


@pytest.mark.parametrize("fmt,m,split", [("fireq", 1, 1), ("fireq-g32", 17, 3)])
def test_exact_inputs_give_the_reference_bit_for_bit(fmt, m, split):
    # Each interpreted launch takes seconds: one M per format. Split K (3 blocks of one
    # K tile each) adds the float32 partial sums in another order, still exactly.
    sym = FORMATS[fmt]["symmetric"]
    rng = np.random.default_rng(m)
    xq, xs, w = exact_case(rng, m, 256, 384, FORMATS[fmt]["group"], sym)
    r = jnp.asarray(rng.integers(-8, 9, (m, 256)), jnp.bfloat16) if split > 1 else None
    got = interpreted(xq, xs, w, r, config=HopperConfig(split_k=split))
    want = as_np(w4a8_reference(xq, xs, w, r))
    assert got.shape == (m, 256) and np.count_nonzero(want) > want.size // 2
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fmt,split", [("fireq-g32", 2)])  # fireq: the gated test below
def test_random_inputs_match_the_int4_reference(fmt, split):
    # K = 192: padded to 256; N = 128 in two 64-row blocks; two pipeline stages.
    rng = np.random.default_rng(11)
    wi = random_int4(rng, 128, 192, fmt)
    x = jnp.asarray(rng.standard_normal((17, 192)), jnp.bfloat16)
    q, s = quantize_activations(x)
    wk = W4A8Weight.from_int4(wi)
    wh = W4A8HopperWeight.from_w4a8(wk)  # scales and offsets pre-transposed
    got = interpreted(q, s, wh, config=HopperConfig(block_n=64, num_stages=2, split_k=split))
    want = as_np(reference_linear(x, wi))  # FP8 activations, dequantized weight, f32 dot
    assert rel_err_rows(got, want).max() < 1e-2  # BF16 output rounding
    ref = as_np(w4a8_reference(q, s, wk))  # the kernel's own f32 semantics
    assert rel_err_rows(got, ref).max() < 8e-3


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_gated_epilogue_with_residual(fmt):
    """``silu(gate) * up`` over gate/up rows interleaved per tile_n, then the residual,
    in float32 before the one rounding to BF16."""
    rng = np.random.default_rng(7)
    k, f, m = 256, 64, 5
    g, u = (random_weight(rng, f, k, fmt) for _ in range(2))
    gu = fuse_gate_up(g, u, tile_n=128)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    q, s = quantize_activations(x)
    r = jnp.asarray(rng.standard_normal((m, f)) * 4, jnp.bfloat16)
    yg, yu = (as_np(w4a8_reference(q, s, w, out_dtype=jnp.float32)) for w in (g, u))
    want = yg / (1 + np.exp(-yg)) * yu + as_np(r)
    got = interpreted(q, s, gu, r)
    assert got.shape == (m, f) and rel_err_rows(got, want).max() < 8e-3
    # and without the epilogue's SiLU the error would be large: the check can fail
    assert rel_err_rows(yg * yu + as_np(r), want).max() > 0.1


def _struct(a):
    return None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype)


@pytest.mark.parametrize("case", ["fireq", "fireq-g32", "fireq+residual", "fireq-g32+residual",
                                  "fireq-gated", "fireq-g32-gated+residual", "fireq-m128",
                                  "fireq-split3", "fireq-g32-gated+residual-split3",
                                  "fireq-g32-hopper-layout"])
def test_kernel_lowers_for_cuda(case):
    """The K-major variant a Hopper GPU runs goes through the whole Mosaic GPU lowering."""
    fmt = "fireq-g32" if "g32" in case else "fireq"
    m = 200 if "m128" in case else 17
    xq, xs, w = exact_case(np.random.default_rng(0), m, 256, 384, FORMATS[fmt]["group"],
                           FORMATS[fmt]["symmetric"])
    if "gated" in case:
        w = fuse_gate_up(w, w)
    if "hopper-layout" in case:
        w = W4A8HopperWeight.from_w4a8(w)
    r = jnp.zeros((m, w.out_features), jnp.bfloat16) if "residual" in case else None
    cfg = HopperConfig(block_m=128, block_n=64, num_stages=4) if "m128" in case else None
    if "split" in case:
        cfg = HopperConfig(split_k=3)
    text = lowers_for_cuda(lambda xq, xs, w, r: w4a8_matmul_hopper(xq, xs, w, r, config=cfg),
                           xq, xs, w, r)
    assert "mosaic_gpu" in text


def test_config_and_input_checks():
    with pytest.raises(ValueError, match="block_m"):
        HopperConfig(block_m=32)
    with pytest.raises(ValueError, match="registers"):
        HopperConfig(block_m=128, block_n=128)
    xq, xs, w = exact_case(np.random.default_rng(3), 4, 128, 256)
    with pytest.raises(ValueError, match="K = 128"):
        w4a8_matmul_hopper(xq[:, :128], xs, w)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        w4a8_matmul_hopper(xq.astype(jnp.bfloat16), xs, w)
    with pytest.raises(ValueError, match="block_n = tile_n"):
        w4a8_matmul_hopper(xq, xs, fuse_gate_up(w, w), config=HopperConfig(block_n=64))
    with pytest.raises(ValueError, match="split_k = 3"):
        w4a8_matmul_hopper(xq, xs, w, config=HopperConfig(split_k=3))
    assert w4a8_hopper.default_hopper_config(1, w) == HopperConfig(64, 128)
    assert w4a8_hopper.default_hopper_config(4096, w) == HopperConfig(64, 128)


@pytest.mark.parametrize("n,k,m,want", [(4096, 4096, 1, (64, 128, 4)),  # q/o: 32 x 4 blocks
                                        (1024, 4096, 16, (64, 128, 8)),  # k/v: 8 x 8
                                        (4096, 14336, 1, (64, 128, 4)),  # down: 112 K tiles
                                        (4096, 4096, 256, (64, 128, 1)),  # 128 blocks
                                        (4096, 4096, 64, (64, 128, 4)),  # 32 blocks
                                        (4096, 4096, 8192, (64, 128, 1))])
def test_default_config_splits_k_until_the_sms_are_covered(n, k, m, want):
    w = W4A8Weight(jax.ShapeDtypeStruct((n, k // 2), jnp.uint8), None, None, None,
                   group=128, k=k, symmetric=True, tile_k=128)
    cfg = w4a8_hopper.default_hopper_config(m, w, num_sms=132)
    assert (cfg.block_m, cfg.block_n, cfg.split_k) == want


def test_linear_picks_the_mosaic_kernel_on_hopper(monkeypatch):
    _, _, w = exact_case(np.random.default_rng(4), 1, 128, 256)
    assert w4a8_hopper.is_hopper("NVIDIA H100 80GB HBM3") and w4a8_hopper.is_hopper("NVIDIA H200")
    assert not w4a8_hopper.is_hopper("NVIDIA A100-SXM4-80GB") and not w4a8_hopper.is_hopper("cpu")
    assert w4a8.gpu_backend(w) == "triton"  # this (CPU) device is no Hopper
    monkeypatch.setattr(w4a8_hopper, "is_hopper", lambda kind: True)
    assert w4a8.gpu_backend(w) == "mosaic"
    monkeypatch.setattr(w4a8, "GPU_BACKEND", "triton")
    assert w4a8.gpu_backend(w) == "triton"


def test_hopper_layout_round_trips_and_serves_linear():
    """``W4A8HopperWeight``: scales and offsets groups-major, stacked layers kept; off a
    Hopper GPU ``linear`` on it is the ``W4A8Weight`` path."""
    from fineserve_jax.linear import linear, linear_residual

    rng = np.random.default_rng(5)
    w = random_weight(rng, 128, 256, "fireq-g32")
    stacked = jax.tree.map(lambda a: jnp.stack([a, a]), w)
    h = W4A8HopperWeight.from_w4a8(stacked)
    assert h.scales_t.shape == (2, 8, 128) and h.offsets_t.shape == (2, 8, 128)
    assert h.layout.startswith(w4a8.LAYOUT) and h.shape == (2, 128, 256)
    back = h.to_w4a8()
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(stacked)):
        np.testing.assert_array_equal(as_np(a), as_np(b))
    x = jnp.asarray(rng.standard_normal((3, 256)), jnp.float32)
    h0 = W4A8HopperWeight.from_w4a8(w)
    np.testing.assert_array_equal(as_np(linear(x, h0)), as_np(linear(x, w)))
    np.testing.assert_array_equal(as_np(linear_residual(x, h0, x[:, :128])),
                                  as_np(linear_residual(x, w, x[:, :128])))


def test_bench_kernels_mosaic_rows_lower_for_cuda(monkeypatch):
    """``bench kernels`` adds the Mosaic rows on a Hopper GPU (faked here) on the Hopper
    layout of the same weights as the Triton rows; each lowers for CUDA."""
    from fineserve_jax.bench import kernels

    monkeypatch.setattr(w4a8_hopper, "is_hopper", lambda kind: True)
    impls = kernels.make_impls(256, 384, 17, jax.random.PRNGKey(0), quick=False)
    for name, triton in zip(kernels.MOSAIC_IMPLS, ("w4a8-fireq", "w4a8-fireq-g32")):
        fn, args, nbytes = impls[name]
        assert isinstance(args[2], W4A8HopperWeight) and nbytes == impls[triton][2]
        np.testing.assert_array_equal(as_np(args[2].dequantize()),
                                      as_np(impls[triton][1][2].dequantize()))
        assert "mosaic_gpu" in lowers_for_cuda(fn, *args)


def test_tuned_hopper_table_is_used_for_its_device(tmp_path, monkeypatch):
    import json

    from pallas_kernels.tune_w4a8 import hopper_candidates

    _, _, w = exact_case(np.random.default_rng(2), 5, 256, 384)
    key = w4a8.tuning_key(5, 256, 384, "fireq", False)
    path = tmp_path / "t.json"
    path.write_text(json.dumps({jax.devices()[0].device_kind: {key: {
        "block_m": 64, "block_n": 64, "num_stages": 2, "split_k": 3, "seconds": 1e-5}}}))
    monkeypatch.setattr(w4a8_hopper, "HOPPER_TUNED_PATH", path)
    w4a8.read_tuned.cache_clear()
    try:
        assert w4a8_hopper.pick_hopper_config(5, w) == HopperConfig(64, 64, 2, 3)
        assert (w4a8_hopper.pick_hopper_config(100, w)
                == w4a8_hopper.default_hopper_config(100, w, w4a8_hopper.num_sms()))
    finally:
        w4a8.read_tuned.cache_clear()
    # the tuner's search space: valid configs only, split K up to two blocks per SM
    cands = hopper_candidates(w, 1, 132)
    assert HopperConfig(64, 128, 2, 3) in cands and HopperConfig(64, 32, 4, 1) in cands
    assert all(256 % c.block_n == 0 and 3 % c.split_k == 0 for c in cands)
    assert max(c.split_k for c in hopper_candidates(w, 1, 2)) == 1


def test_hopper_weights_in_the_model_path(monkeypatch):
    """``runner.hopper_weights``: on a Hopper device kind every kernel-layout weight the
    Mosaic kernel takes gets groups-major scales once; the model computes the same."""
    from fineserve_jax.config import ModelConfig
    from fineserve_jax.model import init_params
    from fineserve_jax.precisions import get_precision
    from fineserve_jax.quant.model import quantize_linears
    from fineserve_jax.runner import DenseRunner, hopper_weights
    from pallas_kernels.w4a8 import kernel_layout

    cfg = ModelConfig(vocab_size=64, hidden_size=128, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=64)
    params = kernel_layout(quantize_linears(init_params(cfg, jax.random.key(0)),
                                            get_precision("fireq")))
    hop = hopper_weights(params, "NVIDIA H100 80GB HBM3")
    assert all(isinstance(hop["layers"][n], W4A8HopperWeight)
               for n in ("wq", "wo", "w_gate_up", "w_down"))
    assert hopper_weights(params, "NVIDIA A100-SXM4-80GB") is params
    monkeypatch.setattr(w4a8, "GPU_BACKEND", "triton")
    assert hopper_weights(params, "NVIDIA H100 80GB HBM3") is params
    ids = np.arange(6, dtype=np.int32)[None]
    a = DenseRunner(cfg, params, jnp.float32, query_fp8=True).logits(ids)
    b = DenseRunner(cfg, hop, jnp.float32, query_fp8=True).logits(ids)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
