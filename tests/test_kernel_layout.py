"""INT4 x FP8 weights stored in the kernel's layout (``checkpoints.kernel_layout``): the
reordering is undone bit for bit, and an unknown layout is refused by name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints.errors import CheckpointError
from checkpoints.kernel_layout import (abstract_kernel, check_layout, for_backend,
                                       from_kernel, split_gate_up, to_int4, to_kernel)
from fineserve_jax.quant import Int4Weight, quantize_int4
from pallas_kernels.w4a8 import LAYOUT, W4A8Weight, fuse_gate_up

FORMATS = {"fireq": dict(group=128, symmetric=True, scale_dtype="fp8"),
           "fireq-g32": dict(group=32, symmetric=False, scale_dtype="f16")}


def _weight(rng, shape, fmt) -> Int4Weight:
    w = rng.standard_normal(shape).astype(np.float32) * 0.05
    return quantize_int4(jnp.asarray(w), act="fp8", **FORMATS[fmt])


def _same(a, b) -> None:
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [k for k, _ in la] == [k for k, _ in lb]
    assert jax.tree.structure(a) == jax.tree.structure(b)  # static fields too
    for (path, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_kernel_layout_is_undone_bit_for_bit(fmt):
    rng = np.random.default_rng(0)
    wi = _weight(rng, (2, 96, 576), fmt)  # two stacked layers; K = 576 pads to 640
    if fmt == "fireq":
        assert int(np.asarray(wi.exponent).max()) > 0  # a real 2**-m column scale
    _same(to_int4(W4A8Weight.from_int4(wi)), wi)
    g, u = _weight(rng, (2, 192, 256), fmt), _weight(rng, (2, 192, 256), fmt)
    gk, uk = split_gate_up(fuse_gate_up(W4A8Weight.from_int4(g), W4A8Weight.from_int4(u)))
    _same(to_int4(gk), g)
    _same(to_int4(uk), u)
    with pytest.raises(ValueError, match="split a gated weight"):
        to_int4(fuse_gate_up(W4A8Weight.from_int4(g), W4A8Weight.from_int4(u)))


def test_params_round_trip_and_backend_choice():
    rng = np.random.default_rng(1)
    layers = {name: _weight(rng, (2, n, k), "fireq") for name, n, k in
              [("wq", 128, 256), ("wo", 256, 128), ("w_gate", 192, 256), ("w_up", 192, 256),
               ("w_down", 256, 192)]}
    layers["attn_norm"] = np.ones((2, 256), np.float32)
    params = {"embed": np.zeros((10, 256), np.float32), "layers": layers}
    kern, entry = to_kernel(params)
    assert entry == {"name": LAYOUT, "tile_k": 128, "tile_n": 128}
    assert isinstance(kern["layers"]["w_gate_up"], W4A8Weight) and "w_gate" not in kern["layers"]
    meta = {"weight_layout": entry}
    _same(for_backend(kern, meta, "cpu"), params)
    assert for_backend(kern, meta, "gpu") is kern  # a GPU serves the stored layout as is
    assert for_backend(params, {}, "cpu") is params  # no layout entry: stored as Int4Weight
    shapes = abstract_kernel(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                          params), entry)
    assert jax.tree.structure(shapes) == jax.tree.structure(kern)
    _same(from_kernel(kern), params)
    unquantized = {"layers": {"wq": np.ones((2, 4, 4), np.float32)}}
    assert to_kernel(unquantized) == (unquantized, None)


def test_unknown_layouts_are_refused_by_name():
    assert check_layout({"name": LAYOUT, "tile_k": 128, "tile_n": 64})["tile_n"] == 64
    with pytest.raises(CheckpointError, match="'w4a8-interleaved-v0' is not known"):
        check_layout({"name": "w4a8-interleaved-v0", "tile_k": 128, "tile_n": 128}, "ck")
    with pytest.raises(CheckpointError, match="tile_k must be a power of two"):
        check_layout({"name": LAYOUT, "tile_k": 96, "tile_n": 128})
