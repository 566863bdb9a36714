"""Plots for notebooks: the KV pool over time, SLO attainment of a ``bench serve`` run, and
quantization error per layer (``quant.analysis``).

matplotlib is imported when a plot is drawn, not when this module is imported, so the
package does not depend on it. Sampling needs no matplotlib at all.

    samples = sample_pool(engine, handles)          # [(t, PoolStats), ...] while a burst runs
    plot_pool_timeline(samples)                    # rows held by each model, stacked
    plot_attainment("benchmarks/results/serve_systems_cpu.json")
    plot_layer_errors(layer_errors(cfg, params, tokens, tokenizer=tok), "keys")
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

SHARED = "(shared)"  # the layer of rows holding pages of several models (fixed-page pools)


def _pool(stats):
    """The ``PoolStats`` of an ``EngineStats`` (or a ``PoolStats`` itself)."""
    pool = getattr(stats, "pool", stats)
    if pool is None:
        raise ValueError("a sample has no pool statistics (engine not started?)")
    if not hasattr(pool, "rows_by_owner"):
        raise TypeError(f"expected EngineStats or PoolStats, got {type(stats).__name__}")
    return pool


@dataclass(frozen=True)
class PoolSeries:
    """Pool samples as arrays: what ``plot_pool_timeline`` draws."""

    t: np.ndarray  # f64[S] seconds since the first sample
    owners: dict[str, np.ndarray]  # owner -> i64[S] rows held, in order of first appearance
    rows_total: np.ndarray  # i64[S] rows of the pool (constant unless the pool was rebuilt)
    row_bytes: int  # bytes of one row (of the last sample)

    @property
    def rows_used(self) -> np.ndarray:
        """i64[S] rows held by anyone: the top of the stack."""
        if not self.owners:
            return np.zeros_like(self.rows_total)
        return np.sum(list(self.owners.values()), axis=0)


def pool_series(samples: Sequence[tuple[float, object]]) -> PoolSeries:
    """``[(t, EngineStats | PoolStats), ...]`` -> ``PoolSeries`` (samples sorted by t)."""
    if not samples:
        raise ValueError("no samples")
    samples = sorted(((float(t), _pool(s)) for t, s in samples), key=lambda x: x[0])
    order: list[str] = []
    for _, p in samples:
        order += [o for o in p.rows_by_owner if o not in order]
    if any(p.rows_shared for _, p in samples):
        order.append(SHARED)
    owners = {o: np.array([p.rows_shared if o == SHARED else p.rows_by_owner.get(o, 0)
                           for _, p in samples], np.int64) for o in order}
    t = np.array([t for t, _ in samples])
    return PoolSeries(t=t - t[0], owners=owners,
                      rows_total=np.array([p.rows_total for _, p in samples], np.int64),
                      row_bytes=samples[-1][1].row_bytes)


def _axes(ax, figsize):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def plot_pool_timeline(samples: Sequence[tuple[float, object]], ax=None, *,
                       title: str | None = "KV pool: rows held by each model"):
    """Stacked area of the pool's rows (slabs) held by each owner over time.

    ``samples``: ``[(t, EngineStats | PoolStats), ...]`` (``sample_pool`` or
    ``PoolRecorder`` collects them). One layer per owner in order of first appearance,
    drawn as steps (a sample holds until the next); a dashed line marks the pool's rows.
    Returns the matplotlib ``Axes``.
    """
    s = pool_series(samples)
    ax = _axes(ax, (7, 3.5))
    names = list(s.owners)
    if names:
        ax.stackplot(s.t, *[s.owners[n] for n in names], labels=names, step="post", alpha=0.8)
    ax.step(s.t, s.rows_total, where="post", color="black", linestyle="--", linewidth=1,
            label="pool rows")
    ax.set_xlabel("time (s)")
    ax.set_ylabel(f"rows of {s.row_bytes / 2**20:.2f} MiB")
    ax.set_ylim(0, max(int(s.rows_total.max()), 1) * 1.08)
    ax.set_xlim(0, max(float(s.t[-1]), 1e-3))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    if title:
        ax.set_title(title)
    return ax


def load_record(record: dict | str | Path) -> dict:
    """A ``bench serve --out-systems`` record: the dict itself or a path to its JSON."""
    if isinstance(record, (str, Path)):
        record = json.loads(Path(record).read_text())
    if not isinstance(record, dict) or "rates" not in record or "per_system" not in record:
        raise ValueError("not a serve-systems record (needs 'rates' and 'per_system')")
    n = len(record["rates"])
    for name, r in record["per_system"].items():
        if len(r.get("attainment", ())) != n:
            raise ValueError(f"system {name!r}: {len(r.get('attainment', ()))} attainment "
                             f"values for {n} rates")
        if "attainment_runs" in r and (len(r["attainment_runs"]) != n
                                       or not all(r["attainment_runs"])):
            raise ValueError(f"system {name!r}: 'attainment_runs' needs a non-empty list "
                             f"of runs for each of the {n} rates")
    return record


def plot_attainment(record: dict | str | Path, ax=None, *, target: float | None = 0.9,
                    title: str | None = None):
    """SLO attainment against request rate, one line per serving system.

    ``record``: the JSON ``bench serve --systems ... --out-systems`` writes (or its path).
    ``target``: a dotted horizontal line at that attainment (None: none). Returns the
    matplotlib ``Axes``.
    """
    from matplotlib.ticker import PercentFormatter

    rec = load_record(record)
    ax = _axes(ax, (6, 3.5))
    rates = np.asarray(rec["rates"], float)
    for name, r in rec["per_system"].items():
        line, = ax.plot(rates, np.asarray(r["attainment"], float), marker="o", label=name)
        if runs := r.get("attainment_runs"):  # repeated runs (bench serve --repeats)
            ax.fill_between(rates, [min(x) for x in runs], [max(x) for x in runs],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    if target is not None:
        ax.axhline(target, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower left", fontsize="small")
    ax.set_title(title if title is not None else
                 f"SLO attainment vs rate ({rec.get('device', '?')})")
    return ax


def plot_layer_errors(errors, kind: str = "stream", ax=None, *, log: bool = True,
                      title: str | None = None):
    """Relative error per layer, one line per quantization step.

    ``errors``: a ``quant.analysis.LayerErrors``. ``kind``: "stream" (the residual stream
    after each layer, whole model quantized), "keys" (attention logits with quantized keys
    and queries), "linears" (mean over the seven linear layers) or one linear's name
    ("wq", ..., "w_down"). Returns the matplotlib ``Axes``.
    """
    data = errors.series(kind)
    ax = _axes(ax, (7, 3.5))
    layers = np.arange(data.shape[1])
    for name, row in zip(errors.steps, data):
        ax.plot(layers, row, marker=".", label=name)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("relative error")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    what = {"stream": "residual stream after each layer", "keys": "attention logits q.k",
            "linears": "linear layers (mean of seven)"}.get(kind, f"linear {kind}")
    ax.set_title(title if title is not None else f"Quantization error: {what}")
    return ax


# ------------------------------------------------------------------ sampling
def sample_pool(engine, handles: Iterable = (), *, step: bool = False,
                interval_s: float = 0.02, timeout_s: float = 600.0) -> list[tuple[float, object]]:
    """``[(t, PoolStats), ...]`` of ``engine``'s pool while ``handles`` run.

    ``step=False``: the engine runs its own loop thread; poll ``engine.stats()`` every
    ``interval_s`` until every handle has finished. ``step=True`` (a ``start(thread=False)``
    engine): step it in this thread until no model has work, one sample before the first
    step and after each. ``t`` is ``time.monotonic()``. Raises ``TimeoutError`` after
    ``timeout_s``.
    """
    handles = list(handles)
    deadline = time.monotonic() + timeout_s
    out = [(time.monotonic(), engine.stats().pool)]
    while True:
        if step:
            busy = engine.step()
        else:
            busy = not all(h.finished for h in handles)
            if busy:
                time.sleep(interval_s)
        out.append((time.monotonic(), engine.stats().pool))
        if not busy:
            return out
        if time.monotonic() > deadline:
            raise TimeoutError(f"requests still running after {timeout_s} s")


class PoolRecorder:
    """Samples an engine's pool on a background thread (for an engine with its own loop).

        with PoolRecorder(engine) as rec:
            outs = [h.result() for h in handles]
        plot_pool_timeline(rec.samples)
    """

    def __init__(self, engine, interval_s: float = 0.02):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.engine, self.interval_s = engine, interval_s
        self.samples: list[tuple[float, object]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self):
        while True:
            self.samples.append((time.monotonic(), self.engine.stats().pool))
            if self._stop.wait(self.interval_s):
                break
        self.samples.append((time.monotonic(), self.engine.stats().pool))

    def start(self) -> "PoolRecorder":
        if self._thread is not None:
            raise RuntimeError("recorder already started")
        self._thread = threading.Thread(target=self._run, name="pool-recorder", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, object]]:
        """Stops sampling (one last sample) and returns the samples."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        return self.samples

    def __enter__(self) -> "PoolRecorder":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
