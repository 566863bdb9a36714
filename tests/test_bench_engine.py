"""Smoke test of ``python -m fineserve_jax.bench engine``'s core on a tiny random model."""

from __future__ import annotations

import json

import jax
import numpy as np
from tiny_models import byte_tokenizer_json

from fineserve_jax.bench import engine as bench
from fineserve_jax.config import ModelConfig
from fineserve_jax.model import init_params
from fineserve_jax.tokenizer import Tokenizer

CFG = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=3,
                  num_heads=6, num_kv_heads=2, head_dim=16, max_position_embeddings=256)
# 3072 B float32 blocks of 4 tokens; 64 KiB holds 20 of them: sequences of up to 32 tokens
# (8 blocks) in bursts of 3 make the static halves (10 blocks each) tight.
ENGINE = {"kv_budget_bytes": 64 * 1024, "block_tokens": 4, "max_seqs": 4,
          "max_prefill_seqs": 1, "prefill_token_budget": 16, "max_model_len": 64,
          "decode_buckets": (4,), "prefill_row_buckets": (1,), "chunk_buckets": (16,),
          "context_buckets": (8, 16), "warmup": True}
WORKLOAD = bench.BurstWorkload(bursts=3, burst_size=3, prompt_mean=10, output_mean=10,
                               min_len=2, max_len=16, seed=1)


def test_bench_engine_record_adds_up():
    params = jax.tree.map(np.asarray, init_params(CFG, jax.random.key(0)))
    tok = Tokenizer.from_json(byte_tokenizer_json(), {"eos_token_ids": [257]})
    tenant = bench.Tenant(CFG, params, tok, "float32")
    reqs = WORKLOAD.requests(CFG.vocab_size)
    assert [r["model"] for r in reqs] == ["a"] * 3 + ["b"] * 3 + ["a"] * 3
    assert reqs == WORKLOAD.requests(CFG.vocab_size)  # seeded

    res = bench.run_bench(tenant, ENGINE, WORKLOAD)
    json.dumps(res)  # the record is plain JSON
    assert [r["allocator"] for r in res["results"]] == list(bench.ALLOCATORS)
    want_tokens = sum(r["output"] for r in reqs)
    assert res["stream"]["output_tokens"] == want_tokens
    for r in res["results"]:
        assert r["submitted"] == len(reqs) == 9
        assert r["completed"] + r["failed"] == r["submitted"] and r["aborted"] == 0
        assert r["completed"] == r["submitted"] and r["output_lengths_as_drawn"]
        assert r["output_tokens"] == want_tokens
        assert r["peak_concurrent"] > 0 and 0 < r["mean_concurrent"] <= r["peak_concurrent"]
        assert r["peak_concurrent"] <= 2 * ENGINE["max_seqs"]
        assert 0 < max(r["peak_running_by_tenant"].values()) <= r["peak_concurrent"]
        assert r["preemptions"] == sum(r["preemptions_by_tenant"].values())
        assert len(r["preempted_requests"]) <= r["preemptions"]
        assert bool(r["preempted_requests"]) == (r["preemptions"] > 0)
        assert r["steps"] == sum(r["steps_by_tenant"].values()) > 0
        assert sum(v["steps"] for v in r["steps_by_shape"].values()) == r["steps"]
        assert r["compiled_during_run"] == 0 and r["pool_empty_after"]
        assert 0 <= r["fragmentation_mean"] <= r["fragmentation_peak"] <= 1
        assert 1 <= r["ttft_steps_p50"] <= r["ttft_steps_p90"] <= r["e2e_steps_p90"]
        assert r["wall_s"] > 0 and r["output_tok_s"] > 0
    static = res["results"][1]
    assert static["peak_blocks_by_tenant"]["a"] <= static["pool"]["max_blocks_per_tenant"]["a"]
    assert set(res["ratios"]["kvslab/static"]) >= {"output_tok_s", "peak_concurrent"}
    # float32, greedy: batching and preemption must not change any token.
    assert res["greedy_check"]["all_identical"] and res["greedy_check"]["identical"] == 9
    assert "kvslab" in bench.table(res)
