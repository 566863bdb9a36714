"""Profile the engine's step times and write them as a cost model (JSON).

    python -m schedulers.profile            # serve.py's two default SmolLM2 tenants
    python -m schedulers.profile --model smol=smollm2-135m,precision=fp8 --reps 7

Builds one engine for the models (loaded exactly as ``serve.py`` loads them: quantized
checkpoints through the checkpoint cache), times every compiled (rows, tokens per row,
page-table width) shape of every model with ``fineserve_jax.engine.profile.measure_steps``,
and writes a ``schedulers.costmodel.CostModel``: one ``ProfiledCost`` per model keyed by
(model, precision, JAX device kind), with the machine, versions, engine configuration and
buckets it was measured with. Prints a table last.

Defaults keep a CPU run to a few minutes: ``--max-model-len 512`` (context buckets of 8
and 32 blocks of 16 tokens), ``--max-seqs 16`` (decode batches 1, 4, 16), prefill steps
of 1 or 4 rows and 16, 64 or 256 tokens per row (``--prefill-token-budget 256``), 5 timed
repetitions. The engine is started without its warm-up: each shape's untimed first run
compiles it (the warm-up would also compile samplers and log-probability functions the
profile does not use). On a CPU the times are only ratios between shapes and precisions
(shared/BENCHMARKS.md); a GPU profile is made by the same command on the GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from types import SimpleNamespace

DEFAULT_OUT = "benchmarks/results/profile_cpu.json"


def build_parser() -> argparse.ArgumentParser:
    import serve

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", type=serve.parse_model_spec, dest="models",
                    help="NAME=SOURCE[,precision=P][,dtype=D] as serve.py (repeatable; "
                         "default: serve.py's default models)")
    ap.add_argument("--kv-budget", type=int, default=512 * 2**20, metavar="BYTES",
                    help="bytes of the shared KV pool")
    ap.add_argument("--max-seqs", type=int, default=16, help="largest decode batch")
    ap.add_argument("--max-prefill-seqs", type=int, default=4, help="rows of a prefill step")
    ap.add_argument("--max-model-len", type=int, default=512,
                    help="tokens of one sequence: the widest page table profiled")
    ap.add_argument("--prefill-token-budget", type=int, default=256,
                    help="tokens of one prefill step (the largest chunk bucket)")
    ap.add_argument("--reps", type=int, default=5, help="timed runs per shape (median)")
    ap.add_argument("--cache-dir", default=None,
                    help="quantized checkpoints (default ~/.cache/fineserve-jax)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="cost-model JSON to write")
    return ap


def command(args) -> str:
    models = " ".join(f"--model {m['name']}={m['source']},precision={m['precision']},"
                      f"dtype={m['dtype']}" for m in args.models)
    return (f"python -m schedulers.profile {models} --kv-budget {args.kv_budget} "
            f"--max-seqs {args.max_seqs} --max-prefill-seqs {args.max_prefill_seqs} "
            f"--max-model-len {args.max_model_len} "
            f"--prefill-token-budget {args.prefill_token_budget} --reps {args.reps} "
            f"--out {args.out}")


def build_engine(args, loaded: dict, specs: dict):
    from fineserve_jax.engine import Engine, EngineConfig

    cfg = EngineConfig(kv_budget_bytes=args.kv_budget, max_seqs=args.max_seqs,
                       max_prefill_seqs=args.max_prefill_seqs,
                       max_model_len=args.max_model_len,
                       prefill_token_budget=args.prefill_token_budget, warmup=False)
    engine = Engine(cfg)
    for name, (model, prec) in loaded.items():
        engine.add_model(name, model.config, model.params, model.tokenizer,
                         dtype=specs[name]["dtype"], precision=prec)
    return engine.start(thread=False)


def cost_model(engine, records: list[dict], machine: dict, device_kind: str, extra: dict):
    """-> CostModel with one bucketed ``ProfiledCost`` per model of ``engine``."""
    from schedulers.costmodel import CostModel, EngineBuckets, ProfiledCost

    cm = CostModel(machine=machine, engine={"config": dataclasses.asdict(engine.config),
                                            **extra})
    for name in engine.models:
        m = engine._model(name)
        bk = m.buckets
        buckets = EngineBuckets(engine.config.block_tokens, bk.decode, bk.prefill_rows,
                                bk.chunks, bk.context)
        c = m.config
        info = {"dtype": m.dtype, "kv_format": m.kv_format,
                "kv_block_bytes": engine.alloc.fmt(name).block_bytes,
                "shape": {"layers": c.num_layers, "hidden": c.hidden_size,
                          "intermediate": c.intermediate_size, "heads": c.num_heads,
                          "kv_heads": c.num_kv_heads, "head_dim": c.head_dim,
                          "vocab": c.vocab_size,
                          "tied_embeddings": bool(c.tie_word_embeddings)}}
        pts = [{k: r[k] for k in ("kind", "rows", "tokens", "context_blocks", "seconds")}
               for r in records if r["model"] == name]
        cm.add(name, m.precision, device_kind, ProfiledCost(pts, buckets, info=info))
    return cm


def table(records: list[dict], names: list[str]) -> str:
    from fineserve_jax.bench.common import CPU_FOOTER, format_table

    by = {(r["model"], r["kind"], r["rows"], r["tokens"], r["context_blocks"]): r["seconds"]
          for r in records}
    shapes = sorted({k[1:] for k in by}, key=lambda s: (s[0] != "decode", s[1:]))
    rows = [[kind, str(b), str(t), str(p), *(f"{by[(n, kind, b, t, p)] * 1e3:.2f}"
                                            for n in names)]
            for kind, b, t, p in shapes]
    return format_table(["step", "rows", "tokens", "ctx blocks", *(f"{n} ms" for n in names)],
                        rows, footer=[CPU_FOOTER], left=1)


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    import serve

    args.models = args.models or [serve.parse_model_spec(s) for s in serve.DEFAULT_MODELS]
    specs = {m["name"]: m for m in args.models}
    if len(specs) != len(args.models):
        ap.error(f"duplicate model names: {[m['name'] for m in args.models]}")
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src.xla_bridge"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import jax

    from checkpoints.cache import default_cache_dir
    from fineserve_jax.bench.common import machine_info
    from fineserve_jax.bench.engine import git_state
    from fineserve_jax.engine.profile import measure_steps

    cache = default_cache_dir() if args.cache_dir is None else args.cache_dir
    jax.config.update("jax_compilation_cache_dir", f"{cache}/xla")
    t0 = time.perf_counter()
    loaded = serve.load_models(SimpleNamespace(cache_dir=args.cache_dir), list(specs.values()))
    try:
        engine = build_engine(args, loaded, specs)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    log = logging.getLogger("profile")
    records = measure_steps(engine, reps=args.reps, progress=lambda r: log.info(
        "%s %s %dx%dx%d: %.2f ms", r["model"], r["kind"], r["rows"], r["tokens"],
        r["context_blocks"], r["seconds"] * 1e3))
    measure_s = time.perf_counter() - t1
    dev = jax.devices()[0]
    machine = {**machine_info(), "device_kind": dev.device_kind, "jax_platform": dev.platform}
    extra = {"command": command(args), "git": git_state(), "reps": args.reps,
             "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "load_s": round(load_s, 1), "measure_s": round(measure_s, 1)}
    cm = cost_model(engine, records, machine, dev.device_kind, extra)
    path = cm.save(args.out)
    print(f"\n{len(records)} step shapes of {len(specs)} models on {dev.device_kind} "
          f"({machine['processor']}) in {measure_s:.0f}s -> {path}\n")
    print(table(records, list(specs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
