"""Benchmark programs: ``python -m fineserve_jax.bench <subcommand> [options]``.

Each subcommand is a module with ``add_arguments(parser)`` and ``run(args) -> int``; it
writes a JSON record (machine, versions, config, every figure) and prints a short table
last. See /work/shared/BENCHMARKS.md for what a figure from a CPU machine means.
"""
