"""What a KV allocator reports: per-model and per-pool byte accounting.

Plain Python. Every figure is in bytes, rows or blocks of the one physical pool, so the
three allocators (KV Slab, static partitions, fixed page) are compared on the same terms.
The dataclasses check on construction that the figures add up, so an allocator with a
bookkeeping bug fails loudly wherever ``stats()`` is called (tests, benchmarks, notebooks).

Definitions (shared/DESIGN.md, "KV Slab contract"):

* *reserved* bytes of a model: the bytes it holds and no other model may use right now
  (KV Slab: slabs it owns; static: its whole partition; fixed page: its allocated pages).
* *padding*: bytes inside what a model holds that can never hold a block of its format
  (the remainder of a row or slab after the last whole block; a page minus the block).
* *live* bytes: the KV bytes of the live tokens (``live_tokens * token_bytes``); when the
  caller gives no token counts, every used block counts as full.
* *fragmentation* = (reserved bytes - live bytes) / pool bytes: memory some model holds
  that holds no live token. Free rows are not fragmentation: any model may take them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.50 KiB"``: sizes from a test pool to a GPU's in one notation."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def _nonneg(obj, *names):
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{type(obj).__name__}.{n} must be an int >= 0, got {v!r}")


@dataclass(frozen=True)
class ModelStats:
    model: str
    format: str  # the block format's name ("bf16", "fp8", ...) or its str() when unnamed
    block_bytes: int  # bytes of one block of this model's format
    slabs: int  # rows the model holds: owned slabs (kvslab), partition rows (static),
    #             rows holding only this model's pages (fixed page)
    blocks_used: int  # blocks handed out and not yet freed
    blocks_capacity: int  # blocks that fit in what the model holds right now
    reserved_bytes: int  # bytes held by the model (see module docstring)
    padding_bytes: int  # bytes held that can never hold a block of this format
    live_tokens: int | None  # live tokens, when the caller gave them
    live_bytes: int  # live_tokens * token_bytes, or blocks_used * block_bytes

    def __post_init__(self):
        _nonneg(self, "block_bytes", "slabs", "blocks_used", "blocks_capacity",
                "reserved_bytes", "padding_bytes", "live_bytes")
        if self.blocks_used > self.blocks_capacity:
            raise ValueError(f"{self.model}: {self.blocks_used} blocks used > capacity "
                             f"{self.blocks_capacity}")
        if self.blocks_capacity * self.block_bytes + self.padding_bytes > self.reserved_bytes:
            raise ValueError(f"{self.model}: capacity plus padding exceeds reserved bytes")
        if self.live_bytes > self.blocks_used * self.block_bytes:
            raise ValueError(f"{self.model}: live bytes {self.live_bytes} exceed the used "
                             f"blocks ({self.blocks_used} x {self.block_bytes} B)")

    @property
    def idle_bytes(self) -> int:
        """Reserved bytes holding no live token: this model's share of fragmentation."""
        return self.reserved_bytes - self.live_bytes

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        live = "" if self.live_tokens is None else f", {self.live_tokens} live tokens"
        return (f"{self.model} ({self.format}, {self.block_bytes} B/block): {self.slabs} rows, "
                f"{self.blocks_used}/{self.blocks_capacity} blocks, "
                f"{human_bytes(self.reserved_bytes)} held, "
                f"{human_bytes(self.padding_bytes)} padding{live}")

    def __repr__(self):
        return f"ModelStats({self.summary()})"


