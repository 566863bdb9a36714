"""The figures of ``bench serve``'s systems comparison (``serve_systems``), apart from
running it: the order runs take, each system's figures over its runs, FineServe's ratios
over static partitions, the simulator's error against the engine, and the plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# A run's figures that the record averages per (system, rate) (``per_system_figures``).
FIGURES = ("attainment", "output_tok_s", "slo_output_tok_s")


def within(runs: list[dict], key: str = "sim_error", tol: float = 0.2) -> int:
    """Runs whose simulated TTFT p50 and tokens/s are both within ``tol`` of the engine's."""
    return sum(None not in r[key].values() and abs(r[key]["ttft_p50"]) <= tol
               and abs(r[key]["output_tok_s"]) <= tol for r in runs)


def rel_error(predicted, measured):
    """Relative error of a prediction (None when either side is missing or zero)."""
    if predicted is None or not measured:
        return None
    return (predicted - measured) / measured


def goodput(rates: list[float], attain: list[float], level: float) -> float | None:
    """The highest swept rate whose attainment, and that of every lower swept rate, is at
    least ``level`` (None if the lowest misses it)."""
    best = None
    for r, a in sorted(zip(rates, attain)):
        if a < level:
            break
        best = r
    return best


def run_order(rates, systems, repeats: int = 1):
    """``(rate, repeat, system)`` in the order a sweep runs them: per rate, ``repeats``
    rounds of every system, round k's order rotated k places, so that over the rounds no
    system always runs first or right after the same other while the machine's speed
    drifts."""
    systems = list(systems)
    for rate in rates:
        for k in range(repeats):
            j = k % len(systems)
            for system in systems[j:] + systems[:j]:
                yield rate, k, system


def per_system_figures(runs: list[dict], rates, systems) -> dict:
    """Each system's attainment, output tokens/s and SLO-meeting tokens/s per rate over
    its runs: the mean, and with more than one run at some rate every run's value
    (``*_runs``, a list per rate); goodput from the mean attainment."""
    out = {}
    for system in systems:
        got = {key: [[r["summary"][key] for r in runs
                      if r["system"] == system and r["rate"] == x] for x in rates]
               for key in FIGURES if all(key in r["summary"] for r in runs)}
        if missing := [x for x, a in zip(rates, got["attainment"]) if not a]:
            raise ValueError(f"{system}: no run at {', '.join(f'{x:g}' for x in missing)} "
                             "req/s")
        d = {key: [float(np.mean(v)) for v in per_rate] for key, per_rate in got.items()}
        d |= {"goodput_90": goodput(rates, d["attainment"], 0.9),
              "goodput_99": goodput(rates, d["attainment"], 0.99)}
        if any(len(a) > 1 for a in got["attainment"]):
            d |= {f"{key}_runs": per_rate for key, per_rate in got.items()}
        out[system] = d
    return out


def ratios(per_system: dict, rates, ours: str = "fineserve",
           base: str = "static+fcfs") -> list[dict]:
    """``ours`` over ``base`` at each rate, for every figure both have (mean over runs);
    empty unless both systems ran."""
    if ours not in per_system or base not in per_system:
        return []
    a, b = per_system[ours], per_system[base]
    return [{"rate": x, **{key: (a[key][i] / b[key][i] if b[key][i] else None)
                           for key in FIGURES if key in a and key in b}}
            for i, x in enumerate(rates)]


def cell(mean: float, runs: list | None, fmt: str) -> str:
    """A table cell: the mean, and the lowest and highest run where there were several."""
    if not runs or len(runs) < 2:
        return format(mean, fmt)
    return f"{mean:{fmt}} ({min(runs):{fmt}}-{max(runs):{fmt}})"


def plot(record: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for s, d in record["per_system"].items():
        for ax, key, scale in ((a1, "attainment", 100), (a2, "output_tok_s", 1)):
            line, = ax.plot(record["rates"], [scale * v for v in d[key]], marker="o",
                            label=s)
            if runs := d.get(f"{key}_runs"):  # repeated runs: their range as a band
                ax.fill_between(record["rates"], [scale * min(r) for r in runs],
                                [scale * max(r) for r in runs], color=line.get_color(),
                                alpha=0.15, linewidth=0)
    a1.set(xlabel="request rate (req/s)", ylabel="SLO attainment (%)", ylim=(0, 105))
    a2.set(xlabel="request rate (req/s)", ylabel="output tokens/s")
    a1.legend()
    fig.suptitle(f"SmolLM2 bf16 + fireq-g32 on one {record['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
