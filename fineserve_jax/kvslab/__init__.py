"""KV Slab: the host-side bookkeeping of one precision-aware KV pool per device.

Plain Python and NumPy, no JAX: which bytes of the device pool belong to which model's
blocks. The device array itself, and the block copies compaction asks for, live in
``fineserve_jax.engine.pool``. Two baselines with the same interface (``KVAllocator``) sit
beside KV Slab for comparison, and ``simulate`` replays a bursty multi-model request stream
against any of them on the host.
"""

from fineserve_jax.kvslab.allocator import (
                                            BlockLayout,
                                            BlockMove,
                                            KVAllocator,
                                            KVSlabAllocator,
                                            OutOfBlocks,
                                            choose_slab_bytes,
                                            padding_fraction,
)
from fineserve_jax.kvslab.baselines import FixedPageAllocator, StaticPartitionAllocator
from fineserve_jax.kvslab.format import BlockFormat
from fineserve_jax.kvslab.stats import ModelStats, PoolStats

__all__ = [
    "BlockFormat",
    "BlockLayout",
    "BlockMove",
    "FixedPageAllocator",
    "KVAllocator",
    "KVSlabAllocator",
    "ModelStats",
    "OutOfBlocks",
    "PoolStats",
    "StaticPartitionAllocator",
    "choose_slab_bytes",
    "padding_fraction",
]
