"""Global scheduler: how many GPUs each model needs, and which models share which devices.

Plain Python (no JAX). Two stages, both driven by step costs (``schedulers.costmodel``):

1. ``plan_parallelism`` (``schedulers.planning``, re-exported here): for one model, the
   tensor-parallel degree, the number of replicas and two batch sizes (the largest that
   meets its SLOs, the smallest that keeps up with its request rate) on one device kind.
2. ``place_slab_greedy`` (FineServe), ``place_kvpr`` (Prism-style) or ``place_dedicated``
   (one model per device group, the static baseline): every replica onto a *device group*
   (one device, or ``tp`` devices running their models tensor-parallel over one pool per
   device), never exceeding any device's memory and reporting what fits nowhere.

Memory of a device in a group (every device of a group holds the same):

    usable     = memory_bytes * (1 - reserve_fraction)      # activations, runtime, fragmentation
    weights    = sum over the group's models of weight_bytes / tp
    kv_budget  = usable - weights                            # the group's KV pool per device
    kv_need    = sum over its models of concurrency * mean_context * kv_bytes_per_token

and a group is only allowed ``kv_need <= kv_budget``. On a device whose pool is already
allocated and fixed (``kv_pool_bytes``, a running engine's, for re-placement) the budget
is that pool and the weights must fit beside it: ``weights <= usable - kv_pool_bytes``.
The KV of a tensor-parallel model is counted whole on each device: the engine replicates
the pool over its mesh (``fineserve_jax.engine.sharding``). Compute: the models of a group
take turns on its devices, so their utilisations (request rate x device seconds per
request) add up, and a group must stay at or under ``PlacementConfig.headroom``.

The output, ``Placement``, is what ``serve.py --placement`` executes (``to_json``):

    {"algorithm": "slab-greedy",
     "devices": [{"device": 0, "models": ["a", "b"], "kv_budget_bytes": N, ...},
                 {"devices": [1, 2], "tp": 2, "models": ["c"], "kv_budget_bytes": N, ...}],
     "unplaced": [{"model": "d", "replica": 0, "reason": "..."}],
     "overcommitted": []}

A model with several replicas appears in several groups. ``overcommitted`` names the
models slab-greedy served past the planned load (``PlacementConfig.overcommit``): no
group had compute headroom and planned KV room for their only replica.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

from schedulers.planning import (Device, ModelDemand, ParallelPlan, PlacementConfig, _Steps,
                                 _tokens, plan_parallelism, pool_bytes)

ALGORITHMS = ("slab-greedy", "kvpr", "dedicated")
# The planning stage is imported from here too (one module for the global scheduler).
__all__ = ["ALGORITHMS", "PLACERS", "Device", "ModelDemand", "ParallelPlan", "Placement",
           "PlacementConfig", "PlacementGroup", "Unplaced", "device_key", "place",
           "place_dedicated", "place_kvpr", "place_slab_greedy", "plan_parallelism",
           "pool_bytes", "still_fits", "tpot_compatible"]


# --------------------------------------------------------------------- outputs
@dataclass(frozen=True)
class PlacementGroup:
    """Devices that run ``models`` over one KV pool per device (replicated if tp > 1)."""

    devices: tuple[int, ...]  # device indices, ``tp`` of them
    tp: int
    models: tuple[str, ...]
    kv_budget_bytes: int  # the pool on each device: usable memory left after weights
    kv_need_bytes: int = 0  # planned KV demand of the models (informational)
    utilisation: float = 0.0  # planned compute share (informational)

    def to_dict(self) -> dict:
        head = ({"device": self.devices[0]} if self.tp == 1 else
                {"devices": list(self.devices), "tp": self.tp})
        return {**head, "models": list(self.models), "kv_budget_bytes": self.kv_budget_bytes,
                "kv_need_bytes": self.kv_need_bytes, "utilisation": self.utilisation}

    @classmethod
    def from_dict(cls, g: Mapping) -> PlacementGroup:
        devices = (int(g["device"]),) if "device" in g else tuple(int(i) for i in g["devices"])
        tp = int(g.get("tp", len(devices)))
        if tp != len(devices):
            raise ValueError(f"group {devices}: tp {tp} but {len(devices)} devices")
        return cls(devices, tp, tuple(g["models"]), int(g["kv_budget_bytes"]),
                   int(g.get("kv_need_bytes", 0)), float(g.get("utilisation", 0.0)))


@dataclass(frozen=True)
class Unplaced:
    model: str
    replica: int  # 0-based replica index
    reason: str


@dataclass(frozen=True)
class Placement:
    algorithm: str
    groups: tuple[PlacementGroup, ...]
    unplaced: tuple[Unplaced, ...] = ()
    overcommitted: tuple[str, ...] = ()  # models placed past the planned load

    def to_dict(self) -> dict:
        return {"algorithm": self.algorithm, "devices": [g.to_dict() for g in self.groups],
                "unplaced": [{"model": u.model, "replica": u.replica, "reason": u.reason}
                             for u in self.unplaced],
                "overcommitted": list(self.overcommitted)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping) -> Placement:
        return cls(str(d.get("algorithm", "")),
                   tuple(PlacementGroup.from_dict(g) for g in d["devices"]),
                   tuple(Unplaced(u["model"], int(u["replica"]), u["reason"])
                         for u in d.get("unplaced", ())),
                   tuple(str(m) for m in d.get("overcommitted", ())))

    @classmethod
    def from_json(cls, text: str) -> Placement:
        return cls.from_dict(json.loads(text))

    def replicas(self, model: str) -> list[PlacementGroup]:
        """The groups serving ``model``."""
        return [g for g in self.groups if model in g.models]

    @property
    def devices_used(self) -> int:
        return sum(len(g.devices) for g in self.groups)


# --------------------------------------------------------------------- placing
@dataclass(frozen=True)
class _Item:
    """One replica to place."""

    demand: ModelDemand
    replica: int
    tp: int
    weights: float  # bytes per device
    kv_need: float  # bytes per device
    util: float
    batch: int = 1  # sequences decoding at once (the plan's concurrency)
    prefill_share: float = 0.0  # device-time share of its prompts (rate x a mean prefill)

    def steps(self) -> tuple[float, float]:
        """(decode step at ``batch``, shortest prefill step: ``MIN_PREFILL_TOKENS`` at the
        mean prompt) of this replica, seconds."""
        d = self.demand
        cost = d.cost(self.tp)
        ctx = _tokens(d.mean_context)
        p = _tokens(d.prompt_tokens)
        c = min(MIN_PREFILL_TOKENS, p)
        return cost.decode_time([ctx] * self.batch), cost.prefill_time([c], [p])

    @property
    def min_kv(self) -> float:
        """KV bytes of one whole sequence (mean prompt + output): the least a pool needs."""
        d = self.demand
        return (d.prompt_tokens + d.output_tokens) * d.kv_bytes_per_token

    @property
    def memory(self) -> float:
        return self.weights + self.kv_need


@dataclass(eq=False)
class _Group:
    devices: tuple[int, ...]
    tp: int
    usable: float  # per device
    items: list[_Item] = field(default_factory=list)
    pool: float | None = None  # a fixed KV pool per device (``Device.kv_pool_bytes``)

    def weights(self, extra: _Item | None = None) -> float:
        return sum(i.weights for i in self._with(extra))

    def kv_need(self, extra: _Item | None = None) -> float:
        return sum(i.kv_need for i in self._with(extra))

    def util(self, extra: _Item | None = None) -> float:
        return sum(i.util for i in self._with(extra))

    def kv_budget(self, extra: _Item | None = None) -> float:
        return self.usable - self.weights(extra) if self.pool is None else self.pool

    def _with(self, extra: _Item | None) -> list[_Item]:
        return self.items + ([extra] if extra is not None else [])

    def admits(self, item: _Item, headroom: float, planned_kv: bool = True) -> bool:
        """Whether ``item`` fits beside the group's models: weights and at least one
        sequence's KV each in memory, and (``planned_kv``) the planned KV demand in
        the pool, and the planned compute within ``headroom``."""
        if item.tp != self.tp or any(i.demand.name == item.demand.name for i in self.items):
            return False
        budget = self.kv_budget(item)
        if self.pool is not None and self.weights(item) > self.usable - self.pool:
            return False
        return ((budget >= self.kv_need(item) or not planned_kv)
                and budget >= max(i.min_kv for i in self._with(item))
                and self.util(item) <= headroom + 1e-12)


def _items(demands: Sequence[ModelDemand], plans: Mapping[str, ParallelPlan]) -> list[_Item]:
    out = []
    for d in demands:
        if d.name not in plans:
            raise KeyError(f"no parallel plan for model {d.name!r}")
        p = plans[d.name]
        kv_need = p.concurrency * d.mean_context * d.kv_bytes_per_token
        share = 0.0
        if p.fits and d.rate > 0:
            share = d.rate / p.replicas * _Steps(d.cost(p.tp), d).prefill
        for r in range(p.replicas):
            out.append(_Item(d, r, p.tp, d.weight_bytes / p.tp, kv_need, p.utilisation,
                             p.concurrency, share))
    return out


def _check_inputs(demands: Sequence[ModelDemand], devices: Sequence[Device]) -> None:
    names = [d.name for d in demands]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    if not devices:
        raise ValueError("no devices to place on")


def device_key(dev: Device) -> tuple:
    """Devices with equal keys are interchangeable to placement."""
    return (dev.name, float(dev.memory_bytes), pool_bytes(dev))


class _Cluster:
    """Groups formed so far and the devices no group holds yet."""

    def __init__(self, devices: Sequence[Device], config: PlacementConfig):
        self.devices = list(devices)
        self.config = config
        self.groups: list[_Group] = []
        self.used: set[int] = set()

    def fresh(self, tp: int) -> list[_Group]:
        """One candidate new group per device kind: its ``tp`` lowest-index unused devices
        (unused devices of one kind are interchangeable, so this loses no choice)."""
        by_kind: dict[tuple, list[int]] = {}
        for i, dev in enumerate(self.devices):
            if i not in self.used:
                by_kind.setdefault(device_key(dev), []).append(i)
        out = []
        for idx in by_kind.values():
            if len(idx) >= tp:
                devs = tuple(idx[:tp])
                out.append(self._group(devs, tp))
        return sorted(out, key=lambda g: g.devices)

    def _group(self, devs: tuple[int, ...], tp: int) -> _Group:
        dev = self.devices[devs[0]]
        return _Group(devs, tp, self.config.usable_bytes(dev), pool=pool_bytes(dev))

    def candidates(self, item: _Item, widen: bool = False,
                   over: bool = False) -> list[tuple[_Group, _Item]]:
        """(group, replica as placed there) for the existing groups and fresh ones that
        can take ``item`` at its planned tp, and existing groups of a larger tp that can
        take it sharded over all their devices (its weights spread thinner, no device
        newly used), by device index. Wider groups are offered always with ``widen``,
        else only when nothing takes it at its planned tp: a model is widened rather
        than left unplaced. ``over``: past the planned load (compute and KV demand),
        memory for weights and one sequence each still required."""
        h = math.inf if over else self.config.headroom
        kv = not over
        cands = [(g, item) for g in self.groups if g.admits(item, h, kv)]
        cands += [(g, item) for g in self.fresh(item.tp) if g.admits(item, h, kv)]
        if widen or not cands:
            for g in self.groups:
                if g.tp > item.tp and _runs_at(item.demand, g.tp):
                    wide = replace(item, tp=g.tp, weights=item.demand.weight_bytes / g.tp)
                    if g.admits(wide, h, kv):
                        cands.append((g, wide))
        return sorted(cands, key=lambda c: c[0].devices)

    def add(self, g: _Group, item: _Item) -> None:
        if not any(x is g for x in self.groups):
            self.groups.append(g)
            self.used.update(g.devices)
        g.items.append(item)

    def why_not(self, item: _Item) -> str:
        d = item.demand
        need = (f"needs {item.weights / 2**30:.2f} GiB weights + {item.kv_need / 2**30:.2f} GiB "
                f"KV per device and {item.util:.2f} compute at tp={item.tp}")
        kinds = {}
        for i, dev in enumerate(self.devices):
            kinds.setdefault(device_key(dev), []).append(i)
        fit = [idx for idx in kinds.values()
               if self._group(tuple(idx[:item.tp]), item.tp).admits(item, self.config.headroom)]
        if not fit:
            best = max(self.config.usable_bytes(dev) - (pool_bytes(dev) or 0.0)
                       for dev in self.devices)
            what = (" for weights beside the fixed KV pools"
                    if any(pool_bytes(dev) is not None for dev in self.devices) else "")
            return (f"{d.name}: {need}; no device has room for it even empty "
                    f"({best / 2**30:.2f} GiB usable{what} at most, compute headroom "
                    f"{self.config.headroom})")
        if all(len(idx) < item.tp for idx in fit):
            return f"{d.name}: {need}; fewer than {item.tp} devices of a kind that fits"
        return (f"{d.name}: {need}; no group of tp={item.tp} has room left and "
                f"{len(self.devices) - len(self.used)} of {len(self.devices)} devices are unused")

    def placement(self, algorithm: str, unplaced: list[Unplaced],
                  overcommitted: Sequence[str] = ()) -> Placement:
        groups = []
        for g in sorted(self.groups, key=lambda g: g.devices):
            groups.append(PlacementGroup(
                g.devices, g.tp, tuple(i.demand.name for i in g.items),
                int(math.floor(g.kv_budget())), int(math.ceil(g.kv_need())),
                round(g.util(), 6)))
        return Placement(algorithm, tuple(groups), tuple(unplaced), tuple(overcommitted))


def _runs_at(d: ModelDemand, tp: int) -> bool:
    """Whether ``d`` has step costs at ``tp`` (not, e.g., where tp does not divide its
    heads, or a profiled cost that only knows tp 1)."""
    try:
        d.cost(tp)
    except ValueError:
        return False
    return True


def _unfit(item: _Item, cluster: _Cluster) -> Unplaced:
    return Unplaced(item.demand.name, item.replica, cluster.why_not(item))


def _by_memory(items: list[_Item]) -> list[_Item]:
    """Largest memory need per device first; ties by name, then replica."""
    return sorted(items, key=lambda i: (-i.memory, i.demand.name, i.replica))


def _free_blocks(g: _Group, item: _Item) -> float:
    """KV blocks left on ``g`` with ``item`` added: free bytes over the block size of the
    formats sharing the pool, weighted by each model's KV demand (equal weights if none)."""
    members = g.items + [item]
    total = sum(i.kv_need for i in members)
    if total > 0:
        block = sum(i.kv_need * i.demand.kv_block_bytes for i in members) / total
    else:
        block = sum(i.demand.kv_block_bytes for i in members) / len(members)
    return (g.kv_budget(item) - g.kv_need(item)) / block


