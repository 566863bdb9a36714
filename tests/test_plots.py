"""fineserve_jax.plots on constructed pool samples and serve records (Agg backend)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fineserve_jax.engine.stats import EngineStats  # noqa: E402
from fineserve_jax.kvslab.stats import PoolStats  # noqa: E402
from fineserve_jax.plots import (SHARED, PoolRecorder, load_record, plot_attainment,  # noqa: E402
                                 plot_pool_timeline, pool_series, sample_pool)

ROOT = Path(__file__).resolve().parents[1]
ROW = 1 << 20
# (t, rows of "bf16", rows of "fireq") in a 10-row pool; "fireq" appears late, "bf16" leaves.
TRACE = [(100.0, 0, 0), (100.5, 2, 0), (101.0, 5, 1), (101.25, 6, 4), (102.0, 3, 4),
         (103.0, 0, 2), (103.5, 0, 0)]


def _pool(owners: dict[str, int], total: int = 10, shared: int = 0, kind="kvslab"):
    owners = {k: v for k, v in owners.items() if v}  # an owner without rows is not listed
    return PoolStats(kind=kind, pool_bytes=total * ROW, row_bytes=ROW, rows_total=total,
                     rows_free=total - sum(owners.values()) - shared, rows_by_owner=owners,
                     rows_shared=shared)


def _samples():
    return [(t, _pool({"bf16": a, "fireq": b})) for t, a, b in TRACE]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_pool_series_arrays():
    # EngineStats and PoolStats mix; order of samples does not matter.
    mixed = [(t, EngineStats({}, p, 0, 0) if i % 2 else p) for i, (t, p) in enumerate(_samples())]
    s = pool_series(mixed[::-1])
    np.testing.assert_allclose(s.t, [0, 0.5, 1, 1.25, 2, 3, 3.5])
    assert list(s.owners) == ["bf16", "fireq"]  # order of first appearance
    np.testing.assert_array_equal(s.owners["bf16"], [a for _, a, _ in TRACE])
    np.testing.assert_array_equal(s.owners["fireq"], [b for _, _, b in TRACE])
    np.testing.assert_array_equal(s.rows_used, [a + b for _, a, b in TRACE])
    np.testing.assert_array_equal(s.rows_total, 10)
    assert s.row_bytes == ROW


def test_pool_series_shared_rows_and_bad_input():
    s = pool_series([(0, _pool({"a": 1}, shared=2, kind="fixed-page")),
                     (1, _pool({"a": 3}, kind="fixed-page"))])
    assert list(s.owners) == ["a", SHARED]
    np.testing.assert_array_equal(s.owners[SHARED], [2, 0])
    np.testing.assert_array_equal(s.rows_used, [3, 3])
    with pytest.raises(ValueError, match="no samples"):
        pool_series([])
    with pytest.raises(ValueError, match="no pool"):
        pool_series([(0, EngineStats({}, None, 0, 0))])
    with pytest.raises(TypeError, match="EngineStats or PoolStats"):
        pool_series([(0, {"rows_total": 3})])


def _inside(poly, x, y) -> bool:
    return any(p.contains_point((x, y)) for p in poly.get_paths())


def test_pool_timeline_stacks_rows_by_owner():
    samples = _samples()
    ax = plot_pool_timeline(samples)
    layers = ax.collections
    assert [c.get_label() for c in layers] == ["bf16", "fireq"]
    s = pool_series(samples)
    # Each layer, between two samples, spans [rows below it, rows below + its own rows]
    # (steps: a sample holds until the next), so the stack's top is the rows in use.
    eps = 0.05
    for i in range(len(TRACE) - 1):
        x = (s.t[i] + s.t[i + 1]) / 2
        below = 0
        for layer, name in zip(layers, s.owners):
            h = s.owners[name][i]
            if h:
                assert _inside(layer, x, below + eps) and _inside(layer, x, below + h - eps)
            assert not _inside(layer, x, below + h + eps), (i, name)
            assert not _inside(layer, x, below - eps), (i, name)
            below += h
        assert below == s.rows_used[i]
    (total,) = [ln for ln in ax.get_lines() if ln.get_label() == "pool rows"]
    np.testing.assert_array_equal(total.get_ydata(), 10)
    assert ax.get_ylim()[1] >= 10
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["bf16", "fireq", "pool rows"]
    buf = io.BytesIO()
    ax.figure.savefig(buf, format="png")
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pool_timeline_on_given_axes_and_empty_pool():
    fig, (a0, a1) = plt.subplots(1, 2)
    assert plot_pool_timeline([(0, _pool({})), (1, _pool({}))], ax=a1) is a1
    assert not a1.collections and not a0.lines  # nothing held: only the pool line
    assert len(a1.get_lines()) == 1


def test_plot_attainment_of_the_committed_record():
    path = ROOT / "benchmarks" / "results" / "serve_systems_cpu.json"
    rec = json.loads(path.read_text())
    ax = plot_attainment(path)
    lines = {ln.get_label(): ln for ln in ax.get_lines() if not ln.get_label().startswith("_")}
    assert set(lines) == set(rec["per_system"])
    for name, r in rec["per_system"].items():
        np.testing.assert_allclose(lines[name].get_xdata(), rec["rates"])
        np.testing.assert_allclose(lines[name].get_ydata(), r["attainment"])
    targets = [ln for ln in ax.get_lines() if ln.get_label().startswith("_")]
    assert len(targets) == 1 and np.allclose(targets[0].get_ydata(), 0.9)
    assert rec["device"] in ax.get_title()


def test_plot_attainment_checks_the_record():
    rec = {"rates": [1, 2], "per_system": {"a": {"attainment": [1.0, 0.5]}}}
    ax = plot_attainment(rec, target=None, title="t")
    assert len(ax.get_lines()) == 1 and ax.get_title() == "t"
    with pytest.raises(ValueError, match="2 rates"):
        load_record({"rates": [1, 2], "per_system": {"a": {"attainment": [1.0]}}})
    with pytest.raises(ValueError, match="serve-systems"):
        load_record({"runs": []})
    # Repeated runs (bench serve --repeats): their range is drawn as a band.
    rec["per_system"]["a"]["attainment_runs"] = [[0.9, 1.0, 1.0], [0.25, 0.5, 0.75]]
    ax = plot_attainment(rec, target=None)
    (band,) = ax.collections
    lo_hi = band.get_paths()[0].vertices[:, 1]
    assert lo_hi.min() == 0.25 and lo_hi.max() == 1.0
    with pytest.raises(ValueError, match="attainment_runs"):
        load_record({"rates": [1, 2], "per_system": {"a": {
            "attainment": [1.0, 0.5], "attainment_runs": [[1.0], []]}}})


class _FakeEngine:
    """Steps through TRACE: what an engine's ``step``/``stats`` report."""

    def __init__(self):
        self.i = 0

    def step(self) -> bool:
        if self.i + 1 >= len(TRACE):
            return False
        self.i += 1
        return True

    def stats(self):
        _, a, b = TRACE[self.i]
        return EngineStats({}, _pool({"bf16": a, "fireq": b}), self.i, 0)


