"""``python -m fineserve_jax.bench model``: one model end to end, our engine vs transformers.

For each dtype, in one process on the default JAX device and torch CPU:

* prefill: one sequence of ``--prefill-len`` tokens, time to first token (fresh cache,
  forward, greedy token on the host) -> prefill tok/s;
* decode: batch 1, a ``--prompt-len`` prompt, then ``--tokens`` greedy steps of one token,
  each synced to the host as a server would -> decode tok/s (the prompt is not timed).

Our engine runs through ``DenseRunner.step`` with the shapes ``LLM.generate`` gives it
(same buckets, same cache length); transformers runs ``LlamaForCausalLM`` built from the
same weights (``hf_reference``), a manual loop of one forward per token with
``past_key_values``. Before timing, greedy tokens from ``LLM.generate`` in float32 must
equal transformers' float32 greedy tokens for ``--check-steps`` steps, or the run fails.
Both sides are warmed up (JAX compiles per shape) and each figure is the median of
``--repeats`` runs, variants interleaved.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from fineserve_jax.bench.common import (CPU_FOOTER, cpu_count, format_table, machine_info,
                                        median, timed, write_json)
from fineserve_jax.runner import bucket
from fineserve_jax.sampling import GREEDY, SamplingArrays, SamplingParams

HELP = "single-sequence prefill and decode tok/s: our engine vs HF transformers (CPU)"
DTYPES = ("bfloat16", "float32")
ENGINE, HF = "fineserve-jax", "transformers"
_GREEDY = SamplingParams(temperature=0.0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="model source (alias or path)")
    p.add_argument("--tokens", type=int, default=64, help="decode steps timed")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens before decode")
    p.add_argument("--prefill-len", type=int, default=512, help="tokens of the prefill run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median)")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument("--check-steps", type=int, default=16,
                   help="greedy steps that must agree with transformers in float32")
    p.add_argument("--out", default="benchmarks/results/model_cpu.json", help="JSON record")


# ------------------------------------------------------------------- the two engines
class EngineTimer:
    """One sequence through ``DenseRunner.step``, shaped exactly as ``LLM._run`` shapes it."""

    def __init__(self, llm):
        self.runner = llm.runner
        self.max_pos = llm.config.max_position_embeddings

    def _prefill(self, ids: list[int], max_new: int):
        T = len(ids)
        S = min(bucket(T + max_new, 64), max(bucket(self.max_pos, 64), 64))
        tokens = np.zeros((1, bucket(T)), np.int32)  # i32[1, T_bucket], zero padded
        positions = np.full((1, bucket(T)), -1, np.int32)  # -1 = padding
        tokens[0, :T] = ids
        positions[0, :T] = np.arange(T)
        seq_lens = np.array([T], np.int32)
        kv = self.runner.new_cache(1, S)
        nxt, kv = self.runner.step(kv, tokens, positions, seq_lens, seq_lens - 1,
                                   self._sampling(0), GREEDY)
        return int(np.asarray(nxt)[0]), kv, T

    def _sampling(self, step: int) -> SamplingArrays:
        return SamplingArrays.build([_GREEDY], [0], [step], 1)

    def prefill(self, ids: list[int]) -> tuple[float, int]:
        """(seconds to first token, that token); the cache LLM.generate(max_tokens=1) uses."""
        t, (tok, _, _) = timed(lambda: self._prefill(ids, 1))
        return t, tok

    def decode(self, ids: list[int], n: int, run: int | None = None) -> tuple[float, list[int]]:
        """(seconds of ``n`` decode steps after the prompt, the n + 1 greedy tokens).

        ``run`` < n stops after ``run`` steps in a cache sized for n: a cheap warm-up of
        exactly the shapes a full run compiles.
        """
        tok, kv, L = self._prefill(ids, n + 1)
        out = [tok]
        t0 = time.perf_counter()
        for step in range(1, (n if run is None else run) + 1):
            tokens = np.array([[tok]], np.int32)
            positions = np.array([[L]], np.int32)
            L += 1
            nxt, kv = self.runner.step(kv, tokens, positions, np.array([L], np.int32),
                                       np.zeros(1, np.int32), self._sampling(step), GREEDY)
            tok = int(np.asarray(nxt)[0])
            out.append(tok)
        return time.perf_counter() - t0, out


class HFTimer:
    """The same measurements on ``LlamaForCausalLM``: one forward per token, KV cache kept."""

    def __init__(self, model):
        import inspect

        self.model = model
        # Logits of the last position only, as HF generate (and our engine) compute them.
        sig = inspect.signature(model.forward).parameters
        self.keep = {"logits_to_keep": 1} if "logits_to_keep" in sig else {}

    def _prefill(self, ids: list[int]):
        import torch

        with torch.inference_mode():
            out = self.model(torch.tensor([ids], dtype=torch.long), use_cache=True, **self.keep)
            return int(out.logits[0, -1].argmax()), out.past_key_values

    def prefill(self, ids: list[int]) -> tuple[float, int]:
        t, (tok, _) = timed(lambda: self._prefill(ids))
        return t, tok

    def decode(self, ids: list[int], n: int, run: int | None = None) -> tuple[float, list[int]]:
        import torch

        tok, past = self._prefill(ids)
        out = [tok]
        t0 = time.perf_counter()
        with torch.inference_mode():
            for _ in range(n if run is None else run):
                res = self.model(torch.tensor([[tok]], dtype=torch.long), past_key_values=past,
                                 use_cache=True)
                past = res.past_key_values
                tok = int(res.logits[0, -1].argmax())
                out.append(tok)
        return time.perf_counter() - t0, out


# ------------------------------------------------------------------------ the run
def prompt_tokens(tokenizer, n: int) -> list[int]:
    """``n`` ids of natural text: the packaged Wikipedia corpus, else a fixed paragraph."""
    try:
        from fineserve_jax.assets import corpus_text
        text = corpus_text()[: 8 * n + 1000]
    except FileNotFoundError:
        text = ("The history of science is the study of the development of science and "
                "scientific knowledge, including both the natural and social sciences. ")
    ids = tokenizer.encode(text, add_special_tokens=False)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def load(args, dtypes: list[str]):
    """{dtype: (LLM, EngineTimer, HFTimer, hf attention implementation)}."""
    import torch

    from fineserve_jax.bench.hf_reference import build_hf_model
    from fineserve_jax.llm import LLM

    out = {}
    for dtype in dtypes:
        llm = LLM(args.model, dtype=dtype, progress=False)
        params = jax.tree.map(np.asarray, llm.runner.params)  # the very weights the engine runs
        hf = build_hf_model(llm.config, params, getattr(torch, dtype))
        out[dtype] = (llm, EngineTimer(llm), HFTimer(hf), hf.config._attn_implementation)
    return out


def check_agreement(models, prompt: list[int], args) -> dict:
    """Greedy tokens of ``LLM.generate`` vs transformers' loop; float32 must agree exactly."""
    n = args.check_steps
    sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    report = {}
    for dtype, (llm, _, hf, _) in models.items():
        t_gen, outs = timed(lambda: llm.generate(prompt, sp))
        ours = outs[0].token_ids
        _, theirs = hf.decode(prompt, n - 1)
        agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), n)
        report[dtype] = {"engine_tokens": ours, "transformers_tokens": theirs,
                         "agreeing_prefix": agree, "first_generate_s": t_gen}
    return report


