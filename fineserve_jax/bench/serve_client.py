"""The HTTP side of ``bench serve``: stream requests at their arrival times and record
when each SSE chunk came (``bench/serve.py`` says what is measured and how it is summed).

Every time is ``time.perf_counter`` seconds from the start of the replay. A request fails
(``error`` is set) on a non-200 status, an error event in the stream, a transport error, or
a stream that ends without ``data: [DONE]``; a failure is a record, never an exception.
"""

from __future__ import annotations

import asyncio
import json
import time

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def request_body(req: dict, endpoint: str, ignore_eos: bool) -> dict:
    body = {"model": req["model"], "max_tokens": req["max_tokens"], "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": req["prompt"]}]
    else:
        body["prompt"] = req["prompt"]
    if ignore_eos:
        body["ignore_eos"] = True
    return body


async def stream_one(client, path: str, body: dict, t0: float) -> dict:
    """Send one streaming request; its times (seconds from ``t0``), tokens and error."""
    now = time.perf_counter
    rec = {"send_s": now() - t0, "first_s": None, "end_s": None, "chunk_s": [],
           "status": None, "error": None, "finish_reason": None, "prompt_tokens": None,
           "completion_tokens": None, "tokens_from": "usage"}
    done = False
    try:
        async with client.stream("POST", path, json=body) as resp:
            rec["status"] = resp.status_code
            if resp.status_code != 200:
                rec["error"] = f"HTTP {resp.status_code}: {_error_message(await resp.aread())}"
                rec["end_s"] = now() - t0
                return rec
            async for line in resp.aiter_lines():
                t = now() - t0
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    rec["error"] = f"error event: {obj['error'].get('message', obj['error'])}"
                    break
                if obj.get("usage"):
                    rec["prompt_tokens"] = obj["usage"].get("prompt_tokens")
                    rec["completion_tokens"] = obj["usage"].get("completion_tokens")
                for c in obj.get("choices") or ():
                    text = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
                    if text:
                        rec["chunk_s"].append(t)
                        if rec["first_s"] is None:
                            rec["first_s"] = t
                    rec["finish_reason"] = c.get("finish_reason") or rec["finish_reason"]
    except Exception as e:  # transport errors, bad JSON: a failed request, not a crash
        rec["error"] = f"{type(e).__name__}: {e}"
    rec["end_s"] = now() - t0
    if rec["error"] is None and not done:
        rec["error"] = "stream ended before [DONE]"
    if rec["completion_tokens"] is None:
        rec["completion_tokens"], rec["tokens_from"] = len(rec["chunk_s"]), "chunks"
    return rec


def _error_message(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["message"])[:200]
    except Exception:
        return raw.decode("utf-8", "replace")[:200]


def _client(url: str, api_key: str | None, timeout: float):
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # No connection limit: a pool that queues requests would hide the server's queueing
    # inside the client. trust_env=False: no proxy between the client and the server.
    return httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, trust_env=False,
                             timeout=httpx.Timeout(timeout, connect=10.0),
                             limits=httpx.Limits(max_connections=None,
                                                 max_keepalive_connections=None))


async def get_models(url: str, api_key: str | None, timeout: float = 30.0) -> dict:
    async with _client(url, api_key, timeout) as client:
        resp = await client.get("/v1/models")
        resp.raise_for_status()
        return resp.json()


async def replay(url: str, requests: list[dict], *, endpoint: str = "completions",
                 api_key: str | None = None, timeout: float = 600.0,
                 max_concurrency: int | None = None, ignore_eos: bool = False
                 ) -> tuple[list[dict], float]:
    """Send every request when its ``arrival_s`` is due: (per-request records, wall s)."""
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(req, t0):
        body = request_body(req, endpoint, ignore_eos)
        if sem is None:
            return await stream_one(client, ENDPOINTS[endpoint], body, t0)
        async with sem:
            return await stream_one(client, ENDPOINTS[endpoint], body, t0)

    async with _client(url, api_key, timeout) as client:
        tasks = []
        t0 = time.perf_counter()
        for req in requests:
            delay = t0 + req["arrival_s"] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(req, t0)))
        recs = await asyncio.gather(*tasks)
    out = []
    for i, (req, rec) in enumerate(zip(requests, recs)):
        out.append({"id": i, "model": req["model"], "arrival_s": req["arrival_s"],
                    "prompt_len": req.get("prompt_len"), "max_tokens": req["max_tokens"], **rec})
    if not out:
        return out, 0.0
    return out, max(r["end_s"] for r in out) - min(r["send_s"] for r in out)
