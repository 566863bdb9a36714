"""Tiny random Llama-family checkpoints written with HF ``transformers``, for parity tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, rope_theta=10000.0)


def byte_tokenizer_json() -> str:
    """A byte-level BPE over the 256 byte symbols plus <s> and </s>, no merges."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    return tok.to_str()


def make_hf_model(path: Path, seed: int = 0, arch: str = "llama", **overrides):
    """Save a random model (safetensors) + tokenizer to ``path``; returns the torch model."""
    import torch
    import transformers

    torch.manual_seed(seed)
    shard = overrides.pop("max_shard_size", None)
    kw = dict(TINY, bos_token_id=256, eos_token_id=257)
    kw.update(overrides)
    if arch == "mistral":
        kw.pop("attention_bias", None)
        cfg = transformers.MistralConfig(**kw)
        model = transformers.MistralForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**kw)
        model = transformers.LlamaForCausalLM(cfg)
    # Random init leaves norms at 1 and biases at 0: perturb them so they are tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(path, safe_serialization=True,
                          **({"max_shard_size": shard} if shard else {}))
    (Path(path) / "tokenizer.json").write_text(byte_tokenizer_json())
    return model


def hf_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=False)
    return out.logits[0].float().numpy()


def rel_err_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row relative error ||a - b|| / ||b||."""
    return np.linalg.norm(a - b, axis=-1) / np.maximum(np.linalg.norm(b, axis=-1), 1e-30)


def read_json(p) -> dict:
    return json.loads(Path(p).read_text())
