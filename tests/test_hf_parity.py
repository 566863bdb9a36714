"""Logits parity with HF transformers on tiny random checkpoints, through the converter."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from checkpoints.convert import main as convert_main
from fineserve_jax import LLM, SamplingParams
from fineserve_jax.config import ModelConfig
from tiny_models import hf_logits, make_hf_model, rel_err_rows

IDS = [256, 5, 17, 99, 3, 250, 42, 7, 7, 7, 120, 64, 1, 0, 255, 18, 33]

VARIANTS = {
    "gqa_tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "mha_untied": dict(num_key_value_heads=4, tie_word_embeddings=False),
    "mqa_bias": dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True),
    "llama3_rope": dict(num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=512,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 64}),
    "head_dim_32": dict(num_key_value_heads=2, head_dim=32),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logits_match_transformers_after_conversion(tmp_path, name):
    model = make_hf_model(tmp_path / "hf", **VARIANTS[name])
    out = tmp_path / "orbax"
    assert convert_main([str(tmp_path / "hf"), "--out", str(out), "--dtype", "float32",
                         "--quiet"]) == 0
    ref = hf_logits(model, IDS)
    for src in (out, tmp_path / "hf"):  # the Orbax checkpoint, and the HF dir directly
        llm = LLM(str(src), dtype="float32", progress=False)
        got = llm.logits(IDS)
        assert got.dtype == np.float32 and got.shape == ref.shape
        assert rel_err_rows(got, ref).max() < 2e-5, name


def test_bfloat16_close_to_transformers(tmp_path):
    model = make_hf_model(tmp_path / "hf", num_key_value_heads=2)
    llm = LLM(str(tmp_path / "hf"), dtype="bfloat16", progress=False)
    err = rel_err_rows(llm.logits(IDS), hf_logits(model, IDS))
    assert err.max() < 3e-2


def test_mistral_sliding_window(tmp_path):
    # A window shorter than the sequence: positions past it must stop seeing early keys.
    model = make_hf_model(tmp_path / "hf", arch="mistral", num_key_value_heads=2,
                          sliding_window=6)
    llm = LLM(str(tmp_path / "hf"), dtype="float32", progress=False)
    assert llm.config.sliding_window == 6
    assert rel_err_rows(llm.logits(IDS), hf_logits(model, IDS)).max() < 2e-5


def test_sharded_checkpoint_with_and_without_index(tmp_path):
    model = make_hf_model(tmp_path / "hf", max_shard_size="40KB")
    files = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    assert len(files) > 2 and (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ref = hf_logits(model, IDS)
    llm = LLM(str(tmp_path / "hf"), dtype="float32", progress=False)
    assert rel_err_rows(llm.logits(IDS), ref).max() < 2e-5
    (tmp_path / "hf" / "model.safetensors.index.json").unlink()
    llm = LLM(str(tmp_path / "hf"), dtype="float32", progress=False)
    assert rel_err_rows(llm.logits(IDS), ref).max() < 2e-5


def test_greedy_decode_matches_transformers_generate(tmp_path):
    """The KV-cache decode path (not only full-sequence logits) agrees with HF."""
    import torch

    model = make_hf_model(tmp_path / "hf", num_key_value_heads=2, tie_word_embeddings=False)
    prompt = IDS[:9]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    llm = LLM(str(tmp_path / "hf"), dtype="float32", progress=False)
    out = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == ref


def test_convert_cli_writes_metadata(tmp_path):
    make_hf_model(tmp_path / "hf", num_key_value_heads=2)
    out = tmp_path / "ck"
    r = subprocess.run([sys.executable, "-m", "checkpoints.convert", str(tmp_path / "hf"),
                        "--out", str(out), "--dtype", "bfloat16", "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    from checkpoints.orbax_io import read_metadata

    meta = read_metadata(out)
    assert meta["dtype"] == "bfloat16" and meta["precision"] == "bf16"
    assert meta["source_format"] == "hf" and len(meta["source_sha256"]) == 64
    assert ModelConfig.from_dict(meta["config"]).num_kv_heads == 2
    assert meta["tokenizer"]["eos_token_ids"] == [257]
    assert json.loads((out / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    # Refuses to overwrite without --force, and says why.
    r = subprocess.run([sys.executable, "-m", "checkpoints.convert", str(tmp_path / "hf"),
                        "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "exists" in r.stderr
