"""``python -m fineserve_jax.bench cluster``: FineServe vs four baselines on a simulated cluster.

Twelve Llama-3-8B- and 70B-shaped models in bf16, fp8 and fireq (``MODELS``, most popular
first) share a cluster of H100 SXM GPUs. Step times come from the roofline cost model
(``schedulers.roofline.AnalyticCost``); the discrete-event simulator
(``schedulers.simulator``) runs the engine's own batching, local schedulers and KV
allocators on them. Five systems replay the *same* trace at each rate:

==============  ===========================  ================  ========================
system          placement (global)           KV pool           local scheduler
==============  ===========================  ================  ========================
``fineserve``   slab-greedy                  KV Slab           ``fineserve`` (SLO-aware)
``static``      slab-greedy (same as ours)   static partitions ``fcfs``
``dedicated``   dedicated (one model/group)  its own pool      ``fcfs``
``fixed-page``  slab-greedy (same as ours)   fixed pages       ``fcfs``
``prism``       KVPR                         KV Slab           ``prism``
==============  ===========================  ================  ========================

Slab-greedy weighs free KV blocks by the compute each group has left
(``PlacementConfig.balance_compute``, the default; ``--no-balance-compute`` counts free
blocks alone, the paper's rule). When the cluster cannot hold a model's only replica
within the planned load, slab-greedy serves it past that load where the load is
least (``PlacementConfig.overcommit``; ``--no-overcommit`` leaves it unplaced) for
the systems whose scheduler sheds late requests. The FCFS systems are run on both
placements wherever they differ and keep the one that serves them better (at tight SLOs
mostly the one without: FCFS serves an overcommitted group's every request late; at
loose SLOs the one with); the record names it per point (``placement``, and
``placements_tried`` with what each gave).
``static`` is one engine process per model sharing the devices of our placement, each with
a fixed share of the pool sized in proportion to the model's planned KV need (what an
operator sizing ``gpu_memory_utilization`` per process from the same plan would do).
``dedicated`` is the same processes without sharing: every replica alone on its own
devices (``place_dedicated``); replicas that find no free devices are unplaced.
``fixed-page`` is MuxServe-like: one pool whose page is the largest block of the group.
``prism`` shares memory across models at page granularity (virtual memory), which the
precision-aware slab pool models, so it isolates Prism's placement and batching.
Named in ``--systems`` only: the ablations ``kvslab+fcfs`` and ``static+fineserve`` (one of
FineServe's two parts each), ``fineserve+best-effort`` (FineServe serving the requests
it predicts to miss their TTFT SLO after the others, ``on_miss="best-effort"``, instead
of shedding them), and ``static-equal``: ``static`` with every model on a device given the
same share of its pool (one memory fraction for every process) instead of shares sized
from the plan.

Workload (``schedulers.workload``): per-model Poisson arrivals (``--cv`` 1) with power-law
rates (``--alpha``) over ``MODELS``' order, ShareGPT-like lengths (lognormal, means 161 /
338 tokens) with prompts and outputs clipped to 1,024 tokens each, as vLLM's ShareGPT
benchmark prunes prompts over 1,024 and sequences over 2,048 tokens. ``--prompt-mean``,
``--output-mean`` (and ``-sigma``, ``-max``) give other length distributions, e.g. long
contexts; ``--shift-s`` makes popularity drift (the ranking moves on by one model every
that many seconds; plans, placements and static partitions are made from each model's
average rate, as from a day's totals); ``--models N`` adds 8B tenants after the twelve
(``model_list``) so that more models share each GPU.

SLOs: each model's TTFT and TPOT targets are ``--slo-scale`` times its *solo latency*: the
TTFT of the longest prompt the workload draws (1,024 tokens, chunked by the prefill
budget) and the TPOT of one sequence at the longest context (2,048 tokens), run alone on
the fewest GPUs that hold the model (tp 1; 2 for 70B bf16 and fp8). Every request can meet
them when alone, so attainment can reach 100%.

Global scheduling per rate: ``plan_parallelism`` picks each model's tp and replicas from
its rate and SLOs; each system's placer puts the replicas on ``--gpus`` devices (a replica
that fits nowhere is reported; a model with no replica placed misses every request).
Static partitions are paged in rows of at most 1% padding, as separate processes would
page their own shares, and each holds at least one longest sequence where the device's
pool holds one for each of its models; where it does not (the shared placement can put
more long-context models on a device than separate processes could each hold a longest
sequence of), the shares are cut in proportion and a request longer than its model's
share fails, as it would on a process started with a shorter context limit.

Figures per (system, rate): SLO attainment (requests meeting both SLOs / all; dropped,
failed and unplaced ones are misses), output tokens/s (tokens generated / simulated span,
first arrival to last completion or the horizon), TTFT / TPOT percentiles, drops and
preemptions. Derived:

* goodput at 90% / 99%: the highest rate whose attainment, and that of every lower swept
  rate, reaches the target, linearly interpolated towards the first rate that misses it
  (the highest swept rate when none misses, flagged ``saturated: false``);
* the static baseline's *knee*: the lowest swept rate at which static's attainment is
  more than 10 points below its best at any lower or equal rate; the headline ratios are
  FineServe's attainment and output tokens/s over static's at that rate;
* fewest GPUs: for ``--fixed-rate``, the smallest count in ``--gpu-grid`` at which each
  system reaches 99% attainment (counts are tried in order until one does).

``--more-seeds`` reruns the rate sweep on other seeds' traces and records each system's
attainment per rate and seed, their mean, and each seed's goodput and headline (under
``seeds``): a difference of a point or two at one rate is within what one trace varies.

Every figure is simulated time from the roofline cost model, the same on any machine.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import cache
from pathlib import Path

from fineserve_jax.bench.common import (
    _cpu_model,
    cpu_count,
    versions,
    write_json,
)
from fineserve_jax.bench.cluster_report import over_seeds, plot, summarize, table
from fineserve_jax.kvslab import BlockFormat
from schedulers.batching import SLO, BatchLimits
from schedulers.costmodel import solo_ttft
from schedulers.placement import (
    ModelDemand,
    Placement,
    PlacementConfig,
    place,
    plan_parallelism,
)
from schedulers.roofline import PRECISION_COSTS, AnalyticCost, DeviceSpec, ModelShape
from schedulers.simulator import GroupSpec, ModelSpec, simulate
from schedulers.workload import LengthDist, WorkloadSpec

HELP = ("simulated cluster of H100s serving 12 mixed-precision Llama-3 models: FineServe vs "
        "static partitions, fixed pages and Prism-style, attainment and goodput per rate")
BLOCK_TOKENS = 16
TP_OPTIONS = (1, 2, 4, 8)
PROMPT = LengthDist(161.0, 1.0, 4, 1024)  # defaults of --prompt-mean/-sigma/-max
OUTPUT = LengthDist(338.0, 0.9, 4, 1024)  # defaults of --output-mean/-sigma/-max
# vLLM-like batch limits, the same for every system.
LIMITS = BatchLimits(max_seqs=128, max_prefill_seqs=16, prefill_token_budget=512)
SHAPES = {"8b": ModelShape.llama3_8b, "70b": ModelShape.llama3_70b,
          "7b": ModelShape.llama2_7b, "13b": ModelShape.llama2_13b}
# --family: the (small, large) shapes standing in for MODELS' 8B and 70B. Llama-2's
# attention has a KV head per query head: 4x Llama-3-8B's KV bytes per token at 7B.
FAMILIES = {"llama3": ("8b", "70b"), "llama2": ("7b", "13b")}


@dataclass(frozen=True)
class System:
    placement: str  # schedulers.placement algorithm
    allocator: str  # engine.alloc kind
    scheduler: str  # schedulers.local policy
    on_miss: str = "reject"  # its requests predicted to miss their TTFT SLO
    partitions: str = "planned"  # static allocator: shares by planned KV need, or "equal"

    @property
    def placement_keys(self) -> tuple[str, ...]:
        """The placements this system is run on, by key of ``placements``. Slab-greedy
        may serve a model past the planned load when the cluster cannot hold it
        otherwise (``PlacementConfig.overcommit``). Under a scheduler that sheds what it
        cannot serve in time that is the placement; under FCFS an overcommitted group
        serves every request late, which costs more than the model left unplaced at
        tight SLOs and less at loose ones, so the FCFS systems are run on both where
        they differ and keep the one that serves them better (``run_system``). Other
        placements never overcommit."""
        if self.placement != "slab-greedy":
            return (self.placement,)
        if self.scheduler == "fcfs":
            return (self.placement, self.placement + "+overcommit")
        return (self.placement + "+overcommit",)

    @property
    def placement_key(self) -> str:
        """The first of ``placement_keys``: the one a tie keeps."""
        return self.placement_keys[0]


SYSTEMS = {
    "fineserve": System("slab-greedy", "kvslab", "fineserve"),
    "static": System("slab-greedy", "static", "fcfs"),
    "dedicated": System("dedicated", "static", "fcfs"),
    "fixed-page": System("slab-greedy", "fixed-page", "fcfs"),
    "prism": System("kvpr", "kvslab", "prism"),
}
DEFAULT_SYSTEMS = list(SYSTEMS)
# Ablations (not run unless named in --systems): one of FineServe's two parts each; and
# FineServe serving its predicted misses after the others instead of shedding them.
SYSTEMS |= {"kvslab+fcfs": System("slab-greedy", "kvslab", "fcfs"),
            "static+fineserve": System("slab-greedy", "static", "fineserve"),
            "fineserve+best-effort": System("slab-greedy", "kvslab", "fineserve",
                                            on_miss="best-effort"),
            "static-equal": System("slab-greedy", "static", "fcfs", partitions="equal")}


@dataclass(frozen=True)
class Lengths:
    """The workload's prompt and output length distributions."""

    prompt: LengthDist = PROMPT
    output: LengthDist = OUTPUT

    @property
    def longest(self) -> int:
        return self.prompt.hi + self.output.hi

    @property
    def mean_context(self) -> float:
        """A running sequence's mean context: the prompt plus half the output."""
        return self.prompt.mean + self.output.mean / 2


