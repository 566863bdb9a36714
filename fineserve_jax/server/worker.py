"""A generation worker thread per model: requests in, text deltas out to asyncio queues.

This first worker runs one request at a time on the dense-cache ``LLM``; the batched
multi-model engine replaces it behind the same ``submit`` / ``abort`` verbs.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

from fineserve_jax.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    out: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrival: float = field(default_factory=time.monotonic)

    def emit(self, d: Delta) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, d)


class ModelWorker:
    """Owns one ``LLM``; a daemon thread serves its request queue in order."""

    def __init__(self, name: str, llm):
        self.name = name
        self.llm = llm
        self._q: queue.Queue[Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=f"worker-{name}", daemon=True)
        self.served = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._q.put(None)

    @property
    def waiting(self) -> int:
        return self._q.qsize()

    def submit(self, req: Request) -> None:
        self._q.put(req)

    def _loop(self) -> None:
        while (req := self._q.get()) is not None:
            if req.cancelled.is_set():
                continue
            try:
                self._serve(req)
            except Exception as e:  # one bad request must not stop the worker
                log.exception("request %s failed", req.id)
                req.emit(Delta("", [], "error", error=f"{type(e).__name__}: {e}"))
            self.served += 1

    def _serve(self, req: Request) -> None:
        llm = self.llm
        seq = llm._new_sequence(req.prompt_ids, req.params)
        n_prompt = len(seq.prompt_ids)
        for deltas in llm._run([seq]):
            if req.cancelled.is_set():
                return
            req.emit(Delta(deltas[0], seq.output_ids[-1:], seq.finish_reason, n_prompt,
                           len(seq.output_ids)))
            if seq.finished:
                return
        req.emit(Delta("", [], seq.finish_reason or "length", n_prompt, len(seq.output_ids)))
