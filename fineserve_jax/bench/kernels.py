"""``python -m fineserve_jax.bench kernels --op w4a8``: the INT4 x FP8 GEMM against XLA.

For the linear layers of Llama-2-7B and Llama-3-8B (``SHAPES``) at each M (tokens in the
step), one run times, on the same device and inputs:

* ``xla-bf16``: ``x @ w.T`` with BF16 ``x`` and ``w`` (XLA's dot, cuBLAS on a GPU);
* ``xla-fp8``: E4M3 ``x`` and ``w`` with per-token and per-channel scales (XLA's FP8 dot);
* ``w4a16``: INT4 weights (group 128, BF16 scales) dequantized in XLA, BF16 activations;
* ``w4a8-fireq`` and ``w4a8-fireq-g32``: ``pallas_kernels.w4a8.w4a8_matmul`` on
  pre-quantized FP8 activations, for both weight formats;
* ``w4a8-fireq-mosaic`` and ``w4a8-g32-mosaic`` (Hopper only): the same through
  ``pallas_kernels.w4a8_hopper.w4a8_matmul_hopper`` (Mosaic GPU, TMA + FP8 wgmma) on the
  weight in its Hopper layout (``W4A8HopperWeight``: scales pre-transposed).

Each figure is the median over ``--reps`` timed runs of ``--inner`` back-to-back calls
(after ``--warmup`` untimed ones), divided by ``--inner``. Against measured peaks, also in
the same run: the device's copy bandwidth (``x + 1`` over a 1 GiB BF16 array: 2 GiB
moved) and its FP8 dot throughput (an 8192^3 E4M3 XLA dot): small M reports the fraction
of bandwidth (bytes of weights, activations and output per second), large M the fraction
of FP8 throughput.

Also measured: the full FFN (gate + up, SiLU-multiply, down + residual) through the
model's own ``linear`` / ``linear_residual`` dispatch (activation quantization included)
for fireq against BF16; and with ``--e2e``, the decode step time of a Llama-3-8B-shaped
model with random weights in fireq (INT4 KV, FP8 queries) against BF16 at batch 1 to 64.

``--quick`` runs tiny shapes in Pallas interpret mode to check the plumbing on a CPU;
its times mean nothing.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

HELP = ("kernel microbenchmarks (GPU): --op w4a8 times the INT4xFP8 GEMM against XLA BF16 "
        "and FP8 dots and W4A16 on Llama-2-7B / Llama-3-8B linear shapes; --op attention "
        "the paged decode and FP8 prefill attention kernels")

# (hidden, FFN, KV width) per model; layers are (name, N, K).
SHAPES = {"llama2-7b": (4096, 11008, 4096), "llama3-8b": (4096, 14336, 1024)}
QUICK_SHAPES = {"tiny": (256, 384, 128)}
M_VALUES = (1, 16, 64, 256, 1024, 16384)
MOSAIC_IMPLS = ("w4a8-fireq-mosaic", "w4a8-g32-mosaic")  # timed on Hopper GPUs only
IMPLS = ("xla-bf16", "xla-fp8", "w4a16", "w4a8-fireq", "w4a8-fireq-g32", *MOSAIC_IMPLS)


def layers(model: str, shapes=None) -> list[tuple[str, int, int]]:
    d, f, kv = (shapes or SHAPES)[model]
    return [("q/o", d, d), ("k/v", kv, d), ("gate/up", f, d), ("down", d, f)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--op", choices=["w4a8", "attention"], default="w4a8",
                   help="which kernel: the INT4xFP8 GEMM, or paged decode and FP8 prefill "
                        "attention (fineserve_jax.bench.attention)")
    p.add_argument("--models", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--m", type=int, nargs="+", default=list(M_VALUES), help="tokens M")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--inner", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--e2e", action="store_true",
                   help="also decode steps of a Llama-3-8B-shaped model, fireq vs bf16")
    p.add_argument("--e2e-batch", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--e2e-context", type=int, default=512)
    p.add_argument("--quick", action="store_true", help="tiny shapes, interpret mode (CPU)")
    p.add_argument("--out", default=None, help="JSON record (default: "
                   "benchmarks/results/kernels_<op>.json)")
    from fineserve_jax.bench import attention

    attention.add_arguments(p)


# -------------------------------------------------------------------------- timing
def timed(fn, args, reps: int, inner: int, warmup: int) -> float:
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return float(statistics.median(times))


def peaks(args) -> dict:
    """Measured copy bandwidth (B/s) and FP8 dot throughput (FLOP/s) of this device."""
    import jax
    import jax.numpy as jnp

    n = 2 ** 20 if args.quick else 2 ** 29  # BF16 elements (1 GiB on a GPU)
    x = jnp.ones((n,), jnp.bfloat16)
    t = timed(jax.jit(lambda a: a + 1), (x,), args.reps, args.inner, args.warmup)
    bw = 2 * n * 2 / t
    s = 256 if args.quick else 8192
    a = jnp.ones((s, s), jnp.float8_e4m3fn)
    dot = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                                   preferred_element_type=jnp.float32))
    t = timed(dot, (a, a), args.reps, args.inner, args.warmup)
    return {"copy_bytes_per_s": bw, "fp8_flops_per_s": 2 * s ** 3 / t}


# ------------------------------------------------------------------- the contenders
def make_impls(n: int, k: int, m: int, key, quick: bool) -> dict:
    """name -> (jitted fn, args, bytes moved) for one (M, N, K)."""
    import jax
    import jax.numpy as jnp

    from fineserve_jax.quant import quantize_int4, reference_linear
    from pallas_kernels.w4a8 import W4A8Weight, quantize_activations, w4a8_matmul

    kw, kx = jax.random.split(key)
    w = jax.random.normal(kw, (n, k), jnp.float32) * 0.02
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    wb = w.astype(jnp.bfloat16)
    dn = (((1,), (1,)), ((), ()))
    out = {"xla-bf16": (jax.jit(lambda x, w: jax.lax.dot_general(
        x, w, dn, preferred_element_type=jnp.float32).astype(jnp.bfloat16)), (x, wb),
        2 * n * k + 2 * m * k + 2 * m * n)}
    from fineserve_jax.quant import quantize_fp8_weight

    w8 = quantize_fp8_weight(w)
    q, s = quantize_activations(x)

    def fp8(q, s, v, ws):
        y = jax.lax.dot_general(q, v, dn, preferred_element_type=jnp.float32)
        return (y * s[:, None] * ws[None, :]).astype(jnp.bfloat16)

    out["xla-fp8"] = (jax.jit(fp8), (q, s, w8.values, w8.scales), n * k + m * k + 2 * m * n)
    w4 = quantize_int4(w, group=128, symmetric=True, scale_dtype="bf16", act=None)
    out["w4a16"] = (jax.jit(reference_linear), (x, w4), w4.nbytes + 2 * m * k + 2 * m * n)
    for fmt, kwargs in (("fireq", dict(group=128, symmetric=True, scale_dtype="fp8")),
                        ("fireq-g32", dict(group=32, symmetric=False, scale_dtype="f16"))):
        wk = W4A8Weight.from_int4(quantize_int4(w, act="fp8", **kwargs))
        fn = jax.jit(lambda q, s, wk: w4a8_matmul(q, s, wk, interpret=quick))
        out[f"w4a8-{fmt}"] = (fn, (q, s, wk), wk.nbytes + m * k + 2 * m * n)
    from pallas_kernels.w4a8_hopper import W4A8HopperWeight, is_hopper, w4a8_matmul_hopper

    if not quick and is_hopper(jax.devices()[0].device_kind):
        for name, fmt in zip(MOSAIC_IMPLS, ("fireq", "fireq-g32")):
            fn = jax.jit(lambda q, s, wk: w4a8_matmul_hopper(q, s, wk))
            _, (q_, s_, wk), nbytes = out[f"w4a8-{fmt}"]
            out[name] = (fn, (q_, s_, W4A8HopperWeight.from_w4a8(wk)), nbytes)
    return out


def ffn_case(d: int, f: int, m: int, key, quick: bool) -> dict:
    """BF16 vs fireq FFN (gate+up, SiLU-multiply, down + residual) through ``linear``."""
    import jax
    import jax.numpy as jnp

    from fineserve_jax.linear import linear, linear_residual
    from fineserve_jax.quant import quantize_int4
    from pallas_kernels.w4a8 import W4A8Weight, fuse_gate_up

    ks = jax.random.split(key, 4)
    wg, wu = (jax.random.normal(k, (f, d), jnp.float32) * 0.02 for k in ks[:2])
    wd = jax.random.normal(ks[2], (d, f), jnp.float32) * 0.02
    x = jax.random.normal(ks[3], (m, d), jnp.bfloat16)

    def bf16(x, wg, wu, wd):
        g, u = linear(x, wg), linear(x, wu)
        h = (jax.nn.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)).astype(x.dtype)
        return x + linear(h, wd)

    def kern(x, gu, wdk):
        return linear_residual(linear(x, gu), wdk, x)

    q4 = dict(group=128, symmetric=True, scale_dtype="fp8", act="fp8")
    gu = fuse_gate_up(*(W4A8Weight.from_int4(quantize_int4(w, **q4)) for w in (wg, wu)))
    wdk = W4A8Weight.from_int4(quantize_int4(wd, **q4))
    return {"xla-bf16": (jax.jit(bf16), (x, *(w.astype(jnp.bfloat16) for w in (wg, wu, wd)))),
            "w4a8-fireq": (jax.jit(kern), (x, gu, wdk))}


# -------------------------------------------------------------------------- e2e
def e2e(args) -> list[dict]:
    """Decode steps of a Llama-3-8B-shaped model (random weights), fireq vs bf16."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fineserve_jax.config import ModelConfig
    from fineserve_jax.model.kv_formats import kv_format
    from fineserve_jax.model.params import init_params
    from fineserve_jax.quant import quantize_int4
    from fineserve_jax.quant.model import LINEARS
    from fineserve_jax.runner import DenseRunner
    from fineserve_jax.sampling import GREEDY, SamplingArrays, SamplingParams

    if args.quick:
        cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=384, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=64)
    else:
        cfg = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                          num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                          max_position_embeddings=8192, rope_theta=500000.0)
    params = init_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16)
    layers = dict(params["layers"])
    for n in LINEARS:  # one layer at a time: a stacked f32 copy of an FFN weight is 7.5 GB
        per = [quantize_int4(layers[n][i].astype(jnp.float32), group=128, symmetric=True,
                             scale_dtype="fp8", act="fp8") for i in range(cfg.num_layers)]
        layers[n] = jax.tree.map(lambda *a: jnp.stack(a), *per)
    fireq = {**params, "layers": layers}
    runners = {"bf16": DenseRunner(cfg, params, "bfloat16"),
               "fireq": DenseRunner(cfg, fireq, "bfloat16", kv_format=kv_format("int4"),
                                    query_fp8=True)}
    ctx = args.e2e_context
    rows = []
    for b in args.e2e_batch:
        tokens = np.ones((b, 1), np.int32)
        positions = np.full((b, 1), ctx, np.int32)
        lens = np.full((b,), ctx + 1, np.int32)
        idx = np.zeros((b,), np.int32)
        samp = SamplingArrays.build([SamplingParams(temperature=0.0)] * b, [0] * b, [0] * b, b)
        row = {"batch": b, "context": ctx}
        for name, r in runners.items():
            kv = r.new_cache(b, ctx + 64)

            def step(kv):
                return r.step(kv, tokens, positions, lens, idx, samp, GREEDY)[1]

            for _ in range(args.warmup + 1):
                kv = step(kv)
            jax.block_until_ready(kv)
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                for _ in range(args.inner):
                    kv = step(kv)
                jax.block_until_ready(kv)
                times.append((time.perf_counter() - t0) / args.inner)
            row[f"{name}_s"] = float(statistics.median(times))
        row["speedup"] = row["bf16_s"] / row["fireq_s"]
        rows.append(row)
        _log(f"e2e decode batch {b}: bf16 {row['bf16_s'] * 1e3:.2f} ms, fireq "
             f"{row['fireq_s'] * 1e3:.2f} ms ({row['speedup']:.2f}x)")
    return rows


