"""The engine's allocator choice: KV Slab, or one of its baselines for comparison."""

from __future__ import annotations

from typing import Mapping

from fineserve_jax.kvslab import BlockFormat


def make_allocator(kind: str, pool_bytes: int, formats: Mapping[str, BlockFormat]):
    """An allocator of ``kind`` over ``pool_bytes`` for models named in ``formats``.

    ``static`` splits the pool equally between the models (one fixed partition each, as
    separate per-model engines do); ``fixed-page`` shares one pool of pages sized for the
    largest block among the formats.
    """
    fmts = list(formats.values())
    if kind == "kvslab":
        from fineserve_jax.kvslab.allocator import KVSlabAllocator
        return KVSlabAllocator(pool_bytes, fmts)
    if kind == "static":
        from fineserve_jax.kvslab.baselines import StaticPartitionAllocator
        return StaticPartitionAllocator(pool_bytes, fmts, partitions=list(formats))
    if kind == "fixed-page":
        from fineserve_jax.kvslab.baselines import FixedPageAllocator
        return FixedPageAllocator(pool_bytes, fmts)
    raise ValueError(f"unknown allocator {kind!r}; choose kvslab, static or fixed-page")
