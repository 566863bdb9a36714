"""Bearer-key authentication and the request body limit, around a tiny Starlette app.

HTTP behaviour goes through ``TestClient``; what a test client cannot show (a body arriving
in chunks, a response leaving before the app has produced all of it) is driven with raw
ASGI messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from fineserve_jax.server.auth import AuthMiddleware, BodyLimitMiddleware, load_key

API, ADMIN = "sk-api-0123", "sk-admin-4567"
CHUNKS = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]


async def echo(request: Request):
    body = await request.body()
    return JSONResponse({"bytes": len(body)})


async def catching(request: Request):  # an app that answers every read error itself
    try:
        await request.body()
    except Exception:  # noqa: BLE001 (the point of this handler)
        return JSONResponse({"caught": True}, status_code=400)
    return JSONResponse({"caught": False})


async def stream(request: Request):
    async def gen():
        for c in CHUNKS:
            yield c
    return StreamingResponse(gen(), media_type="text/event-stream")


async def ws(websocket):
    await websocket.accept()
    await websocket.send_text("hi")
    await websocket.close()


def make_app():
    ok = lambda request: PlainTextResponse("ok")
    return Starlette(routes=[
        Route("/health", ok), Route("/v1/echo", echo, methods=["POST"]),
        Route("/v1/catching", catching, methods=["POST"]), Route("/v1/stream", stream),
        Route("/admin/stats", ok), Route("/metrics", ok), Route("/administrator", ok),
        WebSocketRoute("/v1/ws", ws)])


def client(api_key=API, admin_key=ADMIN, max_bytes=64):
    app = AuthMiddleware(BodyLimitMiddleware(make_app(), max_bytes), api_key, admin_key)
    return TestClient(app)


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


# ------------------------------------------------------------------ auth
def assert_401(r, missing: bool):
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    err = r.json()["error"]
    assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
    assert err["param"] is None
    assert ("Missing" in err["message"]) == missing
    assert API not in r.text and ADMIN not in r.text


def test_api_paths_need_the_api_key():
    with client() as c:
        assert_401(c.get("/v1/stream"), missing=True)
        assert_401(c.get("/v1/stream", headers=bearer("sk-api-0124")), missing=False)
        assert_401(c.get("/v1/stream", headers=bearer(ADMIN)), missing=False)  # wrong scope
        assert_401(c.get("/v1/stream", headers={"Authorization": API}), missing=False)
        assert_401(c.get("/v1/stream", headers={"Authorization": f"Basic {API}"}), missing=False)
        r = c.get("/v1/stream", headers=bearer(API))
        assert r.status_code == 200 and r.content == b"".join(CHUNKS)
        assert c.get("/v1/stream", headers={"authorization": f"bearer {API}"}).status_code == 200


def test_admin_paths_need_the_admin_key():
    with client() as c:
        for path in ("/admin/stats", "/metrics", "/metrics/"):
            assert_401(c.get(path), missing=True)
            assert_401(c.get(path, headers=bearer(API)), missing=False)
        assert c.get("/admin/stats", headers=bearer(ADMIN)).text == "ok"
        assert c.get("/metrics", headers=bearer(ADMIN)).text == "ok"
        # A prefix covers whole path segments only: /administrator is an API path.
        assert c.get("/administrator", headers=bearer(API)).text == "ok"
        assert_401(c.get("/administrator", headers=bearer(ADMIN)), missing=False)


def test_open_paths_and_fallbacks():
    with client() as c:
        assert c.get("/health").text == "ok"
    with client(admin_key=None) as c:  # no admin key: admin paths take the API key
        assert c.get("/metrics", headers=bearer(API)).text == "ok"
        assert_401(c.get("/metrics"), missing=True)
    with client(api_key=None) as c:  # admin key only: API paths are open
        assert c.get("/v1/stream").status_code == 200
        assert_401(c.get("/metrics", headers=bearer(API)), missing=False)
    with client(api_key=None, admin_key=None) as c:
        assert c.get("/metrics").text == "ok"


def test_websocket_needs_the_key():
    with client() as c:
        with pytest.raises(WebSocketDisconnect) as e, c.websocket_connect("/v1/ws"):
            pass
        assert e.value.code == 1008
        with c.websocket_connect("/v1/ws", headers=bearer(API)) as s:
            assert s.receive_text() == "hi"


def test_lifespan_passes_through():
    events = []

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        events.append("up")
        yield
        events.append("down")

    app = Starlette(routes=[], lifespan=lifespan)
    with TestClient(AuthMiddleware(BodyLimitMiddleware(app, 1), API, ADMIN)):
        pass
    assert events == ["up", "down"]


def test_load_key(tmp_path):
    assert load_key(None, None) is None
    assert load_key("  sk-x \n", None) == "sk-x"
    f = tmp_path / "key"
    f.write_text("sk-from-file\n")
    assert load_key(None, str(f)) == "sk-from-file"
    with pytest.raises(ValueError, match="not both"):
        load_key("sk-x", str(f))
    with pytest.raises(ValueError, match="cannot read"):
        load_key(None, str(tmp_path / "missing"))
    (tmp_path / "empty").write_text(" \n")
    with pytest.raises(ValueError, match="empty"):
        load_key(None, str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="empty"):
        load_key("   ", None)
    with pytest.raises(ValueError, match="printable ASCII"):
        load_key("sk two", None)


# ------------------------------------------------------------ body limit
def assert_error(r, status, code):
    assert r.status_code == status
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == code
    assert err["param"] is None


def test_body_limit_on_content_length():
    with client() as c:
        h = bearer(API)
        assert c.post("/v1/echo", headers=h, content=b"x" * 64).json() == {"bytes": 64}
        r = c.post("/v1/echo", headers=h, content=b"x" * 65)
        assert_error(r, 413, "request_too_large")
        assert "64 bytes" in r.json()["error"]["message"]
        r = c.post("/v1/echo", headers=h | {"Content-Length": "12abc"}, content=b"x")
        assert_error(r, 400, "invalid_content_length")
        # Auth runs first: an unauthenticated oversize body gets 401, not 413.
        assert c.post("/v1/echo", content=b"x" * 100).status_code == 401


def test_body_limit_on_chunked_bodies():
    def body(n):
        yield from (b"x" * 16 for _ in range(n))

    with client() as c:
        h = bearer(API)
        r = c.post("/v1/echo", headers=h, content=body(4))
        assert r.json() == {"bytes": 64}
        r = c.post("/v1/echo", headers=h, content=body(5))
        assert r.request.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in r.request.headers
        assert_error(r, 413, "request_too_large")
        # The app caught the read error and answered 400: the 413 replaces that answer.
        assert_error(c.post("/v1/catching", headers=h, content=body(5)), 413, "request_too_large")
        assert c.post("/v1/catching", headers=h, content=body(1)).json() == {"caught": False}


def run_asgi(app, scope, chunks):
    """Drive ``app`` with ``chunks`` as the request body; returns (sent messages, reads)."""
    sent, reads = [], []

    async def receive():
        i = len(reads)
        reads.append(i)
        if i < len(chunks):
            return {"type": "http.request", "body": chunks[i], "more_body": i + 1 < len(chunks)}
        await asyncio.sleep(3600)  # a client that stays connected

    async def send(message):
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), 5))
    return sent, reads


SCOPE = {"type": "http", "method": "POST", "path": "/v1/echo", "headers": []}


def test_body_limit_stops_reading_at_the_chunk_that_passes_it():
    async def app(scope, receive, send):  # reads until the body ends, then answers 200
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"read"})

    sent, reads = run_asgi(BodyLimitMiddleware(app, 40), SCOPE, [b"x" * 16] * 10)
    assert len(reads) == 3  # 16, 32, 48 > 40: the third read raised, no fourth
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_too_large"

    sent, reads = run_asgi(BodyLimitMiddleware(app, 160), SCOPE, [b"x" * 16] * 10)
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"read"


def test_streaming_response_is_not_buffered():
    """Each chunk reaches the client before the app produces the next one."""
    async def main():
        delivered = asyncio.Event()
        got = []

        async def app(scope, receive, send):
            await receive()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for c in CHUNKS:
                delivered.clear()
                await send({"type": "http.response.body", "body": c, "more_body": True})
                await asyncio.wait_for(delivered.wait(), 2)  # fails if the chunk is held
            await send({"type": "http.response.body", "body": b""})

        async def receive():
            return {"type": "http.request", "body": b"{}"}

        async def send(message):
            got.append(message)
            delivered.set()

        scope = SCOPE | {"headers": [(b"authorization", f"Bearer {API}".encode())]}
        await AuthMiddleware(BodyLimitMiddleware(app, 64), API, ADMIN)(scope, receive, send)
        return got

    got = asyncio.run(main())
    assert got[0]["status"] == 200
    assert [m["body"] for m in got[1:]] == [*CHUNKS, b""]
