"""Re-placement while serving: the server moves models between its engines when the
observed request rates drift from the rates the placement was planned for.

    rb = Rebalancer({0: engine0, 1: engine1}, {0: dev_spec, 1: dev_spec}, placement,
                    RebalanceConfig(interval_s=60, threshold=0.5))
    app = build_app([engine0, engine1], rebalancer=rb)     # starts rb.run() with the app

The server reports every accepted request (``observe``) and every finished one's lengths
(``observe_lengths``) to a ``schedulers.rebalance.RateTracker``. Every ``interval_s`` the
rebalancer compares the window's rates with the planned ones (``drifted``; without planned
rates, as a placement file gives none, the first plan waits until a whole ``window_s`` of
arrivals has been seen); past the threshold it builds one ``ModelDemand`` per served model
(weight bytes from its device weights, KV bytes per token from its block format, observed
rate and mean lengths, its SLO or the configured defaults, its step-cost model if it has
one); if the current placement still admits them (``keep_if_fits``: memory, pools and
compute headroom as placement counts them) nothing moves, otherwise it runs the global
scheduler again (``schedulers.rebalance.replan``: slab-greedy over the engines' devices)
and executes ``plan_moves``, each move as soon as ``schedulers.rebalance.MoveSchedule``
lets it: at once where the destination has room for the model's weights beside what it
holds (models moving out hold theirs until drained), otherwise after the moves out of it:

1. attach the model on the destination engine (its weights copied from the source's
   device, its steps compiled there while both engines keep serving), wait until ready;
2. switch the route: requests from now on go to the destination;
3. retire it on the source in the same event-loop turn (no request can be routed to the
   source after it stops accepting), wait until its requests in flight have finished.

A request in flight during a move finishes where it started; one that arrives during a
move is served by whichever engine its route named. A move the destination cannot take
(its KV reserve does not fit that engine's pool, or compilation fails) is skipped and
logged, and the model stays where it was; one refused while a model of the same re-plan
is leaving that engine is tried once more after those moves out have ended
(``MoveSchedule.retry``: the leaving model's blocks may be what the reserve lacked).
Every decision is logged and kept for ``GET /admin/placement``.

Limits: pools keep the size they were started with (models move between fixed pools; the
re-plan sees each device as a ``ServingDevice``, its pool fixed, so it puts on a device only
the weights that fit beside that pool); only single-device engines take part; one replica
per model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import jax

from schedulers.placement import Device, ModelDemand, Placement, PlacementConfig
from schedulers.rebalance import (
    FreeSteps,
    Move,
    MoveSchedule,
    RateTracker,
    ServingDevice,
    apply_move,
    drift,
    plan_moves,
    replan_if_needed,
    weight_room,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RebalanceConfig:
    """When and how the server re-places its models."""

    interval_s: float = 60.0  # seconds between checks
    threshold: float = 0.5  # relative rate drift of any model that triggers a re-placement
    window_s: float = 60.0  # arrivals counted for the observed rates
    min_rate: float = 0.05  # req/s: below this both planned and observed, drift is noise
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    # Planning inputs for what a model or its traffic does not say yet:
    prompt_tokens: float = 256.0  # mean prompt length before any request finished
    output_tokens: float = 128.0  # mean output length before any request finished
    ttft_slo_s: float = 2.0  # for models served without a TTFT target
    tpot_slo_s: float = 0.2  # for models served without a TPOT target
    attach_timeout_s: float = 900.0  # longest wait for a destination to compile a model
    # Compile a moving model's step shapes on its destination before routing to it
    # (whatever the engine's warm-up setting): its first requests there do not stall
    # the destination's loop on compilations.
    precompile: bool = True
    # Past the threshold, re-place only when the current placement no longer admits the
    # observed rates (``schedulers.rebalance.overloaded``): moves cost a load and a drain.
    keep_if_fits: bool = True

    def __post_init__(self):
        for f in ("interval_s", "window_s", "prompt_tokens", "output_tokens", "ttft_slo_s",
                  "tpot_slo_s", "attach_timeout_s"):
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"RebalanceConfig.{f} must be a positive number, got {v!r}")
        if not self.threshold >= 0:
            raise ValueError(f"RebalanceConfig.threshold must be >= 0, got {self.threshold!r}")
        if not self.min_rate >= 0:
            raise ValueError(f"RebalanceConfig.min_rate must be >= 0, got {self.min_rate!r}")


@dataclass
class Decision:
    """One check of the rebalancer, as logged and shown on ``/admin/placement``."""

    at: float  # the rebalancer's clock
    observed: dict[str, float]  # req/s per model over the window
    planned: dict[str, float] | None  # the rates the current placement is for
    drift: dict[str, float]  # relative change per model
    action: str  # "none" | "replanned" | "kept" (a plan that could not be used)
    reason: str
    moves: list[Move] = field(default_factory=list)
    done: list[str] = field(default_factory=list)  # outcome per move, as each ended

    def to_dict(self) -> dict:
        return {"at": self.at, "observed_rates": self.observed, "planned_rates": self.planned,
                "drift": {k: (None if v == float("inf") else v) for k, v in self.drift.items()},
                "action": self.action, "reason": self.reason,
                "moves": [str(m) for m in self.moves], "outcomes": self.done}


class MoveOutcome(str):
    """What ``Rebalancer.move`` returns: the text ``Decision.done`` shows, and whether the
    model moved (its source drained: the memory there is free again) or not (skipped:
    nothing changed)."""

    moved: bool
    refused: bool  # the destination refused to attach it (e.g. no room in its pool yet)

    def __new__(cls, text: str, moved: bool, refused: bool = False) -> MoveOutcome:
        out = super().__new__(cls, text)
        out.moved, out.refused = moved, refused
        return out


def serving_device(kind: str, memory_bytes: float | None, pool_bytes: float,
                   weight_bytes: float, config: PlacementConfig) -> ServingDevice:
    """How the global scheduler sees a device running an engine: its memory (JAX's
    ``bytes_limit``) with the engine's KV pool fixed in it. A device that reports no
    limit (host memory) gets just enough memory for its pool plus ``weight_bytes`` (every
    served model's weights) after ``config.reserve_fraction``: any model fits there and
    only its pool limits KV."""
    if not memory_bytes:
        # + 1 byte: rounding must not leave the weights short of their own room
        memory_bytes = (pool_bytes + weight_bytes + 1.0) / (1.0 - config.reserve_fraction)
    return ServingDevice(kind, float(memory_bytes), float(pool_bytes))


class Rebalancer:
    """Watches rates and moves models between engines (see the module).

    ``engines``: device index -> the single-device engine there (indices as in
    ``placement``); ``devices``: device index -> its description for the global scheduler
    (``name``, ``memory_bytes``); ``placement``: what the engines serve now.
    ``planned_rates``: the rates ``placement`` was made for (None: unknown, so the first
    check with traffic re-plans). ``clock``: seconds, monotonic (tests pass their own).
    """

    def __init__(self, engines: Mapping[int, object], devices: Mapping[int, Device],
                 placement: Placement, config: RebalanceConfig = RebalanceConfig(), *,
                 planned_rates: Mapping[str, float] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        tp = [g.devices for g in placement.groups if g.tp != 1]
        if tp:
            raise ValueError(f"re-placement moves models between single-device engines; the "
                             f"placement has tensor-parallel groups {tp}")
        missing = sorted({g.devices[0] for g in placement.groups} - set(engines))
        if missing or set(engines) - set(devices):
            raise ValueError(f"every device of the placement needs an engine and every "
                             f"engine a device description: no engine on {missing}, no "
                             f"description of {sorted(set(engines) - set(devices))}")
        for g in placement.groups:
            e = engines[g.devices[0]]
            absent = [m for m in g.models if m not in e.models]
            if absent:
                raise ValueError(f"the placement puts {absent} on device {g.devices[0]}, "
                                 f"whose engine serves {list(e.models)}")
        self.engines = dict(engines)
        self.devices = dict(devices)
        self.placement = placement
        self.config = config
        self.clock = clock
        self.tracker = RateTracker(config.window_s, start=clock())
        self.planned_rates = None if planned_rates is None else dict(planned_rates)
        self.routes: dict[str, object] = {m: engines[g.devices[0]]
                                          for g in placement.groups for m in g.models}
        self.decisions: deque[Decision] = deque(maxlen=32)
        self.moving: list[Move] = []  # moves in flight
        self._weight_bytes: dict[str, float] = {}
        self._task: asyncio.Task | None = None

    # ----------------------------------------------------------- server hooks
    def use_routes(self, routes: dict) -> None:
        """Share the server's model -> engine map (switched in place by moves)."""
        for m, e in self.routes.items():
            if routes.get(m) is not e:
                raise ValueError(f"the server routes {m!r} to another engine than the "
                                 f"placement says")
        self.routes = routes

    def observe(self, model: str) -> None:
        """One accepted request for ``model`` (the server calls this)."""
        self.tracker.record(model, self.clock())

    def observe_lengths(self, model: str, prompt_tokens: int, output_tokens: int) -> None:
        """One finished request's lengths (the server calls this)."""
        self.tracker.observe_lengths(model, prompt_tokens, output_tokens)

    # --------------------------------------------------------------- planning
    def _weights(self, name: str, spec) -> float:
        if name not in self._weight_bytes:
            known = getattr(spec, "weight_bytes", None)  # a remote engine's spec says it
            self._weight_bytes[name] = (float(known) if known is not None else
                                        float(sum(x.nbytes for x in jax.tree.leaves(spec.params))))
        return self._weight_bytes[name]

    def demand(self, name: str, rate: float) -> ModelDemand:
        """The global scheduler's view of served model ``name`` at ``rate`` req/s."""
        c = self.config
        e = self.routes[name]
        spec = e.model_spec(name)
        fmt = e.alloc.fmt(name)
        lengths = self.tracker.mean_lengths(name) or (c.prompt_tokens, c.output_tokens)
        slo = spec.slo
        cost = spec.cost if spec.cost is not None else FreeSteps()

        def at_tp(tp: int, cost=cost):
            if tp != 1:
                raise ValueError("engines here run one device each")
            return cost

        return ModelDemand(
            name, spec.precision, self._weights(name, spec), fmt.block_bytes / fmt.block_tokens,
            rate, max(1.0, lengths[0]), max(1.0, lengths[1]),
            (slo.ttft_s if slo is not None and slo.ttft_s else c.ttft_slo_s),
            (slo.tpot_s if slo is not None and slo.tpot_s else c.tpot_slo_s),
            cost=at_tp, block_tokens=fmt.block_tokens, block_bytes=fmt.block_bytes)

    def check(self, now: float | None = None) -> Decision:
        """Compare rates and, past the threshold, plan a new placement and its moves
        (nothing is moved here; ``rebalance_once`` executes them)."""
        c = self.config
        now = self.clock() if now is None else now
        observed = self.tracker.rates(now)
        for m in self.routes:
            observed.setdefault(m, 0.0)
        observed = {m: r for m, r in observed.items() if m in self.routes}
        planned = self.planned_rates
        d = drift(planned or {}, observed, c.min_rate)
        dec = Decision(now, observed, None if planned is None else dict(planned), d, "none", "")
        first = self.tracker.first
        if planned is None and not any(observed.values()):
            dec.reason = "no traffic yet"
        elif planned is None and first is not None and now - first < c.window_s:
            # The first plan waits for a whole window of traffic: rates over a few seconds
            # are noise, and before requests finish the lengths are the defaults.
            dec.reason = (f"first rates: {now - first:.0f} s of arrivals observed, planning "
                          f"once {c.window_s:g} s are")
        elif planned is not None and not any(v > c.threshold for v in d.values()):
            dec.reason = f"drift within {c.threshold:g}"
        else:
            self._replan(dec, observed)
        self.decisions.append(dec)
        log.info("rebalance check: %s; %s; rates %s", dec.action, dec.reason,
                 {m: round(r, 3) for m, r in observed.items()})
        return dec

    def _replan(self, dec: Decision, observed: dict[str, float]) -> None:
        idx = sorted(self.engines)  # local device k is global device idx[k]
        local = {g: k for k, g in enumerate(idx)}
        try:
            demands = [self.demand(m, observed.get(m, 0.0)) for m in sorted(self.routes)]
            current = _relabel(self.placement, local)
            new, why = replan_if_needed(demands, [self.devices[i] for i in idx], current,
                                        self.config.placement,
                                        {d.name: d.weight_bytes for d in demands},
                                        self.config.keep_if_fits)
        except (ValueError, KeyError) as e:
            dec.action, dec.reason = "kept", f"planning failed: {e}"
            return
        if new is None:
            dec.action, dec.reason = "kept", why
            return
        new = _relabel(new, dict(enumerate(idx)))
        dec.moves = plan_moves(self.placement, new)
        dec.action = "replanned"
        why = ("first rates observed" if dec.planned is None else "drift " + ", ".join(
            f"{m} {v:.2f}" for m, v in dec.drift.items() if v > self.config.threshold))
        dec.reason = f"{why}: {len(dec.moves)} move(s) " + ", ".join(map(str, dec.moves))
        if new.overcommitted:
            dec.reason += ("; past the planned load (no device had room for them): "
                           + ", ".join(new.overcommitted))
        self.planned_rates = dict(observed)

    # -------------------------------------------------------------- executing
    async def rebalance_once(self, now: float | None = None) -> Decision:
        """``check``, then execute its moves, each as soon as ``MoveSchedule`` lets it
        beside the ones in flight; returns when every move has ended."""
        dec = self.check(now)
        plan = MoveSchedule(dec.moves, self.placement, self._weight_bytes,
                            weight_room(self.devices, self.config.placement))
        running: dict[asyncio.Task, Move] = {}
        try:
            while not plan.finished:
                for mv in plan.start():
                    running[asyncio.create_task(self.move(mv), name=f"move {mv}")] = mv
                ended, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(ended, key=lambda t: dec.moves.index(running[t])):
                    mv = running.pop(task)
                    if task.exception() is not None:  # the others go on
                        log.error("move %s failed", mv, exc_info=task.exception())
                        dec.done.append(f"{mv}: failed: {task.exception()!r}")
                        plan.end(mv, moved=None)
                    elif task.result().refused and plan.retry(mv):
                        log.info("move %s: refused while a model leaves its destination; "
                                 "retried once the moves out of it end", mv)
                    else:
                        dec.done.append(task.result())
                        plan.end(mv, moved=task.result().moved)
        finally:  # cancelled (the server stops): the moves in flight stop with it
            for task in running:
                task.cancel()
        return dec

    async def move(self, mv: Move) -> MoveOutcome:
        """Move one model: attach on the destination, wait until ready, switch its route,
        retire it on the source, wait until the source's requests finished. Returns the
        outcome ("moved", or why it was skipped); never raises for a move that fails."""
        src, dst = self.routes.get(mv.model), self.engines.get(mv.dst_group[0])
        if src is None or dst is None or src is dst:
            return MoveOutcome(f"{mv}: skipped (route or destination engine not found, or "
                               f"already there)", moved=False)
        self.moving.append(mv)
        t0 = time.perf_counter()
        try:
            spec = src.model_spec(mv.model)
            try:
                attach = await asyncio.to_thread(dst.attach_model, mv.model,
                                                 precompile=self.config.precompile,
                                                 **spec.kwargs())
            except (ValueError, RuntimeError) as e:
                out = MoveOutcome(f"{mv}: skipped, the destination refused it: {e}", False,
                                  refused=True)
                log.warning("move %s", out)
                return out
            try:
                ok = await attach.wait_async(self.config.attach_timeout_s)
            except RuntimeError as e:
                ok, why = False, str(e)
            else:
                why = f"not ready after {self.config.attach_timeout_s:g} s"
            if not ok:
                dst.retire_model(mv.model)
                out = MoveOutcome(f"{mv}: skipped, {why}", moved=False)
                log.warning("move %s", out)
                return out
            ready_s = time.perf_counter() - t0
            self.routes[mv.model] = dst  # from here new requests go to the destination,
            retire = src.retire_model(mv.model)  # and none reaches the source after this
            self.placement = apply_move(self.placement, mv)
            log.info("move %s: serving on %s after %.1f s (attach); draining %s", mv,
                     dst.device, ready_s, src.device)
            await retire.wait_async()
            out = MoveOutcome(f"{mv}: moved (ready in {ready_s:.1f} s, source drained "
                              f"{retire.seconds:.1f} s later)", moved=True)
            log.info("move %s", out)
            return out
        finally:
            self.moving.remove(mv)

    async def run(self) -> None:
        """Check every ``interval_s`` and execute what a check decides, until cancelled."""
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                await self.rebalance_once()
            except Exception:  # the loop outlives any one decision
                log.exception("rebalancing failed")

    def start(self) -> asyncio.Task:
        """Run ``run`` as a task of the current event loop."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run(), name="rebalancer")
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    # ----------------------------------------------------------------- report
    def status(self) -> dict:
        """What ``GET /admin/placement`` shows."""
        return {"placement": self.placement.to_dict(),
                "routes": {m: e.device for m, e in sorted(self.routes.items())},
                "planned_rates": self.planned_rates,
                "observed_rates": self.tracker.rates(self.clock()),
                "moving": [str(mv) for mv in self.moving],
                "interval_s": self.config.interval_s, "threshold": self.config.threshold,
                "decisions": [d.to_dict() for d in self.decisions]}


def _relabel(p: Placement, mapping: Mapping[int, int]) -> Placement:
    """``p`` with device indices mapped through ``mapping``."""
    from dataclasses import replace

    return replace(p, groups=tuple(
        replace(g, devices=tuple(mapping[i] for i in g.devices)) for g in p.groups))