MIN_PREFILL_TOKENS = 16  # the local scheduler's smallest prefill step (SLOAware)


def tpot_compatible(items: Sequence[_Item]) -> bool:
    """Whether models sharing a device can all keep their TPOT targets: within one TPOT
    interval of each model, its own decode step, every other model's decode step and the
    longest of the shortest prefill steps (a prompt must get in) must fit in the part of
    the interval that the group's prompts leave free (on average they take the sum of
    the models' ``prefill_share`` of the device)."""
    if len(items) < 2:
        return True
    steps = [i.steps() for i in items]
    free = 1.0 - sum(i.prefill_share for i in items)
    for k, it in enumerate(items):
        others = [s for j, s in enumerate(steps) if j != k]
        need = steps[k][0] + sum(dec for dec, _ in others) + max(pre for _, pre in steps)
        if need > it.demand.tpot_slo_s * free:
            return False
    return True


def still_fits(demands: Sequence[ModelDemand], plans: Mapping[str, ParallelPlan],
               devices: Sequence[Device], placement: Placement,
               config: PlacementConfig | None = None) -> list[str]:
    """Why ``placement`` can no longer serve ``demands`` as ``plans`` size them: per device
    group, the first model (in the group's order) that its devices would not admit beside
    the ones before it, by the rules placement itself uses (weights and KV within memory
    or beside a fixed pool, compute within ``config.headroom``). Empty when every group
    still admits all its models. One replica per model is checked (the first group that
    lists it), at the group's tp."""
    config = config or PlacementConfig()
    cluster = _Cluster(devices, config)
    first = {i.demand.name: i for i in _items(demands, plans) if i.replica == 0}
    out = []
    for g in placement.groups:
        grp = cluster._group(g.devices, g.tp)
        for name in g.models:
            item = first.pop(name, None)
            if item is None:
                continue
            if item.tp != g.tp:
                item = replace(item, tp=g.tp, weights=item.demand.weight_bytes / g.tp)
            if not grp.admits(item, config.headroom):
                out.append(f"{name} no longer fits on {list(g.devices)} beside "
                           f"{[i.demand.name for i in grp.items]}: compute "
                           f"{grp.util(item):.2f} of {config.headroom:g}, KV "
                           f"{grp.kv_need(item) / 2**30:.2f} of "
                           f"{grp.kv_budget(item) / 2**30:.2f} GiB")
                break
            grp.items.append(item)
    return out


