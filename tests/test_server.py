"""The HTTP front end on the real model: completions, chat, streaming, errors."""

from __future__ import annotations

import contextlib
import json
import time

import pytest
from starlette.testclient import TestClient

from fineserve_jax.engine import Engine, EngineConfig
from fineserve_jax.server import build_app


@pytest.fixture(scope="module")
def client(smollm2_f32):
    llm = smollm2_f32
    engine = Engine(EngineConfig(kv_budget_bytes=64 * 2**20, max_model_len=1024, warmup=False))
    engine.add_model("smol", llm.config, llm.engine.weights(llm.name), llm.tokenizer,
                     dtype=llm.dtype)
    engine.start()
    with TestClient(build_app(engine)) as c:
        yield c
    engine.shutdown()


def test_models_and_health(client):
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["smol"] and data[0]["precision"] == "bf16"
    assert client.get("/health").json()["status"] == "ok"


def test_completion_greedy(client):
    r = client.post("/v1/completions", json={"model": "smol", "prompt": "The capital of France is",
                                             "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == " Paris.\n"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def test_completion_token_ids_prompt(client):
    r = client.post("/v1/completions", json={"model": "smol", "prompt": [504, 3575, 282, 4649, 314],
                                             "max_tokens": 1, "temperature": 0})
    assert r.json()["choices"][0]["text"] == " Paris"


def test_stream_sse(client):
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "smol", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 20, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert "Paris" in text
    assert chunks[-1]["usage"]["completion_tokens"] > 0 and chunks[-1]["choices"] == []


@pytest.mark.parametrize("body,status,param", [
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"model": "smol", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "smol", "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": "smol", "prompt": 5}, 400, "prompt"),
    ({"model": "smol", "prompt": [1, 99999999]}, 400, "prompt"),
    ({"model": "smol", "prompt": "x", "top_p": 0}, 400, "top_p"),
])
def test_bad_requests_get_openai_errors(client, body, status, param):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["param"] == param and err["message"]
    # ...and the server keeps serving.
    ok = client.post("/v1/completions", json={"model": "smol", "prompt": "Hi", "max_tokens": 1})
    assert ok.status_code == 200


def test_invalid_json(client):
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def _sse_events(r) -> list[dict]:
    lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_stream_echo_logprobs_and_n(client):
    prompt = "The capital of France is"
    body = {"model": "smol", "prompt": prompt, "max_tokens": 3, "temperature": 0,
            "echo": True, "logprobs": 2}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    assert whole["text"].startswith(prompt) and whole["text"].endswith(" Paris.\n")
    lp = whole["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["tokens"]) == 5 + 3 and "".join(lp["tokens"]) == whole["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(8)]
    assert all(len(t) == 2 for t in lp["top_logprobs"][1:])
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = _sse_events(r)
    streamed = [c for ev in events for c in ev["choices"]]
    assert "".join(c["text"] for c in streamed) == whole["text"]
    assert streamed[0]["text"].startswith(prompt)  # the prompt leads the first chunk
    merged = [x for c in streamed if c["logprobs"] for x in c["logprobs"]["token_logprobs"]]
    assert merged[0] is None and merged[1:] == pytest.approx(lp["token_logprobs"][1:])
    offsets = [x for c in streamed if c["logprobs"] for x in c["logprobs"]["text_offset"]]
    assert offsets == lp["text_offset"]
    # n=2, streamed: both choices run to their end under their own index.
    with client.stream("POST", "/v1/completions", json={
            "model": "smol", "prompt": "Once", "max_tokens": 4, "n": 2, "seed": 3,
            "stream": True, "stream_options": {"include_usage": True}}) as r:
        events = _sse_events(r)
    done = {c["index"]: c["finish_reason"] for ev in events for c in ev["choices"]
            if c["finish_reason"]}
    assert done == {0: "length", 1: "length"}
    assert events[-1]["usage"]["completion_tokens"] == 8