def measure(models, prompt: list[int], prefill: list[int], args) -> dict:
    """{(engine, dtype): {"prefill_s": [...], "decode_s": [...], ...}}.

    Warm-up first: our engine compiles each shape once (a prefill and a short decode in a
    cache of the timed size); torch's CPU kernels settle over a few calls.
    """
    res = {}
    for dtype, (_, eng, hf, _) in models.items():
        for name, timer in ((ENGINE, eng), (HF, hf)):
            warm = [timer.prefill(prefill)[0] for _ in range(1 if name == ENGINE else 2)]
            timer.decode(prompt, args.tokens, run=4)
            res[name, dtype] = {"prefill_s": [], "decode_s": [], "warmup_prefill_s": warm}
    for _ in range(args.repeats):  # variants interleaved, so slow drift hits them alike
        for dtype, (_, eng, hf, _) in models.items():
            for name, timer in ((ENGINE, eng), (HF, hf)):
                r = res[name, dtype]
                r["prefill_s"].append(timer.prefill(prefill)[0])
                t, toks = timer.decode(prompt, args.tokens)
                r["decode_s"].append(t)
                r["decode_tokens"] = toks
    for (name, dtype), r in res.items():
        r["prefill_tok_s"] = args.prefill_len / median(r["prefill_s"])
        r["decode_tok_s"] = args.tokens / median(r["decode_s"])
    return res


