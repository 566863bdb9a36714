"""Tokenizer built from GGUF metadata: parity with transformers, round trips, streaming."""

from __future__ import annotations

import random

import pytest

TEXTS = [
    "The capital of France is",
    "Digits split one by one: 1234567890 and 3.14159, 2024-11-21.",
    "Emoji 😀👍🏽🇫🇷 and a family 👨‍👩‍👧‍👦!",
    "CJK 你好世界，日本語のテキスト、한국어 텍스트.",
    "Accents: café naïve Ångström — “quotes” and tabs\tand\nnewlines\n\n  spaces",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>mixed <|im_end|> specials",
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    from fineserve_jax.assets import smollm2_gguf_path

    p = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


def test_special_token_ids(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
    assert tok.token_to_id("<|im_start|>") == 1 and tok.token_to_id("<|im_end|>") == 2
    assert tok.token_to_id("<|endoftext|>") == 0
    assert tok.vocab_size == 49152


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers_and_round_trips(smollm2_tokenizer, hf_tokenizer, text):
    ids = smollm2_tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    assert smollm2_tokenizer.decode(ids, skip_special_tokens=False) == text


def test_digits_are_split_individually(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("2024")
    assert len(ids) == 4
    assert [smollm2_tokenizer.decode([i]) for i in ids] == ["2", "0", "2", "4"]


def test_special_tokens_are_single_ids_and_skippable(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("<|im_start|>user")
    assert ids[0] == 1
    assert smollm2_tokenizer.decode(ids) == "user"


def test_chat_template_matches_transformers(smollm2_tokenizer, hf_tokenizer):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"}]
    ours = smollm2_tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    ref = hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours == ref
    assert ours.endswith("<|im_start|>assistant\n")
    # Without a system message the template inserts its default one.
    assert "You are a helpful AI assistant" in smollm2_tokenizer.apply_chat_template(msgs[1:2])


def _stream(tok, ids, skip=True):
    d = tok.detokenizer(skip_special_tokens=skip)
    pieces = [d.add(i) for i in ids]
    pieces.append(d.flush())
    return pieces


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_detokenizer_equals_full_decode(smollm2_tokenizer, text):
    ids = smollm2_tokenizer.encode(text)
    for skip in (True, False):
        pieces = _stream(smollm2_tokenizer, ids, skip)
        assert "".join(pieces) == smollm2_tokenizer.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in p for p in pieces)  # never half a character


def test_streaming_holds_back_partial_utf8(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.encode("😀")
    assert len(ids) > 1  # a 4-byte character spread over several byte tokens
    d = tok.detokenizer()
    assert [d.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert d.add(ids[-1]) == "😀"


def test_streaming_random_token_sequences(smollm2_tokenizer):
    """Arbitrary ids (invalid UTF-8 included): pieces still concatenate to decode()."""
    rng = random.Random(0)
    for _ in range(30):
        ids = [rng.randrange(49152) for _ in range(rng.randrange(1, 40))]
        pieces = _stream(smollm2_tokenizer, ids)
        assert "".join(pieces) == smollm2_tokenizer.decode(ids)
