"""Tensor parallelism: an engine over a 2-device ``"tp"`` mesh generates what one device does.

The multi-device checks run in a subprocess with ``--xla_force_host_platform_device_count=4``
(the flag must be set before JAX starts). Compute is float32 so the sharded matmuls'
partial sums round like the unsharded ones and greedy tokens must match exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest
from jax.sharding import PartitionSpec as P

ROOT = Path(__file__).resolve().parents[1]

ON_A_MESH = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    import serve
    from fineserve_jax.config import ModelConfig
    from fineserve_jax.engine import Engine, EngineConfig
    from fineserve_jax.engine.pool import BlockMover, new_pool
    from fineserve_jax.engine.sharding import pool_sharding, tp_mesh
    from fineserve_jax.model import init_params
    from fineserve_jax.sampling import SamplingParams
    from fineserve_jax.tokenizer import Tokenizer
    from tiny_models import byte_tokenizer_json

    cfg = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=128)
    params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0)))
    tok = Tokenizer.from_json(byte_tokenizer_json(), {"eos_token_ids": [257]})
    ec = EngineConfig(kv_budget_bytes=2**20, block_tokens=4, max_seqs=2, max_prefill_seqs=1,
                      prefill_token_budget=16, max_model_len=64, warmup=False)
    # a short prompt, one longer than a prefill step (chunked), and a third that waits
    prompts = [[5, 6, 7], list(range(20, 45)), [9, 8, 7, 6]]

    def generate(e):
        e.add_model("m", cfg, params, tok, dtype="float32")
        e.start(thread=False)
        out = []
        for _ in range(2):  # the second round reuses the first round's compilations
            hs = [e.submit("m", p, SamplingParams(max_tokens=10, temperature=0,
                                                   ignore_eos=True)) for p in prompts]
            e.run_until_idle()
            out.append([h.token_ids for h in hs])
            traces = e._models["m"].runner.traces
        assert out[0] == out[1]
        assert e._models["m"].runner.traces == traces
        return out[0]

    devs = jax.devices()
    ref = generate(Engine(ec))
    mesh = tp_mesh(devs[:2])
    e = Engine(ec, mesh=mesh)
    got = generate(e)
    assert got == ref, (got, ref)
    w = e.weights("m")["layers"]
    assert w["wq"].sharding.spec == P(None, "tp", None), w["wq"].sharding
    assert w["w_down"].sharding.spec == P(None, None, "tp"), w["w_down"].sharding
    assert e.pool.sharding == pool_sharding(mesh) and e.pool.devices() == set(devs[:2])

    # block copies (KV Slab compaction) keep the pool's layout on the mesh
    pool = new_pool(4, 8, mesh=mesh)
    pool = pool.at[0, :4].set(np.arange(1, 5, dtype=np.uint8))
    pool = jax.device_put(pool, pool_sharding(mesh))
    pool = BlockMover()(pool, [(0, 0, 3, 4)], 4)
    assert pool.sharding == pool_sharding(mesh), pool.sharding
    assert np.asarray(pool)[3, 4:].tolist() == [1, 2, 3, 4]

    # quantized linears with their leaves split (or replicated) compute what one device does
    from fineserve_jax.engine.sharding import param_shardings
    from fineserve_jax.linear import linear
    from fineserve_jax.quant import quantize_fp8_weight, quantize_int4
    rng = np.random.default_rng(0)
    w = lambda n, k: rng.standard_normal((1, n, k)).astype(np.float32) / 8
    qp = {"layers": {
        "wo": quantize_int4(w(32, 64), group=32, symmetric=False),  # 2 groups: split on K
        "w_down": quantize_int4(w(32, 96), group=32, symmetric=False),  # 3: replicated
        "w_up": quantize_int4(w(64, 64), group=128),  # fireq: split on N
        "wq": quantize_fp8_weight(w(64, 64)), "wv": quantize_fp8_weight(w(32, 64)),
        "w_gate": w(64, 64)}}
    xs = {n: rng.standard_normal((3, v.shape[-1])).astype(np.float32)
          for n, v in qp["layers"].items()}
    run = jax.jit(lambda p, xs: {n: linear(xs[n], jax.tree.map(lambda a: a[0], v))
                                 for n, v in p["layers"].items()})
    one = run(qp, xs)
    sharded = jax.device_put(qp, param_shardings(qp, mesh))
    assert sharded["layers"]["wo"].packed.sharding.spec == P(None, None, "tp")
    two = run(sharded, xs)
    for n in one:
        a, b = np.asarray(one[n]), np.asarray(two[n])
        err = np.linalg.norm(a - b, axis=-1) / np.linalg.norm(a, axis=-1)
        assert err.max() < 1e-5, (n, err)

    # a placement file with a tp=2 group, as serve.py executes it
    path, = sys.argv[1:]
    json.dump({"devices": [{"device": 3, "models": ["n"], "kv_budget_bytes": 2**20},
                           {"devices": [0, 1], "tp": 2, "models": ["m"],
                            "kv_budget_bytes": 2**20}]}, open(path, "w"))
    groups = serve.read_placement(path, ["m", "n"], 1)
    assert groups[1] == {"devices": [0, 1], "models": ["m"], "kv_budget_bytes": 2**20}
    e = serve.make_engine(ec, serve.group_devices(groups[1]), devs)
    assert e._mesh == mesh  # the same mesh: its compiled steps are reused
    assert generate(e) == ref
    assert e.pool.devices() == {devs[0], devs[1]}
    print("ok", serve.where_is(e, groups[1]["devices"], devs))
""")


