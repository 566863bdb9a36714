"""Serve models behind one OpenAI-compatible endpoint.

    python serve.py                       # SmolLM2-135M (bf16) on 127.0.0.1:8000
    python serve.py --model fast=smollm2-135m,dtype=float32 --port 9000

``--model NAME=SOURCE[,precision=P][,dtype=D]`` is repeatable; SOURCE is an alias, a
.gguf file, an HF directory or an Orbax checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

DEFAULT_MODELS = ["smollm2-135m-bf16=smollm2-135m,precision=bf16,dtype=bfloat16"]


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

    import uvicorn

    from fineserve_jax import LLM, SamplingParams
    from fineserve_jax.server import build_app
    from fineserve_jax.server.worker import ModelWorker

    workers = {}
    for s in specs:
        t0 = time.perf_counter()
        try:
            llm = LLM(s["source"], precision=s["precision"], dtype=s["dtype"])
        except (OSError, ValueError) as e:
            log.error("cannot load model %s from %s: %s", s["name"], s["source"], e)
            return 1
        llm.generate("Warm-up", SamplingParams(max_tokens=2, temperature=0))
        w = ModelWorker(s["name"], llm)
        w.start()
        workers[s["name"]] = w
        log.info("model %s: %s precision=%s dtype=%s on %s, ready in %.1fs", s["name"],
                 s["source"], s["precision"], s["dtype"],
                 next(iter(llm.runner.params["embed"].devices())), time.perf_counter() - t0)
    log.info("serving %s on http://%s:%d/v1", ", ".join(workers), args.host, args.port)
    uvicorn.run(build_app(workers), host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
