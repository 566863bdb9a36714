"""Global scheduler: how many GPUs each model needs, and which models share which devices.

Plain Python (no JAX). Two stages, both driven by step costs (``schedulers.costmodel``):

1. ``plan_parallelism``: for one model, the tensor-parallel degree, the number of replicas
   and two batch sizes (the largest that meets its SLOs, the smallest that keeps up with
   its request rate) on one device kind.
2. ``place_slab_greedy`` (FineServe), ``place_kvpr`` (Prism-style) or ``place_dedicated``
   (one model per device group, the static baseline): every replica onto a *device group*
   (one device, or ``tp`` devices running their models tensor-parallel over one pool per
   device), never exceeding any device's memory and reporting what fits nowhere.

Memory of a device in a group (every device of a group holds the same):

    usable     = memory_bytes * (1 - reserve_fraction)      # activations, runtime, fragmentation
    weights    = sum over the group's models of weight_bytes / tp
    kv_budget  = usable - weights                            # the group's KV pool per device
    kv_need    = sum over its models of concurrency * mean_context * kv_bytes_per_token

and a group is only allowed ``kv_need <= kv_budget``. The KV of a tensor-parallel model is
counted whole on each device: the engine replicates the pool over its mesh
(``fineserve_jax.engine.sharding``). Compute: the models of a group take turns on its
devices, so their utilisations (request rate x device seconds per request) add up, and a
group must stay at or under ``PlacementConfig.headroom``.

The output, ``Placement``, is what ``serve.py --placement`` executes (``to_json``):

    {"algorithm": "slab-greedy",
     "devices": [{"device": 0, "models": ["a", "b"], "kv_budget_bytes": N, ...},
                 {"devices": [1, 2], "tp": 2, "models": ["c"], "kv_budget_bytes": N, ...}],
     "unplaced": [{"model": "d", "replica": 0, "reason": "..."}]}

A model with several replicas appears in several groups.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Protocol, Sequence

from schedulers.costmodel import StepCost

ALGORITHMS = ("slab-greedy", "kvpr", "dedicated")


class Device(Protocol):
    """What placement reads of a device (``costmodel.DeviceSpec`` has it)."""

    name: str
    memory_bytes: float


# ------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class ModelDemand:
    """One served model: its sizes, traffic, SLOs and step cost on the device kind.

    ``cost(tp)`` returns the model's ``StepCost`` on ``tp`` devices of the kind being
    planned for; it raises ``ValueError`` for a degree the model cannot run at (heads not
    divisible), which ``plan_parallelism`` skips.
    """

    name: str
    precision: str
    weight_bytes: float  # the whole model (all devices together)
    kv_bytes_per_token: float  # K and V of one token, every layer, scales included
    rate: float  # requests per second
    prompt_tokens: float  # mean prompt length
    output_tokens: float  # mean output length
    ttft_slo_s: float  # time to first token target
    tpot_slo_s: float  # time per output token target
    cost: Callable[[int], StepCost] = field(compare=False, repr=False)
    block_tokens: int = 16  # tokens of one KV block (the engine's block_tokens)
    block_bytes: int | None = None  # bytes of one KV block; default tokens x bytes/token

    def __post_init__(self):
        if not self.name:
            raise ValueError("ModelDemand: a model needs a name")
        for f in ("weight_bytes", "kv_bytes_per_token", "prompt_tokens", "output_tokens",
                  "ttft_slo_s", "tpot_slo_s"):
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"model {self.name!r}: {f} must be a positive number, "
                                 f"got {v!r}")
        if not (self.rate >= 0 and math.isfinite(self.rate)):
            raise ValueError(f"model {self.name!r}: rate must be >= 0 req/s, got {self.rate!r}")
        if not isinstance(self.block_tokens, int) or self.block_tokens < 1:
            raise ValueError(f"model {self.name!r}: block_tokens must be a positive int")
        if self.block_bytes is not None and self.block_bytes < 1:
            raise ValueError(f"model {self.name!r}: block_bytes must be positive")
        if not callable(self.cost):
            raise TypeError(f"model {self.name!r}: cost must be a callable tp -> StepCost")

    @property
    def kv_block_bytes(self) -> int:
        """Bytes of one KV block in this model's format."""
        if self.block_bytes is not None:
            return int(self.block_bytes)
        return int(math.ceil(self.kv_bytes_per_token * self.block_tokens))

    @property
    def mean_context(self) -> float:
        """Mean tokens in KV of a decoding sequence: the prompt plus half the output."""
        return self.prompt_tokens + self.output_tokens / 2