def test_engine_on_a_tp_mesh_matches_one_device(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    r = subprocess.run([sys.executable, "-c", ON_A_MESH, str(tmp_path / "placement.json")],
                       env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["ok", "cpu:0+cpu:1"]


@pytest.mark.parametrize("precision", ["fp8", "fireq-g32", "fireq"])
def test_quantized_weights_shard_leaf_by_leaf(precision):
    from fineserve_jax.config import ModelConfig
    from fineserve_jax.engine.sharding import param_specs_tp
    from fineserve_jax.model import init_params
    from fineserve_jax.precisions import get_precision
    from fineserve_jax.quant.model import quantize_linears

    # K of wo is 64 (fireq-g32: 2 groups of 32, split; fireq: 1 group of 128, replicated),
    # K of w_down is 96 (3 groups of 32: replicated).
    cfg = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=128)
    q = jax.eval_shape(lambda: quantize_linears(init_params(cfg, jax.random.key(0)),
                                                get_precision(precision)))  # shapes only
    full = param_specs_tp(q, 2)
    # the spec tree has the params' structure (device_put pairs them leaf by leaf)
    assert jax.tree.structure(full, is_leaf=lambda x: isinstance(x, P)) == jax.tree.structure(q)
    spec = full["layers"]
    col, row = P(None, "tp", None), P(None, None, "tp")
    if precision == "fp8":
        assert (spec["wq"].values, spec["wq"].scales) == (col, P(None, "tp"))
        assert (spec["wo"].values, spec["wo"].scales) == (row, P())
        return
    assert (spec["w_up"].packed, spec["w_up"].scales, spec["w_up"].exponent) == (col, col, P())
    wo_split = row if precision == "fireq-g32" else P()
    assert (spec["wo"].packed, spec["wo"].scales) == (wo_split, wo_split)
    assert (spec["w_down"].packed, spec["w_down"].scales) == (P(), P())
    if precision == "fireq-g32":
        assert spec["wo"].offsets == row and spec["wq"].offsets == col


def test_kernel_layout_weights_shard_by_whole_tiles():
    from fineserve_jax.config import ModelConfig
    from fineserve_jax.engine.sharding import param_specs_tp
    from fineserve_jax.model import init_params
    from fineserve_jax.precisions import get_precision
    from fineserve_jax.quant.model import quantize_linears
    from pallas_kernels.w4a8 import kernel_layout

    # hidden 256 (K tiles of 128: 2), FFN 128 (gate/up fused: 256 rows = 2 tiles of 128),
    # w_down's K = 128 (1 tile: replicated at tp 2).
    cfg = ModelConfig(vocab_size=300, hidden_size=256, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=128)
    q = jax.eval_shape(lambda: kernel_layout(quantize_linears(
        init_params(cfg, jax.random.key(0)), get_precision("fireq-g32"))))
    spec = param_specs_tp(q, 2)["layers"]
    col, row = P(None, "tp", None), P(None, None, "tp")
    gu = spec["w_gate_up"]
    assert (gu.packed, gu.scales, gu.offsets, gu.col_scale) == (col, col, col, P(None, "tp"))
    assert (spec["wo"].packed, spec["wo"].scales, spec["wo"].col_scale) == (row, row, P())
    assert (spec["w_down"].packed, spec["w_down"].scales) == (P(), P())
    # tp 4: the fused weight's 2 tiles cannot give each device whole gate/up pairs.
    assert param_specs_tp(q, 4)["layers"]["w_gate_up"].packed == P()
