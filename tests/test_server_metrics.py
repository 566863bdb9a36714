"""Server metrics: counters and histograms the handlers update, engine gauges at scrape time.

The engines are stand-ins exposing ``device``, ``models`` and ``stats()``; the stats are the
real ``EngineStats`` with the pool figures of a real ``KVSlabAllocator``. Every value is read
back from the rendered exposition text, as a Prometheus server would read it.
"""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from fineserve_jax.engine.handle import RequestMetrics
from fineserve_jax.engine.stats import EngineModelStats, EngineStats
from fineserve_jax.kvslab import BlockFormat, KVSlabAllocator
from fineserve_jax.server.metrics import ServerMetrics

# 256 B (bf16) and 160 B (fp8 + scale) blocks of 4 tokens; 24 slabs of 7680 B.
BF16 = BlockFormat(2, 1, 8, 4, 2, name="bf16")
FP8 = BlockFormat(2, 1, 8, 4, 1, 2, name="fp8")
SLAB = 7680


def model_stats(name, **kw):
    counts = ("waiting", "running", "prefilling", "preempted_waiting", "preemptions",
              "finished", "aborted", "dropped", "failed", "steps", "tokens_generated",
              "peak_running", "blocks_held", "blocks_moved")
    base = {"name": name, "precision": "bf16", "kv_format": "bf16"} | dict.fromkeys(counts, 0)
    return EngineModelStats(**(base | kw))


class FakeEngine:
    def __init__(self, device, stats):
        self.device, self._stats = device, stats

    @property
    def models(self):
        return tuple(self._stats.models)

    def stats(self):
        return self._stats


def samples(metrics: ServerMetrics) -> dict:
    """{(sample name, sorted label items): value} of everything ``render`` exposes."""
    body, ctype = metrics.render()
    assert ctype.startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


@pytest.fixture
def engines():
    alloc = KVSlabAllocator(24 * SLAB, [BF16, FP8], slab_bytes=SLAB)
    alloc.add_model("llama", BF16)
    alloc.add_model("qwen", FP8)
    alloc.allocate("llama", 31)  # 30 bf16 blocks per slab: 2 slabs
    alloc.allocate("qwen", 1)  # 1 slab
    pool = alloc.stats({"llama": 122, "qwen": 3})
    started = EngineStats(
        {"llama": model_stats("llama", waiting=3, running=2, preemptions=5, blocks_held=31,
                              cost_scale_prefill=1.25, cost_scale_decode=0.9),
         "qwen": model_stats("qwen", kv_format="fp8", running=1, blocks_held=1)},
        pool, iterations=40, compiled_steps=6)
    idle = EngineStats({"mistral": model_stats("mistral", waiting=1)}, None, 0, 0)
    return [FakeEngine("cuda:0", started), FakeEngine(None, idle)]


def test_engine_gauges_read_at_scrape_time(engines):
    s = samples(ServerMetrics(engines))
    assert s[("fineserve_num_requests_waiting", (("model", "llama"),))] == 3
    assert s[("fineserve_num_requests_waiting", (("model", "mistral"),))] == 1
    assert s[("fineserve_num_requests_running", (("model", "llama"),))] == 2
    assert s[("fineserve_num_requests_running", (("model", "qwen"),))] == 1
    assert s[("fineserve_num_preemptions_total", (("model", "llama"),))] == 5
    assert s[("fineserve_kv_blocks_held", (("model", "llama"),))] == 31
    assert s[("fineserve_cost_model_scale", (("kind", "prefill"), ("model", "llama")))] == 1.25
    assert s[("fineserve_cost_model_scale", (("kind", "decode"), ("model", "llama")))] == 0.9
    assert s[("fineserve_cost_model_scale", (("kind", "decode"), ("model", "qwen")))] == 1.0
    dev = (("device", "cuda:0"),)
    assert s[("fineserve_kv_slabs", dev)] == 24
    assert s[("fineserve_kv_slabs_free", dev)] == 21
    assert s[("fineserve_kv_slabs_shared", dev)] == 0
    assert s[("fineserve_kv_slabs_owned", (("device", "cuda:0"), ("model", "llama")))] == 2
    assert s[("fineserve_kv_slabs_owned", (("device", "cuda:0"), ("model", "qwen")))] == 1
    assert s[("fineserve_kv_pool_bytes", dev)] == 24 * SLAB
    # 3 slabs held; live: 122 tokens x 64 B (bf16) + 3 tokens x 40 B (fp8 with scales).
    frag = (3 * SLAB - 122 * 64 - 3 * 40) / (24 * SLAB)
    assert s[("fineserve_kv_fragmentation_ratio", dev)] == pytest.approx(frag)
    assert s[("fineserve_compiled_steps", dev)] == 6
    assert s[("fineserve_engine_iterations_total", dev)] == 40
    # The engine not started yet has no pool: no pool series under its (empty) device.
    assert s[("fineserve_compiled_steps", (("device", ""),))] == 0
    assert ("fineserve_kv_slabs", (("device", ""),)) not in s