@dataclass(frozen=True)
class PoolStats:
    kind: str  # "kvslab" | "static" | "fixed-page"
    pool_bytes: int  # bytes of the pool's rows (<= the budget the allocator was given)
    row_bytes: int  # bytes of one row of the [num_rows, row_bytes] uint8 pool
    rows_total: int
    rows_free: int  # rows holding nothing (any model may take them)
    rows_by_owner: dict[str, int]  # rows held by one owner (model or partition name)
    rows_shared: int = 0  # rows holding pages of several models (fixed page only)
    models: dict[str, ModelStats] = field(default_factory=dict)
    unbound_bytes: int = 0  # reserved for names with no model added (static partitions)
    padding_bytes: int = field(init=False)
    reserved_bytes: int = field(init=False)
    live_bytes: int = field(init=False)
    fragmentation: float = field(init=False)  # (reserved - live) / pool_bytes

    def __post_init__(self):
        _nonneg(self, "pool_bytes", "row_bytes", "rows_total", "rows_free", "rows_shared",
                "unbound_bytes")
        held = sum(self.rows_by_owner.values())
        if held + self.rows_shared + self.rows_free != self.rows_total:
            raise ValueError(f"rows do not add up: {held} owned + {self.rows_shared} shared + "
                             f"{self.rows_free} free != {self.rows_total}")
        if self.rows_total * self.row_bytes > self.pool_bytes:
            raise ValueError("rows_total * row_bytes exceeds pool_bytes")
        set_ = object.__setattr__  # derived once here; the dataclass stays frozen
        set_(self, "padding_bytes", sum(m.padding_bytes for m in self.models.values()))
        set_(self, "reserved_bytes",
             sum(m.reserved_bytes for m in self.models.values()) + self.unbound_bytes)
        set_(self, "live_bytes", sum(m.live_bytes for m in self.models.values()))
        if self.reserved_bytes > self.rows_total * self.row_bytes:
            raise ValueError(f"reserved bytes {self.reserved_bytes} exceed the pool rows")
        set_(self, "fragmentation", (self.reserved_bytes - self.live_bytes) / self.pool_bytes)

    @property
    def blocks_used(self) -> int:
        return sum(m.blocks_used for m in self.models.values())

    @property
    def padding_fraction(self) -> float:
        """Padding as a fraction of the bytes models hold (0 when they hold nothing)."""
        return self.padding_bytes / self.reserved_bytes if self.reserved_bytes else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["models"] = {k: m.to_dict() for k, m in self.models.items()}
        d["rows_by_owner"] = dict(self.rows_by_owner)
        return d

    def summary(self) -> str:
        head = (f"{self.kind} pool: {human_bytes(self.pool_bytes)}, {self.rows_total} rows x "
                f"{human_bytes(self.row_bytes)}, {self.rows_free} free"
                + (f", {self.rows_shared} shared" if self.rows_shared else "")
                + f"; fragmentation {self.fragmentation:.2%}, "
                f"padding {human_bytes(self.padding_bytes)}")
        return "\n".join([head, *("  " + m.summary() for m in self.models.values())])

    def __repr__(self):
        return f"PoolStats({self.summary()})"

    def _repr_pretty_(self, p, cycle):  # IPython / notebooks
        p.text(self.summary())


def live_figures(live_tokens, model: str, block_bytes: int, block_tokens: int,
                 blocks_used: int) -> tuple[int | None, int]:
    """(live tokens or None, live bytes) of one model, checked against its used blocks.

    ``live_tokens`` maps model -> tokens (a model left out has none); ``None`` means the
    caller does not know, and every used block counts as full.
    """
    if live_tokens is None:
        return None, blocks_used * block_bytes
    t = live_tokens.get(model, 0)
    if not isinstance(t, int) or isinstance(t, bool) or t < 0:
        raise ValueError(f"live_tokens[{model!r}] must be an int >= 0, got {t!r}")
    if t > blocks_used * block_tokens:
        raise ValueError(f"live_tokens[{model!r}] = {t} does not fit in its {blocks_used} "
                         f"used blocks of {block_tokens} tokens")
    return t, t * block_bytes // block_tokens  # block_bytes is a multiple of block_tokens


def check_live_names(live_tokens, models) -> None:
    if live_tokens is not None:
        unknown = sorted(set(live_tokens) - set(models))
        if unknown:
            raise ValueError(f"live_tokens names unknown models {unknown}; known: {sorted(models)}")
