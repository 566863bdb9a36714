"""The host simulation behind ``bench kvslab``: it finishes, leaks nothing, counts agree."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fineserve_jax.kvslab import (
    BlockFormat,
    FixedPageAllocator,
    KVSlabAllocator,
    StaticPartitionAllocator,
)
from fineserve_jax.kvslab.simulate import Trace, Workload, make_trace, simulate

BF16 = BlockFormat(2, 1, 8, 4, 2, name="bf16")  # 256 B blocks of 4 tokens
INT4 = BlockFormat(2, 1, 8, 4, 0.5, 2, name="int4")  # 96 B
SMALL = Workload(steps=400, phase_steps=100, load=0.9, prompt_mean=12, output_mean=20,
                 max_len=40, seed=3)


def build(kind, pool, fmts, reserve=0, slab_bytes=None):
    names = [f"m{i}" for i in range(len(fmts))]
    if kind == "kvslab":
        a = KVSlabAllocator(pool, fmts, slab_bytes=slab_bytes)
    elif kind == "static":
        a = StaticPartitionAllocator(pool, fmts, partitions=names)
    else:
        a = FixedPageAllocator(pool, fmts)
    for n, f in zip(names, fmts):
        a.add_model(n, f, reserve_blocks=0 if kind == "static" else reserve)
    return a, names


class Recording:
    """Wraps an allocator and counts the blocks that pass through it."""

    def __init__(self, inner):
        self.inner, self.allocated, self.freed = inner, 0, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def allocate(self, model, n):
        out = self.inner.allocate(model, n)
        self.allocated += n
        return out

    def free(self, model, handles):
        handles = list(handles)
        self.freed += len(handles)
        self.inner.free(model, handles)


@pytest.mark.parametrize("kind", ["kvslab", "static", "fixed-page"])
def test_tiny_pool_finishes_every_request_and_leaks_nothing(kind):
    fmts = [BF16, INT4]
    pool = 32 * 3840  # 32 slabs of 2 x LCM(256, 96) = 3840 B
    alloc, names = build(kind, pool, fmts, reserve=8)
    trace = make_trace(SMALL, SMALL.rates([f.token_bytes for f in fmts], alloc.pool_bytes))
    rec = Recording(alloc)
    res = simulate(rec, names, trace, stats_every=1)  # stats() checks live <= used each step
    assert res.arrived == len(trace) > 100
    assert res.rejected == 0 and res.completed == res.arrived
    assert res.admitted == res.completed + res.preempted  # each admission ends one way
    assert res.preempted > 0  # this load does run out of blocks
    assert rec.allocated == rec.freed > 0
    assert all(alloc.used_blocks(n) == 0 for n in names)
    st = alloc.stats()
    assert st.rows_free == (alloc.num_rows if kind != "static" else 0)
    assert (res.running[-1] == 0).all() and (res.live_tokens[-1] == 0).all()
    m = res.metrics(SMALL.phase_steps)
    assert 0 < m["mean_running"] <= m["peak_running"]
    assert m["hot_running_mean"] + m["cold_running_mean"] == pytest.approx(m["mean_running"])
    assert len(res.wait_steps) == res.completed


def test_one_request_step_by_step():
    alloc, names = build("kvslab", 16 * 3840, [BF16])
    rec = Recording(alloc)
    trace = Trace(np.array([2]), np.array([0], np.int32), np.array([5], np.int32),
                  np.array([10], np.int32))
    res = simulate(rec, names, trace, stats_every=1)
    # admitted at step 2 holding its 5 prompt tokens, one more token per step, and released
    # at step 12, when its 10th token comes
    assert list(res.live_tokens[:, 0]) == [0, 0, *range(5, 15), 0]
    assert list(res.running[:, 0]) == [0, 0, *[1] * 10, 0]
    assert rec.allocated == -(-14 // 4)  # blocks grow with the tokens held, one at a time
    assert res.completed == 1 and res.preempted == 0 and list(res.wait_steps) == [0]


def test_growth_failure_preempts_the_newest_and_it_resumes():
    # room for 4 blocks (16 tokens): two requests of 6 + 6 tokens cannot both grow
    alloc, names = build("kvslab", 4 * 256, [BF16], slab_bytes=256)
    assert alloc.free_blocks("m0") == 4
    trace = Trace(np.array([0, 0]), np.array([0, 0], np.int32), np.array([6, 6], np.int32),
                  np.array([6, 6], np.int32))
    res = simulate(alloc, names, trace, stats_every=1)
    assert res.preempted == 1 and res.completed == 2 and res.admitted == 3
    # step 3: the older one needs a 3rd block for its 9th token; the newer one (9 tokens
    # then) is preempted. Step 6: the older one finishes, the newer one is readmitted with
    # its 9 tokens recomputed and finishes its last 3 tokens at step 9.
    assert list(res.live_tokens[:, 0]) == [12, 14, 16, 9, 10, 11, 9, 10, 11, 0]
    assert list(res.running[:, 0]) == [2, 2, 2, 1, 1, 1, 1, 1, 1, 0]
    assert list(res.wait_steps) == [0, 0]  # first admissions, both at arrival


def test_request_that_can_never_fit_is_rejected():
    alloc, names = build("kvslab", 4 * 256, [BF16], slab_bytes=256)
    trace = Trace(np.array([0, 1]), np.array([0, 0], np.int32), np.array([10, 3], np.int32),
                  np.array([10, 3], np.int32))  # 20 tokens > 16 that fit
    res = simulate(alloc, names, trace)
    assert res.rejected == 1 and res.completed == 1


def test_trace_is_bursty_seeded_and_meets_its_load_in_every_phase():
    w = Workload(steps=4000, phase_steps=1000, hot_share=0.9, load=0.8, seed=5)
    token_bytes, pool = np.array([BF16.token_bytes, INT4.token_bytes]), 1 << 24
    rates = w.rates(list(token_bytes), pool)
    assert rates[1] / rates[0] == pytest.approx(token_bytes[0] / token_bytes[1])
    t1, t2 = make_trace(w, rates), make_trace(w, rates)
    assert all((getattr(t1, f) == getattr(t2, f)).all() for f in ("arrival", "model", "prompt"))
    assert (np.diff(t1.arrival) >= 0).all()
    expected = w.steps * (0.9 + 0.1) / 2 * sum(rates)  # each model hot half the time
    assert abs(len(t1) - expected) < 4 * np.sqrt(expected)  # Poisson mean
    assert t1.prompt.min() >= w.min_len and t1.output.max() <= w.max_len
    assert abs(t1.prompt.mean() / w.prompt_mean - 1) < 0.1
    assert abs(t1.output.mean() / w.output_mean - 1) < 0.1
    # Little's law per phase: offered token-steps times each request's token bytes, over
    # the pool, is the load whichever model is hot; the hot model offers 0.9 of it.
    o, p = t1.output.astype(float), t1.prompt.astype(float)
    demand = o * (p + (o + 1) / 2) * token_bytes[t1.model] / pool
    phase = t1.arrival // w.phase_steps
    for ph in range(4):
        sel = phase == ph
        offered = demand[sel].sum() / w.phase_steps
        assert offered == pytest.approx(0.8, rel=0.12)
        hot_part = demand[sel & (t1.model == ph % 2)].sum() / w.phase_steps
        assert hot_part / offered == pytest.approx(0.9, abs=0.04)


def test_same_stream_for_every_allocator():
    fmts = [BF16, INT4]
    pool = 32 * 3840
    trace = make_trace(SMALL, SMALL.rates([f.token_bytes for f in fmts], pool))
    results = {}
    for kind in ("kvslab", "static", "fixed-page"):
        alloc, names = build(kind, pool, fmts, reserve=8)
        results[kind] = simulate(alloc, names, trace).metrics()
    assert len({r["arrived"] for r in results.values()}) == 1
    assert results["fixed-page"]["worst_padding"] == pytest.approx(1 - 96 / 256)
    assert results["kvslab"]["worst_padding"] == 0  # 2 x LCM slabs pack both exactly


class NoCompaction(Recording):
    """The same KV Slab with compaction switched off."""

    def compact_for(self, model, n):
        return []


def test_compaction_lets_the_busy_model_take_sparse_slabs():
    # Load alternates completely between a bf16 and an int4 model; 32 blocks per slab
    # strand a lot of memory in the slabs of the model whose phase just ended.
    fmts = [BF16, INT4]
    w = Workload(steps=1200, phase_steps=300, hot_share=1.0, load=1.0, prompt_mean=12,
                 output_mean=40, max_len=120, seed=4)
    pool = 48 * 8 * 3840
    trace = make_trace(w, w.rates([f.token_bytes for f in fmts], pool))
    out = {}
    for label, wrap in (("compact", Recording), ("no-compact", NoCompaction)):
        alloc, names = build("kvslab", pool, fmts, reserve=8, slab_bytes=8 * 3840)
        res = simulate(wrap(alloc), names, trace, warmup=100, window_end=w.steps)
        assert res.completed + res.rejected == res.arrived
        assert all(alloc.used_blocks(n) == 0 for n in names)
        assert (res.waiting[-1] == 0).all()
        m = res.metrics(w.phase_steps)
        steps = np.arange(100, w.steps)
        hot = (steps // w.phase_steps) % 2
        assert m["hot_saturated_steps"] == int((res.waiting[steps, hot] > 0).sum())
        out[label] = (res, m)
    res, m = out["compact"]
    assert res.moved_blocks > 0 and res.moved_bytes >= res.moved_blocks * INT4.block_bytes
    assert out["no-compact"][0].moved_blocks == 0
    assert m["hot_saturated_running"] > out["no-compact"][1]["hot_saturated_running"]
    assert m["wait_steps_p95"] < out["no-compact"][1]["wait_steps_p95"]


def test_bench_kvslab_runs_end_to_end(tmp_path, capsys):
    from fineserve_jax.bench.__main__ import main
    out = tmp_path / "kvslab.json"
    assert main(["kvslab", "--pool-gib", "2", "--steps", "600", "--phase-steps", "300",
                 "--loads", "1", "--mixes", "bf16+int4", "--reserve-tokens", "2048",
                 "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["command"].startswith("python -m fineserve_jax.bench kvslab --pool-gib 2 ")
    assert {r["allocator"] for r in rec["results"]} == {"kvslab", "kvslab-small", "static",
                                                         "fixed-page"}
    assert {r["hot_share"] for r in rec["results"]} == {1.0, 0.9}
    assert set(rec["goal"]) >= {"padding_under_1pct", "concurrency_1_5x",
                                "min_concurrency_ratio"}
    assert rec["goal"]["padding_under_1pct"] is True
    text = capsys.readouterr().out
    assert "hot sat" in text and "kvslab sat" in text and "goal:" in text
