"""KV storage formats on the device: how K/V values become bytes of the shared pool.

Every model on a device stores its K and V in one ``uint8`` pool (see ``paged.py``);
a *format* says how one token's K (or V) of one layer, ``[Hkv, D]``, is encoded into
``value_row_bytes`` bytes of values and ``scale_row_bytes`` bytes of scales, and how
to decode them back. The host-side size of a block in a format is its
``BlockFormat`` (``fineserve_jax.kvslab``). Quantized formats register here too.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from fineserve_jax.config import ModelConfig
from fineserve_jax.kvslab import BlockFormat


@dataclass(frozen=True)
class PlainKVFormat:
    """K/V stored as-is in ``dtype`` (no scales): the float32 and BF16 formats."""

    name: str
    dtype: str  # numpy/JAX dtype name of the stored values

    @property
    def value_bytes(self) -> float:
        return np.dtype(jnp.dtype(self.dtype)).itemsize

    @property
    def scale_bytes(self) -> int:
        return 0

    def block_format(self, cfg: ModelConfig, block_tokens: int) -> BlockFormat:
        return BlockFormat(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_tokens,
                           self.value_bytes, self.scale_bytes, self.name)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [N, Hkv, D] -> (values u8[N, Hkv*D*itemsize], scales u8[N, 0])."""
        N = x.shape[0]
        b = jax.lax.bitcast_convert_type(x.astype(self.dtype), jnp.uint8)
        return b.reshape(N, -1), jnp.zeros((N, 0), jnp.uint8)

    def decode(self, values: jax.Array, scales: jax.Array, kv_heads: int,
               head_dim: int) -> jax.Array:
        """values u8[..., Hkv*D*itemsize] (scales unused) -> [..., Hkv, D] in ``dtype``."""
        del scales
        size = int(self.value_bytes)
        lead = values.shape[:-1]
        v = values.reshape(*lead, kv_heads, head_dim, size)
        if size == 1:
            return jax.lax.bitcast_convert_type(v[..., 0], self.dtype)
        return jax.lax.bitcast_convert_type(v, self.dtype)


KV_FORMATS = {
    "f32": PlainKVFormat("f32", "float32"),
    "bf16": PlainKVFormat("bf16", "bfloat16"),
}


def kv_format(name: str):
    try:
        return KV_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown KV format {name!r}; known: {sorted(KV_FORMATS)}") from None
