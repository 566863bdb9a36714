"""KV Slab: one precision-aware KV pool shared by every model on a device (host side).

Plain Python, no JAX. The device pool is one ``uint8[num_rows, row_bytes]`` array; here a
row is a *slab*. A slab is free (on one shared free list) or owned by one model and carved
into that model's blocks, ``blocks_per_row = slab_bytes // block_bytes`` of them at
``stride = block_bytes``. Block handle ``h`` of a model lives at row ``h // blocks_per_row``,
byte offset ``(h % blocks_per_row) * stride``. When a slab's last block is freed the slab
goes back to the free list, so memory moves between models and precisions: that is what
separate per-model engines (static partitions, ``baselines.py``) cannot do.

Every call costs about O(blocks asked for + models) (one heap operation per touched slab);
nothing scans the pool, since the engine calls this every step.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from fineserve_jax.kvslab.format import BlockFormat
from fineserve_jax.kvslab.stats import (
    ModelStats,
    PoolStats,
    check_live_names,
    live_figures,
)

ROW_ALIGN = 256  # row bytes are a multiple of this (aligned device rows)
ROW_LIMIT = 1 << 31  # row bytes stay below this: int32 byte offsets on the device


class OutOfBlocks(RuntimeError):
    """An allocation that does not fit right now (the caller may wait or preempt)."""


class BlockLayout(NamedTuple):
    blocks_per_row: int  # blocks of this model's format in one row
    stride: int  # bytes between consecutive blocks of a row (>= block_bytes)


class BlockMove(NamedTuple):
    """One block relocated by ``compact_for``: copy its bytes ``src`` -> ``dst``, then use
    handle ``dst`` wherever ``src`` was (page tables). Handles are ``model``'s."""

    model: str
    src: int
    dst: int


@runtime_checkable
class KVAllocator(Protocol):
    """What KV Slab and its two baselines share; the engine and the benchmarks use only this."""

    num_rows: int
    row_bytes: int
    kind: str  # "kvslab" | "static" | "fixed-page"

    @property
    def pool_bytes(self) -> int: ...  # num_rows * row_bytes
    @property
    def models(self) -> tuple[str, ...]: ...
    def add_model(self, model: str, fmt: BlockFormat, *, reserve_blocks: int = 0,
                  cap_blocks: int | None = None) -> None: ...
    def remove_model(self, model: str) -> None: ...
    def fmt(self, model: str) -> BlockFormat: ...
    def layout(self, model: str) -> BlockLayout: ...
    def free_blocks(self, model: str) -> int: ...
    def can_allocate(self, model: str, n: int) -> bool: ...
    def allocate(self, model: str, n: int) -> list[int]: ...
    def free(self, model: str, handles: Iterable[int]) -> None: ...
    def compact_for(self, model: str, n: int) -> list[BlockMove]: ...
    def used_blocks(self, model: str) -> int: ...
    def stats(self, live_tokens: Mapping[str, int] | None = None) -> PoolStats: ...


# ----------------------------------------------------------------- validation helpers
def as_count(v, what: str) -> int:
    """``v`` as an int >= 0 (numpy ints accepted, bools and floats refused)."""
    if isinstance(v, bool):
        raise TypeError(f"{what} must be an int, got {v!r}")
    try:
        v = operator.index(v)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {v!r}") from None
    if v < 0:
        raise ValueError(f"{what} must be >= 0, got {v}")
    return v


def check_model_args(models: Mapping, model, fmt, reserve_blocks, cap_blocks):
    """Common checks of ``add_model``; returns (reserve_blocks, cap_blocks) normalised."""
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a non-empty str, got {model!r}")
    if model in models:
        raise ValueError(f"model {model!r} is already in the pool")
    if not isinstance(fmt, BlockFormat):
        raise TypeError(f"fmt must be a BlockFormat, got {type(fmt).__name__}")
    reserve = as_count(reserve_blocks, "reserve_blocks")
    cap = None if cap_blocks is None else as_count(cap_blocks, "cap_blocks")
    if cap is not None and cap < reserve:
        raise ValueError(f"{model}: cap_blocks={cap} < reserve_blocks={reserve}")
    return reserve, cap


