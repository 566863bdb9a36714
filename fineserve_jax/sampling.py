"""Sampling: a pure function of (logits, per-request parameters, PRNG key).

``SamplingParams`` is what a caller asks for; ``SamplingArrays`` is its per-row array
form inside a jitted step. Stop token ids and stop strings are the caller's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Which sampler a batch needs; the cheapest one that covers every row is compiled.
GREEDY, RANDOM, FILTERED = "greedy", "random", "filtered"
MAX_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's limit)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings (OpenAI / vLLM meanings)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    min_p: float = 0.0  # drop tokens below min_p * p(best), [0, 1]
    seed: int | None = None  # fixed seed -> reproducible sample whatever the batch
    stop: tuple[str, ...] = ()  # stop strings (not included in the text)
    stop_token_ids: tuple[int, ...] = ()  # extra stop tokens besides the model's EOS
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # per generated token: its logprob and this many alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token (max_tokens may be 0)

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids or ()))
        for f in ("logprobs", "prompt_logprobs"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)
                                  or not 0 <= v <= MAX_LOGPROBS):
                raise ValueError(f"{f} must be an int in [0, {MAX_LOGPROBS}] or None, got {v!r}")
        least = 0 if self.prompt_logprobs is not None else 1  # scoring a prompt only
        if not isinstance(self.max_tokens, int) or self.max_tokens < least:
            raise ValueError(f"max_tokens must be an int >= {least}, got {self.max_tokens!r}")
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def mode(self) -> str:
        if self.temperature == 0:
            return GREEDY
        if self.top_k or self.top_p < 1 or self.min_p > 0:
            return FILTERED
        return RANDOM


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplingArrays:
    temperature: jax.Array  # f32[B]; 0 = greedy
    top_k: jax.Array  # i32[B]; 0 = off
    top_p: jax.Array  # f32[B]
    min_p: jax.Array  # f32[B]
    seed: jax.Array  # u32[B]
    step: jax.Array  # i32[B] tokens generated so far (folded into the key)

    @staticmethod
    def build(params: Sequence[SamplingParams], seeds: Sequence[int], steps: Sequence[int],
              pad_to: int | None = None) -> "SamplingArrays":
        n = pad_to or len(params)
        pad = [SamplingParams(temperature=0.0)] * (n - len(params))
        ps = list(params) + pad
        return SamplingArrays(
            temperature=np.array([p.temperature for p in ps], np.float32),
            top_k=np.array([p.top_k for p in ps], np.int32),
            top_p=np.array([p.top_p for p in ps], np.float32),
            min_p=np.array([p.min_p for p in ps], np.float32),
            seed=np.array(list(seeds) + [0] * (n - len(seeds)), np.uint32),
            step=np.array(list(steps) + [0] * (n - len(steps)), np.int32),
        )


def batch_mode(params: Sequence[SamplingParams]) -> str:
    modes = {p.mode for p in params}
    return FILTERED if FILTERED in modes else RANDOM if RANDOM in modes else GREEDY


def row_keys(s: SamplingArrays) -> jax.Array:
    """One key per row from (seed, step): a row's draws don't depend on its batch."""
    base = jax.vmap(jax.random.key)(s.seed)
    return jax.vmap(jax.random.fold_in)(base, s.step)


def sample(logits: jax.Array, s: SamplingArrays, mode: str = FILTERED) -> jax.Array:
    """logits f32[B, V] -> token ids i32[B]. ``mode`` is static (see ``batch_mode``)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if mode == GREEDY:
        return greedy
    keys = row_keys(s)
    t = jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
    x = logits.astype(jnp.float32) / t
    if mode == RANDOM:
        tok = jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)
        return jnp.where(s.temperature > 0, tok, greedy)
    x = filter_logits(x, s.top_k, s.top_p, s.min_p)
    tok = jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)
    return jnp.where(s.temperature > 0, tok, greedy)


def filter_logits(x: jax.Array, top_k, top_p, min_p) -> jax.Array:
    """Set to -inf every logit outside top-k / top-p / min-p (per row). x f32[B, V]."""
    V = x.shape[-1]
    sorted_x = -jnp.sort(-x, axis=-1)  # descending, (B, V)
    probs = jax.nn.softmax(sorted_x, axis=-1)
    rank = jnp.arange(V)[None, :]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)[:, None]
    # Mass strictly before each token: a token is kept while that mass is < top_p,
    # so the best token is always kept.
    before = jnp.cumsum(probs, axis=-1) - probs
    in_nucleus = (before < top_p[:, None]) | (top_p[:, None] >= 1.0)  # rounding: 1.0 keeps all
    keep = (rank < k) & in_nucleus & (probs >= min_p[:, None] * probs[:, :1])
    # The threshold is the smallest kept logit; ties at the threshold are kept.
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    thresh = jnp.take_along_axis(sorted_x, (n_keep - 1)[:, None], axis=-1)
    return jnp.where(x >= thresh, x, -jnp.inf)
