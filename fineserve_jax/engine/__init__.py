"""The multi-model engine: continuous batching over one shared paged KV pool per device.

Names load on first use, so the host-side modules here (``alloc``, ``config``) import
without JAX (the simulator uses them).
"""

from __future__ import annotations

from fineserve_jax._lazy import lazy_exports

__all__ = ["Engine", "EngineConfig", "RequestHandle", "RequestMetrics", "RequestRejected", "StreamDelta"]

_LAZY = {"Engine": "fineserve_jax.engine.engine", "RequestRejected": "fineserve_jax.engine.admission",
         "EngineConfig": "fineserve_jax.engine.config", "RequestHandle": "fineserve_jax.engine.handle",
         "StreamDelta": "fineserve_jax.engine.handle", "RequestMetrics": "schedulers.batching"}


__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY)
