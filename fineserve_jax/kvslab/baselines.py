"""The two KV pools KV Slab is measured against (shared/BENCHMARKS.md), same interface.

* ``StaticPartitionAllocator``: what one engine process per model does (separate vLLM
  instances, each given a fraction of GPU memory). Each model's rows are fixed when the
  allocator is built; an idle model's memory never helps a busy one.
* ``FixedPageAllocator``: one unified pool with a single page size for every model
  (MuxServe-like). Memory moves freely, but a block smaller than a page wastes the rest
  of the page, so low-precision models lose most of their KV savings.

Both address blocks exactly as KV Slab does (row ``h // blocks_per_row``, offset
``(h % blocks_per_row) * stride``) over the same ``uint8[num_rows, row_bytes]`` pool, so the
device side and the benchmarks treat all three alike.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from fineserve_jax.kvslab.allocator import (
    ROW_ALIGN,
    ROW_LIMIT,
    BlockLayout,
    OutOfBlocks,
    PoolTable,
    as_count,
    check_model_args,
    check_pool_bytes,
    check_row_bytes,
    choose_slab_bytes,
    handle_list,
)
from fineserve_jax.kvslab.format import BlockFormat
from fineserve_jax.kvslab.stats import (
    ModelStats,
    PoolStats,
    check_live_names,
    live_figures,
)


class _Owned:
    """One model's blocks in a fixed handle range: never-used handles, then a free stack."""

    __slots__ = (
        "bpr",
        "cap",
        "capacity",
        "first",
        "fmt",
        "fresh",
        "owned",
        "recycled",
        "reserve",
    )

    def __init__(self, fmt, bpr, first, capacity, reserve, cap):
        self.fmt, self.bpr, self.first, self.capacity = fmt, bpr, first, capacity
        self.reserve, self.cap = reserve, cap
        self.fresh = 0  # handles first + [fresh, capacity) have never been handed out
        self.recycled: list[int] = []
        self.owned: set[int] = set()

    @property
    def used(self) -> int:
        return len(self.owned)


def _disown(model: str, owned: set, handles: Iterable[int], noun: str) -> list[int]:
    """Checks that ``model`` owns every handle, takes them out of ``owned`` and returns
    them as a list; nothing changes when one is not its own."""
    hs = handle_list(handles)
    bad = [h for h in hs if h not in owned]
    if bad:
        raise ValueError(f"{model}: cannot free {noun}s {bad[:8]}: not allocated to it "
                         f"(double free, or another model's {noun})")
    owned.difference_update(hs)
    return hs


def _rows_by_fraction(fractions: Mapping[str, float], num_rows: int) -> dict[str, int]:
    """Whole rows per name: floor of each share, leftovers to the largest remainders."""
    exact = {k: f * num_rows for k, f in fractions.items()}
    rows = {k: int(x) for k, x in exact.items()}
    spare = min(int(sum(fractions.values()) * num_rows + 1e-9), num_rows) - sum(rows.values())
    for k in sorted(exact, key=lambda k: rows[k] - exact[k])[:max(0, spare)]:
        rows[k] += 1
    return rows


