"""The Llama-family decoder as pure functions over a params pytree."""

from fineserve_jax.model.kv import DenseKVCache, DenseKVMeta, KVCacheOps
from fineserve_jax.model.params import ParamSpec, init_params, param_specs
from fineserve_jax.model.transformer import forward, lm_head

__all__ = ["DenseKVCache", "DenseKVMeta", "KVCacheOps", "ParamSpec", "forward",
           "init_params", "lm_head", "param_specs"]