# (name, shape, precision), most popular first: popularity is spread over sizes and
# precisions so that every precision has a busy and an idle model.
MODELS = (
    ("chat-8b-bf16", "8b", "bf16"),
    ("code-8b-fp8", "8b", "fp8"),
    ("chat-70b-fireq", "70b", "fireq"),
    ("math-8b-fireq", "8b", "fireq"),
    ("chat-70b-fp8", "70b", "fp8"),
    ("code-8b-bf16", "8b", "bf16"),
    ("chat-8b-fp8", "8b", "fp8"),
    ("chat-70b-bf16", "70b", "bf16"),
    ("chat-8b-fireq", "8b", "fireq"),
    ("math-8b-bf16", "8b", "bf16"),
    ("code-8b-fireq", "8b", "fireq"),
    ("math-8b-fp8", "8b", "fp8"),
)
_PRECISIONS = ("bf16", "fp8", "fireq")


def model_list(n: int, family: str = "llama3") -> tuple[tuple[str, str, str], ...]:
    """``n`` models, most popular first: ``MODELS``, then (``n > 12``) more small tenants
    cycling through the precisions, so that several models share each GPU. ``family``
    ``llama2`` swaps the 8B and 70B shapes for Llama-2-7B and 13B (names follow)."""
    if n < 1:
        raise ValueError(f"need at least one model, got {n}")
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
    small, large = FAMILIES[family]
    sub = {"8b": small, "70b": large}
    out = [(name.replace(f"-{shape}-", f"-{sub[shape]}-"), sub[shape], prec)
           for name, shape, prec in MODELS[:n]]
    for i in range(len(MODELS), n):
        prec = _PRECISIONS[i % 3]
        out.append((f"tenant{i + 1}-{small}-{prec}", small, prec))
    return tuple(out)


