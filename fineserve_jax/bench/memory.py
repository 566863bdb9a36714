"""``python -m fineserve_jax.bench memory``: weight and KV bytes of every precision.

Computed from the shapes and dtypes of the quantized params tree (``quant.model.
abstract_quantized``: the quantizer traced, nothing rounded) and of each precision's KV
block format, for a model config (default SmolLM2-135M). Linear weights are q, k, v, o,
gate, up and down of every layer (packed values, scales, offsets, exponents); "all weights"
adds embeddings, norms and the LM head, which every precision keeps in ``--dtype``.
"""

from __future__ import annotations

import argparse
import math
import sys

from fineserve_jax.bench.common import format_table, write_json
from fineserve_jax.precisions import PRECISIONS

HELP = "weight bytes and KV bytes per token of every precision (from shapes, no weights)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="alias, .gguf or HF directory (only its config is read)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--block-tokens", type=int, default=16)
    p.add_argument("--out", default=None, help="also write the figures here (JSON)")


def model_config(src: str):
    from checkpoints.sources import ALIASES, source_kind

    kind = source_kind(src)
    if kind in ("alias", "gguf"):
        from pathlib import Path

        from checkpoints.gguf_source import GGUFSource

        return GGUFSource(ALIASES[src]() if kind == "alias" else Path(src)).config
    if kind == "hf":
        from checkpoints.hf_source import HFSource

        return HFSource(src).config
    from checkpoints.orbax_io import read_metadata
    from fineserve_jax.config import ModelConfig

    return ModelConfig.from_dict(read_metadata(src)["config"])


def kv_format_of(precision, dtype: str):
    """The KV format a precision's model stores in the pool (its own, or the dtype's)."""
    from fineserve_jax.engine.engine import DEFAULT_KV_FORMAT
    from fineserve_jax.model.kv_formats import kv_format

    return kv_format(precision.kv_format or DEFAULT_KV_FORMAT[dtype])


def figures(cfg, dtype: str = "bfloat16", block_tokens: int = 16) -> list[dict]:
    import jax
    import numpy as np

    from fineserve_jax.quant.model import LINEARS, abstract_quantized

    def nbytes(tree) -> int:
        return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize
                   for a in jax.tree.leaves(tree))

    out = []
    for name, p in PRECISIONS.items():
        tree = abstract_quantized(cfg, p, dtype)
        lin = nbytes({n: tree["layers"][n] for n in LINEARS})
        fmt = kv_format_of(p, dtype)
        out.append({"precision": name, "linear_weight_bytes": lin,
                    "all_weight_bytes": nbytes(tree), "kv_format": fmt.name,
                    "kv_bytes_per_token": fmt.block_format(cfg, block_tokens).token_bytes})
    base = next(r for r in out if r["precision"] == "bf16")
    for r in out:
        for k in ("linear_weight_bytes", "all_weight_bytes", "kv_bytes_per_token"):
            r[k.replace("bytes", "vs_bf16").replace("_per_token", "")] = r[k] / base[k]
    return out


def run(args) -> int:
    cfg = model_config(args.model)
    rows = figures(cfg, args.dtype, args.block_tokens)
    if args.out:
        write_json(args.out, {"benchmark": "memory", "model": args.model, "dtype": args.dtype,
                              "block_tokens": args.block_tokens, "results": rows})
    header = ["precision", "linear MiB", "vs bf16", "all weights MiB", "vs bf16 ", "KV format",
              "KV B/token", "vs bf16  "]
    table = [[r["precision"], f"{r['linear_weight_bytes'] / 2**20:.1f}",
              f"{r['linear_weight_vs_bf16']:.3f}x", f"{r['all_weight_bytes'] / 2**20:.1f}",
              f"{r['all_weight_vs_bf16']:.3f}x", r["kv_format"],
              f"{r['kv_bytes_per_token']:.0f}", f"{r['kv_vs_bf16']:.3f}x"] for r in rows]
    print(format_table(header, table, [f"{args.model}: {cfg.num_layers} layers, hidden "
                                       f"{cfg.hidden_size}; unquantized tensors in {args.dtype}; "
                                       f"KV blocks of {args.block_tokens} tokens"]))
    sys.stdout.flush()
    return 0
