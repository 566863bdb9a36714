"""``python -m fineserve_jax.bench engine``: two SmolLM2 tenants under alternating bursts.

One process loads SmolLM2-135M once (``--dtype``, bfloat16 by default) and registers it
twice, as tenants ``a`` and ``b`` of one engine (both tenants run the very same device
weights; what matters is that two models share one KV pool). The same is done in one
``Engine`` per allocator (``EngineConfig(allocator=kind)`` for ``kvslab``, ``static`` and
``fixed-page``), with the same pool budget (``--kv-budget-mib``), the same limits and the
same request stream, one engine after the other.

Workload (``BurstWorkload``, fixed by ``--seed``):

* ``--bursts`` bursts of ``--burst-size`` requests; burst ``k`` goes to tenant ``a`` when
  ``k`` is even and to ``b`` when it is odd.
* Lengths are ShareGPT-like, scaled down to a quarter for a 2-core CPU: lognormal with
  means 40 prompt and 84 output tokens (ShareGPT's 161 and 338 from the vLLM paper, / 4),
  log-space sigmas 1.0 and 0.9 (as the host simulation ``kvslab.simulate`` assumes),
  rounded and clipped to [8, 192] tokens each. Prompt tokens are uniform random ids.
* Every request is greedy with ``ignore_eos``, so it generates exactly its drawn output
  length, whatever the tokens are.

Arrivals are driven by progress, not by wall time, so that every allocator sees the same
stream relative to its own progress and the run is deterministic: the engine runs with
``start(thread=False)`` and this module calls ``engine.step()`` itself; burst 0 is
submitted before the first step, and burst ``k + 1`` is submitted before the first step
that follows the step in which half of burst ``k``'s requests (rounded up) had finished.
Bursts therefore overlap: the new tenant's burst arrives while the other tenant's longest
requests still run. The run ends when every request has finished.

Default pool: 32 MiB, 45 rows of 720 KiB, i.e. 90 bf16 blocks of 16 tokens (1,440 tokens
of SmolLM2 KV). One burst of the default stream needs 118-133 blocks if all its requests
were at full length at once; a tenant held at most 60-69 blocks at a time when it could
borrow the other's memory (KV Slab, fixed pages), so the pool is roughly 1.5 bursts' worth
of the KV a burst really holds at once. A static
partition (half each: 46 and 44 blocks) holds about 0.7 of that, so its tenant must queue
and preempt, while KV Slab and the fixed-page pool lend the idle tenant's memory to the busy
one (all but the idle tenant's reserve: the engine's default of one prefill step's blocks,
9 blocks, which KV Slab rounds up to 5 slabs). Both tenants use the same block format, so
fixed pages waste nothing here: that baseline loses to KV Slab only with mixed precisions
(``bench kvslab``), and on this workload it should do as well as KV Slab.

Measured per allocator, after a warm-up that compiles every bucket (``warmup=True``, small
bucket set; warm-up time is reported apart and is not in any figure): wall seconds from
the first submission to the last finish, output tokens and tok/s, requests completed and
failed, preemptions (summed over tenants, ``engine.stats()``), concurrent running sequences
(summed over tenants, sampled after every step: peak and mean over steps; and each
tenant's own peak), peak KV blocks
and pool rows held per tenant, mean and peak pool fragmentation (``stats().pool``), TTFT
and end-to-end latency p50/p90 in engine steps and in seconds. A request's first token and
finish are seen by looking at its handle after every step, so latencies have the resolution
of one step and include the step that produced the token. A step is one iteration of the
engine: one batch of one tenant (prefill or decode). Greedy output tokens of every request
are compared across the allocators of the same run, with the requests each allocator
preempted (each request handle's public ``metrics``). Each step's time is
also filed under its compiled shape (rows x tokens x page-table width, seen by wrapping
the runners' ``step`` of that engine), so that a difference in wall time can be split
into more steps and dearer steps. On a CPU, tok/s and seconds are only comparable as
ratios within one run (``common.CPU_FOOTER``); counts are exact on any machine (the
scheduler is deterministic: every run of the same command gives the same steps,
preemptions and concurrency).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from fineserve_jax.bench.common import (
    CPU_FOOTER,
    format_table,
    machine_info,
    write_json,
)
from fineserve_jax.kvslab.simulate import lognormal_lengths

HELP = ("two SmolLM2 tenants under alternating bursts: throughput, preemptions, peak "
        "concurrency per allocator (CPU)")
ALLOCATORS = ("kvslab", "static", "fixed-page")
TENANTS = ("a", "b")
MIB = 1 << 20

# Compiled shapes (every combination is compiled at warm-up; each costs seconds on CPU).
# One prefill row of up to 128 tokens per step: on a 2-core CPU a (4, 128) prefill bucket
# costs about 4x a (1, 128) one while the budget still feeds 128 real tokens.
ENGINE_DEFAULTS = {"block_tokens": 16, "max_seqs": 16, "max_prefill_seqs": 1,
                   "prefill_token_budget": 128, "max_model_len": 384, "decode_buckets": (4, 16),
                   "prefill_row_buckets": (1,), "chunk_buckets": (32, 128),
                   "context_buckets": (8, 24), "warmup": True}


@dataclass(frozen=True)
class BurstWorkload:
    """Alternating bursts with ShareGPT-like lengths (module docstring)."""

    bursts: int = 4
    burst_size: int = 16
    prompt_mean: float = 40.0
    prompt_sigma: float = 1.0
    output_mean: float = 84.0
    output_sigma: float = 0.9
    min_len: int = 8
    max_len: int = 192  # each of prompt and output
    seed: int = 0

    def __post_init__(self):
        for f in ("bursts", "burst_size", "min_len", "max_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{f} must be a positive int, got {v!r}")
        if self.min_len > self.max_len:
            raise ValueError("min_len > max_len")
        if min(self.prompt_mean, self.output_mean) <= 0 or min(self.prompt_sigma,
                                                                self.output_sigma) < 0:
            raise ValueError("means must be > 0 and sigmas >= 0")

    def requests(self, vocab_size: int) -> list[dict]:
        """Every request in submission order: burst, tenant, prompt ids, output tokens."""
        rng = np.random.default_rng(self.seed)
        n = self.bursts * self.burst_size
        lo, hi = self.min_len, self.max_len
        prompt = lognormal_lengths(rng, self.prompt_mean, self.prompt_sigma, n, lo, hi)
        output = lognormal_lengths(rng, self.output_mean, self.output_sigma, n, lo, hi)
        out = []
        for i in range(n):
            k = i // self.burst_size
            ids = rng.integers(0, vocab_size, int(prompt[i])).tolist()
            out.append({"id": i, "burst": k, "model": TENANTS[k % 2], "prompt": ids,
                        "output": int(output[i])})
        return out


@dataclass
class Tenant:
    """What both tenants are built from: one model, loaded once."""

    config: object  # ModelConfig
    weights: object  # device weights (shared by every tenant of every engine)
    tokenizer: object
    dtype: str


# ------------------------------------------------------------------------- one run
def _pct(xs: Sequence[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if len(xs) else None


def drive(engine, requests: list[dict], *, max_idle: int = 3) -> dict:
    """Submit ``requests`` burst by burst (module docstring) and step ``engine`` until all
    finish; every per-step sample and per-request time. ``engine`` is started, no thread."""
    from fineserve_jax.sampling import SamplingParams

    bursts: dict[int, list[dict]] = {}
    for r in requests:
        bursts.setdefault(r["burst"], []).append(r)
    order = sorted(bursts)
    track: list[dict] = []
    pending: list[dict] = []
    steps = 0
    t0 = time.perf_counter()

    def submit(k: int) -> None:
        now = time.perf_counter()
        for r in bursts[k]:
            sp = SamplingParams(max_tokens=r["output"], temperature=0.0, ignore_eos=True)
            h = engine.submit(r["model"], r["prompt"], sp, request_id=f"r{r['id']}")
            t = {"req": r, "handle": h, "submit_step": steps, "submit_s": now - t0,
                 "first_step": None, "first_s": None, "done_step": None, "done_s": None,
                 "preempted": 0}
            track.append(t)
            pending.append(t)

    def done_in(k: int) -> int:
        return sum(t["done_step"] is not None for t in track if t["req"]["burst"] == k)

    running, frag, step_s = [], [], []
    by_tenant = {m: [] for m in TENANTS}
    blocks = {m: [] for m in TENANTS}
    rows = {m: [] for m in TENANTS}
    nxt, idle, book_s = 0, 0, 0.0
    while True:
        while nxt < len(order) and (nxt == 0 or 2 * done_in(order[nxt - 1])
                                    >= len(bursts[order[nxt - 1]])):
            submit(order[nxt])
            nxt += 1
        ts = time.perf_counter()
        ran = engine.step()
        tb = time.perf_counter()
        if ran:
            steps += 1
            step_s.append(tb - ts)
            idle = 0
        else:
            idle += 1
        st = engine.stats()
        now = time.perf_counter() - t0
        running.append(sum(m.running for m in st.models.values()))
        frag.append(st.pool.fragmentation)
        for m in TENANTS:
            by_tenant[m].append(st.models[m].running)
            blocks[m].append(st.models[m].blocks_held)
            rows[m].append(st.pool.rows_by_owner.get(m, 0))
        still = []
        for t in pending:
            h = t["handle"]
            t["preempted"] = h.metrics.preemptions
            if t["first_step"] is None and h.token_ids:
                t["first_step"], t["first_s"] = steps, now
            if h.finished:
                t["done_step"], t["done_s"] = steps, now
            else:
                still.append(t)
        pending[:] = still
        book_s += time.perf_counter() - tb
        if not pending and nxt == len(order):
            break
        if idle > max_idle:
            raise RuntimeError(f"the engine stopped making progress with {len(pending)} "
                               f"requests unfinished: {engine.stats()!r}")
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "steps": steps, "step_s": step_s, "bookkeeping_s": book_s,
            "running": running, "running_by_tenant": by_tenant, "fragmentation": frag, "blocks": blocks, "rows": rows,
            "track": track}


def run_allocator(kind: str, tenant: Tenant, engine_kw: dict, requests: list[dict]) -> dict:
    """One engine with allocator ``kind``, both tenants, the whole stream: its record.
    Also returns (under ``"_outputs"``) each request's generated token ids, by id."""
    from fineserve_jax.engine import Engine, EngineConfig

    e = Engine(EngineConfig(allocator=kind, **engine_kw))
    for name in TENANTS:
        e.add_model(name, tenant.config, tenant.weights, tenant.tokenizer, dtype=tenant.dtype)
    t0 = time.perf_counter()
    e.start(thread=False)
    start_s = time.perf_counter() - t0
    compiled = e.compiled_steps()
    pool0 = e.stats().pool
    shapes = _record_shapes(e)
    d = drive(e, requests)
    st = e.stats()
    track = d["track"]
    reasons = [t["handle"].finish_reason for t in track]
    ok = [t for t in track if t["handle"].finish_reason == "length"]
    out_tokens = sum(len(t["handle"].token_ids) for t in track)
    ttft_steps = [t["first_step"] - t["submit_step"] for t in ok]
    ttft_s = [t["first_s"] - t["submit_s"] for t in ok]
    e2e_steps = [t["done_step"] - t["submit_step"] for t in ok]
    e2e_s = [t["done_s"] - t["submit_s"] for t in ok]
    rec = {
        "allocator": kind,
        "pool": {"pool_bytes": pool0.pool_bytes, "row_bytes": pool0.row_bytes,
                 "rows_total": pool0.rows_total,
                 "layout": {m: e.alloc.layout(m)._asdict() for m in TENANTS},
                 "max_blocks_per_tenant": {m: e.model_info(m)["max_blocks_per_seq"]
                                           for m in TENANTS}},
        "start_s": start_s,
        "warmup_s": e.warmup_seconds,
        "compiled_steps_after_warmup": compiled,
        "compiled_during_run": e.compiled_steps() - compiled,
        "wall_s": d["wall_s"],
        "engine_step_s": float(sum(d["step_s"])),
        "mean_step_s": float(np.mean(d["step_s"])) if d["step_s"] else None,
        "bookkeeping_s": d["bookkeeping_s"],
        "steps": d["steps"],
        "steps_by_tenant": {m: st.models[m].steps for m in TENANTS},
        "steps_by_shape": _by_shape(shapes, d["step_s"]),
        "submitted": len(track),
        "completed": sum(r == "length" for r in reasons),
        "failed": sum(r == "error" for r in reasons),
        "aborted": sum(r == "abort" for r in reasons),
        "output_lengths_as_drawn": all(len(t["handle"].token_ids) == t["req"]["output"]
                                       for t in ok),
        "output_tokens": out_tokens,
        "output_tok_s": out_tokens / d["wall_s"],
        "preemptions": sum(st.models[m].preemptions for m in TENANTS),
        "preemptions_by_tenant": {m: st.models[m].preemptions for m in TENANTS},
        "blocks_moved_by_tenant": {m: st.models[m].blocks_moved for m in TENANTS},
        "peak_concurrent": int(max(d["running"])),
        "mean_concurrent": float(np.mean(d["running"])),
        "peak_running_by_tenant": {m: int(max(d["running_by_tenant"][m])) for m in TENANTS},
        "peak_blocks_by_tenant": {m: int(max(d["blocks"][m])) for m in TENANTS},
        "peak_rows_by_tenant": {m: int(max(d["rows"][m])) for m in TENANTS},
        "fragmentation_mean": float(np.mean(d["fragmentation"])),
        "fragmentation_peak": float(np.max(d["fragmentation"])),
        "ttft_steps_p50": _pct(ttft_steps, 50), "ttft_steps_p90": _pct(ttft_steps, 90),
        "ttft_s_p50": _pct(ttft_s, 50), "ttft_s_p90": _pct(ttft_s, 90),
        "e2e_steps_p50": _pct(e2e_steps, 50), "e2e_steps_p90": _pct(e2e_steps, 90),
        "e2e_s_p50": _pct(e2e_s, 50), "e2e_s_p90": _pct(e2e_s, 90),
        "pool_empty_after": (st.pool.rows_free == st.pool.rows_total if kind != "static" else
                             all(st.models[m].blocks_held == 0 for m in TENANTS)),
        "preempted_requests": sorted(t["req"]["id"] for t in track if t["preempted"]),
        "_outputs": {t["req"]["id"]: list(t["handle"].token_ids) for t in track},
        "_series": {"running": d["running"],
                    "fragmentation": [round(f, 4) for f in d["fragmentation"]]},
    }
    e.shutdown()
    return rec