# ------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelSetup:
    name: str
    shape: str
    precision: str
    solo_tp: int  # fewest GPUs that hold it (SLO reference)
    solo_ttft_s: float
    solo_tpot_s: float
    slo: SLO
    block: BlockFormat
    weight_bytes: float
    kv_bytes_per_token: float


@cache
def cost(shape: str, precision: str, tp: int) -> AnalyticCost:
    return AnalyticCost(SHAPES[shape](), precision, DeviceSpec.h100_sxm(), tp)


def block_format(shape: str, precision: str) -> BlockFormat:
    """The KV block of a model (computed here in plain Python: ``model.kv_formats`` imports
    JAX). Same bytes as the precision's KV format: values plus a bf16 scale per
    (token, KV head) for fp8 and int4; the pool is replicated over a tp group, so a block
    holds every KV head."""
    s, p = SHAPES[shape](), PRECISION_COSTS[precision]
    name = {2.0: "bf16", 1.0: "fp8", 0.5: "int4"}[p.kv_value_bytes]
    return BlockFormat(s.layers, s.kv_heads, s.head_dim, BLOCK_TOKENS, p.kv_value_bytes,
                       p.kv_scale_bytes, name)


def setup_models(slo_scale: float, config: PlacementConfig, lengths: Lengths = Lengths(),
                 n_models: int = len(MODELS), family: str = "llama3") -> dict[str, ModelSetup]:
    dev = DeviceSpec.h100_sxm()
    longest = lengths.longest
    out = {}
    for name, shape, prec in model_list(n_models, family):
        c1 = cost(shape, prec, 1)
        w, kvt = c1.weight_bytes(), c1.kv_bytes_per_token()
        tp = next(t for t in TP_OPTIONS
                  if config.usable_bytes(dev) - w / t >= longest * kvt)
        c = cost(shape, prec, tp)
        ttft = solo_ttft(c, lengths.prompt.hi, LIMITS.prefill_token_budget)
        tpot = c.decode_time([longest])
        out[name] = ModelSetup(name, shape, prec, tp, ttft, tpot,
                               SLO(slo_scale * ttft, slo_scale * tpot),
                               block_format(shape, prec), w, kvt)
    return out


