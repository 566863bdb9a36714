"""Serve several models behind one OpenAI-compatible endpoint.

    python serve.py          # SmolLM2-135M in bf16 and in fireq-g32, one KV pool, 127.0.0.1:8000

The default serves the packaged SmolLM2-135M twice: ``smollm2-135m-bf16`` and
``smollm2-135m-fireq-g32`` (W4A8 weights, INT4 KV), sharing one KV Slab pool. The
quantized checkpoint is made on the first start (calibration and rounding, with a progress
bar) and cached under ``~/.cache/fineserve-jax`` (``--cache-dir`` to choose).

Models: ``--model NAME=SOURCE[,precision=P][,dtype=D][,ttft-slo=MS][,tpot-slo=MS]
[,calib-tokens=N]`` (repeatable; SOURCE is an alias, a .gguf file, an HF directory or an
Orbax checkpoint), or a ``--config`` file (JSON or TOML) whose ``models`` list holds the
same keys (name, source, precision, dtype, ttft_slo_ms, tpot_slo_ms, calib_tokens) and
whose other keys set any option below. Command-line options win over the file.

Placement: without ``--placement`` every model shares one engine and one KV pool of
``--kv-budget`` bytes on the default device. A placement file (JSON) puts models on local
devices: ``{"devices": [{"device": 0, "models": ["a", "b"], "kv_budget_bytes": N}, ...]}``,
one engine and one pool per device; a group ``{"devices": [1, 2], "tp": 2, ...}`` runs its
models tensor-parallel over a mesh of those devices (the pool replicated on each).
``python -m schedulers.place`` writes such files from rates, SLOs and memory.

Re-placement while serving (with ``--placement``): ``--rebalance-interval S`` checks the
observed request rates every S seconds (over the last ``--rebalance-window`` seconds, by
default ``max(S, 60)``) and, when a model's rate moved by more than
``--rebalance-threshold`` (relative) from the rates of the last plan, runs the global
scheduler again and moves models between the device engines (load on the new device, then
drain the old) without failing a request. The current placement and the decisions are on
``GET /admin/placement``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

DEFAULT_MODELS = ["smollm2-135m-bf16=smollm2-135m,precision=bf16",
                  "smollm2-135m-fireq-g32=smollm2-135m,precision=fireq-g32"]
SPEC_KEYS = {"precision": str, "dtype": str, "ttft_slo_ms": float, "tpot_slo_ms": float,
             "calib_tokens": int}

log = logging.getLogger("serve")


def parse_model_spec(spec: str) -> dict:
    """``NAME=SOURCE[,key=value...]`` -> model dict (keys as in a config file)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"--model {spec!r}: expected NAME=SOURCE[,key=value...]")
    source, *opts = rest.split(",")
    out = {"name": name, "source": source}
    for o in opts:
        k, sep, v = o.partition("=")
        k = k.strip().replace("-", "_")
        k = {"ttft_slo": "ttft_slo_ms", "tpot_slo": "tpot_slo_ms"}.get(k, k)
        if not sep or k not in SPEC_KEYS:
            raise argparse.ArgumentTypeError(
                f"--model {spec!r}: unknown option {o!r} (precision=, dtype=, ttft-slo=MS, "
                f"tpot-slo=MS, calib-tokens=N)")
        out[k] = v
    return check_model(out, f"--model {spec!r}")


def check_model(m: dict, where: str) -> dict:
    if not isinstance(m, dict) or not isinstance(m.get("name"), str) or not isinstance(
            m.get("source"), str) or not m["name"] or not m["source"]:
        raise argparse.ArgumentTypeError(f"{where}: a model needs a name and a source")
    out = {"name": m["name"], "source": m["source"], "precision": None, "dtype": "bfloat16",
           "ttft_slo_ms": None, "tpot_slo_ms": None, "calib_tokens": None}
    for k, v in m.items():
        if k in ("name", "source"):
            continue
        if k not in SPEC_KEYS:
            raise argparse.ArgumentTypeError(f"{where}: unknown model key {k!r} "
                                             f"(known: {sorted(SPEC_KEYS)})")
        try:
            out[k] = SPEC_KEYS[k](v)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{where}: {k}={v!r} is not valid "
                                             f"({SPEC_KEYS[k].__name__} expected)") from None
    if out["dtype"] not in ("bfloat16", "float32"):
        raise argparse.ArgumentTypeError(f"{where}: dtype must be bfloat16 or float32")
    return out


