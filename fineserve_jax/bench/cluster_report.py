"""What ``python -m fineserve_jax.bench cluster`` derives from its rows and how it shows
them: goodput and static's knee (``summarize``), figures over several seeds' traces
(``over_seeds``), the plot and the printed tables. Definitions are in
``fineserve_jax.bench.cluster``'s docstring."""

from __future__ import annotations

import math

from fineserve_jax.bench.common import format_table


def goodput(points: list[tuple[float, float]], target: float) -> dict:
    """Highest rate whose attainment (and every lower rate's) reaches ``target``,
    interpolated towards the first rate that misses; points are (rate, attainment)."""
    pts = sorted(points)
    last = None
    for i, (r, a) in enumerate(pts):
        if a < target:
            if last is None:
                return {"rate": 0.0, "saturated": True}
            r0, a0 = pts[i - 1]
            return {"rate": r0 + (a0 - target) / (a0 - a) * (r - r0), "saturated": True}
        last = r
    return {"rate": last, "saturated": False}


def knee(points: list[tuple[float, float]], drop: float = 0.10) -> float | None:
    """Lowest rate whose attainment is more than ``drop`` below the best at rates <= it."""
    best = -math.inf
    for r, a in sorted(points):
        best = max(best, a)
        if a < best - drop:
            return r
    return None


def summarize(rows: list[dict], systems: list[str]) -> dict:
    by = {(r["system"], r["rate"]): r for r in rows}
    rates = sorted({r["rate"] for r in rows})
    out = {"goodput": {}}
    for s in systems:
        pts = [(x, by[(s, x)]["slo_attainment"]) for x in rates]
        out["goodput"][s] = {"90": goodput(pts, 0.90), "99": goodput(pts, 0.99)}
    if "static" in systems and "fineserve" in systems:
        k = knee([(x, by[("static", x)]["slo_attainment"]) for x in rates])
        head = {"static_knee_rate": k}
        if k is not None:
            f, st = by[("fineserve", k)], by[("static", k)]
            head["attainment"] = {"fineserve": f["slo_attainment"], "static": st["slo_attainment"]}
            head["attainment_ratio"] = (f["slo_attainment"] / st["slo_attainment"]
                                        if st["slo_attainment"] else None)
            head["output_tok_s_ratio"] = (f["output_tok_s"] / st["output_tok_s"]
                                          if st["output_tok_s"] else None)
        out["headline"] = head
    return out


def seed_points(rows_by_seed: dict[int, list[dict]], **per_row) -> list[dict]:
    """Per (system, rate), by rate then system: ``slo_attainment`` on each seed's trace
    (in ``rows_by_seed`` order), each ``per_row`` figure (name -> function of a result
    row) per seed, and the mean attainment."""
    seeds = list(rows_by_seed)
    at: dict[tuple, dict] = {}
    for seed, rows in rows_by_seed.items():
        for r in rows:
            at.setdefault((r["system"], r["rate"]), {})[seed] = r
    return [{"system": s, "rate": rate,
             "slo_attainment": [v[k]["slo_attainment"] for k in seeds],
             **{name: [f(v[k]) for k in seeds] for name, f in per_row.items()},
             "mean": sum(v[k]["slo_attainment"] for k in seeds) / len(seeds)}
            for (s, rate), v in sorted(at.items(), key=lambda kv: (kv[0][1], kv[0][0]))]


def over_seeds(rows_by_seed: dict[int, list[dict]], systems: list[str]) -> dict:
    """Per (system, rate): attainment on each seed's trace and their mean
    (``seed_points``); per seed the goodput and headline of ``summarize``."""
    return {"seeds": list(rows_by_seed), "points": seed_points(rows_by_seed),
            "by_seed": {str(k): summarize(rows, systems) for k, rows in rows_by_seed.items()}}


def plot(record: dict, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for s in record["config"]["systems"]:
        pts = sorted((r["rate"], r["slo_attainment"], r["output_tok_s"])
                     for r in record["results"] if r["system"] == s)
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s)
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=s)
    for y in (0.9, 0.99):
        ax1.axhline(y, color="grey", lw=0.6, ls="--")
    ax1.set(xlabel="total rate (req/s)", ylabel="SLO attainment", ylim=(0, 1.02),
            title=f"{record['config']['gpus']} simulated H100s, {len(record['models'])} models")
    ax2.set(xlabel="total rate (req/s)", ylabel="output tokens/s", title="throughput")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(record: dict) -> str:
    rows = []
    for r in sorted(record["results"], key=lambda r: (r["rate"], r["system"])):
        rows.append([r["system"], f"{r['rate']:g}", f"{r['slo_attainment']:.3f}",
                     f"{r['output_tok_s']:.0f}", str(r["dropped"]),
                     str(r["failed"] + r["unplaced"] + r["unfinished"]),
                     str(r["preemptions"]),
                     "-" if r["ttft_s"]["p90"] is None else f"{r['ttft_s']['p90'] * 1e3:.0f}",
                     "-" if r["tpot_s"]["p90"] is None else f"{r['tpot_s']['p90'] * 1e3:.1f}",
                     str(r["gpus_used"])])
    header = ["system", "rate", "attain", "tok/s", "dropped", "lost", "preempt",
              "TTFT p90 ms", "TPOT p90 ms", "GPUs"]
    out = [format_table(header, rows, left=1)]
    g = record["goodput"]
    out.append("")
    out.append(format_table(
        ["system", "goodput@90%", "goodput@99%", f"fewest GPUs @ {record['fewest_gpus']['rate']:g}/s"],
        [[s, f"{g[s]['90']['rate']:.1f}{'' if g[s]['90']['saturated'] else '+'}",
          f"{g[s]['99']['rate']:.1f}{'' if g[s]['99']['saturated'] else '+'}",
          str(record["fewest_gpus"][s]["gpus"] or f"> {max(record['config']['gpu_grid'])}")]
         for s in g], left=1,
        footer=[("goodput: req/s with attainment >= target at it and every lower rate "
                 "('+': never missed in the sweep); lost = failed + unplaced + unfinished")]))
    h = record.get("headline")
    if h:
        if h["static_knee_rate"] is None:
            out.append("static never falls 10 points below its best in this sweep: no knee")
        else:
            ar, tr = h["attainment_ratio"], h["output_tok_s_ratio"]
            out.append(f"at static's knee ({h['static_knee_rate']:g} req/s): FineServe "
                       f"attainment {h['attainment']['fineserve']:.3f} vs "
                       f"{h['attainment']['static']:.3f} "
                       f"({'-' if ar is None else f'{ar:.2f}x'}), output tok/s "
                       f"{'-' if tr is None else f'{tr:.2f}x'}")
    sd = record.get("seeds")
    if sd:
        out.append("")
        out.append(format_table(
            ["system", "rate", *[f"seed {k}" for k in sd["seeds"]], "mean"],
            [[p["system"], f"{p['rate']:g}", *[f"{a:.3f}" for a in p["slo_attainment"]],
              f"{p['mean']:.3f}"] for p in sd["points"]], left=1,
            footer=["attainment on each seed's trace (the tables above: the first seed)"]))
    return "\n".join(out)
