"""Plan and place models on a cluster; write the placement file ``serve.py`` executes.

    python -m schedulers.place examples/placement_models.toml --devices 8 --device-kind h100
    python -m schedulers.place models.json --algorithm kvpr --out placement.json

The model list (JSON or TOML) holds a ``models`` list and, optionally, any option below
(command-line options win). Each model has:

- ``name``, ``precision`` (bf16, fp8, w4a16, fireq, fireq-g32), ``rate`` (req/s),
  ``prompt_tokens`` and ``output_tokens`` (means), ``ttft_slo_ms`` and ``tpot_slo_ms``;
- ``shape``: a known decoder (``llama3-8b``, ``llama3-70b``, ``llama2-7b``,
  ``llama2-13b``, ``smollm2-135m``) or a table of ``schedulers.roofline.ModelShape``
  fields; its step times then come from the roofline model (``AnalyticCost``) on the
  device kind;
- optionally ``weight_bytes`` (the size of the served checkpoint, e.g. as
  ``python -m checkpoints.convert`` prints it) and ``kv_bytes_per_token``, which override
  the sizes derived from the shape, and ``block_bytes`` (one KV block of its format);
- with ``--cost-model FILE`` (``python -m schedulers.profile``), step times come from the
  profiled entry (``profile`` names it, default the model's name; key (profile,
  precision, device kind)) and only tp = 1 is planned; ``weight_bytes`` and
  ``kv_bytes_per_token`` are then needed unless a ``shape`` gives them.

Device kinds: ``h100`` (H100 SXM, 80 GB), ``h200`` (141 GB), or any name with
``--device-memory-gib`` (and a ``--cost-model`` profiled on it). Prints each model's plan
(tensor parallelism, replicas, batches, utilisation), then the device groups, then what
could not be placed and which models share a group past the planned load (no group had
room for their only replica: ``--no-overcommit`` reports them unplaced instead);
exits 1 if something was left unplaced.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from schedulers.placement import (ALGORITHMS, ModelDemand, ParallelPlan, Placement,
                                  PlacementConfig, place, plan_parallelism)
from schedulers.roofline import PRECISION_COSTS, AnalyticCost, DeviceSpec, ModelShape

SHAPES = {"llama3-8b": ModelShape.llama3_8b, "llama3-70b": ModelShape.llama3_70b,
          "llama2-7b": ModelShape.llama2_7b, "llama2-13b": ModelShape.llama2_13b,
          "smollm2-135m": ModelShape.smollm2_135m}
DEVICES = {"h100": DeviceSpec.h100_sxm, "h200": DeviceSpec.h200}
MODEL_KEYS = {"name", "precision", "rate", "prompt_tokens", "output_tokens", "ttft_slo_ms",
              "tpot_slo_ms", "shape", "weight_bytes", "kv_bytes_per_token", "block_bytes",
              "profile"}
REQUIRED = ("name", "precision", "rate", "prompt_tokens", "output_tokens", "ttft_slo_ms",
            "tpot_slo_ms")


class SpecError(ValueError):
    """The model list is wrong; the message names the model and key."""


def _shape(spec, where: str) -> ModelShape:
    if isinstance(spec, str):
        key = spec.lower().replace("_", "-").replace("llama-", "llama")
        if key not in SHAPES:
            raise SpecError(f"{where}: unknown shape {spec!r}; known: {sorted(SHAPES)} "
                            f"(or a table of ModelShape fields)")
        return SHAPES[key]()
    if isinstance(spec, dict):
        try:
            return ModelShape(**{"name": spec.get("name", where), **spec})
        except TypeError as e:
            raise SpecError(f"{where}: shape table: {e}") from None
    raise SpecError(f"{where}: shape must be a name or a table, got {spec!r}")


def device_spec(kind: str, memory_gib: float | None) -> DeviceSpec:
    if kind in DEVICES:
        dev = DEVICES[kind]()
        if memory_gib is not None:
            dev = DeviceSpec(dev.name, memory_gib * 2**30, dev.hbm_bytes_per_s, dev.bf16_flops,
                             dev.fp8_flops, dev.link_bytes_per_s)
        return dev
    if memory_gib is None:
        raise SpecError(f"device kind {kind!r} is not one of {sorted(DEVICES)}: give its "
                        f"memory with --device-memory-gib (and its costs with --cost-model)")
    return DeviceSpec(kind, memory_gib * 2**30, 0.0, 0.0, 0.0)


def build_demand(m: dict, device: DeviceSpec, block_tokens: int, profiles=None) -> ModelDemand:
    """One entry of the model list -> ``ModelDemand`` (costs on ``device``)."""
    where = f"model {m.get('name', '?')!r}"
    if not isinstance(m, dict):
        raise SpecError(f"a model must be a table/object, got {m!r}")
    unknown = set(m) - MODEL_KEYS
    if unknown:
        raise SpecError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(MODEL_KEYS)})")
    missing = [k for k in REQUIRED if k not in m]
    if missing:
        raise SpecError(f"{where}: missing {missing}")
    prec = m["precision"]
    if prec not in PRECISION_COSTS:
        raise SpecError(f"{where}: precision {prec!r} is not one of {sorted(PRECISION_COSTS)}")
    shape = _shape(m["shape"], where) if "shape" in m else None
    sized = AnalyticCost(shape, prec, device, 1) if shape is not None else None
    weight = m.get("weight_bytes", sized.weight_bytes() if sized else None)
    kv = m.get("kv_bytes_per_token", sized.kv_bytes_per_token() if sized else None)
    if weight is None or kv is None:
        raise SpecError(f"{where}: give a shape, or weight_bytes and kv_bytes_per_token")
    if profiles is not None:
        entry = profiles.get(m.get("profile", m["name"]), prec, device.name)

        def cost(tp: int, entry=entry):
            if tp != 1:
                raise ValueError("a profiled cost is for tp = 1 only")
            return entry
    elif shape is not None:
        def cost(tp: int, shape=shape):
            return AnalyticCost(shape, prec, device, tp)
    else:
        raise SpecError(f"{where}: without --cost-model a shape is needed for its step times")
    try:
        return ModelDemand(m["name"], prec, float(weight), float(kv), float(m["rate"]),
                           float(m["prompt_tokens"]), float(m["output_tokens"]),
                           float(m["ttft_slo_ms"]) / 1e3, float(m["tpot_slo_ms"]) / 1e3,
                           cost=cost, block_tokens=block_tokens,
                           block_bytes=m.get("block_bytes"))
    except (TypeError, ValueError) as e:
        raise SpecError(f"{where}: {e}") from None


def read_list(path: str) -> dict:
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".toml":
        import tomllib

        data = tomllib.loads(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("models"), list) or not data["models"]:
        raise SpecError(f"{path}: expected a non-empty 'models' list at the top")
    return data


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m schedulers.place", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", help="JSON or TOML model list")
    ap.add_argument("--devices", type=int, help="devices in the cluster (default 8)")
    ap.add_argument("--device-kind", help=f"{sorted(DEVICES)} or a profiled kind (default h100)")
    ap.add_argument("--device-memory-gib", type=float, help="memory of one device")
    ap.add_argument("--algorithm", choices=ALGORITHMS, help="default slab-greedy")
    ap.add_argument("--tp", help="tensor-parallel degrees to consider, e.g. 1,2,4,8 (default)")
    ap.add_argument("--block-tokens", type=int, help="tokens per KV block (default 16)")
    ap.add_argument("--reserve-fraction", type=float,
                    help="memory of each device kept off weights and KV (default 0.1)")
    ap.add_argument("--headroom", type=float, help="most planned compute share (default 0.9)")
    ap.add_argument("--max-batch", type=int, help="largest decode batch (default 256)")
    ap.add_argument("--balance-compute", action=argparse.BooleanOptionalAction, default=None,
                    help="slab-greedy weighs free KV blocks by the compute each group has "
                         "left (default on; --no-balance-compute: free KV blocks alone)")
    ap.add_argument("--overcommit", action=argparse.BooleanOptionalAction, default=None,
                    help="slab-greedy serves a model that fits no group within the planned "
                         "load past it, where the load is least (default on; "
                         "--no-overcommit: it is reported unplaced)")
    ap.add_argument("--cost-model", help="profiled cost-model JSON (tp = 1 only)")
    ap.add_argument("--out", help="placement file to write (default placement.json)")
    return ap


DEFAULTS = {"devices": 8, "device_kind": "h100", "device_memory_gib": None,
            "algorithm": "slab-greedy", "tp": "1,2,4,8", "block_tokens": 16,
            "reserve_fraction": 0.1, "headroom": 0.9, "max_batch": 256,
            "balance_compute": PlacementConfig.balance_compute,
            "overcommit": PlacementConfig.overcommit, "cost_model": None,
            "out": "placement.json"}


def options(args: argparse.Namespace, data: dict) -> dict:
    """Command line over the file's keys over the defaults."""
    extra = set(data) - set(DEFAULTS) - {"models"}
    if extra:
        raise SpecError(f"{args.models}: unknown keys {sorted(extra)} (known: "
                        f"{sorted(DEFAULTS)} and models)")
    out = {}
    for k, v in DEFAULTS.items():
        cli = getattr(args, k)
        out[k] = cli if cli is not None else data.get(k, v)
    if isinstance(out["tp"], str):
        out["tp"] = tuple(int(x) for x in out["tp"].split(","))
    return out


