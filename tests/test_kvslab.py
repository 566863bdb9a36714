"""KV Slab and its two baselines: random op sequences, slab sizes, reserves, errors.

Host only (no JAX). Every allocator is driven through the shared ``KVAllocator`` verbs and
checked against the physical model the device side relies on: a block with handle ``h``
occupies bytes ``[off, off + block_bytes)`` of row ``h // blocks_per_row``, with
``off = (h % blocks_per_row) * stride``; live blocks never overlap and stay inside the row.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from fineserve_jax import kvslab
from fineserve_jax.kvslab import (
    BlockFormat,
    FixedPageAllocator,
    KVAllocator,
    KVSlabAllocator,
    OutOfBlocks,
    StaticPartitionAllocator,
    choose_slab_bytes,
    padding_fraction,
)

GIB = 1 << 30
# Tiny formats for the random tests: 256, 160 and 96 B blocks (bf16, fp8 + bf16 scale,
# int4 + bf16 scale at 2 layers, 1 KV head, head dim 8, 4 tokens per block).
TINY = {"A": BlockFormat(2, 1, 8, 4, 2, name="bf16"),
        "B": BlockFormat(2, 1, 8, 4, 1, 2, name="fp8"),
        "C": BlockFormat(2, 1, 8, 4, 0.5, 2, name="int4")}
TINY_POOL = 24 * 7680  # 2 x LCM(256, 160, 96) = 7680 B slabs: 24 of them


def llama3_8b(value_bytes, scale_bytes=0, name=""):
    """Llama-3-8B KV blocks: 32 layers, 8 KV heads, head dim 128, 16 tokens per block.

    Scales are bf16 (2 bytes) per token and KV head, for K and for V: FP8 and INT4 KV keep
    one scale per token-head, and bf16 is the dtype the dequantised values are used in.
    """
    return BlockFormat(32, 8, 128, 16, value_bytes, scale_bytes, name=name)


BF16, FP8, INT4 = llama3_8b(2, 0, "bf16"), llama3_8b(1, 2, "fp8"), llama3_8b(0.5, 2, "int4")
FP8_NOSCALE = llama3_8b(1, 0, "fp8")


def make(kind: str, pool: int = TINY_POOL, formats=None, models="ABC"):
    formats = list(TINY.values()) if formats is None else formats
    if kind == "kvslab":
        return KVSlabAllocator(pool, formats)
    if kind == "static":
        return StaticPartitionAllocator(pool, formats, partitions=list(models))
    return FixedPageAllocator(pool, formats)


KINDS = ("kvslab", "static", "fixed-page")


# ----------------------------------------------------------------- shared checks
def check_physical(alloc, live: dict[str, set[int]]):
    """No two live blocks share a byte; each lies inside its row; handles are in range."""
    by_row: dict[int, list[tuple[int, int, str]]] = {}
    for model, handles in live.items():
        lay, b = alloc.layout(model), alloc.fmt(model).block_bytes
        assert b <= lay.stride
        for h in handles:
            assert 0 <= h < alloc.num_rows * lay.blocks_per_row
            row, off = h // lay.blocks_per_row, (h % lay.blocks_per_row) * lay.stride
            assert off + b <= alloc.row_bytes
            by_row.setdefault(row, []).append((off, off + b, model))
    for spans in by_row.values():
        spans.sort()
        for (_, end, _), (start, _, _) in itertools.pairwise(spans):
            assert end <= start, "two live blocks overlap"
        if alloc.kind != "fixed-page":  # a slab or partition row holds one model's blocks
            assert len({m for _, _, m in spans}) == 1


def check_stats(alloc, live: dict[str, set[int]]):
    st_ = alloc.stats()
    assert sum(st_.rows_by_owner.values()) + st_.rows_shared + st_.rows_free == st_.rows_total
    assert st_.rows_total == alloc.num_rows and st_.pool_bytes == alloc.pool_bytes
    assert st_.pool_bytes == alloc.num_rows * alloc.row_bytes
    assert alloc.row_bytes % 256 == 0 and alloc.row_bytes < 2**31
    for m, handles in live.items():
        ms = st_.models[m]
        assert ms.blocks_used == len(handles) == alloc.used_blocks(m) <= ms.blocks_capacity
        assert ms.live_bytes == len(handles) * alloc.fmt(m).block_bytes
    assert 0 <= st_.fragmentation <= 1
    json.dumps(st_.to_dict())  # JSON-safe
    return st_


def check_free_blocks_exact(alloc, model):
    """``free_blocks`` is exactly what one ``allocate`` can take right now."""
    n = alloc.free_blocks(model)
    with pytest.raises(OutOfBlocks):
        alloc.allocate(model, n + 1)
    alloc.free(model, alloc.allocate(model, n))
    assert alloc.free_blocks(model) == n


# ---------------------------------------------------------- random op sequences
class AllocatorMachine(RuleBasedStateMachine):
    kind = "kvslab"

    @initialize(reserves=st.lists(st.integers(0, 12), min_size=3, max_size=3),
                caps=st.lists(st.one_of(st.none(), st.integers(12, 200)), min_size=3, max_size=3))
    def setup(self, reserves, caps):
        self.alloc = make(self.kind)
        self.live: dict[str, set[int]] = {}
        self.reserve = {}
        # A byte image of the device pool: every live block is filled with its own tag, so
        # overlapping blocks or a wrong compaction copy show up as changed bytes.
        self.mem = np.zeros(self.alloc.pool_bytes, np.uint8)
        self.tag: dict[tuple[str, int], int] = {}
        self.next_tag = 1
        for (name, fmt), r, c in zip(TINY.items(), reserves, caps):
            self.alloc.add_model(name, fmt, reserve_blocks=r, cap_blocks=c)
            self.live[name], self.reserve[name] = set(), (r, c)

    @rule(model=st.sampled_from("ABC"), n=st.integers(0, 40))
    def allocate(self, model, n):
        avail = self.alloc.free_blocks(model)
        if n > avail:
            with pytest.raises(OutOfBlocks):
                self.alloc.allocate(model, n)
            assert self.alloc.free_blocks(model) == avail  # nothing changed
            return
        hs = self.alloc.allocate(model, n)
        assert len(hs) == len(set(hs)) == n
        assert not self.live[model] & set(hs)  # never handed out twice while live (handles
        #                                        are per model: the byte check covers others)
        self.live[model] |= set(hs)
        for h in hs:
            self.tag[model, h] = self.next_tag
            self.mem[self.span(model, h)] = self.pattern(model, self.next_tag)
            self.next_tag += 1

    def span(self, model, h) -> slice:
        lay, b = self.alloc.layout(model), self.alloc.fmt(model).block_bytes
        start = (h // lay.blocks_per_row) * self.alloc.row_bytes + \
            (h % lay.blocks_per_row) * lay.stride
        return slice(start, start + b)

    def pattern(self, model, tag) -> np.ndarray:
        b = self.alloc.fmt(model).block_bytes
        return np.resize(np.frombuffer(tag.to_bytes(4, "little"), np.uint8), b)

    @rule(model=st.sampled_from("ABC"), keep=st.floats(0, 1), data=st.data())
    def fill_then_thin(self, model, keep, data):
        """Take everything this model may get, then free a random share of its blocks: the
        sparse slabs compaction exists for."""
        self.allocate(model, min(self.alloc.free_blocks(model), 300))
        live = sorted(self.live[model])
        drop = data.draw(st.permutations(live))[:round(len(live) * (1 - keep))]
        self._free(model, drop)

    @rule(model=st.sampled_from("ABC"), extra=st.integers(-2, 90))
    def compact(self, model, extra):
        avail = self.alloc.free_blocks(model)
        n = max(0, avail + extra)
        used = {m: self.alloc.used_blocks(m) for m in self.live}
        moves = self.alloc.compact_for(model, n)
        if n <= avail:
            assert moves == []
        if not moves:
            assert self.alloc.free_blocks(model) == avail  # nothing changed
            return
        assert self.kind == "kvslab" and self.alloc.can_allocate(model, n)
        assert {m: self.alloc.used_blocks(m) for m in self.live} == used
        srcs = [(mv.model, mv.src) for mv in moves]
        dsts = [(mv.model, mv.dst) for mv in moves]
        assert len(set(srcs)) == len(srcs) and len(set(dsts)) == len(dsts)
        assert not set(srcs) & set(dsts)  # one gather then one scatter is a correct copy
        data = [self.mem[self.span(m, h)].copy() for m, h in srcs]  # read all, then write
        for mv, d in zip(moves, data):
            assert mv.model != model and mv.src in self.live[mv.model]
            assert mv.dst not in self.live[mv.model]
            self.mem[self.span(mv.model, mv.dst)] = d
        for mv in moves:
            self.live[mv.model].remove(mv.src)
            self.tag[mv.model, mv.dst] = self.tag.pop((mv.model, mv.src))
        for mv in moves:
            self.live[mv.model].add(mv.dst)

    @rule(model=st.sampled_from("ABC"), data=st.data())
    def free_some(self, model, data):
        if not self.live[model]:
            return
        hs = data.draw(st.lists(st.sampled_from(sorted(self.live[model])), unique=True,
                                min_size=1))
        self._free(model, hs)

    def _free(self, model, hs):
        self.alloc.free(model, hs)
        self.live[model] -= set(hs)
        for h in hs:
            del self.tag[model, h]

    @rule(model=st.sampled_from("ABC"), other=st.sampled_from("ABC"))
    def bad_free_changes_nothing(self, model, other):
        before = {m: self.alloc.used_blocks(m) for m in self.live}
        # handle numbers are per model: "foreign" is one of other's that model does not own
        foreign = sorted(self.live[other] - self.live[model])[:1] if other != model else []
        mine = sorted(self.live[model])[:1]
        with pytest.raises(ValueError):  # a foreign handle, or a repeat, next to a good one
            self.alloc.free(model, mine + (foreign or mine or [10**9]))
        assert before == {m: self.alloc.used_blocks(m) for m in self.live}

    @rule(model=st.sampled_from("ABC"))
    def free_blocks_is_exact(self, model):
        check_free_blocks_exact(self.alloc, model)

    @invariant()
    def consistent(self):
        if not hasattr(self, "alloc"):
            return
        check_physical(self.alloc, self.live)
        for (m, h), tag in self.tag.items():  # every live block still holds its own bytes
            assert np.array_equal(self.mem[self.span(m, h)], self.pattern(m, tag))
        st_ = check_stats(self.alloc, self.live)
        for m, (r, c) in self.reserve.items():
            used = len(self.live[m])
            if c is not None:
                assert used <= c
            assert self.alloc.free_blocks(m) >= min(r, c or r) - used  # reserve honoured
        if self.kind == "kvslab":  # free slabs cover every model's unmet reserve
            unmet = sum(max(0, math.ceil(r / self.alloc.layout(m).blocks_per_row)
                            - st_.rows_by_owner[m]) for m, (r, _) in self.reserve.items())
            assert st_.rows_free >= unmet

    def teardown(self):
        if not hasattr(self, "alloc"):
            return
        for m, hs in self.live.items():
            self.alloc.free(m, sorted(hs))
            assert self.alloc.used_blocks(m) == 0
        st_ = self.alloc.stats()
        if self.kind == "static":  # partitions stay reserved, empty
            assert st_.reserved_bytes == sum(st_.rows_by_owner.values()) * self.alloc.row_bytes
        else:
            assert st_.rows_free == self.alloc.num_rows and st_.reserved_bytes == 0
        for m in list(self.live):
            self.alloc.remove_model(m)
        assert self.alloc.models == ()


_SETTINGS = settings(max_examples=60, stateful_step_count=30, derandomize=True, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])


class KVSlabMachine(AllocatorMachine):
    kind = "kvslab"


class StaticMachine(AllocatorMachine):
    kind = "static"


class FixedPageMachine(AllocatorMachine):
    kind = "fixed-page"


TestKVSlabOps = KVSlabMachine.TestCase
TestStaticOps = StaticMachine.TestCase
TestFixedPageOps = FixedPageMachine.TestCase
for _case in (TestKVSlabOps, TestStaticOps, TestFixedPageOps):
    _case.settings = _SETTINGS
del _case


def test_all_three_implement_the_protocol():
    for kind in KINDS:
        a = make(kind)
        assert isinstance(a, KVAllocator) and a.kind == kind
        assert a.pool_bytes == a.num_rows * a.row_bytes <= TINY_POOL


# ------------------------------------------------------------------- slab size
def test_llama3_8b_block_sizes():
    assert BF16.block_bytes == 2 * 2**20  # 32 layers x 2 (K, V) x 16 tokens x 8 x 128 x 2 B
    assert FP8.block_bytes == 32 * 2 * 16 * (8 * 128 + 8 * 2)
    assert INT4.block_bytes == 32 * 2 * 16 * (8 * 64 + 8 * 2)


def test_twice_lcm_when_it_fits():
    s = choose_slab_bytes([BF16.block_bytes, FP8_NOSCALE.block_bytes], 40 * GIB)
    assert s == 2 * math.lcm(BF16.block_bytes, FP8_NOSCALE.block_bytes) == 4 * 2**20
    a = KVSlabAllocator(40 * GIB, [BF16, FP8_NOSCALE])
    a.add_model("bf16", BF16)
    a.add_model("fp8", FP8_NOSCALE)
    assert a.slab_bytes == s and a.num_rows == 10240
    assert a.layout("bf16") == (2, BF16.block_bytes) and a.layout("fp8") == (4, 2**20)
    a.allocate("bf16", 1), a.allocate("fp8", 1)
    assert a.stats().padding_bytes == 0
    # a 256-multiple is kept: 2 x LCM of 96 B and 160 B blocks is 960, raised to 3840
    assert choose_slab_bytes([96, 160], 3840 * 8) == 3840


@pytest.mark.parametrize("pool_gib", [16, 40, 60])
def test_three_precisions_pack_within_one_percent(pool_gib):
    sizes = [BF16.block_bytes, FP8.block_bytes, INT4.block_bytes]
    assert (pool_gib * GIB) // (2 * math.lcm(*sizes)) < 8  # 2 x LCM is ~9 GB: searched
    s = choose_slab_bytes(sizes, pool_gib * GIB)
    assert s % 256 == 0 and (pool_gib * GIB) // s >= 8
    assert max(padding_fraction(s, b) for b in sizes) <= 0.01
    a = KVSlabAllocator(pool_gib * GIB, [BF16, FP8, INT4])
    for fmt in (BF16, FP8, INT4):
        a.add_model(fmt.name, fmt)
        a.allocate(fmt.name, 1)
    st_ = a.stats()
    assert st_.padding_bytes / st_.reserved_bytes < 0.01
    assert st_.models["bf16"].padding_bytes == 0  # 40 MiB holds 20 bf16 blocks exactly


def test_smaller_slabs_without_the_lcm_rule():
    sizes = [BF16.block_bytes, FP8.block_bytes]
    lcm2 = choose_slab_bytes(sizes, 40 * GIB)
    small = choose_slab_bytes(sizes, 40 * GIB, lcm_first=False)
    assert lcm2 == 2 * math.lcm(*sizes) and small < lcm2 / 4
    assert max(padding_fraction(small, b) for b in sizes) <= 0.01
    for s in range(256, small, 256 * 97):  # spot check: nothing smaller meets 1%
        assert max(padding_fraction(s, b) for b in sizes) > 0.01


def test_best_effort_when_max_waste_cannot_be_met():
    # 1000 B and 1536 B blocks in a pool allowing slabs up to 4096 B: no size wastes <= 1%
    s = choose_slab_bytes([1000, 1536], 8 * 4096, max_waste=0.01)
    cands = range(1536, 4097, 256)
    best = min(max(c % 1000 / c, c % 1536 / c) for c in cands)
    assert max(s % 1000 / s, s % 1536 / s) == best > 0.01
    a = KVSlabAllocator(8 * 4096, [BlockFormat(1, 1, 125, 1, 4), BlockFormat(1, 1, 192, 1, 4)])
    assert a.slab_bytes == s  # 1000 B and 1536 B blocks
    a.add_model("x", BlockFormat(1, 1, 125, 1, 4))
    a.allocate("x", 1)
    assert a.stats().models["x"].padding_bytes == s % 1000 > 0  # the waste is reported


def test_slab_size_validation():
    with pytest.raises(ValueError, match="multiple of 256"):
        KVSlabAllocator(GIB, [BF16], slab_bytes=3 * 2**20 + 1)
    with pytest.raises(ValueError, match="2\\*\\*31"):
        KVSlabAllocator(8 * GIB, [BF16], slab_bytes=2**31)
    with pytest.raises(ValueError, match="cannot hold 8 slabs"):
        choose_slab_bytes([BF16.block_bytes], 8 * BF16.block_bytes - 1, lcm_first=False)
    with pytest.raises(ValueError, match="does not fit"):
        KVSlabAllocator(GIB, [FP8_NOSCALE], slab_bytes=2**20).add_model("bf16", BF16)


# ------------------------------------------------------------------ compaction
def sparse_b(reserve_b=0):
    """b (4 fp8 blocks per slab) fills the pool, then keeps 2 blocks in each slab."""
    a = two_models(reserve_b=reserve_b)
    hb = a.allocate("b", a.free_blocks("b"))  # 16 slabs x 4
    keep = [h for h in hb if h % 4 < 2]
    a.free("b", [h for h in hb if h % 4 >= 2])
    return a, keep


def test_compaction_packs_sparse_slabs_for_another_model():
    a, kept = sparse_b()
    assert a.stats().rows_by_owner == {"a": 0, "b": 16} and a.free_blocks("a") == 0
    assert a.reclaimable_rows("a") == 8  # 32 blocks fit 8 slabs
    assert a.compact_for("a", 0) == [] and a.compact_for("b", 1) == []  # nothing to do
    moves = a.compact_for("a", 5)  # 5 bf16 blocks: 3 slabs
    assert a.can_allocate("a", 5) and a.stats().rows_free == 3
    assert len(moves) == 3 * 2 and {mv.model for mv in moves} == {"b"}
    src_rows = {mv.src // 4 for mv in moves}
    assert len(src_rows) == 3 and not src_rows & {mv.dst // 4 for mv in moves}
    live = (set(kept) - {mv.src for mv in moves}) | {mv.dst for mv in moves}
    assert len(live) == len(kept) and a.used_blocks("b") == 32
    check_physical(a, {"a": set(a.allocate("a", 5)), "b": live})
    assert a.bytes_moved == 6 * FP8_NOSCALE.block_bytes and a.moves_total == 6
    assert a.compact_for("a", a.free_blocks("a") + 2 * 5 + 1) == []  # 5 more slabs: no
    a.free("b", sorted(live))
    assert a.stats().rows_by_owner == {"a": 3, "b": 0}


def test_compaction_keeps_reserves_and_caps():
    a, _ = sparse_b(reserve_b=4 * 14)  # b may not drop below 14 slabs
    assert a.reclaimable_rows("a") == 2
    assert a.compact_for("a", 2 * 3) == []  # 3 slabs: more than b can give
    assert len(a.compact_for("a", 2 * 2)) == 4 and a.stats().rows_by_owner["b"] == 14
    c = two_models(cap_a=1)
    c.free("b", [h for h in c.allocate("b", c.free_blocks("b")) if h % 4])
    assert c.compact_for("a", 2) == []  # over a's cap: compaction cannot help


def test_baselines_never_move_blocks():
    for alloc in (two_models("static"), FixedPageAllocator(64 * 2**20, [BF16, FP8_NOSCALE])):
        if alloc.kind == "fixed-page":
            alloc.add_model("a", BF16)
            alloc.add_model("b", FP8_NOSCALE)
        alloc.allocate("b", alloc.free_blocks("b"))
        assert alloc.compact_for("a", 1) == []
        with pytest.raises(KeyError):
            alloc.compact_for("zz", 1)


# ----------------------------------------------------------- reserves and caps
def two_models(kind="kvslab", reserve_b=0, cap_a=None, pool=64 * 2**20):
    """Pool of 64 MiB: 16 slabs of 4 MiB (two bf16 or four unscaled-fp8 blocks each)."""
    a = (KVSlabAllocator(pool, [BF16, FP8_NOSCALE]) if kind == "kvslab"
         else StaticPartitionAllocator(pool, [BF16, FP8_NOSCALE], partitions=["a", "b"]))
    a.add_model("a", BF16, cap_blocks=cap_a)
    a.add_model("b", FP8_NOSCALE, reserve_blocks=reserve_b)
    return a


def test_idle_model_memory_moves_to_the_busy_one():
    a = two_models(reserve_b=10)  # b's reserve: ceil(10 / 4) = 3 slabs
    assert a.free_blocks("a") == (16 - 3) * 2
    ha = a.allocate("a", a.free_blocks("a"))
    assert a.free_blocks("a") == 0 and a.free_blocks("b") == 12  # b keeps its 3 slabs
    hb = a.allocate("b", 12)
    assert a.stats().rows_free == 0
    a.free("a", ha)  # a goes idle: its slabs go back, and b can take all of them
    assert a.stats().rows_by_owner == {"a": 0, "b": 3}
    assert a.free_blocks("b") == 13 * 4
    a.free("b", hb)
    assert a.stats().rows_free == 16
    static = two_models("static", reserve_b=10)  # the baseline: a stays at half the pool
    assert static.free_blocks("a") == 8 * 2 and static.free_blocks("b") == 8 * 4


def test_reserve_is_the_models_own_even_when_others_are_busy():
    a = two_models(reserve_b=10)
    a.allocate("a", 26)
    with pytest.raises(OutOfBlocks, match="unmet reserves 3"):
        a.allocate("a", 1)
    a.allocate("b", 12)  # exactly its reserve's slabs
    with pytest.raises(OutOfBlocks):
        a.allocate("b", 1)


def test_cap():
    a = two_models(cap_a=5)
    assert a.free_blocks("a") == 5
    a.allocate("a", 3)
    assert a.free_blocks("a") == 2 and not a.can_allocate("a", 3)
    with pytest.raises(OutOfBlocks, match="cap of 5"):
        a.allocate("a", 3)
    a.allocate("a", 2)


def test_fullest_partial_slab_first_and_lowest_free_slab():
    a = two_models()
    h = a.allocate("b", 6)  # slab 0 full (4 blocks), slab 1 half
    assert [x // 4 for x in h] == [0, 0, 0, 0, 1, 1]
    a.free("b", [h[0]])  # slab 0 has 1 free, slab 1 has 2 free: slab 0 is the fuller one
    assert a.allocate("b", 1)[0] // 4 == 0
    assert a.allocate("a", 1) == [2 * 2]  # a formats the lowest free slab, 2


def test_fixed_page_pads_small_blocks():
    a = FixedPageAllocator(64 * 2**20, [BF16, INT4])
    a.add_model("bf16", BF16)
    a.add_model("int4", INT4)
    assert a.page_bytes == BF16.block_bytes and a.layout("int4").stride == a.page_bytes
    a.allocate("int4", 4)
    st_ = a.stats()
    assert st_.padding_bytes == 4 * (BF16.block_bytes - INT4.block_bytes)
    assert st_.models["int4"].reserved_bytes == 4 * a.page_bytes


# ------------------------------------------------------------------- errors
def test_errors_name_the_problem():
    a = two_models()
    ha, hb = a.allocate("a", 2), a.allocate("b", 1)
    with pytest.raises(KeyError, match="unknown model 'c'"):
        a.allocate("c", 1)
    with pytest.raises(ValueError, match="row 0 belongs to 'a'"):
        a.free("b", [ha[0] * 2])  # b's handle space: slab 0 is a's
    a.free("a", ha)
    with pytest.raises(ValueError, match="double free"):
        a.free("a", ha)
    with pytest.raises(ValueError, match="more than once"):
        a.free("b", hb + hb)
    assert a.used_blocks("b") == 1  # the failed frees changed nothing
    with pytest.raises(ValueError, match="still holds 1 blocks"):
        a.remove_model("b")
    with pytest.raises(ValueError, match="reserves of all models need"):
        a.add_model("big", BF16, reserve_blocks=33)
    with pytest.raises(ValueError, match="already in the pool"):
        a.add_model("a", BF16)
    with pytest.raises(TypeError):
        a.allocate("a", 1.0)
    with pytest.raises(TypeError):
        a.allocate("a", True)
    with pytest.raises(ValueError, match=">= 0"):
        a.allocate("a", -1)
    with pytest.raises(ValueError, match="cap_blocks=1 < reserve_blocks=2"):
        a.add_model("c", BF16, reserve_blocks=2, cap_blocks=1)
    with pytest.raises(ValueError, match="unknown models"):
        a.stats({"zz": 1})
    with pytest.raises(ValueError, match="does not fit in its 1 used blocks"):
        a.stats({"b": 17})
    with pytest.raises(ValueError, match="no partition"):
        StaticPartitionAllocator(GIB, [BF16], partitions=["x"]).add_model("y", BF16)
    with pytest.raises(ValueError, match="sum to"):
        StaticPartitionAllocator(GIB, [BF16], partitions={"x": 0.7, "y": 0.4})


def test_reserve_that_cannot_be_honoured_now():
    a = two_models()
    a.allocate("a", 30)  # 15 of 16 slabs
    with pytest.raises(ValueError, match="cannot be honoured now"):
        a.add_model("c", FP8_NOSCALE, reserve_blocks=5)


def test_live_tokens_drive_fragmentation():
    a = two_models()
    a.allocate("a", 2)  # one 4 MiB slab
    assert a.stats().fragmentation == 0  # no token counts: used blocks count as full
    st_ = a.stats({"a": 20})  # 20 of 32 token slots live
    assert st_.models["a"].live_bytes == 20 * BF16.token_bytes
    assert st_.fragmentation == pytest.approx(12 * BF16.token_bytes / a.pool_bytes)
    assert "a (bf16" in st_.summary() and "20 live tokens" in repr(st_)


# ----------------------------------------------------------------- no JAX
def test_kvslab_modules_do_not_import_jax():
    """``fineserve_jax/__init__`` imports the engine (and JAX); the kvslab modules must not.

    The parent package is replaced by an empty namespace pointing at the same directory, so
    what is imported is exactly the kvslab package and what it imports itself.
    """
    root = Path(kvslab.__file__).parent.parent
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('fineserve_jax'); pkg.__path__ = [{str(root)!r}]\n"
        "sys.modules['fineserve_jax'] = pkg\n"
        "import fineserve_jax.kvslab, fineserve_jax.kvslab.simulate\n"
        "assert fineserve_jax.kvslab.KVSlabAllocator\n"
        "bad = sorted(m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'jaxlib')))\n"
        "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
