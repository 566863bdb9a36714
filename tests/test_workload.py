"""Workload generator: power-law rates, arrival burstiness, lengths, trace files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from schedulers.workload import (
    SHAREGPT_OUTPUT,
    SHAREGPT_PROMPT,
    LengthDist,
    Request,
    WorkloadSpec,
    power_law_rates,
    read_trace,
    renewal_arrivals,
    write_trace,
)

MODELS = ("m0", "m1", "m2", "m3")


def test_power_law_rates_ratios_and_total():
    r = power_law_rates(4, 10.0, 1.0)
    assert sum(r) == pytest.approx(10.0)
    assert r[0] / r[1] == pytest.approx(2.0) and r[0] / r[3] == pytest.approx(4.0)
    r2 = power_law_rates(3, 6.0, 2.0)
    assert r2[0] / r2[2] == pytest.approx(9.0)
    assert power_law_rates(3, 6.0, 0.0) == pytest.approx([2.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="alpha"):
        power_law_rates(3, 1.0, -1.0)


def test_generated_counts_follow_the_rates():
    spec = WorkloadSpec(MODELS, total_rate=50.0, duration_s=200.0, alpha=1.0, seed=3)
    reqs = spec.generate()
    counts = {m: sum(r.model == m for r in reqs) for m in MODELS}
    for m, rate in spec.rates().items():  # Poisson counts: sd = sqrt(mean), allow ~4 sd
        mean = rate * spec.duration_s
        assert abs(counts[m] - mean) < 4 * mean ** 0.5, (m, counts[m], mean)
    assert counts["m0"] / counts["m3"] == pytest.approx(4.0, rel=0.2)
    assert [r.arrival_s for r in reqs] == sorted(r.arrival_s for r in reqs)
    assert all(0 <= r.arrival_s < 200.0 for r in reqs)


@pytest.mark.parametrize("cv", [1.0, 0.5, 3.0])
def test_arrival_gap_cv(cv):
    rng = np.random.default_rng(0)
    t = renewal_arrivals(rng, rate=20.0, cv=cv, duration_s=1000.0)
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(1 / 20.0, rel=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.15)


def test_poisson_and_gamma_streams_differ_in_burstiness():
    base = {"models": ("a",), "total_rate": 20.0, "duration_s": 500.0, "seed": 1}
    cvs = []
    for cv in (1.0, 4.0):
        t = np.array([r.arrival_s for r in WorkloadSpec(cv=cv, **base).generate()])
        g = np.diff(t)
        cvs.append(g.std() / g.mean())
    assert cvs[0] == pytest.approx(1.0, abs=0.15) and cvs[1] > 3.0


def test_lengths_sharegpt_like():
    spec = WorkloadSpec(("a",), total_rate=100.0, duration_s=200.0, seed=0)
    reqs = spec.generate()
    p = np.array([r.prompt_tokens for r in reqs])
    o = np.array([r.output_tokens for r in reqs])
    assert p.min() >= 4 and p.max() <= 2048 and o.min() >= 4 and o.max() <= 2048
    # Means 161 / 338 before clipping (clipping at 2048 trims a little of the tail).
    assert p.mean() == pytest.approx(161, rel=0.1) and o.mean() == pytest.approx(338, rel=0.1)
    assert np.median(p) == pytest.approx(SHAREGPT_PROMPT.median, rel=0.1)
    assert np.median(o) == pytest.approx(SHAREGPT_OUTPUT.median, rel=0.1)
    fixed = LengthDist(50, 0.0).sample(np.random.default_rng(0), 10)
    assert fixed.tolist() == [50] * 10


def test_seeded_and_streams_independent():
    a = WorkloadSpec(MODELS, 20.0, 30.0, seed=7).generate()
    assert a == WorkloadSpec(MODELS, 20.0, 30.0, seed=7).generate()
    assert a != WorkloadSpec(MODELS, 20.0, 30.0, seed=8).generate()
    # More load on the whole stream: the first model's first requests keep their lengths.
    b = WorkloadSpec(MODELS, 40.0, 30.0, seed=7).generate()
    first = lambda rs: [(r.prompt_tokens, r.output_tokens) for r in rs if r.model == "m0"][:20]
    assert first(a) == first(b)


def test_trace_round_trip(tmp_path):
    reqs = WorkloadSpec(MODELS, 10.0, 5.0, seed=2).generate()
    path = write_trace(tmp_path / "t.jsonl", reqs)
    lines = path.read_text().splitlines()
    assert len(lines) == len(reqs)
    assert set(json.loads(lines[0])) == {"arrival_s", "model", "prompt_tokens", "output_tokens"}
    assert read_trace(path) == reqs


@pytest.mark.parametrize("bad, match", [
    ('{"arrival_s": 0.5, "model": "a", "prompt_tokens": 3}', "missing fields \\['output_tokens'\\]"),
    ('{"arrival_s": 0.5, "model": "a", "prompt_tokens": 3, "output_tokens": 2, "x": 1}',
     "unknown fields \\['x'\\]"),
    ('{"arrival_s": -1, "model": "a", "prompt_tokens": 3, "output_tokens": 2}', "arrival_s"),
    ('{"arrival_s": 1, "model": "a", "prompt_tokens": 0, "output_tokens": 2}', "prompt_tokens"),
    ('{"arrival_s": 1, "model": "a", "prompt_tokens": 2.5, "output_tokens": 2}', "prompt_tokens"),
    ('{"arrival_s": 1, "model": "", "prompt_tokens": 2, "output_tokens": 2}', "model"),
    ('[1, 2, 3]', "expected a JSON object"),
    ('{"arrival_s": 1,', "not JSON"),
])
def test_bad_trace_line_names_the_line(tmp_path, bad, match):
    good = json.dumps(Request(0.0, "a", 3, 2).to_dict())
    p = tmp_path / "bad.jsonl"
    p.write_text(f"{good}\n\n{good}\n{bad}\n")
    with pytest.raises(ValueError, match=match) as e:
        read_trace(p)
    assert "bad.jsonl:4:" in str(e.value)


def test_spec_validation():
    with pytest.raises(ValueError, match="each once"):
        WorkloadSpec(("a", "a"), 1.0, 1.0)
    with pytest.raises(ValueError, match="total_rate"):
        WorkloadSpec(("a",), 0.0, 1.0)
    with pytest.raises(ValueError, match="cv"):
        WorkloadSpec(("a",), 1.0, 1.0, cv=0.0)


def test_drift_moves_the_top_rate_round_the_models_each_phase():
    spec = WorkloadSpec(MODELS, total_rate=60.0, duration_s=400.0, alpha=1.0, seed=5,
                        shift_s=100.0)
    ranked = power_law_rates(4, 60.0, 1.0)
    phases = spec.phases()
    assert [(a, b) for a, b, _ in phases] == [(0, 100), (100, 200), (200, 300), (300, 400)]
    for k, (_, _, rates) in enumerate(phases):
        assert rates[k] == ranked[0] and rates[(k + 1) % 4] == ranked[1]
        assert sorted(rates) == sorted(ranked)
    # four phases: every model is top once, so the averages are equal
    assert list(spec.mean_rates().values()) == pytest.approx([15.0] * 4)
    reqs = spec.generate()
    for k, (t0, t1, rates) in enumerate(phases):
        for i, m in enumerate(MODELS):
            n = sum(r.model == m and t0 <= r.arrival_s < t1 for r in reqs)
            want = rates[i] * (t1 - t0)
            assert abs(n - want) < 4 * want ** 0.5 + 1, (k, m, n, want)
    assert [r.arrival_s for r in reqs] == sorted(r.arrival_s for r in reqs)
    # a part phase at the end, and the averages weight phases by their length
    short = WorkloadSpec(MODELS, 60.0, 150.0, alpha=1.0, shift_s=100.0)
    assert [(a, b) for a, b, _ in short.phases()] == [(0, 100), (100, 150)]
    assert short.mean_rates()["m0"] == pytest.approx((ranked[0] * 100 + ranked[3] * 50) / 150)
    # without drift: one phase, the plain rates, the same stream as before
    flat = WorkloadSpec(MODELS, 60.0, 150.0, alpha=1.0, seed=5)
    assert flat.mean_rates() == flat.rates() and len(flat.phases()) == 1
    assert spec.describe()["shift_s"] == 100.0
    with pytest.raises(ValueError, match="shift_s"):
        WorkloadSpec(MODELS, 1.0, 1.0, shift_s=0.0)
