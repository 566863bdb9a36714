"""Entry point: ``python -m fineserve_jax.bench <subcommand> [options]``.

To add a subcommand, write a module here with ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int``, and add it to ``SUBCOMMANDS``. Every module is imported to build
the parser, so heavy optional imports (torch, transformers) belong inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "model": "fineserve_jax.bench.model",  # SmolLM2 prefill/decode, engine vs transformers
    "kvslab": "fineserve_jax.bench.kvslab",  # KV Slab vs baselines, host simulation
    "engine": "fineserve_jax.bench.engine",  # two SmolLM2 tenants, bursts, per allocator
    "accuracy": "fineserve_jax.bench.accuracy",  # perplexity per precision and ablation
    "memory": "fineserve_jax.bench.memory",  # weight and KV bytes per precision
    "serve": "fineserve_jax.bench.serve",  # load client against a running server
    "cluster": "fineserve_jax.bench.cluster",  # simulated cluster, FineServe vs baselines
    "replace": "fineserve_jax.bench.replace",  # simulated re-placement under drifting rates
    "ray": "fineserve_jax.bench.ray_overhead",  # per-token cost of a Ray worker vs local
    "kernels": "fineserve_jax.bench.kernels",  # GPU kernels against XLA (--op w4a8|attention)
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fineserve_jax.bench",
                                     description="fineserve-jax benchmark programs")
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args._command = "python -m fineserve_jax.bench " + " ".join(argv)  # for records
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
