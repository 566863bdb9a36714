"""``python -m fineserve_jax.bench serve`` (no ``--url``): serving systems on the real engine.

Two SmolLM2-135M tenants on one device (``smollm2-135m-bf16`` and
``smollm2-135m-fireq-g32``, the default ``serve.py`` models), four systems, every one
replaying the same trace at each request rate, in one run:

=================  ==========================  ==========================================
system             KV memory                   batching (``schedulers.local``)
=================  ==========================  ==========================================
fineserve          KV Slab (one shared pool)   SLO-aware adaptive batching, rejects misses
static+fcfs        static per-model partitions FCFS (one engine per model, as vLLM)
fixed-page+fcfs    one pool of fixed pages     FCFS (MuxServe-like memory)
prism              KV Slab (one shared pool)   Prism-style deadline checks in queue order
=================  ==========================  ==========================================

Two ablations run when ``--systems`` names them: ``kvslab+fcfs`` (KV Slab, FCFS) and
``static+fineserve`` (static partitions, SLO-aware batching); and ``fineserve+best-effort``,
FineServe serving the requests it predicts to miss their TTFT SLO after the others instead
of shedding them (``serve.py --on-slo-miss best-effort``).

Workload (``schedulers.workload.WorkloadSpec``): Poisson arrivals (``--cv`` for Gamma)
over ``--duration`` seconds, rates split between the models by a power law (``--alpha``;
``--shift-s S``: the ranking moves on by one model every S seconds), lognormal prompt and
output lengths (``--prompt-len``/``--output-len`` means, sigmas 0.6 and 0.5, clipped so
a sequence fits ``--max-model-len``). Prompts are token ids cut
from the packaged Wikipedia text; generation is greedy with ``ignore_eos``, so every
request generates its drawn output length.

SLOs: the engine profiles both models' step shapes at start (``Engine.profile_costs``);
each model's TTFT SLO is ``--ttft-scale`` times the solo prefill time of a mean-length
prompt plus ``--ttft-slack-s`` and its TPOT SLO ``--tpot-scale`` times the solo decode time at a
mean context (``BENCHMARKS.md``: "a scale times the model's solo latency").

Each (system, rate) run submits every request at its arrival time to the running
engine thread and waits for all to finish. Measured per request from the engine's
timestamps (``RequestHandle.metrics``): TTFT, TPOT, whether both SLOs were met (a
dropped request is a miss), and output tokens. Throughput is output tokens over the
span from the first arrival to the last finish (SLO-meeting throughput: the tokens of the
requests that met both SLOs over the same span). Goodput: the highest rate at which the
attainment is >= 90% (>= 99%). ``--repeats N`` replays every trace N times per system,
the systems taking turns, and reports each figure's mean with its lowest and highest run;
the record also keeps FineServe's figures over static+fcfs's at each rate.

Beside each run the discrete-event simulator (``schedulers.simulator``) replays the same
trace with the same allocator, local scheduler, limits and the profiled cost model; the
record keeps its predicted TTFT p50 and throughput next to the measured ones.

On a CPU only ratios between systems in the same run count (``common.CPU_FOOTER``).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from fineserve_jax.bench.serve_figures import (
    cell,
    per_system_figures,
    plot,
    ratios,
    rel_error,
    run_order,
    within,
)

SYSTEMS = {  # name: (allocator, local scheduler, what it does with a predicted TTFT miss)
    "fineserve": ("kvslab", "fineserve", "reject"),
    "static+fcfs": ("static", "fcfs", "reject"),
    "fixed-page+fcfs": ("fixed-page", "fcfs", "reject"),
    "prism": ("kvslab", "prism", "reject"),
}
DEFAULT_SYSTEMS = list(SYSTEMS)
# Run when named in --systems: the ablations, one of FineServe's two parts each, and
# FineServe serving its predicted misses after the others instead of shedding them.
SYSTEMS |= {"kvslab+fcfs": ("kvslab", "fcfs", "reject"),
            "static+fineserve": ("static", "fineserve", "reject"),
            "fineserve+best-effort": ("kvslab", "fineserve", "best-effort")}
MODELS = ("smollm2-135m-bf16", "smollm2-135m-fireq-g32")
MAX_PREFILL_SEQS = 4  # rows of one prefill step (EngineConfig's default)
# What the record keeps of the replays beside the main one (that one keeps every TTFT).
SIM_BRIEF = ("attainment", "output_tok_s", "ttft_p50_s", "dropped")

def add_arguments(p) -> None:
    """Options of the systems comparison (the ones the load client does not have)."""
    g = p.add_argument_group("systems comparison (without --url)")
    g.add_argument("--systems", nargs="+", default=DEFAULT_SYSTEMS, choices=list(SYSTEMS),
                   help="systems to run (default: FineServe and the three baselines; "
                        "kvslab+fcfs and static+fineserve are ablations, one part each; "
                        "fineserve+best-effort serves the requests FineServe would shed "
                        "after the others)")
    g.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.45],
                   help="total request rates (req/s) to sweep")
    g.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per run")
    g.add_argument("--alpha", type=float, default=0.0,
                   help="power-law exponent of the per-model rates (0 = equal)")
    g.add_argument("--prompt-mean", type=float, default=64.0, help="mean prompt tokens")
    g.add_argument("--output-mean", type=float, default=16.0, help="mean output tokens")
    g.add_argument("--max-model-len", type=int, default=512)
    g.add_argument("--max-seqs", type=int, default=16, help="running sequences per model")
    g.add_argument("--max-prefill-tokens", type=int, default=64,
                   help="tokens of one prefill step")
    g.add_argument("--kv-budget", type=int, default=12 * 2**20,
                   help="bytes of the device's KV pool, shared by both models")
    g.add_argument("--ttft-scale", type=float, default=5.0)
    g.add_argument("--ttft-slack-s", type=float, default=0.0,
                   help="seconds added to every TTFT SLO")
    g.add_argument("--tpot-scale", type=float, default=10.0)
    g.add_argument("--slos-from", metavar="RECORD",
                   help="judge every run against the SLOs of this earlier --out-systems "
                        "record instead of deriving them from this run's start-up profile "
                        "(the scales above are then unused): two runs on different days "
                        "then differ in machine and code, not in their targets")
    g.add_argument("--cost-calibration", type=float, default=0.05, metavar="WEIGHT",
                   help="engines correct their cost models online (EngineConfig."
                        "cost_calibration; 0: predict with the start-up profile only)")
    g.add_argument("--settle-s", type=float, default=30.0,
                   help="before the sweep, seconds of arrivals (its middle rate, another "
                        "seed, results discarded) each engine serves to settle that "
                        "correction")
    g.add_argument("--repeats", type=int, default=1, metavar="N",
                   help="replay each rate's trace N times per system, the systems taking "
                        "turns round by round (each round's order rotated one place), and "
                        "report the mean with the lowest and highest run: the engine's "
                        "run-to-run spread on a shared machine, beside the systems' "
                        "difference")
    g.add_argument("--drain-s", type=float, default=120.0,
                   help="after the last arrival, seconds to wait before aborting the rest")
    g.add_argument("--out-systems", default="benchmarks/results/serve_systems_cpu.json",
                   help="JSON record of the comparison (a PNG is written beside it)")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else None


def load_default_models():
    """The default ``serve.py`` models (``MODELS``): their specs by name, and each loaded
    as ``(model, precision)`` by name (the quantized one from the checkpoint cache)."""
    import serve

    specs = {m["name"]: m for m in serve.parse_args([]).models}
    loaded = serve.load_models(type("A", (), {"cache_dir": None})(),
                               [specs[n] for n in MODELS])
    return specs, loaded


def build_engines(args, allocators: set[str]):
    """One started engine per allocator (threads running), both models on each; the
    costs profiled on the first are shared with the others, and so is the device's speed
    factor (they run on one device: each engine's steps correct the others' predictions)."""
    import jax

    from checkpoints.cache import default_cache_dir
    from fineserve_jax.engine import Engine, EngineConfig
    from schedulers.batching import SLO
    from schedulers.calibration import DeviceSpeed

    # Compiled steps persist between runs (as serve.py does): a rerun skips most compiling.
    jax.config.update("jax_compilation_cache_dir", str(default_cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    specs, loaded = load_default_models()
    engines, costs = {}, {}
    speed = DeviceSpeed(weight=args.cost_calibration) if args.cost_calibration else None
    for alloc in sorted(allocators, key=lambda a: a != "kvslab"):
        cfg = EngineConfig(kv_budget_bytes=args.kv_budget, max_seqs=args.max_seqs,
                           max_model_len=args.max_model_len,
                           prefill_token_budget=args.max_prefill_tokens, allocator=alloc,
                           max_prefill_seqs=MAX_PREFILL_SEQS,
                           decode_buckets=(1, 4, args.max_seqs), prefill_row_buckets=(1, 4),
                           chunk_buckets=(32, args.max_prefill_tokens), profile_reps=5,
                           cost_calibration=args.cost_calibration)
        e = Engine(cfg, speed=speed)
        for name in MODELS:
            model, prec = loaded[name]
            e.add_model(name, model.config, model.params, model.tokenizer,
                        dtype=specs[name]["dtype"], precision=prec,
                        slo=None if costs else SLO(ttft_s=1e9), cost=costs.get(name))
        t0 = time.perf_counter()
        e.start()
        _log(f"engine {alloc}: started in {time.perf_counter() - t0:.0f} s")
        if not costs:  # the start-up profile (each engine corrects its own use of it)
            costs = {n: e.model_spec(n).cost for n in MODELS}
        engines[alloc] = e
    return engines, costs, {n: loaded[n][0].tokenizer for n in MODELS}


def recorded_slos(path) -> dict:
    """The SLOs of an earlier ``--out-systems`` record, one per benchmark model; a record
    that lacks them, or a target that is not a positive number of seconds, is named."""
    import json

    from schedulers.batching import SLO

    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--slos-from {path}: cannot read a JSON record ({e})") from None
    slos = rec.get("slos") if isinstance(rec, dict) else None
    if not isinstance(slos, dict):
        raise SystemExit(f"--slos-from {path}: no 'slos' in it (not a bench serve "
                         "--out-systems record)")
    out = {}
    for name in MODELS:
        if name not in slos:
            raise SystemExit(f"--slos-from {path}: no SLO for {name!r} (it has "
                             f"{sorted(slos)})")
        t = slos[name]
        vals = [t.get(k) if isinstance(t, dict) else None for k in ("ttft_s", "tpot_s")]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                   and math.isfinite(v) for v in vals):
            raise SystemExit(f"--slos-from {path}: {name!r} needs positive ttft_s and "
                             f"tpot_s (seconds), got {t!r}")
        out[name] = SLO(ttft_s=float(vals[0]), tpot_s=float(vals[1]))
    return out


def model_slos(args, costs) -> dict:
    """Each model's SLO: the ``--slos-from`` record's, else the scales times its solo
    latency in ``costs`` (the start-up profile)."""
    from schedulers.batching import SLO
    from schedulers.costmodel import solo_ttft

    if getattr(args, "slos_from", None):
        return recorded_slos(args.slos_from)
    out = {}
    for name, cost in costs.items():
        p = int(round(args.prompt_mean))
        ttft = solo_ttft(cost, p, args.max_prefill_tokens)
        tpot = cost.decode_time([p + int(args.output_mean) // 2])
        out[name] = SLO(ttft_s=args.ttft_scale * ttft + args.ttft_slack_s,
                        tpot_s=args.tpot_scale * tpot)
    return out


def workload(args, rate: float, duration_s: float | None = None, seed: int | None = None):
    from schedulers.workload import LengthDist, WorkloadSpec

    hi = args.max_model_len // 2
    return WorkloadSpec(models=MODELS, total_rate=rate,
                        duration_s=args.duration if duration_s is None else duration_s,
                        alpha=args.alpha, cv=args.cv,
                        prompt=LengthDist(args.prompt_mean, 0.6, 4, hi),
                        output=LengthDist(args.output_mean, 0.5, 2, hi - 1),
                        seed=args.seed if seed is None else seed,  # older records: no shift_s
                        shift_s=getattr(args, "shift_s", None))


def settle(args, engines: dict, toks) -> None:
    """Serve ``--settle-s`` seconds of another trace on every engine (FCFS, nothing
    recorded), so each starts the sweep with its cost correction settled, as a server that
    has been up a while has it."""
    from schedulers.local import make_local_scheduler

    rate = float(np.median(args.rates))
    reqs = workload(args, rate, args.settle_s, seed=args.seed + 1).generate()
    ids = prompt_ids(toks, reqs, args.seed + 1)
    for alloc, e in engines.items():
        e.scheduler = make_local_scheduler("fcfs")
        replay(e, reqs, ids, args.drain_s)
        _log(f"engine {alloc}: settled on {len(reqs)} requests at {rate:g}/s; cost "
             f"correction " + ", ".join(f"{n}: prefill x{f['prefill']:.2f} decode "
                                        f"x{f['decode']:.2f}" for n in MODELS
                                        for f in [e.cost_factors(n)]))


def prompt_ids(tokenizers, reqs, seed: int) -> list[list[int]]:
    from fineserve_jax.assets import corpus_text

    text = corpus_text()
    rng = np.random.default_rng(seed)
    out = []
    for r in reqs:
        tok = tokenizers[r.model]
        start = int(rng.integers(0, len(text) - 64 * r.prompt_tokens))
        ids = tok.encode(text[start:start + 8 * r.prompt_tokens + 64], add_special_tokens=False)
        while len(ids) < r.prompt_tokens:
            ids = ids + ids
        out.append(ids[:r.prompt_tokens])
    return out


def replay(engine, reqs, ids, drain_s: float) -> list[dict]:
    """Submit each request at its arrival time; wait for all; per-request records and how
    late the latest submission was."""
    from fineserve_jax.sampling import SamplingParams

    handles = []
    t0 = time.monotonic()
    lag = 0.0
    for r, p in zip(reqs, ids):
        wait = t0 + r.arrival_s - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        lag = max(lag, time.monotonic() - t0 - r.arrival_s)
        sp = SamplingParams(max_tokens=r.output_tokens, temperature=0.0, ignore_eos=True)
        handles.append(engine.submit(r.model, p, sp, sync=True))
    end = time.monotonic() + drain_s
    for h in handles:
        if not h.wait(max(0.0, end - time.monotonic())):
            h.abort()
    for h in handles:
        h.wait(10.0)
    out = []
    for r, h in zip(reqs, handles):
        m = h.metrics
        out.append({"model": r.model, "arrival_s": m.arrival - t0, "prompt_tokens": r.prompt_tokens,
                    "output_tokens": len(h.token_ids), "want_tokens": r.output_tokens,
                    "finish_reason": h.finish_reason,
                    "ttft_s": None if m.first_token is None else m.first_token - m.arrival,
                    "finished_s": None if m.finished is None else m.finished - t0,
                    "first_token_s": None if m.first_token is None else m.first_token - t0,
                    "preemptions": m.preemptions})
    return out, lag


def summarize(recs: list[dict], slos: dict) -> dict:
    """Attainment, throughput, latency percentiles of one run (all models).
    ``slo_output_tok_s``: the output tokens of the requests that met both SLOs over the
    same span as ``output_tok_s`` (what the simulator's figure of that name counts)."""
    from schedulers.batching import SLO, RequestMetrics

    met, ttfts, tpots, toks, good = 0, [], [], 0, 0
    dropped = sum(r["finish_reason"] == "dropped" for r in recs)
    for r in recs:
        ok = r["finish_reason"] == "length" and r["output_tokens"] == r["want_tokens"]
        if r["ttft_s"] is not None:
            ttfts.append(r["ttft_s"])
        if ok:
            toks += r["output_tokens"]
            n = r["output_tokens"]
            if n > 1:
                tpots.append((r["finished_s"] - r["first_token_s"]) / (n - 1))
            m = RequestMetrics(r["arrival_s"], None, r["first_token_s"], r["finished_s"])
            ok_slo = slos.get(r["model"], SLO()).met(m, n)
            met += ok_slo
            good += n if ok_slo else 0
    ends = [r["finished_s"] for r in recs if r["finished_s"] is not None]
    span = (max(ends) - min(r["arrival_s"] for r in recs)) if ends else math.nan
    return {"requests": len(recs), "attainment": met / len(recs) if recs else math.nan,
            "dropped": dropped, "output_tokens": toks,
            "output_tok_s": toks / span if span and span > 0 else 0.0,
            "slo_output_tok_s": good / span if span and span > 0 else 0.0,
            "ttft_s": {f"p{q}": _pct(ttfts, q) for q in (50, 90, 99)},
            "tpot_s": {f"p{q}": _pct(tpots, q) for q in (50, 90, 99)},
            "preemptions": sum(r["preemptions"] for r in recs)}


def simulate(args, system: str, reqs, costs, slos, block_formats, *,
             own_headroom: bool = False) -> dict:
    """The simulator's prediction for the same run: same trace, allocator, local
    scheduler, limits and the profiled step costs (``own_headroom``: the admission
    ablation of ``GroupSpec``)."""
    from schedulers.batching import BatchLimits
    from schedulers.simulator import FINISHED, GroupSpec, ModelSpec, simulate as sim

    alloc, sched, on_miss = SYSTEMS[system]
    limits = BatchLimits(args.max_seqs, MAX_PREFILL_SEQS, args.max_prefill_tokens)
    models = {n: ModelSpec(n, block_formats[n], limits, slos[n], max_model_len=args.max_model_len)
              for n in MODELS}
    group = GroupSpec("device", MODELS, args.kv_budget, allocator=alloc,
                      own_headroom=own_headroom)
    res = sim([group], models, lambda m, g: costs[m], reqs, scheduler=sched, on_miss=on_miss)
    recs = res.records
    ends = [r.finished for r in recs if r.finished is not None]
    toks = sum(r.generated for r in recs if r.status == FINISHED)
    span = max(ends) - min(r.arrival for r in recs) if ends else math.nan
    ttfts = [r.ttft for r in recs if r.ttft is not None]
    return {"attainment": sum(r.slo_met for r in recs) / len(recs),
            "output_tok_s": toks / span if span > 0 else 0.0,
            "ttft_p50_s": _pct(ttfts, 50),
            "dropped": sum(r.status == "dropped" for r in recs),
            "steps": {k: {"steps": g.steps, "prefill_steps": g.prefill_steps,
                          "busy_s": g.busy_s} for k, g in res.groups.items()},
            "ttft_s": [r.ttft for r in sorted(recs, key=lambda r: r.index)]}


def run_systems(args, command: str) -> int:
    from fineserve_jax.bench.common import CPU_FOOTER, format_table, write_json
    from fineserve_jax.bench.engine import git_state
    from fineserve_jax.engine.steplog import summarize as summarize_steps
    from schedulers.calibration import ScaledCost
    from schedulers.local import make_local_scheduler

    git = git_state()  # the code that runs, before anything can change under a long run
    # From a record, read (and a bad one refused) now, not after the engines' start-up.
    fixed = recorded_slos(args.slos_from) if args.slos_from else None
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    traces = {rate: workload(args, rate).generate() for rate in args.rates}
    if empty := [r for r, reqs in traces.items() if not reqs]:
        raise SystemExit(f"no request arrives in {args.duration:g} s at "
                         f"{', '.join(f'{r:g}' for r in empty)} req/s: raise --duration or "
                         "the rate")
    allocators = {SYSTEMS[s][0] for s in args.systems}
    engines, costs, toks = build_engines(args, allocators)
    any_engine = next(iter(engines.values()))
    formats = {n: any_engine.alloc.fmt(n) for n in MODELS}
    slos = fixed or model_slos(args, costs)
    for e in engines.values():
        for n, slo in slos.items():
            e.set_slo(n, slo)
    where = f" (from {args.slos_from})" if args.slos_from else ""
    _log(f"SLOs{where}: " + ", ".join(f"{n}: TTFT {s.ttft_s * 1e3:.0f} ms, "
                                      f"TPOT {s.tpot_s * 1e3:.0f} ms" for n, s in slos.items()))
    if args.settle_s > 0 and args.cost_calibration > 0:
        settle(args, engines, toks)
    runs = []
    ids = {rate: prompt_ids(toks, reqs, args.seed) for rate, reqs in traces.items()}
    by_profile = {}  # (system, rate): the start-up profile's replay, the same every round
    for rate, repeat, system in run_order(args.rates, args.systems, args.repeats):
        reqs = traces[rate]
        alloc, sched, on_miss = SYSTEMS[system]
        e = engines[alloc]
        e.scheduler = make_local_scheduler(sched, on_miss)
        learned = {n: e.cost_snapshot(n) for n in MODELS}  # before this run
        speed0 = e.speed.factor if e.speed is not None else None
        t0, m0 = time.perf_counter(), time.monotonic()
        recs, lag = replay(e, reqs, ids[rate], args.drain_s)
        s = summarize(recs, slos)
        sim = simulate(args, system, reqs, learned, slos, formats)
        if (system, rate) not in by_profile:
            by_profile[system, rate] = simulate(args, system, reqs, costs, slos, formats)
        sim_profile = by_profile[system, rate]
        steps = e.step_log.between(m0)
        ran = {n: ScaledCost.fit(costs[n], [(r.kind, r.chunks, r.contexts, r.run_s)
                                            for r in steps if r.model == n])
               for n in MODELS}  # the step costs this run measured (not a prediction)
        sim_ran = simulate(args, system, reqs, ran, slos, formats)
        runs.append({"system": system, "rate": rate, "repeat": repeat, "summary": s,
                     "send_lag_s": lag,
                     "wall_s": time.perf_counter() - t0, "simulated": sim,
                     "simulated_profile": {k: sim_profile[k] for k in SIM_BRIEF},
                     "simulated_measured": {k: sim_ran[k] for k in SIM_BRIEF},
                     "cost_shape_factors": {n: learned[n].shape_factors()
                                            for n in MODELS},
                     "cost_factors": {"start": {n: learned[n].factors for n in MODELS},
                                      "end": {n: e.cost_factors(n) for n in MODELS}},
                     "device_speed": {"start": speed0,
                                      "end": e.speed.factor if e.speed is not None
                                      else None},
                     "engine_steps": summarize_steps(steps, costs),
                     "requests": recs})
        again = f" (round {repeat + 1} of {args.repeats})" if args.repeats > 1 else ""
        _log(f"rate {rate:g}/s{again} {system}: attainment {s['attainment']:.0%}, "
             f"{s['output_tok_s']:.1f} tok/s, TTFT p50 {s['ttft_s']['p50']}, "
             f"dropped {s['dropped']}" + (f"; simulated TTFT p50 {sim['ttft_p50_s']}, "
                                         f"{sim['output_tok_s']:.1f} tok/s"))
        while e.stats().models[MODELS[0]].running or e.stats().models[MODELS[1]].running:
            time.sleep(0.1)
    for e in engines.values():
        e.shutdown()
    for r in runs:  # the simulator against the engine, same trace and configuration
        meas = r["summary"]
        for key, sim in (("sim_error", r["simulated"]),
                         ("sim_profile_error", r["simulated_profile"]),
                         ("sim_measured_error", r["simulated_measured"])):
            r[key] = {"ttft_p50": rel_error(sim["ttft_p50_s"], meas["ttft_s"]["p50"]),
                      "output_tok_s": rel_error(sim["output_tok_s"], meas["output_tok_s"])}
    per_system = per_system_figures(runs, args.rates, args.systems)
    record = {"benchmark": "serve-systems", "command": command,
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "git": git, "device": any_engine.device,
              "systems": {s: {"allocator": SYSTEMS[s][0], "scheduler": SYSTEMS[s][1],
                              "on_miss": SYSTEMS[s][2]} for s in args.systems},
              "slos": {n: {"ttft_s": s.ttft_s, "tpot_s": s.tpot_s} for n, s in slos.items()},
              "kv_formats": {n: asdict(f) for n, f in formats.items()},
              "config": {k: v for k, v in vars(args).items() if not k.startswith("_")},
              "rates": args.rates, "per_system": per_system,
              "fineserve_over_static": ratios(per_system, args.rates), "runs": runs}
    record["costs"] = {n: c.to_dict() for n, c in costs.items()}
    path = write_json(args.out_systems, record)
    png = plot(record, Path(path).with_suffix(".png"))
    _log(f"wrote {path} and {png}")
    header = ["system", *[f"{r:g}/s att" for r in args.rates], *[f"{r:g}/s tok/s" for r in
                                                                   args.rates], "goodput90/99"]
    rows = []
    for s, d in per_system.items():
        many = [d.get("attainment_runs", [None] * len(args.rates)),
                d.get("output_tok_s_runs", [None] * len(args.rates))]
        rows.append([s, *[cell(a, r, ".0%") for a, r in zip(d["attainment"], many[0])],
                     *[cell(t, r, ".1f") for t, r in zip(d["output_tok_s"], many[1])],
                     f"{d['goodput_90'] or '-'}/{d['goodput_99'] or '-'}"])
    foot = [f"mean of {args.repeats} runs per point (lowest-highest)"] if args.repeats > 1 else []
    for q in ratios(per_system, args.rates):
        foot.append(f"fineserve / static+fcfs at {q['rate']:g} req/s: " + ", ".join(
            f"{what} {q[key]:.2f}x" if q[key] is not None else f"{what} -"
            for key, what in (("attainment", "attainment"), ("output_tok_s", "output tok/s"),
                              ("slo_output_tok_s", "SLO-meeting tok/s"))))
    foot += [f"simulator vs engine (same trace), {what}: TTFT p50 and tokens/s both within "
            f"20% in {within(runs, key)} of {len(runs)} runs; worst TTFT p50 "
            f"{max(abs(r[key]['ttft_p50'] or 0) for r in runs):.0%}, worst tokens/s "
            f"{max(abs(r[key]['output_tok_s'] or 0) for r in runs):.0%}"
            for key, what in (("sim_error", "costs as corrected before each run"),
                              ("sim_profile_error", "start-up profile"),
                              ("sim_measured_error", "each run's own measured step costs"))]
    if "cpu" in str(any_engine.device).lower():
        foot.append(CPU_FOOTER)
    print(format_table(header, rows, foot))
    return 0
