"""Local schedulers on constructed cases whose answers are worked out by hand.

Cost model used throughout (``LinearCost``): a prefill step costs 0.1 s + 0.01 s per
token fed, a decode step 0.05 s whatever its batch. So a 50-token prompt alone costs 0.6 s.
"""

from __future__ import annotations

import math

import pytest

from fineserve_jax.kvslab import BlockFormat
from fineserve_jax.kvslab.allocator import KVSlabAllocator
from fineserve_jax.kvslab.baselines import FixedPageAllocator, StaticPartitionAllocator
from schedulers.batching import (DECODE, PREFILL, SLO, BatchLimits, ModelScheduler,
                                 RequestMetrics, Seq)
from schedulers.local import FCFS, PrismStyle, SLOAware, make_local_scheduler

FMT = BlockFormat(layers=2, kv_heads=2, head_dim=8, block_tokens=16, value_bytes=2, name="bf16")
LIMITS = BatchLimits(max_seqs=8, max_prefill_seqs=4, prefill_token_budget=256)


class LinearCost:
    def prefill_time(self, chunks, contexts):
        return 0.1 + 0.01 * sum(chunks)

    def decode_time(self, contexts):
        return 0.05


def device(*models: tuple[str, SLO], limits: BatchLimits = LIMITS) -> list[ModelScheduler]:
    alloc = KVSlabAllocator(4 * 2**20, [FMT])
    out = []
    for name, slo in models:
        alloc.add_model(name, FMT, reserve_blocks=4)
        out.append(ModelScheduler(name, alloc, FMT, limits, slo=slo, cost=LinearCost()))
    return out


def seq(rid: str, prompt: int, arrival: float) -> Seq:
    return Seq(rid, None, 0, None, [1] * prompt, metrics=RequestMetrics(arrival))


def ids(rows) -> list[tuple[str, int]]:
    return [(s.id, c) for s, c in rows]


def test_drop_infeasible_requests_at_once():
    # TTFT SLO 1 s; now = 0.05. Deadline order A (1.00), B (1.01), C (1.02). A request's
    # prediction is its model's prompt tokens up to and including it, in full steps.
    # A: 0.05 + (0.1 + 0.5) = 0.65 <= 1.00: kept.
    # B: 150 tokens: 0.05 + 1.6 = 1.65 > 1.01: dropped.
    # C: 70 tokens (A and C): 0.05 + 0.8 = 0.85 <= 1.02: kept.
    # The batch [A 50, C 20] ends at 0.05 + 0.1 + 0.7 = 0.85, before both deadlines.
    (m,) = device(("m", SLO(ttft_s=1.0)))
    for s in (seq("A", 50, 0.0), seq("B", 100, 0.01), seq("C", 20, 0.02)):
        m.add(s)
    got = SLOAware().next_step([m], now=0.05)
    assert got is not None and got[0] is m
    assert got[1].kind == PREFILL and ids(got[1].rows) == [("A", 50), ("C", 20)]
    dropped = m.take_dropped()
    assert [s.id for s, _ in dropped] == ["B"]
    assert "time-to-first-token SLO (1 s)" in dropped[0][1]
    assert m.slo_misses == 1 and not m.waiting and m.dropped == []


def test_best_effort_keeps_the_miss_last_and_counts_it():
    # Same queue, on_miss="best-effort": B is kept but marked, and sorts behind A and C.
    # The batch [A 50, C 20, B 100] would end at 0.05 + 0.1 + 1.7 = 1.85, past A's
    # deadline, so the longest prompt (B) is evicted: [A, C] as before.
    (m,) = device(("m", SLO(ttft_s=1.0, tpot_s=10.0)))
    for s in (seq("A", 50, 0.0), seq("B", 100, 0.01), seq("C", 20, 0.02)):
        m.add(s)
    got = SLOAware(on_miss="best-effort").next_step([m], now=0.05)
    assert ids(got[1].rows) == [("A", 50), ("C", 20)]
    assert m.take_dropped() == [] and m.slo_misses == 1
    assert [s.id for s in m.waiting] == ["B"] and m.waiting[0].slo_missed
    # Next step (A and C decode, not due for 8 s): B runs, best-effort, counted once, in
    # a step cut to end within half the 1 s TTFT target (a prompt arriving meanwhile
    # keeps the other half): 100 tokens (1.1 s) -> 50 (0.6 s) -> 25 (0.35 s).
    for s, c in got[1].rows:
        assert m.advance(s, c)
        s.tokens.append(7)
    got = SLOAware(on_miss="best-effort").next_step([m], now=1.0)
    assert got[1].kind == PREFILL and ids(got[1].rows) == [("B", 25)]
    assert m.slo_misses == 1