def place_slab_greedy(demands: Sequence[ModelDemand], plans: Mapping[str, ParallelPlan],
                      devices: Sequence[Device],
                      config: PlacementConfig = PlacementConfig()) -> Placement:
    """FineServe's placement: replicas by memory need per device (weights / tp + planned
    KV), largest first; each goes to the feasible group (an existing group of its tp,
    ``tp`` unused devices, or an existing wider group it is sharded over) that leaves the
    most free KV blocks, counted in the block sizes
    of the precisions sharing that pool weighted by their KV demand (a pool of INT4-KV
    models holds more tokens per byte than one of BF16 models). Ties: lowest device index.
    Wider groups count like the others: a large model's group (a 70B model at tp 2 or 4)
    often has the most memory left once all devices are taken, and an 8B model sharded
    over it keeps its weights / tp there instead of crowding a device of 8B models. Its
    compute share stays the one planned at its own tp (an upper bound: sharded, its steps
    are shorter).
    Groups where the models' step times would break one of their TPOT targets
    (``tpot_compatible``) are passed over while any other group fits.

    With ``config.balance_compute`` a group's free blocks count times the compute share
    it has left with the replica (``headroom`` - utilisation), so replicas spread by
    compute as well as memory (a device whose models use little of it takes the next
    one before a device with more free KV that is busier); when that leaves a replica
    unplaced that the plain rule places, the plain rule's placement is kept.

    Every model first: when that order leaves a model with no replica at all (the extra
    replicas of the large, popular models took the room it needed), the greedy runs again
    with each model's first replica ahead of every extra replica (each pass largest
    first), and that placement is kept if it serves more models. A model with no replica
    misses every request; an extra replica only adds capacity to one that has some.
    When even that leaves a model with none because every group that could hold it is
    planned full (compute at the headroom or the pool at its planned KV demand: the
    cluster is overloaded), ``config.overcommit`` puts its first replica where its
    weights and one sequence's KV fit and the group is least loaded with it (compute
    share over the headroom, plus the fraction by which its planned KV demand overflows
    the pool), past the planned load (``Placement.overcommitted``): its requests then
    compete for that group's time and pool, which the local scheduler sheds by
    deadline, instead of all failing.
    Between two placements the one serving more models wins, then the one with fewer
    models overcommitted, then fewer replicas left out.
    """
    _check_inputs(demands, devices)
    items = _by_memory(_items(demands, plans))
    if config.balance_compute:
        out = _every_model_first(items, devices, config, balance=True)
        if not out.unplaced and not out.overcommitted:
            return out
        plain = _every_model_first(items, devices, config, balance=False)
        return out if _served(out) >= _served(plain) else plain
    return _every_model_first(items, devices, config, balance=False)


