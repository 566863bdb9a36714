"""``python -m pallas_kernels.tune_w4a8``: time every block config of the INT4 x FP8 GEMM
on this GPU and write the fastest per problem to ``pallas_kernels/w4a8_tuned.json``.

Problems: the linear shapes of ``fineserve_jax.bench.kernels.SHAPES`` (gate/up also as
one gated weight), both weight formats, one M per bucket of ``w4a8.M_BUCKETS``. The table
is keyed by device kind, so one file holds several GPUs; ``w4a8_matmul`` reads it through
``pick_config`` and falls back to ``default_config``. A config that fails to compile or
disagrees with the reference is skipped and reported.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.w4a8 import (M_BUCKETS, TUNED_PATH, BlockConfig, W4A8Weight,
                                 fuse_gate_up, quantize_activations, tuning_key, w4a8_matmul,
                                 w4a8_reference)

FORMATS = {"fireq": dict(group=128, symmetric=True, scale_dtype="fp8"),
           "fireq-g32": dict(group=32, symmetric=False, scale_dtype="f16")}


def candidates(n: int, gated: bool, tile_n: int, m: int) -> list[BlockConfig]:
    out = []
    for bm, bn, warps, stages in itertools.product((16, 32, 64, 128), (64, 128, 256),
                                                   (4, 8), (3, 4)):
        if gated and bn != tile_n or n % bn or bm > max(16, 2 * m):
            continue
        out.append(BlockConfig(bm, bn, warps, stages))
    return out


def problems(models: list[str]) -> list[tuple[int, int, bool]]:
    from fineserve_jax.bench.kernels import SHAPES, layers

    out = set()
    for model in models:
        for _, n, k in layers(model):
            out.add((n, k, False))
        d, f, _ = SHAPES[model]
        out.add((2 * f, d, True))
    return sorted(out)


def bench(fn, reps: int = 5, inner: int = 10) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return float(np.median(times))


def main(argv=None) -> int:
    from fineserve_jax.bench.kernels import SHAPES
    from fineserve_jax.quant import quantize_int4

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--m", type=int, nargs="+", default=list(M_BUCKETS))
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    p.add_argument("--out", default=str(TUNED_PATH))
    args = p.parse_args(argv)
    if jax.default_backend() != "gpu":
        raise SystemExit("tune_w4a8 times GPU kernels; no GPU here")
    kind = jax.devices()[0].device_kind
    try:
        table = json.loads(open(args.out).read())
    except FileNotFoundError:
        table = {}
    mine = table.setdefault(kind, {})
    key = jax.random.PRNGKey(0)
    for (n, k, gated), fmt in itertools.product(problems(args.models), args.formats):
        if gated:
            f = n // 2
            ws = [W4A8Weight.from_int4(quantize_int4(
                jax.random.normal(jax.random.fold_in(key, i), (f, k)) * 0.02, act="fp8",
                **FORMATS[fmt])) for i in range(2)]
            w = fuse_gate_up(*ws)
        else:
            w = W4A8Weight.from_int4(quantize_int4(
                jax.random.normal(key, (n, k)) * 0.02, act="fp8", **FORMATS[fmt]))
        for m in args.m:
            q, s = quantize_activations(jax.random.normal(key, (m, k), jnp.bfloat16))
            want = np.asarray(w4a8_reference(q, s, w), np.float32)
            best = None
            for cfg in candidates(n, gated, w.tile_n, m):
                fn = jax.jit(lambda q, s, w, cfg=cfg: w4a8_matmul(q, s, w, config=cfg))
                try:
                    got = np.asarray(fn(q, s, w), np.float32)
                except Exception as e:  # a config the compiler rejects (shared memory, ...)
                    print(f"  skip {cfg}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
                    continue
                err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
                if not err < 1e-2:
                    print(f"  skip {cfg}: relative error {err:.3g}", file=sys.stderr)
                    continue
                t = bench(lambda: fn(q, s, w))
                if best is None or t < best[0]:
                    best = (t, cfg)
            if best is None:
                print(f"{fmt} {n}x{k} gated={gated} M={m}: no config ran", file=sys.stderr)
                continue
            name = tuning_key(m, n, k, fmt, gated)
            mine[name] = {**best[1].__dict__, "seconds": best[0]}
            print(f"{name}: {best[1]} {best[0] * 1e6:.1f} us", flush=True)
            with open(args.out, "w") as fh:  # after every problem: a cut-off run keeps them
                json.dump(table, fh, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
