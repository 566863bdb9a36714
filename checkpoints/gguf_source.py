"""Reading a GGUF file (llama.cpp's format): metadata, tokenizer and tensors one at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import gguf
import numpy as np

from checkpoints.errors import CheckpointError
from fineserve_jax.config import ModelConfig
from fineserve_jax.tokenizer import Tokenizer, tokenizer_from_gguf


class _CheckedReader(gguf.GGUFReader):
    """GGUFReader that names the tensor whose bytes lie past the end of a short file."""

    def _build_tensors(self, start_offs, fields):
        size = len(self.data)
        for field in fields:
            _, name_data, _, dims, raw_dtype, offset = field.parts
            name = bytes(name_data).decode("utf-8", "replace")
            try:
                qtype = gguf.GGMLQuantizationType(int(raw_dtype[0]))
            except ValueError:
                raise CheckpointError(f"tensor {name!r} has unknown GGML type {int(raw_dtype[0])}")
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n_bytes = int(np.prod(dims)) * type_size // block
            end = int(start_offs + offset[0]) + n_bytes
            if end > size:
                raise CheckpointError(
                    f"GGUF file is truncated: tensor {name!r} needs bytes up to {end}, "
                    f"file has {size}")
        super()._build_tensors(start_offs, fields)


class GGUFSource:
    """A GGUF checkpoint: config, tokenizer, and an iterator of (name, float32 array)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.reader = _CheckedReader(str(self.path))
        except CheckpointError:
            raise
        except Exception as e:  # a corrupt header; the reader's message says where
            raise CheckpointError(f"cannot read GGUF file {self.path}: {e}") from e
        self.fields = {}
        for k, f in self.reader.fields.items():
            if k.startswith("GGUF."):
                continue
            try:
                self.fields[k] = f.contents()
            except Exception as e:
                raise CheckpointError(f"cannot decode GGUF metadata {k!r}: {e}") from e
        self.tensors = {t.name: t for t in self.reader.tensors}
        tokens = self.fields.get("tokenizer.ggml.tokens")
        vocab = int(self.fields.get(f"{self.fields.get('general.architecture')}.vocab_size")
                    or (len(tokens) if tokens else 0) or self._embed_rows())
        factors = self.read("rope_freqs.weight") if "rope_freqs.weight" in self.tensors else None
        self.config = ModelConfig.from_gguf(self.fields, vocab_size=vocab,
                                            has_output="output.weight" in self.tensors,
                                            rope_freq_factors=factors)

    def _embed_rows(self) -> int:
        t = self.tensors.get("token_embd.weight")
        if t is None:
            raise CheckpointError("GGUF file has no token_embd.weight")
        return int(t.shape[-1])

    def tokenizer(self) -> Tokenizer:
        return tokenizer_from_gguf(self.fields)

    def read(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise CheckpointError(f"tensor {name!r}: GGML type {t.tensor_type.name} "
                                  f"cannot be dequantized ({e})") from e
        return np.asarray(arr, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist())))

    def iter_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.tensors:
            if name == "rope_freqs.weight":  # already folded into the config
                continue
            yield name, self.read(name)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of attn_q / attn_k (interleaved RoPE pairs).

    llama.cpp stores, per head, rows in the order (pair, 2) instead of HF's (2, half);
    this restores HF order so ``rotate_half`` RoPE applies. Works for weights [out, in]
    and biases [out].
    """
    out = w.shape[0]
    half = out // n_heads // 2
    return (w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))
