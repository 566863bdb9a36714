"""``python -m fineserve_jax.bench replace``: re-placement while serving, simulated.

Models of Llama-3-8B shape in bf16, fp8 and fireq (``--models``, the 8B models of the
cluster benchmark's list, most popular first) share ``--gpus`` H100s, one replica each on
one GPU, as ``serve.py --rebalance-interval`` serves them. Every GPU runs one engine whose
KV pool is fixed at start (``--kv-pool-gb``); a model's weights go only where they fit
beside that pool. Popularity drifts: every ``--shift-s`` seconds the power-law ranking
moves on by one model (``WorkloadSpec.shift_s``), so the model that was hottest cools and
the next one heats up.

Three systems replay the *same* trace with the same engines (KV Slab, SLO-aware local
scheduler); only the global decisions differ:

================  ===========================================================
system            placement
================  ===========================================================
``first-rates``   planned for the first phase's rates, then left as it is
``mean-rates``    planned for each model's average over the run (hindsight: what a
                  plan from a day's totals sees), left as it is
``replace``       planned like ``first-rates``, then re-placed while serving:
                  ``schedulers.rebalance.DriftPolicy`` (the server rebalancer's
                  decision: rates over ``--window-s``, checked every ``--interval-s``,
                  re-planned past ``--threshold`` relative drift) and the server's
                  moves (load on the destination, switch the route, drain the source;
                  moves run at once where the destination has room, ``MoveSchedule``)
================  ===========================================================

A move makes the model serve on its destination ``weight bytes / --load-gbps +
--compile-s`` seconds after it starts (the weights copied, the steps compiled); requests
in flight finish where they are. Plans use ``replan`` (``plan_parallelism`` at tp 1 plus
slab-greedy placement) for every system, so the comparison isolates when the plan is made.

SLOs, lengths, step costs (roofline, ``schedulers.roofline``) and the definitions of
attainment are the cluster benchmark's (``fineserve_jax.bench.cluster``). Per system and
rate: SLO attainment over all requests and per drift phase (requests arriving in it),
output tokens/s, requests that failed or were unplaced, and every move with when it
started, served on its destination, and its source drained. ``--more-seeds`` replays the
sweep on other seeds' traces (attainment and moves per seed, and the mean): one trace
varies by a point or more where the GPUs are busy.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict

HELP = ("simulated re-placement while serving: models move between GPUs as popularity "
        "drifts, against placements that stay as planned")
SYSTEMS = ("first-rates", "mean-rates", "replace")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", type=int, default=4, help="H100s, one engine each")
    p.add_argument("--models", type=int, default=9, help="8B models (at most 9)")
    p.add_argument("--rates", type=float, nargs="+", default=[16, 32, 48],
                   help="total request rates to sweep (req/s over all models)")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of arrivals")
    p.add_argument("--drain", type=float, default=30.0,
                   help="simulated seconds after the last arrival before requests still "
                        "in flight count as unfinished (misses)")
    p.add_argument("--shift-s", type=float, default=30.0,
                   help="the popularity ranking moves on by one model this often")
    p.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of rates")
    p.add_argument("--slo-scale", type=float, default=5.0,
                   help="SLOs = this times each model's solo latency")
    p.add_argument("--kv-pool-gb", type=float, default=36.0,
                   help="each GPU's KV pool (GB), fixed; weights fit in the rest")
    p.add_argument("--interval-s", type=float, default=5.0,
                   help="seconds between the rebalancer's checks")
    p.add_argument("--window-s", type=float, default=10.0,
                   help="seconds of arrivals the observed rates count")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="relative rate drift of any model that triggers a re-plan")
    p.add_argument("--load-gbps", type=float, default=25.0,
                   help="GB/s a moving model's weights load at")
    p.add_argument("--compile-s", type=float, default=5.0,
                   help="seconds a moving model compiles on its destination")
    from schedulers.planning import PlacementConfig

    p.add_argument("--balance-compute", action=argparse.BooleanOptionalAction,
                   default=PlacementConfig.balance_compute,
                   help="slab-greedy weighs free KV blocks by the compute each GPU has left "
                        "(PlacementConfig.balance_compute; --no-balance-compute: free KV "
                        "blocks alone)")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--more-seeds", type=int, nargs="+", default=[],
                   help="also replay the sweep on these seeds' traces and record each "
                        "system's attainment and moves per rate and seed, and their mean "
                        "(under 'seeds'; 'results' stays --seed's)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny run (two rates, 18 s of arrivals) to check the plumbing")
    p.add_argument("--out", default="benchmarks/results/replace.json", help="JSON record")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def small_models(args, config, lengths) -> dict:
    """The first ``--models`` 8B models of the cluster benchmark's list, with its SLOs."""
    from fineserve_jax.bench.cluster import MODELS, setup_models

    every = setup_models(args.slo_scale, config, lengths, len(MODELS))
    small = {k: v for k, v in every.items() if v.shape == "8b"}
    if not 1 <= args.models <= len(small):
        raise SystemExit(f"--models must be in 1..{len(small)}, got {args.models}")
    return dict(list(small.items())[:args.models])


