"""The multi-model engine on a tiny random model: buckets, aborts, leaks, policy, errors.

The real-model checks (batched == alone, preemption, memory moving between SmolLM2
tenants) are in ``test_engine_smollm2.py``.
"""

from __future__ import annotations

import asyncio
import math
import time

import jax
import numpy as np
import pytest

from fineserve_jax.config import ModelConfig
from fineserve_jax.engine import Engine, EngineConfig, RequestRejected
from fineserve_jax.model import init_params
from fineserve_jax.sampling import SamplingParams
from fineserve_jax.tokenizer import Tokenizer
from tiny_models import byte_tokenizer_json

CFG = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=3,
                  num_heads=6, num_kv_heads=2, head_dim=16, max_position_embeddings=256)
SMALL = dict(block_tokens=4, max_seqs=8, max_prefill_seqs=2, prefill_token_budget=32,
             max_model_len=128, decode_buckets=(2, 8), prefill_row_buckets=(2,),
             chunk_buckets=(8, 32), context_buckets=(8, 32), pool_fill=0xFF, warmup=False)
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny():
    params = jax.tree.map(np.asarray, init_params(CFG, jax.random.key(0)))
    tok = Tokenizer.from_json(byte_tokenizer_json(), {"eos_token_ids": [257]})
    return params, tok


def _engine(tiny, models=("a", "b"), thread=False, dtypes=None, **kw):
    params, tok = tiny
    e = Engine(EngineConfig(**{"kv_budget_bytes": 2 * 2**20, **SMALL, **kw}))
    for i, name in enumerate(models):
        e.add_model(name, CFG, params, tok, dtype=(dtypes or ["float32"] * len(models))[i])
    return e.start(thread=thread)


def _prompts(n, seed=0, lo=1, hi=60):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def _assert_pool_empty(e):
    st = e.stats()
    for name in e.models:
        assert e.alloc.used_blocks(name) == 0
        assert st.models[name].blocks_held == 0 and st.models[name].running == 0
    assert st.pool.rows_free == st.pool.rows_total


def test_no_compilation_after_warmup(tiny):
    e = _engine(tiny, dtypes=["float32", "bfloat16"], context_buckets=(32,),
                warmup=True)
    compiled = e.compiled_steps()
    assert compiled > 0
    hs = []
    for i, p in enumerate(_prompts(20, seed=1, hi=100)):  # chunked prompts, decode of 1-8
        sp = SamplingParams(max_tokens=1 + i % 9, temperature=[0, 0.8][i % 2], top_k=i % 3 * 5,
                            seed=i, ignore_eos=True)
        hs.append(e.submit("ab"[i % 2], p, sp))
        if i % 4 == 0:
            e.step()
    e.run_until_idle()
    assert all(h.finished for h in hs)
    assert e.compiled_steps() == compiled


def test_two_models_interleave_and_match_alone(tiny):
    e = _engine(tiny)
    prompts = _prompts(10, seed=2)
    hs = [e.submit("ab"[i % 2], p, GREEDY) for i, p in enumerate(prompts)]
    order = []
    while e.step():
        order.append(e._iteration)
    batched = [h.result().token_ids for h in hs]
    assert e.stats().models["a"].steps > 0 and e.stats().models["b"].steps > 0
    alone = []
    for p in prompts:
        h = e.submit("a", p, GREEDY)
        e.run_until_idle()
        alone.append(h.result().token_ids)
    assert batched == alone
    _assert_pool_empty(e)


