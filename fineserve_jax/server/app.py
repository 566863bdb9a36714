"""The OpenAI-compatible HTTP front end: one Starlette app over every served model.

Routes::

    POST /v1/completions        prompt as text, token ids or a list of either; n, echo, logprobs
    POST /v1/chat/completions   messages through the model's chat template; logprobs
    GET  /v1/models             every served model with its precision and device
    GET  /health                open even when an API key is set
    GET  /metrics               Prometheus text (``server.metrics``)
    GET  /admin/kv              JSON snapshot of every device's KV pool and queues
    GET  /admin/placement       which device serves each model; with a rebalancer, its
                                placement, rates and decisions (``server.rebalance``)

Requests route by ``model`` to the engine serving it. Each choice is one engine request
whose handle is fed by the engine thread through an ``asyncio.Queue``; streaming answers
are OpenAI server-sent events ending in ``data: [DONE]``. A client that disconnects
(streaming or not) has its requests aborted, which frees their KV blocks at the engine's
next iteration. Every error is an OpenAI-style body; no traceback reaches a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from fineserve_jax.engine import Engine, RequestHandle, RequestRejected, StreamDelta
from fineserve_jax.engine.admission import ModelRetiring
from fineserve_jax.engine.handle import LOST
from fineserve_jax.server.auth import AuthMiddleware, BodyLimitMiddleware
from fineserve_jax.server.metrics import ServerMetrics
from fineserve_jax.server.protocol import (
    APIError,
    GenRequest,
    Limits,
    chat_logprobs,
    completion_logprobs,
    parse_chat,
    parse_completion,
    parse_json,
)
from schedulers.batching import slo_from_ms

log = logging.getLogger(__name__)


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class Server:
    def __init__(self, routes: dict[str, Engine], limits: Limits, model_extra: dict):
        self.routes = routes  # served model name -> the engine running it
        self.limits = limits
        self.model_extra = model_extra  # name -> extra fields for /v1/models (e.g. SLO)
        self.engines = list(dict.fromkeys(routes.values()))
        self.metrics = ServerMetrics(self.engines, {
            n: slo_from_ms(x.get("ttft_slo_ms"), x.get("tpot_slo_ms"))
            for n, x in model_extra.items()})
        self._open: dict[str, str] = {}  # handle id -> model, engine requests not released
        self.created = int(time.time())
        self.rebalancer = None  # server.rebalance.Rebalancer, which moves routes
        self.supervisor = None  # raycluster.supervisor.Supervisor, which replaces workers

    # ------------------------------------------------------------------ parsing
    def _route(self, body: dict) -> tuple[str, Engine]:
        name = body.get("model")
        if name is None and len(self.routes) == 1:
            name = next(iter(self.routes))
        if not isinstance(name, str) or name not in self.routes:
            raise APIError(404, f"the model {name!r} does not exist; served: "
                                f"{sorted(self.routes)}", "model", code="model_not_found")
        return name, self.routes[name]

    async def _parse(self, request: HTTPRequest, chat: bool) -> tuple[GenRequest, Engine]:
        try:
            raw = await request.body()
        except ClientDisconnect:
            raise APIError(400, "the client went away") from None
        body = parse_json(raw)
        name, engine = self._route(body)
        info = engine.model_info(name)
        parse = parse_chat if chat else parse_completion
        req = parse(body, info["tokenizer"], info["config"].vocab_size, info["max_model_len"],
                    self.limits)
        req.model = name
        return req, engine

    def _submit(self, req: GenRequest, engine: Engine,
                rerouted: bool = False) -> list[RequestHandle]:
        """One engine request per choice, or none (429) when the model's queue is full."""
        want = sum(len(p) for p in req.params)
        cap = engine.config.max_seqs + self.limits.max_waiting
        held = self.inflight(req.model)
        if held + want > cap:
            self.metrics.request_dropped(req.model, "queue_full", requests=want)
            raise APIError(429, f"model {req.model!r} has {held} requests "
                                f"in flight (limit {cap}); retry later", None,
                           type_="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"})
        handles: list[RequestHandle] = []
        try:
            for ids, params in zip(req.prompts, req.params):
                for p in params:
                    handles.append(engine.submit(req.model, ids, p))
        except ModelRetiring:  # moved away meanwhile: the route names its new engine
            for h in handles:
                h.abort()
            now = self.routes.get(req.model)
            if rerouted or now is None or now is engine:
                raise APIError(503, f"model {req.model!r} is moving between devices; "
                                    f"retry", type_="server_overloaded", code="moving",
                               headers={"Retry-After": "1"}) from None
            return self._submit(req, now, rerouted=True)
        except RequestRejected as e:
            for h in handles:
                h.abort()
            raise APIError(400, str(e), e.param) from None
        self._open.update((h.id, req.model) for h in handles)
        return handles

    def inflight(self, model: str) -> int:
        """Engine requests of ``model`` submitted here and not yet released."""
        return sum(m == model for m in self._open.values())

    def _done(self, model: str, h: RequestHandle, last: StreamDelta | None) -> None:
        if self._open.pop(h.id, None) is None:
            return  # released already
        if last is not None and last.finish_reason not in (None, "abort"):
            self.metrics.request_finished(model, last.finish_reason, h.metrics,
                                          last.prompt_tokens, last.completion_tokens)
            if self.rebalancer is not None and last.finish_reason in ("stop", "length"):
                self.rebalancer.observe_lengths(model, last.prompt_tokens,
                                                last.completion_tokens)

    # --------------------------------------------------------------- endpoints
    async def completions(self, request: HTTPRequest):
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: HTTPRequest):
        return await self._generate(request, chat=True)

    async def _generate(self, request: HTTPRequest, chat: bool):
        model = None
        try:
            req, engine = await self._parse(request, chat)
            model = req.model
            tok = engine.model_info(req.model)["tokenizer"]
            handles = self._submit(req, engine)
        except APIError as e:
            self.metrics.request_rejected(model, e.status, e.code)
            return _error(e)
        self.metrics.request_started(req.model, "chat" if chat else "completions")
        if self.rebalancer is not None:
            self.rebalancer.observe(req.model)
        rid = ("chatcmpl-" if chat else "cmpl-") + handles[0].id
        if req.stream:
            return _Stream(self._sse(req, handles, rid, tok),
                           cleanup=lambda: self._release(req.model, handles),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self._whole(request, req, handles, rid, tok)

    def _release(self, model: str, handles: list[RequestHandle]) -> None:
        """After a streamed response, however it ended (even before its first byte):
        abort what still runs and release what was never released."""
        for h in handles:
            h.abort()  # no-op once finished
            self._done(model, h, None)

    async def _events(self, model: str, handles: list[RequestHandle]
                      ) -> AsyncIterator[tuple[int, StreamDelta]]:
        """(choice index, delta) from every handle as they come; aborts all on exit."""
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, h: RequestHandle):
            last = None
            try:
                async for d in h:
                    last = d
                    await q.put((i, d))
            finally:
                self._done(model, h, last)

        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
        try:
            left = len(handles)
            while left:
                i, d = await q.get()
                yield i, d
                left -= d.finish_reason is not None
        finally:
            for t in tasks:
                t.cancel()  # the handle's iterator aborts an unfinished request
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _whole(self, request: HTTPRequest, req: GenRequest, handles, rid: str, tok):
        n_per = len(req.params[0]) if req.params else 1
        deltas: list[list[StreamDelta]] = [[] for _ in handles]

        async def collect():
            async for i, d in self._events(req.model, handles):
                deltas[i].append(d)

        async def disconnected():
            while True:
                msg = await request.receive()
                if msg["type"] == "http.disconnect":
                    return

        work = asyncio.create_task(collect())
        watch = asyncio.create_task(disconnected())
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:  # the client went away: abort everything
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            self.metrics.client_disconnected(req.model)
            return Response(status_code=499)
        watch.cancel()
        work.result()
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0}
        for i, (h, ds) in enumerate(zip(handles, deltas)):
            last = ds[-1]
            if last.finish_reason == "dropped":
                self.metrics.request_dropped(req.model, "slo")
                return _error(_dropped(req.model, last.error))
            if last.finish_reason == LOST:
                self.metrics.request_dropped(req.model, "worker_lost")
                return _error(_lost(req.model, last.error))
            if last.error:
                log.error("request %s failed: %s", h.id, last.error)
                e = APIError(500, "generation failed inside the server; the request was not "
                                  "completed", type_="server_error", code="generation_failed")
                return _error(e)
            text = "".join(d.text for d in ds)
            choice: dict[str, Any] = {"index": i, "finish_reason": last.finish_reason}
            p = i // n_per
            if req.chat:
                choice["message"] = {"role": "assistant", "content": text}
                choice["logprobs"] = (chat_logprobs(tok, h.logprobs)
                                      if req.logprobs is not None else None)
            else:
                prefix = ""
                if req.echo:
                    prefix = (req.prompt_texts[p] if req.prompt_texts[p] is not None
                              else tok.decode(req.prompts[p]))
                choice["text"] = prefix + text
                choice["logprobs"] = (self._completion_lp(req, p, h, tok)
                                      if req.logprobs is not None else None)
            choices.append(choice)
            if i % n_per == 0:
                usage["prompt_tokens"] += last.prompt_tokens
            usage["completion_tokens"] += last.completion_tokens
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return JSONResponse({"id": rid, "object": "chat.completion" if req.chat
                             else "text_completion", "created": int(time.time()),
                             "model": req.model, "choices": choices, "usage": usage})

    @staticmethod
    def _completion_lp(req: GenRequest, p: int, h: RequestHandle, tok) -> dict:
        ids, entries = list(h.token_ids), list(h.logprobs)
        if req.echo:
            ids = req.prompts[p] + ids
            entries = list(h.prompt_logprobs or [None] * len(req.prompts[p])) + entries
        return completion_logprobs(tok, entries, ids)

    async def _sse(self, req: GenRequest, handles, rid: str, tok):
        obj = "chat.completion.chunk" if req.chat else "text_completion"
        created = int(time.time())
        n_per = len(req.params[0])
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        offsets = [0] * len(handles)  # characters streamed per choice (logprobs text_offset)
        started = [False] * len(handles)

        def event(choices: list, **extra) -> str:
            return _event({"id": rid, "object": obj, "created": created, "model": req.model,
                           "choices": choices, **extra})

        def completion_choice(i: int, d: StreamDelta) -> dict | None:
            text, ids, entries = d.text, list(d.token_ids), list(d.logprobs or [])
            if req.echo and not started[i]:  # the prompt leads the first chunk
                p = i // n_per
                text = (req.prompt_texts[p] if req.prompt_texts[p] is not None
                        else tok.decode(req.prompts[p])) + text
                ids = req.prompts[p] + ids
                entries = list(d.prompt_logprobs or [None] * len(req.prompts[p])) + entries
            started[i] = True
            lp = (completion_logprobs(tok, entries, ids, offsets[i])
                  if req.logprobs is not None and ids else None)
            offsets[i] += len(text)
            if not (text or lp or d.finish_reason):
                return None
            return {"index": i, "text": text, "logprobs": lp, "finish_reason": d.finish_reason}

        def chat_choice(i: int, d: StreamDelta) -> dict | None:
            lp = (chat_logprobs(tok, d.logprobs)
                  if req.logprobs is not None and d.logprobs else None)
            if not (d.text or lp or d.finish_reason):
                return None
            return {"index": i, "delta": {"content": d.text} if d.text else {}, "logprobs": lp,
                    "finish_reason": d.finish_reason}

        if req.chat:
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None}
                         for i in range(len(handles))])
        ended = False  # the stream reached its end (not cut by the client)
        try:
            async for i, d in self._events(req.model, handles):
                if d.finish_reason == "dropped":
                    self.metrics.request_dropped(req.model, "slo")
                    ended = True
                    yield _event(_dropped(req.model, d.error).body())
                    yield "data: [DONE]\n\n"
                    return
                if d.finish_reason == LOST:
                    self.metrics.request_dropped(req.model, "worker_lost")
                    ended = True
                    yield _event(_lost(req.model, d.error).body())
                    yield "data: [DONE]\n\n"
                    return
                if d.error:
                    log.error("request %s failed: %s", handles[i].id, d.error)
                    ended = True
                    yield _event({"error": {"message": "generation failed inside the server",
                                            "type": "server_error", "param": None,
                                            "code": "generation_failed"}})
                    yield "data: [DONE]\n\n"
                    return
                if d.finish_reason:
                    if i % n_per == 0:
                        usage["prompt_tokens"] += d.prompt_tokens
                    usage["completion_tokens"] += d.completion_tokens
                c = chat_choice(i, d) if req.chat else completion_choice(i, d)
                if c is not None:
                    yield event([c])
            ended = True
            if req.include_usage:
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                yield event([], usage=usage)
            yield "data: [DONE]\n\n"
        finally:
            if not ended:
                self.metrics.client_disconnected(req.model)

    async def list_models(self, request: HTTPRequest):
        data = []
        for name, engine in self.routes.items():
            info = engine.model_info(name)
            data.append({"id": name, "object": "model", "created": self.created,
                         "owned_by": "fineserve-jax", "precision": info["precision"],
                         "dtype": info["dtype"], "kv_format": info["kv_format"],
                         "max_model_len": info["max_model_len"], "device": engine.device,
                         **self.model_extra.get(name, {})})
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: HTTPRequest):
        alive = all(e.running for e in self.engines)
        return JSONResponse({"status": "ok" if alive else "engine stopped",
                             "models": sorted(self.routes)}, status_code=200 if alive else 503)

    async def prometheus(self, request: HTTPRequest):
        body, ctype = self.metrics.render()
        return Response(body, media_type=ctype)

    async def admin_kv(self, request: HTTPRequest):
        devices = []
        for e in self.engines:
            st = e.stats().to_dict()
            devices.append({"device": e.device, "allocator": e.config.allocator,
                            "kv_budget_bytes": e.config.kv_budget_bytes, **st})
        return JSONResponse({"devices": devices})

    async def admin_placement(self, request: HTTPRequest):
        if self.rebalancer is not None:
            return JSONResponse(self.rebalancer.status())
        if self.supervisor is not None:
            return JSONResponse(self.supervisor.status())
        return JSONResponse({"routes": {m: e.device for m, e in sorted(self.routes.items())},
                             "rebalancer": None})


