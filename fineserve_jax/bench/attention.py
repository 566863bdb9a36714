"""``python -m fineserve_jax.bench kernels --op attention``: the attention kernels on a GPU.

One layer of Llama-3-8B-shaped attention (32 query heads, 8 KV heads, head_dim 128).

**Decode** (one new token per sequence) at each context and batch, per KV format: the
paged kernel (``pallas_kernels.paged_attention``) reading K/V from a KV Slab byte pool
through shuffled page tables, against a dense BF16 reference (``jax.nn.dot_product_attention``
on contiguous ``[B, S, Hkv, D]`` K/V, XLA) and, for BF16 KV, the engine's XLA paged path
(``PagedKVCache`` gather + attention). Each kernel row is first checked on the device
against ``PagedKVCache.attend`` (per-row relative error < 2e-2, or the run stops). Reported:
median time, the bytes the kernel must read (K/V values and scales of every live token)
over the measured copy bandwidth, and the speedup of each format over BF16 KV.

**Prefill** (causal, every token new) at each prompt length and batch: the FP8 flash
prefill kernel (``pallas_kernels.flash_prefill``; Mosaic GPU on Hopper, the generic Pallas
kernel elsewhere) against ``jax.nn.dot_product_attention`` in BF16 with
``implementation="xla"`` and ``"cudnn"``; each kernel output is first checked against its
FP8 oracle (``flash_prefill_reference``, the same roundings; per-row relative error
< 1e-2), and its distance from float32 attention is recorded. Reported: median time, useful causal TFLOP/s and the
fraction of the measured FP8 dot throughput.

Combinations whose arrays would pass ``--attn-max-gib`` are skipped and listed as such.
``--quick`` runs tiny shapes in Pallas interpret mode on a CPU: plumbing only.
"""

from __future__ import annotations

import sys
import time

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
CONTEXTS = (512, 2048, 8192, 32768)
BATCHES = (1, 16, 64, 256)
KV_FORMATS = ("bf16", "fp8", "int4", "int4-g32")
PREFILL_TOKENS = (1024, 2048, 4096)
PREFILL_BATCHES = (1, 4, 16)
BLOCK_TOKENS = 16


def add_arguments(p) -> None:
    g = p.add_argument_group("--op attention")
    g.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
    g.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    g.add_argument("--kv-formats", nargs="+", default=list(KV_FORMATS))
    g.add_argument("--prefill-tokens", type=int, nargs="+", default=list(PREFILL_TOKENS))
    g.add_argument("--prefill-batches", type=int, nargs="+", default=list(PREFILL_BATCHES))
    g.add_argument("--attn-max-gib", type=float, default=24.0,
                   help="skip a combination whose K/V arrays pass this many GiB")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _rel_rows(got, want):
    import numpy as np

    got = np.asarray(got, np.float32).reshape(-1, got.shape[-1])
    want = np.asarray(want, np.float32).reshape(-1, want.shape[-1])
    num = np.linalg.norm(got - want, axis=-1)
    return float((num / np.maximum(np.linalg.norm(want, axis=-1), 1e-30)).max())


