"""What ``Engine.submit`` returns: a handle that streams one request's token deltas.

The engine thread pushes ``StreamDelta``s; the caller reads them with ``async for``
(an ``asyncio.Queue`` fed through the loop's thread-safe callback, no polling) or a
plain ``for`` (a thread-safe queue), or waits for ``result()``. Leaving an iteration
early (``break``, a cancelled task, a closed connection) aborts the request, which frees
its KV blocks at the engine's next iteration.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

from fineserve_jax.sequence import RequestOutput
from schedulers.batching import RequestMetrics


@dataclass
class TokenLogprob:
    """One token's log-probability under the model (raw logits, before temperature and
    filters) and, when asked for, the most likely alternatives at its position."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


LOST = "worker_lost"  # finish reason: the (remote) engine running the request died


@dataclass
class StreamDelta:
    """Text and token ids produced by one engine step for one request."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "dropped" | "error" | LOST
    prompt_tokens: int = 0
    completion_tokens: int = 0  # generated so far, this delta included
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # per token of ``token_ids``, when asked for
    # First delta only, when asked for: one per prompt token, None for the first.
    prompt_logprobs: list[TokenLogprob | None] | None = None


class RequestHandle:
    """One submitted request. Iterate it once, sync or async; ``result()`` after or instead.

    ``metrics`` (``RequestMetrics``) is updated by the engine as the request runs."""

    def __init__(self, request_id: str, model: str, prompt: str | None, prompt_ids: list[int],
                 abort: Callable[[str], None], loop: asyncio.AbstractEventLoop | None = None):
        self.id = request_id
        self.model = model
        self.prompt = prompt
        self.prompt_ids = list(prompt_ids)
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.metrics = RequestMetrics(time.monotonic())
        self._abort = abort
        self._loop = loop
        self._aq: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._q: queue.SimpleQueue[StreamDelta] = queue.SimpleQueue()
        self._done = threading.Event()

    def __repr__(self):
        return (f"RequestHandle(id={self.id!r}, model={self.model!r}, "
                f"tokens={len(self.token_ids)}, finish_reason={self.finish_reason!r})")

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    # ------------------------------------------------------ engine side
    def push(self, d: StreamDelta) -> None:
        """Called by the engine thread only."""
        self.text += d.text
        self.token_ids.extend(d.token_ids)
        if d.logprobs:
            self.logprobs.extend(d.logprobs)
        if d.prompt_logprobs is not None:
            self.prompt_logprobs = d.prompt_logprobs
        if d.finish_reason is not None:
            self.finish_reason, self.error = d.finish_reason, d.error
            self.metrics.finished = time.monotonic()
            self._done.set()
        if self._aq is not None:
            self._loop.call_soon_threadsafe(self._aq.put_nowait, d)
        else:
            self._q.put(d)

    # ------------------------------------------------------ caller side
    def abort(self) -> None:
        if not self.finished:
            self._abort(self.id)

    def __iter__(self):
        if self._aq is not None:
            raise TypeError("this handle was submitted from an event loop; use `async for`")
        try:
            while True:
                d = self._q.get()
                yield d
                if d.finish_reason is not None:
                    return
        finally:
            self.abort()  # no-op once finished

    async def __aiter__(self):
        if self._aq is None:
            raise TypeError("this handle was submitted outside an event loop; use `for`")
        try:
            while True:
                d = await self._aq.get()
                yield d
                if d.finish_reason is not None:
                    return
        finally:
            self.abort()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request finishes (however it ends); False on timeout."""
        return self._done.wait(timeout)

    def result(self, timeout: float | None = None) -> RequestOutput:
        """Blocks until the request finishes; the whole output."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} still running after {timeout} s")
        if self.finish_reason in ("error", "dropped"):
            raise RuntimeError(f"request {self.id} {self.finish_reason}: {self.error}")
        return RequestOutput(self.prompt, self.prompt_ids, self.text, list(self.token_ids),
                             self.finish_reason)
