"""Synthetic multi-model request streams, and trace files to save and replay them.

Plain Python and NumPy (no JAX): the cluster simulator (``schedulers.simulator``) and the
benchmarks replay these streams.

    spec = WorkloadSpec(models=("a", "b", "c"), total_rate=12.0, duration_s=60.0, alpha=1.0)
    reqs = spec.generate()                    # list[Request], sorted by arrival
    write_trace("trace.jsonl", reqs); assert read_trace("trace.jsonl") == reqs

What a ``WorkloadSpec`` draws (every figure fixed by ``seed``):

* **Rates**: model ``i`` (in the order given) gets ``rate_i = total_rate * w_i / sum(w)``
  with ``w_i = (i + 1) ** -alpha``: a power law over models (``alpha = 0``: all equal;
  ``alpha = 1``: the second model gets half the first's requests, the third a third).
* **Arrivals**: per model a renewal process over ``[0, duration_s)``: gaps are Gamma with
  mean ``1 / rate_i`` and coefficient of variation ``cv`` (shape ``1 / cv**2``); ``cv = 1``
  is exactly the exponential, i.e. Poisson arrivals; ``cv > 1`` is burstier. The first
  arrival comes one gap after 0.
* **Drift** (``shift_s``, off by default): popularity is not fixed. Every ``shift_s``
  seconds the ranking moves on by one model: in phase ``k`` (arrivals in
  ``[k * shift_s, (k + 1) * shift_s)``) model ``k mod n`` has the top rate, the next model
  the second, and so on round the list. Each model's arrivals are a renewal process per
  phase at that phase's rate. ``mean_rates()`` gives each model's average over the whole
  duration: what a plan made from a day's totals sees.
* **Lengths**: prompt and output tokens are lognormal, rounded and clipped to
  ``[lo, hi]`` (``LengthDist``). ShareGPT-like defaults (``SHAREGPT_PROMPT``,
  ``SHAREGPT_OUTPUT``): means 161 prompt and 338 output tokens, the means the vLLM paper
  reports for its ShareGPT workload (Kwon et al., "Efficient Memory Management for Large
  Language Model Serving with PagedAttention", SOSP 2023: input 161.31, output 337.99
  tokens on average). Log-space sigmas 1.0 (prompts) and 0.9 (outputs) are *our*
  assumption, not a fit: the paper gives means and histograms with long right tails, not
  a median; with these sigmas the medians are ``mean * exp(-sigma**2 / 2)`` = 98 and 225
  tokens, and 1% of draws exceed 1,000 prompt / 1,829 output tokens (before clipping).
  These are the parameters ``fineserve_jax.kvslab.simulate`` already uses, so the
  memory and cluster benchmarks see one length distribution.

Every draw has its own random stream, keyed by (seed, what is drawn, model index): the
arrivals of model 2 do not change when model 1's rate does, and a model's k-th request
has the same lengths at every total rate that gives it at least k requests.

Trace files are JSON lines, one request per line::

    {"arrival_s": 0.0132, "model": "llama-8b-bf16", "prompt_tokens": 161, "output_tokens": 338}
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fineserve_jax.kvslab.simulate import lognormal_lengths

TRACE_FIELDS = ("arrival_s", "model", "prompt_tokens", "output_tokens")
_ARRIVALS, _PROMPTS, _OUTPUTS = 1, 2, 3  # stream keys


@dataclass(frozen=True, order=True)
class Request:
    """One request of a trace (ordering: by arrival, then model, then lengths)."""

    arrival_s: float  # seconds from the start of the trace
    model: str
    prompt_tokens: int
    output_tokens: int  # tokens it generates (the simulator finishes it there)

    def __post_init__(self):
        if not (isinstance(self.arrival_s, (int, float)) and math.isfinite(self.arrival_s)
                and self.arrival_s >= 0):
            raise ValueError(f"arrival_s must be a finite number >= 0, got {self.arrival_s!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty string, got {self.model!r}")
        for f in ("prompt_tokens", "output_tokens"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{f} must be an int >= 1, got {v!r}")

    def to_dict(self) -> dict:
        return {"arrival_s": float(self.arrival_s), "model": self.model,
                "prompt_tokens": int(self.prompt_tokens),
                "output_tokens": int(self.output_tokens)}


@dataclass(frozen=True)
class LengthDist:
    """Lognormal token counts with the given mean, rounded and clipped to [lo, hi]."""

    mean: float  # tokens, before clipping
    sigma: float  # log-space standard deviation; 0: every draw is ``mean``
    lo: int = 4
    hi: int = 2048

    def __post_init__(self):
        if not self.mean >= 1 or not self.sigma >= 0:
            raise ValueError(f"need mean >= 1 and sigma >= 0, got {self.mean!r}, {self.sigma!r}")
        if not (isinstance(self.lo, int) and isinstance(self.hi, int) and 1 <= self.lo <= self.hi):
            raise ValueError(f"need ints 1 <= lo <= hi, got {self.lo!r}, {self.hi!r}")

    @property
    def median(self) -> float:
        """Median before clipping: ``mean * exp(-sigma**2 / 2)``."""
        return self.mean * math.exp(-self.sigma ** 2 / 2)

    def quantile(self, q: float) -> float:
        """The ``q`` quantile after clipping (``0 < q < 1``)."""
        if not 0 < q < 1:
            raise ValueError(f"q must be in (0, 1), got {q!r}")
        from statistics import NormalDist
        mu = math.log(self.mean) - self.sigma ** 2 / 2
        x = math.exp(mu + self.sigma * NormalDist().inv_cdf(q))
        return float(min(max(round(x), self.lo), self.hi))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """i64[n] token counts."""
        return lognormal_lengths(rng, self.mean, self.sigma, n, self.lo, self.hi).astype(np.int64)


SHAREGPT_PROMPT = LengthDist(161.0, 1.0, 4, 2048)
SHAREGPT_OUTPUT = LengthDist(338.0, 0.9, 4, 2048)


def power_law_rates(n: int, total_rate: float, alpha: float) -> list[float]:
    """Rates of ``n`` models: ``total_rate * (i + 1) ** -alpha / sum_j (j + 1) ** -alpha``."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not total_rate > 0 or not math.isfinite(total_rate):
        raise ValueError(f"total_rate must be a finite number > 0, got {total_rate!r}")
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha!r}")
    w = [(i + 1) ** -alpha for i in range(n)]
    s = sum(w)
    return [total_rate * x / s for x in w]


