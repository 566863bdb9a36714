"""What every benchmark subcommand shares: machine record, timing, JSON output, tables."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

CPU_FOOTER = ("CPU run: absolute tok/s are not results; only ratios between variants measured "
              "in this same run count (shared/BENCHMARKS.md).")


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, not the host's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def versions(packages: Sequence[str]) -> dict[str, str | None]:
    out = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info(packages: Sequence[str] = ("jax", "jaxlib", "numpy")) -> dict:
    import jax

    return {
        "platform": platform.platform(),
        "processor": _cpu_model() or platform.processor(),
        "cpu_count": cpu_count(),
        "python": sys.version.split()[0],
        "versions": versions(packages),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of one call; ``fn`` must block until its result is on the host."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def write_json(path: str | os.PathLike, record: dict) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return p


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]],
                 footer: Sequence[str] = (), left: int = 1) -> str:
    """Plain-text table: the first ``left`` columns left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        cells = [str(c).ljust(w) if i < left else str(c).rjust(w)
                 for i, (c, w) in enumerate(zip(r, widths))]
        return "  ".join(cells)

    out = [line(header), "  ".join("-" * w for w in widths), *map(line, rows)]
    return "\n".join([*out, *footer])