def demands(models: dict[str, ModelSetup], rates: dict[str, float],
            lengths: Lengths) -> list[ModelDemand]:
    return [ModelDemand(m.name, m.precision, m.weight_bytes, m.kv_bytes_per_token,
                        rates[m.name], lengths.prompt.mean, lengths.output.mean, m.slo.ttft_s, m.slo.tpot_s,
                        cost=lambda tp, m=m: cost(m.shape, m.precision, tp),
                        block_tokens=BLOCK_TOKENS, block_bytes=m.block.block_bytes)
            for m in models.values()]


def placements(models: dict[str, ModelSetup], rates: dict[str, float], gpus: int,
               config: PlacementConfig, lengths: Lengths) -> tuple[dict, dict[str, Placement]]:
    """Plans (shared) and each system's placement at these rates, by
    ``System.placement_key``."""
    dev = DeviceSpec.h100_sxm()
    ds = demands(models, rates, lengths)
    plans = {d.name: plan_parallelism(d, dev, TP_OPTIONS, config) for d in ds}
    out = {}
    for key in sorted({k for s in SYSTEMS.values() for k in s.placement_keys}):
        algorithm, _, over = key.partition("+")
        cfg = replace(config, overcommit=config.overcommit and over == "overcommit")
        out[key] = place(algorithm, ds, plans, [dev] * gpus, cfg)
    return plans, out


def kv_need(plan, m: ModelSetup, lengths: Lengths) -> float:
    """A replica's planned KV bytes (as placement counts them): batch_rate sequences at
    the mean context."""
    return plan.batch_rate * lengths.mean_context * m.kv_bytes_per_token


def groups_of(p: Placement, system: System, plans: dict, models: dict[str, ModelSetup],
              lengths: Lengths) -> list[GroupSpec]:
    """Simulator groups of a placement. Static partitions are sized in proportion to each
    model's planned KV need, and at least one longest sequence (what an operator sizing
    one process per model would do: an engine refuses to start without room for one);
    ``partitions="equal"``: an equal share of the pool per model, as one memory fraction
    given to every process, again at least one longest sequence each. Where the pool is
    smaller than one longest sequence per model, every share is cut in the same
    proportion (below the floor: a process started with a shorter context limit)."""
    move = DeviceSpec.h100_sxm().hbm_bytes_per_s * 0.8  # compaction copies at 80% of HBM
    out = []
    for g in p.groups:
        parts = None
        if system.allocator == "static":
            even = g.kv_budget_bytes / len(g.models)
            need = {m: max(even if system.partitions == "equal"
                           else kv_need(plans[m], models[m], lengths),
                           lengths.longest * models[m].kv_bytes_per_token)
                    for m in g.models}
            total = sum(need.values())
            parts = {m: v / total for m, v in need.items()}
        out.append(GroupSpec(f"g{'-'.join(map(str, g.devices))}", g.models,
                             int(g.kv_budget_bytes), devices=g.devices, tp=g.tp,
                             allocator=system.allocator, partitions=parts,
                             move_bytes_per_s=move if system.allocator == "kvslab" else None))
    return out