def test_a_failing_step_is_a_500_body_and_the_server_goes_on(client):
    engine = client.app.state.server.routes["smol"]
    runner = engine._models["smol"].runner
    real = runner.step

    def broken(pool, batch):
        raise RuntimeError("device fault")

    runner.step = broken
    try:
        r = client.post("/v1/completions", json={"model": "smol", "prompt": "Hi",
                                                 "max_tokens": 2})
    finally:
        runner.step = real
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error"
    assert "device fault" not in r.text and "Traceback" not in r.text
    ok = client.post("/v1/completions", json={"model": "smol", "prompt": "The capital of "
                                              "France is", "max_tokens": 3, "temperature": 0})
    assert ok.json()["choices"][0]["text"] == " Paris.\n"


@contextlib.contextmanager
def _shedding(engine):
    """Every request submitted meanwhile is dropped by the engine at once, as the local
    scheduler drops one it predicts to miss its TTFT SLO."""
    real = engine.submit

    def submit_then_drop(*a, **kw):
        h = real(*a, **kw)
        engine.drop(h.id, "it cannot meet its TTFT SLO")
        return h

    engine.submit = submit_then_drop
    try:
        yield
    finally:
        engine.submit = real


def test_a_request_the_engine_sheds_is_a_503_with_retry_after(client):
    engine = client.app.state.server.routes["smol"]
    with _shedding(engine):
        r = client.post("/v1/completions", json={"model": "smol", "prompt": "Hi",
                                                 "max_tokens": 50})
        with client.stream("POST", "/v1/completions", json={
                "model": "smol", "prompt": "Hi", "max_tokens": 50, "stream": True}) as s:
            events = _sse_events(s)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    err = r.json()["error"]
    assert err["code"] == "dropped" and "TTFT SLO" in err["message"]
    assert events[-1]["error"]["code"] == "dropped"
    assert engine.stats().models["smol"].dropped == 2
    text = client.get("/metrics").text
    assert 'fineserve_requests_dropped_total{model="smol",reason="slo"} 2.0' in text


def test_slo_attainment_on_the_metrics_endpoint(client):
    # A model served with latency targets counts each request as met or missed (a shed one
    # is missed); the same engine behind an app without targets counts nothing.
    engine = client.app.state.server.routes["smol"]
    targets = {"smol": {"ttft_slo_ms": 600_000.0, "tpot_slo_ms": 600_000.0}}
    with TestClient(build_app(engine, model_extra=targets)) as c:
        ok = c.post("/v1/completions", json={"model": "smol", "prompt": "Hi", "max_tokens": 3})
        with _shedding(engine):
            shed = c.post("/v1/completions", json={"model": "smol", "prompt": "Hi",
                                                   "max_tokens": 3})
        text = c.get("/metrics").text
    assert ok.status_code == 200 and shed.status_code == 503
    assert 'fineserve_requests_slo_total{model="smol",result="met"} 1.0' in text
    assert 'fineserve_requests_slo_total{model="smol",result="missed"} 1.0' in text
    assert "fineserve_requests_slo_total{" not in client.get("/metrics").text


def test_stream_whose_client_is_gone_before_the_first_byte_is_aborted(client):
    import asyncio

    app, server = client.app, client.app.state.server
    engine = server.routes["smol"]
    before = engine.stats().models["smol"].aborted
    body = json.dumps({"model": "smol", "prompt": "Tell me a story", "max_tokens": 200,
                       "ignore_eos": True, "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions",
             "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    msgs = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if msgs:
            return msgs.pop()
        await asyncio.sleep(3600)

    async def send(message):
        if message["type"] == "http.response.start":
            raise OSError("connection reset by peer")

    async def call():
        try:
            await app(scope, receive, send)
        except Exception:
            pass  # the server reports the broken connection; what matters is below

    asyncio.run(call())
    deadline = time.monotonic() + 30
    while engine.stats().models["smol"].aborted == before:
        assert time.monotonic() < deadline, "the request was never aborted"
        time.sleep(0.05)
    assert server.inflight("smol") == 0 and not server._open
    st = engine.stats().models["smol"]
    assert st.running == 0 and st.waiting == 0 and st.blocks_held == 0
