"""Cost model: bucket-padded lookups, interpolation, monotonicity, JSON, the roofline's
hand-computed numbers, and the engine profiler on a tiny random model."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from schedulers.costmodel import (AnalyticCost, CostModel, DeviceSpec, Efficiency,
                                  EngineBuckets, ModelShape, ProfiledCost, solo_tpot, solo_ttft)

BK = EngineBuckets(block_tokens=16, decode=(1, 4, 16), prefill_rows=(1, 4), chunks=(16, 64),
                   context=(8, 32))


def dec_s(b, p):  # synthetic measured decode seconds
    return 1e-3 * b + 1e-4 * p


def pre_s(r, t, p):
    return 1e-4 * r * t + 5e-5 * p


def bucket_points():
    pts = [{"kind": "decode", "rows": b, "tokens": 1, "context_blocks": p, "seconds": dec_s(b, p)}
           for b in BK.decode for p in BK.context]
    pts += [{"kind": "prefill", "rows": r, "tokens": t, "context_blocks": p,
             "seconds": pre_s(r, t, p)}
            for r in BK.prefill_rows for t in BK.chunks for p in BK.context]
    return pts


@pytest.fixture
def bucketed():
    return ProfiledCost(bucket_points(), BK)


def test_schedulers_costmodel_does_not_import_jax():
    code = "import sys, schedulers.costmodel; sys.exit('jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ------------------------------------------------------------------ bucketed
def test_bucketed_exact_at_measured_shapes(bucketed):
    for b, p in itertools.product(BK.decode, BK.context):
        assert bucketed.decode_time([p * 16] * b) == pytest.approx(dec_s(b, p), rel=1e-12)
    for r, t, p in itertools.product(BK.prefill_rows, BK.chunks, BK.context):
        assert bucketed.prefill_time([t] * r, [p * 16] * r) == pytest.approx(pre_s(r, t, p),
                                                                           rel=1e-12)


def test_bucketed_pads_to_the_engine_shape(bucketed):
    # 3 sequences -> batch bucket 4; longest context 100 tokens = 7 blocks -> width 8.
    assert bucketed.decode_time([5, 100, 60]) == pytest.approx(dec_s(4, 8))
    # 129 tokens = 9 blocks -> width 32; 2 rows -> 4.
    assert bucketed.decode_time([129, 3]) == pytest.approx(dec_s(4, 32))
    assert bucketed.bucket_shape("decode", None, [129, 3]) == (4, 1, 32)
    # Prefill: 2 rows -> 4, longest chunk 17 -> 64, context 40 tokens -> 3 blocks -> 8.
    assert bucketed.prefill_time([17, 5], [40, 5]) == pytest.approx(pre_s(4, 64, 8))
    assert bucketed.bucket_shape("prefill", [17, 5], [40, 5]) == (4, 64, 8)
    assert bucketed.decode_time([]) == 0.0 and bucketed.prefill_time([], []) == 0.0


def test_bucketed_extrapolates_past_the_largest_bucket(bucketed):
    # Decode at 32 rows, width 32: slope along rows at the corner is (16.0+3.2 - (4+3.2)) ms
    # over 12 rows = 1 ms/row, so 32 rows -> 19.2 ms + 16 * 1 ms = 35.2 ms.
    assert bucketed.decode_time([512] * 32) == pytest.approx(35.2e-3)
    # Context 1024 tokens = 64 blocks: slope (19.2 - 16.8) ms / 24 blocks = 0.1 ms/block at
    # the corner, applied as a factor: 19.2 ms * (1 + 0.1/19.2 * 32) = 22.4 ms.
    assert bucketed.decode_time([1024] * 16) == pytest.approx(22.4e-3)


def test_bucketed_requires_every_bucket_shape():
    pts = bucket_points()[1:]
    with pytest.raises(ValueError, match=r"miss bucket shapes.*\(1, 8\)"):
        ProfiledCost(pts, BK)


def test_solo_ttft_and_tpot(bucketed):
    # 100 prompt tokens, budget 64: chunk 64 (context 64 = 4 blocks -> 8), then chunk 36
    # (padded to 64, context 100 = 7 blocks -> 8): two (1, 64, 8) steps.
    assert solo_ttft(bucketed, 100, 64) == pytest.approx(2 * pre_s(1, 64, 8))
    # 500 tokens, budget 64: 7 full chunks + one of 52; contexts 64, 128 (<= 8 blocks), then
    # 192 .. 448 and 500 (<= 32 blocks).
    want = 2 * pre_s(1, 64, 8) + 6 * pre_s(1, 64, 32)
    assert solo_ttft(bucketed, 500, 64) == pytest.approx(want)
    assert solo_tpot(bucketed, 300) == pytest.approx(dec_s(1, 32))
    with pytest.raises(ValueError):
        solo_ttft(bucketed, 0, 64)


# -------------------------------------------------------------- interpolated
def grid_points():
    # decode ms at batch {1, 4} x context {100, 500}: [[1, 2], [3, 8]]
    ms = {(1, 100): 1, (1, 500): 2, (4, 100): 3, (4, 500): 8}
    pts = [{"kind": "decode", "rows": b, "tokens": 1, "context": c, "seconds": v * 1e-3}
           for (b, c), v in ms.items()]
    # prefill ms at total tokens {64, 256} x context {256, 1024}: [[10, 20], [40, 60]];
    # (rows, tokens) 4 x 16 and 1 x 64 both feed 64 tokens: averaged (9 and 11 -> 10).
    pts += [{"kind": "prefill", "rows": 4, "tokens": 16, "context": 256, "seconds": 9e-3},
            {"kind": "prefill", "rows": 1, "tokens": 64, "context": 256, "seconds": 11e-3},
            {"kind": "prefill", "rows": 1, "tokens": 64, "context": 1024, "seconds": 20e-3},
            {"kind": "prefill", "rows": 1, "tokens": 256, "context": 256, "seconds": 40e-3},
            {"kind": "prefill", "rows": 4, "tokens": 64, "context": 1024, "seconds": 60e-3}]
    return pts


def test_interpolated_exact_at_points_and_bilinear_between():
    c = ProfiledCost(grid_points())
    assert c.decode_time([500] * 4) == pytest.approx(8e-3)
    assert c.decode_time([100]) == pytest.approx(1e-3)
    # batch 2.5 is not a batch; batch 2 at context 300: t_b = 1/3, t_c = 1/2 ->
    # (1 - 1/3) * 1.5 + 1/3 * 5.5 = 2.8333 ms.
    assert c.decode_time([300, 300]) == pytest.approx((2 / 3 * 1.5 + 1 / 3 * 5.5) * 1e-3)
    # max context counts by default; "mean" reads the mean: contexts (100, 500) -> 300.
    assert c.decode_time([100, 500]) == c.decode_time([500, 500])
    mean = ProfiledCost(grid_points(), context_stat="mean")
    assert mean.decode_time([100, 500]) == pytest.approx(c.decode_time([300, 300]))
    # Prefill: 160 tokens (t = 1/2) at context 640 (t = 1/2): mean of 10, 20, 40, 60 = 32.5.
    assert c.prefill_time([100, 60], [640, 60]) == pytest.approx(32.5e-3)
    assert c.prefill_time([64], [256]) == pytest.approx(10e-3)


def test_interpolated_clamps_below_and_extrapolates_above():
    c = ProfiledCost(grid_points())
    assert c.decode_time([50]) == pytest.approx(1e-3)  # context below 100: held
    # batch 8 at context 500: last segment 2 -> 8 ms over 3 rows, continued: 8 + 2 * 4 = 16.
    assert c.decode_time([500] * 8) == pytest.approx(16e-3)
    # 512 tokens at context 1024: (60 - 20) ms over 192 tokens, continued 256 more -> 113.3.
    assert c.prefill_time([256, 256], [1024, 1024]) == pytest.approx((60 + 40 / 192 * 256) * 1e-3)


def test_monotone_even_with_noisy_measurements():
    rng = np.random.default_rng(3)
    pts = bucket_points()
    for p in pts:  # up to +-40% noise: raw points are no longer monotone
        p["seconds"] *= float(rng.uniform(0.6, 1.4))
    for cost in (ProfiledCost(pts, BK), ProfiledCost(pts, block_tokens=16)):
        ctxs = [1, 16, 100, 128, 129, 300, 512, 513, 900, 2000]
        for n in (1, 2, 4, 5, 16, 17, 40):
            row = [cost.decode_time([x] * n) for x in ctxs]
            assert all(a <= b for a, b in zip(row, row[1:])), (n, row)
        for x in ctxs:
            col = [cost.decode_time([x] * n) for n in range(1, 40)]
            assert all(a <= b for a, b in zip(col, col[1:])), (x, col)
        for r in (1, 3, 4, 6):
            for x in (300, 700):
                row = [cost.prefill_time([t] * r, [x] * r) for t in (1, 8, 16, 30, 64, 65, 200)]
                assert all(a <= b for a, b in zip(row, row[1:])), (r, x, row)
        # Raising one row's context never lowers the time.
        assert cost.prefill_time([16, 16], [16, 600]) >= cost.prefill_time([16, 16], [16, 400])


def test_bad_points_are_named():
    with pytest.raises(ValueError, match="missing"):
        ProfiledCost(grid_points()[1:])
    with pytest.raises(ValueError, match="positive"):
        ProfiledCost([{**p, "seconds": 0.0} for p in grid_points()])
    with pytest.raises(ValueError, match="block_tokens"):
        ProfiledCost([{k: v for k, v in p.items() if k != "context"} | {"context_blocks": 2}
                      for p in grid_points()])
    c = ProfiledCost(grid_points())
    with pytest.raises(ValueError, match="includes its chunk"):
        c.prefill_time([10], [5])


# ------------------------------------------------------------------ analytic
L3_8B_PARAMS = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336) \
    + 2 * 128256 * 4096 + 65 * 4096  # = 8,030,261,248


def test_analytic_weight_and_kv_bytes():
    h100 = DeviceSpec.h100_sxm()
    bf16 = AnalyticCost(ModelShape.llama3_8b(), "bf16", h100)
    assert L3_8B_PARAMS == 8_030_261_248
    assert bf16.weight_bytes() == 2 * L3_8B_PARAMS == pytest.approx(16.06e9, rel=1e-3)
    assert bf16.kv_bytes_per_token() == 32 * 2 * 8 * 128 * 2  # 128 KiB
    fireq = AnalyticCost(ModelShape.llama3_8b(), "fireq", h100)
    lin = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    assert fireq.weight_bytes() == pytest.approx(lin * (0.5 + 1 / 128)
                                                 + 2 * (L3_8B_PARAMS - lin))
    assert fireq.kv_bytes_per_token() == 32 * 2 * 8 * (64 + 2)
    assert AnalyticCost(ModelShape.llama3_70b(), "bf16", h100).weight_bytes() == \
        pytest.approx(141.1e9, rel=1e-3)
    assert ModelShape.llama2_7b().linear_params + ModelShape.llama2_7b().embedding_params \
        == pytest.approx(6.74e9, rel=1e-3)


def test_analytic_decode_is_bandwidth_bound_and_tp_halves_weights():
    h100, eff = DeviceSpec.h100_sxm(), Efficiency()
    c1 = AnalyticCost(ModelShape.llama3_8b(), "bf16", h100)
    bw = 3.35e12 * 0.80
    step_weights = 2 * (L3_8B_PARAMS - 128256 * 4096)  # the embedding table is not read
    kv = 131072 * 2  # context 1 read + 1 token written
    assert c1.decode_time([1]) == pytest.approx(3e-4 + (step_weights + kv) / bw)
    assert c1.decode_time([1]) == pytest.approx(5.9e-3, rel=0.01)
    c2 = AnalyticCost(ModelShape.llama3_8b(), "bf16", h100, tp=2)
    allreduce = 2 * 32 * (2 * (1 / 2) * 4096 * 2 / (450e9 * 0.70) + 1e-5)
    assert c2.decode_time([1]) == pytest.approx(3e-4 + (step_weights + kv) / 2 / bw + allreduce)
    # Large prefill is compute bound: 8192 tokens of linear FLOPs at 65% of 989.4 TFLOP/s.
    big = c1.prefill_time([8192], [8192])
    lin = 2 * (L3_8B_PARAMS - 2 * 128256 * 4096 - 65 * 4096) * 8192 / (989.4e12 * 0.65)
    attn = 4 * 32 * 32 * 128 * (8192 * 8193 / 2) / (989.4e12 * 0.65)
    head = 2 * 128256 * 4096 / (989.4e12 * 0.65)
    assert big == pytest.approx(eff.step_overhead_s + lin + attn + head)
    # FP8 halves the weight bytes of decode; fireq's INT4 about quarters them.
    f8 = AnalyticCost(ModelShape.llama3_8b(), "fp8", h100).decode_time([1])
    f4 = AnalyticCost(ModelShape.llama3_8b(), "fireq", h100).decode_time([1])
    assert f4 < f8 < c1.decode_time([1])
    # H200's bandwidth makes the same decode faster; more context costs more.
    assert AnalyticCost(ModelShape.llama3_8b(), "bf16", DeviceSpec.h200()).decode_time([1]) < \
        c1.decode_time([1])
    assert c1.decode_time([4096] * 8) > c1.decode_time([1024] * 8) > c1.decode_time([1024])
    with pytest.raises(ValueError, match="tp"):
        AnalyticCost(ModelShape.llama3_8b(), "bf16", h100, tp=3)
    with pytest.raises(ValueError, match="unknown precision"):
        AnalyticCost(ModelShape.llama3_8b(), "int3", h100)


# ---------------------------------------------------------------------- JSON
def test_costmodel_json_round_trip_and_errors(tmp_path):
    cm = CostModel(machine={"processor": "test"}, engine={"config": {"block_tokens": 16}})
    cm.add("m", "bf16", "cpu", ProfiledCost(bucket_points(), BK, info={"dtype": "bfloat16"}))
    cm.add("g", "fp8", "cpu", ProfiledCost(grid_points(), context_stat="mean"))
    cm.add("llama-3-8b", "fireq", "H100-SXM",
           AnalyticCost(ModelShape.llama3_8b(), "fireq", DeviceSpec.h100_sxm(), tp=2))
    path = cm.save(tmp_path / "cm.json")
    back = CostModel.load(path)
    assert back.keys() == cm.keys() and back.machine == cm.machine
    for key in cm.keys():
        a, b = cm.get(*key), back.get(*key)
        for ctxs in ([5], [100, 300, 900], [40] * 20):
            assert a.decode_time(ctxs) == b.decode_time(ctxs)
        assert a.prefill_time([30, 64], [30, 700]) == b.prefill_time([30, 64], [30, 700])
    assert back.get("m", "bf16", "cpu").info == {"dtype": "bfloat16"}
    with pytest.raises(KeyError, match=r"fp16.*has: \(g, fp8, cpu\)"):
        back.get("g", "fp16", "cpu")
    d = json.loads(path.read_text())
    with pytest.raises(ValueError, match="version"):
        CostModel.from_dict({**d, "version": 99})
    with pytest.raises(ValueError, match="not a cost model"):
        CostModel.from_dict({**d, "format": "x"})


# ------------------------------------------------- engine profiler (tiny model)
def test_measure_steps_one_record_per_bucket_shape():
    import jax

    from fineserve_jax.config import ModelConfig
    from fineserve_jax.engine import Engine, EngineConfig
    from fineserve_jax.engine.config import pick
    from fineserve_jax.engine.profile import _allocate, _batch, _fill, measure_steps
    from schedulers.batching import DECODE, PREFILL, Scheduled
    from fineserve_jax.model import init_params
    from fineserve_jax.sampling import SamplingParams
    from fineserve_jax.tokenizer import Tokenizer
    from tiny_models import byte_tokenizer_json

    cfg = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256)
    params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0)))
    tok = Tokenizer.from_json(byte_tokenizer_json(), {"eos_token_ids": [257]})
    e = Engine(EngineConfig(kv_budget_bytes=2**20, block_tokens=4, max_seqs=4,
                            max_prefill_seqs=2, prefill_token_budget=16, max_model_len=64,
                            decode_buckets=(1, 4), prefill_row_buckets=(2,),
                            chunk_buckets=(16,), context_buckets=(4, 16), pool_fill=0xFF,
                            warmup=False))
    e.add_model("t", cfg, params, tok, dtype="float32")
    e.start(thread=False)
    m = e._models["t"]

    import fineserve_jax.engine.profile as prof
    ran = []
    run = prof._run

    def logged(engine, runner, batch):
        ran.append((*batch.tokens.shape, batch.page_table.shape[1]))
        return run(engine, runner, batch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prof, "_run", logged)
        recs = measure_steps(e, reps=2)
    shapes = [(r["rows"], r["tokens"], r["context_blocks"]) for r in recs]
    assert shapes == m.buckets.shapes()
    # One untimed run of every shape, then the timed runs in rounds of every shape.
    assert ran == shapes * 3
    assert [r["kind"] for r in recs] == ["decode"] * 4 + ["prefill"] * 2
    assert all(r["seconds"] > 0 and r["model"] == "t" and r["precision"] == "bf16"
               for r in recs)
    assert e.alloc.used_blocks("t") == 0  # measuring blocks are given back

    # Every block a measured step reads was filled with real K/V: in a pool poisoned
    # with NaN, any unfilled page in reach would make the logits NaN.
    handles = _allocate(e, "t", 64)
    _fill(e, m, handles, np.random.default_rng(0))
    for B, T, P in m.buckets.shapes():
        _, e.pool, aux = m.runner.step(e.pool, _batch(m, B, T, P, handles,
                                                      np.random.default_rng(1)))
        assert np.isfinite(np.asarray(aux.logits)).all(), (B, T, P)
    e.alloc.free("t", handles)

    # The profile pads a batch exactly as the engine builds it (seconds made up per shape,
    # increasing in each axis, so the shape a prediction used can be read off its value).
    bk = m.buckets

    def shape_s(B, T, P):
        return 1e-6 * (B * 10_000 + T * 100 + P)

    cost = ProfiledCost([{"kind": r["kind"], "rows": r["rows"], "tokens": r["tokens"],
                          "context_blocks": r["context_blocks"],
                          "seconds": shape_s(r["rows"], r["tokens"], r["context_blocks"])}
                         for r in recs],
                        EngineBuckets(4, bk.decode, bk.prefill_rows, bk.chunks, bk.context))
    sp = SamplingParams(temperature=0)
    rng = np.random.default_rng(2)
    for _ in range(20):
        kind = [DECODE, PREFILL][int(rng.integers(2))]
        n = int(rng.integers(1, 5 if kind == DECODE else 3))
        ctx = rng.integers(1, 64, size=n).tolist()
        chunks = [1 if kind == DECODE else int(rng.integers(1, min(c, 16) + 1)) for c in ctx]
        seqs = [SimpleNamespace(num_computed=x - c, tokens=list(range(x)),
                                blocks=list(range(-(-x // 4))), seed=0,
                                state=SimpleNamespace(params=sp, output_ids=[]))
                for x, c in zip(ctx, chunks)]
        batch = e._build_batch(m, Scheduled(kind, list(zip(seqs, chunks))))
        assert cost.bucket_shape(kind, chunks, ctx) == batch.shape
        got = cost.decode_time(ctx) if kind == DECODE else cost.prefill_time(chunks, ctx)
        assert got == pytest.approx(shape_s(*batch.shape), rel=1e-12)
    assert pick(bk.decode, 3, "decode") == cost.bucket_shape(DECODE, None, [1, 2, 3])[0]


# ------------------------------------------------------------ online calibration
class _Flat:
    """Prefill costs 0.1 s per step, decode 0.01 s."""

    def prefill_time(self, chunks, contexts):
        return 0.1

    def decode_time(self, contexts):
        return 0.01


def test_calibration_converges_to_the_measured_ratio_per_kind():
    from schedulers.calibration import OnlineCalibration
    cost = OnlineCalibration(_Flat(), weight=0.5)
    assert cost.prefill_time([8], [8]) == 0.1 and cost.decode_time([9]) == 0.01
    # One prefill at 0.2 s (2x): the factor's log moves half way: sqrt(2).
    assert cost.observe("prefill", [8], [8], 0.2) == pytest.approx(2 ** 0.5)
    assert cost.prefill_time([8], [8]) == pytest.approx(0.1 * 2 ** 0.5)
    assert cost.decode_time([9]) == 0.01  # the other kind is untouched
    for _ in range(30):
        cost.observe("prefill", [8], [8], 0.2)
        cost.observe("decode", None, [9], 0.008)
    assert cost.factors["prefill"] == pytest.approx(2.0, rel=1e-6)
    assert cost.factors["decode"] == pytest.approx(0.8, rel=1e-6)
    assert cost.observed == {"prefill": 31, "decode": 30}
    # A fixed copy keeps the factors while the live one moves on.
    snap = cost.frozen()
    cost.observe("prefill", [8], [8], 0.1)
    assert snap.prefill_time([8], [8]) == pytest.approx(0.2)
    assert cost.prefill_time([8], [8]) < 0.2


def test_calibration_is_a_geometric_mean_and_bounded():
    from schedulers.calibration import OnlineCalibration
    cost = OnlineCalibration(_Flat(), weight=0.25, bounds=(0.5, 2.0))
    # The factor moves in log space: a 2x slow step takes log f to w log 2, a 2x fast one
    # then to (1 - w) w log 2 - w log 2 (a slow and a fast step nearly cancel).
    cost.observe("decode", None, [1], 0.02)
    cost.observe("decode", None, [1], 0.005)
    assert math.log(cost.factors["decode"]) == pytest.approx(
        (0.75 * 0.25 - 0.25) * math.log(2))
    # A 100x stall counts as 2x; a factor never leaves the bounds.
    before = cost.factors["prefill"]
    cost.observe("prefill", [1], [1], 10.0)
    assert cost.factors["prefill"] == pytest.approx(before * 2 ** 0.25)
    for _ in range(200):
        cost.observe("prefill", [1], [1], 10.0)
    assert cost.factors["prefill"] == pytest.approx(2.0)
    # Nothing to learn from: zero predictions, zero or non-finite measurements.
    free = OnlineCalibration(type("Free", (), {"prefill_time": lambda s, a, b: 0.0,
                                               "decode_time": lambda s, a: 0.0})())
    assert free.observe("decode", None, [3], 1.0) == 1.0 and free.observed["decode"] == 0
    assert cost.observe("decode", None, [1], float("nan")) == cost.factors["decode"]


def test_a_shared_device_speed_carries_one_models_steps_to_another():
    """Hand-computed, weight 0.5: model a's prefill at 2x its profile moves the device's
    speed half way (log s = 0.5 log 2), then a's own prefill factor half way along what is
    left (0.5 * 0.5 log 2); b, which never stepped, predicts at the device's speed."""
    from schedulers.calibration import DeviceSpeed, OnlineCalibration
    speed = DeviceSpeed(weight=0.5)
    a = OnlineCalibration(_Flat(), weight=0.5, speed=speed, own_weight=0.5)
    b = OnlineCalibration(_Flat(), weight=0.5, speed=speed, own_weight=0.5)
    # Beside a speed a model's own factors learn at a share of the weight by default.
    assert OnlineCalibration(_Flat(), weight=0.5, speed=speed).own_weight == 0.125
    assert OnlineCalibration(_Flat(), weight=0.5).own_weight == 0.5
    assert a.observe("prefill", [8], [8], 0.2) == pytest.approx(2 ** 0.75)
    assert speed.factor == pytest.approx(2 ** 0.5) and speed.observed == 1
    assert a.prefill_time([8], [8]) == pytest.approx(0.1 * 2 ** 0.75)
    assert a.decode_time([9]) == pytest.approx(0.01 * 2 ** 0.5)  # a's other kind: the speed
    assert b.prefill_time([8], [8]) == pytest.approx(0.1 * 2 ** 0.5)
    assert b.factors == pytest.approx({"prefill": 2 ** 0.5, "decode": 2 ** 0.5})
    assert b.observed == {"prefill": 0, "decode": 0}
    # Over many steps a's prediction meets its ratio, and b's a's device share of it; a
    # step of b that runs as predicted leaves the speed where it is.
    for _ in range(60):
        a.observe("prefill", [8], [8], 0.2)
    assert a.prefill_time([8], [8]) == pytest.approx(0.2, rel=1e-6)
    s = speed.factor
    assert 1.0 < s <= 2.0
    b.observe("decode", None, [9], 0.01 * s)
    assert speed.factor == pytest.approx(s) and b.factors["decode"] == pytest.approx(s)
    # A frozen copy carries the speed of when it was taken.
    snap = b.frozen()
    a.observe("prefill", [8], [8], 0.05)
    assert snap.decode_time([9]) == pytest.approx(0.01 * s)
    assert b.decode_time([9]) < 0.01 * s
    # A 50x stall counts as 2x (the bound), however it is split between the device and
    # the model; the speed never leaves the bounds either.
    for _ in range(100):
        a.observe("prefill", [8], [8], 5.0)
    assert a.factors["prefill"] == pytest.approx(2.0)
    assert s < speed.factor <= 2.0
    for _ in range(100):
        speed.observe(math.log(100.0))
    assert speed.factor == 2.0 and a.factors["prefill"] == 2.0
    assert speed.observe(float("nan")) == 2.0 and speed.observed == 1 + 60 + 1 + 1 + 100 + 100
    with pytest.raises(ValueError, match="weight"):
        DeviceSpeed(weight=2.0)
    with pytest.raises(ValueError, match="bounds"):
        DeviceSpeed(bounds=(0.5, 0.9))
    with pytest.raises(TypeError, match="DeviceSpeed"):
        OnlineCalibration(_Flat(), speed=1.2)
    with pytest.raises(ValueError, match="weight"):
        OnlineCalibration(_Flat(), speed=speed, own_weight=0.0)