def test_best_effort_prompts_run_after_every_other_models_prompts():
    # now = 0.05, TTFT SLO 1 s. A's 100-token prompt (arrived 0.0, due 1.0) alone would
    # end at 0.05 + 1.1 = 1.15: a miss, kept best-effort. B's 20-token prompt (due 1.02)
    # ends at 0.05 + 0.3 = 0.35. A's deadline is the earlier one, but A's prompt can no
    # longer meet it: B prefills first, then A.
    a, b = device(("a", SLO(ttft_s=1.0, tpot_s=10.0)), ("b", SLO(ttft_s=1.0, tpot_s=10.0)))
    a.add(seq("A", 100, 0.0))
    b.add(seq("B", 20, 0.02))
    sch = SLOAware(on_miss="best-effort")
    m, work = sch.next_step([a, b], now=0.05)
    assert (m.name, work.kind, ids(work.rows)) == ("b", PREFILL, [("B", 20)])
    assert a.waiting[0].slo_missed and (a.slo_misses, b.slo_misses) == (1, 0)
    s = work.rows[0][0]
    assert b.advance(s, 20)
    s.tokens.append(7)
    # B decodes next by 0.05 + 10 (its TPOT pace): A's prompt runs now, its step cut to
    # end within half the tightest TTFT target (0.5 s): 100 -> 50 -> 25 tokens (0.35 s).
    m, work = sch.next_step([a, b], now=0.35)
    assert (m.name, work.kind, ids(work.rows)) == ("a", PREFILL, [("A", 25)])


def test_a_best_effort_sequence_sets_no_decode_pace():
    # As in test_decode_due_runs_before_a_prefill_that_would_make_it_late: X's decode
    # would be due at 0.15, before Y's prefill ends (0.35), so X decodes first. When X's
    # only sequence is already a miss (best-effort) it sets no pace and takes no share of
    # the device: Y's prefill runs first.
    for missed, first in ((False, "x"), (True, "y")):
        x, y = device(("x", SLO(tpot_s=0.2)), ("y", SLO(ttft_s=5.0)))
        _decoding(x, "x0", 20, 0.0).slo_missed = missed
        y.add(seq("y0", 20, 0.0))
        sch = SLOAware(on_miss="best-effort")
        assert sch.decode_share([x, y]) == pytest.approx(0.0 if missed else 0.25)
        m, _ = sch.next_step([x, y], now=0.05)
        assert m.name == first


def test_best_effort_decodes_take_a_turn_before_decodes_ahead_of_pace():
    # X decodes only a best-effort sequence (no pace, so never due); Y's sequence, its
    # last token at 0, is due to decode at 0 + tpot - 0.05. At now = 0.1, with Y's TPOT
    # 1 s, Y is not due until 0.95 and X's 0.05 s step ends well before: X decodes (it
    # would otherwise wait for an idle device). With Y's TPOT 0.12 s, Y is due (0.07):
    # Y decodes first.
    for y_tpot, first in ((1.0, "x"), (0.12, "y")):
        x, y = device(("x", SLO(tpot_s=0.2)), ("y", SLO(tpot_s=y_tpot)))
        _decoding(x, "x0", 20, 0.0).slo_missed = True
        _decoding(y, "y0", 20, 0.0)
        m, work = SLOAware(on_miss="best-effort").next_step([x, y], now=0.1)
        assert (m.name, work.kind) == (first, DECODE)


