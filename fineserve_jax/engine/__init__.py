"""The multi-model engine: continuous batching over one shared paged KV pool per device."""

from fineserve_jax.engine.config import EngineConfig
from fineserve_jax.engine.engine import Engine, RequestRejected
from fineserve_jax.engine.handle import RequestHandle, RequestMetrics, StreamDelta

__all__ = ["Engine", "EngineConfig", "RequestHandle", "RequestMetrics", "RequestRejected", "StreamDelta"]
