"""``python -m fineserve_jax.bench accuracy``: perplexity of every precision and ablation.

SmolLM2-135M on the packaged Wikipedia text (shared/ASSETS.md: keys sorted, one piece),
tokens ``[0, --tokens)`` in non-overlapping windows of ``--window``: the same tokens and
windows for every variant. Each variant is a ``precisions.Precision`` recipe applied to the
float32 weights as loaded (``quant.quantize_model``), then scored by the dense runner with
the recipe's KV format and query rounding, in ``--dtype`` (the serving dtype). Key
statistics for the RoPE scalings are computed once, on the calibration tokens of the
default ``SmoothingConfig`` (disjoint from the evaluation tokens), and shared.

Variants:

* the served precisions: ``bf16``, ``fp8``, ``w4a16``, ``fireq``, ``fireq-g32``;
* ``fireq`` built up step by step: no smoothing and no power-of-two multiplier, then
  + channel-wise scaling, + the pow2 per-tensor multiplier, + pre-RoPE, + post-RoPE (that
  last one is ``fireq``);
* ``fireq`` with each other KV format (bf16, fp8, int4 in groups of 32);
* KV alone: bf16 weights and activations with INT4 KV, without and with the RoPE scalings.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time

import numpy as np

from fineserve_jax.bench.common import _cpu_model, cpu_count, format_table, versions, write_json
from fineserve_jax.precisions import PRECISIONS, Precision, SmoothingConfig

HELP = "perplexity of every precision, the FireQ ablation and the KV options (SmolLM2, CPU)"


def variants() -> dict[str, Precision]:
    from fineserve_jax.quant.analysis import fireq_ablation

    fq = PRECISIONS["fireq"]
    out = {name: PRECISIONS[name] for name in ("bf16", "fp8", "w4a16", "fireq-g32", "fireq")}
    out.update({k: v for k, v in fireq_ablation().items() if k != "fireq"})
    out.update({
        "fireq: KV bf16": fq.replace(name="fireq-kv-bf16", kv_format="bf16"),
        "fireq: KV fp8": fq.replace(name="fireq-kv-fp8", kv_format="fp8"),
        "fireq: KV int4-g32": fq.replace(name="fireq-kv-int4-g32", kv_format="int4-g32"),
        "bf16 + KV int4": Precision("bf16-kv-int4", kv_format="int4"),
        "bf16 + KV int4 + RoPE scaling": Precision(
            "bf16-kv-int4-rope", kv_format="int4",
            smoothing=SmoothingConfig().without_channel()),
    })
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="alias, .gguf or HF directory")
    p.add_argument("--tokens", type=int, default=16384, help="evaluation tokens (from 0)")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--only", nargs="+", metavar="VARIANT",
                   help="evaluate only these variants (names as in the table)")
    p.add_argument("--calib-tokens", type=int, default=None,
                   help="calibration tokens (default: the SmoothingConfig default)")
    p.add_argument("--out", default="benchmarks/results/accuracy.json", help="JSON record")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def linear_weight_bytes(params) -> int:
    from fineserve_jax.quant.model import LINEARS

    total = 0
    for n in LINEARS:
        w = params["layers"][n]
        total += w.nbytes if hasattr(w, "nbytes") else int(np.asarray(w).nbytes)
    return int(total)


def run(args) -> int:
    import jax

    from checkpoints import load_model
    from fineserve_jax.eval import corpus_slice
    from fineserve_jax.bench.memory import kv_format_of
    from fineserve_jax.model.kv_formats import kv_format
    from fineserve_jax.quant.model import calibration_sequences, quantize_model
    from fineserve_jax.quant.smoothing import key_stats
    from fineserve_jax.runner import DenseRunner

    t_all = time.perf_counter()
    todo = variants()
    if args.only:
        unknown = sorted(set(args.only) - set(todo))
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; known: {list(todo)}")
        todo = {k: v for k, v in todo.items() if k in args.only}
    loaded = load_model(args.model, "float32", progress=not args.quiet)
    cfg, tok = loaded.config, loaded.tokenizer
    params32 = jax.tree.map(np.asarray, loaded.params)
    toks = corpus_slice(tok, 0, args.tokens)
    n_win = len(toks) // args.window
    if n_win == 0:
        raise SystemExit(f"--tokens {args.tokens} do not fill one window of {args.window}")
    sm = SmoothingConfig()
    calib_tokens = args.calib_tokens or sm.calib_tokens
    t0 = time.perf_counter()
    seqs = calibration_sequences(tok, sm.calib_start, calib_tokens,
                                 min(sm.calib_seq_len, calib_tokens))
    if sm.calib_start < args.tokens:
        raise SystemExit("calibration tokens overlap the evaluation tokens")
    stats = key_stats(cfg, params32, seqs, progress=not args.quiet)
    calib_s = time.perf_counter() - t0
    print(f"calibration: {seqs.size} tokens in {calib_s:.1f}s", file=sys.stderr, flush=True)

    results = []
    for label, prec in todo.items():
        t0 = time.perf_counter()
        params, rep = quantize_model(cfg, params32, prec, dtype=args.dtype, stats=stats,
                                     progress=False)
        tq = time.perf_counter() - t0
        runner = DenseRunner(cfg, params, args.dtype,
                             kv_format=kv_format(prec.kv_format) if prec.kv_format else None,
                             query_fp8=prec.query_fp8)
        nll, count = 0.0, 0
        t0 = time.perf_counter()
        for w in range(n_win):
            chunk = toks[w * args.window:(w + 1) * args.window][None]
            lp = np.asarray(runner.target_logprobs(chunk), np.float64)
            nll -= float(lp.sum())
            count += lp.size
        ppl = math.exp(nll / count)
        results.append({
            "variant": label, "precision": prec.to_dict(), "ppl": ppl,
            "predicted_tokens": count,
            "linear_weight_bytes": linear_weight_bytes(params),
            "kv_bytes_per_token": kv_format_of(prec, args.dtype).block_format(cfg, 16).token_bytes,
            "quantize_s": round(tq, 2), "eval_s": round(time.perf_counter() - t0, 2)})
        print(f"{label}: ppl {ppl:.4f} ({results[-1]['eval_s']:.0f}s)", file=sys.stderr,
              flush=True)
        del runner, params
    base = next((r for r in results if r["variant"] == "bf16"), None)
    for r in results:
        r["ratio_vs_bf16"] = r["ppl"] / base["ppl"] if base else None
    record = {
        "benchmark": "accuracy",
        "command": command(args),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "processor": _cpu_model(),
                    "cpu_count": cpu_count(), "python": sys.version.split()[0],
                    "versions": versions(("jax", "numpy")), "device": jax.default_backend()},
        "config": {"model": args.model, "tokens": [0, args.tokens], "window": args.window,
                   "windows": n_win, "dtype": args.dtype,
                   "calibration": {"start": sm.calib_start, "tokens": int(seqs.size),
                                   "seq_len": sm.calib_seq_len, "seconds": round(calib_s, 2)}},
        "results": results,
        "total_s": round(time.perf_counter() - t_all, 2),
    }
    write_json(args.out, record)
    print(table(record))
    return 0


def command(args) -> str:
    cmd = (f"python -m fineserve_jax.bench accuracy --model {args.model} --tokens {args.tokens} "
           f"--window {args.window} --dtype {args.dtype} --out {args.out}")
    if args.calib_tokens:
        cmd += f" --calib-tokens {args.calib_tokens}"
    if args.only:
        cmd += " --only " + " ".join(repr(v) for v in args.only)
    return cmd


def table(record: dict) -> str:
    bf = next((r for r in record["results"] if r["variant"] == "bf16"), None)
    header = ["variant", "ppl", "vs bf16", "linear MiB", "vs bf16 ", "KV B/token"]
    rows = []
    for r in record["results"]:
        rel = (f"{r['linear_weight_bytes'] / bf['linear_weight_bytes']:.3f}x" if bf else "-")
        rows.append([r["variant"], f"{r['ppl']:.4f}",
                     f"{r['ratio_vs_bf16']:.3f}x" if r["ratio_vs_bf16"] else "-",
                     f"{r['linear_weight_bytes'] / 2**20:.1f}", rel,
                     f"{r['kv_bytes_per_token']:.0f}"])
    c = record["config"]
    foot = [f"{c['model']}, tokens {c['tokens'][0]}-{c['tokens'][1]} in windows of "
            f"{c['window']}, {c['dtype']}; calibration {c['calibration']['tokens']} tokens "
            f"from {c['calibration']['start']}"]
    return format_table(header, rows, foot)