def plan_table(demands, plans: dict[str, ParallelPlan]) -> str:
    rows = [f"{'model':<22} {'prec':<9} {'rate':>6} {'tp':>3} {'repl':>4} {'b_slo':>5} "
            f"{'b_rate':>6} {'conc':>5} {'util':>5}  SLO"]
    for d in demands:
        p = plans[d.name]
        slo = "ok" if p.meets_slo else ("no fit" if not p.fits else "missed at batch 1")
        rows.append(f"{d.name:<22} {d.precision:<9} {d.rate:>6.2f} {p.tp:>3} {p.replicas:>4} "
                    f"{p.batch_slo:>5} {p.batch_rate:>6} {p.concurrency:>5} "
                    f"{p.utilisation:>5.2f}  {slo}")
    return "\n".join(rows)


def placement_table(pl: Placement, n_devices: int,
                    plans: dict[str, ParallelPlan] | None = None) -> str:
    """One row per device group; a model sharded over a group wider than its plan's tp
    is marked ``(planned tp N)``."""
    rows = [f"{'devices':<14} {'tp':>2} {'KV budget GiB':>13} {'KV need GiB':>11} "
            f"{'util':>5}  models"]
    plans = plans or {}

    def name(m: str, tp: int) -> str:
        p = plans.get(m)
        return f"{m} (planned tp {p.tp})" if p is not None and p.tp < tp else m

    for g in pl.groups:
        devs = ",".join(map(str, g.devices))
        rows.append(f"{devs:<14} {g.tp:>2} {g.kv_budget_bytes / 2**30:>13.2f} "
                    f"{g.kv_need_bytes / 2**30:>11.2f} {g.utilisation:>5.2f}  "
                    f"{', '.join(name(m, g.tp) for m in g.models)}")
    rows.append(f"{pl.algorithm}: {pl.devices_used} of {n_devices} devices used, "
                f"{len(pl.unplaced)} replica(s) unplaced")
    rows += [f"  unplaced {u.model} (replica {u.replica}): {u.reason}" for u in pl.unplaced]
    rows += [f"  overcommitted {m}: no group had room within the planned load for its only "
             f"replica; it shares the least loaded one that holds it" for m in pl.overcommitted]
    return "\n".join(rows)


