"""Prometheus metrics of the HTTP server: request counters and latency histograms the
handlers update, plus engine gauges read at scrape time.

Everything lives in one ``CollectorRegistry`` per ``ServerMetrics`` (never the process-wide
default), so several apps in one process (tests, benchmarks) keep separate figures.

Request metrics (updated by the server as requests come and go), labels in braces::

    fineserve_requests_total{model,endpoint}             accepted for processing
    fineserve_requests_finished_total{model,finish_reason}
    fineserve_request_errors_total{model,status}          rejected with an HTTP error
    fineserve_requests_dropped_total{model,reason}        shed by the server (queue full, SLO)
    fineserve_requests_slo_total{model,result}            models with latency targets only:
                                                          result "met" (both TTFT and TPOT)
                                                          or "missed" (late, dropped, lost)
    fineserve_client_disconnects_total{model}
    fineserve_prompt_tokens_total{model}
    fineserve_generation_tokens_total{model}
    fineserve_time_to_first_token_seconds{model}          histogram
    fineserve_time_per_output_token_seconds{model}        histogram
    fineserve_e2e_request_latency_seconds{model}          histogram
    fineserve_request_queue_time_seconds{model}           histogram: arrival to first step

Engine metrics (``Engine.stats()`` of every engine, per scrape)::

    fineserve_num_requests_waiting{model}                 queued, preempted ones included
    fineserve_num_requests_running{model}                 admitted: prefilling or decoding
    fineserve_num_preemptions_total{model}
    fineserve_kv_blocks_held{model}
    fineserve_cost_model_scale{model,kind}                measured / profiled step time
    fineserve_kv_slabs{device}                            rows of the KV pool (KV Slab: slabs)
    fineserve_kv_slabs_free{device}                       rows any model may take
    fineserve_kv_slabs_shared{device}                     rows shared by models (fixed page)
    fineserve_kv_slabs_owned{device,model}                rows held by one model / partition
    fineserve_kv_pool_bytes{device}
    fineserve_kv_fragmentation_ratio{device}              (reserved - live bytes) / pool bytes
    fineserve_compiled_steps{device}                      constant once warmed up
    fineserve_engine_iterations_total{device}

A ``model`` label only ever names a served model: a request naming anything else counts
under ``""``, so clients cannot grow the number of series.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from fineserve_jax.engine import Engine, RequestMetrics
    from schedulers.batching import SLO

# Buckets span a tiny model on a CPU down to a large one on a GPU under load.
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0, 120.0, 300.0)
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6,
                1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0,
               120.0, 300.0, 600.0, 1200.0)


class _EngineCollector:
    """Reads every engine's ``stats()`` when the registry is scraped."""

    def __init__(self, engines: Sequence[Engine]):
        self.engines = engines

    def collect(self):
        def gauge(name, doc, labels):
            return GaugeMetricFamily(name, doc, labels=labels)

        waiting = gauge("fineserve_num_requests_waiting", "Requests queued, not admitted.", ["model"])
        running = gauge("fineserve_num_requests_running", "Requests admitted: prefilling or "
                        "decoding.", ["model"])
        preempted = CounterMetricFamily("fineserve_num_preemptions", "Preemptions since start.",
                                        labels=["model"])
        blocks = gauge("fineserve_kv_blocks_held", "KV blocks held by the model's requests.",
                       ["model"])
        scale = gauge("fineserve_cost_model_scale", "Online correction of the model's step-"
                      "time cost model: measured over profiled time, per step kind.",
                      ["model", "kind"])
        slabs = gauge("fineserve_kv_slabs", "Rows (slabs) of the KV pool.", ["device"])
        free = gauge("fineserve_kv_slabs_free", "Rows holding nothing.", ["device"])
        shared = gauge("fineserve_kv_slabs_shared", "Rows holding several models' pages.",
                       ["device"])
        owned = gauge("fineserve_kv_slabs_owned", "Rows held by one model or partition.",
                      ["device", "model"])
        pool_bytes = gauge("fineserve_kv_pool_bytes", "Bytes of the KV pool.", ["device"])
        frag = gauge("fineserve_kv_fragmentation_ratio", "(Reserved - live KV bytes) / pool "
                     "bytes: memory held by a model that holds no live token.", ["device"])
        compiled = gauge("fineserve_compiled_steps", "Step compilations so far.", ["device"])
        iters = CounterMetricFamily("fineserve_engine_iterations", "Engine iterations.",
                                    labels=["device"])
        for engine in self.engines:
            st, dev = engine.stats(), engine.device or ""
            for m in st.models.values():
                waiting.add_metric([m.name], m.waiting)
                running.add_metric([m.name], m.running)
                preempted.add_metric([m.name], m.preemptions)
                blocks.add_metric([m.name], m.blocks_held)
                scale.add_metric([m.name, "prefill"], m.cost_scale_prefill)
                scale.add_metric([m.name, "decode"], m.cost_scale_decode)
            compiled.add_metric([dev], st.compiled_steps)
            iters.add_metric([dev], st.iterations)
            p = st.pool
            if p is None:  # engine not started: no pool yet
                continue
            slabs.add_metric([dev], p.rows_total)
            free.add_metric([dev], p.rows_free)
            shared.add_metric([dev], p.rows_shared)
            for owner, rows in p.rows_by_owner.items():
                owned.add_metric([dev, owner], rows)
            pool_bytes.add_metric([dev], p.pool_bytes)
            frag.add_metric([dev], p.fragmentation)
        yield from (waiting, running, preempted, blocks, scale, slabs, free, shared, owned,
                    pool_bytes, frag, compiled, iters)