def test_a_decode_short_of_blocks_preempts_a_best_effort_sequence_first():
    # A pool of 4 blocks of 16 tokens; A, B, C (admitted in that order) hold one block
    # each with 16 prompt tokens in KV and need a second block for their next token. A
    # takes the last free block; B finds none. The newest (C) would be preempted, but B
    # is best-effort: B goes, and its block lets C grow. (Without the mark, C is
    # preempted and A and B decode.)
    def decode(missed: str | None):
        alloc = KVSlabAllocator(4 * FMT.block_bytes, [FMT], slab_bytes=FMT.block_bytes)
        alloc.add_model("m", FMT)
        m = ModelScheduler("m", alloc, FMT, LIMITS, slo=SLO(ttft_s=5.0, tpot_s=1.0))
        for i, rid in enumerate("ABC"):
            m.add(seq(rid, 16, float(i)))
        work = m.schedule(PREFILL)
        assert ids(work.rows) == [("A", 16), ("B", 16), ("C", 16)]
        for q, c in work.rows:
            assert m.advance(q, c)
            q.tokens.append(7)
            q.slo_missed = q.id == missed
        work = m.schedule(DECODE)
        return [q.id for q, _ in work.rows], [q.id for q in m.waiting], m.preemptions

    assert decode(None) == (["A", "B"], ["C"], 1)
    assert decode("B") == (["A", "C"], ["B"], 1)


def test_a_prompt_is_admitted_only_when_all_of_it_fits_beside_the_running_ones():
    # A pool of 8 blocks of 16 tokens, prefill steps of 32 tokens. A (60 prompt tokens,
    # 4 blocks) is decoding; B's 64-token prompt needs 4 blocks and A one block of
    # headroom: 5 > the 4 free, so B waits. Its first 32-token chunk would fit (2 + 1),
    # but then its second chunk takes the blocks A needs to grow, and a decode short of
    # blocks preempts the newest sequence: B, losing the chunk it computed. Once A has
    # finished, B runs.
    alloc = KVSlabAllocator(8 * FMT.block_bytes, [FMT], slab_bytes=FMT.block_bytes)
    alloc.add_model("m", FMT)
    limits = BatchLimits(max_seqs=8, max_prefill_seqs=4, prefill_token_budget=32)
    m = ModelScheduler("m", alloc, FMT, limits, slo=SLO(ttft_s=5.0, tpot_s=1.0))
    a = seq("A", 60, 0.0)
    m.add(a)
    for chunk in (32, 28):
        (row,) = m.schedule(PREFILL).rows
        assert ids([row]) == [("A", chunk)]
        assert m.advance(a, chunk) == (chunk == 28)  # samples once all 60 are in KV
    a.tokens.append(7)
    assert len(a.blocks) == 4 and alloc.free_blocks("m") == 4
    m.add(seq("B", 64, 1.0))
    assert m.schedule(PREFILL) is None and [q.id for q in m.waiting] == ["B"]
    assert ids(m.schedule(DECODE).rows) == [("A", 1)]
    m.remove(a)  # finished
    assert ids(m.schedule(PREFILL).rows) == [("B", 32)]
    assert m.preemptions == 0


def shared_pool(kind: str, peers: bool, half: BlockFormat | None = None):
    """Models "a" (FMT) and "b" (``half`` or FMT) on 8 of FMT's blocks, prefill steps of
    64 tokens; "a" holds A, 64 tokens in 4 blocks, sampled and about to decode into a
    fifth block."""
    fb = half or FMT
    if kind == "kvslab":
        alloc = KVSlabAllocator(8 * FMT.block_bytes, [FMT, fb], slab_bytes=FMT.block_bytes)
    elif kind == "fixed-page":
        alloc = FixedPageAllocator(8 * FMT.block_bytes, [FMT, fb])
    else:
        alloc = StaticPartitionAllocator(8 * FMT.block_bytes, [FMT, fb],
                                         slab_bytes=FMT.block_bytes, partitions={"a": 0.5, "b": 0.5})
    limits = BatchLimits(max_seqs=8, max_prefill_seqs=4, prefill_token_budget=64)
    scheds: dict[str, ModelScheduler] = {}
    for name, fmt in (("a", FMT), ("b", fb)):
        alloc.add_model(name, fmt)
        scheds[name] = ModelScheduler(name, alloc, fmt, limits,
                                      peers=scheds.values if peers else None)
    a = seq("A", 64, 0.0)
    scheds["a"].add(a)
    (row,) = scheds["a"].schedule(PREFILL).rows
    assert scheds["a"].advance(a, row[1])
    a.tokens.append(7)
    return alloc, scheds["a"], scheds["b"], a