def read_config(path: str) -> dict:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SystemExit(f"error: cannot read --config {path}: {e}") from None
    try:
        if p.suffix == ".toml":
            import tomllib

            return tomllib.loads(text)
        return json.loads(text)
    except ValueError as e:
        kind = "TOML" if p.suffix == ".toml" else "JSON"
        raise SystemExit(f"error: --config {path} is not valid {kind}: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="JSON or TOML file: models and any option below")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to bind (loopback unless you mean otherwise)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model", action="append", type=parse_model_spec, dest="models",
                    help="NAME=SOURCE[,precision=P][,dtype=D][,ttft-slo=MS][,tpot-slo=MS]"
                         "[,calib-tokens=N] (repeatable)")
    ap.add_argument("--placement", help="JSON file placing models on local devices")
    ap.add_argument("--kv-budget", type=int, default=512 * 2**20, metavar="BYTES",
                    help="bytes of the KV pool shared by the models of one device")
    ap.add_argument("--max-seqs", type=int, default=16, help="running sequences per model")
    ap.add_argument("--max-model-len", type=int, default=2048,
                    help="prompt + output tokens of one request (capped by each model)")
    ap.add_argument("--max-prefill-tokens", type=int, default=256,
                    help="prompt tokens of one prefill step (longer prompts run in chunks)")
    ap.add_argument("--batch-invariant", action="store_true",
                    help="one compiled shape per step kind: outputs independent of batching "
                         "(slower at low load)")
    ap.add_argument("--scheduler", default="fineserve", choices=("fineserve", "prism", "fcfs"),
                    help="local scheduler of each device: SLO-aware adaptive batching "
                         "(fineserve), Prism-style deadline checks in queue order, or FCFS")
    ap.add_argument("--on-slo-miss", default="reject", choices=("reject", "best-effort"),
                    help="a request predicted to miss its model's TTFT SLO: answer 503 at "
                         "once (reject) or serve it after the others (best-effort)")
    ap.add_argument("--cost-model", metavar="FILE",
                    help="step-time profile (python -m schedulers.profile) the scheduler "
                         "predicts with; models with SLOs that it lacks are profiled at start")
    ap.add_argument("--profile-reps", type=int, default=5,
                    help="timed runs per step shape when profiling at start (0: never)")
    ap.add_argument("--cost-calibration", type=float, default=0.05, metavar="WEIGHT",
                    help="correct each model's step-time predictions online from the steps "
                         "served: weight of one step (0: keep the profile as measured)")
    ap.add_argument("--cache-dir", default=None,
                    help="where quantized checkpoints are kept (default ~/.cache/fineserve-jax)")
    ap.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (all but /health)")
    ap.add_argument("--api-key-file", help="read the API key from this file")
    ap.add_argument("--admin-key", help="separate key for /admin/* and /metrics")
    ap.add_argument("--admin-key-file", help="read the admin key from this file")
    ap.add_argument("--max-body-bytes", type=int, default=1 << 20)
    ap.add_argument("--max-n", type=int, default=8, help="largest n (choices per prompt)")
    ap.add_argument("--max-tokens", type=int, default=4096, help="largest max_tokens accepted")
    ap.add_argument("--max-prompt-tokens", type=int, default=None,
                    help="longest prompt accepted (default: the model's context)")
    ap.add_argument("--max-waiting", type=int, default=256,
                    help="queued requests per model beyond those running; then 429")
    ap.add_argument("--rebalance-interval", type=float, default=0.0, metavar="SECONDS",
                    help="with --placement: check request rates this often and move models "
                         "between devices when they drift (0: never, the default)")
    ap.add_argument("--rebalance-threshold", type=float, default=0.5,
                    help="relative change of a model's request rate that triggers a "
                         "re-placement (0.5 = 50%%)")
    ap.add_argument("--rebalance-window", type=float, default=None, metavar="SECONDS",
                    help="the observed request rates count the arrivals of this many "
                         "seconds (default: the interval, at least 60): shorter follows "
                         "drift sooner, longer moves less on noise")
    ap.add_argument("--ray", metavar="ADDRESS", default=None,
                    help="serve on a Ray cluster (an address, or 'auto'): one worker actor "
                         "per placement group, on the node the group names")
    ap.add_argument("--log-level", default="info",
                    choices=("debug", "info", "warning", "error"))
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.config:
        cfg = read_config(args.config)
        if not isinstance(cfg, dict):
            ap.error(f"--config {args.config}: expected a table/object at the top")
        models = cfg.pop("models", None)
        known = {a.dest for a in ap._actions}
        unknown = [k for k in cfg if k.replace("-", "_") not in known or k == "config"]
        if unknown:
            ap.error(f"--config {args.config}: unknown keys {unknown}")
        ap.set_defaults(**{k.replace("-", "_"): v for k, v in cfg.items()})
        args = ap.parse_args(argv)
        if args.models is None and models is not None:
            if not isinstance(models, list) or not models:
                ap.error(f"--config {args.config}: 'models' must be a non-empty list")
            try:
                args.models = [check_model(m, f"--config {args.config}") for m in models]
            except argparse.ArgumentTypeError as e:
                ap.error(str(e))
    args.models = args.models or [parse_model_spec(s) for s in DEFAULT_MODELS]
    if args.rebalance_interval < 0 or args.rebalance_threshold < 0:
        ap.error("--rebalance-interval and --rebalance-threshold must be >= 0")
    if args.rebalance_window is not None and not (args.rebalance_window > 0
                                                  and math.isfinite(args.rebalance_window)):
        ap.error(f"--rebalance-window must be a number of seconds > 0, got "
                 f"{args.rebalance_window:g}")
    if args.rebalance_interval > 0 and not args.placement:
        ap.error("--rebalance-interval moves models between the devices of a --placement "
                 "file; give one")
    names = [m["name"] for m in args.models]
    if len(set(names)) != len(names):
        ap.error(f"duplicate model names: {names}")
    return args


