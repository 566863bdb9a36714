"""Global scheduler, first stage: how many GPUs each model needs.

Plain Python (no JAX). ``plan_parallelism`` chooses, for one model (``ModelDemand``: its
sizes, request rate, SLOs and step cost) on one device kind, the tensor-parallel degree,
the number of replicas and two batch sizes: the largest that meets its SLOs and the
smallest that keeps up with its request rate. ``schedulers.placement`` then puts every
replica on a device group; it re-exports the names defined here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from schedulers.costmodel import StepCost


class Device(Protocol):
    """What placement reads of a device (``costmodel.DeviceSpec`` has it).

    A device may also have ``kv_pool_bytes``, a KV pool already allocated there whose
    size cannot change (a running engine's): placement then gives its group exactly that
    pool and only the rest of the usable memory to weights (``pool_bytes``)."""

    name: str
    memory_bytes: float


def pool_bytes(device: Device) -> float | None:
    """The fixed KV pool of ``device`` (its ``kv_pool_bytes``), or None when placement
    sizes the pool from what the weights leave."""
    v = getattr(device, "kv_pool_bytes", None)
    return None if v is None else float(v)


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
    # slab-greedy weighs a group's free KV blocks by the compute share it has left
    # (False: free KV blocks alone, the paper's rule)
    balance_compute: bool = True
    # slab-greedy serves a model whose only replica fits no group within the planned
    # load (``headroom``, planned KV demand) on the least loaded group where its weights
    # and one sequence's KV fit, rather than leave it with none (False: unplaced)
    overcommit: bool = True

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
      KV is not divided by tp), else the degree is skipped; on a device with a fixed pool
      (``pool_bytes``) room is that pool, if the weights fit beside it;
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

    The degree with the fewest GPUs (tp x replicas) wins; ties go to the larger total
    batch within the SLO (``batch_slo x replicas``: a degree whose KV room after the
    weights holds a sequence or two per replica loses to a wider one that holds dozens on
    as many GPUs), then to the smaller tp. If no
    degree meets the SLOs, the fastest one alone (least d(1)) is returned with
    ``meets_slo=False``, ``batch_slo = 1`` and replicas for the rate at batch 1; if no
    degree fits the memory, the largest degree tried with ``fits=False`` (placement then
    reports the model unplaced).
    """
    d, h = demand, config.headroom
    usable = config.usable_bytes(device)
    pool = pool_bytes(device)
    ctx = d.mean_context
    one_seq = (d.prompt_tokens + d.output_tokens) * d.kv_bytes_per_token
    feasible: list[tuple[tuple, ParallelPlan]] = []
    fallback: list[tuple[tuple, ParallelPlan]] = []
    for tp in sorted(set(int(t) for t in tp_options)):
        if tp < 1:
            raise ValueError(f"tp options must be positive, got {tp_options!r}")
        room = usable - d.weight_bytes / tp
        if pool is not None:  # a fixed pool: the KV room, and the weights must fit beside it
            room = pool if d.weight_bytes / tp <= usable - pool else 0.0
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
            feasible.append(((plan.gpus, -plan.batch_slo * plan.replicas, tp), plan))
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