def test_gauges_follow_the_engine(engines):
    m = ServerMetrics(engines)
    assert samples(m)[("fineserve_num_requests_waiting", (("model", "llama"),))] == 3
    old = engines[0]._stats
    engines[0]._stats = EngineStats({**old.models, "llama": model_stats("llama", waiting=0)},
                                    old.pool, old.iterations + 1, old.compiled_steps)
    s = samples(m)
    assert s[("fineserve_num_requests_waiting", (("model", "llama"),))] == 0
    assert s[("fineserve_engine_iterations_total", (("device", "cuda:0"),))] == 41


def test_request_latencies_and_tokens(engines):
    m = ServerMetrics(engines)
    m.request_started("llama", "chat")
    m.request_started("llama", "chat")
    m.request_started("qwen", "completions")
    # TTFT 0.25 s, then 4 more tokens in 1 s: 0.25 s per output token; 1.25 s end to end.
    m.request_finished("llama", "stop", RequestMetrics(10.0, 10.05, 10.25, 11.25), 7, 5)
    # One token: no TPOT. No first token (aborted in prefill): no TTFT, still an e2e.
    m.request_finished("llama", "length", RequestMetrics(20.0, 20.5, 21.0, 21.0), 3, 1)
    m.request_finished("llama", "abort", RequestMetrics(30.0, None, None, 32.0), 4, 0)
    s = samples(m)
    llama = (("model", "llama"),)
    assert s[("fineserve_requests_total", (("endpoint", "chat"), ("model", "llama")))] == 2
    assert s[("fineserve_requests_total", (("endpoint", "completions"), ("model", "qwen")))] == 1
    assert s[("fineserve_requests_finished_total", (("finish_reason", "stop"), *llama))] == 1
    assert s[("fineserve_requests_finished_total", (("finish_reason", "abort"), *llama))] == 1
    assert s[("fineserve_prompt_tokens_total", llama)] == 14
    assert s[("fineserve_generation_tokens_total", llama)] == 6

    assert s[("fineserve_time_to_first_token_seconds_count", llama)] == 2
    assert s[("fineserve_time_to_first_token_seconds_sum", llama)] == pytest.approx(1.25)
    ttft_le = lambda le: s[("fineserve_time_to_first_token_seconds_bucket", (("le", le), *llama))]
    assert (ttft_le("0.1"), ttft_le("0.25"), ttft_le("0.5"), ttft_le("1.0")) == (0, 1, 1, 2)

    assert s[("fineserve_time_per_output_token_seconds_count", llama)] == 1
    assert s[("fineserve_time_per_output_token_seconds_sum", llama)] == pytest.approx(0.25)
    assert s[("fineserve_e2e_request_latency_seconds_count", llama)] == 3
    assert s[("fineserve_e2e_request_latency_seconds_sum", llama)] == pytest.approx(4.25)
    assert s[("fineserve_request_queue_time_seconds_count", llama)] == 2
    assert s[("fineserve_request_queue_time_seconds_sum", llama)] == pytest.approx(0.55)


