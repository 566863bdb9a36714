"""fineserve-jax: multi-model, mixed-precision LLM serving on JAX/Pallas.

The top-level names load on first use, so host-side modules (``fineserve_jax.kvslab``,
``schedulers``) import without JAX.
"""

from __future__ import annotations

from fineserve_jax._lazy import lazy_exports

__version__ = "0.1.0"
__all__ = ["LLM", "ModelConfig", "RequestOutput", "SamplingParams", "__version__"]

_LAZY = {"LLM": "fineserve_jax.llm", "ModelConfig": "fineserve_jax.config",
         "SamplingParams": "fineserve_jax.sampling", "RequestOutput": "fineserve_jax.sequence"}


__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY)
