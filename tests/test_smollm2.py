"""The real packaged model: reference values from shared/ASSETS.md and HF parity."""

from __future__ import annotations

import numpy as np
import pytest

from fineserve_jax import SamplingParams
from tiny_models import rel_err_rows

PROMPT = "The capital of France is"
PROMPT_IDS = [504, 3575, 282, 4649, 314]
GREEDY_30 = [7042, 30, 198, 198, 504, 2988, 314, 42, 216, 34, 32, 33, 40, 29, 32, 33, 29, 34,
             34, 216, 33, 34, 42, 33, 34, 42, 37, 35, 30, 2]
GREEDY = SamplingParams(max_tokens=30, temperature=0)


def test_prompt_ids(smollm2_tokenizer):
    assert smollm2_tokenizer.encode(PROMPT) == PROMPT_IDS


def test_greedy_30_tokens_float32(smollm2_f32):
    out = smollm2_f32.generate(PROMPT, GREEDY)[0]
    assert out.token_ids == GREEDY_30
    assert out.finish_reason == "stop"  # the 30th token is <|im_end|>
    assert out.text.startswith(" Paris.\n\nThe answer is:")


def test_greedy_bfloat16_answers_paris(smollm2_bf16):
    out = smollm2_bf16.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0))[0]
    assert out.token_ids[:2] == GREEDY_30[:2]  # " Paris", "."


def test_chat_template_answers_paris(smollm2_f32):
    out = smollm2_f32.chat([{"role": "user", "content": "What is the capital of France?"}],
                           SamplingParams(max_tokens=24, temperature=0))
    assert "Paris" in out.text


def test_batched_prompts_of_different_lengths_match_single(smollm2_f32):
    prompts = [PROMPT, "Hello", "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21"]
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    batched = smollm2_f32.generate(prompts, sp)
    for p, b in zip(prompts, batched):
        assert smollm2_f32.generate(p, sp)[0].token_ids == b.token_ids


def test_logits_agree_with_greedy_step(smollm2_f32):
    logits = smollm2_f32.logits(PROMPT_IDS + GREEDY_30[:10])
    assert logits.shape == (15, 49152) and logits.dtype == np.float32
    assert list(np.argmax(logits[4:], axis=-1)) == GREEDY_30[:11]


def test_stream_concatenates_to_generate(smollm2_f32):
    sp = SamplingParams(max_tokens=40, temperature=0.8, seed=3)
    pieces = list(smollm2_f32.stream("Once upon a time", sp))
    assert len(pieces) > 3
    assert "".join(pieces) == smollm2_f32.generate("Once upon a time", sp)[0].text


@pytest.fixture(scope="module")
def hf_smollm2():
    """transformers' own GGUF loader (independent dequantize + un-permute), float32."""
    import torch
    from transformers import AutoModelForCausalLM

    from fineserve_jax.assets import smollm2_gguf_path

    p = smollm2_gguf_path()
    return AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                dtype=torch.float32)


def test_logits_match_transformers_gguf_loader(smollm2_f32, hf_smollm2):
    import torch

    ids = PROMPT_IDS + GREEDY_30[:11]
    with torch.no_grad():
        ref = hf_smollm2(torch.tensor([ids])).logits[0].numpy()
    assert rel_err_rows(smollm2_f32.logits(ids), ref).max() < 1e-4


@pytest.mark.slow
def test_perplexity_command_matches_transformers(capsys, smollm2_tokenizer, hf_smollm2):
    """``eval ppl`` in float32 on the corpus' first two windows of 512 tokens equals the
    perplexity transformers gives the same windows. (The full reference, 10.906 over the
    first 16,384 tokens, is a recorded benchmark: docs/benchmarks.md, "Perplexity".)"""
    import torch

    from fineserve_jax.eval import corpus_slice, main

    assert main(["ppl", "--model", "smollm2-135m", "--dtype", "float32", "--tokens", "1024",
                 "--window", "512", "--quiet"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    ppl = float(last.split("ppl=")[1].split()[0])
    windows = torch.tensor(corpus_slice(smollm2_tokenizer, 0, 1024).reshape(2, 512),
                           dtype=torch.long)
    with torch.no_grad():
        logp = torch.log_softmax(hf_smollm2(windows).logits[:, :-1].double(), dim=-1)
    nll = -logp.gather(-1, windows[:, 1:, None]).mean().item()
    ref = float(np.exp(nll))
    assert 8 < ref < 14  # the corpus' opening is ordinary prose for this model
    assert abs(ppl - ref) / ref < 1e-4, (last, ref)


def test_convert_alias_to_orbax_and_serve_from_it(tmp_path, smollm2_bf16):
    from checkpoints.convert import main as convert_main
    from checkpoints.orbax_io import read_metadata
    from fineserve_jax import LLM
    from fineserve_jax.assets import SMOLLM2_SHA256

    assert convert_main(["smollm2-135m", "--out", str(tmp_path / "ck"), "--dtype", "bfloat16",
                         "--quiet"]) == 0
    meta = read_metadata(tmp_path / "ck")
    assert meta["source_sha256"] == SMOLLM2_SHA256 and meta["source_format"] == "gguf"
    assert "<|im_start|>" in meta["tokenizer"]["chat_template"]
    llm = LLM(str(tmp_path / "ck"), dtype="bfloat16", progress=False)
    sp = SamplingParams(max_tokens=10, temperature=0)
    assert llm.generate(PROMPT, sp)[0].token_ids == smollm2_bf16.generate(PROMPT, sp)[0].token_ids