def read_placement(path: str, names: list[str], kv_budget: int) -> list[dict]:
    """Groups from a placement file, checked: ``{"device": i, "models", "kv_budget_bytes"}``
    for one device, ``{"devices": [i, j, ...], ...}`` for a tensor-parallel group (one
    engine over a mesh of those devices; the file may say ``"tp"``, which must match)."""
    try:
        plan = json.loads(Path(path).read_text())
        out = []
        for g in plan["devices"]:
            devs = [int(g["device"])] if "device" in g else [int(i) for i in g["devices"]]
            if not devs or int(g.get("tp", len(devs))) != len(devs):
                raise ValueError(f"group {g}: tp must equal the number of devices")
            where = {"device": devs[0]} if len(devs) == 1 else {"devices": devs}
            if "node" in g:  # a Ray node (serve.py --ray)
                where["node"] = str(g["node"])
            out.append({**where, "models": list(g["models"]),
                        "kv_budget_bytes": int(g.get("kv_budget_bytes", kv_budget))})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: --placement {path}: {type(e).__name__}: {e} (expected "
                         f'{{"devices": [{{"device": 0, "models": [...]}}, '
                         f'{{"devices": [1, 2], "tp": 2, "models": [...]}}]}})') from None
    used = [(g.get("node", ""), i) for g in out for i in group_devices(g)]
    if len(used) != len(set(used)):
        twice = sorted(i for n, i in set(used) if used.count((n, i)) > 1)
        raise SystemExit(f"error: --placement {path}: a device is in two groups (one KV pool "
                         f"per device): {twice}")
    placed = [n for g in out for n in g["models"]]
    missing, unknown = set(names) - set(placed), set(placed) - set(names)
    twice = sorted(n for n in set(placed) if placed.count(n) > 1)
    if missing or unknown or twice:
        raise SystemExit(f"error: --placement {path}: every served model exactly once "
                         f"(not placed: {sorted(missing)}, not served: {sorted(unknown)}, "
                         f"placed more than once: {twice}; this server runs one replica "
                         f"of a model)")
    return out


def group_devices(g: dict) -> list[int] | None:
    """Device indices of a placement group; None: JAX's default device."""
    if "devices" in g:
        return g["devices"]
    return None if g["device"] is None else [g["device"]]


def make_engine(cfg, device_ids: list[int] | None, devices: list):
    """One engine for a placement group: on one device, or tensor-parallel over a mesh."""
    from fineserve_jax.engine import Engine

    if device_ids is None:
        return Engine(cfg)
    if len(device_ids) == 1:
        return Engine(cfg, device=devices[device_ids[0]])
    from fineserve_jax.engine.sharding import tp_mesh

    return Engine(cfg, mesh=tp_mesh([devices[i] for i in device_ids]))


def load_models(args, specs: list[dict]) -> dict:
    """name -> (LoadedModel, Precision); quantized ones through the checkpoint cache."""
    from checkpoints.cache import load_served

    out = {}
    for s in specs:
        try:
            out[s["name"]] = load_served(s, args.cache_dir)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    return out