# --------------------------------------------------------------------------- run
def run(args) -> int:
    import jax

    from pallas_kernels import w4a8

    if args.quick:
        args.models, args.reps, args.inner, args.warmup = ["tiny"], 1, 1, 0
        if args.m == list(M_VALUES):
            args.m = [1, 17]
        args.e2e_batch = [1, 2]
        shapes = QUICK_SHAPES
        w4a8.KERNEL_MODE = "interpret"  # the fused FFN's linear() runs the interpreter
    else:
        shapes = SHAPES
        if jax.default_backend() != "gpu":
            raise SystemExit("bench kernels times GPU kernels; on a CPU use --quick "
                             "(interpret mode, plumbing only)")
    args.out = args.out or f"benchmarks/results/kernels_{args.op}.json"
    try:
        return _run_attention(args) if args.op == "attention" else _run(args, shapes)
    finally:
        w4a8.KERNEL_MODE = None


def _run_attention(args) -> int:
    import jax

    from fineserve_jax.bench import attention
    from fineserve_jax.bench.common import versions, write_json

    pk = peaks(args)
    body = attention.run(args, pk, timed)
    record = {"benchmark": "kernels-attention", "command": _command(args),
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                          "versions": versions(("jax", "jaxlib", "numpy")),
                          "device": str(jax.devices()[0].device_kind), "quick": args.quick},
              "peaks": pk, **body}
    _log(f"wrote {write_json(args.out, record)}")
    print(attention.table(record))
    return 0