class StaticPartitionAllocator(PoolTable):
    """Fixed per-model partitions of one pool: separate engine processes, in one object.

    ``partitions`` names every model that may ever be added: a mapping name -> fraction of
    the pool's rows (each > 0, sum <= 1), or a sequence of names for an equal split. Rows
    are dealt out once, here, as contiguous ranges in the given order; a name's rows stay
    reserved for it whether or not its model is added. Rows use the same size as KV Slab
    would (``choose_slab_bytes``) so the physical pool has the same shape; within a row the
    stride is the model's block size.
    """

    kind = "static"

    def __init__(self, pool_bytes: int, formats: Sequence[BlockFormat], *,
                 partitions: Mapping[str, float] | Sequence[str],
                 slab_bytes: int | None = None, max_waste: float = 0.01, min_slabs: int = 8):
        pool_bytes = check_pool_bytes(pool_bytes)
        if slab_bytes is None:
            slab_bytes = choose_slab_bytes([f.block_bytes for f in formats], pool_bytes,
                                           max_waste, min_slabs)
        self.row_bytes = check_row_bytes(slab_bytes, pool_bytes)
        self.num_rows = pool_bytes // self.row_bytes
        if isinstance(partitions, str) or not isinstance(partitions, (Mapping, Sequence)):
            raise TypeError("partitions must be a mapping name -> fraction or a list of names")
        if not isinstance(partitions, Mapping):
            partitions = {k: 1 / len(partitions) for k in partitions} if partitions else {}
        if not partitions or len(set(partitions)) != len(list(partitions)):
            raise ValueError("partitions must name at least one model, each once")
        for k, f in partitions.items():
            if not isinstance(k, str) or not k or not isinstance(f, (int, float)) or f <= 0:
                raise ValueError(f"partition {k!r}: needs a name and a fraction > 0, got {f!r}")
        if sum(partitions.values()) > 1 + 1e-9:
            raise ValueError(f"partition fractions sum to {sum(partitions.values())} > 1")
        rows = _rows_by_fraction(partitions, self.num_rows)
        empty = [k for k, r in rows.items() if r == 0]
        if empty:
            raise ValueError(f"partitions {empty} get no row of {self.row_bytes} B")
        self.partition_rows: dict[str, range] = {}
        start = 0
        for k, r in rows.items():
            self.partition_rows[k] = range(start, start + r)
            start += r
        self._models: dict[str, _Owned] = {}

    def add_model(self, model: str, fmt: BlockFormat, *, reserve_blocks: int = 0,
                  cap_blocks: int | None = None) -> None:
        reserve, cap = check_model_args(self._models, model, fmt, reserve_blocks, cap_blocks)
        if model not in self.partition_rows:
            raise ValueError(f"model {model!r} has no partition; partitions are "
                             f"{list(self.partition_rows)} (fixed at construction)")
        bpr = self.row_bytes // fmt.block_bytes
        if bpr == 0:
            raise ValueError(f"{model}: a {fmt.block_bytes} B block does not fit in a "
                             f"{self.row_bytes} B row")
        rows = self.partition_rows[model]
        capacity = len(rows) * bpr
        if reserve > capacity:
            raise ValueError(f"{model}: reserve_blocks={reserve} exceeds its partition of "
                             f"{capacity} blocks ({len(rows)} rows)")
        self._models[model] = _Owned(fmt, bpr, rows.start * bpr, capacity, reserve, cap)

    def remove_model(self, model: str) -> None:
        m = self._get(model)
        if m.used:
            raise ValueError(f"cannot remove {model!r}: it still holds {m.used} blocks")
        del self._models[model]  # its partition stays reserved for the name

    def layout(self, model: str) -> BlockLayout:
        m = self._get(model)
        return BlockLayout(m.bpr, m.fmt.block_bytes)

    def free_blocks(self, model: str) -> int:
        m = self._get(model)
        n = m.capacity - m.used
        return n if m.cap is None else min(n, m.cap - m.used)

    def allocate(self, model: str, n: int) -> list[int]:
        m = self._get(model)
        n = as_count(n, "n")
        avail = self.free_blocks(model)
        if n > avail:
            raise OutOfBlocks(f"{model}: asked for {n} blocks, {avail} available in its "
                              f"partition of {m.capacity} blocks (cap {m.cap})")
        k = min(n, len(m.recycled))
        out = m.recycled[len(m.recycled) - k:][::-1]
        del m.recycled[len(m.recycled) - k:]
        out += range(m.first + m.fresh, m.first + m.fresh + n - k)
        m.fresh += n - k
        m.owned.update(out)
        return out

    def free(self, model: str, handles: Iterable[int]) -> None:
        m = self._get(model)
        m.recycled.extend(_disown(model, m.owned, handles, "handle"))

    def stats(self, live_tokens: Mapping[str, int] | None = None) -> PoolStats:
        check_live_names(live_tokens, self._models)
        models = {}
        for name, m in self._models.items():
            b, rows = m.fmt.block_bytes, len(self.partition_rows[name])
            tokens, live = live_figures(live_tokens, name, b, m.fmt.block_tokens, m.used)
            models[name] = ModelStats(
                model=name, format=m.fmt.name or str(m.fmt), block_bytes=b, slabs=rows,
                blocks_used=m.used, blocks_capacity=m.capacity,
                reserved_bytes=rows * self.row_bytes,
                padding_bytes=rows * (self.row_bytes - m.bpr * b),
                live_tokens=tokens, live_bytes=live)
        by_owner = {k: len(r) for k, r in self.partition_rows.items()}
        unbound = sum(len(r) for k, r in self.partition_rows.items() if k not in self._models)
        return PoolStats(kind=self.kind, pool_bytes=self.pool_bytes, row_bytes=self.row_bytes,
                         rows_total=self.num_rows, rows_free=self.num_rows - sum(by_owner.values()),
                         rows_by_owner=by_owner, models=models,
                         unbound_bytes=unbound * self.row_bytes)

    def __repr__(self):
        parts = {k: len(r) for k, r in self.partition_rows.items()}
        return f"StaticPartitionAllocator({self.num_rows} rows x {self.row_bytes} B, rows {parts})"