def _every_model_first(items: list[_Item], devices: Sequence[Device], config: PlacementConfig,
                       balance: bool) -> Placement:
    """The greedy over ``items``, again with every model's first replica ahead of the
    extra ones when that order leaves a model with none (kept if it serves more)."""
    out = _slab_greedy(items, devices, config, balance)
    if any(u.replica == 0 for u in out.unplaced):
        firsts = sorted(items, key=lambda i: i.replica > 0)  # stable: by memory within
        alt = _slab_greedy(firsts, devices, config, balance)
        if _models_served(alt) > _models_served(out):
            out = alt
        if config.overcommit and _missing(out, items):
            alt = _slab_greedy(firsts, devices, config, balance, overcommit=True)
            if _models_served(alt) > _models_served(out):
                out = alt
    return out


def _missing(p: Placement, items: Sequence[_Item]) -> bool:
    return _models_served(p) < len({i.demand.name for i in items})


def _served(p: Placement) -> tuple[int, int, int]:
    """Models with a replica, then fewer overcommitted, then fewer replicas left out:
    larger serves more."""
    return _models_served(p), -len(p.overcommitted), -len(p.unplaced)


def _models_served(p: Placement) -> int:
    return len({m for g in p.groups for m in g.models})


def _slab_greedy(items: Sequence[_Item], devices: Sequence[Device],
                 config: PlacementConfig, balance: bool = False,
                 overcommit: bool = False) -> Placement:
    """``place_slab_greedy``'s greedy over ``items`` in the order given; with ``balance``
    each candidate's free KV blocks count times the compute share its group has left.
    With ``overcommit`` a replica of a model that has none yet and fits no group within
    the planned load goes where its weights and one sequence's KV fit and the group is
    least loaded with it (``_load``)."""

    def score(c: tuple[_Group, _Item]) -> tuple:
        free = _free_blocks(*c)
        left = max(config.headroom - c[0].util(c[1]), 0.0)
        return ((free * left,) if balance else ()) + (free, [-i for i in c[0].devices])

    def least_loaded(c: tuple[_Group, _Item]) -> tuple:
        return (-_load(*c, config.headroom), _free_blocks(*c), [-i for i in c[0].devices])

    cluster, unplaced, over = _Cluster(devices, config), [], []
    served: set[str] = set()
    for item in items:
        fit = cluster.candidates(item, widen=True)
        pick = score
        if not fit and overcommit and item.demand.name not in served:
            fit, pick = cluster.candidates(item, widen=True, over=True), least_loaded
            if fit:
                over.append(item.demand.name)
        # Interference: never beside models whose steps break its TPOT (or theirs).
        cands = [(g, it) for g, it in fit if tpot_compatible(g.items + [it])] or fit
        if not cands:
            unplaced.append(_unfit(item, cluster))
            continue
        cluster.add(*max(cands, key=pick))
        served.add(item.demand.name)
    return cluster.placement("slab-greedy", unplaced, over)