def test_errors_drops_disconnects_and_unknown_models(engines):
    m = ServerMetrics(engines)
    m.request_rejected(None, 400, "bad json")
    m.request_rejected("no-such-model", 404, "unknown model")
    m.request_rejected("qwen", 400, "bad max_tokens")
    m.request_dropped("llama", "queue_full")
    m.request_dropped("gpt-x", "queue_full")  # client-chosen names never become labels
    m.client_disconnected("qwen")
    m.request_started("gpt-x", "chat")
    s = samples(m)
    assert s[("fineserve_request_errors_total", (("model", ""), ("status", "400")))] == 1
    assert s[("fineserve_request_errors_total", (("model", ""), ("status", "404")))] == 1
    assert s[("fineserve_request_errors_total", (("model", "qwen"), ("status", "400")))] == 1
    assert s[("fineserve_requests_dropped_total", (("model", "llama"), ("reason", "queue_full")))] == 1
    assert s[("fineserve_requests_dropped_total", (("model", ""), ("reason", "queue_full")))] == 1
    assert s[("fineserve_client_disconnects_total", (("model", "qwen"),))] == 1
    assert s[("fineserve_requests_total", (("endpoint", "chat"), ("model", "")))] == 1
    assert not any("gpt-x" in dict(labels).values() for _, labels in s)


def test_registries_are_separate(engines):
    a, b = ServerMetrics(engines), ServerMetrics(engines[1:])  # same names: no clash
    a.request_started("llama", "chat")
    assert samples(a)[("fineserve_requests_total", (("endpoint", "chat"), ("model", "llama")))] == 1
    assert not any(n == "fineserve_requests_total" for n, _ in samples(b))
    assert REGISTRY.get_sample_value("fineserve_requests_total",
                                     {"model": "llama", "endpoint": "chat"}) is None


def test_slo_attainment_counts_met_and_missed(engines):
    from fineserve_jax.server.app import Server
    from fineserve_jax.server.protocol import Limits
    from schedulers.batching import SLO

    # llama has targets (TTFT 0.5 s, TPOT 0.2 s); qwen has none and is never counted.
    m = ServerMetrics(engines, {"llama": SLO(ttft_s=0.5, tpot_s=0.2), "qwen": None})
    m.request_finished("llama", "stop", RequestMetrics(10.0, 10.0, 10.25, 11.0), 7, 5)  # met
    m.request_finished("llama", "length", RequestMetrics(20.0, 20.0, 20.75, 21.0), 3, 2)  # TTFT
    m.request_finished("llama", "length", RequestMetrics(30.0, 30.0, 30.25, 31.25), 3, 5)  # TPOT
    m.request_finished("llama", "dropped", RequestMetrics(40.0, None, None, 40.1), 3, 0)
    m.request_finished("llama", "abort", RequestMetrics(50.0, 50.0, 50.1, 50.2), 3, 1)  # not
    m.request_dropped("llama", "queue_full", requests=3)  # n=3 never reached an engine
    m.request_finished("qwen", "stop", RequestMetrics(10.0, 10.0, 10.1, 10.2), 3, 2)
    m.request_dropped("qwen", "queue_full", requests=1)
    s = samples(m)
    slo = lambda model, result: s.get(("fineserve_requests_slo_total",
                                       (("model", model), ("result", result))))
    assert (slo("llama", "met"), slo("llama", "missed")) == (1, 6)
    assert slo("qwen", "met") is None and slo("qwen", "missed") is None

    # The server takes each model's targets from its /v1/models fields (serve.py's
    # --model ...,ttft-slo=MS,tpot-slo=MS).
    srv = Server({"llama": engines[0], "qwen": engines[0]}, Limits(),
                 {"llama": {"ttft_slo_ms": 500.0, "tpot_slo_ms": 200.0}, "qwen": {}})
    assert srv.metrics.slos == {"llama": SLO(ttft_s=0.5, tpot_s=0.2)}
