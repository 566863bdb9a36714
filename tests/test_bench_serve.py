"""``python -m fineserve_jax.bench serve`` end to end against a fake streaming server.

The fake (Starlette on uvicorn, loopback, a thread of this process) streams ``max_tokens``
one-token chunks: the first after ``FIRST_DELAY``, the rest ``TOKEN_DELAY`` apart. Model
``fast`` answers, ``busy`` answers 429, ``broken`` sends one token and then an error event.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from fineserve_jax.bench import serve as bench
from fineserve_jax.bench.__main__ import main

FIRST_DELAY, TOKEN_DELAY = 0.15, 0.03
MODELS = ("fast", "busy", "broken")
FIELDS = {"model", "max_tokens", "temperature", "stream", "stream_options", "ignore_eos"}
SEEN: list[dict] = []  # every request body the fake accepted


def _event(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def fake_app() -> Starlette:
    async def models(request):
        return JSONResponse({"object": "list", "data": [
            {"id": m, "object": "model", "max_model_len": 512, "device": "fake"} for m in MODELS]})

    async def generate(request):
        body = await request.json()
        chat_or_prompt = {"messages"} if request.url.path.endswith("/chat/completions") \
            else {"prompt"}
        unknown = set(body) - FIELDS - chat_or_prompt
        if unknown:  # as strict as our server: an unknown field is a 400
            return JSONResponse({"error": {"message": f"unknown {sorted(unknown)}"}},
                                status_code=400)
        SEEN.append(body)
        chat = request.url.path.endswith("/chat/completions")
        if body["model"] == "busy":
            return JSONResponse({"error": {"message": "too many requests", "type": "rate"}},
                                status_code=429)
        n = body["max_tokens"]
        prompt = body["messages"][0]["content"] if chat else body["prompt"]

        def chunk(text, finish):
            c = ({"index": 0, "delta": {"content": text}, "finish_reason": finish} if chat
                 else {"index": 0, "text": text, "finish_reason": finish})
            return _event({"object": "chunk", "choices": [c]})

        async def events():
            if chat:  # OpenAI's first chat chunk: the role, no text
                yield _event({"choices": [{"index": 0, "delta": {"role": "assistant",
                                                                  "content": ""}}]})
            await asyncio.sleep(FIRST_DELAY)
            for i in range(n):
                if i:
                    await asyncio.sleep(TOKEN_DELAY)
                yield chunk(f" t{i}", "length" if i == n - 1 else None)
                if body["model"] == "broken":
                    yield _event({"error": {"message": "engine died", "type": "server_error"}})
                    yield "data: [DONE]\n\n"
                    return
            if body["stream_options"]["include_usage"]:
                yield _event({"choices": [], "usage": {"prompt_tokens": len(prompt.split()),
                                                       "completion_tokens": n}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/models", models),
                             Route("/v1/completions", generate, methods=["POST"]),
                             Route("/v1/chat/completions", generate, methods=["POST"])])


@pytest.fixture(scope="module")
def url():
    server = uvicorn.Server(uvicorn.Config(fake_app(), host="127.0.0.1", port=0,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def _run(url, tmp_path, *extra) -> dict:
    out = tmp_path / "serve.json"
    assert main(["serve", "--url", url, "--prompt-tokenizer", "words", "--prompt-len", "12",
                 "--prompt-sigma", "0", "--output-len", "6", "--output-sigma", "0",
                 "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_counts_latencies_and_failures(url, tmp_path, capsys):
    SEEN.clear()
    rec = _run(url, tmp_path, "--num-requests", "9", "--rate", "inf", "--ttft-slo", "5",
               "--tpot-slo", "5", "--api-key", "secret")
    assert [m["id"] for m in rec["server"]["models"]["data"]] == list(MODELS)
    s = rec["summary"]
    assert s["all"]["submitted"] == 9 and s["all"]["completed"] == 3 and s["all"]["failed"] == 6
    fast, busy, broken = (s["per_model"][m] for m in MODELS)
    assert fast["completed"] == 3 and fast["failed"] == 0 and fast["errors"] == {}
    assert busy["completed"] == 0 and busy["errors"] == {"HTTP 429": 3}
    assert broken["completed"] == 0 and broken["errors"] == {"error event": 3}
    assert fast["output_tokens"] == 18 and fast["short_outputs"] == 0
    assert fast["prompt_tokens"] == 3 * 12  # the fake counts words; prompts are 12 words
    for q in ("p50", "p90", "p99"):
        assert FIRST_DELAY * 0.9 <= fast["ttft_s"][q] <= FIRST_DELAY + 2.0
        assert TOKEN_DELAY * 0.8 <= fast["tpot_s"][q] <= TOKEN_DELAY + 0.5
    assert TOKEN_DELAY * 0.5 <= fast["itl_s"]["p50"] <= TOKEN_DELAY + 0.5
    assert fast["e2e_s"]["p50"] >= FIRST_DELAY + 5 * TOKEN_DELAY * 0.8
    assert busy["ttft_s"]["p50"] is None and busy["output_tok_s"] == 0
    assert s["all"]["slo"]["attainment"] == pytest.approx(3 / 9)
    assert fast["slo"]["attainment"] == 1.0 and busy["slo"]["attainment"] == 0.0
    assert rec["wall_s"] >= FIRST_DELAY + 5 * TOKEN_DELAY * 0.8
    assert fast["output_tok_s"] == pytest.approx(18 / rec["wall_s"])
    reqs = rec["requests"]
    assert [r["model"] for r in reqs] == list(MODELS) * 3  # round-robin
    for r in reqs:
        if r["model"] == "fast":
            assert r["error"] is None and r["completion_tokens"] == 6
            assert len(r["chunk_s"]) == 6 and r["chunk_s"][0] == r["first_s"]
            assert r["ttft_s"] == pytest.approx(r["first_s"] - r["send_s"])
            assert r["tpot_s"] == pytest.approx((r["end_s"] - r["first_s"]) / 5)
    assert "--api-key secret" in rec["command"] and rec["benchmark"] == "serve"
    assert len(SEEN) == 9 and all(b["ignore_eos"] is True and b["temperature"] == 0
                                  and b["stream"] for b in SEEN)
    table = capsys.readouterr().out
    assert "fast" in table and "HTTP 429 x3" in table


def test_trace_saved_and_replayed_on_chat(url, tmp_path):
    trace = tmp_path / "trace.json"
    first = _run(url, tmp_path, "--num-requests", "4", "--rate", "40", "--models", "fast",
                 "--seed", "3", "--save-trace", str(trace))
    rows = json.loads(trace.read_text())
    assert [sorted(r) for r in rows] == [["arrival_s", "max_tokens", "model", "prompt"]] * 4
    assert rows[0]["arrival_s"] == 0 and rows[-1]["arrival_s"] > 0
    assert all(len(r["prompt"].split()) == 12 for r in rows)
    SEEN.clear()
    again = _run(url, tmp_path, "--trace", str(trace), "--endpoint", "chat", "--no-ignore-eos")
    assert len(SEEN) == 4 and not any("ignore_eos" in b for b in SEEN)
    assert "--no-ignore-eos" in again["command"]
    assert again["workload"] == {"source": "trace", "trace": str(trace)}
    assert again["summary"]["all"]["completed"] == 4
    for a, b in zip(first["requests"], again["requests"]):
        assert a["arrival_s"] == b["arrival_s"] and a["max_tokens"] == b["max_tokens"]
        assert b["completion_tokens"] == 6 and b["send_s"] >= b["arrival_s"] - 1e-3
        assert b["ttft_s"] >= FIRST_DELAY * 0.9  # the role-only chunk is not a token


def test_workload_is_seeded_and_shaped():
    w = bench.Workload(num_requests=4000, rate=4.0, seed=1)
    gaps = np.diff(w.arrivals())
    assert np.array_equal(w.arrivals(), bench.Workload(num_requests=4000, rate=4.0,
                                                       seed=1).arrivals())
    assert gaps.mean() == pytest.approx(0.25, rel=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.1)  # Poisson
    bursty = np.diff(bench.Workload(num_requests=4000, rate=4.0, cv=3.0).arrivals())
    assert bursty.std() / bursty.mean() == pytest.approx(3.0, rel=0.25)
    assert not bench.Workload(num_requests=5, rate=float("inf")).arrivals().any()
    picks = w.models(["a", "b"], [3, 1])
    assert picks.count("a") / len(picks) == pytest.approx(0.75, abs=0.05)
    assert w.models(["a", "b"], None)[:4] == ["a", "b", "a", "b"]
    p, o = bench.Workload(num_requests=5, prompt_sigma=0, output_sigma=0, prompt_len=30,
                          output_len=7).lengths()
    assert p.tolist() == [30] * 5 and o.tolist() == [7] * 5
    with pytest.raises(ValueError):
        bench.Workload(rate=0)


def test_workload_drifts_from_model_to_model():
    w = bench.Workload(num_requests=3000, rate=10.0, seed=2, shift_s=100.0)
    assert w.arrivals()[-1] > 250  # at least three phases
    names = ["a", "b", "c"]
    for m, t in zip(w.models(names, [1, 0, 0]), w.arrivals()):
        assert m == names[int(t // 100) % 3]  # phase k: model k mod n has the top weight
    picks = w.models(names, [3, 1, 0])
    for k in range(3):
        got = [m for m, t in zip(picks, w.arrivals()) if int(t // 100) == k]
        assert got.count(names[k]) / len(got) == pytest.approx(0.75, abs=0.05)
        assert names[(k + 2) % 3] not in got  # the weight-0 model moves on too
    assert w.models(names, [3, 1, 0]) == picks  # seeded
    with pytest.raises(ValueError, match="give weights"):
        w.models(names, None)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="shift_s"):
            bench.Workload(shift_s=bad)


def test_phases_of_a_drifting_run(url, tmp_path, capsys):
    rec = _run(url, tmp_path, "--num-requests", "12", "--rate", "20", "--models", "fast",
               "busy", "--model-weights", "1", "0", "--shift-s", "0.2", "--ttft-slo", "5",
               "--no-chunk-times")
    reqs, phases = rec["requests"], rec["phases"]
    assert not any("chunk_s" in r for r in reqs)  # left out of the record, after the ITLs
    assert rec["summary"]["per_model"]["fast"]["itl_s"]["p50"] > 0
    assert rec["workload"]["shift_s"] == 0.2 and len(phases) >= 2
    assert sum(sum(p["requests"].values()) for p in phases) == 12
    for p in phases:  # even phases all 'fast' (served), odd ones all 'busy' (429)
        want = "fast" if p["phase"] % 2 == 0 else "busy"
        mine = [r for r in reqs if int(r["arrival_s"] // 0.2) == p["phase"]]
        assert p["requests"] == {want: len(mine)} and {r["model"] for r in mine} == {want}
        a = p["summary"]["all"]
        assert a["submitted"] == len(mine) and a["failed"] == (len(mine) if want == "busy" else 0)
        assert a["slo"]["attainment"] == (1.0 if want == "fast" else 0.0)
        assert p["start_s"] == pytest.approx(0.2 * p["phase"]) and p["end_s"] > p["start_s"]
    assert "phase 0 (0-0.2 s): fast" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="give them"):
        _run(url, tmp_path, "--shift-s", "1")
    with pytest.raises(SystemExit, match="--shift-s must be"):
        _run(url, tmp_path, "--model-weights", "1", "1", "1", "--shift-s", "0")


def test_summary_formulas():
    def rec(model, send, first, end, tokens, error=None):
        chunks = [] if first is None else list(np.linspace(first, end, tokens))
        return {"model": model, "arrival_s": send, "send_s": send, "first_s": first,
                "end_s": end, "chunk_s": chunks, "completion_tokens": tokens,
                "max_tokens": 11, "prompt_tokens": 5, "error": error}

    recs = [rec("a", 0.0, 0.5, 1.5, 11), rec("a", 1.0, 1.2, 3.2, 11),
            rec("b", 0.0, None, 0.1, 0, "HTTP 429: busy")]
    s = bench.summary(recs, wall_s=4.0, ttft_slo=0.3, tpot_slo=0.15)
    a = s["per_model"]["a"]
    assert a["ttft_s"]["p50"] == pytest.approx(0.35) and a["tpot_s"]["p50"] == pytest.approx(0.15)
    assert a["e2e_s"]["mean"] == pytest.approx(1.85)
    assert a["itl_s"]["p50"] == pytest.approx(0.15)  # gaps 0.1 and 0.2, ten of each
    assert a["output_tok_s"] == pytest.approx(22 / 4) and a["req_s"] == pytest.approx(0.5)
    assert a["slo"]["ttft_attainment"] == 0.5 and a["slo"]["tpot_attainment"] == 0.5
    assert a["slo"]["attainment"] == 0.0  # one meets TTFT only, the other TPOT only
    assert s["all"]["failed"] == 1 and s["all"]["errors"] == {"HTTP 429": 1}
    assert s["all"]["slo"]["ttft_attainment"] == pytest.approx(1 / 3)


def test_each_model_is_judged_by_its_own_targets():
    # Without --ttft-slo / --tpot-slo the load client takes each model's targets from
    # /v1/models; a flag replaces that target for every model; "all" counts the requests
    # of the models that have a target, each against its own.
    served = {"data": [{"id": "a", "ttft_slo_ms": 300.0, "tpot_slo_ms": 150.0},
                       {"id": "b", "ttft_slo_ms": 1000.0},
                       {"id": "c"}]}
    assert bench.model_targets(served) == {"a": (0.3, 0.15), "b": (1.0, None),
                                           "c": (None, None)}
    assert bench.model_targets({"data": [{"id": "x", "ttft_slo_ms": "fast",
                                          "tpot_slo_ms": -1}]}) == {"x": (None, None)}
    assert bench.model_targets(served, tpot_slo=0.05) == {"a": (0.3, 0.05), "b": (1.0, 0.05),
                                                          "c": (None, 0.05)}

    def rec(model, first, end, tokens):
        return {"model": model, "arrival_s": 0.0, "send_s": 0.0, "first_s": first,
                "end_s": end, "chunk_s": list(np.linspace(first, end, tokens)),
                "completion_tokens": tokens, "max_tokens": tokens, "prompt_tokens": 5,
                "error": None}
    recs = [rec("a", 0.2, 1.2, 11),  # TTFT 0.2, TPOT 0.1: meets a's targets
            rec("a", 0.5, 1.5, 11),  # TTFT 0.5: misses a's
            rec("b", 0.5, 5.5, 11),  # TTFT 0.5 <= 1.0, no TPOT target: meets b's
            rec("c", 9.0, 9.5, 2)]  # no target: not judged
    s = bench.summary(recs, wall_s=10.0, targets=bench.model_targets(served))
    assert s["per_model"]["a"]["slo"]["attainment"] == 0.5
    assert s["per_model"]["b"]["slo"]["attainment"] == 1.0
    assert "slo" not in s["per_model"]["c"]
    a = s["all"]["slo"]
    assert (a["requests"], a["met"], a["attainment"]) == (3, 2, pytest.approx(2 / 3))
    assert a["ttft_s"] == a["tpot_s"] == "per model"
    text = bench.table({"summary": s, "wall_s": 10.0, "server": {"models": served}})
    assert "SLO: each model's targets (a TTFT <= 0.3 s, TPOT <= 0.15 s; b TTFT <= 1.0 s" in text
    row_c = next(line for line in text.splitlines() if line.startswith("c "))
    assert row_c.rstrip().endswith("-")
    # One target for every model: the figures over all are those of every request.
    same = bench.summary(recs[:2], wall_s=10.0, ttft_slo=0.3, tpot_slo=0.15)
    assert same["all"]["slo"]["attainment"] == 0.5 and same["all"]["slo"]["ttft_s"] == 0.3


def test_resimulate_reproduces_a_record_and_runs_the_headroom_ablation(tmp_path, capsys,
                                                                       monkeypatch):
    # The 1.2 req/s runs of the record written after the device-wide headroom: simulated
    # again from the record alone (its profile, SLOs and config, the models' KV formats),
    # the engine's rule reproduces the recorded simulation; the own-headroom ablation
    # changes fixed pages (0.700 -> 0.680) and leaves static partitions alone.
    from dataclasses import asdict
    from pathlib import Path

    import serve

    tool = _resimulate_tool()
    root = Path(__file__).resolve().parents[1]
    rec = json.loads((root / "benchmarks/results/serve_systems_cpu_device_headroom.json")
                     .read_text())
    rec["runs"] = [r for r in rec["runs"] if r["rate"] == 1.2
                   and r["system"] in ("static+fcfs", "fixed-page+fcfs")]
    assert "kv_formats" not in rec  # written before records kept them: the models load
    path = tmp_path / "rec.json"
    path.write_text(json.dumps(rec))
    assert tool.main([str(path)]) == 0
    rows = _rows(capsys.readouterr().out)
    # columns: recorded, device-wide, own only; each "attainment / tok/s"
    assert rows["static+fcfs"] == ["0.640", "/", "12.45"] * 3
    assert rows["fixed-page+fcfs"] == ["0.700", "/", "12.38"] * 2 + ["0.680", "/", "12.29"]
    # A record that keeps its KV formats (as --out-systems writes them now) is simulated
    # from them alone, with the same figures.
    fmts = tool.block_formats(rec, 16)
    rec["kv_formats"] = {n: asdict(f) for n, f in fmts.items()}
    path.write_text(json.dumps(rec))

    def no_load(*a, **k):
        raise AssertionError("the record's KV formats should be used")
    monkeypatch.setattr(serve, "load_models", no_load)
    assert tool.main([str(path)]) == 0
    assert _rows(capsys.readouterr().out) == rows
    # Twice the KV pool: both FCFS baselines serve more of this trace in time, so memory
    # held them back at 1.2 req/s (the other columns as before).
    assert tool.main([str(path), "--kv-budget-scale", "2"]) == 0
    more = _rows(capsys.readouterr().out)
    assert {k: v[:9] for k, v in more.items()} == rows
    assert more["static+fcfs"][9:] == ["0.860", "/", "12.70"]
    assert more["fixed-page+fcfs"][9:] == ["0.860", "/", "12.70"]
    with pytest.raises(SystemExit):
        tool.main([str(path), "--kv-budget-scale", "0"])
    # A system the record did not run, at each of its rates: the shared pool under FCFS
    # serves more of the 1.2 req/s trace than static partitions (0.640), less than twice
    # the partitions' memory (0.860).
    assert tool.main([str(path), "--systems", "kvslab+fcfs", "--kv-budget-scale", "2"]) == 0
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines()
             if ln.startswith("kvslab+fcfs")]
    assert [ln[1] for ln in lines] == ["0.3", "0.6", "0.9", "1.2"]
    assert lines[-1][2:] == ["-", "0.780", "/", "12.73", "0.780", "/", "12.73",
                             "0.860", "/", "12.70"]


def _resimulate_tool():
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("resimulate_serve",
                                                  root / "benchmarks" / "resimulate_serve.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _rows(out: str) -> dict:
    return {line.split()[0]: line.split()[2:] for line in out.splitlines()
            if line.startswith(("static", "fixed"))}


def test_slos_from_an_earlier_record(tmp_path, monkeypatch):
    # --slos-from judges a systems run against an earlier record's targets, not its own
    # start-up profile's; a bad record is named before any engine starts.
    from pathlib import Path

    from fineserve_jax.bench import serve_systems as S
    from schedulers.batching import SLO

    root = Path(__file__).resolve().parents[1]
    src = root / "benchmarks/results/serve_systems_cpu_admission.json"
    want = json.loads(src.read_text())["slos"]
    got = S.recorded_slos(src)
    assert got == {n: SLO(**want[n]) for n in S.MODELS}
    assert got["smollm2-135m-bf16"] == SLO(ttft_s=0.9180631849994825,
                                           tpot_s=0.38679676999890944)

    class Args:  # the scales would give other targets; the record's win
        slos_from, ttft_scale, ttft_slack_s, tpot_scale = str(src), 1.0, 0.0, 1.0
        prompt_mean, output_mean, max_prefill_tokens = 64.0, 16.0, 64
    assert S.model_slos(Args, costs={}) == got

    def bad(obj, match):
        f = tmp_path / "bad.json"
        f.write_text(obj if isinstance(obj, str) else json.dumps(obj))
        with pytest.raises(SystemExit, match=match):
            S.recorded_slos(f)
    bad("{oops", "cannot read a JSON record")
    bad({"runs": []}, "no 'slos' in it")
    bad({"slos": {"smollm2-135m-bf16": want["smollm2-135m-bf16"]}},
        "no SLO for 'smollm2-135m-fireq-g32'")
    bad({"slos": {**want, "smollm2-135m-bf16": {"ttft_s": 0.5, "tpot_s": -1}}},
        "needs positive ttft_s and tpot_s")
    bad({"slos": {**want, "smollm2-135m-bf16": {"ttft_s": "fast", "tpot_s": 0.1}}},
        "needs positive ttft_s and tpot_s")
    with pytest.raises(SystemExit, match="cannot read"):
        S.recorded_slos(tmp_path / "missing.json")

    # The whole command fails on a bad record before it starts an engine.
    def no_engines(*a, **k):
        raise AssertionError("engines started before the record was checked")
    monkeypatch.setattr(S, "build_engines", no_engines)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit, match="no 'slos'"):
        main(["serve", "--slos-from", str(tmp_path / "bad.json"),
              "--out-systems", str(tmp_path / "out.json")])
    # So does a sweep whose trace at some rate has no request at all.
    with pytest.raises(SystemExit, match="no request arrives in 5 s at 0.01 req/s:"):
        main(["serve", "--rates", "0.01", "4", "--duration", "5",
              "--out-systems", str(tmp_path / "out.json")])


def test_repeated_runs_take_turns_and_are_averaged(tmp_path):
    # --repeats: every system replays each rate's trace N times, the systems taking turns
    # with the order rotated each round; the record keeps the mean and every run.
    from fineserve_jax.bench import serve_figures as S

    order = list(S.run_order([1.0, 2.0], ["a", "b", "c"], repeats=3))
    assert order[:9] == [(1.0, 0, "a"), (1.0, 0, "b"), (1.0, 0, "c"),
                         (1.0, 1, "b"), (1.0, 1, "c"), (1.0, 1, "a"),
                         (1.0, 2, "c"), (1.0, 2, "a"), (1.0, 2, "b")]
    assert [x[0] for x in order[9:]] == [2.0] * 9
    assert list(S.run_order([1.0], ["a", "b"])) == [(1.0, 0, "a"), (1.0, 0, "b")]

    def run(system, rate, att, tok):
        return {"system": system, "rate": rate,
                "summary": {"attainment": att, "output_tok_s": tok}}
    runs = [run("a", 1.0, 1.0, 10.0), run("a", 1.0, 0.8, 14.0),
            run("a", 2.0, 0.9, 20.0), run("a", 2.0, 0.6, 18.0),
            run("b", 1.0, 1.0, 11.0), run("b", 2.0, 1.0, 21.0)]
    got = S.per_system_figures(runs, [1.0, 2.0], ["a", "b"])
    assert got["a"]["attainment"] == pytest.approx([0.9, 0.75])
    assert got["a"]["output_tok_s"] == pytest.approx([12.0, 19.0])
    assert got["a"]["attainment_runs"] == [[1.0, 0.8], [0.9, 0.6]]
    assert got["a"]["output_tok_s_runs"] == [[10.0, 14.0], [20.0, 18.0]]
    assert (got["a"]["goodput_90"], got["a"]["goodput_99"]) == (1.0, None)  # of the means
    assert got["b"] == {"attainment": [1.0, 1.0], "output_tok_s": [11.0, 21.0],
                        "goodput_90": 2.0, "goodput_99": 2.0}  # one run each: no *_runs
    with pytest.raises(ValueError, match="b: no run at 3 req/s"):
        S.per_system_figures(runs + [run("a", 3.0, 1.0, 30.0)], [1.0, 3.0], ["a", "b"])
    assert S.ratios(got, [1.0, 2.0]) == []  # neither fineserve nor static+fcfs ran
    # With SLO-meeting tokens/s in every run's summary it is averaged too, and the record's
    # FineServe / static ratios are of the means.
    for r, good in zip(runs, [10.0, 7.0, 20.0, 9.0, 11.0, 21.0]):
        r["summary"]["slo_output_tok_s"] = good
    got = S.per_system_figures(runs, [1.0, 2.0], ["a", "b"])
    assert got["a"]["slo_output_tok_s"] == pytest.approx([8.5, 14.5])
    assert got["a"]["slo_output_tok_s_runs"] == [[10.0, 7.0], [20.0, 9.0]]
    q = S.ratios(got, [1.0, 2.0], ours="a", base="b")
    assert [x["rate"] for x in q] == [1.0, 2.0]
    assert q[1]["attainment"] == pytest.approx(0.75)
    assert q[0]["output_tok_s"] == pytest.approx(12 / 11)
    assert q[1]["slo_output_tok_s"] == pytest.approx(14.5 / 21)
    assert S.cell(0.75, [0.9, 0.6], ".0%") == "75% (60%-90%)"
    assert S.cell(12.0, [12.0], ".1f") == "12.0"

    # The record's plot draws the runs' range as a band under each mean.
    rec = {"rates": [1.0, 2.0], "per_system": got, "device": "cpu"}
    png = S.plot(rec, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with pytest.raises(SystemExit, match="--repeats must be >= 1, got 0"):
        main(["serve", "--repeats", "0", "--out-systems", str(tmp_path / "out.json")])


def test_systems_run_summary():
    # One run's figures from its requests (serve_systems.summarize): a request meets its
    # SLOs only when it finished with every token wanted; dropped ones are misses.
    from fineserve_jax.bench import serve_systems as S
    from schedulers.batching import SLO

    def rec(model, arrival, first, end, n, reason="length", want=None):
        return {"model": model, "arrival_s": arrival, "first_token_s": first,
                "finished_s": end, "ttft_s": None if first is None else first - arrival,
                "output_tokens": n, "want_tokens": n if want is None else want,
                "finish_reason": reason, "preemptions": 0}
    recs = [rec("a", 0.0, 0.5, 2.5, 5),   # TTFT 0.5, TPOT 0.5: meets both
            rec("a", 1.0, 2.0, 3.0, 3),   # TTFT 1.0: misses
            rec("b", 2.0, 2.1, 4.0, 20),  # TPOT 0.1: meets
            rec("b", 3.0, None, None, 0, "dropped", want=8)]
    s = S.summarize(recs, {"a": SLO(ttft_s=0.6, tpot_s=0.6), "b": SLO(ttft_s=1, tpot_s=0.2)})
    assert s["requests"] == 4 and s["dropped"] == 1
    assert s["attainment"] == 0.5
    assert s["output_tokens"] == 28
    assert s["output_tok_s"] == pytest.approx(28 / 4.0)  # first arrival to last finish
    assert s["slo_output_tok_s"] == pytest.approx(25 / 4.0)
    assert s["ttft_s"]["p50"] == pytest.approx(0.5)
    assert s["tpot_s"]["p50"] == pytest.approx(0.5)  # of 0.5, 0.5 and 0.1