def _load(g: _Group, item: _Item, headroom: float) -> float:
    """How loaded ``g`` is with ``item``: its compute share over the headroom, plus the
    fraction of its pool by which the planned KV demand overflows it (demand within the
    pool costs nothing; past it, sequences wait for blocks)."""
    budget = g.kv_budget(item)
    over = g.kv_need(item) / budget - 1.0 if budget > 0 else math.inf
    return g.util(item) / headroom + max(over, 0.0)


def _kvpr(g: _Group, item: _Item | None = None) -> float:
    budget = g.kv_budget(item)
    return g.kv_need(item) / budget if budget > 0 else math.inf


def place_kvpr(demands: Sequence[ModelDemand], plans: Mapping[str, ParallelPlan],
               devices: Sequence[Device],
               config: PlacementConfig = PlacementConfig()) -> Placement:
    """Prism-style placement by KV pressure ratio (KVPR = a group's KV demand in bytes /
    its KV memory after weights). Replicas by KV demand, largest first; each goes to the
    feasible group whose resulting highest KVPR over all groups is lowest (then the lowest
    KVPR of the chosen group itself, then device index). Precision-blind: bytes, whatever
    the block formats."""
    _check_inputs(demands, devices)
    cluster, unplaced = _Cluster(devices, config), []
    items = sorted(_items(demands, plans), key=lambda i: (-i.kv_need, i.demand.name, i.replica))
    for item in items:
        cands = cluster.candidates(item)
        if not cands:
            unplaced.append(_unfit(item, cluster))
            continue

        def score(c: tuple[_Group, _Item]) -> tuple:
            g, it = c
            mine = _kvpr(g, it)
            others = max((_kvpr(o) for o in cluster.groups if o is not g), default=0.0)
            return (max(mine, others), mine, g.devices)

        cluster.add(*min(cands, key=score))
    return cluster.placement("kvpr", unplaced)


