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


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation of attn_q / attn_k rows (HF -> GGUF order)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf_from_hf(model, path: Path, rope_freqs: np.ndarray | None = None,
                       drop: tuple[str, ...] = ()) -> None:
    """Write ``model`` as a llama.cpp-style GGUF (F32 tensors, permuted q/k, byte BPE)."""
    import gguf
    import tokenizers

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    tok = tokenizers.Tokenizer.from_str(byte_tokenizer_json())
    vocab = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in ("<s>", "</s>") else 1 for t, _ in vocab])
    w.add_token_merges([])
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    H, Hkv = c.num_attention_heads, c.num_key_value_heads
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
                 "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
                 "self_attn.o_proj.weight": "attn_output.weight",
                 "post_attention_layernorm.weight": "ffn_norm.weight",
                 "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                 "mlp.down_proj.weight": "ffn_down.weight"}
    for k, v in sd.items():
        if k == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if k in names:
            name = names[k]
        else:
            _, _, i, rest = k.split(".", 3)
            name = f"blk.{i}.{per_layer[rest]}"
            if rest == "self_attn.q_proj.weight":
                v = llama_cpp_permute(v, H)
            elif rest == "self_attn.k_proj.weight":
                v = llama_cpp_permute(v, Hkv)
        if name not in drop:
            w.add_tensor(name, np.ascontiguousarray(v, np.float32))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