@pytest.mark.parametrize("kind", ["kvslab", "fixed-page"])
def test_on_a_shared_pool_a_prompt_leaves_headroom_for_the_other_models_decodes(kind):
    # 4 blocks are free. B's 64-token prompt needs all 4; model b runs nothing, but A (of
    # model a) grows into a fifth block at its next decode. Told its peers, b holds B
    # back; A decodes without preemption, and B runs once A has finished.
    alloc, a_s, b_s, a = shared_pool(kind, peers=True)
    b_s.add(seq("B", 64, 1.0))
    assert alloc.free_blocks("b") == 4 and b_s.schedule(PREFILL) is None
    assert ids(a_s.schedule(DECODE).rows) == [("A", 1)] and len(a.blocks) == 5
    a_s.remove(a)
    assert ids(b_s.schedule(PREFILL).rows) == [("B", 64)]
    assert a_s.preemptions == b_s.preemptions == 0
    # Blind to its peers, b takes the 4 blocks, and A's decode preempts A.
    alloc, a_s, b_s, a = shared_pool(kind, peers=False)
    b_s.add(seq("B", 64, 1.0))
    assert ids(b_s.schedule(PREFILL).rows) == [("B", 64)]
    assert a_s.schedule(DECODE) is None and a_s.preemptions == 1 and a in a_s.waiting


def test_peer_headroom_counts_pool_bytes_and_nothing_on_static_partitions():
    # Model b's blocks take half the bytes of a's: A's one block of headroom is two of b's.
    half = BlockFormat(layers=2, kv_heads=1, head_dim=8, block_tokens=16, value_bytes=2,
                       name="half")
    alloc, _, b_s, _ = shared_pool("kvslab", peers=True, half=half)
    assert b_s._peer_headroom() == 2 and alloc.free_blocks("b") == 8
    b_s.add(seq("B", 7 * 16, 1.0))  # 7 blocks + 2 > 8: waits
    assert b_s.schedule(PREFILL) is None
    b_s.waiting.clear()
    b_s.add(seq("B2", 6 * 16, 1.0))  # 6 + 2 <= 8: its first 64-token chunk runs
    assert ids(b_s.schedule(PREFILL).rows) == [("B2", 64)]
    # Static partitions: a's decodes never draw on b's partition.
    alloc, _, b_s, _ = shared_pool("static", peers=True)
    assert b_s._peer_headroom() == 0
    b_s.add(seq("B", 64, 1.0))
    assert ids(b_s.schedule(PREFILL).rows) == [("B", 64)]


def test_evict_longest_prompt_while_batch_breaks_a_deadline():
    # now = 0. A: arrival -0.5, deadline 0.5, 10 tokens (0.2 s alone); B: deadline 1.0,
    # 60 tokens (0.7 s). Both feasible (0.2 <= 0.5; 0.2 + 0.7 = 0.9 <= 1.0), but the batch
    # [A, B] takes 0.1 + 0.7 = 0.8 s, past A's deadline: B (longest) is evicted.
    (m,) = device(("m", SLO(ttft_s=1.0, tpot_s=10.0)))
    m.add(seq("B", 60, 0.0))
    m.add(seq("A", 10, -0.5))
    sch = SLOAware()
    got = sch.next_step([m], now=0.0)
    assert ids(got[1].rows) == [("A", 10)]
    assert [s.id for s in m.waiting] == ["B"] and m.take_dropped() == []
    # After A's step (0.2 s) B alone ends at 0.2 + 0.7 = 0.9 <= 1.0: it runs, not dropped.
    m.advance(got[1].rows[0][0], 10)
    got = sch.next_step([m], now=0.2)
    assert got[1].kind == PREFILL and ids(got[1].rows) == [("B", 60)]


def test_guards_limit_rows_tokens_and_running():
    limits = BatchLimits(max_seqs=3, max_prefill_seqs=2, prefill_token_budget=64)
    (m,) = device(("m", SLO()), limits=limits)
    for i in range(5):
        m.add(seq(f"r{i}", 40, float(i)))
    sch = SLOAware()
    got = sch.next_step([m], now=10.0)
    # Two rows at most, 64 tokens: r0 whole (40), r1 chunked (24).
    assert ids(got[1].rows) == [("r0", 40), ("r1", 24)]


def _decoding(m: ModelScheduler, rid: str, prompt: int, arrival: float) -> Seq:
    """A sequence of ``m`` whose prompt is in KV and which waits for its next decode."""
    s = seq(rid, prompt, arrival)
    m.add(s)
    work = m.schedule(PREFILL)
    assert m.advance(s, work.rows[0][1])
    s.tokens.append(7)
    s.last_token_at = arrival
    return s