def test_sample_pool_steps_an_engine_without_thread():
    samples = sample_pool(_FakeEngine(), step=True)
    s = pool_series(samples)
    # one sample before the first step, one after each step (the last finds no work)
    np.testing.assert_array_equal(s.owners["bf16"], [a for _, a, _ in TRACE] + [0])
    assert np.all(np.diff(s.t) >= 0)


def test_sample_pool_and_recorder_poll_until_done():
    class Handle:
        finished = False

    eng, h = _FakeEngine(), Handle()
    rec = PoolRecorder(eng, interval_s=0.001).start()
    calls = {"n": 0}
    real = eng.stats

    poller = threading.get_ident()

    def stats():  # the "engine" finishes the request at sample_pool's fourth poll
        if threading.get_ident() == poller:  # the recorder's own polls do not count
            calls["n"] += 1
            if calls["n"] > 3:
                h.finished = True
        return real()

    eng.stats = stats
    samples = sample_pool(eng, [h], interval_s=0.001)
    assert len(samples) >= 4 and h.finished
    got = rec.stop()
    assert len(got) >= 2 and got is rec.samples
    with pytest.raises(ValueError):
        PoolRecorder(eng, interval_s=0)


def test_plots_module_does_not_import_matplotlib():
    code = "import sys, fineserve_jax.plots; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