def run(args) -> int:
    import torch

    for name in ("tokens", "prompt_len", "prefill_len", "repeats", "check_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    threads = cpu_count()
    torch.set_num_threads(threads)
    dtypes = [d for d in DTYPES if d in args.dtypes]
    t0 = time.perf_counter()
    models = load(args, sorted(set(dtypes) | {"float32"}))  # float32 always, for the check
    llm = models["float32"][0]
    prompt = prompt_tokens(llm.tokenizer, args.prompt_len)
    prefill = prompt_tokens(llm.tokenizer, args.prefill_len)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s; checking greedy agreement",
          file=sys.stderr, flush=True)

    check = check_agreement(models, prompt, args)
    ok = check["float32"]["agreeing_prefix"] >= args.check_steps
    record = {
        "benchmark": "model",
        "command": command(args),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {**machine_info(("jax", "jaxlib", "numpy", "torch", "transformers")),
                    "torch_threads": torch.get_num_threads()},
        "config": _config(args, llm, models, dtypes),
        "check": {**check, "passed": ok},
    }
    if not ok:
        write_json(args.out, record)
        _print_mismatch(check["float32"], args)
        return 1

    agree = ", ".join(f"{d} {c['agreeing_prefix']}/{args.check_steps}"
                      for d, c in check.items())
    print(f"greedy tokens equal to transformers' for: {agree}; timing {len(dtypes)} dtype(s) "
          f"x {args.repeats} repeats", file=sys.stderr, flush=True)
    res = measure({d: models[d] for d in dtypes}, prompt, prefill, args)
    record["results"] = _results(res, check, dtypes)
    record["total_s"] = time.perf_counter() - t0
    path = write_json(args.out, record)
    print(f"wrote {path}", file=sys.stderr, flush=True)
    print(table(record))
    return 0


def command(args) -> str:
    """The command line that reproduces this run, every option spelled out."""
    return (f"python -m fineserve_jax.bench model --model {args.model} --tokens {args.tokens} "
            f"--prompt-len {args.prompt_len} --prefill-len {args.prefill_len} "
            f"--repeats {args.repeats} --dtypes {' '.join(args.dtypes)} "
            f"--check-steps {args.check_steps} --out {args.out}")


def _print_mismatch(c: dict, args) -> None:
    n = args.check_steps
    bar = "!" * 78
    print(f"\n{bar}\nMISMATCH: float32 greedy tokens differ from transformers at step "
          f"{c['agreeing_prefix']} (need {n} equal)\n"
          f"  engine:       {c['engine_tokens'][:n]}\n"
          f"  transformers: {c['transformers_tokens'][:n]}\n"
          f"nothing was timed; record written to {args.out}\n{bar}", file=sys.stderr, flush=True)


def _config(args, llm, models, dtypes) -> dict:
    return {
        "model": args.model, "dtypes": dtypes, "tokens": args.tokens,
        "prompt_len": args.prompt_len, "prefill_len": args.prefill_len,
        "repeats": args.repeats, "check_steps": args.check_steps,
        "model_config": llm.config.to_dict(), "model_source_sha256": llm.metadata["source_sha256"],
        "prompt": "first tokens of the packaged Wikipedia corpus (no BOS)",
        "engine_path": "DenseRunner.step with LLM.generate's shape buckets; greedy; token "
                       "synced to the host each step",
        "transformers_path": "LlamaForCausalLM.forward, torch.inference_mode, use_cache=True, "
                             "logits of the last position only, argmax synced each step",
        "transformers_attn_implementation": {d: m[3] for d, m in models.items()},
        "prefill_timing": "fresh cache + forward over prefill_len tokens + first token on host",
        "decode_timing": "tokens single-token steps after the (untimed) prompt",
    }


def _results(res, check, dtypes) -> list[dict]:
    out = []
    for dtype in dtypes:
        hf = res[HF, dtype]
        for name in (ENGINE, HF):
            r = dict(res[name, dtype], engine=name, dtype=dtype)
            r["prefill_median_s"] = median(r["prefill_s"])
            r["decode_median_s"] = median(r["decode_s"])
            r["prefill_vs_transformers"] = r["prefill_tok_s"] / hf["prefill_tok_s"]
            r["decode_vs_transformers"] = r["decode_tok_s"] / hf["decode_tok_s"]
            if name == ENGINE:  # the bench loop must produce what LLM.generate produced
                n = min(len(check[dtype]["engine_tokens"]), len(r["decode_tokens"]))
                r["decode_tokens_match_generate"] = (
                    r["decode_tokens"][:n] == check[dtype]["engine_tokens"][:n])
            rest = sorted(set(r) - {"engine", "dtype"})
            out.append({k: r[k] for k in ("engine", "dtype", *rest)})
    return out


def table(record: dict) -> str:
    m, c = record["machine"], record["config"]
    rows = [[r["engine"], r["dtype"], f"{r['prefill_tok_s']:.1f}", f"{r['decode_tok_s']:.1f}",
             f"{r['prefill_vs_transformers']:.2f}x", f"{r['decode_vs_transformers']:.2f}x"]
            for r in record["results"]]
    title = (f"{c['model']} on CPU ({m['cpu_count']} cores, {m['processor']}): prefill "
             f"{c['prefill_len']} tokens; decode {c['tokens']} steps after a {c['prompt_len']}-"
             f"token prompt; batch 1, greedy; median of {c['repeats']}")
    footer = [f"ratios: tok/s over transformers' tok/s in the same dtype. {CPU_FOOTER}"]
    header = ["engine", "dtype", "prefill tok/s", "decode tok/s", "prefill vs HF", "decode vs HF"]
    return title + "\n" + format_table(header, rows, footer, left=2)
