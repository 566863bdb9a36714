"""Starlette app: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ``/health``.

Requests route by ``model`` to the engine serving it; each request's handle is fed by
that engine's thread through an ``asyncio.Queue``. Streaming responses are OpenAI
server-sent events ending in ``data: [DONE]``. Invalid requests get a 4xx with an
OpenAI-style error body naming the parameter; a client that disconnects has its request
aborted, which frees its KV blocks at the engine's next iteration.
"""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from fineserve_jax.engine import Engine, RequestHandle, RequestRejected, StreamDelta
from fineserve_jax.sampling import SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type,
                                       "param": self.param, "code": self.code}},
                            status_code=self.status)


def _sampling_params(body: dict, chat: bool) -> SamplingParams:
    def num(name, default, kind=float):
        v = body.get(name, default)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
            raise APIError(400, f"'{name}' must be a {'integer' if kind is int else 'number'}", name)
        return kind(v)

    max_key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a non-empty string or a list of them", "stop")
    if body.get("n", 1) != 1:
        raise APIError(400, "only n=1 is supported by this server", "n")
    kw = dict(max_tokens=num(max_key, 16, int), temperature=num("temperature", 1.0),
              top_p=num("top_p", 1.0), top_k=num("top_k", 0, int),
              min_p=num("min_p", 0.0), seed=body.get("seed"), stop=tuple(stop))
    if kw["seed"] is not None and (not isinstance(kw["seed"], int) or isinstance(kw["seed"], bool)):
        raise APIError(400, "'seed' must be an integer", "seed")
    if kw["top_k"] == -1:  # vLLM's spelling of "off"
        kw["top_k"] = 0
    try:
        return SamplingParams(**kw)
    except ValueError as e:
        param = str(e).split()[0]
        raise APIError(400, str(e), param if param in kw else None) from None


class Server:
    def __init__(self, routes: dict[str, Engine]):
        self.routes = routes  # served model name -> the engine running it
        self.created = int(time.time())

    def _route(self, body: dict) -> tuple[str, Engine]:
        name = body.get("model")
        if name is None and len(self.routes) == 1:
            name = next(iter(self.routes))
        if name not in self.routes:
            raise APIError(404, f"model {name!r} does not exist; served: {sorted(self.routes)}",
                           "model", code="model_not_found")
        return name, self.routes[name]

    async def _json(self, request: HTTPRequest) -> dict:
        try:
            body = await request.json()
        except Exception:
            raise APIError(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        return body

    def _prompt_ids(self, info: dict, body: dict, chat: bool) -> list[int]:
        tok, cfg = info["tokenizer"], info["config"]
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) for m in msgs):
                raise APIError(400, "'messages' must be a non-empty list of {role, content}", "messages")
            for m in msgs:
                if isinstance(m.get("content"), list):  # OpenAI content parts: keep the text ones
                    m["content"] = "".join(p.get("text", "") for p in m["content"] if isinstance(p, dict))
            try:
                ids = tok.encode_chat(msgs)
            except Exception as e:
                raise APIError(400, f"cannot apply the chat template: {e}", "messages") from None
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if isinstance(prompt, str):
                ids = tok.encode(prompt)
            elif isinstance(prompt, list) and prompt and all(isinstance(i, int) for i in prompt):
                ids = prompt
            else:
                raise APIError(400, "'prompt' must be a string or a list of token ids", "prompt")
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt")
        if any(not 0 <= i < cfg.vocab_size for i in ids):
            raise APIError(400, f"token ids must be in [0, {cfg.vocab_size})", "prompt")
        if len(ids) >= info["max_model_len"]:
            raise APIError(400, f"prompt has {len(ids)} tokens; the context is "
                                f"{info['max_model_len']}", "prompt")
        return ids

    async def completions(self, request: HTTPRequest):
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: HTTPRequest):
        return await self._generate(request, chat=True)

    async def _generate(self, request: HTTPRequest, chat: bool):
        try:
            body = await self._json(request)
            name, engine = self._route(body)
            params = _sampling_params(body, chat)
            ids = self._prompt_ids(engine.model_info(name), body, chat)
            try:
                handle = engine.submit(name, ids, params)
            except RequestRejected as e:
                raise APIError(400, str(e), e.param)
            except ValueError as e:  # any other refusal: still the client's request
                raise APIError(400, str(e), None)
        except APIError as e:
            return e.response()
        kind = "chat.completion" if chat else "text_completion"
        rid = ("chatcmpl-" if chat else "cmpl-") + handle.id
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(self._sse(handle, rid, name, chat, usage),
                                     media_type="text/event-stream")
        text, last = [], None
        async for d in handle:  # leaving early (disconnect) aborts the request
            text.append(d.text)
            last = d
        if last.error:
            return APIError(500, last.error, type_="server_error").response()
        choice: dict[str, Any] = {"index": 0, "finish_reason": last.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": "".join(text)}
        else:
            choice.update(text="".join(text), logprobs=None)
        return JSONResponse({"id": rid, "object": kind, "created": int(time.time()),
                             "model": name, "choices": [choice],
                             "usage": _usage(last)})

    async def _sse(self, handle: RequestHandle, rid: str, model: str, chat: bool,
                   include_usage: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())

        def chunk(text, finish, role=False):
            if chat:
                delta = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
                c = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                c = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            return _event({"id": rid, "object": obj, "created": created, "model": model,
                           "choices": [c]})

        if chat:
            yield chunk("", None, role=True)
        # A client that goes away cancels this generator; the handle's iterator then
        # aborts the request.
        async for d in handle:
            if d.error:
                yield _event({"error": {"message": d.error, "type": "server_error"}})
                break
            if d.text or d.finish_reason:
                yield chunk(d.text, d.finish_reason)
            if d.finish_reason and include_usage:
                yield _event({"id": rid, "object": obj, "created": created,
                              "model": model, "choices": [], "usage": _usage(d)})
        yield "data: [DONE]\n\n"

    async def models(self, request: HTTPRequest):
        data = []
        for name, engine in self.routes.items():
            info = engine.model_info(name)
            data.append({"id": name, "object": "model", "created": self.created,
                         "owned_by": "fineserve-jax", "precision": info["precision"],
                         "dtype": info["dtype"], "kv_format": info["kv_format"],
                         "max_model_len": info["max_model_len"], "device": engine.device})
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: HTTPRequest):
        return JSONResponse({"status": "ok", "models": sorted(self.routes)})


def _usage(d: StreamDelta) -> dict:
    return {"prompt_tokens": d.prompt_tokens, "completion_tokens": d.completion_tokens,
            "total_tokens": d.prompt_tokens + d.completion_tokens}


def _event(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def build_app(engines: Engine | list[Engine]) -> Starlette:
    """The ASGI app over started engines; every model of every engine is served by name."""
    engines = [engines] if isinstance(engines, Engine) else list(engines)
    routes: dict[str, Engine] = {}
    for e in engines:
        for name in e.models:
            if name in routes:
                raise ValueError(f"model name {name!r} is served twice")
            routes[name] = e
    s = Server(routes)

    async def not_found(request, exc):
        return APIError(404, f"no route {request.url.path}", type_="not_found_error").response()

    async def bad_method(request, exc):
        return APIError(405, f"method {request.method} not allowed on {request.url.path}").response()

    return Starlette(routes=[
        Route("/v1/completions", s.completions, methods=["POST"]),
        Route("/v1/chat/completions", s.chat_completions, methods=["POST"]),
        Route("/v1/models", s.models, methods=["GET"]),
        Route("/health", s.health, methods=["GET"]),
    ], exception_handlers={404: not_found, 405: bad_method})
