"""The HTTP front end on the real model: completions, chat, streaming, errors."""

from __future__ import annotations

import json

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