class FixedPageAllocator(PoolTable):
    """One unified pool of equal pages shared by every model (MuxServe-like).

    ``page_bytes`` defaults to the largest block of ``formats`` rounded up to 256: every
    block of every model takes one page, so smaller blocks pad the rest of their page.
    Pages are grouped ``pages_per_row`` to a row of about KV Slab's slab size (only the
    pool's shape; pages move one by one). Reserves and caps count pages (= blocks):
    other models never take a free page that would leave fewer free pages than the unmet
    reserves. In ``stats()`` a row counts for a model when only that model's pages are in
    it, as shared when several models' are, and as free when none is used.
    """

    kind = "fixed-page"

    def __init__(self, pool_bytes: int, formats: Sequence[BlockFormat], *,
                 page_bytes: int | None = None, max_waste: float = 0.01, min_slabs: int = 8):
        pool_bytes = check_pool_bytes(pool_bytes)
        sizes = [f.block_bytes for f in formats]
        if page_bytes is None:
            if not sizes:
                raise ValueError("give formats (to choose the page size) or page_bytes")
            page_bytes = -(-max(sizes) // ROW_ALIGN) * ROW_ALIGN
        self.page_bytes = check_row_bytes(page_bytes, pool_bytes, "page_bytes")
        try:
            slab = choose_slab_bytes(sizes, pool_bytes, max_waste, min_slabs) if sizes else 0
        except ValueError:  # pool too small for min_slabs slabs: one page per row
            slab = 0
        per_row = max(1, min(slab // self.page_bytes, (ROW_LIMIT - 1) // self.page_bytes))
        self.pages_per_row = per_row
        self.row_bytes = per_row * self.page_bytes
        self.num_rows = pool_bytes // self.row_bytes
        self.num_pages = self.num_rows * per_row
        self._free = list(range(self.num_pages))  # heap: lowest page first
        self._page_owner = np.full(self.num_pages, -1, np.int32)  # page -> model id, -1 free
        self._models: dict[str, _Owned] = {}
        self._ids: dict[str, int] = {}

    def _unmet(self, skip: str | None = None) -> int:
        return sum(max(0, m.reserve - m.used) for k, m in self._models.items() if k != skip)

    def add_model(self, model: str, fmt: BlockFormat, *, reserve_blocks: int = 0,
                  cap_blocks: int | None = None) -> None:
        reserve, cap = check_model_args(self._models, model, fmt, reserve_blocks, cap_blocks)
        if fmt.block_bytes > self.page_bytes:
            raise ValueError(f"{model}: a {fmt.block_bytes} B block does not fit in a "
                             f"{self.page_bytes} B page")
        need = reserve + sum(m.reserve for m in self._models.values())
        if need > self.num_pages:
            raise ValueError(f"{model}: reserves of all models need {need} pages; the pool "
                             f"has {self.num_pages} pages of {self.page_bytes} B")
        if reserve + self._unmet() > len(self._free):
            raise ValueError(f"{model}: reserve of {reserve} pages cannot be honoured now: "
                             f"{len(self._free)} pages free, others' unmet reserves "
                             f"{self._unmet()}")
        self._models[model] = _Owned(fmt, self.pages_per_row, 0, self.num_pages, reserve, cap)
        self._ids[model] = max(self._ids.values(), default=-1) + 1

    def remove_model(self, model: str) -> None:
        m = self._get(model)
        if m.used:
            raise ValueError(f"cannot remove {model!r}: it still holds {m.used} blocks")
        del self._models[model], self._ids[model]

    def layout(self, model: str) -> BlockLayout:
        self._get(model)
        return BlockLayout(self.pages_per_row, self.page_bytes)

    def free_blocks(self, model: str) -> int:
        m = self._get(model)
        n = max(0, len(self._free) - self._unmet(skip=model))
        return n if m.cap is None else min(n, m.cap - m.used)

    def allocate(self, model: str, n: int) -> list[int]:
        m = self._get(model)
        n = as_count(n, "n")
        avail = self.free_blocks(model)
        if n > avail:
            raise OutOfBlocks(f"{model}: asked for {n} pages, {avail} available "
                              f"({len(self._free)} free, others' unmet reserves "
                              f"{self._unmet(skip=model)}, cap {m.cap})")
        out = [heapq.heappop(self._free) for _ in range(n)]
        self._page_owner[out] = self._ids[model]
        m.owned.update(out)
        return out

    def free(self, model: str, handles: Iterable[int]) -> None:
        m = self._get(model)
        hs = _disown(model, m.owned, handles, "page")
        self._page_owner[hs] = -1
        for h in hs:
            heapq.heappush(self._free, h)

    def stats(self, live_tokens: Mapping[str, int] | None = None) -> PoolStats:
        check_live_names(live_tokens, self._models)
        owner = self._page_owner.reshape(self.num_rows, self.pages_per_row)
        used = owner >= 0
        hi = owner.max(axis=1)
        lo = np.where(used, owner, np.iinfo(np.int32).max).min(axis=1)
        single = used.any(axis=1) & (lo == hi)
        rows_of = np.bincount(hi[single], minlength=max(self._ids.values(), default=-1) + 1)
        models, by_owner = {}, {}
        for name, m in self._models.items():
            b = m.fmt.block_bytes
            tokens, live = live_figures(live_tokens, name, b, m.fmt.block_tokens, m.used)
            by_owner[name] = int(rows_of[self._ids[name]])
            models[name] = ModelStats(
                model=name, format=m.fmt.name or str(m.fmt), block_bytes=b,
                slabs=by_owner[name], blocks_used=m.used, blocks_capacity=m.used,
                reserved_bytes=m.used * self.page_bytes,
                padding_bytes=m.used * (self.page_bytes - b), live_tokens=tokens,
                live_bytes=live)
        free_rows = int((~used.any(axis=1)).sum())
        return PoolStats(kind=self.kind, pool_bytes=self.pool_bytes, row_bytes=self.row_bytes,
                         rows_total=self.num_rows, rows_free=free_rows,
                         rows_shared=self.num_rows - free_rows - int(single.sum()),
                         rows_by_owner=by_owner, models=models)

    def __repr__(self):
        return (f"FixedPageAllocator({self.num_pages} pages x {self.page_bytes} B in "
                f"{self.num_rows} rows, models={list(self._models)})")