def test_calibration_rejects_bad_settings():
    from schedulers.calibration import OnlineCalibration, ScaledCost
    with pytest.raises(ValueError, match="weight"):
        OnlineCalibration(_Flat(), weight=0.0)
    with pytest.raises(ValueError, match="bounds"):
        OnlineCalibration(_Flat(), bounds=(1.5, 2.0))
    with pytest.raises(ValueError, match="decode factor"):
        ScaledCost(_Flat(), decode=-1.0)
    with pytest.raises(ValueError, match="kind"):
        OnlineCalibration(_Flat()).observe("verify", None, [1], 0.1)


def test_calibration_learns_a_factor_per_compiled_shape(bucketed):
    """Batch-1 decodes run 2x the profile and batch-16 ones 0.5x: the kind's factor can
    only average them, each shape's own factor follows its steps; a shape never seen takes
    the kind's factor. Hand-computed: weight 0.5 (a shape's steps count up to 2), prior 2."""
    from schedulers.calibration import OnlineCalibration
    cost = OnlineCalibration(bucketed, weight=0.5, shape_prior=2.0)
    one, sixteen, four = [40], [40] * 16, [40] * 3  # context 40 tokens -> 3 blocks -> width 8
    assert bucketed.bucket_shape("decode", None, one) == (1, 1, 8)
    cost.observe("decode", None, one, 2 * dec_s(1, 8))
    # kind: log f = 0.5 log 2; shape (1 step, a plain mean so far): log 2, counting m = 1:
    # blend (1 * log 2 + 2 * 0.5 log 2) / 3 = 2/3 log 2.
    assert cost.factors["decode"] == pytest.approx(2 ** 0.5)
    assert cost.decode_time(one) == pytest.approx(dec_s(1, 8) * 2 ** (2 / 3))
    assert cost.decode_time(four) == pytest.approx(dec_s(4, 8) * 2 ** 0.5)  # unseen shape
    for _ in range(20):
        cost.observe("decode", None, one, 2 * dec_s(1, 8))
        cost.observe("decode", None, sixteen, 0.5 * dec_s(16, 8))
    # The kind's factor ends near 1 (it alternates around 0.5x and 2x); each shape's own
    # log factor is its ratio, blended 2:2 with the kind's.
    k = math.log(cost.factors["decode"])
    assert abs(k) < 0.5 * math.log(2)
    assert cost.decode_time(one) == pytest.approx(dec_s(1, 8) * math.exp((2 * math.log(2) + 2 * k) / 4))
    assert cost.decode_time(sixteen) == pytest.approx(
        dec_s(16, 8) * math.exp((-2 * math.log(2) + 2 * k) / 4))
    assert cost.decode_time(four) == pytest.approx(dec_s(4, 8) * math.exp(k))
    # Prefill shapes are their own: untouched by the decodes.
    assert cost.prefill_time([16], [16]) == pytest.approx(pre_s(1, 16, 8))
    # Frozen: the blended factor of every shape seen, kept while the live one moves on.
    snap = cost.frozen()
    assert snap.decode_time(one) == pytest.approx(cost.decode_time(one))
    assert snap.shape_factors() == pytest.approx(
        {"decode:1:1:8": math.exp((2 * math.log(2) + 2 * k) / 4),
         "decode:16:1:8": math.exp((-2 * math.log(2) + 2 * k) / 4)})
    cost.observe("decode", None, one, dec_s(1, 8))
    assert snap.decode_time(one) > cost.decode_time(one)
    # shape_prior=None: one factor per kind, as before.
    flat = OnlineCalibration(bucketed, weight=0.5, shape_prior=None)
    flat.observe("decode", None, one, 2 * dec_s(1, 8))
    assert flat.decode_time(sixteen) == pytest.approx(dec_s(16, 8) * 2 ** 0.5)
    assert flat.frozen().shapes == {}


