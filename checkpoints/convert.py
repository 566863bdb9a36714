"""``python -m checkpoints.convert SRC --out DIR [--precision P] [--dtype D] [--force]``

SRC is a ``.gguf`` file, an HF directory (config.json + *.safetensors) or the alias
``smollm2-135m``. Writes an Orbax checkpoint with the model config, precision, dtype,
tokenizer, chat template, source and its sha256. ``--precision`` (bf16, fp8, w4a16, fireq,
fireq-g32) quantizes first: calibration on the packaged Wikipedia text where the recipe
needs it, smoothing, packed INT4 or FP8 weights with their scales; the whole recipe goes in
the metadata, and ``LLM(DIR)`` and the engine serve the result without re-quantizing.
"""

from __future__ import annotations

import argparse
import sys
import time

from checkpoints.cache import with_calibration
from checkpoints.errors import CheckpointError
from checkpoints.sources import DTYPES, load_model, quantize_loaded, save_model
from fineserve_jax.precisions import PRECISIONS


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m checkpoints.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="a .gguf file, an HF directory, or an alias (smollm2-135m)")
    ap.add_argument("--out", required=True, help="output Orbax checkpoint directory")
    ap.add_argument("--precision", default="bf16", choices=sorted(PRECISIONS),
                    help="quantize to this precision (fineserve_jax.precisions)")
    ap.add_argument("--dtype", default="bfloat16", choices=DTYPES,
                    help="dtype of the unquantized tensors (embeddings, norms, bf16 weights)")
    ap.add_argument("--calib-tokens", type=int, default=None,
                    help="calibration tokens (default: the precision's recipe); recorded")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        prec = with_calibration(PRECISIONS[args.precision], args.calib_tokens)
        if prec.quantized or prec.smoothing is not None:
            model = quantize_loaded(load_model(args.src, "float32", progress=not args.quiet),
                                    prec, args.dtype, progress=not args.quiet)
        else:
            model = load_model(args.src, args.dtype, progress=not args.quiet)
        out = save_model(model, args.out, overwrite=args.force)
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    cfg = model.config
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out}: {cfg.architecture}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_params() / 1e6:.1f}M params, precision {args.precision}, dtype {args.dtype}, "
          f"{size / 2**20:.1f} MiB on disk, sha256 {model.metadata['source_sha256'][:12]}..., "
          f"{time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
