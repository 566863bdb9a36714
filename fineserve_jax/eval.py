"""``python -m fineserve_jax.eval ppl --model SRC [--precision P] [--dtype D] --tokens N
--window 1024 [--start S]``

Perplexity on the packaged Wikipedia corpus (keys sorted, ``title\\nextract`` per article,
joined by blank lines, encoded in one piece): tokens [S, S + N) cut into non-overlapping
windows; each window predicts its tokens 2..W from the ones before. The last line printed
contains ``ppl=<value>``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
from tqdm.auto import tqdm


def perplexity(llm, tokens, window: int = 1024, progress: bool = True) -> dict:
    """Mean next-token NLL over non-overlapping windows of ``tokens`` -> dict with ``ppl``."""
    tokens = np.asarray(tokens, np.int32)
    n_win = len(tokens) // window
    if n_win == 0:
        raise ValueError(f"{len(tokens)} tokens do not fill one window of {window}")
    nll, count = 0.0, 0
    for w in tqdm(range(n_win), desc="windows", disable=not progress, leave=False):
        chunk = tokens[w * window:(w + 1) * window][None]
        lp = np.asarray(llm.runner.target_logprobs(chunk), np.float64)
        nll -= float(lp.sum())
        count += lp.size
    return {"ppl": math.exp(nll / count), "nll": nll / count, "predicted_tokens": count,
            "windows": n_win, "window": window}


def corpus_slice(tokenizer, start: int, n: int) -> np.ndarray:
    from fineserve_jax.assets import corpus_tokens

    toks = corpus_tokens(tokenizer.to_json())
    if start < 0 or start + n > len(toks):
        raise ValueError(f"tokens [{start}, {start + n}) outside the corpus of {len(toks)} tokens")
    return np.asarray(toks[start:start + n], np.int32)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fineserve_jax.eval")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ppl", help="perplexity on the packaged Wikipedia corpus")
    p.add_argument("--model", required=True, help="alias, .gguf, HF or Orbax directory")
    p.add_argument("--precision", default=None,
                   help="quantize on load (default: the checkpoint's own precision, or bf16)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--tokens", type=int, required=True, help="tokens to evaluate")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--start", type=int, default=0, help="token offset into the corpus")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--quiet", action="store_true")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    from fineserve_jax.llm import LLM

    t0 = time.perf_counter()
    try:
        llm = LLM(args.model, precision=args.precision, dtype=args.dtype, progress=not args.quiet)
        toks = corpus_slice(llm.tokenizer, args.start, args.tokens)
    except (OSError, ValueError) as e:  # a bad source or slice: say what, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    res = perplexity(llm, toks, args.window, progress=not args.quiet)
    res.update(model=args.model, precision=llm.precision, dtype=args.dtype,
               start=args.start, tokens=args.tokens, seconds=round(time.perf_counter() - t0, 2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    print(f"model={args.model} precision={llm.precision} dtype={args.dtype} "
          f"tokens={args.start}:{args.start + args.tokens} window={args.window} "
          f"predicted={res['predicted_tokens']} ppl={res['ppl']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