def test_per_shape_factors_need_a_bucketed_cost_and_positive_values(bucketed):
    from schedulers.calibration import OnlineCalibration, ScaledCost
    with pytest.raises(ValueError, match="engine buckets"):
        ScaledCost(_Flat(), shapes={("decode", 1, 1, 8): 1.5})
    with pytest.raises(ValueError, match="kind, rows, tokens"):
        ScaledCost(bucketed, shapes={("verify", 1, 1, 8): 1.5})
    with pytest.raises(ValueError, match="positive"):
        ScaledCost(bucketed, shapes={("decode", 1, 1, 8): 0.0})
    with pytest.raises(ValueError, match="shape_prior"):
        OnlineCalibration(bucketed, shape_prior=-1.0)
    # A cost without buckets learns per kind only, with the default prior.
    flat = OnlineCalibration(_Flat(), weight=0.5)
    flat.observe("decode", None, [3], 0.02)
    assert flat.frozen().shapes == {} and flat.decode_time([3]) == pytest.approx(0.01 * 2 ** 0.5)


def test_a_fitted_correction_is_measured_over_predicted_time_per_kind_and_shape(bucketed):
    """Three batch-1 decodes at 1x, 1x and 4x the profile and one batch-16 decode at 0.5x:
    the batch-1 shape spent 6 profiled steps' time in 3 (factor 2, where their median
    ratio is 1), batch 16 its one step's 0.5; the kind's factor is all measured time over
    all predicted, (6 d1 + 0.5 d16) / (3 d1 + d16) with d1 = 1.8 ms and d16 = 16.8 ms;
    prefill, never run, keeps 1."""
    from schedulers.calibration import ScaledCost
    one, sixteen, four = [40], [40] * 16, [40] * 3
    steps = [("decode", None, one, f * dec_s(1, 8)) for f in (1.0, 4.0, 1.0)]
    steps.append(("decode", None, sixteen, 0.5 * dec_s(16, 8)))
    fit = ScaledCost.fit(bucketed, steps)
    kind = (6 * 1.8 + 0.5 * 16.8) / (3 * 1.8 + 16.8)
    assert fit.shape_factors() == pytest.approx({"decode:1:1:8": 2.0, "decode:16:1:8": 0.5})
    assert fit.factors == pytest.approx({"prefill": 1.0, "decode": kind})
    assert fit.decode_time(one) == pytest.approx(2 * dec_s(1, 8))
    assert fit.decode_time(four) == pytest.approx(kind * dec_s(4, 8))  # a shape not run
    assert fit.prefill_time([16], [16]) == pytest.approx(pre_s(1, 16, 8))
    # Without buckets: per kind only. A step the base predicts as free counts for nothing.
    flat = ScaledCost.fit(_Flat(), [("decode", None, [3], 0.03), ("decode", None, [3], 0.0)])
    assert flat.shapes == {} and flat.factors["decode"] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="step kind"):
        ScaledCost.fit(bucketed, [("verify", None, one, 1.0)])