def _record_shapes(engine) -> list[tuple[int, int, int]]:
    """The compiled shape (rows, tokens per row, page-table width) of every model step
    from now on, in order: each runner's ``step`` is wrapped on this engine only."""
    shapes: list[tuple[int, int, int]] = []
    for name in engine.models:
        runner = engine._models[name].runner
        inner = runner.step

        def step(pool, batch, inner=inner):
            shapes.append(batch.shape)
            return inner(pool, batch)

        runner.step = step
    return shapes


def _by_shape(shapes: list, step_s: list[float]) -> dict:
    """Steps and mean seconds per compiled shape (a step's whole ``engine.step()`` time)."""
    if len(shapes) != len(step_s):  # a step that raised ran no model: no attribution
        return {}
    out: dict[str, list[float]] = {}
    for (b, t, p), s in zip(shapes, step_s):
        out.setdefault(f"{b}x{t}x{p}", []).append(s)
    return {k: {"steps": len(v), "mean_s": float(np.mean(v))} for k, v in sorted(out.items())}


def compare_outputs(results: list[dict]) -> dict:
    """Per request: are the greedy tokens the same under every allocator?"""
    outs = [r["_outputs"] for r in results]
    ids = sorted(outs[0])
    differ = {}
    for i in ids:
        ref = outs[0][i]
        for r, o in zip(results[1:], outs[1:]):
            if o.get(i) != ref:
                other = o.get(i) or []
                at = next((j for j, (x, y) in enumerate(zip(ref, other)) if x != y),
                          min(len(ref), len(other)))
                differ.setdefault(str(i), {})[r["allocator"]] = at
    preempted = {i: [r["allocator"] for r in results if int(i) in r["preempted_requests"]]
                 for i in differ}
    return {"reference": results[0]["allocator"], "requests": len(ids),
            "identical": len(ids) - len(differ), "all_identical": not differ,
            "first_difference": differ, "differing_preempted_under": preempted}