# ------------------------------------------------------------------------ decode
def decode_case(fmt_name: str, batch: int, context: int, key, heads: int, kv_heads: int,
                head_dim: int):
    """(cache, pool, q, meta, dense k, v): ``batch`` sequences of ``context`` tokens of
    random K/V written by ``PagedKVCache.update`` into shuffled blocks of one pool."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fineserve_jax.config import ModelConfig
    from fineserve_jax.model.kv_formats import kv_format
    from fineserve_jax.model.paged import PagedKVCache, PagedKVMeta

    cfg = ModelConfig(vocab_size=256, hidden_size=heads * head_dim, intermediate_size=256,
                      num_layers=1, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=max(context, 2))
    fmt = kv_format(fmt_name)
    block = fmt.block_format(cfg, BLOCK_TOKENS)
    cache = PagedKVCache(fmt, block, 1, block.block_bytes)
    per_seq = -(-context // BLOCK_TOKENS)
    nblocks = batch * per_seq
    rng = np.random.default_rng(context + batch)
    table = rng.permutation(nblocks).astype(np.int32).reshape(batch, per_seq)
    pool = jnp.full((nblocks, block.block_bytes), 0xFF, jnp.uint8)  # poison where unwritten
    kk, kv_, kq = jax.random.split(key, 3)
    k = jax.random.normal(kk, (batch, context, kv_heads, head_dim), jnp.bfloat16)
    v = jax.random.normal(kv_, (batch, context, kv_heads, head_dim), jnp.bfloat16)
    write = jax.jit(lambda pool, k, v, pos, table: cache.update(
        pool, 0, k, v, PagedKVMeta(pos, jnp.zeros(k.shape[0], jnp.int32), table)),
        donate_argnums=0)
    step = max(1, (1 << 22) // (kv_heads * head_dim * batch))  # tokens per write call
    for a in range(0, context, step):
        n = min(step, context - a)
        pos = jnp.broadcast_to(jnp.arange(a, a + n, dtype=jnp.int32), (batch, n))
        pool = write(pool, k[:, a:a + n], v[:, a:a + n], pos, jnp.asarray(table))
    q = jax.random.normal(kq, (batch, 1, heads, head_dim), jnp.bfloat16)
    meta = PagedKVMeta(jnp.full((batch, 1), context - 1, jnp.int32),
                       jnp.full((batch,), context, jnp.int32), jnp.asarray(table))
    return cache, pool, q, meta, k, v


def decode_rows(args, pk: dict, timed) -> tuple[list, list]:
    import jax

    from pallas_kernels.paged_attention import kv_bytes_read, paged_attention

    heads, kv_heads, hd = args._attn_shape
    scale = hd ** -0.5
    interpret = args.quick
    rows, skipped = [], []
    key = jax.random.PRNGKey(0)
    for ctx in args.contexts:
        for b in args.batches:
            dense_gib = 2 * b * ctx * kv_heads * hd * 2 / 2 ** 30
            if 2 * dense_gib > args.attn_max_gib:  # dense K/V plus a BF16 pool of them
                skipped.append({"op": "decode", "context": ctx, "batch": b,
                                "gib": 2 * dense_gib})
                continue
            base = {}
            for fmt in args.kv_formats:
                cache, pool, q, meta, k, v = decode_case(fmt, b, ctx, key, heads, kv_heads, hd)
                kern = jax.jit(lambda pool, q, meta, cache=cache: paged_attention(
                    pool, 0, q, meta, cache, scale, interpret=interpret))
                xla = jax.jit(lambda pool, q, meta, cache=cache: cache.attend(
                    pool, 0, q, meta, scale))
                err = _rel_rows(kern(pool, q, meta), xla(pool, q, meta))
                if not err < 2e-2:
                    raise SystemExit(f"decode {fmt} B={b} S={ctx}: the kernel differs from "
                                     f"PagedKVCache.attend: per-row relative error {err:.3g}")
                nbytes = kv_bytes_read(cache, [ctx] * b)
                impls = {f"kernel-{fmt}": (kern, (pool, q, meta))}
                if fmt == "bf16":
                    impls["xla-paged-bf16"] = (xla, (pool, q, meta))
                    dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
                        q, k, v, scale=scale, implementation="xla"))
                    impls["dense-bf16"] = (dense, (q, k, v))
                for name, (fn, a) in impls.items():
                    t = timed(fn, a, args.reps, args.inner, args.warmup)
                    base.setdefault(name, t)
                    rows.append({"op": "decode", "context": ctx, "batch": b, "kv_format": fmt,
                                 "impl": name, "seconds": t, "kv_bytes": nbytes,
                                 "frac_bandwidth": nbytes / t / pk["copy_bytes_per_s"],
                                 "max_row_rel_err": err if name.startswith("kernel") else None})
                    _log(f"decode S={ctx} B={b} {name}: {t * 1e6:.1f} us")
                del pool, k, v
            for r in rows:
                if r["op"] == "decode" and r["context"] == ctx and r["batch"] == b:
                    r["speedup_vs_kernel_bf16"] = (base["kernel-bf16"] / r["seconds"]
                                                   if "kernel-bf16" in base else None)
                    r["speedup_vs_dense_bf16"] = (base["dense-bf16"] / r["seconds"]
                                                  if "dense-bf16" in base else None)
    return rows, skipped


# ----------------------------------------------------------------------- prefill
def prefill_rows(args, pk: dict, timed) -> tuple[list, list]:
    import jax
    import jax.numpy as jnp

    from pallas_kernels.flash_prefill import (flash_prefill, flash_prefill_reference,
                                              float_attention, flops_and_bytes)

    heads, kv_heads, hd = args._attn_shape
    rows, skipped = [], []
    key = jax.random.PRNGKey(1)
    on_gpu = jax.default_backend() == "gpu"
    for t in args.prefill_tokens:
        for b in args.prefill_batches:
            gib = b * t * (heads + 2 * kv_heads) * hd * 2 * 3 / 2 ** 30
            if gib > args.attn_max_gib:
                skipped.append({"op": "prefill", "tokens": t, "batch": b, "gib": gib})
                continue
            kq, kk, kv_ = jax.random.split(jax.random.fold_in(key, t * 131 + b), 3)
            q = jax.random.normal(kq, (b, t, heads, hd), jnp.bfloat16)
            k = jax.random.normal(kk, (b, t, kv_heads, hd), jnp.bfloat16)
            v = jax.random.normal(kv_, (b, t, kv_heads, hd), jnp.bfloat16)
            lengths = jnp.full((b,), t, jnp.int32)
            backend = "auto" if on_gpu else "pallas"
            kern = jax.jit(lambda q, k, v, n: flash_prefill(q, k, v, n, backend=backend,
                                                            interpret=not on_gpu))
            got = kern(q, k, v, lengths)
            err = _rel_rows(got, flash_prefill_reference(q, k, v, lengths))
            if not err < 1e-2:
                raise SystemExit(f"prefill T={t} B={b}: the FP8 kernel differs from its "
                                 f"oracle (same FP8 roundings): per-row relative error "
                                 f"{err:.3g}")
            fp8_err = _rel_rows(got, float_attention(q, k, v, lengths))
            flops, _ = flops_and_bytes(lengths, t, heads, kv_heads, hd)
            impls = {"fp8-flash": (kern, (q, k, v, lengths))}
            for impl in (("xla", "cudnn") if on_gpu else ("xla",)):
                impls[f"{impl}-bf16"] = (jax.jit(lambda q, k, v, impl=impl:
                                                 jax.nn.dot_product_attention(
                                                     q, k, v, is_causal=True,
                                                     implementation=impl)), (q, k, v))
            got = {}
            for name, (fn, a) in impls.items():
                try:
                    sec = timed(fn, a, args.reps, args.inner, args.warmup)
                except Exception as e:  # e.g. cuDNN refusing a shape: say so, go on
                    _log(f"prefill T={t} B={b} {name}: not run ({type(e).__name__}: {e})")
                    skipped.append({"op": "prefill", "tokens": t, "batch": b, "impl": name,
                                    "error": f"{type(e).__name__}: {str(e)[:200]}"})
                    continue
                got[name] = sec
                rows.append({"op": "prefill", "tokens": t, "batch": b, "impl": name,
                             "seconds": sec, "flops": flops, "tflops": flops / sec / 1e12,
                             "frac_fp8": flops / sec / pk["fp8_flops_per_s"],
                             "max_row_rel_err": err if name == "fp8-flash" else None,
                             "max_row_err_vs_f32": fp8_err if name == "fp8-flash" else None})
                _log(f"prefill T={t} B={b} {name}: {sec * 1e6:.0f} us")
            for r in rows[-len(got):]:
                for ref in ("xla-bf16", "cudnn-bf16"):
                    r[f"speedup_vs_{ref}"] = got[ref] / r["seconds"] if ref in got else None
    return rows, skipped


# --------------------------------------------------------------------------- run
def run(args, pk: dict, timed) -> dict:
    """The record's body: decode and prefill rows, skipped combinations, goal checks."""
    if args.quick:
        args._attn_shape = (8, 2, 64)
        args.contexts, args.batches = [40], [2]
        args.kv_formats = ["bf16", "int4"]
        args.prefill_tokens, args.prefill_batches = [64], [1]
    else:
        args._attn_shape = (HEADS, KV_HEADS, HEAD_DIM)
    t0 = time.perf_counter()
    dec, skip_d = decode_rows(args, pk, timed)
    pre, skip_p = prefill_rows(args, pk, timed)
    goals = {
        "int4_vs_bf16_kv_at_8k_plus": [
            {"context": r["context"], "batch": r["batch"],
             "speedup": r["speedup_vs_kernel_bf16"]}
            for r in dec if r["impl"] == "kernel-int4" and r["context"] >= 8192],
        "fp8_prefill_vs_cudnn_bf16": [
            {"tokens": r["tokens"], "batch": r["batch"], "speedup": r.get("speedup_vs_cudnn-bf16")}
            for r in pre if r["impl"] == "fp8-flash"],
    }
    return {"shape": dict(zip(("heads", "kv_heads", "head_dim"), args._attn_shape)),
            "block_tokens": BLOCK_TOKENS, "decode": dec, "prefill": pre,
            "skipped": skip_d + skip_p, "goals": goals,
            "attention_s": time.perf_counter() - t0}


