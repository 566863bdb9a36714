"""OpenAI request parsing and response shapes, free of HTTP and of the engine thread.

``parse_completion`` and ``parse_chat`` turn a decoded JSON body into a ``GenRequest``
(prompts as token ids, one ``SamplingParams`` per choice) or raise ``APIError`` naming
the parameter at fault; the ``*_logprobs`` helpers render the engine's ``TokenLogprob``s
in the two OpenAI shapes (completions' parallel lists, chat's ``content`` list).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

from fineserve_jax.engine.handle import TokenLogprob
from fineserve_jax.sampling import MAX_LOGPROBS, SamplingParams
from fineserve_jax.tokenizer import Tokenizer


class APIError(Exception):
    """An error answered to the client with an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type, self.code, self.headers = type_, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (server options)."""

    max_body_bytes: int = 1 << 20
    max_n: int = 8  # choices per prompt
    max_prompts: int = 32  # prompts in one completions request
    max_tokens: int = 4096  # the largest max_tokens accepted
    max_prompt_tokens: int | None = None  # None: the model's context
    max_waiting: int = 256  # queued requests per model beyond what runs (then 429)

    def __post_init__(self):
        for f in ("max_body_bytes", "max_n", "max_prompts", "max_tokens", "max_waiting"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ValueError(f"{f} must be a positive int")


@dataclass
class GenRequest:
    """A parsed generation request: ``len(prompts) * n`` choices."""

    model: str
    prompts: list[list[int]]  # token ids per prompt
    prompt_texts: list[str | None]  # the text given, for echo
    params: list[list[SamplingParams]]  # per prompt, one per choice (seeds differ)
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None  # alternatives per token in the answer
    chat: bool = False


# Fields a request may carry. Those with a value other than their neutral one that this
# server does not implement are refused by name (``_NEUTRAL``); others are refused as unknown.
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "seed",
           "n", "stream", "stream_options", "user", "presence_penalty", "frequency_penalty",
           "repetition_penalty", "logit_bias", "ignore_eos", "stop_token_ids",
           "skip_special_tokens"}
COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs",
                         "response_format", "tools", "tool_choice", "parallel_tool_calls",
                         "store", "metadata", "service_tier", "modalities"}
_NEUTRAL = {"presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None),
            "repetition_penalty": (1, 1.0, None), "logit_bias": (None,), "best_of": (1, None),
            "suffix": (None,), "tools": (None,), "tool_choice": (None, "none"),
            "parallel_tool_calls": (None, True, False), "store": (None, False),
            "metadata": (None,), "service_tier": (None, "auto", "default"),
            "modalities": (None,)}


def parse_json(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not valid UTF-8 (byte {e.start})") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(400, f"request body is not valid JSON: {e.msg} at line {e.lineno} "
                            f"column {e.colno}") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    return body


def _check_fields(body: dict, allowed: set[str]) -> None:
    for k in body:
        if k not in allowed:
            raise APIError(400, f"unrecognized request argument: {k!r}", k)
        if k in _NEUTRAL and body[k] not in _NEUTRAL[k] and body[k] != {}:
            raise APIError(400, f"{k!r} is not supported by this server", k)


def _number(body: dict, name: str, default, *, integer: bool = False, lo=None, hi=None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise APIError(400, f"{name!r} must be {'an integer' if integer else 'a number'}, "
                            f"got {json.dumps(v)[:40]}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise APIError(400, f"{name!r} must be {rng}, got {v}", name)
    return int(v) if integer else float(v)


def _bool(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise APIError(400, f"{name!r} must be a boolean", name)
    return v


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or len(stop) > 16
            or not all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, "'stop' must be a non-empty string or a list of at most 16", "stop")
    return tuple(stop)


def _token_list(v, name: str) -> tuple[int, ...]:
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                          for i in v):
        raise APIError(400, f"{name!r} must be a list of token ids", name)
    return tuple(v)


def _sampling(body: dict, max_tokens: int, logprobs: int | None,
              prompt_logprobs: int | None) -> SamplingParams:
    temperature = _number(body, "temperature", 1.0, lo=0, hi=2)
    top_k = _number(body, "top_k", 0, integer=True, lo=-1)
    kw = dict(max_tokens=max_tokens, temperature=temperature,
              top_p=_number(body, "top_p", 1.0, lo=0, hi=1),
              top_k=0 if top_k == -1 else top_k,  # -1: off, as vLLM spells it
              min_p=_number(body, "min_p", 0.0, lo=0, hi=1),
              seed=_number(body, "seed", None, integer=True, lo=-(2**63), hi=2**64 - 1),
              stop=_stop(body), stop_token_ids=_token_list(body.get("stop_token_ids"),
                                                           "stop_token_ids"),
              ignore_eos=_bool(body, "ignore_eos"),
              skip_special_tokens=(body.get("skip_special_tokens") is not False),
              logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    if kw["top_p"] == 0:
        raise APIError(400, "'top_p' must be in (0, 1]", "top_p")
    if kw["seed"] is not None:
        kw["seed"] %= 2**31
    try:
        return SamplingParams(**kw)
    except ValueError as e:
        param = str(e).split()[0]
        raise APIError(400, str(e), param if param in kw else None) from None


def _max_tokens(body: dict, name: str, prompt_len: int, context: int, limits: Limits,
                default: int | None, least: int) -> int:
    """The request's max_tokens: refused when prompt + max_tokens exceeds the context;
    the default is clamped to what fits."""
    room = context - prompt_len
    given = _number(body, name, None, integer=True, lo=least, hi=limits.max_tokens)
    if given is None:
        return max(least, min(room, limits.max_tokens if default is None else default))
    if given > room:
        raise APIError(400, f"this model's context is {context} tokens; the prompt has "
                            f"{prompt_len}, so {name} must be at most {room} (got {given})",
                       name, code="context_length_exceeded")
    return given


def _n(body: dict, limits: Limits) -> int:
    return _number(body, "n", 1, integer=True, lo=1, hi=limits.max_n)


def _check_prompt(ids: list[int], tok_vocab: int, context: int, limits: Limits,
                  param: str) -> None:
    if not ids:
        raise APIError(400, "the prompt is empty", param)
    bad = next((i for i in ids if not 0 <= i < tok_vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary [0, {tok_vocab})", param)
    cap = min(context - 1, limits.max_prompt_tokens or context)
    if len(ids) > cap:
        raise APIError(400, f"the prompt has {len(ids)} tokens; at most {cap} are accepted "
                            f"(context {context})", param, code="context_length_exceeded")


def _choices_params(base: SamplingParams, n: int) -> list[SamplingParams]:
    if n == 1 or base.seed is None:
        return [base] * n
    return [replace(base, seed=(base.seed + j) % 2**31) for j in range(n)]


def parse_completion(body: dict, tok: Tokenizer, vocab: int, context: int,
                     limits: Limits) -> GenRequest:
    _check_fields(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, str) or isinstance(prompt, list) and prompt and all(
            isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (isinstance(p, list) and all(
                isinstance(i, int) and not isinstance(i, bool) for i in p)) for p in prompt):
        prompts = list(prompt)
    else:
        raise APIError(400, "'prompt' must be a string, a list of token ids, or a list of "
                            "either", "prompt")
    if len(prompts) > limits.max_prompts:
        raise APIError(400, f"at most {limits.max_prompts} prompts per request", "prompt")
    ids = [tok.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    for i in ids:
        _check_prompt(i, vocab, context, limits, "prompt")
    lp = body.get("logprobs")
    if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int)
                           or not 0 <= lp <= 5):
        raise APIError(400, "'logprobs' must be an integer in [0, 5]", "logprobs")
    echo = _bool(body, "echo")
    n = _n(body, limits)
    least = 0 if echo else 1
    mt = [_max_tokens(body, "max_tokens", len(i), context, limits, 16, least) for i in ids]
    if min(mt) == 0 and not echo:
        raise APIError(400, "'max_tokens' must be >= 1", "max_tokens")
    params = []
    for m in mt:
        # Echo scores the prompt when logprobs are asked for (or nothing is generated).
        plp = lp if echo and lp is not None else (0 if echo and m == 0 else None)
        base = _sampling(body, m, lp, plp)
        params.append(_choices_params(base, n))
    texts = [p if isinstance(p, str) else None for p in prompts]
    return GenRequest(body.get("model"), ids, texts, params, echo=echo, logprobs=lp,
                      **_stream(body))


def parse_chat(body: dict, tok: Tokenizer, vocab: int, context: int,
               limits: Limits) -> GenRequest:
    _check_fields(body, CHAT_FIELDS)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list of {role, content}", "messages")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string 'role'",
                           "messages")
        if m["role"] not in ("system", "user", "assistant", "developer", "tool"):
            raise APIError(400, f"messages[{i}].role {m['role']!r} is not a chat role",
                           "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: the text ones
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported",
                               "messages")
            content = "".join(p["text"] for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or text parts",
                           "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        clean.append({"role": role, "content": content})
    try:
        ids = tok.encode_chat(clean)
    except Exception as e:
        raise APIError(400, f"cannot apply the chat template: {e}", "messages") from None
    _check_prompt(ids, vocab, context, limits, "messages")
    lp = None
    if _bool(body, "logprobs"):
        lp = _number(body, "top_logprobs", 0, integer=True, lo=0, hi=MAX_LOGPROBS)
    elif body.get("top_logprobs") is not None:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise APIError(400, "only response_format {'type': 'text'} is supported",
                       "response_format")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    mt = _max_tokens(body, name, len(ids), context, limits, None, 1)
    base = _sampling(body, mt, lp, None)
    return GenRequest(body.get("model"), [ids], [None],
                      [_choices_params(base, _n(body, limits))], logprobs=lp, chat=True,
                      **_stream(body))


def _stream(body: dict) -> dict:
    stream = _bool(body, "stream")
    so = body.get("stream_options")
    if so is not None and (not isinstance(so, dict) or not stream):
        raise APIError(400, "'stream_options' is an object, allowed with 'stream': true",
                       "stream_options")
    return {"stream": stream, "include_usage": bool((so or {}).get("include_usage"))}


# ------------------------------------------------------------------ logprobs rendering
@lru_cache(maxsize=8)
def _byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet: printable stand-in character -> byte."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tok: Tokenizer, token_id: int) -> bytes:
    """The bytes a token stands for (byte-level BPE pieces mapped back to their bytes)."""
    piece = tok.id_to_token(token_id) or ""
    dec = _byte_decoder()
    if piece and all(ch in dec for ch in piece):
        return bytes(dec[ch] for ch in piece)
    return tok.decode([token_id], skip_special_tokens=False).encode("utf-8")


def token_str(tok: Tokenizer, token_id: int) -> str:
    return token_bytes(tok, token_id).decode("utf-8", errors="replace")


def completion_logprobs(tok: Tokenizer, entries: list[TokenLogprob | None],
                        token_ids: list[int], offset0: int = 0) -> dict:
    """OpenAI completions ``logprobs``: parallel lists over ``token_ids``."""
    tokens, lps, tops, offsets = [], [], [], []
    off = offset0
    for tid, e in zip(token_ids, entries):
        s = token_str(tok, tid)
        tokens.append(s)
        offsets.append(off)
        off += len(s)
        if e is None:
            lps.append(None)
            tops.append(None)
            continue
        lps.append(e.logprob)
        top: dict[str, float] = {}
        for i, v in e.top:
            top.setdefault(token_str(tok, i), v)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(tok: Tokenizer, entries: list[TokenLogprob]) -> dict:
    """OpenAI chat ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""

    def one(tid: int, lp: float) -> dict[str, Any]:
        b = token_bytes(tok, tid)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": lp,
                "bytes": list(b)}

    return {"content": [{**one(e.token_id, e.logprob),
                         "top_logprobs": [one(i, v) for i, v in e.top]} for e in entries]}
