"""Stop rules and streamed text of one sequence (host side, no model)."""

from __future__ import annotations

import pytest

from fineserve_jax.sampling import SamplingParams
from fineserve_jax.sequence import SequenceState


def _feed(tok, text_ids, params):
    seq = SequenceState(tok, params, prompt_ids=[1])
    pieces = []
    for i in text_ids:
        pieces.append(seq.append(i))
        if seq.finished:
            break
    return seq, pieces


def test_stop_string_is_cut_and_never_streamed(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.encode("Hello world. STOP here and more text")
    seq, pieces = _feed(tok, ids, SamplingParams(max_tokens=100, stop=["STOP"]))
    assert seq.finish_reason == "stop"
    assert seq.text == "Hello world. "
    assert "".join(pieces) == seq.text
    assert all("ST" not in p for p in pieces)


def test_eos_stops_and_is_not_in_text(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.encode("Answer: yes") + [2] + tok.encode(" ignored")
    seq, pieces = _feed(tok, ids, SamplingParams(max_tokens=100))
    assert seq.finish_reason == "stop" and seq.output_ids[-1] == 2
    assert seq.text == "Answer: yes" == "".join(pieces)
    seq, _ = _feed(tok, ids, SamplingParams(max_tokens=100, ignore_eos=True))
    assert seq.finish_reason is None and len(seq.output_ids) == len(ids)


def test_max_tokens_gives_length(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.encode("one two three four five six")
    seq, pieces = _feed(tok, ids, SamplingParams(max_tokens=3))
    assert seq.finish_reason == "length" and len(seq.output_ids) == 3
    assert "".join(pieces) == seq.text == tok.decode(ids[:3])


def test_stop_token_ids(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.encode("a b c d")
    seq, _ = _feed(tok, ids, SamplingParams(max_tokens=10, stop_token_ids=[ids[2]]))
    assert seq.finish_reason == "stop" and seq.output_ids == ids[:3]


def test_append_after_finish_raises(smollm2_tokenizer):
    seq, _ = _feed(smollm2_tokenizer, [2], SamplingParams())
    with pytest.raises(RuntimeError):
        seq.append(5)