class ServerMetrics:
    """The server's Prometheus registry: the handlers call the ``request_*`` verbs, the
    ``/metrics`` route returns ``render()``."""

    def __init__(self, engines: Sequence[Engine], slos: Mapping[str, SLO] | None = None):
        """``slos``: each served model's latency targets (a model without any is not
        counted in ``fineserve_requests_slo_total``)."""
        self.engines = list(engines)
        self.slos = {n: s for n, s in (slos or {}).items() if s is not None}
        self.registry = r = CollectorRegistry()
        self.requests = Counter("fineserve_requests", "Requests accepted for processing.",
                                ["model", "endpoint"], registry=r)
        self.finished = Counter("fineserve_requests_finished", "Requests finished.",
                                ["model", "finish_reason"], registry=r)
        self.errors = Counter("fineserve_request_errors", "Requests refused with an HTTP error.",
                              ["model", "status"], registry=r)
        self.dropped = Counter("fineserve_requests_dropped", "Requests shed by the server.",
                               ["model", "reason"], registry=r)
        self.slo = Counter("fineserve_requests_slo", "Requests of models with latency "
                           "targets: whether each met both its TTFT and TPOT targets (shed "
                           "and lost ones missed); met / (met + missed) is the SLO "
                           "attainment.", ["model", "result"], registry=r)
        self.disconnects = Counter("fineserve_client_disconnects",
                                   "Clients that left before their request finished.",
                                   ["model"], registry=r)
        self.prompt_tokens = Counter("fineserve_prompt_tokens", "Prompt tokens of finished "
                                     "requests.", ["model"], registry=r)
        self.generation_tokens = Counter("fineserve_generation_tokens", "Tokens generated for "
                                         "finished requests.", ["model"], registry=r)
        self.ttft = Histogram("fineserve_time_to_first_token_seconds", "Arrival to first token.",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("fineserve_time_per_output_token_seconds", "Mean time between "
                              "output tokens after the first.", ["model"], buckets=TPOT_BUCKETS,
                              registry=r)
        self.e2e = Histogram("fineserve_e2e_request_latency_seconds", "Arrival to finish.",
                             ["model"], buckets=E2E_BUCKETS, registry=r)
        self.queue_time = Histogram("fineserve_request_queue_time_seconds", "Arrival to the "
                                    "first engine step that ran the request.", ["model"],
                                    buckets=TTFT_BUCKETS, registry=r)
        r.register(_EngineCollector(self.engines))

    def _model(self, model: str | None) -> str:
        """The label for ``model``: itself if some engine serves it, else ``""``."""
        return model if model and any(model in e.models for e in self.engines) else ""

    def request_started(self, model: str, endpoint: str) -> None:
        self.requests.labels(self._model(model), endpoint).inc()

    def request_finished(self, model: str, finish_reason: str | None, metrics: RequestMetrics,
                         prompt_tokens: int, completion_tokens: int) -> None:
        """Counts a finished request and observes its latencies (those its timings allow)."""
        m = self._model(model)
        self.finished.labels(m, finish_reason or "").inc()
        if (slo := self.slos.get(m)) is not None and finish_reason != "abort":
            ok = finish_reason in ("stop", "length") and slo.met(metrics, completion_tokens)
            self.slo.labels(m, "met" if ok else "missed").inc()
        self.prompt_tokens.labels(m).inc(prompt_tokens)
        self.generation_tokens.labels(m).inc(completion_tokens)
        first, done = metrics.first_token, metrics.finished
        if metrics.first_scheduled is not None:
            self.queue_time.labels(m).observe(metrics.first_scheduled - metrics.arrival)
        if first is not None:
            self.ttft.labels(m).observe(first - metrics.arrival)
            if done is not None and completion_tokens > 1:
                self.tpot.labels(m).observe((done - first) / (completion_tokens - 1))
        if done is not None:
            self.e2e.labels(m).observe(done - metrics.arrival)

    def request_rejected(self, model: str | None, status_code: int, reason: str | None = None) -> None:
        """A request refused with HTTP ``status_code``. ``reason`` is for the caller's logs:
        it stays out of the labels, whose values must come from a small fixed set."""
        self.errors.labels(self._model(model), str(int(status_code))).inc()

    def request_dropped(self, model: str | None, reason: str, requests: int = 0) -> None:
        """A request shed. ``requests``: engine requests it would have made that never
        reached an engine (a full queue), each an SLO miss; the ones an engine shed or lost
        are counted when they finish (``request_finished``)."""
        m = self._model(model)
        self.dropped.labels(m, reason).inc()
        if requests and m in self.slos:
            self.slo.labels(m, "missed").inc(requests)

    def client_disconnected(self, model: str | None) -> None:
        self.disconnects.labels(self._model(model)).inc()

    def render(self) -> tuple[bytes, str]:
        """(exposition text, its content type) for the ``/metrics`` response."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