def table(body: dict) -> str:
    from fineserve_jax.bench.common import format_table

    out = []
    rows = [[str(r["context"]), str(r["batch"]), r["impl"], f"{r['seconds'] * 1e6:.1f}",
             f"{r['frac_bandwidth']:.0%}",
             "-" if r.get("speedup_vs_kernel_bf16") is None
             else f"{r['speedup_vs_kernel_bf16']:.2f}x",
             "-" if r.get("speedup_vs_dense_bf16") is None
             else f"{r['speedup_vs_dense_bf16']:.2f}x"] for r in body["decode"]]
    out.append(format_table(["context", "batch", "impl", "us", "of BW", "vs kernel bf16",
                             "vs dense bf16"], rows, left=3,
                            footer=["decode: one token per sequence, one layer; BW = K/V "
                                    "bytes of live tokens over the measured copy bandwidth"]))
    rows = [[str(r["tokens"]), str(r["batch"]), r["impl"], f"{r['seconds'] * 1e6:.0f}",
             f"{r['tflops']:.1f}", f"{r['frac_fp8']:.0%}",
             "-" if r.get("speedup_vs_cudnn-bf16") is None
             else f"{r['speedup_vs_cudnn-bf16']:.2f}x"] for r in body["prefill"]]
    out.append("")
    out.append(format_table(["tokens", "batch", "impl", "us", "TFLOP/s", "of FP8", "vs cuDNN"],
                            rows, left=3, footer=["prefill: causal, useful FLOPs"]))
    if body["skipped"]:
        out.append(f"skipped: {body['skipped']}")
    return "\n".join(out)