def model_slo(spec: dict):
    """The model's SLO (seconds) from its spec's milliseconds; None without targets."""
    from schedulers.batching import slo_from_ms

    return slo_from_ms(spec.get("ttft_slo_ms"), spec.get("tpot_slo_ms"))


def stored_cost(costs, name: str, precision: str, device):
    """The model's step costs from ``--cost-model`` for this device kind, if it has them."""
    if costs is None:
        return None
    try:
        return costs.get(name, precision, device.device_kind)
    except KeyError as e:
        log.warning("--cost-model has no profile for %s: %s", name, e)
        return None


def where_is(engine, ids: list[int] | None, devices: list) -> str:
    if ids is None or len(ids) == 1:
        return str(engine.device)
    return "+".join(str(devices[i]) for i in ids)


def rebalance_config(args):
    """The re-placement settings of ``--rebalance-*``. A re-plan overcommits a device's
    compute (``PlacementConfig.overcommit``) only under a scheduler that sheds late
    requests: under FCFS a model that fits nowhere stays where it is."""
    from fineserve_jax.server.rebalance import RebalanceConfig
    from schedulers.placement import PlacementConfig

    return RebalanceConfig(interval_s=args.rebalance_interval,
                           threshold=args.rebalance_threshold,
                           window_s=(args.rebalance_window if args.rebalance_window
                                     else max(args.rebalance_interval, 60.0)),
                           placement=PlacementConfig(overcommit=args.scheduler != "fcfs"))