# ------------------------------------------------------------------------ running
def run_point(system_name: str, models: dict[str, ModelSetup], plans: dict,
              placement: Placement, trace, horizon_s: float, lengths: Lengths) -> dict:
    system = SYSTEMS[system_name]
    specs = {m.name: ModelSpec(m.name, m.block, LIMITS, m.slo) for m in models.values()}
    groups = groups_of(placement, system, plans, models, lengths)
    specs = {k: v for k, v in specs.items() if any(k in g.models for g in groups)}
    t0 = time.perf_counter()
    res = simulate(groups, specs, lambda m, g: cost(models[m].shape, models[m].precision, g.tp),
                   trace, scheduler=system.scheduler, on_miss=system.on_miss,
                   horizon_s=horizon_s)
    m = res.metrics()
    wall = time.perf_counter() - t0
    out = {k: m[k] for k in ("requests", "slo_attainment", "slo_met", "finished", "dropped",
                             "failed", "unplaced", "unfinished", "preemptions",
                             "output_tokens", "output_tok_s", "slo_output_tok_s", "ttft_s",
                             "tpot_s")}
    out["span_s"] = res.end_s
    out["per_model_attainment"] = {k: v["slo_attainment"] for k, v in m["per_model"].items()}
    out["groups"] = len(groups)
    out["gpus_used"] = placement.devices_used
    out["unplaced_replicas"] = [asdict(u) for u in placement.unplaced]
    out["overcommitted"] = list(placement.overcommitted)
    out["blocks_moved"] = sum(g["blocks_moved"] for g in m["groups"].values())
    out["stalls"] = sum(g["stalls"] for g in m["groups"].values())
    out["steps"] = sum(g["steps"] for g in m["groups"].values())
    out["sim_wall_s"] = wall
    return out


def run_system(system_name: str, models: dict[str, ModelSetup], plans: dict,
               placements_by_key: dict[str, Placement], trace, horizon_s: float,
               lengths: Lengths) -> dict:
    """``run_point`` on each distinct placement of the system's ``placement_keys``; the
    row of the one with the highest attainment (then SLO-meeting tokens/s; a tie keeps
    the first), naming it (``placement``) and, when there were several, what each gave
    (``placements_tried``)."""
    tried: dict[str, dict] = {}
    for key in SYSTEMS[system_name].placement_keys:
        p = placements_by_key[key]
        if any(p == placements_by_key[k] for k in tried):
            continue
        tried[key] = run_point(system_name, models, plans, p, trace, horizon_s, lengths)
        tried[key]["placement"] = key
    best = max(tried.values(), key=lambda r: (r["slo_attainment"], r["slo_output_tok_s"]))
    if len(tried) > 1:
        best["placements_tried"] = {
            k: {f: r[f] for f in ("slo_attainment", "output_tok_s", "slo_output_tok_s",
                                  "unplaced")} for k, r in tried.items()}
    return best


def sweep(args, models, config, lengths: Lengths) -> list[dict]:
    rows = []
    names = list(models)
    for rate in args.rates:
        spec = WorkloadSpec(names, rate, args.duration, args.alpha, args.cv, lengths.prompt,
                            lengths.output, args.seed, args.shift_s)
        trace = spec.generate()
        plans, pl = placements(models, spec.mean_rates(), args.gpus, config, lengths)
        for sname in args.systems:
            r = run_system(sname, models, plans, pl, trace, args.duration + args.drain,
                           lengths)
            r.update(system=sname, rate=rate, gpus=args.gpus)
            if sname == args.systems[0]:
                r["plans"] = {k: asdict(v) for k, v in plans.items()}
            rows.append(r)
            _log(f"rate {rate:g} req/s, {sname}: attainment {r['slo_attainment']:.3f}, "
                 f"{r['output_tok_s']:.0f} tok/s ({r['sim_wall_s']:.1f} s)")
    return rows


def fewest_gpus(args, models, config, lengths: Lengths) -> dict:
    """Per system: the first count in ``--gpu-grid`` reaching 99% at ``--fixed-rate``."""
    names = list(models)
    spec = WorkloadSpec(names, args.fixed_rate, args.duration, args.alpha, args.cv,
                        lengths.prompt, lengths.output, args.seed, args.shift_s)
    trace = spec.generate()
    out = {s: {"gpus": None, "tried": {}} for s in args.systems}
    for n in args.gpu_grid:
        todo = [s for s in args.systems if out[s]["gpus"] is None]
        if not todo:
            break
        plans, pl = placements(models, spec.mean_rates(), n, config, lengths)
        for s in todo:
            r = run_system(s, models, plans, pl, trace, args.duration + args.drain, lengths)
            out[s]["tried"][str(n)] = r["slo_attainment"]
            _log(f"fixed rate {args.fixed_rate:g}: {s} on {n} GPUs: "
                 f"attainment {r['slo_attainment']:.3f}")
            if r["slo_attainment"] >= 0.99:
                out[s]["gpus"] = n
    return out