class _Stream(StreamingResponse):
    """A streaming response that runs ``cleanup`` however it ends: a client gone before
    the first byte leaves the body generator unstarted, so its own cleanup never runs."""

    def __init__(self, content, *, cleanup, **kw):
        super().__init__(content, **kw)
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()


def _dropped(model: str, reason: str | None) -> APIError:
    return APIError(503, f"model {model!r} shed this request: {reason or 'overloaded'}; "
                         f"retry later", type_="server_overloaded", code="dropped",
                    headers={"Retry-After": "1"})


def _lost(model: str, reason: str | None) -> APIError:
    return APIError(503, f"model {model!r}: {reason or 'the worker serving it was lost'}; "
                         f"retry", type_="server_overloaded", code="worker_lost",
                    headers={"Retry-After": "1"})


def _event(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def build_app(engines: Engine | list[Engine], *, limits: Limits | None = None,
              api_key: str | None = None, admin_key: str | None = None,
              model_extra: dict | None = None, rebalancer=None, supervisor=None) -> Starlette:
    """The ASGI app over started engines; every model of every engine is served by name.

    ``api_key`` guards every endpoint but ``/health``; ``admin_key`` (when given) guards
    ``/admin/*`` and ``/metrics`` instead. ``model_extra``: name -> fields added to the
    model's ``/v1/models`` entry. ``rebalancer`` (``server.rebalance.Rebalancer`` over
    these engines): fed every accepted request, it moves models between the engines;
    its checks run while the app runs (ASGI lifespan). ``supervisor``
    (``raycluster.supervisor.Supervisor`` over remote engines): places the models of a
    worker that died on the others, while the app runs."""
    engines = [engines] if isinstance(engines, Engine) else list(engines)
    routes: dict[str, Engine] = {}
    for e in engines:
        for name in e.models:
            if name in routes:
                raise ValueError(f"model name {name!r} is served twice")
            routes[name] = e
    limits = limits or Limits()
    s = Server(routes, limits, model_extra or {})
    if rebalancer is not None:
        rebalancer.use_routes(s.routes)
        s.rebalancer = rebalancer
    if supervisor is not None:
        supervisor.use_server(s)
        s.supervisor = supervisor
    background = [b for b in (rebalancer, supervisor) if b is not None]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for b in background:
            b.start()
        try:
            yield
        finally:
            for b in background:
                await b.stop()

    async def http_error(request, exc: HTTPException):
        if exc.status_code == 404:
            e = APIError(404, f"no route {request.url.path}", type_="not_found_error")
        elif exc.status_code == 405:
            e = APIError(405, f"method {request.method} is not allowed on {request.url.path}")
        else:
            e = APIError(exc.status_code, str(exc.detail))
        return _error(e)

    async def crash(request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _error(APIError(500, "internal server error", type_="server_error"))

    app = Starlette(routes=[
        Route("/v1/completions", s.completions, methods=["POST"]),
        Route("/v1/chat/completions", s.chat_completions, methods=["POST"]),
        Route("/v1/models", s.list_models, methods=["GET"]),
        Route("/health", s.health, methods=["GET"]),
        Route("/metrics", s.prometheus, methods=["GET"]),
        Route("/admin/kv", s.admin_kv, methods=["GET"]),
        Route("/admin/placement", s.admin_placement, methods=["GET"]),
    ], lifespan=lifespan, exception_handlers={HTTPException: http_error, Exception: crash}, middleware=[
        Middleware(AuthMiddleware, api_key=api_key, admin_key=admin_key),
        Middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes),
    ])
    app.state.server = s
    return app
