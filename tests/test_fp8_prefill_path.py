"""FireQ's FP8 prefill attention in the model step (``PagedKVCache.attend_fp8_prefill``):
a step of whole prompts runs the FP8 flash kernel over the fresh K/V, a later chunk reads
its context from the pool, and models without FP8 queries never take it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fineserve_jax.config import ModelConfig
from fineserve_jax.model import forward, init_params, lm_head
from fineserve_jax.model import paged
from fineserve_jax.model.kv_formats import kv_format
from fineserve_jax.model.paged import PagedKVCache, PagedKVMeta
from pallas_kernels import flash_prefill as fp
from tests.tiny_models import rel_err_rows

BT, ROWS = 4, 8
CFG = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64)


def _run(monkeypatch, mode, pool, ids, pos, lens, table, query_fp8=True, fmt="int4"):
    monkeypatch.setattr(paged, "FP8_PREFILL_MODE", mode)  # read when the step is traced
    params = init_params(CFG, jax.random.key(0))
    fmt = kv_format(fmt)
    kv = PagedKVCache(fmt, fmt.block_format(CFG, BT), 2, fmt.block_format(CFG, BT).block_bytes)

    @jax.jit
    def step(pool, ids):
        h, pool = forward(CFG, params, ids, pos, kv, pool, PagedKVMeta(pos, lens, table),
                          query_fp8=query_fp8)
        return lm_head(CFG, params, h), pool

    out, pool = step(pool, ids)
    return np.asarray(out), pool


def test_whole_prompts_take_fp8_flash_and_later_chunks_the_pool(monkeypatch):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, size=(3, 8)).astype(np.int32)
    lens = np.array([8, 5, 0], np.int32)  # a short prompt and a padding row
    pos = np.where(np.arange(8)[None] < lens[:, None], np.arange(8)[None], -1).astype(np.int32)
    table = rng.permutation(ROWS * 2)[:9].reshape(3, 3).astype(np.int32)
    pool0 = jnp.full((ROWS, 2 * kv_format("int4").block_format(CFG, BT).block_bytes), 0xFF,
                     jnp.uint8)
    calls = []
    kernel = fp.flash_prefill
    monkeypatch.setattr(fp, "flash_prefill", lambda *a, **k: calls.append(k) or kernel(*a, **k))
    ref, pool_ref = _run(monkeypatch, "off", pool0, ids, pos, lens, table)
    assert not calls
    got, _ = _run(monkeypatch, "interpret", pool0, ids, pos, lens, table)
    assert [c["backend"] for c in calls] == ["pallas"]  # traced once in the layer scan
    live = pos >= 0
    assert np.isfinite(got[live]).all() and not np.array_equal(got[live], ref[live])
    # Against the unquantized model (float32 KV, float queries): FP8 attention over the
    # fresh K/V is closer than attention over INT4 K/V read back from the pool.
    f32_pool = jnp.full((ROWS, 2 * kv_format("f32").block_format(CFG, BT).block_bytes), 0xFF,
                        jnp.uint8)
    exact, _ = _run(monkeypatch, "off", f32_pool, ids, pos, lens, table, query_fp8=False,
                    fmt="f32")
    e_flash = rel_err_rows(got[live], exact[live])
    e_int4 = rel_err_rows(ref[live], exact[live])
    assert e_flash.max() < 0.1 and np.median(e_flash) < 0.05, e_flash
    assert np.median(e_flash) < 0.5 * np.median(e_int4), (e_flash, e_int4)

    # A later chunk (context already in blocks): the pool path, bit for bit.
    ids2 = rng.integers(0, 64, size=(3, 2)).astype(np.int32)
    lens2 = np.array([10, 7, 0], np.int32)
    pos2 = np.array([[8, 9], [5, 6], [-1, -1]], np.int32)
    a, _ = _run(monkeypatch, "off", pool_ref, ids2, pos2, lens2, table)
    b, _ = _run(monkeypatch, "interpret", pool_ref, ids2, pos2, lens2, table)
    np.testing.assert_array_equal(a, b)


def test_models_without_fp8_queries_never_take_it(monkeypatch):
    calls = []
    monkeypatch.setattr(fp, "flash_prefill", lambda *a, **k: calls.append(k))
    ids = np.zeros((1, 4), np.int32)
    pos = np.arange(4, dtype=np.int32)[None]
    pool = jnp.zeros((ROWS, 2 * kv_format("int4").block_format(CFG, BT).block_bytes), jnp.uint8)
    _run(monkeypatch, "interpret", pool, ids, pos, np.array([4], np.int32),
         np.array([[0, 1, 2]], np.int32), query_fp8=False)
    assert not calls