# --------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", type=int, default=10,
                   help="H100s in the rate sweep (10: fewer than one model per device)")
    p.add_argument("--rates", type=float, nargs="+", default=[20, 40, 60, 80, 100, 120],
                   help="total request rates to sweep (req/s over all models)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals")
    p.add_argument("--drain", type=float, default=30.0,
                   help="simulated seconds after the last arrival before requests still "
                        "in flight count as unfinished (misses)")
    p.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of rates")
    p.add_argument("--cv", type=float, default=1.0, help="arrival gap CV (1 = Poisson)")
    p.add_argument("--shift-s", type=float, default=None,
                   help="popularity drift: every this many seconds the ranking of the "
                        "models moves on by one (plans and partitions see the averages)")
    p.add_argument("--slo-scale", type=float, default=5.0,
                   help="SLOs = this times each model's solo latency")
    p.add_argument("--fixed-rate", type=float, default=60.0,
                   help="total rate of the fewest-GPUs search")
    p.add_argument("--gpu-grid", type=int, nargs="+", default=[8, 10, 12, 14, 16, 20, 24, 32],
                   help="GPU counts tried, in order, by the fewest-GPUs search")
    p.add_argument("--models", type=int, default=len(MODELS),
                   help="models sharing the cluster: the twelve of MODELS, then more tenants")
    p.add_argument("--family", choices=sorted(FAMILIES), default="llama3",
                   help="shapes of the small and large models: Llama-3-8B / 70B (GQA) or "
                        "Llama-2-7B / 13B (a KV head per query head: 4x the KV per token)")
    for kind, d in (("prompt", PROMPT), ("output", OUTPUT)):
        p.add_argument(f"--{kind}-mean", type=float, default=d.mean,
                       help=f"mean {kind} tokens (lognormal, before clipping)")
        p.add_argument(f"--{kind}-sigma", type=float, default=d.sigma,
                       help=f"log-space sigma of {kind} lengths")
        p.add_argument(f"--{kind}-max", type=int, default=d.hi,
                       help=f"{kind} lengths are clipped to this many tokens")
    p.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=DEFAULT_SYSTEMS,
                   help="systems to run (default: FineServe and the four baselines; "
                        "kvslab+fcfs and static+fineserve are ablations, one part each; "
                        "fineserve+best-effort serves the requests FineServe would shed "
                        "after the others)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--balance-compute", action=argparse.BooleanOptionalAction,
                   default=PlacementConfig.balance_compute,
                   help="slab-greedy placement weighs free KV blocks by the compute each "
                        "device group has left (PlacementConfig.balance_compute; "
                        "--no-balance-compute: free KV blocks alone)")
    p.add_argument("--overcommit", action=argparse.BooleanOptionalAction,
                   default=PlacementConfig.overcommit,
                   help="slab-greedy serves a model that fits no group within the planned "
                        "load past it, where the load is least, for the systems whose "
                        "scheduler sheds late requests; the FCFS systems keep the better "
                        "of the placements with and without it (PlacementConfig.overcommit; "
                        "--no-overcommit: it is left unplaced for every system)")
    p.add_argument("--more-seeds", type=int, nargs="+", default=[],
                   help="also run the rate sweep on these seeds' traces (no fewest-GPUs "
                        "search, not plotted) and report attainment per seed and its mean: "
                        "one trace per point is noisy for small differences")
    p.add_argument("--quick", action="store_true",
                   help="a tiny run (8 GPUs, two rates, 4 s, two counts) to check the plumbing")
    p.add_argument("--plot", default=None,
                   help="PNG ('' = none; default: the --out path with .png)")
    p.add_argument("--out", default="benchmarks/results/cluster.json", help="JSON record")


def apply_quick(args) -> None:
    args.gpus, args.rates, args.duration, args.drain = 8, [5.0, 20.0], 4.0, 4.0
    args.fixed_rate, args.gpu_grid = 5.0, [8, 16]


