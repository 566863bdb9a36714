"""Block formats: how many bytes one KV block of one model takes in the shared pool.

Plain Python (no JAX). A *block* holds K and V of ``block_tokens`` consecutive tokens of
one sequence, for every layer, in one model's storage format (values plus scales). The
byte layout inside a block, used by the device side (``fineserve_jax.engine.pool``), is
layer-major so that one layer of one block is a contiguous segment:

    block = [layer 0 segment][layer 1 segment]...           each layer_bytes long
    segment = K values [T, Hkv, D] | V values [T, Hkv, D] | K scales [T, Hkv] | V scales [T, Hkv]

with T = block_tokens, values ``value_bytes`` each (0.5 for nibble-packed INT4) and
``scale_bytes`` per (token, KV head) for each of K and V (0 for unscaled formats).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockFormat:
    layers: int
    kv_heads: int
    head_dim: int
    block_tokens: int
    value_bytes: float  # bytes per stored K or V element: 4 f32, 2 bf16, 1 fp8, 0.5 int4
    scale_bytes: int = 0  # bytes of scale per (token, KV head), for K and for V each
    name: str = ""  # the KV dtype as people say it: "bf16", "fp8", "int4", ...

    def __post_init__(self):
        for f in ("layers", "kv_heads", "head_dim", "block_tokens"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{f} must be a positive int, got {v!r}")
        if self.value_bytes not in (0.5, 1, 2, 4):
            raise ValueError(f"value_bytes must be 0.5, 1, 2 or 4, got {self.value_bytes!r}")
        if self.value_bytes == 0.5 and self.head_dim % 2:
            raise ValueError("INT4 values need an even head_dim (two values per byte)")
        if not isinstance(self.scale_bytes, int) or self.scale_bytes < 0:
            raise ValueError(f"scale_bytes must be an int >= 0, got {self.scale_bytes!r}")

    @property
    def value_row_bytes(self) -> int:
        """Bytes of K (or V) values of one token in one layer: Hkv * D * value_bytes."""
        return int(self.kv_heads * self.head_dim * self.value_bytes)

    @property
    def scale_row_bytes(self) -> int:
        """Bytes of K (or V) scales of one token in one layer: Hkv * scale_bytes."""
        return self.kv_heads * self.scale_bytes

    @property
    def layer_bytes(self) -> int:
        """One layer of one block: K and V values and scales of block_tokens tokens."""
        return 2 * self.block_tokens * (self.value_row_bytes + self.scale_row_bytes)

    @property
    def block_bytes(self) -> int:
        return self.layers * self.layer_bytes

    @property
    def token_bytes(self) -> float:
        """KV bytes of one token, all layers, K and V (values and scales)."""
        return self.block_bytes / self.block_tokens

    def blocks_for(self, tokens: int) -> int:
        """Blocks needed to hold ``tokens`` tokens."""
        return -(-tokens // self.block_tokens)

    def __str__(self):
        return (f"{self.name or 'kv'}[L={self.layers}, Hkv={self.kv_heads}, D={self.head_dim}, "
                f"T={self.block_tokens}, {self.block_bytes} B/block]")
