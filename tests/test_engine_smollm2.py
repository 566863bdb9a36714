"""The engine on the real packaged SmolLM2-135M: batching and preemption don't change
greedy output (float32), and KV memory moves between two tenants of one pool."""

from __future__ import annotations

import pytest

from fineserve_jax.engine import Engine, EngineConfig
from fineserve_jax.sampling import SamplingParams

PROMPTS = [
    "The capital of France is",
    "Photosynthesis is the process by which",
    "def fibonacci(n):",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "1, 2, 3, 4,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "In 1969, the first humans to walk on the Moon were",
    "A haiku about autumn:",
    "The quick brown fox",
]
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
# Few buckets: every compile of the real model costs seconds on CPU.
BUCKETS = dict(block_tokens=16, max_prefill_seqs=4, prefill_token_budget=64,
               decode_buckets=(1, 8), prefill_row_buckets=(1, 4), chunk_buckets=(64,),
               context_buckets=(8,), max_model_len=128, warmup=False)


def _engine(llm, budget, **kw):
    e = Engine(EngineConfig(kv_budget_bytes=budget, **{**BUCKETS, **kw}))
    e.add_model("smol", llm.config, llm.engine.weights(llm.name), llm.tokenizer, dtype=llm.dtype)
    return e.start(thread=False)


@pytest.fixture(scope="module")
def alone(smollm2_f32):
    """Each prompt generated on its own (batch of one)."""
    e = _engine(smollm2_f32, 32 * 2**20, max_seqs=8)
    out = []
    for p in PROMPTS:
        h = e.submit("smol", p, GREEDY)
        e.run_until_idle()
        out.append(h.result().token_ids)
    return out


def test_batched_greedy_equals_one_at_a_time(smollm2_f32, alone):
    e = _engine(smollm2_f32, 32 * 2**20, max_seqs=8)
    hs = [e.submit("smol", p, GREEDY) for p in PROMPTS]  # 10 prompts, 8 run at once
    e.run_until_idle()
    assert [h.result().token_ids for h in hs] == alone
    assert e.stats().models["smol"].peak_running == 8


def test_preempted_requests_finish_with_the_same_output(smollm2_f32, alone):
    # 10 sequences of up to ~35 tokens need 20-30 blocks of 16 tokens; the pool has 12.
    block_bytes = 2 * 30 * 16 * 3 * 64 * 4
    e = _engine(smollm2_f32, 12 * block_bytes, max_seqs=8, prefill_token_budget=64)
    hs = [e.submit("smol", p, GREEDY) for p in PROMPTS]
    e.run_until_idle()
    st = e.stats()
    assert st.models["smol"].preemptions > 0
    assert [h.result().token_ids for h in hs] == alone
    assert st.pool.rows_free == st.pool.rows_total


def test_idle_tenants_memory_goes_to_the_busy_one(smollm2_f32, smollm2_bf16):
    """Two SmolLM2 tenants (float32 KV and bf16 KV) in one pool: whichever is busy gets
    all of it but the idle one's reserve, then gives it back."""
    slab = 2 * 737_280  # twice the LCM of the two block sizes: 2 f32 or 4 bf16 blocks
    e = Engine(EngineConfig(kv_budget_bytes=16 * slab, **{
        **BUCKETS, "max_seqs": 8, "decode_buckets": (8,), "max_prefill_seqs": 2,
        "prefill_token_budget": 32, "prefill_row_buckets": (2,), "chunk_buckets": (32,)}))
    for name, llm in (("f32", smollm2_f32), ("bf16", smollm2_bf16)):
        e.add_model(name, llm.config, llm.engine.weights(llm.name), llm.tokenizer,
                    dtype=llm.dtype)
    e.start(thread=False)
    st = e.stats().pool
    assert st.row_bytes == slab and st.rows_total == 16 and st.padding_bytes == 0
    # The default reserve is one full prefill step: 2 rows + 2 blocks of 16 tokens = 4
    # blocks, which is 2 slabs of f32 blocks or 1 slab of bf16 blocks.
    reserve_rows = {"f32": 2, "bf16": 1}
    # Demand above what the busy tenant may hold: f32 8 x 70 tokens > 15 slabs x 32
    # tokens, bf16 8 x 120 tokens > 14 slabs x 64 tokens.
    for busy, idle, prompt_len, new in (("f32", "bf16", 30, 40), ("bf16", "f32", 60, 60)):
        sp = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
        hs = [e.submit(busy, list(range(1000 + i, 1000 + i + prompt_len)), sp) for i in range(8)]
        peak = 0
        while e.step():
            peak = max(peak, e.stats().pool.rows_by_owner.get(busy, 0))
        assert all(h.finish_reason == "length" for h in hs)
        assert peak == 16 - reserve_rows[idle], (busy, peak)
        assert e.stats().pool.rows_free == 16  # every slab back on the shared free list