def renewal_arrivals(rng: np.random.Generator, rate: float, cv: float,
                     duration_s: float) -> np.ndarray:
    """f64[k] arrival times in ``[0, duration_s)``: Gamma gaps of mean ``1 / rate`` and
    coefficient of variation ``cv`` (``cv = 1``: exponential gaps, a Poisson process)."""
    if not rate > 0 or not cv > 0 or not duration_s > 0:
        raise ValueError(f"need rate, cv and duration_s > 0, got {rate!r}, {cv!r}, "
                         f"{duration_s!r}")
    shape = 1.0 / cv ** 2  # Gamma(k, theta): mean k * theta = 1 / rate, cv = 1 / sqrt(k)
    scale = 1.0 / (rate * shape)
    out: list[np.ndarray] = []
    t = 0.0
    chunk = int(rate * duration_s * 1.1) + 16
    while t < duration_s:
        gaps = rng.exponential(1.0 / rate, chunk) if cv == 1 else rng.gamma(shape, scale, chunk)
        times = t + np.cumsum(gaps)
        out.append(times)
        t = float(times[-1])
    times = np.concatenate(out)
    return times[times < duration_s]


def _rng(seed: int, stream: int, model: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, model])


@dataclass(frozen=True)
class WorkloadSpec:
    """A seeded multi-model request stream (see the module docstring)."""

    models: tuple[str, ...]  # in popularity order: the first gets the highest rate
    total_rate: float  # requests/s over all models
    duration_s: float  # arrivals fall in [0, duration_s)
    alpha: float = 1.0  # power-law exponent of the per-model rates
    cv: float = 1.0  # coefficient of variation of arrival gaps (1: Poisson)
    prompt: LengthDist = field(default=SHAREGPT_PROMPT)
    output: LengthDist = field(default=SHAREGPT_OUTPUT)
    seed: int = 0
    shift_s: float | None = None  # popularity drift: the ranking moves on every shift_s

    def __post_init__(self):
        models = tuple(self.models)
        if not models or len(set(models)) != len(models):
            raise ValueError(f"models must name at least one model, each once: {models!r}")
        object.__setattr__(self, "models", models)
        if not self.duration_s > 0 or not math.isfinite(self.duration_s):
            raise ValueError(f"duration_s must be a finite number > 0, got {self.duration_s!r}")
        if not self.cv > 0:
            raise ValueError(f"cv must be > 0, got {self.cv!r}")
        power_law_rates(len(models), self.total_rate, self.alpha)  # validates
        if self.shift_s is not None and not (self.shift_s > 0 and math.isfinite(self.shift_s)):
            raise ValueError(f"shift_s must be a finite number > 0 or None, got "
                             f"{self.shift_s!r}")

    def rates(self) -> dict[str, float]:
        """Requests/s per model (with drift: in the first phase)."""
        return dict(zip(self.models, power_law_rates(len(self.models), self.total_rate,
                                                     self.alpha)))

    def phases(self) -> list[tuple[float, float, list[float]]]:
        """(start, end, rate of each model in ``models`` order) of each phase."""
        ranked = power_law_rates(len(self.models), self.total_rate, self.alpha)
        if self.shift_s is None:
            return [(0.0, self.duration_s, ranked)]
        n, out = len(self.models), []
        for k in range(math.ceil(self.duration_s / self.shift_s)):
            t0, t1 = k * self.shift_s, min((k + 1) * self.shift_s, self.duration_s)
            out.append((t0, t1, [ranked[(i - k) % n] for i in range(n)]))
        return out

    def mean_rates(self) -> dict[str, float]:
        """Each model's requests/s averaged over the whole duration."""
        if self.shift_s is None:
            return self.rates()
        tot = [0.0] * len(self.models)
        for t0, t1, rates in self.phases():
            for i, r in enumerate(rates):
                tot[i] += r * (t1 - t0)
        return {m: x / self.duration_s for m, x in zip(self.models, tot)}

    def _arrivals(self, i: int) -> np.ndarray:
        rng = _rng(self.seed, _ARRIVALS, i)
        return np.concatenate([t0 + renewal_arrivals(rng, rates[i], self.cv, t1 - t0)
                               for t0, t1, rates in self.phases()])

    def generate(self) -> list[Request]:
        """Every request of the stream, sorted by (arrival, model order)."""
        rows: list[tuple[float, int, int, int]] = []
        for i in range(len(self.models)):
            times = self._arrivals(i)
            n = len(times)
            p = self.prompt.sample(_rng(self.seed, _PROMPTS, i), n)
            o = self.output.sample(_rng(self.seed, _OUTPUTS, i), n)
            rows += zip(times.tolist(), [i] * n, p.tolist(), o.tolist())
        rows.sort(key=lambda r: (r[0], r[1]))
        return [Request(t, self.models[i], p, o) for t, i, p, o in rows]

    def describe(self) -> dict:
        """JSON-ready parameters, with the derived rates and length medians."""
        return {"models": list(self.models), "total_rate": self.total_rate,
                "duration_s": self.duration_s, "alpha": self.alpha, "cv": self.cv,
                "seed": self.seed, "rates": self.rates(), "shift_s": self.shift_s,
                "mean_rates": self.mean_rates(),
                "prompt": {**vars(self.prompt), "median": self.prompt.median},
                "output": {**vars(self.output), "median": self.output.median}}


