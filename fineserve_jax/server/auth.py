"""Bearer-key authentication and a request body limit, as pure ASGI middlewares.

Both wrap the app without buffering: a streaming response goes through message by message,
and a request body is counted as the app reads it. Refusals carry an OpenAI-style error
body (``{"error": {"message", "type", "param", "code"}}``) like the app's own errors.
"""

from __future__ import annotations

import hmac
import json
from pathlib import Path


def load_key(value: str | None, file: str | None, what: str = "API key") -> str | None:
    """The key given directly (``value``) or as the stripped contents of ``file``; ``None``
    when neither is given. Raises ``ValueError`` for both, an unreadable or empty file, or a
    key that cannot be sent in an HTTP header (non-ASCII, control characters, spaces)."""
    if value is not None and file is not None:
        raise ValueError(f"give the {what} or a file holding it, not both")
    if file is not None:
        try:
            value = Path(file).read_text()
        except OSError as e:
            raise ValueError(f"cannot read the {what} file {file!r}: {e.strerror or e}") from None
        if not value.strip():
            raise ValueError(f"the {what} file {file!r} is empty")
    if value is None:
        return None
    key = value.strip()
    if not key:
        raise ValueError(f"the {what} is empty")
    if not (key.isascii() and key.isprintable()) or any(c.isspace() for c in key):
        raise ValueError(f"the {what} must be printable ASCII without spaces")
    return key


def _error_body(message: str, type_: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None,
                                 "code": code}}).encode()


async def _send_json(send, status: int, body: bytes, headers=()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> bytes | None:
    """The first header ``name`` (lower case) of the request, if any."""
    return next((v for k, v in scope.get("headers", ()) if k == name), None)


def _under(path: str, prefix: str) -> bool:
    """``path`` is ``prefix`` or below it (``/admin`` covers ``/admin/x``, not ``/admins``)."""
    prefix = prefix.rstrip("/")
    return path == prefix or path.startswith(prefix + "/")


class AuthMiddleware:
    """Requires ``Authorization: Bearer <key>`` on HTTP and WebSocket requests.

    * ``open_paths`` (exact paths) need no key.
    * Paths under an ``admin_paths`` prefix need ``admin_key``; with no admin key, the
      ``api_key``; with neither, nothing.
    * Every other path needs ``api_key`` (when set). The admin key does not grant them: it
      is a separate scope, not a superset.

    A refused HTTP request gets 401 with ``WWW-Authenticate: Bearer``; a refused WebSocket
    is closed before it is accepted (policy violation). Lifespan events pass through.
    """

    def __init__(self, app, api_key: str | None = None, admin_key: str | None = None,
                 open_paths=("/health",), admin_paths=("/admin", "/metrics")):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.admin_key = admin_key.encode() if admin_key else None
        self.open_paths = frozenset(open_paths)
        self.admin_paths = tuple(admin_paths)

    def _required(self, path: str) -> bytes | None:
        if path in self.open_paths:
            return None
        if any(_under(path, p) for p in self.admin_paths):
            return self.admin_key or self.api_key
        return self.api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        key = self._required(scope["path"])
        if key is None:
            return await self.app(scope, receive, send)
        header = _header(scope, b"authorization")
        scheme, _, token = (header or b"").strip().partition(b" ")
        if header is None:
            message = "Missing API key: send the header 'Authorization: Bearer <key>'."
        elif scheme.lower() != b"bearer" or not token.strip():
            message = "Malformed Authorization header: expected 'Bearer <key>'."
        elif not hmac.compare_digest(token.strip(), key):
            message = "Invalid API key for this path."
        else:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation
            return
        await _send_json(send, 401, _error_body(message, "authentication_error", "invalid_api_key"),
                         [(b"www-authenticate", b"Bearer")])


class _BodyTooLarge(Exception):
    """Raised from ``receive`` into the app once the request body passes the limit."""


class BodyLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` with 413.

    A declared ``Content-Length`` over the limit is refused before the app runs (400 when it
    is not a decimal integer). A body without one (chunked) is counted as the app reads it:
    the read that passes the limit raises inside the app, whatever the app then sends is
    dropped, and the middleware answers 413 itself. Only when the app had already started
    its response is that response left to finish instead.
    """

    def __init__(self, app, max_bytes: int):
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an int >= 0, got {max_bytes!r}")
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, send, status: int, message: str, code: str) -> None:
        # The body was not read: the connection cannot carry another request.
        await _send_json(send, status, _error_body(message, "invalid_request_error", code),
                         [(b"connection", b"close")])

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                return await self._refuse(send, 400, "Content-Length must be a non-negative "
                                          "integer.", "invalid_content_length")
            if int(declared) > self.max_bytes:
                return await self._refuse(send, 413, self._too_large(), "request_too_large")

        received, tripped, started = 0, False, False

        async def limited_receive():
            nonlocal received, tripped
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    tripped = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message):
            nonlocal started
            if tripped and not started:
                return  # the app's answer to the exception: the 413 replaces it
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:  # _BodyTooLarge, or the app's own error (group) raised from it
            if not tripped:
                raise
        if tripped and not started:
            await self._refuse(send, 413, self._too_large(), "request_too_large")

    def _too_large(self) -> str:
        return f"Request body exceeds the limit of {self.max_bytes} bytes."