def lengths_of(args) -> Lengths:
    try:
        return Lengths(
            LengthDist(args.prompt_mean, args.prompt_sigma, min(PROMPT.lo, args.prompt_max),
                       args.prompt_max),
            LengthDist(args.output_mean, args.output_sigma, min(OUTPUT.lo, args.output_max),
                       args.output_max))
    except ValueError as e:
        raise SystemExit(f"bad length options: {e}") from None


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args) -> int:
    if args.quick:
        apply_quick(args)
    if args.models < 1:
        raise SystemExit("need --models >= 1")
    if min(args.rates) <= 0 or args.duration <= 0 or args.drain < 0 or args.gpus < 1:
        raise SystemExit("need rates > 0, --duration > 0, --drain >= 0 and --gpus >= 1")
    if args.shift_s is not None and not args.shift_s > 0:
        raise SystemExit(f"--shift-s must be > 0, got {args.shift_s:g}")
    if "static" not in args.systems or "fineserve" not in args.systems:
        _log("note: the headline ratios need both 'fineserve' and 'static'")
    t0 = time.perf_counter()
    config = PlacementConfig(balance_compute=args.balance_compute, overcommit=args.overcommit)
    lengths = lengths_of(args)
    models = setup_models(args.slo_scale, config, lengths, args.models, args.family)
    rows = sweep(args, models, config, lengths)
    more = {seed: sweep(argparse.Namespace(**{**vars(args), "seed": seed}), models, config,
                        lengths) for seed in args.more_seeds}
    fewest = fewest_gpus(args, models, config, lengths)
    record = {
        "benchmark": "cluster",
        "command": command(args),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "processor": _cpu_model(),
                    "cpu_count": cpu_count(), "python": sys.version.split()[0],
                    "versions": versions(("numpy",)), "device": None},
        "config": {**{k: v for k, v in vars(args).items() if k not in ("_run", "subcommand")},
                   "device": asdict(DeviceSpec.h100_sxm()),
                   "placement": asdict(config), "limits": asdict(LIMITS),
                   "prompt": asdict(lengths.prompt), "output": asdict(lengths.output),
                   "systems": {k: {**asdict(v), "placements": list(v.placement_keys)}
                               for k, v in SYSTEMS.items() if k in args.systems}},
        "models": {k: {**asdict(v), "slo": asdict(v.slo), "block": None,
                       "block_bytes": v.block.block_bytes} for k, v in models.items()},
        "results": rows,
        **summarize(rows, args.systems),
        "fewest_gpus": {"rate": args.fixed_rate, **fewest},
        **({"seeds": over_seeds({args.seed: rows, **more}, args.systems)} if more else {}),
        "total_s": time.perf_counter() - t0,
    }
    path = write_json(args.out, record)
    _log(f"wrote {path}")
    png = Path(args.out).with_suffix(".png") if args.plot is None else args.plot
    if png:
        _log(f"wrote {plot(record, png)}")
    print(table(record))
    return 0


def command(args) -> str:
    workload = (f"--prompt-mean {args.prompt_mean:g} --prompt-sigma {args.prompt_sigma:g} "
                f"--prompt-max {args.prompt_max} --output-mean {args.output_mean:g} "
                f"--output-sigma {args.output_sigma:g} --output-max {args.output_max} "
                f"--models {args.models} --family {args.family} "
                f"--systems {' '.join(args.systems)} --seed {args.seed}")
    if args.more_seeds:
        workload += f" --more-seeds {' '.join(map(str, args.more_seeds))}"
    if args.balance_compute != PlacementConfig.balance_compute:
        workload += " --balance-compute" if args.balance_compute else " --no-balance-compute"
    if args.overcommit != PlacementConfig.overcommit:
        workload += " --overcommit" if args.overcommit else " --no-overcommit"
    if args.shift_s is not None:
        workload += f" --shift-s {args.shift_s:g}"
    if args.quick:
        return f"python -m fineserve_jax.bench cluster --quick {workload} --out {args.out}"
    return (f"python -m fineserve_jax.bench cluster --gpus {args.gpus} --rates "
            f"{' '.join(f'{x:g}' for x in args.rates)} --duration {args.duration:g} "
            f"--drain {args.drain:g} --alpha {args.alpha:g} --cv {args.cv:g} --slo-scale "
            f"{args.slo_scale:g} --fixed-rate {args.fixed_rate:g} --gpu-grid "
            f"{' '.join(map(str, args.gpu_grid))} {workload} --out {args.out}")
