"""Re-placement inside the simulator: models moving between simulated device groups
while a trace runs, the way the server's rebalancer moves them between engines.

``schedulers.simulator.simulate(..., replacer=...)`` drives a ``SimMoves``: every
``replacer.interval_s`` it asks the ``Replacer`` (``schedulers.rebalance.DriftPolicy``)
for moves and runs them on the groups (``attach``, ``holds`` and ``detach`` of
``schedulers.simulator._Group``) as the server does: each as soon as the replacer's
``schedulers.rebalance.MoveSchedule`` lets it (at once where the destination has room),
keeping a ``MoveRecord`` of each.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from schedulers.simulator import GroupSpec, _Group


class Replacer(Protocol):
    """Decides model moves while a simulation runs (``schedulers.rebalance.DriftPolicy``).

    ``observe`` sees every arrival; ``check`` runs every ``interval_s`` simulated seconds
    (counted from the end of the previous check's moves, as the server's rebalancer
    sleeps between rounds) and returns moves (``.model``, ``.src_group`` and
    ``.dst_group``: device tuples of the simulated groups) in ``plan_moves`` order;
    ``schedule`` says which of them may run at once (a ``MoveSchedule``); ``load_s`` is
    how long loading a model onto a group takes (weights and compilation) before it can
    serve there; ``done`` hears each move's outcome."""

    interval_s: float

    def observe(self, model: str, t: float) -> None: ...
    def check(self, now: float) -> Sequence[Any]: ...
    def schedule(self, moves: Sequence[Any]) -> Any: ...
    def load_s(self, model: str, group: GroupSpec) -> float: ...
    def done(self, move: Any, outcome: str, now: float) -> None: ...


@dataclass
class MoveRecord:
    """One move the simulation ran (or skipped)."""

    model: str
    src: str  # group names
    dst: str
    started: float
    ready: float | None = None  # serving on the destination (route switched)
    drained: float | None = None  # the source's last request of it finished
    outcome: str = "running"


class SimMoves:
    """The server's rebalancer (``fineserve_jax.server.rebalance.Rebalancer``) on
    simulated groups: per move, attach on the destination, after ``load_s`` switch the
    route, retire on the source, and when the source holds none of the model's requests
    remove it there. Moves start as the replacer's ``schedule`` allows; the next check
    comes ``interval_s`` after the last of them ended. Requests in flight finish where
    they are."""

    def __init__(self, replacer: Replacer, sims: list[_Group], models, cost_of,
                 routes: dict[str, list[int]], last_arrival: float):
        self.r, self.sims, self.models, self.cost_of = replacer, sims, models, cost_of
        self.routes, self.last_arrival = routes, last_arrival
        self.by_devices = {g.spec.devices: i for i, g in enumerate(sims)}
        self.plan = None  # the MoveSchedule of the last check's moves
        # model -> (move, record, src, dst) of the moves running
        self.active: dict[str, tuple[Any, MoveRecord, int, int]] = {}
        self.records: list[MoveRecord] = []
        self.events: list[tuple[float, int, str, str]] = []  # (time, order, kind, model)
        self._n = 0
        self._at(replacer.interval_s, "check")

    def _at(self, t: float, kind: str, model: str = "") -> None:
        if kind == "check" and t > self.last_arrival:
            return  # no arrival left to serve better
        self._n += 1
        heapq.heappush(self.events, (t, self._n, kind, model))

    def next_time(self) -> float:
        return self.events[0][0] if self.events else math.inf

    def fire(self, t: float) -> None:
        """Run the events due at ``t``."""
        while self.events and self.events[0][0] <= t:
            _, _, kind, model = heapq.heappop(self.events)
            if kind == "check":
                self.plan = self.r.schedule(list(self.r.check(t)))
                self._start(t)
            else:
                self._ready(model, t)
        self.poll(t)

    def _start(self, t: float) -> None:
        while True:
            ready = self.plan.start()
            if not ready:
                break
            for mv in ready:
                self._begin(mv, t)
        if self.plan.finished:
            self._at(t + self.r.interval_s, "check")

    def _begin(self, mv, t: float) -> None:
        src, dst = self.by_devices.get(tuple(mv.src_group)), self.by_devices.get(
            tuple(mv.dst_group))
        rec = MoveRecord(mv.model, "?" if src is None else self.sims[src].spec.name,
                         "?" if dst is None else self.sims[dst].spec.name, t)
        self.records.append(rec)
        if src is None or dst is None or self.routes.get(mv.model) != [src]:
            rec.outcome = "skipped: not served there, or no such group"
        else:
            g = self.sims[dst]
            try:
                g.attach(self.models[mv.model], self.cost_of(mv.model, g.spec))
            except ValueError as e:
                rec.outcome = f"skipped, the destination refused it: {e}"
            else:
                self.active[mv.model] = (mv, rec, src, dst)
                self._at(t + self.r.load_s(mv.model, g.spec), "ready", mv.model)
                return
        self.plan.end(mv, moved=False)
        self.r.done(mv, rec.outcome, t)

    def _ready(self, model: str, t: float) -> None:
        mv, rec, src, dst = self.active[model]
        rec.ready = t
        self.routes[mv.model] = [dst]  # new requests go to the destination from here

    def poll(self, t: float) -> None:
        """Finish the moves whose source holds none of the model's requests any more."""
        ended = False
        for model, (mv, rec, src, _) in list(self.active.items()):
            if rec.ready is None or self.sims[src].holds(mv.model):
                continue
            self.sims[src].detach(mv.model)
            rec.drained, rec.outcome = t, "moved"
            del self.active[model]
            self.plan.end(mv, moved=True)
            self.r.done(mv, rec.outcome, t)
            ended = True
        if ended:
            self._start(t)