def test_abort_frees_blocks_at_once(tiny):
    e = _engine(tiny)
    hs = [e.submit("a", p, SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
          for p in _prompts(4, seed=3, lo=20, hi=40)]
    for _ in range(6):
        e.step()
    held = e.alloc.used_blocks("a")
    victim = hs[0]
    mine = len(e._models["a"].seqs[victim.id].blocks)
    assert mine > 0
    victim.abort()
    e._drain_inbox()  # what the next iteration does first
    assert e.alloc.used_blocks("a") == held - mine
    assert victim.finished and victim.finish_reason == "abort"
    e.run_until_idle()
    assert [h.finish_reason for h in hs[1:]] == ["length"] * 3
    _assert_pool_empty(e)


def test_client_cancellation_frees_blocks(tiny):
    e = _engine(tiny, thread=True)
    try:
        async def consume():
            h = e.submit("a", list(range(30)), SamplingParams(max_tokens=100, temperature=0,
                                                              ignore_eos=True))
            async for d in h:
                if len(h.token_ids) >= 3:
                    break  # the client goes away mid-stream
            return h

        h = asyncio.run(consume())
        deadline = time.monotonic() + 10
        while e.stats().models["a"].blocks_held and time.monotonic() < deadline:
            time.sleep(0.01)
        assert h.finish_reason == "abort" and e.stats().models["a"].aborted == 1
        _assert_pool_empty(e)
    finally:
        e.shutdown()


def test_thousand_random_requests_leak_nothing(tiny):
    e = _engine(tiny, kv_budget_bytes=1 * 2**20)  # small pool: preemptions happen too
    rng = np.random.default_rng(7)
    hs = []
    for i in range(1000):
        p = rng.integers(0, 256, size=int(rng.integers(1, 40))).tolist()
        sp = SamplingParams(max_tokens=int(rng.integers(1, 10)),
                            temperature=float(rng.choice([0.0, 1.0])), seed=i,
                            stop_token_ids=(int(rng.integers(0, 256)),))
        hs.append(e.submit(["a", "b"][int(rng.integers(2))], p, sp))
        if rng.random() < 0.05:
            hs[int(rng.integers(len(hs)))].abort()
        if rng.random() < 0.3:
            e.step()
    e.run_until_idle()
    assert all(h.finished for h in hs)
    reasons = {h.finish_reason for h in hs}
    assert reasons <= {"stop", "length", "abort"} and "abort" in reasons
    st = e.stats()
    assert sum(m.finished + m.aborted for m in st.models.values()) == 1000
    _assert_pool_empty(e)


def test_preemption_keeps_output(tiny):
    sp = SamplingParams(max_tokens=40, temperature=0.9, seed=3, ignore_eos=True)
    prompts = _prompts(8, seed=4, lo=10, hi=30)
    roomy = _engine(tiny, models=("a",), max_model_len=64)
    want = [h.result().token_ids for h in [roomy.submit("a", p, sp) for p in prompts]
            if roomy.run_until_idle() or True]
    # 8 sequences growing to ~60 tokens (15 blocks each) in a pool far smaller than that.
    tight = _engine(tiny, models=("a",), kv_budget_bytes=256 * 1024, max_model_len=64)
    hs = [tight.submit("a", p, sp) for p in prompts]
    tight.run_until_idle()
    assert tight.stats().models["a"].preemptions > 0
    assert [h.result().token_ids for h in hs] == want
    ms = [h.metrics for h in hs]  # per request, public
    assert sum(m.preemptions for m in ms) == tight.stats().models["a"].preemptions
    for m in ms:
        assert m.arrival <= m.first_scheduled <= m.first_token <= m.finished
        assert m.ttft == m.first_token - m.arrival and m.queued >= 0
    _assert_pool_empty(tight)


def test_compaction_moves_blocks_and_keeps_output(tiny):
    # b (bf16 KV, 4 blocks per slab) fills the pool with sequences of mixed lengths; as
    # they finish its slabs turn sparse, and a (f32, 2 per slab) arrives needing more slabs
    # than are free: the engine packs b's blocks (a device copy and new page tables).
    e = _engine(tiny, dtypes=["float32", "bfloat16"], kv_budget_bytes=32 * 6144,
                context_buckets=(32,), warmup=True)
    compiled = e.compiled_steps()
    b_work = [(p, SamplingParams(max_tokens=4 + 5 * (i % 8), temperature=0, ignore_eos=True))
              for i, p in enumerate(_prompts(14, seed=5, lo=6, hi=20))]
    a_work = [(p, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
              for p in _prompts(6, seed=6, lo=24, hi=40)]
    hs = [e.submit("b", p, sp) for p, sp in b_work]
    for _ in range(30):
        e.step()
    hs += [e.submit("a", p, sp) for p, sp in a_work]
    e.run_until_idle()
    st = e.stats()
    assert st.models["b"].blocks_moved > 0 and st.models["a"].blocks_moved == 0
    assert e.alloc.bytes_moved == st.models["b"].blocks_moved * e.alloc.fmt("b").block_bytes
    assert e.compiled_steps() == compiled  # block copies were compiled at warm-up
    got = [h.result().token_ids for h in hs]
    alone = []
    for name, (p, sp) in [("b", w) for w in b_work] + [("a", w) for w in a_work]:
        h = e.submit(name, p, sp)
        e.run_until_idle()
        alone.append(h.result().token_ids)
    assert got == alone
    _assert_pool_empty(e)


def test_bad_requests_raise_and_engine_keeps_serving(tiny):
    e = _engine(tiny, models=("a",))
    with pytest.raises(KeyError, match="not served"):
        e.submit("zzz", [1, 2], GREEDY)
    for prompt, match in (([], "empty"), ([1, 300], "token ids"), ([1] * 128, "context")):
        with pytest.raises(RequestRejected, match=match) as err:
            e.submit("a", prompt, GREEDY)
        assert err.value.param == "prompt" and isinstance(err.value, ValueError)
    h = e.submit("a", [1, 2, 3], GREEDY)
    e.run_until_idle()
    assert len(h.result().token_ids) == GREEDY.max_tokens


def test_request_larger_than_pool_is_refused(tiny):
    e = _engine(tiny, models=("a",), kv_budget_bytes=64 * 1024)
    cap = e._models["a"].max_blocks
    with pytest.raises(RequestRejected, match="KV blocks") as err:
        e.submit("a", [1] * 100, SamplingParams(max_tokens=27))
    assert err.value.param == "max_tokens"
    assert cap * 4 < 127


def test_failed_step_fails_its_batch_and_the_engine_goes_on(tiny):
    e = _engine(tiny)
    prompts = _prompts(4, seed=5, lo=5, hi=20)
    want = []
    for p in prompts[2:]:
        h = e.submit("b", p, GREEDY)
        e.run_until_idle()
        want.append(h.result().token_ids)
    ha = [e.submit("a", p, GREEDY) for p in prompts[:2]]
    hb = [e.submit("b", p, GREEDY) for p in prompts[2:]]
    for _ in range(4):
        e.step()
    runner = e._models["a"].runner
    real = runner.step

    def broken(pool, batch):  # fails after the pool was donated, as a crash in XLA would
        pool.delete()
        raise RuntimeError("device fault")

    runner.step = broken
    while not all(h.finished for h in ha):
        e.step()
    runner.step = real
    e.run_until_idle()
    assert [h.finish_reason for h in ha] == ["error", "error"]
    assert "device fault" in ha[0].error
    assert [h.result().token_ids for h in hb] == want  # b's KV was lost and recomputed
    _assert_pool_empty(e)


def _dense_logprobs(tiny, ids):
    """Log-softmax of the dense reference forward at every position (float32)."""
    from fineserve_jax.runner import DenseRunner

    params, _ = tiny
    r = DenseRunner(CFG, params, "float32")
    logits = np.asarray(r.logits(np.asarray(ids, np.int32)[None]))[0]
    return np.asarray(jax.nn.log_softmax(logits, axis=-1))


def test_logprobs_of_prompt_and_generated_tokens(tiny):
    # A 45-token prompt is prefilled in chunks of 32 and 13 tokens; every prompt token's
    # logprob and top-3 must be the dense forward's, as must every generated token's.
    e = _engine(tiny, models=("a",), warmup=True, context_buckets=(32,))
    compiled = e.compiled_steps()
    prompt = _prompts(1, seed=3, lo=45, hi=46)[0]
    sp = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=3,
                        prompt_logprobs=3)
    h = e.submit("a", prompt, sp)
    plain = e.submit("a", prompt, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    e.run_until_idle()
    assert h.token_ids == plain.token_ids and plain.logprobs == [] and plain.prompt_logprobs is None
    ref = _dense_logprobs(tiny, prompt + h.token_ids)
    assert h.prompt_logprobs[0] is None and len(h.prompt_logprobs) == len(prompt)
    got = h.prompt_logprobs[1:] + h.logprobs
    assert [t.token_id for t in got] == (prompt + h.token_ids)[1:]
    for pos, t in enumerate(got):  # entry for token pos + 1, predicted at position pos
        assert t.logprob == pytest.approx(ref[pos, t.token_id], abs=2e-4)
        order = np.argsort(-ref[pos], kind="stable")
        assert [i for i, _ in t.top] == order[:3].tolist()
        assert t.rank == 1 + int((ref[pos] > ref[pos, t.token_id] + 1e-5).sum())
    assert all(t.rank == 1 for t in h.logprobs)  # greedy picks the best token
    # Scoring only: max_tokens=0 returns the prompt's logprobs and no token.
    s = e.submit("a", prompt, SamplingParams(max_tokens=0, prompt_logprobs=0))
    e.run_until_idle()
    assert s.finish_reason == "length" and s.token_ids == []
    assert [t.logprob for t in s.prompt_logprobs[1:]] == [t.logprob for t in h.prompt_logprobs[1:]]
    assert all(t.top == [] for t in s.prompt_logprobs[1:])
    assert e.compiled_steps() == compiled
    _assert_pool_empty(e)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)


class _SlowPrefill:
    """A cost model that says every prefill step takes a second."""

    def prefill_time(self, chunks, contexts):
        return 1.0

    def decode_time(self, contexts):
        return 0.001


@pytest.mark.parametrize("on_miss", ["reject", "best-effort"])
def test_slo_scheduler_sheds_or_serves_a_hopeless_request(tiny, on_miss):
    from schedulers.batching import SLO
    params, tok = tiny
    e = Engine(EngineConfig(**{"kv_budget_bytes": 2 * 2**20, **SMALL, "on_slo_miss": on_miss}))
    e.add_model("tight", CFG, params, tok, dtype="float32", slo=SLO(ttft_s=0.5),
                cost=_SlowPrefill())
    e.add_model("free", CFG, params, tok, dtype="float32")
    e.start(thread=False)
    h = e.submit("tight", [5, 6, 7], GREEDY)
    ok = e.submit("free", [5, 6, 7], GREEDY)
    e.run_until_idle()
    assert len(ok.result().token_ids) == 12
    st = e.stats().models["tight"]
    if on_miss == "reject":
        assert h.finish_reason == "dropped" and "time-to-first-token SLO" in h.error
        # the cause alone: the server's 503 adds "retry later" once (app._dropped)
        assert h.error.endswith("at the current load")
        assert st.dropped == 1 and h.token_ids == []
    else:
        assert len(h.result().token_ids) == 12 and st.dropped == 0
    assert e.scheduler.on_miss == on_miss
    assert st.slo_misses == 1
    _assert_pool_empty(e)


class _PastTheBounds:
    """Predicts every prefill at 1000 s and every decode at 0.1 us: each measured step is
    past the correction's bounds on its side (0.5x and 2x), on any machine, so what the
    engine learns from the steps does not depend on how fast they ran."""

    def prefill_time(self, chunks, contexts):
        return 1000.0

    def decode_time(self, contexts):
        return 1e-7


@pytest.mark.parametrize("weight", [0.0, 0.3])
def test_engine_corrects_its_cost_model_from_the_steps_it_runs(tiny, weight):
    """Each step's measured time moves the scheduler's prediction: the factors are the
    clamped, exponentially weighted geometric mean of measured/predicted over the step
    log, per kind (recomputed here from the log); the model keeps the uncorrected cost."""
    params, tok = tiny
    base = _PastTheBounds()
    e = Engine(EngineConfig(**{"kv_budget_bytes": 2 * 2**20, **SMALL,
                               "cost_calibration": weight}))
    e.add_model("m", CFG, params, tok, dtype="float32", cost=base)
    e.start(thread=False)
    handles = [e.submit("m", [1, 2, 3 + i], GREEDY) for i in range(3)]
    e.run_until_idle()
    assert all(len(h.result().token_ids) == 12 for h in handles)
    assert e._models["m"].cost is base and e.model_spec("m").cost is base
    if not weight:
        assert e._models["m"].sched.cost is base and e.speed is None
        assert e.cost_factors("m") == {"prefill": 1.0, "decode": 1.0}
        snap = e.cost_snapshot("m")  # the profile as it is, as a fixed ScaledCost
        assert snap.base is base and snap.prefill_time([3], [3]) == pytest.approx(1000.0)
        return
    # The engine's speed moves first (towards each step's residual), the model's own
    # factor of the step's kind then towards what is left; both stay within the bounds.
    from schedulers.calibration import OWN_SHARE
    clamp = lambda f: min(max(f, 0.5), 2.0)  # noqa: E731
    log_s, log_f = 0.0, {"prefill": 0.0, "decode": 0.0}
    for r in e.step_log.between(0.0):
        pred = 1000.0 if r.kind == "prefill" else 1e-7
        log_r = math.log(clamp(r.run_s / pred))
        used = math.log(clamp(math.exp(log_f[r.kind] + log_s)))
        log_s = math.log(clamp(math.exp(log_s + weight * (log_r - used))))
        own = weight * OWN_SHARE  # the model's own factors learn more slowly
        log_f[r.kind] = math.log(clamp(math.exp((1 - own) * log_f[r.kind]
                                                + own * (log_r - log_s))))
    want = {k: clamp(math.exp(v + log_s)) for k, v in log_f.items()}
    assert e.speed.factor == pytest.approx(math.exp(log_s), rel=1e-9)
    assert e.cost_factors("m") == pytest.approx(want, rel=1e-9)
    # Prefills ran faster than predicted and decodes slower: the model's own factors
    # moved apart (the engine's speed takes the part the two kinds share).
    assert math.exp(log_f["prefill"]) < 1.0 < math.exp(log_f["decode"])
    st = e.stats().models["m"]
    assert (st.cost_scale_prefill, st.cost_scale_decode) == pytest.approx(
        (want["prefill"], want["decode"]))
    assert e._models["m"].sched.cost.prefill_time([3], [3]) == pytest.approx(
        1000.0 * want["prefill"])
    snap = e.cost_snapshot("m")  # fixed: later steps move the live correction, not this
    assert snap.factors == pytest.approx(want, rel=1e-9)
    seen = e.speed.observed
    e.submit("m", [9, 9, 9], GREEDY)
    e.run_until_idle()
    assert snap.factors == pytest.approx(want, rel=1e-9)
    assert e.speed.observed > seen  # the new steps moved the live correction on


def test_models_and_engines_on_a_device_share_its_speed(tiny):
    """Steps of one model move the device's speed, which every model's predictions carry:
    a model that never stepped, on the same engine or on another engine given the same
    ``DeviceSpeed``, is predicted at the speed the stepping model measured, while its own
    factors stay 1."""
    from schedulers.calibration import DeviceSpeed
    params, tok = tiny
    speed = DeviceSpeed(weight=0.3)
    engines = [Engine(EngineConfig(**{"kv_budget_bytes": 2 * 2**20, **SMALL,
                                      "cost_calibration": 0.3}), speed=speed)
               for _ in range(2)]
    for e in engines:
        for name in ("busy", "idle"):
            e.add_model(name, CFG, params, tok, dtype="float32", cost=_SlowPrefill())
        e.start(thread=False)
    assert all(e.speed is speed for e in engines)
    h = engines[0].submit("busy", [1, 2, 3], GREEDY)
    engines[0].run_until_idle()
    assert len(h.result().token_ids) == 12
    assert speed.observed == len(engines[0].step_log.between(0.0)) > 1
    assert speed.factor != 1.0
    for e in engines:
        idle = e._models["idle"].sched.cost
        assert idle.observed == {"prefill": 0, "decode": 0}
        assert e.cost_factors("idle") == pytest.approx(
            {"prefill": speed.factor, "decode": speed.factor}, rel=1e-12)
        assert idle.decode_time([4]) == pytest.approx(0.001 * speed.factor)
        assert e.cost_snapshot("idle").decode_time([4]) == pytest.approx(0.001 * speed.factor)
    # The stepping model's own factors hold the rest: own x speed is what it predicts with.
    busy = engines[0]._models["busy"].sched.cost
    assert busy.observed["decode"] > 0
    assert busy.factors["decode"] == pytest.approx(
        min(max(busy._factors["decode"] * speed.factor, 0.5), 2.0))
    # Without calibration an engine has no speed of its own.
    assert Engine(EngineConfig(cost_calibration=0.0)).speed is None


def test_start_profiles_models_with_slos(tiny):
    from schedulers.batching import SLO
    params, tok = tiny
    e = Engine(EngineConfig(**{"kv_budget_bytes": 2 * 2**20, **SMALL, "profile_reps": 1}))
    e.add_model("slo", CFG, params, tok, dtype="float32", slo=SLO(ttft_s=30.0, tpot_s=5.0))
    e.add_model("plain", CFG, params, tok, dtype="float32")
    e.start(thread=False)
    cost = e._models["slo"].cost  # the profile; the scheduler predicts with it corrected
    assert e._models["slo"].sched.cost.base is cost
    assert cost is not None and e._models["plain"].sched.cost is None
    # Bucketed: a batch costs what its padded shape measured; more work never costs less.
    assert 0 < cost.decode_time([5]) <= cost.decode_time([5] * 8) <= cost.decode_time([100] * 8)
    assert cost.prefill_time([3], [3]) == cost.prefill_time([8], [8])  # both pad to (2, 8, 8)
    h = e.submit("slo", [1, 2, 3], GREEDY)
    steps = e.run_until_idle()
    assert len(h.result().token_ids) == 12
    # The step log has every iteration, its rows, and the times around the jitted step.
    from fineserve_jax.engine.steplog import summarize

    recs = e.step_log.between(0.0)
    assert len(recs) == steps and [r.kind for r in recs[:2]] == ["prefill", "decode"]
    assert recs[0].chunks == (3,) and recs[0].contexts == (3,) and recs[-1].contexts == (14,)
    assert all(r.start <= r.run_start <= r.run_end <= r.end for r in recs)
    s = summarize(recs, {"slo": cost})
    assert s["decode"]["steps"] == steps - 1 and s["prefill"]["steps"] == 1
    assert s["decode"]["predicted"]["sum_s"] == pytest.approx(
        sum(cost.decode_time([c]) for r in recs[1:] for c in r.contexts))
