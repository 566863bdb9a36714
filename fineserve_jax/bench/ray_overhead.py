"""``python -m fineserve_jax.bench ray``: what serving through a Ray worker adds per token.

The same model, engine configuration and requests run twice on this machine: on an
``Engine`` in this process (the single-host path) and on a Ray worker actor on a local
Ray cluster, reached through ``RemoteEngine`` (the Ray path: each delta is a Ray
streaming-generator item). Requests are submitted at the engine interface both times, so
the HTTP layer (the same for both) is left out. Per concurrency level: time to first
token, mean inter-token latency and tokens/s; the overhead is Ray minus local. The local
engine is shut down before the Ray worker starts, so the two never share the CPU. Greedy
outputs must be equal token for token.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

from fineserve_jax.bench.common import format_table, machine_info, write_json

HELP = "per-token overhead of serving through a Ray worker actor vs in-process (CPU)"
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):",
           "The three primary colors are", "A haiku about autumn:", "In 1969, the first",
           "Water boils at", "The largest planet in the solar system is"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="source (alias or path)")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4],
                   help="requests in flight at once (each level runs --rounds rounds)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kv-budget-mib", type=int, default=64)
    p.add_argument("--out", default="benchmarks/results/ray_overhead_cpu.json")


def _engine_config(args) -> dict:
    return dict(kv_budget_bytes=args.kv_budget_mib * 2**20, max_seqs=max(args.concurrency),
                max_model_len=256, prefill_token_budget=64)


async def _one(engine, model: str, ids: list[int], params) -> dict:
    t0 = time.perf_counter()
    h = engine.submit(model, ids, params)
    stamps, tokens = [], []
    async for d in h:
        if d.token_ids:
            stamps.append(time.perf_counter())
            tokens += d.token_ids
        if d.error:
            raise RuntimeError(f"request failed: {d.error}")
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft_s": stamps[0] - t0, "itl_s": statistics.fmean(gaps) if gaps else 0.0,
            "tokens": tokens, "seconds": stamps[-1] - t0}


async def _measure(engine, model: str, prompts: list[list[int]], args) -> dict:
    from fineserve_jax.sampling import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    await _one(engine, model, prompts[0], params)  # warm: first-use costs out
    out = {}
    for conc in args.concurrency:
        runs, t0 = [], time.perf_counter()
        for r in range(args.rounds):
            batch = [prompts[(r * conc + i) % len(prompts)] for i in range(conc)]
            runs += await asyncio.gather(*(_one(engine, model, p, params) for p in batch))
        wall = time.perf_counter() - t0
        out[conc] = {"ttft_ms": 1e3 * statistics.median(x["ttft_s"] for x in runs),
                     "itl_ms": 1e3 * statistics.median(x["itl_s"] for x in runs),
                     "tokens_per_s": sum(len(x["tokens"]) for x in runs) / wall,
                     "outputs": [x["tokens"] for x in runs]}
    return out


def run(args) -> int:
    import ray

    from checkpoints.cache import load_served
    from fineserve_jax.engine import Engine, EngineConfig
    from fineserve_jax.raycluster.launch import start_workers

    spec = {"name": "m", "source": args.model, "precision": args.precision,
            "dtype": args.dtype}
    loaded, prec = load_served(spec, progress=False)
    prompts = [loaded.tokenizer.encode(p) for p in PROMPTS]

    t0 = time.perf_counter()
    local = Engine(EngineConfig(**_engine_config(args)))
    local.add_model("m", loaded.config, loaded.params, loaded.tokenizer, dtype=args.dtype,
                    precision=prec)
    local.start()
    print(f"local engine ready in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    local_res = asyncio.run(_measure(local, "m", prompts, args))
    local.shutdown()
    del local, loaded

    ray.init(num_cpus=1, include_dashboard=False, logging_level="warning")
    try:
        t0 = time.perf_counter()
        (remote,) = start_workers([{"models": ["m"]}], {"m": spec}, _engine_config(args))
        print(f"Ray worker ready in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        ray_res = asyncio.run(_measure(remote, "m", prompts, args))
        remote.shutdown()
    finally:
        ray.shutdown()

    rows = []
    for conc in args.concurrency:
        lo, ra = local_res[conc], ray_res[conc]
        if lo["outputs"] != ra["outputs"]:
            raise SystemExit(f"concurrency {conc}: Ray and local outputs differ")
        rows.append({"concurrency": conc, "local": {k: v for k, v in lo.items() if k != "outputs"},
                     "ray": {k: v for k, v in ra.items() if k != "outputs"},
                     "itl_overhead_ms": ra["itl_ms"] - lo["itl_ms"],
                     "ttft_overhead_ms": ra["ttft_ms"] - lo["ttft_ms"]})
    record = {"benchmark": "ray_overhead", "command": args._command,
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine_info(("jax", "jaxlib", "numpy", "ray")),
              "config": {"model": args.model, "precision": args.precision,
                         "dtype": args.dtype, "max_tokens": args.max_tokens,
                         "rounds": args.rounds, "engine": _engine_config(args)},
              "results": rows}
    write_json(args.out, record)
    print(table(record))
    return 0


def table(record: dict) -> str:
    header = ["in flight", "local TTFT ms", "Ray TTFT ms", "local ITL ms", "Ray ITL ms",
              "ITL overhead ms", "local tok/s", "Ray tok/s"]
    rows = [[str(r["concurrency"]), f"{r['local']['ttft_ms']:.1f}", f"{r['ray']['ttft_ms']:.1f}",
             f"{r['local']['itl_ms']:.2f}", f"{r['ray']['itl_ms']:.2f}",
             f"{r['itl_overhead_ms']:+.2f}", f"{r['local']['tokens_per_s']:.1f}",
             f"{r['ray']['tokens_per_s']:.1f}"] for r in record["results"]]
    c = record["config"]
    foot = [f"{c['model']} {c['precision']} {c['dtype']}, {c['max_tokens']} tokens per request, "
            f"{c['rounds']} rounds per level; medians over requests; outputs equal"]
    return format_table(header, rows, foot)
