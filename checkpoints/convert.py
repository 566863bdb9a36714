"""``python -m checkpoints.convert SRC --out DIR [--dtype bfloat16|float32] [--force]``

SRC is a ``.gguf`` file, an HF directory (config.json + *.safetensors) or the alias
``smollm2-135m``. Writes an Orbax checkpoint with the model config, precision, dtype,
tokenizer, chat template, source and its sha256.
"""

from __future__ import annotations

import argparse
import sys
import time

from checkpoints.errors import CheckpointError
from checkpoints.sources import DTYPES, load_model, save_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m checkpoints.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="a .gguf file, an HF directory, or an alias (smollm2-135m)")
    ap.add_argument("--out", required=True, help="output Orbax checkpoint directory")
    ap.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        model = load_model(args.src, args.dtype, progress=not args.quiet)
        out = save_model(model, args.out, overwrite=args.force)
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    cfg = model.config
    print(f"wrote {out}: {cfg.architecture}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_params() / 1e6:.1f}M params, dtype {args.dtype}, "
          f"sha256 {model.metadata['source_sha256'][:12]}..., {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
