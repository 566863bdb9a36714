"""Re-simulate a `bench serve --systems` record under the admission ablation.

Every run of the record is simulated again from what the record holds (its config, the
start-up step profile in ``costs`` and the SLOs), once as the engine admits (headroom for
every model's running decodes on a shared pool) and once with ``GroupSpec.own_headroom``
(headroom for each model's own decodes only). The first reproduces the record's
``simulated_profile`` figures when the record was written by the same code; the second
says what the device-wide headroom changed on that run's trace, costs and SLOs, without
the run-to-run noise of the real engine. ``--kv-budget-scale X`` adds a column with the
device's KV pool X times the record's (the engine's rule): where a system gains from a
larger pool, memory held it back on that trace. ``--systems`` simulates these systems at
every rate of the record instead of the record's runs (one the record did not run has no
recorded column).

    python benchmarks/resimulate_serve.py benchmarks/results/serve_systems_cpu_admission.json
    python benchmarks/resimulate_serve.py RECORD --kv-budget-scale 2 --systems static+fcfs kvslab+fcfs
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fineserve_jax.bench import serve_systems as S  # noqa: E402
from fineserve_jax.bench.memory import kv_format_of  # noqa: E402
from fineserve_jax.kvslab import BlockFormat  # noqa: E402
from fineserve_jax.precisions import get_precision  # noqa: E402
from schedulers.batching import SLO  # noqa: E402
from schedulers.costmodel import ProfiledCost  # noqa: E402


def block_formats(rec: dict, block_tokens: int) -> dict:
    """The KV block format of each model of the benchmark: as the record keeps it, or
    (records written before they kept it) as its engine lays it out, from loading the
    default ``serve.py`` models."""
    if "kv_formats" in rec:
        return {n: BlockFormat(**d) for n, d in rec["kv_formats"].items()}
    specs, loaded = S.load_default_models()
    out = {}
    for n in S.MODELS:
        model, prec = loaded[n]
        fmt = kv_format_of(get_precision(prec), specs[n]["dtype"])
        out[n] = fmt.block_format(model.config, block_tokens)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("record", help="a bench serve --out-systems JSON record")
    p.add_argument("--kv-budget-scale", type=float, metavar="X",
                   help="also simulate with the KV pool X times the record's")
    p.add_argument("--systems", nargs="+", choices=list(S.SYSTEMS), metavar="SYSTEM",
                   help="simulate these systems at each of the record's rates "
                        f"(any of {', '.join(S.SYSTEMS)}; default: the record's runs)")
    a = p.parse_args(argv)
    if a.kv_budget_scale is not None and not a.kv_budget_scale > 0:
        p.error(f"--kv-budget-scale must be > 0, got {a.kv_budget_scale:g}")
    rec = json.loads(Path(a.record).read_text())
    args = types.SimpleNamespace(**rec["config"])
    costs = {n: ProfiledCost.from_dict(d) for n, d in rec["costs"].items()}
    slos = {n: SLO(**v) for n, v in rec["slos"].items()}
    fmts = block_formats(rec, next(iter(costs.values())).block_tokens)
    heads = ["recorded", "device-wide", "own only"]
    if a.kv_budget_scale is not None:
        heads.append(f"pool x{a.kv_budget_scale:g}")
        bigger = types.SimpleNamespace(**{**rec["config"], "kv_budget": int(
            args.kv_budget * a.kv_budget_scale)})
    print(f"{'system':16s} {'rate':>5s}  " + "  ".join(f"{h:>14s}" for h in heads)
          + "   (attainment / output tok/s, simulated)")
    ran = {(r["system"], r["rate"]): r for r in rec["runs"]}
    todo = list(ran) if a.systems is None else [(s, x) for x in rec["rates"] for s in a.systems]
    for system, rate in todo:
        reqs = S.workload(args, rate).generate()
        got = [ran[system, rate]["simulated_profile"] if (system, rate) in ran else None,
               S.simulate(args, system, reqs, costs, slos, fmts),
               S.simulate(args, system, reqs, costs, slos, fmts, own_headroom=True)]
        if a.kv_budget_scale is not None:
            got.append(S.simulate(bigger, system, reqs, costs, slos, fmts))
        cells = ["-" if x is None else f"{x['attainment']:.3f} / {x['output_tok_s']:5.2f}"
                 for x in got]
        print(f"{system:16s} {rate:5g}  " + "  ".join(f"{c:>14s}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