def run_system(system: str, args, models, devices, config, lengths, spec, trace) -> dict:
    from fineserve_jax.bench.cluster import LIMITS, cost, demands
    from schedulers.placement import Placement
    from schedulers.rebalance import DriftPolicy, replan
    from schedulers.roofline import DeviceSpec
    from schedulers.simulator import GroupSpec, ModelSpec, simulate

    rates = spec.mean_rates() if system == "mean-rates" else spec.rates()
    weights = {m.name: m.weight_bytes for m in models.values()}
    start = replan(demands(models, rates, lengths), devices, Placement("slab-greedy", ()),
                   config, weights)
    if start.unplaced:
        raise SystemExit(f"{system}: the plan leaves "
                         + "; ".join(u.reason for u in start.unplaced) + " unplaced")
    pool = int(devices[0].kv_pool_bytes)
    move_bw = 0.8 * DeviceSpec.h100_sxm().hbm_bytes_per_s  # compaction copies
    groups = [GroupSpec(f"g{g.devices[0]}", g.models, pool, devices=g.devices,
                        move_bytes_per_s=move_bw) for g in start.groups]
    specs = {m.name: ModelSpec(m.name, m.block, LIMITS, m.slo) for m in models.values()}
    policy = None
    if system == "replace":
        used = sorted(g.devices[0] for g in start.groups)  # engines that exist
        if used != list(range(len(used))):
            raise SystemExit(f"the first plan leaves GPUs unused between {used}")

        def demand(name, rate):
            return demands({name: models[name]}, {name: rate}, lengths)[0]

        policy = DriftPolicy(start, devices[:len(used)], demand, rates,
                             lambda name, g: (weights[name] / (args.load_gbps * 1e9)
                                              + args.compile_s),
                             interval_s=args.interval_s, threshold=args.threshold,
                             window_s=args.window_s, config=config, weights=weights)
    t0 = time.perf_counter()
    res = simulate(groups, specs,
                   lambda m, g: cost(models[m].shape, models[m].precision, g.tp), trace,
                   scheduler="fineserve", horizon_s=args.duration + args.drain,
                   replacer=policy)
    m = res.metrics()
    phases = []
    for t0_, t1_, _ in spec.phases():
        recs = [r for r in res.records if t0_ <= r.arrival < t1_]
        phases.append({"start_s": t0_, "end_s": t1_, "requests": len(recs),
                       "slo_attainment": (sum(r.slo_met for r in recs) / len(recs)
                                          if recs else None)})
    out = {k: m[k] for k in ("requests", "slo_attainment", "slo_met", "finished", "dropped",
                             "failed", "unplaced", "unfinished", "preemptions",
                             "output_tok_s", "slo_output_tok_s", "ttft_s", "tpot_s")}
    out.update(system=system, phases=phases, moves=m["moves"],
               placement={g.devices[0]: list(g.models) for g in start.groups},
               gpus_used=len(start.groups), sim_wall_s=time.perf_counter() - t0)
    if policy is not None:
        out["checks"] = len(policy.decisions)
        out["replans"] = sum(d["action"] == "replanned" for d in policy.decisions)
        # every check that found drift past the threshold: what it did and why
        out["decisions"] = [{k: d[k] for k in ("at", "action", "moves")}
                            for d in policy.decisions if d["action"] != "none"]
    return out


