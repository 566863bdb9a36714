"""What every engine iteration did and how long each part took (host clock).

The engine appends one ``StepRecord`` per model step it runs: which model, prefill or
decode, the rows' chunk and context lengths, and four ``time.monotonic`` stamps: the
iteration's start (before the inbox and the local scheduler), the jitted step's start and
end (tokens back on the host), and the iteration's end (tokens handed to the streams).
``summarize`` sets a run's records against a cost model: how much of the wall time the
device step took, how much the host around it, and how far the measured step times are
from the cost model's predictions for the same batches. That is what a simulator driven by
the cost model leaves out.
"""

from __future__ import annotations

import collections
import statistics
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping


@dataclass(frozen=True)
class StepRecord:
    model: str
    kind: str  # "prefill" | "decode"
    chunks: tuple[int, ...]  # new tokens of each row
    contexts: tuple[int, ...]  # tokens each row holds after the step
    start: float  # iteration start
    run_start: float  # jitted step called
    run_end: float  # its tokens on the host
    end: float  # iteration end

    @property
    def run_s(self) -> float:
        return self.run_end - self.run_start

    @property
    def host_s(self) -> float:
        """Iteration time outside the jitted step: inbox, scheduling, batch building,
        log-probabilities, postprocessing."""
        return (self.end - self.start) - self.run_s


class StepLog:
    """The latest ``maxlen`` step records of an engine (thread-safe appends)."""

    def __init__(self, maxlen: int = 200_000):
        self._records: collections.deque[StepRecord] = collections.deque(maxlen=maxlen)

    def add(self, record: StepRecord) -> None:
        self._records.append(record)

    def between(self, t0: float, t1: float | None = None) -> list[StepRecord]:
        """Records of iterations that started in ``[t0, t1)`` (monotonic seconds)."""
        return [r for r in list(self._records)
                if r.start >= t0 and (t1 is None or r.start < t1)]

    def __len__(self) -> int:
        return len(self._records)


def _stats(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "sum_s": sum(xs), "mean_s": sum(xs) / len(xs),
            "p50_s": statistics.median(xs)}


def summarize(records: Iterable[StepRecord],
              cost_of: Callable[[str], object] | Mapping[str, object] | None = None) -> dict:
    """Per kind: step count, jitted-step and host seconds (sum, mean, median), and with a
    cost model (``cost_of(model)`` or a mapping to ``StepCost``s) the predicted seconds of
    the same batches and the measured/predicted ratio of the jitted step."""
    get = cost_of.get if isinstance(cost_of, Mapping) else cost_of
    out = {}
    recs = list(records)
    for kind in ("prefill", "decode"):
        rs = [r for r in recs if r.kind == kind]
        d = {"steps": len(rs), "run": _stats([r.run_s for r in rs]),
             "host": _stats([r.host_s for r in rs])}
        if get is not None and rs:
            pred = []
            for r in rs:
                c = get(r.model)
                pred.append(c.decode_time(list(r.contexts)) if kind == "decode"
                            else c.prefill_time(list(r.chunks), list(r.contexts)))
            d["predicted"] = _stats(pred)
            d["run_over_predicted"] = sum(r.run_s for r in rs) / max(sum(pred), 1e-12)
        out[kind] = d
    if len(recs) > 1:
        recs.sort(key=lambda r: r.start)
        span = recs[-1].end - recs[0].start
        busy = sum(r.end - r.start for r in recs)
        out["span_s"], out["busy_s"] = span, busy
        out["gaps_s"] = span - busy  # the loop waiting, or other threads holding the CPU
    return out