def make_rebalancer(args, groups: list[dict], engines: list, devices: list):
    """The server's ``Rebalancer`` over the placement's single-device engines. Each device
    is its engine's fixed KV pool within the memory JAX reports (``bytes_limit``), so a
    new placement puts there only the weights that fit beside the pool; host devices
    report no limit and take any model's weights (``serving_device``)."""
    import jax

    from fineserve_jax.server.rebalance import Rebalancer, serving_device
    from schedulers.placement import Placement

    placement = Placement.from_dict({"algorithm": "file", "devices": groups})
    by_index = {}
    for g, e in zip(groups, engines):
        ids = group_devices(g)
        if ids is None or len(ids) != 1:
            raise ValueError(f"models move between single-device engines; group {g} is not one")
        by_index[ids[0]] = e
    weights = sum(sum(x.nbytes for x in jax.tree.leaves(e.weights(n)))
                  for e in engines for n in e.models)
    cfg = rebalance_config(args)
    specs = {}
    for i, e in by_index.items():
        stats = devices[i].memory_stats() or {}
        specs[i] = serving_device(devices[i].device_kind, stats.get("bytes_limit"),
                                  e.stats().pool.pool_bytes, weights, cfg.placement)
    return Rebalancer(by_index, specs, placement, cfg)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "debug":  # checkpoint I/O chatter
        for noisy in ("absl", "jax._src.xla_bridge"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    specs = {m["name"]: m for m in args.models}

    import jax
    import uvicorn

    from checkpoints.cache import default_cache_dir
    from fineserve_jax.engine import EngineConfig
    from fineserve_jax.server import build_app
    from fineserve_jax.server.auth import load_key
    from fineserve_jax.server.protocol import Limits

    try:
        api_key = load_key(args.api_key, args.api_key_file)
        admin_key = load_key(args.admin_key, args.admin_key_file, "admin key")
        limits = Limits(max_body_bytes=args.max_body_bytes, max_n=args.max_n,
                        max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
                        max_waiting=args.max_waiting)
    except ValueError as e:
        log.error("%s", e)
        return 2
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    # Compiled steps persist between starts: the second start skips most of the warm-up.
    jax.config.update("jax_compilation_cache_dir", str(cache / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    groups = (read_placement(args.placement, list(specs), args.kv_budget) if args.placement
              else [{"device": None, "models": list(specs), "kv_budget_bytes": args.kv_budget}])
    extra = {n: {k: s[k] for k in ("ttft_slo_ms", "tpot_slo_ms") if s[k] is not None}
             for n, s in specs.items()}
    if args.ray:
        return serve_on_ray(args, specs, groups, dict(limits=limits, api_key=api_key,
                                                      admin_key=admin_key, model_extra=extra))
    devices = jax.local_devices()
    for g in groups:
        bad = [i for i in group_devices(g) or () if not 0 <= i < len(devices)]
        if bad:
            log.error("placement names device %d; this host has %d", bad[0], len(devices))
            return 2
    loaded = load_models(args, list(specs.values()))
    costs = None
    if args.cost_model:
        from schedulers.costmodel import CostModel
        try:
            costs = CostModel.load(args.cost_model)
        except (OSError, ValueError, KeyError) as e:
            log.error("--cost-model %s: %s", args.cost_model, e)
            return 2
    engines = []
    for g in groups:
        try:
            cfg = EngineConfig(**engine_fields(args, g["kv_budget_bytes"]))
        except ValueError as e:
            log.error("%s", e)
            return 2
        ids = group_devices(g)
        dev = devices[ids[0]] if ids else None
        engine = make_engine(cfg, ids, devices)
        for name in g["models"]:
            model, prec = loaded[name]
            engine.add_model(name, model.config, model.params, model.tokenizer,
                             dtype=specs[name]["dtype"], precision=prec,
                             slo=model_slo(specs[name]),
                             cost=stored_cost(costs, name, prec, dev or devices[0]))
        t0 = time.perf_counter()
        engine.start()
        pool = engine.stats().pool
        log.info("engine on %s: KV pool %.0f MiB of the budget = %d slabs of %d B (allocator %s); "
                 "warm-up %.1fs", where_is(engine, ids, devices), pool.pool_bytes / 2**20,
                 pool.rows_total, pool.row_bytes, cfg.allocator, time.perf_counter() - t0)
        for name, p in engine.kv_plan().items():
            log.info("  %s: KV %s, %d-token blocks of %d B; reserve %d tokens (%.1f MiB), "
                     "up to %d tokens when the others idle", name, p["kv_format"],
                     p["block_tokens"], p["block_bytes"], p["reserve_tokens"],
                     p["reserve_blocks"] * p["block_bytes"] / 2**20, p["max_tokens"])
        engines.append(engine)
    rebalancer = None
    if args.rebalance_interval > 0:
        try:
            rebalancer = make_rebalancer(args, groups, engines, devices)
        except ValueError as e:
            log.error("--rebalance-interval: %s", e)
            return 2
    app = build_app(engines, limits=limits, api_key=api_key, admin_key=admin_key,
                    model_extra=extra, rebalancer=rebalancer)
    where = ", ".join(f"{n} on {e.device}" for e in engines for n in e.models)
    log.info("serving %s at http://%s:%d/v1%s", where, args.host, args.port,
             " (API key required)" if api_key else "")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        for e in engines:
            e.shutdown()
    return 0


def engine_fields(args, kv_budget: int) -> dict:
    """``EngineConfig`` fields from the options, for one device's engine."""
    return dict(kv_budget_bytes=kv_budget, max_seqs=args.max_seqs,
                max_model_len=args.max_model_len, prefill_token_budget=args.max_prefill_tokens,
                batch_invariant=args.batch_invariant, scheduler=args.scheduler,
                on_slo_miss=args.on_slo_miss, profile_reps=args.profile_reps,
                cost_calibration=args.cost_calibration)


def serve_on_ray(args, specs: dict, groups: list[dict], app_kw: dict) -> int:
    """``--ray``: a worker actor per placement group, the HTTP front end here."""
    import ray
    import uvicorn

    from fineserve_jax.engine import EngineConfig
    from fineserve_jax.raycluster.launch import start_workers
    from fineserve_jax.raycluster.supervisor import Supervisor
    from fineserve_jax.server import build_app

    try:
        EngineConfig(**engine_fields(args, args.kv_budget))  # bad options fail here
    except ValueError as e:
        log.error("%s", e)
        return 2
    ray.init(address=args.ray, logging_level=args.log_level.upper())
    use_gpus = ray.cluster_resources().get("GPU", 0) > 0
    engines = []
    try:
        engines = start_workers(groups, specs, engine_fields(args, args.kv_budget),
                                use_gpus=use_gpus, cache_dir=args.cache_dir,
                                log_level=args.log_level)
        rebalancer = None
        if args.rebalance_interval > 0:
            from fineserve_jax.raycluster.launch import make_rebalancer

            rebalancer = make_rebalancer(engines, rebalance_config(args))
        app = build_app(engines, supervisor=Supervisor(engines), rebalancer=rebalancer,
                        **app_kw)
        where = ", ".join(f"{n} on {e.device}" for e in engines for n in e.models)
        log.info("serving %s (Ray cluster %s) at http://%s:%d/v1", where, args.ray,
                 args.host, args.port)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        for e in engines:
            e.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