def test_decode_due_runs_before_a_prefill_that_would_make_it_late():
    # X decodes with TPOT 0.2 s, its last token at 0: due at 0 + 0.2 - 0.05 = 0.15.
    # Y's prefill of 20 tokens would end at 0.05 + 0.3 = 0.35 > 0.15 (no cut of it fits
    # the 0.1 s left either): X decodes first.
    x, y = device(("x", SLO(tpot_s=0.2)), ("y", SLO(ttft_s=5.0)))
    _decoding(x, "x0", 20, 0.0)
    y.add(seq("y0", 20, 0.0))
    got = SLOAware().next_step([x, y], now=0.05)
    assert got[0] is x and got[1].kind == DECODE
    # With TPOT 1 s the decode is due at 1 - 0.05 = 0.95 > 0.35: Y's prefill goes first.
    x2, y2 = device(("x", SLO(tpot_s=1.0)), ("y", SLO(ttft_s=5.0)))
    _decoding(x2, "x0", 20, 0.0)
    y2.add(seq("y0", 20, 0.0))
    got = SLOAware().next_step([x2, y2], now=0.05)
    assert got[0] is y2 and got[1].kind == PREFILL


def test_a_decode_is_due_by_its_sequences_tpot_pace_not_its_last_token():
    # X (TPOT 0.2 s) got its first token from a step at t=0 and four more since, the
    # latest from a step at 0.6: on pace it owes its sixth token only by 0 + 5 x 0.2 =
    # 1.0, so its decode is due at 1.0 - 0.05 = 0.95 (from its latest token alone it
    # would be 0.6 + 0.2 - 0.05 = 0.75). Y's 20-token prompt arrives at 0.62; at now =
    # 0.65 its prefill would end at 0.65 + 0.3 = 0.95, not past X's due time: the
    # prefill runs first.
    def case(paced_from):
        x, y = device(("x", SLO(tpot_s=0.2)), ("y", SLO(ttft_s=5.0)))
        s = _decoding(x, "x0", 20, 0.0)
        s.paced_from, s.paced_tokens, s.last_token_at = paced_from, 4, 0.6
        y.add(seq("y0", 20, 0.62))
        return x, y, s, SLOAware().next_step([x, y], now=0.65)

    x, y, s, got = case(0.0)
    assert got[0] is y and got[1].kind == PREFILL
    # Behind pace instead: a first token at -0.2 makes the sixth due by -0.2 + 5 x 0.2
    # = 0.8, the decode at 0.75, before the prefill would end (0.95): X decodes first.
    x, y, s, got = case(-0.2)
    assert got[0] is x and got[1].kind == DECODE
    # The scheduler keeps the pace itself: the decode it chose samples a token.
    assert (s.paced_from, s.paced_tokens, s.last_token_at) == (-0.2, 5, 0.65)


def test_a_decode_behind_pace_goes_first_until_its_slack_covers_the_prefill():
    # X (TPOT 0.2 s, 0.05 s a decode) is paced from -0.4 and has 2 tokens after its
    # first, the latest at 0.02 -- after Y's prompt arrived (0.0). Its next token is owed
    # by -0.4 + 3 x 0.2 = 0.2, its decode due at 0.15. Y's 20-token prefill takes 0.3 s
    # and no cut of it fits before X is due (the smallest, 16 tokens, takes 0.26 s).
    # Y's TTFT target (5 s) leaves it time to wait, and having sampled since Y arrived
    # does not let the prefill make X late: at 0.05 X decodes (due next at 0.35 < 0.1 +
    # 0.3), at 0.1 X decodes again (due next at 0.55), and at 0.15 the prefill ends by
    # 0.45 and runs.
    x, y = device(("x", SLO(tpot_s=0.2)), ("y", SLO(ttft_s=5.0)))
    s = _decoding(x, "x0", 20, 0.0)
    s.paced_from, s.paced_tokens, s.last_token_at = -0.4, 2, 0.02
    y.add(seq("y0", 20, 0.0))
    sch = SLOAware()
    steps = []
    for now in (0.05, 0.1, 0.15):
        m, work = sch.next_step([x, y], now=now)
        steps.append((m.name, work.kind, ids(work.rows)))
        if work.kind == DECODE:
            assert x.advance(s, 1)
            s.tokens.append(7)
    assert steps == [("x", DECODE, [("x0", 1)]), ("x", DECODE, [("x0", 1)]),
                     ("y", PREFILL, [("y0", 20)])]
    assert (s.paced_tokens, s.last_token_at) == (4, 0.1)


