"""GGUF input: llama.cpp's q/k permutation, llama3 rope_freqs, truncation, the real model."""

from __future__ import annotations

import pytest

from checkpoints import CheckpointError, load_model
from fineserve_jax import LLM
from fineserve_jax.config import ModelConfig
from tiny_models import hf_logits, make_hf_model, rel_err_rows, write_gguf_from_hf

IDS = [256, 5, 17, 99, 3, 250, 42, 7, 7, 7, 120, 64, 1, 0, 255, 18, 33]


@pytest.mark.parametrize("kv_heads,tied", [(2, True), (4, False), (1, True)])
def test_gguf_logits_match_transformers(tmp_path, kv_heads, tied):
    model = make_hf_model(tmp_path / "hf", num_key_value_heads=kv_heads, tie_word_embeddings=tied)
    write_gguf_from_hf(model, tmp_path / "m.gguf")
    llm = LLM(str(tmp_path / "m.gguf"), dtype="float32", progress=False)
    assert llm.config.tie_word_embeddings == tied
    assert rel_err_rows(llm.logits(IDS), hf_logits(model, IDS)).max() < 2e-5


def test_gguf_llama3_rope_freqs_tensor(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model = make_hf_model(tmp_path / "hf", num_key_value_heads=2, rope_theta=500000.0,
                          max_position_embeddings=512, rope_scaling=scaling)
    # llama.cpp records llama3 scaling as per-frequency divisors in rope_freqs.weight.
    plain = ModelConfig.from_dict(dict(ModelConfig.from_hf(model.config.to_dict()).to_dict(),
                                       rope_scaling=None))
    scaled = ModelConfig.from_hf(model.config.to_dict())
    factors = plain.inv_freq() / scaled.inv_freq()
    assert factors.max() > 7  # the scaling really changes something
    write_gguf_from_hf(model, tmp_path / "m.gguf", rope_freqs=factors)
    llm = LLM(str(tmp_path / "m.gguf"), dtype="float32", progress=False)
    assert llm.config.rope_freq_factors is not None
    ids = (IDS * 8)[:120]  # long enough for the low frequencies to matter
    assert rel_err_rows(llm.logits(ids), hf_logits(model, ids)).max() < 2e-5


def test_truncated_gguf_names_tensor(tmp_path):
    model = make_hf_model(tmp_path / "hf", num_key_value_heads=2)
    write_gguf_from_hf(model, tmp_path / "m.gguf")
    raw = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "t.gguf").write_bytes(raw[:-500])
    with pytest.raises(CheckpointError, match=r"truncated: tensor '[\w.]+'"):
        load_model(tmp_path / "t.gguf", "float32", progress=False)


def test_gguf_missing_tensor_is_named(tmp_path):
    model = make_hf_model(tmp_path / "hf", num_key_value_heads=2)
    write_gguf_from_hf(model, tmp_path / "m.gguf", drop=("blk.1.ffn_down.weight",))
    with pytest.raises(CheckpointError, match=r"missing tensors: blk\.1\.ffn_down\.weight"):
        load_model(tmp_path / "m.gguf", "float32", progress=False)
