"""fineserve-jax: multi-model, mixed-precision LLM serving on JAX/Pallas.

The top-level names load on first use, so host-side modules (``fineserve_jax.kvslab``,
``schedulers``) import without JAX.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = ["LLM", "ModelConfig", "RequestOutput", "SamplingParams", "__version__"]

_LAZY = {"LLM": "fineserve_jax.llm", "ModelConfig": "fineserve_jax.config",
         "SamplingParams": "fineserve_jax.sampling", "RequestOutput": "fineserve_jax.sequence"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fineserve_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
