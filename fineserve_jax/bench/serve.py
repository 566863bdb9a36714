"""``python -m fineserve_jax.bench serve --url URL``: a load client against a running server.

Without ``--url`` the subcommand compares serving systems in-process on the real engine
(``serve_systems``).

Replays a request stream against an OpenAI-compatible server (``python serve.py``) and
measures what a client sees: TTFT, TPOT, inter-token latency, end-to-end latency,
throughput and SLO attainment, per model and overall.

Workload (``Workload``, fixed by ``--seed``; every draw has its own seeded stream, so
changing one setting leaves the others' draws as they were):

* ``--num-requests`` requests; arrival gaps are Gamma with mean ``1 / --rate`` and
  coefficient of variation ``--cv`` (1 = Poisson arrivals, > 1 = burstier); ``--rate inf``
  sends every request at t = 0.
* Models: every model listed by ``GET /v1/models`` (or ``--models``), round-robin, or
  drawn with ``--model-weights``. With ``--shift-s S`` as well, popularity drifts as in
  the cluster benchmarks' workloads: every S seconds the weights move on by one model (in
  phase ``k``, arrivals in ``[k S, (k + 1) S)``, model ``i`` is drawn with weight
  ``w[(i - k) mod n]``), and the record gives each phase's figures (``phases``): what a
  server re-placing its models as rates drift (``serve.py --rebalance-interval``) sees.
* Lengths: lognormal with means ``--prompt-len`` and ``--output-len`` and log-space sigmas
  ``--prompt-sigma`` / ``--output-sigma`` (0 = fixed), clipped to [4, ``--max-len``] and so
  that prompt + output fit the model's ``max_model_len`` with 32 tokens to spare (the
  server may tokenize the text differently). The drawn output length is ``max_tokens``;
  sampling is greedy with ``ignore_eos`` (vLLM's extra field, which our server takes), so
  every request generates exactly ``max_tokens``; ``--no-ignore-eos`` leaves the field out
  for a server that refuses it, and then ``short_outputs`` counts requests ended by EOS.
* Prompts are text cut from the packaged Wikipedia corpus at a random word boundary:
  exactly the drawn number of tokens of ``--prompt-tokenizer`` (SmolLM2's by default,
  decoded back to text), or that many whitespace words with ``--prompt-tokenizer words``.
  The server's own count is kept (``prompt_tokens``, from the usage chunk).

``--trace FILE`` replays a JSON list of ``{arrival_s, model, prompt, max_tokens}`` instead
(JSON lines are read too); ``--save-trace FILE`` writes the stream that was sent.

Measured per request, on ``time.perf_counter`` from the start of the run: send time (the
request leaves when its arrival is due), the arrival of every SSE chunk that carries text,
the end of the stream (``data: [DONE]``), completion tokens from the usage chunk
(``stream_options.include_usage``; the count of text chunks if the server sends none), the
HTTP status and any error. TTFT = first text chunk - send; TPOT = (end - first text chunk) /
(tokens - 1); ITL = gaps between successive text chunks, pooled over requests (a chunk may
carry several tokens); E2E = end - send. Throughput is output tokens and completed requests
over the run's wall time, first send to last end. A request fails on a non-200 status, an
error event, a transport error or a stream without ``[DONE]``; failures count as SLO misses.
SLO attainment is the share of all submitted requests that completed within both targets
(a one-token request meets any TPOT target): each model's own, as the server lists them
(``ttft_slo_ms`` / ``tpot_slo_ms`` in ``/v1/models``), unless ``--ttft-slo`` /
``--tpot-slo`` (seconds) set one for every model. Over all models it counts the requests of
the models that have a target.

The client runs in one asyncio loop; on a machine it shares with the server its own work
adds to the latencies (``send_lag_s_max`` says how late it sent). On a CPU server only
ratios between runs on the same machine count (``common.CPU_FOOTER``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fineserve_jax.bench.common import (
    CPU_FOOTER,
    _cpu_model,
    cpu_count,
    format_table,
    versions,
    write_json,
)
from fineserve_jax.bench.serve_client import ENDPOINTS, get_models, replay
from fineserve_jax.kvslab.simulate import lognormal_lengths

HELP = ("serving systems compared on the real engine (SLO attainment and tokens/s against "
        "rate), or with --url a load client against a running server")
MIN_LEN = 4  # tokens, each of prompt and output
CONTEXT_SLACK = 32  # tokens kept free of max_model_len: retokenization, chat template
NEGATABLE = {"ignore_eos"}  # flags that are on by default (--no-...)


@dataclass(frozen=True)
class Workload:
    """A seeded request stream (module docstring)."""

    num_requests: int = 32
    rate: float = 1.0  # requests/s over all models; inf = all at t = 0
    cv: float = 1.0  # coefficient of variation of arrival gaps (1 = Poisson)
    prompt_len: float = 128.0  # mean prompt tokens
    prompt_sigma: float = 1.0  # lognormal sigma (log space); 0 = every prompt this long
    output_len: float = 64.0  # mean max_tokens
    output_sigma: float = 0.9
    max_len: int = 1024  # tokens, each of prompt and output
    seed: int = 0
    shift_s: float | None = None  # popularity drift: the model weights move on every shift_s

    def __post_init__(self):
        if not isinstance(self.num_requests, int) or self.num_requests < 1:
            raise ValueError(f"num_requests must be a positive int, got {self.num_requests!r}")
        if not self.rate > 0 or not self.cv > 0:
            raise ValueError("rate and cv must be > 0")
        if min(self.prompt_len, self.output_len) < 1 or min(self.prompt_sigma,
                                                            self.output_sigma) < 0:
            raise ValueError("prompt_len and output_len must be >= 1, sigmas >= 0")
        if self.max_len < MIN_LEN:
            raise ValueError(f"max_len must be >= {MIN_LEN}")
        if self.shift_s is not None and not (self.shift_s > 0 and math.isfinite(self.shift_s)):
            raise ValueError(f"shift_s must be a finite number > 0, got {self.shift_s!r}")

    def _rng(self, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, stream])

    def arrivals(self) -> np.ndarray:
        """f64[N] seconds from the start, non-decreasing, the first at 0."""
        n = self.num_requests
        if math.isinf(self.rate):
            return np.zeros(n)
        shape = 1.0 / self.cv ** 2  # Gamma(k, theta): mean k theta = 1/rate, cv = 1/sqrt(k)
        gaps = self._rng(1).gamma(shape, 1.0 / (self.rate * shape), n)
        return np.concatenate([[0.0], np.cumsum(gaps[:-1])])

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """(prompt i32[N], max_tokens i32[N]) before fitting them to a model's context."""
        n, hi = self.num_requests, self.max_len
        return (lognormal_lengths(self._rng(2), self.prompt_len, self.prompt_sigma, n, MIN_LEN, hi),
                lognormal_lengths(self._rng(3), self.output_len, self.output_sigma, n, MIN_LEN, hi))

    def phase(self, t: float) -> int:
        """The popularity phase of an arrival at ``t`` seconds (0 without drift)."""
        return 0 if self.shift_s is None else int(t // self.shift_s)

    def models(self, names: list[str], weights: list[float] | None) -> list[str]:
        """Each request's model: round-robin, drawn with ``weights``, or with the weights
        moved on by one model per ``shift_s`` of arrival time."""
        if weights is None:
            if self.shift_s is not None:
                raise ValueError("shift_s moves the model weights: give weights")
            return [names[i % len(names)] for i in range(self.num_requests)]
        p = np.asarray(weights, float) / sum(weights)
        if self.shift_s is None:
            return [names[i] for i in self._rng(4).choice(len(names), self.num_requests, p=p)]
        u = self._rng(4).random(self.num_requests)
        cum = [np.cumsum(np.roll(p, k)) for k in range(len(names))]  # phase k's, mod n
        return [names[min(int(np.searchsorted(cum[self.phase(t) % len(names)], x,
                                              side="right")), len(names) - 1)]
                for t, x in zip(self.arrivals(), u)]

    def requests(self, names: list[str], weights: list[float] | None,
                 max_model_len: dict[str, int], cutter: "PromptCutter") -> list[dict]:
        """The trace: ``{arrival_s, model, prompt, max_tokens, prompt_len}`` per request."""
        arrival, (plen, olen) = self.arrivals(), self.lengths()
        models = self.models(names, weights)
        out = []
        for i, m in enumerate(models):
            ctx = max_model_len.get(m)
            o, p = int(olen[i]), int(plen[i])
            if ctx is not None:  # fit prompt + output into the context
                o = max(1, min(o, ctx // 2))
                p = max(1, min(p, ctx - o - CONTEXT_SLACK))
            out.append({"arrival_s": float(arrival[i]), "model": m, "prompt_len": p,
                        "max_tokens": o})
        for r, text in zip(out, cutter.cut([r["prompt_len"] for r in out], self._rng(5))):
            r["prompt"] = text
        return out


class PromptCutter:
    """Text from the packaged corpus, cut at word boundaries to a number of tokens (of
    ``tokenizer``, decoded back to text) or of whitespace words (``tokenizer=None``)."""

    def __init__(self, tokenizer=None):
        from fineserve_jax.assets import corpus_text

        self.text = corpus_text()
        self.tokenizer = tokenizer

    def _units(self, start: int, chars: int) -> list:
        piece = self.text[start:start + chars]
        if self.tokenizer is None:
            return piece.split()
        return self.tokenizer.encode(piece, add_special_tokens=False)

    def cut(self, lengths: list[int], rng: np.random.Generator) -> list[str]:
        out = []
        for n in lengths:
            chars = 8 * n + 64  # a token is about 4.5 characters of this corpus, a word 6.3
            start = int(rng.integers(0, len(self.text) - 2 * chars))
            start = self.text.find(" ", start) + 1
            units = self._units(start, chars)
            while len(units) < n:
                chars *= 2
                units = self._units(start, chars)
            units = units[:n]
            out.append(" ".join(units) if self.tokenizer is None
                       else self.tokenizer.decode(units))
        return out


def load_prompt_tokenizer(name: str):
    """``words`` -> None; ``smollm2-135m`` or a ``.gguf`` path -> that model's tokenizer."""
    if name == "words":
        return None
    from checkpoints.gguf_source import GGUFSource
    from fineserve_jax.assets import SMOLLM2_ALIAS, smollm2_gguf_path

    path = smollm2_gguf_path() if name == SMOLLM2_ALIAS else Path(name)
    if path.suffix != ".gguf" or not path.exists():
        raise SystemExit(f"--prompt-tokenizer {name!r}: expected 'words', "
                         f"{SMOLLM2_ALIAS!r} or an existing .gguf file")
    return GGUFSource(path).tokenizer()


# ------------------------------------------------------------------------ trace files
TRACE_KEYS = ("arrival_s", "model", "prompt", "max_tokens")


def load_trace(path: str) -> list[dict]:
    """A JSON list (or JSON lines) of ``{arrival_s, model, prompt, max_tokens}``."""
    text = Path(path).read_text(encoding="utf-8")
    rows = (json.loads(text) if text.lstrip().startswith("[")
            else [json.loads(line) for line in text.splitlines() if line.strip()])
    for i, r in enumerate(rows):
        missing = [k for k in TRACE_KEYS if k not in r]
        if missing:
            raise SystemExit(f"{path}: entry {i} lacks {missing}")
    return sorted(({k: r[k] for k in TRACE_KEYS} for r in rows), key=lambda r: r["arrival_s"])


def save_trace(path: str, requests: list[dict]) -> None:
    write_json(path, [{k: r[k] for k in TRACE_KEYS} for r in requests])


# ---------------------------------------------------------------------------- metrics
def _pcts(xs: list[float], qs=(50, 90, 99)) -> dict:
    return {f"p{q}": (float(np.percentile(xs, q)) if xs else None) for q in qs} | {
        "mean": float(np.mean(xs)) if xs else None}


def per_request_latencies(r: dict) -> dict:
    """TTFT, TPOT, E2E (s) of one completed request; None where undefined."""
    first, tokens = r["first_s"], r["completion_tokens"]
    return {"ttft_s": None if first is None else first - r["send_s"],
            "tpot_s": (r["end_s"] - first) / (tokens - 1) if first is not None and tokens > 1
            else None,
            "e2e_s": r["end_s"] - r["send_s"]}


def summarize(recs: list[dict], wall_s: float, ttft_slo: float | None = None,
              tpot_slo: float | None = None) -> dict:
    """Counts, latency percentiles, throughput and SLO attainment of ``recs``."""
    ok = [r for r in recs if r["error"] is None]
    lat = [per_request_latencies(r) for r in ok]
    itl = [b - a for r in ok for a, b in zip(r["chunk_s"], r["chunk_s"][1:])]
    errors: dict[str, int] = {}
    for r in recs:
        if r["error"] is not None:
            kind = r["error"].split(":")[0]
            errors[kind] = errors.get(kind, 0) + 1
    tokens = sum(r["completion_tokens"] for r in ok)
    out = {"submitted": len(recs), "completed": len(ok), "failed": len(recs) - len(ok),
           "errors": errors, "output_tokens": tokens,
           "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in ok),
           "short_outputs": sum(r["completion_tokens"] < r["max_tokens"] for r in ok),
           "output_tok_s": tokens / wall_s if wall_s > 0 else None,
           "req_s": len(ok) / wall_s if wall_s > 0 else None}
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        out[key] = _pcts([x[key] for x in lat if x[key] is not None])
    out["itl_s"] = _pcts(itl)
    if ttft_slo is not None or tpot_slo is not None:
        ttft_ok = [x["ttft_s"] is not None and (ttft_slo is None or x["ttft_s"] <= ttft_slo)
                   for x in lat]
        tpot_ok = [tpot_slo is None or x["tpot_s"] is None or x["tpot_s"] <= tpot_slo
                   for x in lat]
        out["slo"] = _slo_figures(len(recs), sum(a and b for a, b in zip(ttft_ok, tpot_ok)),
                                  sum(ttft_ok), sum(tpot_ok), wall_s)
        out["slo"] |= {"ttft_s": ttft_slo, "tpot_s": tpot_slo}
    return out


def _slo_figures(n: int, met: int, ttft_met: int, tpot_met: int, wall_s: float) -> dict:
    """Attainment figures of ``n`` submitted requests, ``met`` of them within both targets."""
    d = max(n, 1)
    return {"requests": n, "met": met, "ttft_met": ttft_met, "tpot_met": tpot_met,
            "attainment": met / d, "ttft_attainment": ttft_met / d,
            "tpot_attainment": tpot_met / d,
            "goodput_req_s": met / wall_s if wall_s > 0 else None}


def model_targets(served: dict, ttft_slo: float | None = None,
                  tpot_slo: float | None = None) -> dict[str, tuple]:
    """``{model: (ttft_s, tpot_s)}`` for every model the server lists: its own targets
    (``ttft_slo_ms`` / ``tpot_slo_ms`` in ``/v1/models``), each replaced by ``ttft_slo`` /
    ``tpot_slo`` when given; None where there is none."""
    def own(m, key):  # another server's listing may hold anything under these names
        v = m.get(key)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
        return float(v) / 1e3 if ok else None
    return {m["id"]: (ttft_slo if ttft_slo is not None else own(m, "ttft_slo_ms"),
                      tpot_slo if tpot_slo is not None else own(m, "tpot_slo_ms"))
            for m in served.get("data", [])}


def summary(recs: list[dict], wall_s: float, ttft_slo=None, tpot_slo=None,
            targets: dict[str, tuple] | None = None) -> dict:
    """``{"all": ..., "per_model": {name: ...}}``, each from ``summarize``. ``targets``
    (``model_targets``): each model's (TTFT, TPOT) targets, seconds; without it
    ``ttft_slo`` / ``tpot_slo`` hold for every model. "all" judges each request by its
    model's targets, over the requests of the models that have one."""
    models = sorted({r["model"] for r in recs})
    targets = {m: (targets or {}).get(m, (ttft_slo, tpot_slo)) for m in models}
    out = {"all": summarize(recs, wall_s),
           "per_model": {m: summarize([r for r in recs if r["model"] == m], wall_s,
                                      *targets[m]) for m in models}}
    judged = [out["per_model"][m]["slo"] for m in models if "slo" in out["per_model"][m]]
    if judged:
        out["all"]["slo"] = _slo_figures(*(sum(j[k] for j in judged) for k in (
            "requests", "met", "ttft_met", "tpot_met")), wall_s)
        same = {targets[m] for m in models if "slo" in out["per_model"][m]}
        ttft, tpot = next(iter(same)) if len(same) == 1 else ("per model", "per model")
        out["all"]["slo"] |= {"ttft_s": ttft, "tpot_s": tpot}
    out["all"]["send_lag_s_max"] = max((r["send_s"] - r["arrival_s"] for r in recs), default=0.0)
    return out


def phases(recs: list[dict], shift_s: float, targets: dict[str, tuple] | None = None
           ) -> list[dict]:
    """The figures of each popularity phase (``Workload.shift_s``): ``summary`` of the
    requests due in ``[k shift_s, (k + 1) shift_s)``, over that span (the last phase ends
    at the last arrival), and how many requests each model got there."""
    last = max((r["arrival_s"] for r in recs), default=0.0)
    out = []
    for k in range(int(last // shift_s) + 1):
        t0, t1 = k * shift_s, min((k + 1) * shift_s, last)
        got = [r for r in recs if int(r["arrival_s"] // shift_s) == k]
        if not got:
            continue
        out.append({"phase": k, "start_s": t0, "end_s": t1,
                    "requests": {m: sum(r["model"] == m for r in got)
                                 for m in sorted({r["model"] for r in got})},
                    "summary": summary(got, max(t1 - t0, 1e-9), targets=targets)})
    return out


# ------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    w = Workload()
    p.add_argument("--url", default=None,
                   help="server base URL (e.g. http://127.0.0.1:8000): run as a load client "
                        "against it; without it, compare serving systems in-process")
    p.add_argument("--endpoint", choices=tuple(ENDPOINTS), default="completions",
                   help="/v1/completions or /v1/chat/completions")
    p.add_argument("--models", nargs="+",
                   help="models to send requests to; unset: every model /v1/models lists")
    p.add_argument("--model-weights", type=float, nargs="+",
                   help="draw each request's model with these weights, one per model; "
                        "unset: round-robin")
    p.add_argument("--shift-s", type=float, metavar="S",
                   help="popularity drift: every S seconds the models' weights (--model-weights; "
                        "without --url, the power law of --alpha) move on by one model; the "
                        "load client's record has each phase's figures")
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--num-requests", type=int, default=w.num_requests,
                   help="requests to generate (ignored with --trace)")
    p.add_argument("--rate", type=float, default=w.rate,
                   help="requests/s over all models; 'inf' sends all at once")
    p.add_argument("--cv", type=float, default=w.cv,
                   help="coefficient of variation of arrival gaps (1 = Poisson)")
    p.add_argument("--prompt-len", type=float, default=w.prompt_len, help="mean prompt tokens")
    p.add_argument("--prompt-sigma", type=float, default=w.prompt_sigma,
                   help="lognormal sigma of prompt lengths (0 = fixed)")
    p.add_argument("--output-len", type=float, default=w.output_len,
                   help="mean max_tokens")
    p.add_argument("--output-sigma", type=float, default=w.output_sigma,
                   help="lognormal sigma of max_tokens (0 = fixed)")
    p.add_argument("--max-len", type=int, default=w.max_len,
                   help="largest prompt and largest max_tokens")
    p.add_argument("--prompt-tokenizer", default="smollm2-135m",
                   help="tokenizer whose tokens --prompt-len counts: 'smollm2-135m', a .gguf "
                        "file, or 'words' (whitespace words, no tokenizer)")
    p.add_argument("--seed", type=int, default=w.seed,
                   help="seeds arrivals, lengths, model draws and prompt positions")
    p.add_argument("--trace", help="replay this trace (JSON list of {arrival_s, model, prompt, "
                                   "max_tokens}) instead of generating one")
    p.add_argument("--save-trace", help="write the requests sent to this trace file")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="send 'ignore_eos': true so every request runs to max_tokens")
    p.add_argument("--max-concurrency", type=int, help="most requests in flight at once")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per network read")
    p.add_argument("--ttft-slo", type=float,
                   help="TTFT target of every model, seconds (default: each model's own, "
                        "as /v1/models lists it)")
    p.add_argument("--tpot-slo", type=float,
                   help="TPOT target of every model, seconds (default: each model's own)")
    p.add_argument("--no-chunk-times", action="store_true",
                   help="leave every chunk's arrival time out of the record")
    p.add_argument("--out", default="benchmarks/results/serve_cpu.json",
                   help="JSON record of the load client")
    from fineserve_jax.bench import serve_systems
    serve_systems.add_arguments(p)


def command(args) -> str:
    """The command line that reproduces ``args`` (every option spelled out)."""
    parts = ["python -m fineserve_jax.bench serve"]
    for k, v in vars(args).items():
        if k.startswith("_") or k == "subcommand" or v is None:
            continue
        flag = "--" + k.replace("_", "-")
        if v is False:
            if k in NEGATABLE:
                parts.append("--no-" + k.replace("_", "-"))
        elif v is True:
            parts.append(flag)
        elif isinstance(v, list):
            parts.append(f"{flag} {' '.join(map(str, v))}")
        else:
            parts.append(f"{flag} {v:g}" if isinstance(v, float) else f"{flag} {v}")
    return " ".join(parts)


def client_machine() -> dict:
    """The machine the client ran on (the server's device is in the /v1/models answer)."""
    return {"platform": platform.platform(), "processor": _cpu_model() or platform.processor(),
            "cpu_count": cpu_count(), "python": sys.version.split()[0],
            "versions": versions(("fineserve-jax", "httpx", "numpy"))}


def build_requests(args, served: dict) -> tuple[list[dict], dict]:
    """The requests to send and the workload's part of the record."""
    if args.trace:
        reqs = load_trace(args.trace)  # --shift-s: only the phases' figures
        return reqs, {"source": "trace", "trace": args.trace} | (
            {"shift_s": args.shift_s} if args.shift_s is not None else {})
    listed = {m["id"]: m for m in served.get("data", [])}
    names = args.models or list(listed)
    if not names:
        raise SystemExit("the server lists no models and --models was not given")
    if args.model_weights is not None and len(args.model_weights) != len(names):
        raise SystemExit(f"--model-weights needs {len(names)} values, one per model {names}")
    if args.model_weights is not None and (min(args.model_weights) < 0
                                           or sum(args.model_weights) <= 0):
        raise SystemExit("--model-weights must be >= 0 with a positive sum")
    if args.shift_s is not None and args.model_weights is None:
        raise SystemExit("--shift-s moves the --model-weights from model to model: give them")
    try:
        w = Workload(num_requests=args.num_requests, rate=args.rate, cv=args.cv,
                     prompt_len=args.prompt_len, prompt_sigma=args.prompt_sigma,
                     output_len=args.output_len, output_sigma=args.output_sigma,
                     max_len=args.max_len, seed=args.seed, shift_s=args.shift_s)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    ctx = {m: int(listed[m]["max_model_len"]) for m in names
           if "max_model_len" in listed.get(m, {})}
    cutter = PromptCutter(load_prompt_tokenizer(args.prompt_tokenizer))
    reqs = w.requests(names, args.model_weights, ctx, cutter)
    return reqs, {"source": "generated", **asdict(w), "models": names,
                  "model_weights": args.model_weights, "prompt_tokenizer": args.prompt_tokenizer,
                  "max_model_len": ctx}


def run(args) -> int:
    if args.url is None:
        from fineserve_jax.bench.serve_systems import run_systems
        return run_systems(args, command(args))
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise SystemExit("--max-concurrency must be >= 1")
    if args.shift_s is not None and not (args.shift_s > 0 and math.isfinite(args.shift_s)):
        raise SystemExit(f"--shift-s must be a number of seconds > 0, got {args.shift_s:g}")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    try:
        served = asyncio.run(get_models(args.url, args.api_key))
    except Exception as e:
        raise SystemExit(f"GET {args.url}/v1/models failed: {type(e).__name__}: {e}") from None
    reqs, workload = build_requests(args, served)
    if args.save_trace:
        save_trace(args.save_trace, reqs)
        log(f"wrote trace {args.save_trace}")
    log(f"{len(reqs)} requests to {args.url}{ENDPOINTS[args.endpoint]}, last arrival at "
        f"{reqs[-1]['arrival_s']:.1f}s")
    recs, wall_s = asyncio.run(replay(args.url, reqs, endpoint=args.endpoint,
                                      api_key=args.api_key, timeout=args.timeout,
                                      max_concurrency=args.max_concurrency,
                                      ignore_eos=args.ignore_eos))
    for r in recs:
        r.update(per_request_latencies(r))
    from fineserve_jax.bench.engine import git_state

    targets = model_targets(served, args.ttft_slo, args.tpot_slo)
    record = {
        "benchmark": "serve",
        "command": command(args),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "client": client_machine(),
        "git": git_state(),
        "server": {"url": args.url, "endpoint": ENDPOINTS[args.endpoint], "models": served},
        "config": {"ignore_eos_sent": args.ignore_eos, "temperature": 0.0,
                   "max_concurrency": args.max_concurrency, "timeout_s": args.timeout,
                   "ttft_slo_s": args.ttft_slo, "tpot_slo_s": args.tpot_slo},
        "workload": workload,
        "wall_s": wall_s,
        "slo_targets_s": targets,
        "summary": summary(recs, wall_s, targets=targets),
        "requests": recs,
    }
    shift = workload.get("shift_s")
    if shift is not None:
        record["phases"] = phases(recs, shift, targets)
    if args.no_chunk_times:  # after the figures: the inter-token latencies come from them
        for r in recs:
            del r["chunk_s"]
    path = write_json(args.out, record)
    log(f"wrote {path}")
    print(table(record))
    return 0


def table(record: dict) -> str:
    s = record["summary"]
    slo = "slo" in s["all"]
    header = ["model", "done", "failed", "TTFT ms p50/p90/p99", "TPOT ms p50/p90/p99",
              "ITL ms p50/p99", "E2E s p50/p99", "out tok/s", "req/s", *(["SLO"] if slo else [])]

    def ms(d, qs):
        return "/".join("-" if d[q] is None else f"{1e3 * d[q]:.0f}" for q in qs)

    rows = []
    for name, m in [*s["per_model"].items(), ("all", s["all"])]:
        e2e = "/".join("-" if m["e2e_s"][q] is None else f"{m['e2e_s'][q]:.2f}"
                       for q in ("p50", "p99"))
        rows.append([name, str(m["completed"]), str(m["failed"]),
                     ms(m["ttft_s"], ("p50", "p90", "p99")), ms(m["tpot_s"], ("p50", "p90", "p99")),
                     ms(m["itl_s"], ("p50", "p99")), e2e, f"{m['output_tok_s']:.1f}",
                     f"{m['req_s']:.2f}",
                     *([f"{m['slo']['attainment']:.0%}" if "slo" in m else "-"] if slo else [])])
    a = s["all"]
    foot = [f"wall {record['wall_s']:.1f}s; {a['output_tokens']} output tokens; "
            f"{a['short_outputs']} completed requests stopped before max_tokens; client sent "
            f"up to {a['send_lag_s_max'] * 1e3:.0f} ms late"]
    if a["errors"]:
        foot.append("errors: " + ", ".join(f"{k} x{v}" for k, v in a["errors"].items()))
    if slo and a["slo"]["ttft_s"] == "per model":
        each = "; ".join(f"{n} TTFT <= {m['slo']['ttft_s']} s, TPOT <= {m['slo']['tpot_s']} s"
                         for n, m in s["per_model"].items() if "slo" in m)
        foot.append(f"SLO: each model's targets ({each}), share of its submitted requests")
    elif slo:
        foot.append(f"SLO: TTFT <= {a['slo']['ttft_s']} s and TPOT <= {a['slo']['tpot_s']} s, "
                    "share of all submitted requests")
    for ph in record.get("phases", []):
        a = ph["summary"]["all"]
        att = f", SLO {a['slo']['attainment']:.0%}" if "slo" in a else ""
        foot.append(f"phase {ph['phase']} ({ph['start_s']:.4g}-{ph['end_s']:.4g} s): "
                    + ", ".join(f"{m} {n}" for m, n in ph["requests"].items())
                    + f" requests; {a['failed']} failed{att}")
    devices = {str(m.get("device", "")) for m in record["server"]["models"].get("data", [])}
    if any("cpu" in d.lower() for d in devices):
        foot.append(CPU_FOOTER)
    return format_table(header, rows, foot)