def _command(args) -> str:
    return getattr(args, "_command", "python -m fineserve_jax.bench kernels")


def check(impls: dict) -> dict:
    """Per-row relative error of each kernel against its f32 reference, on the device."""
    import numpy as np

    from pallas_kernels.w4a8 import w4a8_reference

    out = {}
    for name, (fn, a, _) in impls.items():
        if name.startswith("w4a8"):
            got = np.asarray(fn(*a), np.float32)
            want = np.asarray(w4a8_reference(*a), np.float32)
            err = np.linalg.norm(got - want, axis=-1) / np.maximum(
                np.linalg.norm(want, axis=-1), 1e-30)
            out[name] = float(err.max())
    return out


def _run(args, shapes) -> int:
    import jax

    from fineserve_jax.bench.common import versions, write_json

    t0 = time.perf_counter()
    pk = peaks(args)
    _log(f"measured: copy {pk['copy_bytes_per_s'] / 1e9:.0f} GB/s, FP8 dot "
         f"{pk['fp8_flops_per_s'] / 1e12:.0f} TFLOP/s")
    key = jax.random.PRNGKey(0)
    rows = []
    for model in args.models:
        for lname, n, k in layers(model, shapes):
            for m in args.m:
                impls = make_impls(n, k, m, key, args.quick)
                errs = check({k_: v for k_, v in impls.items() if k_ in args.impls})
                bad = {k_: e for k_, e in errs.items() if not e < 1e-2}
                if bad:
                    raise SystemExit(f"{model} {lname} M={m}: kernel differs from its "
                                     f"reference: per-row relative error {bad}")
                base = None
                for name in (i for i in args.impls if i in impls):  # mosaic: Hopper only
                    fn, a, nbytes = impls[name]
                    t = timed(fn, a, args.reps, args.inner, args.warmup)
                    base = t if name == "xla-bf16" else base
                    rows.append({"model": model, "layer": lname, "n": n, "k": k, "m": m,
                                 "impl": name, "seconds": t, "bytes": nbytes,
                                 "flops": 2 * m * n * k,
                                 "frac_bandwidth": nbytes / t / pk["copy_bytes_per_s"],
                                 "frac_fp8": 2 * m * n * k / t / pk["fp8_flops_per_s"],
                                 "speedup_vs_bf16": None if base is None else base / t,
                                 "max_row_rel_err": errs.get(name)})
                    _log(f"{model} {lname} M={m}: {name} {t * 1e6:.1f} us")
    ffn = []
    for model in args.models:
        d, f, _ = shapes[model]
        for m in ([min(args.m)] if args.quick else sorted({min(args.m), 16, 16384})):
            case = ffn_case(d, f, m, key, args.quick)
            t = {name: timed(fn, a, args.reps, args.inner, args.warmup)
                 for name, (fn, a) in case.items()}
            ffn.append({"model": model, "m": m, "bf16_s": t["xla-bf16"],
                        "fireq_s": t["w4a8-fireq"], "speedup": t["xla-bf16"] / t["w4a8-fireq"]})
            _log(f"{model} FFN M={m}: bf16 {t['xla-bf16'] * 1e6:.0f} us, fireq "
                 f"{t['w4a8-fireq'] * 1e6:.0f} us ({ffn[-1]['speedup']:.2f}x)")
    record = {
        "benchmark": "kernels-w4a8",
        "command": _command(args),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                    "versions": versions(("jax", "jaxlib", "numpy")),
                    "device": str(jax.devices()[0].device_kind), "quick": args.quick},
        "peaks": pk, "results": rows, "ffn": ffn,
        "e2e": e2e(args) if args.e2e else None,
        "total_s": time.perf_counter() - t0,
    }
    _log(f"wrote {write_json(args.out, record)}")
    print(table(record))
    return 0


