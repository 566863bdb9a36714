"""``python -m pallas_kernels.tune_w4a8``: time every block config of the INT4 x FP8 GEMM
on this GPU and write the fastest per problem to ``pallas_kernels/w4a8_tuned.json``.

Problems: the linear shapes of ``fineserve_jax.bench.kernels.SHAPES`` (gate/up also as
one gated weight), both weight formats, one M per bucket of ``w4a8.M_BUCKETS``. The table
is keyed by device kind, so one file holds several GPUs; ``w4a8_matmul`` reads it through
``pick_config`` and falls back to ``default_config``. A config that fails to compile or
disagrees with the reference is skipped and reported.

``--backend mosaic`` tunes the Hopper kernel (``w4a8_hopper``: block_n, pipeline stages,
split K) on weights in its layout and writes ``pallas_kernels/w4a8_hopper_tuned.json``,
which ``w4a8_matmul_hopper`` reads through ``pick_hopper_config``.
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


def hopper_candidates(w, m: int, sms: int):
    """Mosaic configs for one problem: block_n, stages, and split K up to two blocks
    per SM."""
    from pallas_kernels.w4a8_hopper import HopperConfig

    n, n_tiles = w.packed.shape[-2], w.packed.shape[-1] * 2 // w.tile_k
    out = []
    for bn, stages in itertools.product((32, 64, 128), (2, 4)):
        if (w.gated and bn != w.tile_n) or n % bn:
            continue
        bm = 128 if m > 64 and bn <= 64 else 64
        blocks = -(-m // bm) * (n // bn)
        for split in range(1, min(n_tiles, 16) + 1):
            if n_tiles % split == 0 and (split == 1 or blocks * split <= 2 * sms):
                out.append(HopperConfig(bm, bn, stages, split))
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


def build_parser() -> argparse.ArgumentParser:
    from fineserve_jax.bench.kernels import SHAPES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--m", type=int, nargs="+", default=list(M_BUCKETS))
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    p.add_argument("--backend", choices=["triton", "mosaic"], default="triton")
    p.add_argument("--out", default=None, help="default: the backend's table next to it")
    return p


def main(argv=None) -> int:
    from fineserve_jax.quant import quantize_int4

    args = build_parser().parse_args(argv)
    mosaic = args.backend == "mosaic"
    if mosaic:
        from pallas_kernels import w4a8_hopper

        args.out = args.out or str(w4a8_hopper.HOPPER_TUNED_PATH)
    args.out = args.out or str(TUNED_PATH)
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
            if mosaic:
                wk = w4a8_hopper.W4A8HopperWeight.from_w4a8(w)
                cands = hopper_candidates(w, m, w4a8_hopper.num_sms())
                kernel = w4a8_hopper.w4a8_matmul_hopper
            else:
                wk, cands, kernel = w, candidates(n, gated, w.tile_n, m), w4a8_matmul
            for cfg in cands:
                fn = jax.jit(lambda q, s, w, cfg=cfg, kernel=kernel: kernel(q, s, w, config=cfg))
                try:
                    got = np.asarray(fn(q, s, wk), np.float32)
                except Exception as e:  # a config the compiler rejects (shared memory, ...)
                    print(f"  skip {cfg}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
                    continue
                err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
                if not err < 1e-2:
                    print(f"  skip {cfg}: relative error {err:.3g}", file=sys.stderr)
                    continue
                t = bench(lambda: fn(q, s, wk))
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