def unknown_model(model, models) -> KeyError:
    return KeyError(f"unknown model {model!r}; the pool has {sorted(models)}")


def handle_list(handles: Iterable[int]) -> list[int]:
    hs = [as_count(h, "block handle") for h in handles]
    if len(set(hs)) != len(hs):
        dup = sorted({h for h in hs if hs.count(h) > 1})
        raise ValueError(f"double free: handles {dup} appear more than once in one call")
    return hs


def check_pool_bytes(pool_bytes) -> int:
    pool_bytes = as_count(pool_bytes, "pool_bytes")
    if pool_bytes < ROW_ALIGN:
        raise ValueError(f"pool_bytes must be at least {ROW_ALIGN}, got {pool_bytes}")
    return pool_bytes


def check_row_bytes(row_bytes, pool_bytes: int, what: str = "slab_bytes") -> int:
    row_bytes = as_count(row_bytes, what)
    if row_bytes == 0 or row_bytes % ROW_ALIGN or row_bytes >= ROW_LIMIT:
        raise ValueError(f"{what} must be a positive multiple of {ROW_ALIGN} below 2**31, "
                         f"got {row_bytes}")
    if row_bytes > pool_bytes:
        raise ValueError(f"{what}={row_bytes} is larger than the pool ({pool_bytes} B)")
    return row_bytes


# ----------------------------------------------------------------------- slab size
def padding_fraction(row_bytes: int, block_bytes: int) -> float:
    """Fraction of a row that can never hold a block of ``block_bytes`` (1.0 if none fits)."""
    return (row_bytes % block_bytes) / row_bytes


def choose_slab_bytes(block_sizes: Iterable[int], pool_bytes: int, max_waste: float = 0.01,
                      min_slabs: int = 8, *, lcm_first: bool = True) -> int:
    """Slab bytes for a pool shared by blocks of ``block_sizes`` bytes.

    1. FineServe's rule: twice the LCM of the block sizes (raised to a multiple of 256 by
       taking its LCM with 256), which every format packs with no padding at all; used when
       it is below 2**31 and the pool still holds ``min_slabs`` slabs of it.
    2. Otherwise (the LCM of awkward sizes quickly reaches gigabytes) search every multiple
       of 256 from the largest block up to ``pool_bytes // min_slabs``. A size's waste is its
       worst padding fraction over the formats, ``max(S % b / S)``. Take the *smallest*
       size whose waste is <= ``max_waste`` (small slabs move between models sooner); if
       none reaches it, the size with the least waste (smallest on ties), and the caller
       sees that waste in the stats.

    ``lcm_first=False`` skips step 1. Smaller slabs trade a bounded padding for memory that
    moves sooner: a slab returns to the free list only when *every* block in it is free.
    Without compaction, the 2x LCM slabs of mixed precisions at Llama-3-8B shapes
    (67-260 MiB) left more reserved memory idle in the host simulation than the 14-40 MiB
    slabs found here; with ``KVSlabAllocator.compact_for`` both sizes run the same
    sequences (docs/benchmarks.md), and the small ones pad 0.6-1.0%.

    Raises ValueError when the pool cannot hold ``min_slabs`` slabs of the largest block.
    """
    sizes = tuple(sorted({as_count(b, "block size") for b in block_sizes}))
    if not sizes or sizes[0] == 0:
        raise ValueError("choose_slab_bytes needs at least one block size, all > 0")
    if not 0 <= max_waste < 1:
        raise ValueError(f"max_waste must be in [0, 1), got {max_waste}")
    if as_count(min_slabs, "min_slabs") < 1:
        raise ValueError("min_slabs must be >= 1")
    return _choose(sizes, check_pool_bytes(pool_bytes), float(max_waste), min_slabs,
                   bool(lcm_first))


