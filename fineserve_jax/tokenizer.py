"""Tokenizer (HF ``tokenizers``), chat templates and the incremental detokenizer.

Built from ``tokenizer.json`` or from GGUF metadata (byte-level BPE). The chat template
is rendered with Jinja in a sandbox, the way HF ``apply_chat_template`` does.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, processors

# Llama-3's pre-tokenizer regex (GGUF pre = "llama-bpe"); GPT-2's is built into ByteLevel.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTROL, _USER_DEFINED = 3, 4  # GGUF token types that are special tokens


class Tokenizer:
    """Text <-> ids, plus what generation needs: BOS/EOS ids and the chat template."""

    def __init__(self, tok: tokenizers.Tokenizer, *, bos_token_id: int | None,
                 eos_token_ids: Sequence[int], chat_template: str | None = None):
        self.tok = tok
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(int(e) for e in eos_token_ids)
        self.chat_template = chat_template
        self._template = None

    def __repr__(self):
        return (f"Tokenizer(vocab={self.vocab_size}, bos={self.bos_token_id}, "
                f"eos={list(self.eos_token_ids)}, chat_template={self.chat_template is not None})")

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = True) -> str:
        """Render messages with the model's chat template (a clear error if it has none)."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; use a plain prompt")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        bos = self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else ""
        eos = self.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else ""
        return self._template.render(messages=list(messages),
                                     add_generation_prompt=add_generation_prompt,
                                     bos_token=bos or "", eos_token=eos or "")

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        # The template writes any BOS itself, so no special tokens are added here.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt),
                           add_special_tokens=False)

    def detokenizer(self, skip_special_tokens: bool = True) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, skip_special_tokens)

    # ------------------------------------------------------------ serialisation
    def to_json(self) -> str:
        return self.tok.to_str()

    def meta(self) -> dict:
        return {"bos_token_id": self.bos_token_id, "eos_token_ids": list(self.eos_token_ids),
                "chat_template": self.chat_template}

    @classmethod
    def from_json(cls, tokenizer_json: str, meta: Mapping[str, Any]) -> "Tokenizer":
        return cls(tokenizers.Tokenizer.from_str(tokenizer_json),
                   bos_token_id=meta.get("bos_token_id"),
                   eos_token_ids=meta.get("eos_token_ids") or (),
                   chat_template=meta.get("chat_template"))


def _compile_template(source: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


class IncrementalDetokenizer:
    """Streams text for one sequence of generated ids.

    Each ``add`` returns the new text. Text is held back while the decoded tail ends in
    an incomplete UTF-8 sequence (U+FFFD), so a multi-byte character is never split.
    Decoding a sliding window (prefix..end minus prefix..read) keeps each step O(1) and
    keeps tokenizers whose decode depends on the preceding token consistent. The pieces
    of ``add`` and the final ``flush`` concatenate to ``tokenizer.decode(all ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the context window
        self.read = 0  # ids before this index have been emitted
        self.text = ""  # everything emitted so far

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        new_text = self._decode(self.ids[self.prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text):]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Whatever is still held back (at the end of the sequence)."""
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        new_text = self._decode(self.ids[self.prefix:])
        delta = new_text[len(prefix_text):]
        self.prefix = self.read = len(self.ids)
        self.text += delta
        return delta


# ------------------------------------------------------------------- builders
def tokenizer_from_gguf(fields: Mapping[str, Any]) -> Tokenizer:
    """Byte-level BPE from GGUF ``tokenizer.ggml.*`` metadata."""
    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE "
                         f"'gpt2'); convert from an HF directory with tokenizer.json instead")
    tokens = list(fields["tokenizer.ggml.tokens"])
    types = list(fields.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges") or []]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF token list has duplicate tokens")
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                          byte_fallback=False))
    pre = fields.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # digits one by one, then the GPT-2 regex
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("default", "gpt2", "gpt-2"):
        tok.pre_tokenizer = byte_level
    elif pre in ("llama-bpe", "llama3"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported "
                         f"(supported: smollm, gpt2, llama-bpe)")
    tok.decoder = decoders.ByteLevel()
    specials = [tokenizers.AddedToken(t, special=True, normalized=False)
                for t, ty in zip(tokens, types) if ty in (_CONTROL, _USER_DEFINED)]
    tok.add_special_tokens(specials)
    bos = fields.get("tokenizer.ggml.bos_token_id")
    eos = fields.get("tokenizer.ggml.eos_token_id")
    eot = fields.get("tokenizer.ggml.eot_token_id")
    if fields.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B",
            special_tokens=[(tokens[bos], int(bos))])
    eos_ids = [int(e) for e in (eos, eot) if e is not None]
    return Tokenizer(tok, bos_token_id=None if bos is None else int(bos),
                     eos_token_ids=list(dict.fromkeys(eos_ids)),
                     chat_template=fields.get("tokenizer.chat_template"))


def tokenizer_from_hf_dir(path, hf_config: Mapping[str, Any]) -> Tokenizer:
    """From ``tokenizer.json`` (+ ``tokenizer_config.json``, ``generation_config.json``)."""
    from pathlib import Path

    path = Path(path)
    tj = path / "tokenizer.json"
    if not tj.exists():
        raise FileNotFoundError(f"{path} has no tokenizer.json (required to serve text)")
    tok = tokenizers.Tokenizer.from_file(str(tj))
    tcfg = _read_json(path / "tokenizer_config.json")
    gen = _read_json(path / "generation_config.json")

    def tok_id(v):
        if isinstance(v, dict):
            v = v.get("content")
        return tok.token_to_id(v) if isinstance(v, str) else None

    bos = hf_config.get("bos_token_id", gen.get("bos_token_id"))
    if bos is None:
        bos = tok_id(tcfg.get("bos_token"))
    eos = gen.get("eos_token_id", hf_config.get("eos_token_id"))
    if eos is None:
        eos = tok_id(tcfg.get("eos_token"))
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja = path / "chat_template.jinja"
    if template is None and jinja.exists():
        template = jinja.read_text()
    return Tokenizer(tok, bos_token_id=bos, eos_token_ids=eos_ids, chat_template=template)


def _read_json(p) -> dict:
    return json.loads(p.read_text()) if p.exists() else {}
