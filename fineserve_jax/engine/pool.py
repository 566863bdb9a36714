"""The device side of KV Slab: the one ``uint8[num_rows, row_bytes]`` pool per device.

Model steps read and write it through page tables (``model.paged``); this module owns the
pool's creation and the block copies that compaction asks for (``KVSlabAllocator.
compact_for``). A copy is one jitted gather of every source block followed by one scatter
to every destination, so sources and destinations may be given in any order (they are
disjoint). The number of moves is padded up to a bucket, padding rows point past the pool
and are dropped by the scatter, and every (block size, bucket) compiles once, at warm-up.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh

from fineserve_jax.engine.sharding import pool_sharding
from fineserve_jax.model.paged import read_rows, write_rows

MOVE_BUCKETS = (1, 4, 16, 64)  # moves per call; longer lists run in chunks of the largest


def new_pool(num_rows: int, row_bytes: int, fill: int = 0,
             device: jax.Device | None = None, mesh: Mesh | None = None) -> jax.Array:
    """A fresh pool on ``device`` (default: JAX's), every byte ``fill`` (tests poison it
    with 0xFF: NaN in bf16/f32). With a ``"tp"`` ``mesh`` instead of a device, the pool is
    replicated on every device of the mesh (``sharding.pool_sharding``), built in place
    on each device rather than copied from the host."""
    if mesh is not None:
        if device is not None:
            raise ValueError("new_pool: give a device or a mesh, not both")
        make = jax.jit(lambda: jnp.full((num_rows, row_bytes), fill, jnp.uint8),
                       out_shardings=pool_sharding(mesh))
        return make()
    if device is None:
        return jnp.full((num_rows, row_bytes), fill, jnp.uint8)
    with jax.default_device(device):
        return jnp.full((num_rows, row_bytes), fill, jnp.uint8)


class BlockMover:
    """Copies whole blocks inside the pool; ``traces`` counts compilations."""

    def __init__(self):
        self.traces = 0
        self._fns: dict[int, object] = {}  # block bytes -> jitted copy

    def _fn(self, size: int):
        if size not in self._fns:
            def move(pool, src_rows, src_offs, dst_rows, dst_offs):
                self.traces += 1  # runs at trace time only
                data = read_rows(pool, src_rows, src_offs, size)
                return write_rows(pool, dst_rows, dst_offs, data)

            self._fns[size] = jax.jit(move, donate_argnums=0)
        return self._fns[size]

    def __call__(self, pool: jax.Array, moves: list[tuple[int, int, int, int]],
                 size: int) -> jax.Array:
        """``pool`` with ``size`` bytes copied ``(src_row, src_off) -> (dst_row, dst_off)``
        for each move; the pool is donated."""
        top = MOVE_BUCKETS[-1]
        for i in range(0, len(moves), top):
            chunk = moves[i:i + top]
            n = next(b for b in MOVE_BUCKETS if b >= len(chunk))
            a = np.zeros((4, n), np.int32)
            a[2] = pool.shape[0]  # padding: written past the last row, dropped
            a[:, :len(chunk)] = np.asarray(chunk, np.int32).T
            pool = self._fn(size)(pool, *a)
        return pool

    def warmup(self, pool: jax.Array, sizes) -> jax.Array:
        """Compile every bucket for each block size (all moves padding: pool unchanged)."""
        for size in sorted(set(sizes)):
            for n in MOVE_BUCKETS:
                a = np.zeros((4, n), np.int32)
                a[2] = pool.shape[0]
                pool = self._fn(size)(pool, *a)
        return pool