@functools.lru_cache(maxsize=128)
def _choose(sizes: tuple[int, ...], pool_bytes: int, max_waste: float, min_slabs: int,
            lcm_first: bool) -> int:
    lcm2 = math.lcm(2 * math.lcm(*sizes), ROW_ALIGN)
    if lcm_first and lcm2 < ROW_LIMIT and pool_bytes // lcm2 >= min_slabs:
        return lcm2
    lo = -(-sizes[-1] // ROW_ALIGN)  # candidates are S = k * 256, k in [lo, hi]
    hi = min(pool_bytes // min_slabs, ROW_LIMIT - 1) // ROW_ALIGN
    if hi < lo:
        raise ValueError(f"a pool of {pool_bytes} B cannot hold {min_slabs} slabs of the "
                         f"largest block ({sizes[-1]} B)")
    best, best_waste = lo * ROW_ALIGN, 2.0
    chunk = 1 << 18
    for start in range(lo, hi + 1, chunk):  # vectorised over candidates, smallest first
        s = np.arange(start, min(start + chunk, hi + 1), dtype=np.int64) * ROW_ALIGN
        waste = np.max([(s % b) / s for b in sizes], axis=0)  # f64[chunk]
        ok = np.flatnonzero(waste <= max_waste)
        if ok.size:
            return int(s[ok[0]])
        i = int(np.argmin(waste))
        if waste[i] < best_waste:
            best, best_waste = int(s[i]), float(waste[i])
    return best


# ------------------------------------------------------------------------ KV Slab
class _Slab:
    """One owned slab: ``used`` blocks out, slots never used yet start at ``fresh``."""

    __slots__ = ("fresh", "recycled", "used")

    def __init__(self):
        self.used = 0
        self.fresh = 0  # slots >= fresh have never been handed out since formatting
        self.recycled: list[int] = []  # freed slots, reused first (LIFO)


class _Model:
    __slots__ = (
        "bpr",
        "by_used",
        "cap",
        "fmt",
        "owned",
        "partial",
        "reserve_blocks",
        "reserve_slabs",
        "slabs",
        "used",
    )

    def __init__(self, fmt: BlockFormat, bpr: int, reserve_blocks: int, cap: int | None):
        self.fmt, self.bpr, self.cap = fmt, bpr, cap
        self.reserve_blocks = reserve_blocks
        self.reserve_slabs = -(-reserve_blocks // bpr)
        self.used = 0
        self.slabs: dict[int, _Slab] = {}  # row -> slab, for rows this model owns
        self.partial: list[tuple[int, int]] = []  # heap of (free blocks, row); lazy: stale
        #                                           entries are skipped when popped
        self.owned: set[int] = set()  # handles out
        # by_used[u]: rows with u blocks out, insertion-ordered (finds sparse slabs for
        # compaction without scanning); rows with 0 blocks are not owned at all.
        self.by_used: list[dict[int, None]] = [{} for _ in range(bpr + 1)]

    def unmet_reserve(self) -> int:
        return max(0, self.reserve_slabs - len(self.slabs))

    def set_used(self, row: int, slab: _Slab, used: int) -> None:
        self.by_used[slab.used].pop(row, None)
        slab.used = used
        if used:
            self.by_used[used][row] = None


class PoolTable:
    """What every allocator shares: the pool's size and the table of its models."""

    num_rows: int
    row_bytes: int
    _models: dict

    @property
    def pool_bytes(self) -> int:
        return self.num_rows * self.row_bytes

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self._models)

    def _get(self, model):
        try:
            return self._models[model]
        except (KeyError, TypeError):
            raise unknown_model(model, self._models) from None

    def fmt(self, model: str) -> BlockFormat:
        return self._get(model).fmt

    def used_blocks(self, model: str) -> int:
        return self._get(model).used

    def can_allocate(self, model: str, n: int) -> bool:
        return as_count(n, "n") <= self.free_blocks(model)

    def compact_for(self, model: str, n: int) -> list[BlockMove]:
        """Pools whose blocks never strand memory have nothing to compact."""
        self._get(model)
        as_count(n, "n")
        return []


class KVSlabAllocator(PoolTable):
    """KV Slab over a pool of ``pool_bytes`` for models whose block formats are ``formats``.

    ``formats`` chooses the slab size (``choose_slab_bytes``); ``add_model`` may still use
    another format, whose padding then shows in ``stats()``. ``slab_bytes`` overrides the
    choice. Blocks come from the model's fullest partial slab first (so that slabs empty and
    return to the others sooner), then from the lowest free slab.

    ``reserve_blocks`` of a model is a floor: other models never take a free slab that
    would leave fewer free slabs than all models' unmet reserves (in slabs). ``cap_blocks``
    is a ceiling on the blocks a model holds.
    """

    kind = "kvslab"

    def __init__(self, pool_bytes: int, formats: Sequence[BlockFormat], *,
                 slab_bytes: int | None = None, max_waste: float = 0.01, min_slabs: int = 8):
        pool_bytes = check_pool_bytes(pool_bytes)
        formats = list(formats)
        if not all(isinstance(f, BlockFormat) for f in formats):
            raise TypeError("formats must be BlockFormat instances")
        if slab_bytes is None:
            if not formats:
                raise ValueError("give formats (to choose the slab size) or slab_bytes")
            slab_bytes = choose_slab_bytes([f.block_bytes for f in formats], pool_bytes,
                                           max_waste, min_slabs)
        self.row_bytes = check_row_bytes(slab_bytes, pool_bytes)
        self.num_rows = pool_bytes // self.row_bytes
        self._free_rows = list(range(self.num_rows))  # heap: lowest row first
        self._owner: list[str | None] = [None] * self.num_rows  # row -> model
        self._models: dict[str, _Model] = {}
        self.moves_total = 0  # blocks relocated by compact_for, since construction
        self.bytes_moved = 0

    @property
    def slab_bytes(self) -> int:
        return self.row_bytes

    # ---------------------------------------------------------------- models
    def add_model(self, model: str, fmt: BlockFormat, *, reserve_blocks: int = 0,
                  cap_blocks: int | None = None) -> None:
        reserve, cap = check_model_args(self._models, model, fmt, reserve_blocks, cap_blocks)
        bpr = self.row_bytes // fmt.block_bytes
        if bpr == 0:
            raise ValueError(f"{model}: a {fmt.block_bytes} B block does not fit in a "
                             f"{self.row_bytes} B slab")
        m = _Model(fmt, bpr, reserve, cap)
        need = m.reserve_slabs + sum(o.reserve_slabs for o in self._models.values())
        if need > self.num_rows:
            raise ValueError(f"{model}: reserves of all models need {need} slabs "
                             f"({m.reserve_slabs} for {reserve} blocks of {model}); the pool "
                             f"has {self.num_rows} slabs of {self.row_bytes} B")
        unmet = m.reserve_slabs + sum(o.unmet_reserve() for o in self._models.values())
        if unmet > len(self._free_rows):
            raise ValueError(f"{model}: reserve of {m.reserve_slabs} slabs cannot be honoured "
                             f"now: {len(self._free_rows)} slabs free, {unmet} needed for the "
                             f"unmet reserves; other models hold the rest")
        self._models[model] = m

    def remove_model(self, model: str) -> None:
        m = self._get(model)
        if m.used:
            raise ValueError(f"cannot remove {model!r}: it still holds {m.used} blocks")
        del self._models[model]  # it owns no slab: an emptied slab is returned at once

    def layout(self, model: str) -> BlockLayout:
        m = self._get(model)
        return BlockLayout(m.bpr, m.fmt.block_bytes)

    def max_blocks(self, model: str) -> int:
        """Most blocks ``model`` could ever hold at once: every slab but the other
        models' reserves (within its cap), with nothing else allocated."""
        m = self._get(model)
        others = sum(o.reserve_slabs for k, o in self._models.items() if k != model)
        n = m.bpr * max(0, self.num_rows - others)
        return n if m.cap is None else min(n, m.cap)

    # ---------------------------------------------------------------- blocks
    def _takeable_rows(self, model: str) -> int:
        """Free slabs ``model`` may take: all but the others' unmet reserves."""
        others = sum(o.unmet_reserve() for k, o in self._models.items() if k != model)
        return max(0, len(self._free_rows) - others)

    def free_blocks(self, model: str) -> int:
        m = self._get(model)
        n = len(m.slabs) * m.bpr - m.used + self._takeable_rows(model) * m.bpr
        return n if m.cap is None else min(n, m.cap - m.used)

    def allocate(self, model: str, n: int) -> list[int]:
        m = self._get(model)
        n = as_count(n, "n")
        avail = self.free_blocks(model)
        if n > avail:
            capped = m.cap is not None and m.cap - m.used == avail
            why = (f"its cap of {m.cap} blocks" if capped else
                   f"{len(self._free_rows)} free slabs, others' unmet reserves "
                   f"{len(self._free_rows) - self._takeable_rows(model)}")
            raise OutOfBlocks(f"{model}: asked for {n} blocks, {avail} available ({why})")
        out: list[int] = []
        while len(out) < n:
            row = self._fullest_partial(m)
            if row is None:  # format the lowest free slab for this model
                row = heapq.heappop(self._free_rows)
                self._owner[row] = model
                m.slabs[row] = _Slab()
            slab, base = m.slabs[row], row * m.bpr
            take = min(n - len(out), m.bpr - slab.used)
            for _ in range(take):
                if slab.recycled:
                    out.append(base + slab.recycled.pop())
                else:
                    out.append(base + slab.fresh)
                    slab.fresh += 1
            m.set_used(row, slab, slab.used + take)
            if slab.used < m.bpr:
                heapq.heappush(m.partial, (m.bpr - slab.used, row))
        m.used += n
        m.owned.update(out)
        return out

    def _fullest_partial(self, m: _Model) -> int | None:
        while m.partial:
            free, row = heapq.heappop(m.partial)
            slab = m.slabs.get(row)
            if slab is not None and m.bpr - slab.used == free:
                return row  # entries that no longer match the slab are stale: dropped
        return None

    def free(self, model: str, handles: Iterable[int]) -> None:
        m = self._get(model)
        hs = handle_list(handles)
        for h in hs:  # check all before changing anything: all-or-nothing
            if h not in m.owned:
                row = h // m.bpr
                owner = self._owner[row] if row < self.num_rows else None
                where = (f"row {row} belongs to {owner!r}" if owner not in (None, model)
                         else "it is not allocated (double free?)")
                raise ValueError(f"{model}: cannot free handle {h}: {where}")
        for h in hs:
            row, slot = divmod(h, m.bpr)
            slab = m.slabs[row]
            m.set_used(row, slab, slab.used - 1)
            slab.recycled.append(slot)
            if slab.used == 0:  # back to the shared free list, for any model and format
                del m.slabs[row]
                self._owner[row] = None
                heapq.heappush(self._free_rows, row)
            else:
                heapq.heappush(m.partial, (m.bpr - slab.used, row))
        m.owned.difference_update(hs)
        m.used -= len(hs)
        if len(m.partial) > 4 * len(m.slabs) + 64:  # drop stale heap entries now and then
            m.partial = [(m.bpr - s.used, r) for r, s in m.slabs.items() if s.used < m.bpr]
            heapq.heapify(m.partial)

    # ------------------------------------------------------------- compaction
    def reclaimable_rows(self, model: str) -> int:
        """Slabs that ``compact_for`` could free for ``model``: over the other models, the
        slabs each holds beyond what its blocks (and its reserve) fill when packed."""
        self._get(model)
        return sum(self._reclaimable(o) for k, o in self._models.items() if k != model)

    @staticmethod
    def _reclaimable(o: _Model) -> int:
        return max(0, len(o.slabs) - max(-(-o.used // o.bpr), o.reserve_slabs))

    def compact_for(self, model: str, n: int) -> list[BlockMove]:
        """Make ``n`` blocks allocatable for ``model`` by packing other models' blocks.

        A slab only returns to the free list when its last block is freed, so a model whose
        sequences finish unevenly can hold many sparse slabs that another model is short of.
        This moves the blocks of the sparsest such slabs (fewest bytes to copy first) into
        free slots of their owner's other slabs, until enough slabs are free; the emptied
        slabs go back to the free list. No model drops below its reserve.

        Returns the moves, already applied to this allocator's bookkeeping; the caller must
        copy each block's bytes ``src -> dst`` on the device (sources and destinations are
        disjoint, so all copies may read before any writes) and replace ``src`` by ``dst``
        in its page tables before the next step. Returns ``[]``, changing nothing, when
        ``n`` blocks are already allocatable or when packing cannot free enough slabs.
        """
        m = self._get(model)
        n = as_count(n, "n")
        avail = self.free_blocks(model)
        if n <= avail or (m.cap is not None and m.used + n > m.cap):
            return []
        rows_needed = -(-(n - avail) // m.bpr)
        if self.reclaimable_rows(model) < rows_needed:
            return []
        # Candidate sources: per model its sparsest slabs, at most its reclaimable count;
        # across models the cheapest copies first.
        cands = [self._sparsest(name, o) for name, o in self._models.items() if name != model]
        sources: dict[str, list[int]] = {}
        for _, name, r in itertools.islice(heapq.merge(*cands), rows_needed):
            sources.setdefault(name, []).append(r)
        moves: list[BlockMove] = []
        for name, rows in sources.items():
            moves += self._pack(name, self._models[name], set(rows))
        self.moves_total += len(moves)
        self.bytes_moved += sum(self._models[mv.model].fmt.block_bytes for mv in moves)
        return moves

    def _sparsest(self, name: str, o: _Model):
        """(bytes to copy, name, row) for ``o``'s reclaimable sparsest slabs, cheapest first."""
        k = self._reclaimable(o)
        for u in range(1, o.bpr + 1):
            for r in o.by_used[u]:
                if k == 0:
                    return
                yield u * o.fmt.block_bytes, name, r
                k -= 1

    def _pack(self, name: str, o: _Model, rows: set[int]) -> list[BlockMove]:
        """Move every block of ``o``'s slabs ``rows`` into its other slabs; free ``rows``."""
        srcs = []
        for r in sorted(rows):
            slab = o.slabs[r]
            free = set(slab.recycled)
            srcs += [r * o.bpr + i for i in range(slab.fresh) if i not in free]
        dests, room = [], 0  # fullest receivers first, just enough of them
        for u in range(o.bpr - 1, 0, -1):
            for r in o.by_used[u]:
                if room >= len(srcs):
                    break
                if r not in rows:
                    dests.append(r)
                    room += o.bpr - u
        moves, it = [], iter(srcs)
        for r in dests:
            slab, base = o.slabs[r], r * o.bpr
            while slab.used < o.bpr:
                src = next(it, None)
                if src is None:
                    break
                if slab.recycled:
                    dst = base + slab.recycled.pop()
                else:
                    dst = base + slab.fresh
                    slab.fresh += 1
                o.set_used(r, slab, slab.used + 1)
                moves.append(BlockMove(name, src, dst))
            if slab.used < o.bpr:
                heapq.heappush(o.partial, (o.bpr - slab.used, r))
            if len(moves) == len(srcs):
                break
        assert len(moves) == len(srcs), "compaction sources exceed the receivers' room"
        o.owned.difference_update(mv.src for mv in moves)
        o.owned.update(mv.dst for mv in moves)
        for r in rows:
            o.by_used[o.slabs[r].used].pop(r)
            del o.slabs[r]
            self._owner[r] = None
            heapq.heappush(self._free_rows, r)
        return moves

    # ---------------------------------------------------------------- report
    def stats(self, live_tokens: Mapping[str, int] | None = None) -> PoolStats:
        check_live_names(live_tokens, self._models)
        models = {}
        for name, m in self._models.items():
            b = m.fmt.block_bytes
            tokens, live = live_figures(live_tokens, name, b, m.fmt.block_tokens, m.used)
            rows = len(m.slabs)
            models[name] = ModelStats(
                model=name, format=m.fmt.name or str(m.fmt), block_bytes=b, slabs=rows,
                blocks_used=m.used, blocks_capacity=rows * m.bpr,
                reserved_bytes=rows * self.row_bytes,
                padding_bytes=rows * (self.row_bytes - m.bpr * b),
                live_tokens=tokens, live_bytes=live)
        return PoolStats(kind=self.kind, pool_bytes=self.pool_bytes, row_bytes=self.row_bytes,
                         rows_total=self.num_rows, rows_free=len(self._free_rows),
                         rows_by_owner={k: len(m.slabs) for k, m in self._models.items()},
                         models=models)

    def __repr__(self):
        return (f"KVSlabAllocator({self.num_rows} slabs x {self.row_bytes} B, "
                f"models={list(self._models)})")
