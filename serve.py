"""Serve models behind one OpenAI-compatible endpoint.

    python serve.py                       # SmolLM2-135M (bf16) on 127.0.0.1:8000
    python serve.py --model fast=smollm2-135m,dtype=float32 --port 9000

``--model NAME=SOURCE[,precision=P][,dtype=D]`` is repeatable; SOURCE is an alias, a
.gguf file, an HF directory or an Orbax checkpoint. Every model shares one engine and
one KV pool of ``--kv-budget`` bytes on the default device.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

DEFAULT_MODELS = ["smollm2-135m-bf16=smollm2-135m,precision=bf16,dtype=bfloat16"]
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "fineserve-jax")


def parse_model_spec(spec: str) -> dict:
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"--model {spec!r}: expected NAME=SOURCE[,key=value...]")
    source, *opts = rest.split(",")
    out = {"name": name, "source": source, "precision": "bf16", "dtype": "bfloat16"}
    for o in opts:
        k, sep, v = o.partition("=")
        if not sep or k not in ("precision", "dtype"):
            raise argparse.ArgumentTypeError(f"--model {spec!r}: unknown option {o!r} "
                                             f"(precision=, dtype=)")
        out[k] = v
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model", action="append", type=parse_model_spec, dest="models",
                    help="NAME=SOURCE[,precision=P][,dtype=D] (repeatable)")
    ap.add_argument("--kv-budget", type=int, default=512 * 2**20, metavar="BYTES",
                    help="bytes of the KV pool shared by all models")
    ap.add_argument("--max-seqs", type=int, default=16, help="running sequences per model")
    ap.add_argument("--max-model-len", type=int, default=2048,
                    help="prompt + output tokens of one request (capped by each model)")
    ap.add_argument("--log-level", default="info",
                    choices=("debug", "info", "warning", "error"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("serve")
    specs = args.models or [parse_model_spec(s) for s in DEFAULT_MODELS]
    names = [s["name"] for s in specs]
    if len(set(names)) != len(names):
        ap.error(f"duplicate model names: {names}")

    import jax
    import uvicorn

    from checkpoints import load_in_precision
    from fineserve_jax.engine import Engine, EngineConfig
    from fineserve_jax.llm import PRECISIONS
    from fineserve_jax.server import build_app

    # Compiled steps persist between starts: the second start skips most of the warm-up.
    jax.config.update("jax_compilation_cache_dir", os.path.join(CACHE_DIR, "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    try:
        cfg = EngineConfig(kv_budget_bytes=args.kv_budget, max_seqs=args.max_seqs,
                           max_model_len=args.max_model_len)
    except ValueError as e:
        ap.error(str(e))
    engine = Engine(cfg)
    for s in specs:
        if s["precision"] not in PRECISIONS:
            log.error("model %s: precision %r is not available; choose from %s", s["name"],
                      s["precision"], PRECISIONS)
            return 1
        t0 = time.perf_counter()
        try:
            loaded, prec = load_in_precision(s["source"], s["precision"], s["dtype"],
                                             progress=True)
        except (OSError, ValueError) as e:
            log.error("cannot load model %s from %s: %s", s["name"], s["source"], e)
            return 1
        engine.add_model(s["name"], loaded.config, loaded.params, loaded.tokenizer,
                         dtype=s["dtype"], precision=prec)
        log.info("model %s: %s precision=%s dtype=%s loaded in %.1fs", s["name"], s["source"],
                 s["precision"], s["dtype"], time.perf_counter() - t0)
    t0 = time.perf_counter()
    engine.start()
    pool = engine.stats().pool
    log.info("engine on %s: KV pool %.0f MiB (%d slabs of %d B, allocator %s), warm-up %.1fs",
             engine.device, pool.pool_bytes / 2**20, pool.rows_total, pool.row_bytes,
             cfg.allocator, time.perf_counter() - t0)
    log.info("serving %s on http://%s:%d/v1", ", ".join(engine.models), args.host, args.port)
    uvicorn.run(build_app(engine), host=args.host, port=args.port, log_level=args.log_level)
    engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