def table(record: dict) -> str:
    from fineserve_jax.bench.common import format_table

    rows = []
    for r in record["results"]:
        sp = r["speedup_vs_bf16"]
        frac = r["frac_bandwidth"] if r["m"] <= 64 else r["frac_fp8"]
        rows.append([r["model"], r["layer"], str(r["m"]), r["impl"], f"{r['seconds'] * 1e6:.1f}",
                     "-" if sp is None else f"{sp:.2f}x",
                     f"{frac:.0%} {'BW' if r['m'] <= 64 else 'FP8'}"])
    out = [format_table(["model", "layer", "M", "impl", "us", "vs bf16", "of peak"], rows, left=4)]
    out.append("")
    out.append(format_table(["model", "M", "bf16 us", "fireq us", "speedup"],
                            [[f["model"], str(f["m"]), f"{f['bf16_s'] * 1e6:.0f}",
                              f"{f['fireq_s'] * 1e6:.0f}", f"{f['speedup']:.2f}x"]
                             for f in record["ffn"]], left=1,
                            footer=["FFN: gate+up, SiLU-multiply, down + residual"]))
    if record.get("e2e"):
        out.append("")
        out.append(format_table(["batch", "bf16 ms", "fireq ms", "speedup"],
                                [[str(e["batch"]), f"{e['bf16_s'] * 1e3:.2f}",
                                  f"{e['fireq_s'] * 1e3:.2f}", f"{e['speedup']:.2f}x"]
                                 for e in record["e2e"]], left=1,
                                footer=[f"decode step at context {record['e2e'][0]['context']}"]))
    return "\n".join(out)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