# ------------------------------------------------------------------------ trace files
def write_trace(path: str | Path, reqs: Iterable[Request]) -> Path:
    """Write requests as JSON lines (``TRACE_FIELDS``), in the order given."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for r in reqs:
            f.write(json.dumps(r.to_dict()) + "\n")
    return p


def read_trace(path: str | Path) -> list[Request]:
    """Requests of a JSON-lines trace, in file order; blank lines are skipped.

    Raises ValueError naming the file and line of the first bad entry: not JSON, not an
    object, a missing or unknown field, or a value of the wrong type or range."""
    p = Path(path)
    out = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            out.append(_parse_line(line, f"{p}:{lineno}"))
    return out


def _parse_line(line: str, where: str) -> Request:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(obj, dict):  # a bad line of a file: a value error, not a type error
        raise ValueError(f"{where}: expected a JSON object with "  # noqa: TRY004
                         f"{list(TRACE_FIELDS)}, got {type(obj).__name__}")
    missing = [k for k in TRACE_FIELDS if k not in obj]
    unknown = sorted(set(obj) - set(TRACE_FIELDS))
    if missing or unknown:
        raise ValueError(f"{where}: missing fields {missing}, unknown fields {unknown}; "
                         f"a line holds exactly {list(TRACE_FIELDS)}")
    for k in ("prompt_tokens", "output_tokens"):
        v = obj[k]
        if isinstance(v, float) and v.is_integer():
            obj[k] = int(v)
    try:
        return Request(obj["arrival_s"], obj["model"], obj["prompt_tokens"],
                       obj["output_tokens"])
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def by_model(reqs: Sequence[Request]) -> dict[str, list[Request]]:
    """Requests grouped by model, each list in the given order."""
    out: dict[str, list[Request]] = {}
    for r in reqs:
        out.setdefault(r.model, []).append(r)
    return out