def test_a_prompt_that_cannot_wait_goes_ahead_of_a_due_decode():
    # X (TPOT 0.5 s, 0.05 s a decode) owes its next token by -0.65 + 2 x 0.5 = 0.35: its
    # decode is due at 0.3, before Y's 0.3 s prefill would end (0.35), and no cut fits.
    # Feasibility keeps Y (0.05 + 0.3 / (1 - 0.05 / 0.5) = 0.383 <= its deadline), but
    # after X's decode its first token would come at 0.05 + 0.05 + 0.3 = 0.4: with a
    # 0.39 s TTFT target Y cannot wait and prefills first; with 0.41 s X decodes first.
    def first(ttft):
        x, y = device(("x", SLO(tpot_s=0.5)), ("y", SLO(ttft_s=ttft)))
        s = _decoding(x, "x0", 20, 0.0)
        s.paced_from, s.paced_tokens = -0.65, 1
        y.add(seq("y0", 20, 0.0))
        m, work = SLOAware().next_step([x, y], now=0.05)
        assert not y.dropped
        return m.name, work.kind

    assert first(0.39) == ("y", PREFILL)
    assert first(0.41) == ("x", DECODE)


def test_the_pace_starts_at_the_step_that_samples_the_first_token():
    (m,) = device(("m", SLO(ttft_s=5.0, tpot_s=1.0)))
    s = seq("a", 20, 0.0)
    m.add(s)
    sch = SLOAware()
    got = sch.next_step([m], now=0.5)  # the whole prompt: samples the first token
    assert got[1].kind == PREFILL and (s.paced_from, s.paced_tokens) == (0.5, 0)
    m.advance(s, 20)
    s.tokens.append(7)
    sch.next_step([m], now=0.8)  # a decode: the second token
    assert (s.paced_from, s.paced_tokens, s.last_token_at) == (0.5, 1, 0.8)


def test_earliest_deadline_model_prefills_first():
    a, b = device(("a", SLO(ttft_s=2.0)), ("b", SLO(ttft_s=0.5)))
    a.add(seq("a0", 10, 0.0))
    b.add(seq("b0", 10, 0.0))
    got = SLOAware().next_step([a, b], now=0.0)
    assert got[0] is b


def test_decode_share_stretches_the_prediction():
    # X decodes (0.05 s per step) under TPOT 0.1 s: half the device, so Y's 0.6 s prompt
    # is predicted to take 1.2 s. Deadline 1.0: dropped; with TTFT 1.3 s it is kept.
    for ttft, dropped in ((1.0, ["y0"]), (1.3, [])):
        x, y = device(("x", SLO(tpot_s=0.1)), ("y", SLO(ttft_s=ttft)))
        _decoding(x, "x0", 20, 0.0)
        y.add(seq("y0", 50, 0.0))
        sch = SLOAware()
        assert sch.decode_share([x, y]) == pytest.approx(0.5)
        sch.check_feasible([x, y], now=0.0)
        assert [s.id for s, _ in y.take_dropped()] == dropped


def test_prism_checks_in_queue_order():
    # Queue order A (100 tokens: 1.1 s > 1.0 alone) then B (20 tokens). Prism drops A and
    # keeps B. FineServe's deadline order gives the same here; the difference shows when
    # a later arrival has an earlier deadline (next test).
    (m,) = device(("m", SLO(ttft_s=1.0)))
    m.add(seq("A", 100, 0.0))
    m.add(seq("B", 20, 0.0))
    got = PrismStyle().next_step([m], now=0.0)
    assert [s.id for s, _ in m.take_dropped()] == ["A"]
    assert ids(got[1].rows) == [("B", 20)]