def run(args) -> int:
    from fineserve_jax.bench.cluster import Lengths
    from fineserve_jax.bench.cluster_report import seed_points
    from fineserve_jax.bench.common import format_table, write_json
    from schedulers.placement import PlacementConfig
    from schedulers.rebalance import ServingDevice
    from schedulers.roofline import DeviceSpec
    from schedulers.workload import WorkloadSpec

    if args.quick:
        args.rates, args.duration, args.shift_s, args.drain = [12.0, 48.0], 18.0, 6.0, 6.0
    if min(args.rates) <= 0 or args.duration <= 0 or args.shift_s <= 0 or args.gpus < 1:
        raise SystemExit("need rates > 0, --duration > 0, --shift-s > 0 and --gpus >= 1")
    t_start = time.perf_counter()
    config, lengths = PlacementConfig(balance_compute=args.balance_compute), Lengths()
    models = small_models(args, config, lengths)
    hbm = DeviceSpec.h100_sxm().memory_bytes
    pool = args.kv_pool_gb * 1e9
    if not 0 < pool < config.usable_bytes(DeviceSpec.h100_sxm()):
        raise SystemExit(f"--kv-pool-gb must leave room for weights on an {hbm / 1e9:.0f} GB "
                         f"GPU")
    devices = [ServingDevice("h100", hbm, pool)] * args.gpus

    def sweep(seed: int) -> list[dict]:
        rows = []
        for rate in args.rates:
            spec = WorkloadSpec(tuple(models), rate, args.duration, args.alpha,
                                prompt=lengths.prompt, output=lengths.output, seed=seed,
                                shift_s=args.shift_s)
            trace = spec.generate()
            for system in args.systems:
                r = run_system(system, args, models, devices, config, lengths, spec, trace)
                r["rate"] = rate
                rows.append(r)
                _log(f"seed {seed}, rate {rate:g} req/s, {system}: attainment "
                     f"{r['slo_attainment']:.3f}, {len(r['moves'])} moves "
                     f"({r['sim_wall_s']:.1f} s)")
        return rows

    rows = sweep(args.seed)
    by_seed = {args.seed: rows, **{s: sweep(s) for s in args.more_seeds if s != args.seed}}
    record = {"benchmark": "replace", "command": args._command,
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "config": {k: v for k, v in vars(args).items() if not k.startswith("_")},
              "models": {k: {"precision": v.precision, "weight_bytes": v.weight_bytes,
                             "slo": asdict(v.slo)} for k, v in models.items()},
              "results": rows, "total_s": time.perf_counter() - t_start}
    if len(by_seed) > 1:
        record["seeds"] = {"seeds": list(by_seed), "points": seed_points(
            by_seed, moves=lambda r: len(r["moves"]))}
    _log(f"wrote {write_json(args.out, record)}")
    header = ["rate", *args.systems]
    table = []
    for rate in args.rates:
        by = {r["system"]: r for r in rows if r["rate"] == rate}
        table.append([f"{rate:g}", *[f"{by[s]['slo_attainment']:.3f}"
                                     + (f" ({len(by[s]['moves'])} moves)" if s == "replace"
                                        else "") for s in args.systems]])
    print(format_table(header, table, ["SLO attainment (simulated, roofline H100 costs)"]))
    if len(by_seed) > 1:
        mean = {(p["system"], p["rate"]): p for p in record["seeds"]["points"]}
        print(format_table(header, [[f"{rate:g}", *[
            f"{mean[(s, rate)]['mean']:.3f}"
            + (f" ({sum(mean[(s, rate)]['moves'])} moves)" if s == "replace" else "")
            for s in args.systems]] for rate in args.rates],
            [f"mean SLO attainment over seeds {', '.join(map(str, by_seed))}"]))
    return 0

