"""The multi-model engine: continuous batching over one shared paged KV pool per device.

Names load on first use, so the host-side modules here (``alloc``, ``config``) import
without JAX (the simulator uses them).
"""

from __future__ import annotations

import importlib

__all__ = ["Engine", "EngineConfig", "RequestHandle", "RequestMetrics", "RequestRejected", "StreamDelta"]

_LAZY = {"Engine": "fineserve_jax.engine.engine", "RequestRejected": "fineserve_jax.engine.engine",
         "EngineConfig": "fineserve_jax.engine.config", "RequestHandle": "fineserve_jax.engine.handle",
         "StreamDelta": "fineserve_jax.engine.handle", "RequestMetrics": "schedulers.batching"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fineserve_jax.engine' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