@dataclass(frozen=True)
class PlacementConfig:
    """Knobs shared by planning and placement."""

    reserve_fraction: float = 0.10  # of each device's memory kept off weights and KV
    headroom: float = 0.90  # most compute utilisation a device group may be planned at
    max_batch: int = 256  # largest decode batch considered

    def __post_init__(self):
        if not 0 <= self.reserve_fraction < 1:
            raise ValueError(f"reserve_fraction must be in [0, 1), got {self.reserve_fraction}")
        if not 0 < self.headroom <= 1:
            raise ValueError(f"headroom must be in (0, 1], got {self.headroom}")
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ValueError(f"max_batch must be a positive int, got {self.max_batch!r}")

    def usable_bytes(self, device: Device) -> float:
        return float(device.memory_bytes) * (1.0 - self.reserve_fraction)


# ------------------------------------------------------------------ parallelism
@dataclass(frozen=True)
class ParallelPlan:
    """How one model runs: ``replicas`` copies, each on ``tp`` devices."""

    tp: int
    replicas: int
    batch_slo: int  # largest decode batch meeting the TPOT and TTFT targets
    batch_rate: int  # smallest decode batch that keeps up with the rate (per replica)
    concurrency: int = 1  # sequences decoding at once when tokens are paced at the TPOT SLO
    utilisation: float = 0.0  # device-time share one replica needs (at ``concurrency``)
    meets_slo: bool = True  # False: even batch 1 misses an SLO at every degree tried
    fits: bool = True  # False: the weights plus one sequence's KV fit no degree

    @property
    def gpus(self) -> int:
        return self.tp * self.replicas


def _tokens(x: float) -> int:
    return max(1, int(round(x)))


class _Steps:
    """One model's step times at its mean lengths (see ``plan_parallelism``)."""

    def __init__(self, cost: StepCost, d: ModelDemand):
        self.cost, self.d = cost, d
        p = _tokens(d.prompt_tokens)
        self.prefill = cost.prefill_time([p], [p])  # P: a mean prompt in one step

    def decode(self, b: int) -> float:
        """d(b): one decode step of b sequences at the mean context."""
        return self.cost.decode_time([_tokens(self.d.mean_context)] * b)

    def service(self, b: int) -> float:
        """S(b): device seconds per request, its prefill plus 1/b of O decode steps."""
        return self.prefill + self.d.output_tokens * self.decode(b) / b


