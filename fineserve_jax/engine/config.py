"""Engine configuration and the shape buckets it compiles."""

from __future__ import annotations

from dataclasses import dataclass

ALLOCATORS = ("kvslab", "static", "fixed-page")


def geometric_buckets(lo: int, hi: int, factor: int = 2) -> tuple[int, ...]:
    """lo, lo*factor, ... up to and always including hi."""
    out, v = [], lo
    while v < hi:
        out.append(v)
        v *= factor
    return tuple(out) + (hi,)


def pick(buckets: tuple[int, ...], n: int, what: str) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{what} {n} exceeds the largest compiled bucket {buckets[-1]}")


@dataclass(frozen=True)
class EngineConfig:
    """One device's engine: KV budget, batch limits, compiled shapes.

    Buckets left as ``None`` are derived: powers of ``bucket_factor`` up to the limit.
    Every combination is compiled at warm-up (when ``warmup``), so keep them few.

    ``batch_invariant`` compiles only the largest shape of each step kind. Matmuls then
    run on the same shapes whatever the batch, so their rounding does not depend on the
    other requests. Without it, a request batched with others can round differently from
    one run alone: with FP8 activations (``fireq``) or bfloat16 compute that can change a
    greedy token at a near-tie.
    """

    kv_budget_bytes: int = 256 * 2**20  # the device's KV pool, shared by all its models
    block_tokens: int = 16
    max_seqs: int = 16  # running sequences per model (the largest decode batch)
    max_prefill_seqs: int = 4  # rows of one prefill step
    prefill_token_budget: int = 256  # tokens of one prefill step
    max_model_len: int = 2048  # prompt + output tokens of one sequence (capped by the model)
    allocator: str = "kvslab"  # "kvslab" | "static" | "fixed-page" (baselines)
    bucket_factor: int = 4
    decode_buckets: tuple[int, ...] | None = None  # batch sizes of decode steps
    prefill_row_buckets: tuple[int, ...] | None = None  # rows of prefill steps
    chunk_buckets: tuple[int, ...] | None = None  # tokens per row of prefill steps
    context_buckets: tuple[int, ...] | None = None  # page-table widths (blocks)
    min_chunk: int = 16
    min_context_blocks: int = 8
    warmup: bool = True  # compile every bucket before serving
    # One compiled shape per step kind (the largest): a request's output then does not
    # depend on what else shares its batch, at the price of full-size steps at low load.
    batch_invariant: bool = False
    pool_fill: int = 0  # byte the pool starts as (tests poison it with 0xFF = NaN)
    # Local scheduler (``schedulers.local``): "fineserve" (SLO-aware adaptive batching),
    # "prism" or "fcfs"; and what it does with a request predicted to miss its TTFT SLO:
    # "reject" (finish it as dropped at once) or "best-effort" (serve it last, count it).
    scheduler: str = "fineserve"
    on_slo_miss: str = "reject"
    # Timed runs per step shape when ``start`` profiles models that have SLOs and no cost
    # model (``Engine.profile_costs``); 0 = never profile (such models are never shed).
    profile_reps: int = 5
    # Online correction of each model's cost model (``schedulers.calibration``): how far
    # one step moves the predicted step time towards the measured one (0 = never correct;
    # about the last 1/weight steps of a kind count).
    cost_calibration: float = 0.05

    def __post_init__(self):
        for f in ("kv_budget_bytes", "block_tokens", "max_seqs", "max_prefill_seqs",
                  "prefill_token_budget", "max_model_len", "min_chunk", "min_context_blocks"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{f} must be a positive int, got {v!r}")
        if self.allocator not in ALLOCATORS:
            raise ValueError(f"allocator must be one of {ALLOCATORS}, got {self.allocator!r}")
        from schedulers.local import ON_MISS, POLICIES
        if self.scheduler not in POLICIES:
            raise ValueError(f"scheduler must be one of {list(POLICIES)}, got {self.scheduler!r}")
        if self.on_slo_miss not in ON_MISS:
            raise ValueError(f"on_slo_miss must be one of {ON_MISS}, got {self.on_slo_miss!r}")
        if self.bucket_factor < 2:
            raise ValueError("bucket_factor must be >= 2")
        if not (isinstance(self.cost_calibration, (int, float))
                and 0 <= self.cost_calibration <= 1):
            raise ValueError(f"cost_calibration must be in [0, 1], got {self.cost_calibration!r}")
        if not 0 <= self.pool_fill <= 255:
            raise ValueError("pool_fill is a byte value")
        for f in ("decode_buckets", "prefill_row_buckets", "chunk_buckets", "context_buckets"):
            v = getattr(self, f)
            if v is not None and (not v or list(v) != sorted(set(v)) or v[0] < 1):
                raise ValueError(f"{f} must be increasing positive ints, got {v!r}")

    def buckets(self, max_len: int) -> "Buckets":
        """The compiled shapes for a model whose sequences hold at most ``max_len`` tokens."""
        f = self.bucket_factor
        max_blocks = -(-max_len // self.block_tokens)
        chunk_hi = self.prefill_token_budget
        if self.batch_invariant:
            return Buckets((self.max_seqs,), (self.max_prefill_seqs,), (chunk_hi,),
                           (max_blocks,))
        return Buckets(
            decode=self.decode_buckets or geometric_buckets(1, self.max_seqs, f),
            prefill_rows=self.prefill_row_buckets or geometric_buckets(1, self.max_prefill_seqs, f),
            chunks=self.chunk_buckets or geometric_buckets(min(self.min_chunk, chunk_hi), chunk_hi, f),
            context=self.context_buckets or geometric_buckets(
                min(self.min_context_blocks, max_blocks), max_blocks, f),
        )


@dataclass(frozen=True)
class Buckets:
    decode: tuple[int, ...]
    prefill_rows: tuple[int, ...]
    chunks: tuple[int, ...]
    context: tuple[int, ...]

    def shapes(self) -> list[tuple[int, int, int]]:
        """Every (rows, tokens per row, page-table width) compiled."""
        dec = [(b, 1, p) for b in self.decode for p in self.context]
        pre = [(r, t, p) for r in self.prefill_rows for t in self.chunks for p in self.context]
        return dec + pre