def place_dedicated(demands: Sequence[ModelDemand], plans: Mapping[str, ParallelPlan],
                    devices: Sequence[Device],
                    config: PlacementConfig = PlacementConfig()) -> Placement:
    """The static baseline: every replica alone on its own ``tp`` unused devices (the
    lowest-index ones that fit), in the order the models are given; replicas that find
    no devices are reported unplaced."""
    _check_inputs(demands, devices)
    cluster, unplaced = _Cluster(devices, config), []
    for item in _items(demands, plans):
        cands = [g for g in cluster.fresh(item.tp) if g.admits(item, config.headroom)]
        if not cands:
            unplaced.append(_unfit(item, cluster))
            continue
        cluster.add(min(cands, key=lambda g: g.devices), item)
    return cluster.placement("dedicated", unplaced)


PLACERS: dict[str, Callable[..., Placement]] = {
    "slab-greedy": place_slab_greedy, "kvpr": place_kvpr, "dedicated": place_dedicated}


def place(algorithm: str, demands: Sequence[ModelDemand], plans: Mapping[str, ParallelPlan],
          devices: Sequence[Device], config: PlacementConfig = PlacementConfig()) -> Placement:
    """``PLACERS[algorithm](...)`` with an error naming the known algorithms."""
    try:
        fn = PLACERS[algorithm]
    except KeyError:
        raise ValueError(f"unknown placement algorithm {algorithm!r}; known: "
                         f"{sorted(PLACERS)}") from None
    return fn(demands, plans, devices, config)