def test_prism_queue_order_vs_fineserve_deadline_order():
    # Two models on one device, TTFT SLOs 3 s (p) and 0.75 s (q). p's 60-token prompt
    # (0.7 s) arrived first; q's 50-token prompt (0.6 s) later but is due sooner (0.75).
    # Prism steps the model due first (q), then p; FineServe orders the whole device by
    # deadline: same first choice. With both in one model's queue, Prism walks in arrival
    # order: ahead of C (deadline 0.75, 0.6 s) is A (0.7 s): 1.3 > 0.75, C dropped.
    # FineServe puts C first: C at 0.6 <= 0.75, A at 1.3 <= 3.0: nothing dropped.
    def queue():
        (m,) = device(("m", SLO(ttft_s=3.0)))
        m.add(seq("A", 60, 0.0))
        c = seq("C", 50, 0.0)
        m.add(c)
        c.deadline = 0.75  # an earlier deadline, as a tighter per-request SLO would give
        return m
    m = queue()
    PrismStyle().next_step([m], now=0.0)
    assert [s.id for s, _ in m.take_dropped()] == ["C"]
    m = queue()
    got = SLOAware().next_step([m], now=0.0)
    assert m.take_dropped() == []
    assert [s.id for s, _ in got[1].rows][0] == "C"


def test_fcfs_never_drops_and_takes_turns():
    a, b = device(("a", SLO(ttft_s=0.01)), ("b", SLO(ttft_s=0.01)))
    for m in (a, b):
        m.add(seq(m.name + "0", 100, 0.0))
    sch = FCFS()
    first = sch.next_step([a, b], now=5.0)
    second = sch.next_step([a, b], now=5.0)
    assert {first[0].name, second[0].name} == {"a", "b"}
    assert a.take_dropped() == [] and b.take_dropped() == []


@pytest.mark.parametrize("policy", ["fcfs", "prism", "fineserve"])
def test_a_scheduler_swapped_in_keeps_the_models_turns(policy):
    # Two models served for a while by one scheduler object, then another object takes
    # the device (its own iteration count starts at 0): the turns must go on alternating
    # as before, not serve one model alone until the new count passes the other's mark.
    a, b = device(("a", SLO()), ("b", SLO()))
    for m in (a, b):
        for i in range(2):
            m.add(seq(f"{m.name}{i}", 16, 0.0))

    def step(sch, now):
        m, work = sch.next_step([a, b], now)
        for s, c in work.rows:
            m.advance(s, c)
            s.tokens.append(7)
        return m.name

    old = FCFS()
    before = [step(old, 1.0) for _ in range(9)]
    assert before == ["a", "b"] * 4 + ["a"]
    new = make_local_scheduler(policy)
    names = [step(new, 2.0) for _ in range(4)]
    assert names == ["b", "a", "b", "a"], names


def test_no_slo_alternates_prefill_and_decode():
    # Without targets, FineServe neither drops nor starves decodes: after a prefill the
    # model's decode is due.
    (m,) = device(("m", SLO()))
    _decoding(m, "d", 20, 0.0)
    m.add(seq("w", 20, 1.0))
    sch = SLOAware()
    kinds = []
    for _ in range(2):
        got = sch.next_step([m], now=2.0)
        kinds.append(got[1].kind)
        if got[1].kind == DECODE:
            for s, c in got[1].rows:
                m.advance(s, c)
                s.tokens.append(7)
        else:
            for s, c in got[1].rows:
                m.advance(s, c)
                s.tokens.append(7)
    assert kinds == [DECODE, PREFILL]  # the last step before was a prefill
    assert m.take_dropped() == []


def test_make_local_scheduler_and_slo_checks():
    assert isinstance(make_local_scheduler("fineserve", "best-effort"), SLOAware)
    assert isinstance(make_local_scheduler("prism"), PrismStyle)
    assert isinstance(make_local_scheduler("fcfs"), FCFS)
    with pytest.raises(ValueError, match="unknown local scheduler"):
        make_local_scheduler("edf")
    with pytest.raises(ValueError, match="on_miss"):
        SLOAware(on_miss="ignore")
    with pytest.raises(ValueError, match="ttft_s"):
        SLO(ttft_s=0)
    slo = SLO(ttft_s=1.0, tpot_s=0.1)
    assert slo.met(RequestMetrics(0.0, 0.1, 0.9, 1.8), 10)  # TTFT 0.9, TPOT 0.1
    assert not slo.met(RequestMetrics(0.0, 0.1, 1.1, 1.2), 2)  # TTFT 1.1
    assert not slo.met(RequestMetrics(0.0, 0.1, 0.5, 2.0), 10)  # TPOT 0.167
    assert slo.met(RequestMetrics(0.0, 0.1, 0.5, 0.5), 1)
    assert not slo.met(RequestMetrics(0.0), 0)
    assert math.isinf(seq("x", 3, 0.0).deadline)