def plan_parallelism(demand: ModelDemand, device: Device,
                     tp_options: Sequence[int] = (1, 2, 4, 8),
                     config: PlacementConfig = PlacementConfig()) -> ParallelPlan:
    """Tensor-parallel degree, replicas and batch sizes of one model on one device kind.

    With P = ``prefill_time([prompt], [prompt])`` (a mean prompt, one step), d(b) =
    ``decode_time([ctx] * b)`` at the mean context ctx = prompt + output / 2, O = mean
    output tokens, h = ``config.headroom`` and, for each degree ``tp``:

    - memory: ``room = usable - weight_bytes / tp`` must hold one whole sequence's KV,
      ``(prompt + output) * kv_bytes_per_token`` (the pool is replicated on the group, so
      KV is not divided by tp), else the degree is skipped;
    - ``batch_slo`` = the largest b <= ``max_batch`` with ``d(b) <= tpot_slo`` (every
      token of a batch of b comes one decode step apart), ``P + d(b) <= ttft_slo`` (a new
      prompt waits for at most one decode step of the running batch, then prefills) and
      ``b * ctx * kv_bytes_per_token <= room``; found by bisection (d is non-decreasing
      in b). None: the degree misses the SLO even alone;
    - service time per request S(b) = P + O * d(b) / b: its prefill plus its 1/b share of
      O decode steps. One replica keeps up with at most ``capacity(b) = h / S(b)`` req/s;
    - ``replicas = max(1, ceil(rate / capacity(batch_slo)))``; lambda = rate / replicas;
    - ``batch_rate`` = the smallest b <= batch_slo with ``lambda * S(b) <= h``: the
      throughput b / d(b) covers lambda * O tokens/s with the prefill share taken out,
      b >= lambda * O * d(b) / (h - lambda * P) (a linear scan: d(b) / b need not be
      monotone under shape buckets). It is the batch the replica runs alone at full pace;
    - ``concurrency`` = max(batch_rate, min(batch_slo, ceil(lambda * O * tpot_slo))):
      Little's law when every sequence gets its next token one TPOT target apart, as
      when the replica shares its devices with other models and runs no faster than its
      SLO asks. That is the most KV its sequences hold (placement plans memory for it)
      and the batch at which its device time is least;
    - ``utilisation`` = lambda * S(concurrency): the share of its devices' time it needs
      (lambda * S(batch_rate) <= h if S is not monotone and that is more).

    The degree with the fewest GPUs (tp x replicas) wins, ties to the smaller tp. If no
    degree meets the SLOs, the fastest one alone (least d(1)) is returned with
    ``meets_slo=False``, ``batch_slo = 1`` and replicas for the rate at batch 1; if no
    degree fits the memory, the largest degree tried with ``fits=False`` (placement then
    reports the model unplaced).
    """
    d, h = demand, config.headroom
    usable = config.usable_bytes(device)
    ctx = d.mean_context
    one_seq = (d.prompt_tokens + d.output_tokens) * d.kv_bytes_per_token
    feasible: list[tuple[tuple, ParallelPlan]] = []
    fallback: list[tuple[tuple, ParallelPlan]] = []
    for tp in sorted(set(int(t) for t in tp_options)):
        if tp < 1:
            raise ValueError(f"tp options must be positive, got {tp_options!r}")
        room = usable - d.weight_bytes / tp
        if room < one_seq:
            continue
        try:
            cost = d.cost(tp)
        except ValueError:  # e.g. tp does not divide the heads
            continue
        kv_cap = max(1, min(config.max_batch, int(room // (ctx * d.kv_bytes_per_token))))
        st = _Steps(cost, d)

        def ok(b: int) -> bool:
            db = st.decode(b)
            return db <= d.tpot_slo_s and st.prefill + db <= d.ttft_slo_s

        meets = ok(1)
        b_slo = _largest(ok, kv_cap) if meets else 1
        replicas = max(1, math.ceil(d.rate * st.service(b_slo) / h - 1e-9))
        lam = d.rate / replicas
        b_rate = next((b for b in range(1, b_slo + 1) if lam * st.service(b) <= h), b_slo)
        conc = max(b_rate, min(b_slo, math.ceil(lam * d.output_tokens * d.tpot_slo_s - 1e-9)))
        util = lam * st.service(conc)
        if util > h:
            conc, util = b_rate, lam * st.service(b_rate)
        plan = ParallelPlan(tp, replicas, b_slo, b_rate, conc, util, meets)
        if meets:
            feasible.append(((plan.gpus, tp), plan))
        else:
            fallback.append(((st.decode(1), plan.gpus, tp), plan))
    if feasible:
        return min(feasible, key=lambda x: x[0])[1]
    if fallback:
        return min(fallback, key=lambda x: x[0])[1]
    return ParallelPlan(max(tp_options), 1, 1, 1, 1, 0.0, meets_slo=False, fits=False)


def _largest(ok: Callable[[int], bool], hi: int) -> int:
    """Largest b in [1, hi] with ok(b), given ok(1) and ok monotone (true then false)."""
    lo = 1
    if ok(hi):
        return hi
    while hi - lo > 1:  # ok(lo) and not ok(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


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

    def to_dict(self) -> dict:
        return {"algorithm": self.algorithm, "devices": [g.to_dict() for g in self.groups],
                "unplaced": [{"model": u.model, "replica": u.replica, "reason": u.reason}
                             for u in self.unplaced]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping) -> Placement:
        return cls(str(d.get("algorithm", "")),
                   tuple(PlacementGroup.from_dict(g) for g in d["devices"]),
                   tuple(Unplaced(u["model"], int(u["replica"]), u["reason"])
                         for u in d.get("unplaced", ())))

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

    def weights(self, extra: _Item | None = None) -> float:
        return sum(i.weights for i in self._with(extra))

    def kv_need(self, extra: _Item | None = None) -> float:
        return sum(i.kv_need for i in self._with(extra))

    def util(self, extra: _Item | None = None) -> float:
        return sum(i.util for i in self._with(extra))

    def kv_budget(self, extra: _Item | None = None) -> float:
        return self.usable - self.weights(extra)

    def _with(self, extra: _Item | None) -> list[_Item]:
        return self.items + ([extra] if extra is not None else [])

    def admits(self, item: _Item, headroom: float) -> bool:
        if item.tp != self.tp or any(i.demand.name == item.demand.name for i in self.items):
            return False
        budget = self.kv_budget(item)
        return (budget >= self.kv_need(item) and budget >= max(i.min_kv for i in self._with(item))
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


def _kind(dev: Device) -> tuple:
    return (dev.name, float(dev.memory_bytes))


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
                by_kind.setdefault(_kind(dev), []).append(i)
        out = []
        for idx in by_kind.values():
            if len(idx) >= tp:
                devs = tuple(idx[:tp])
                out.append(_Group(devs, tp, self.config.usable_bytes(self.devices[devs[0]])))
        return sorted(out, key=lambda g: g.devices)

    def candidates(self, item: _Item) -> list[tuple[_Group, _Item]]:
        """(group, replica as placed there) for the existing groups and fresh ones that
        can take ``item``, by device index. When none can at its planned tp, existing
        groups of a larger tp that can take it sharded over all their devices (its
        weights spread thinner, no device newly used): a model is widened rather than
        left unplaced."""
        h = self.config.headroom
        cands = [(g, item) for g in self.groups if g.admits(item, h)]
        cands += [(g, item) for g in self.fresh(item.tp) if g.admits(item, h)]
        if not cands:
            for g in self.groups:
                if g.tp > item.tp:
                    wide = replace(item, tp=g.tp, weights=item.demand.weight_bytes / g.tp)
                    if g.admits(wide, h):
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
            kinds.setdefault(_kind(dev), []).append(i)
        fit = [idx for idx in kinds.values()
               if _Group(tuple(idx[:item.tp]), item.tp, self.config.usable_bytes(
                   self.devices[idx[0]])).admits(item, self.config.headroom)]
        if not fit:
            best = max(self.config.usable_bytes(dev) for dev in self.devices)
            return (f"{d.name}: {need}; no device has room for it even empty "
                    f"({best / 2**30:.2f} GiB usable at most, compute headroom "
                    f"{self.config.headroom})")
        if all(len(idx) < item.tp for idx in fit):
            return f"{d.name}: {need}; fewer than {item.tp} devices of a kind that fits"
        return (f"{d.name}: {need}; no group of tp={item.tp} has room left and "
                f"{len(self.devices) - len(self.used)} of {len(self.devices)} devices are unused")

    def placement(self, algorithm: str, unplaced: list[Unplaced]) -> Placement:
        groups = []
        for g in sorted(self.groups, key=lambda g: g.devices):
            groups.append(PlacementGroup(
                g.devices, g.tp, tuple(i.demand.name for i in g.items),
                int(math.floor(g.kv_budget())), int(math.ceil(g.kv_need())),
                round(g.util(), 6)))
        return Placement(algorithm, tuple(groups), tuple(unplaced))


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


def place_slab_greedy(demands: Sequence[ModelDemand], plans: Mapping[str, ParallelPlan],
                      devices: Sequence[Device],
                      config: PlacementConfig = PlacementConfig()) -> Placement:
    """FineServe's placement: replicas by memory need per device (weights / tp + planned
    KV), largest first; each goes to the feasible group (an existing group of its tp, or
    ``tp`` unused devices; failing both, an existing wider group it is sharded over) that
    leaves the most free KV blocks, counted in the block sizes
    of the precisions sharing that pool weighted by their KV demand (a pool of INT4-KV
    models holds more tokens per byte than one of BF16 models). Ties: lowest device index.
    Groups where the models' step times would break one of their TPOT targets
    (``tpot_compatible``) are passed over while any other group fits.
    """
    _check_inputs(demands, devices)
    cluster, unplaced = _Cluster(devices, config), []
    for item in _by_memory(_items(demands, plans)):
        fit = cluster.candidates(item)
        # Interference: never beside models whose steps break its TPOT (or theirs).
        cands = [(g, it) for g, it in fit if tpot_compatible(g.items + [it])] or fit
        if not cands:
            unplaced.append(_unfit(item, cluster))
            continue
        best = max(cands, key=lambda c: (_free_blocks(*c), [-i for i in c[0].devices]))
        cluster.add(*best)
    return cluster.placement("slab-greedy", unplaced)


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
