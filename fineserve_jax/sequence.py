"""Host-side state of one generated sequence: stop rules and the text it streams.

Plain Python (no JAX): the notebook API and the engine both feed sampled ids to
``SequenceState.append`` and forward what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass

from fineserve_jax.sampling import SamplingParams
from fineserve_jax.tokenizer import Tokenizer


@dataclass
class RequestOutput:
    """The result of one prompt."""

    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | None while running

    def __repr__(self):
        text = self.text if len(self.text) <= 60 else self.text[:57] + "..."
        return (f"RequestOutput(text={text!r}, tokens={len(self.token_ids)}, "
                f"finish_reason={self.finish_reason!r})")


class SequenceState:
    """Applies stop tokens, stop strings and max_tokens; yields safe text deltas.

    Text that could still turn out to be the start of a stop string is held back, so a
    streamed stop string is never shown; a multi-byte character is never split (the
    incremental detokenizer holds incomplete UTF-8).
    """

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, prompt_ids: list[int],
                 prompt: str | None = None, max_total_len: int | None = None):
        self.params = params
        self.prompt = prompt
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self.detok = tokenizer.detokenizer(params.skip_special_tokens)
        eos = () if params.ignore_eos else tokenizer.eos_token_ids
        self.stop_ids = frozenset(eos) | frozenset(params.stop_token_ids)
        self.max_total_len = max_total_len
        self._hold = max((len(s) for s in params.stop), default=1) - 1
        self._text = ""  # detokenized text, stop string not yet applied
        self._emitted = 0  # chars of _text already returned

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self._text[:self._emitted] if self.finished else self._text

    def append(self, token_id: int) -> str:
        """Record one sampled token; returns the text that may be shown now."""
        if self.finished:
            raise RuntimeError("sequence already finished")
        token_id = int(token_id)
        self.output_ids.append(token_id)
        if token_id in self.stop_ids:
            self._text += self.detok.flush()
            return self._finish("stop", len(self._text))
        self._text += self.detok.add(token_id)
        if self.params.stop:
            cut = self._find_stop()
            if cut is not None:
                return self._finish("stop", cut)
        total = len(self.prompt_ids) + len(self.output_ids)
        if len(self.output_ids) >= self.params.max_tokens or (
                self.max_total_len is not None and total >= self.max_total_len):
            self._text += self.detok.flush()
            cut = self._find_stop() if self.params.stop else None
            return self._finish("stop" if cut is not None else "length",
                                len(self._text) if cut is None else cut)
        safe = max(self._emitted, len(self._text) - self._hold)
        delta = self._text[self._emitted:safe]
        self._emitted = safe
        return delta

    def _find_stop(self) -> int | None:
        # Only text not yet emitted (plus a stop string's length of overlap) can match.
        start = max(0, self._emitted - self._hold)
        hits = [i for i in (self._text.find(s, start) for s in self.params.stop) if i >= 0]
        return min(hits) if hits else None

    def _finish(self, reason: str, end: int) -> str:
        self.finish_reason = reason
        delta = self._text[self._emitted:end]
        self._emitted = end
        return delta

    def output(self) -> RequestOutput:
        return RequestOutput(self.prompt, self.prompt_ids, self.text, list(self.output_ids),
                             self.finish_reason)