def test_prefill_is_cut_to_fit_before_the_next_decode_is_due():
    # X decodes with TPOT 0.4 s, its last token at 0: due at 0.4 - 0.05 = 0.35.
    # Y's 100-token prompt alone would take 1.1 s; halving the chunk: 50 (0.6 s), then
    # 25 (0.35 s), which ends as X's decode is due: Y feeds 25 tokens now.
    x, y = device(("x", SLO(tpot_s=0.4)), ("y", SLO(ttft_s=10.0)))
    _decoding(x, "x0", 20, 0.0)
    y.add(seq("y0", 100, 0.0))
    got = SLOAware().next_step([x, y], now=0.0)
    assert got[0] is y and ids(got[1].rows) == [("y0", 25)]
    # No running decode with a TPOT target: the whole prompt goes in one step.
    (z,) = device(("z", SLO(ttft_s=10.0)))
    z.add(seq("z0", 100, 0.0))
    assert ids(SLOAware().next_step([z], now=0.0)[1].rows) == [("z0", 100)]
    # No cut fits a slot shorter than the fixed 0.1 s of a step (or a decode already
    # due): cutting would only add steps, so the prompt goes in whole.
    x, y = device(("x", SLO(tpot_s=0.5)), ("y", SLO(ttft_s=10.0)))
    sch = SLOAware()
    y.add(seq("y0", 100, 0.0))
    # Slot 0.3 s: 50 (0.6 s), 25 (0.35 s), then 16 tokens (0.26 s) fit.
    assert ids(sch.prefill_batch(y, 0.0, slot_s=0.3)) == [("y0", 16)]
    # Slot 0.2 s: not even 16 tokens (0.26 s) fit, so all 100 go in one step.
    assert ids(sch.prefill_batch(y, 0.0, slot_s=0.2)) == [("y0", 100)]


def test_feasibility_counts_prompts_batched_and_other_models_work():
    # Budget 256 tokens per step. Model m: three 80-token prompts due at 2.85 s; model n:
    # one 100-token prompt due at 1.5 s, so n's work (1.1 s) is ahead of all of m's.
    # m's prompts batch: the first is predicted at 1.1 + 0.9 = 2.0, the second at
    # 1.1 + 1.7 (160 tokens in one step) = 2.8, the third at 1.1 + 2.5 = 3.6 > 2.85:
    # dropped. (Solo times added up, the second would be at 1.1 + 1.8 = 2.9: dropped too.)
    m, n = device(("m", SLO(ttft_s=2.85)), ("n", SLO(ttft_s=1.5)))
    for i in range(3):
        m.add(seq(f"m{i}", 80, 0.0))
    n.add(seq("n0", 100, 0.0))
    SLOAware().check_feasible([m, n], now=0.0)
    assert [s.id for s, _ in m.take_dropped()] == ["m2"]
    assert n.take_dropped() == []


@pytest.mark.parametrize("b_ttft, dropped", [(5.0, []), (0.9, ["a0"])])
def test_feasibility_counts_another_models_work_only_if_it_is_due_first(b_ttft, dropped):
    # b's 100-token prompt is 40 tokens in (60 left: 0.7 s) and due at b_ttft; a's
    # 30-token prompt (0.4 s) is due at 1.0. next_step prefills the earlier deadline
    # first, so b's rest is ahead of a only when b is due first: due at 5.0 it is not
    # (0.4 <= 1.0: kept); due at 0.9 it is (0.7 + 0.4 = 1.1 > 1.0: dropped).
    a, b = device(("a", SLO(ttft_s=1.0)), ("b", SLO(ttft_s=b_ttft)))
    s = seq("b0", 100, 0.0)
    b.add(s)
    b.schedule(PREFILL)
    assert not b.advance(s, 40) and s.prefilling and s.remaining == 60
    a.add(seq("a0", 30, 0.0))
    SLOAware().check_feasible([a, b], now=0.0)
    assert [q.id for q, _ in a.take_dropped()] == dropped
    assert b.take_dropped() == []