def ratios(results: list[dict], base: str) -> dict:
    by = {r["allocator"]: r for r in results}
    if "kvslab" not in by or base not in by or base == "kvslab":
        return {}
    k, s = by["kvslab"], by[base]

    def q(a, b):
        return a / b if b else None

    return {"output_tok_s": q(k["output_tok_s"], s["output_tok_s"]),
            "wall_s": q(k["wall_s"], s["wall_s"]),
            "peak_concurrent": q(k["peak_concurrent"], s["peak_concurrent"]),
            "peak_running_one_tenant": q(max(k["peak_running_by_tenant"].values()),
                                         max(s["peak_running_by_tenant"].values())),
            "mean_concurrent": q(k["mean_concurrent"], s["mean_concurrent"]),
            "steps": q(k["steps"], s["steps"])}


def run_bench(tenant: Tenant, engine_kw: dict, workload: BurstWorkload,
              allocators: Sequence[str] = ALLOCATORS,
              log: Callable[[str], None] | None = None) -> dict:
    """Every allocator on the same stream, one after the other: results, ratios, check."""
    requests = workload.requests(tenant.config.vocab_size)
    results = []
    for kind in allocators:
        r = run_allocator(kind, tenant, engine_kw, requests)
        results.append(r)
        if log:
            log(f"{kind}: {r['completed']}/{r['submitted']} done in {r['wall_s']:.1f}s "
                f"({r['steps']} steps, warm-up {r['warmup_s']:.1f}s), {r['preemptions']} "
                f"preemptions, peak {r['peak_concurrent']} running")
    check = compare_outputs(results)
    prompt = [len(r["prompt"]) for r in requests]
    output = [r["output"] for r in requests]
    block_tokens = engine_kw.get("block_tokens", 16)
    burst_blocks = [sum(-(-(len(r["prompt"]) + r["output"]) // block_tokens)
                    for r in requests if r["burst"] == k) for k in range(workload.bursts)]
    stream = {"requests": len(requests), "prompt_tokens": int(sum(prompt)),
              "output_tokens": int(sum(output)),
              "prompt_mean": float(np.mean(prompt)), "prompt_max": int(max(prompt)),
              "output_mean": float(np.mean(output)), "output_max": int(max(output)),
              "blocks_per_burst_at_full_length": burst_blocks}
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
    return {"workload": asdict(workload), "stream": stream, "results": public,
            "series": {r["allocator"]: r["_series"] for r in results},
            "ratios": {"kvslab/static": ratios(results, "static"),
                       "kvslab/fixed-page": ratios(results, "fixed-page")},
            "greedy_check": check}


# ------------------------------------------------------------------------- the CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    w = BurstWorkload()
    p.add_argument("--model", default="smollm2-135m", help="model source (alias or path)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--kv-budget-mib", type=float, default=32.0,
                   help="KV pool shared by both tenants, MiB (the same for every allocator)")
    p.add_argument("--max-seqs", type=int, default=ENGINE_DEFAULTS["max_seqs"],
                   help="running sequences per tenant (largest decode batch)")
    p.add_argument("--bursts", type=int, default=w.bursts, help="bursts, alternating a, b, ...")
    p.add_argument("--burst-size", type=int, default=w.burst_size, help="requests per burst")
    p.add_argument("--prompt-mean", type=float, default=w.prompt_mean,
                   help="mean prompt tokens (lognormal)")
    p.add_argument("--output-mean", type=float, default=w.output_mean,
                   help="mean output tokens (lognormal)")
    p.add_argument("--seed", type=int, default=w.seed)
    p.add_argument("--allocators", nargs="+", choices=ALLOCATORS, default=list(ALLOCATORS))
    p.add_argument("--out", default="benchmarks/results/engine_cpu.json", help="JSON record")


def command(args) -> str:
    return (f"python -m fineserve_jax.bench engine --model {args.model} --dtype {args.dtype} "
            f"--kv-budget-mib {args.kv_budget_mib:g} --max-seqs {args.max_seqs} "
            f"--bursts {args.bursts} --burst-size {args.burst_size} "
            f"--prompt-mean {args.prompt_mean:g} --output-mean {args.output_mean:g} "
            f"--seed {args.seed} --allocators {' '.join(args.allocators)} --out {args.out}")


def git_state() -> dict | None:
    """The commit the run was made from, and whether tracked files differed from it."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit, "tracked_files_modified": dirty.split()[1::2]}


def load_tenant(model: str, dtype: str) -> tuple[Tenant, dict]:
    """The model loaded once, its weights put on the device once for every tenant."""
    import jax

    from checkpoints import load_model
    from fineserve_jax.runner import backend_weights

    lm = load_model(model, dtype, progress=False)
    weights = backend_weights(jax.device_put(lm.params), dtype)
    return Tenant(lm.config, weights, lm.tokenizer, dtype), lm.metadata


def run(args) -> int:
    if args.kv_budget_mib <= 0 or args.max_seqs < 1:
        raise SystemExit("need --kv-budget-mib > 0 and --max-seqs >= 1")
    try:
        workload = BurstWorkload(bursts=args.bursts, burst_size=args.burst_size,
                                 prompt_mean=args.prompt_mean, output_mean=args.output_mean,
                                 seed=args.seed)
    except ValueError as e:
        raise SystemExit(str(e)) from None

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    tenant, meta = load_tenant(args.model, args.dtype)
    load_s = time.perf_counter() - t0
    log(f"loaded {args.model} ({args.dtype}) in {load_s:.1f}s")
    engine_kw = dict(ENGINE_DEFAULTS, kv_budget_bytes=int(args.kv_budget_mib * MIB),
                     max_seqs=args.max_seqs,
                     decode_buckets=tuple(sorted({min(4, args.max_seqs), args.max_seqs})))
    res = run_bench(tenant, engine_kw, workload, args.allocators, log)
    record = {
        "benchmark": "engine",
        "command": command(args),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(("jax", "jaxlib", "numpy")),
        "git": git_state(),
        "config": {"model": args.model, "dtype": args.dtype,
                   "model_source_sha256": meta.get("source_sha256"),
                   "model_config": tenant.config.to_dict(), "tenants": list(TENANTS),
                   "allocators": list(args.allocators), "engine": engine_kw,
                   "arrivals": "burst k+1 submitted before the first step after half of "
                               "burst k finished; engine stepped by this process",
                   "sampling": "greedy, ignore_eos, max_tokens = drawn output length"},
        **res,
        "load_s": load_s,
        "total_s": time.perf_counter() - t0,
    }
    path = write_json(args.out, record)
    log(f"wrote {path}")
    print(table(record))
    return 0


def table(record: dict) -> str:
    header = ["allocator", "tok/s", "wall s", "steps", "done", "preempt", "moved", "peak run",
              "peak a/b", "mean run", "peak blk a/b", "frag mean", "TTFT p50/p90", "E2E p50/p90"]
    rows = []
    for r in record["results"]:
        rows.append([r["allocator"], f"{r['output_tok_s']:.1f}", f"{r['wall_s']:.0f}",
                     str(r["steps"]), f"{r['completed']}/{r['submitted']}",
                     str(r["preemptions"]),
                     str(sum(r.get("blocks_moved_by_tenant", {}).values())),
                     str(r["peak_concurrent"]),
                     "/".join(str(r["peak_running_by_tenant"][m]) for m in TENANTS),
                     f"{r['mean_concurrent']:.1f}",
                     "/".join(str(r["peak_blocks_by_tenant"][m]) for m in TENANTS),
                     f"{r['fragmentation_mean']:.1%}",
                     _pair(r, "ttft"), _pair(r, "e2e")])
    foot = [("run: running sequences (both tenants; peak a/b: each tenant's own peak); TTFT "
            "and E2E: steps | seconds; peak blk: most KV blocks held by tenant a / b; moved: "
            "KV blocks moved by compaction")]
    for base, rat in record["ratios"].items():
        if rat:
            foot.append(f"{base}: tok/s {rat['output_tok_s']:.2f}x, steps {rat['steps']:.2f}x, "
                        f"peak running {rat['peak_concurrent']:.2f}x (one tenant's "
                        f"{rat['peak_running_one_tenant']:.2f}x), mean running "
                        f"{rat['mean_concurrent']:.2f}x")
    c = record["greedy_check"]
    foot.append(f"greedy tokens identical across allocators for {c['identical']}/"
                f"{c['requests']} requests")
    foot.append(CPU_FOOTER)
    return format_table(header, rows, foot)


def _pair(r: dict, what: str) -> str:
    if r[f"{what}_steps_p50"] is None:
        return "-"
    return (f"{r[f'{what}_steps_p50']:.0f}/{r[f'{what}_steps_p90']:.0f} | "
            f"{r[f'{what}_s_p50']:.1f}/{r[f'{what}_s_p90']:.1f}")