def _rule(o: dict) -> str:
    if o["algorithm"] != "slab-greedy":
        return ""
    return (" (free KV blocks weighted by compute left)" if o["balance_compute"]
            else " (free KV blocks alone)")


def run(argv=None) -> tuple[Placement, str]:
    args = build_parser().parse_args(argv)
    data = read_list(args.models)
    o = options(args, data)
    device = device_spec(o["device_kind"], o["device_memory_gib"])
    profiles = None
    if o["cost_model"]:
        from schedulers.costmodel import CostModel

        profiles = CostModel.load(o["cost_model"])
        o["tp"] = (1,)
    for key in ("balance_compute", "overcommit"):
        if not isinstance(o[key], bool):
            raise SpecError(f"{args.models}: {key} must be true or false, got {o[key]!r}")
    config = PlacementConfig(o["reserve_fraction"], o["headroom"], o["max_batch"],
                             o["balance_compute"], o["overcommit"])
    demands = [build_demand(m, device, o["block_tokens"], profiles) for m in data["models"]]
    plans = {d.name: plan_parallelism(d, device, o["tp"], config) for d in demands}
    pl = place(o["algorithm"], demands, plans, [device] * o["devices"], config)
    Path(o["out"]).write_text(pl.to_json(), encoding="utf-8")
    report = (f"{o['devices']} x {device.name} ({device.memory_bytes / 2**30:.1f} GiB), "
              f"algorithm {o['algorithm']}{_rule(o)}\n\n{plan_table(demands, plans)}\n\n"
              f"{placement_table(pl, o['devices'], plans)}\nwrote {o['out']}")
    return pl, report


def main(argv=None) -> int:
    try:
        pl, report = run(argv)
    except (SpecError, KeyError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report)
    return 1 if pl.unplaced else 0


if __name__ == "__main__":
    sys.exit(main())
