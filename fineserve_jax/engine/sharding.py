"""Tensor parallelism: how one model's weights and the KV pool lie on a 1-D ``"tp"`` mesh.

Megatron-style layout, expressed as ``NamedSharding``s and left to GSPMD to execute:

- column-parallel (output dim N split): ``wq``, ``wk``, ``wv``, ``w_gate``, ``w_up`` and
  their biases, so each device computes its own heads / FFN columns;
- row-parallel (input dim K split): ``wo``, ``w_down``, so each device multiplies its own
  slice and XLA all-reduces the partial sums; their biases are replicated (added once);
- replicated: embeddings, the LM head, norms, ``k_post`` and any dimension that does not
  divide by the mesh size.

Linear weights are stored ``[L, N, K]`` (``model.params``). Quantized weights shard leaf
by leaf: ``Fp8Weight`` values like the float weight and its per-channel scales ``[L, N]``
with N; ``Int4Weight`` codes, scales and offsets along N for column-parallel, and along
the packed K axis for row-parallel only when every device gets whole groups
(``groups % tp == 0``), otherwise replicated; its per-tensor exponent is replicated.
``W4A8Weight`` (the INT4 x FP8 kernel's layout) splits by whole kernel tiles
(``_w4a8_specs``); a gated ``w_gate_up`` is column-parallel.
Any layout is numerically correct under GSPMD (it inserts the collectives); the choice
only decides memory and communication.

The pool ``uint8[num_rows, row_bytes]`` is replicated: a row packs blocks of several
models and formats whose head boundaries do not line up with a byte split, so every
device holds every block (``pool_sharding``).
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

TP_AXIS = "tp"
COLUMN = ("wq", "wk", "wv", "w_gate", "w_up", "w_gate_up")  # output dim split
COLUMN_BIAS = ("bq", "bk", "bv", "b_gate", "b_up")
ROW = ("wo", "w_down")  # input dim split


def tp_mesh(devices) -> Mesh:
    """A 1-D mesh named ``"tp"`` over ``devices`` (in the order given)."""
    devices = list(devices)
    if not devices:
        raise ValueError("tp_mesh: no devices")
    if len({d.id for d in devices}) != len(devices):
        raise ValueError(f"tp_mesh: a device is named twice: {devices}")
    import numpy as np

    return Mesh(np.asarray(devices, dtype=object), (TP_AXIS,))


def tp_size(mesh: Mesh) -> int:
    if mesh.axis_names != (TP_AXIS,):
        raise ValueError(f"expected a 1-D mesh with axis {TP_AXIS!r}, got axes {mesh.axis_names}")
    return mesh.shape[TP_AXIS]


def pool_sharding(mesh: Mesh) -> NamedSharding:
    """The KV pool: replicated on every device of the mesh."""
    return NamedSharding(mesh, P())


def _axis_spec(ndim: int, axis: int, size: int, tp: int) -> P:
    """Split ``axis`` (negative counts from the end) over tp when it divides, else replicate."""
    if size % tp:
        return P()
    spec = [None] * ndim
    spec[axis] = TP_AXIS
    return P(*spec)


def _linear_specs(w, name: str, tp: int):
    """PartitionSpec pytree (same structure as ``w``) for one stacked linear weight."""
    from fineserve_jax.quant import Fp8Weight, Int4Weight

    from pallas_kernels.w4a8 import W4A8Weight

    column = name in COLUMN
    if isinstance(w, W4A8Weight):
        return _w4a8_specs(w, column, tp)
    if isinstance(w, Int4Weight):
        groups = w.scales.shape[-1]
        if column:
            n = w.packed.shape[-2]
            data = _axis_spec(w.packed.ndim, -2, n, tp)
            side = _axis_spec(w.scales.ndim, -2, n, tp)
        else:  # row-parallel: whole groups per device, or nothing split
            clean = groups % tp == 0
            data = _axis_spec(w.packed.ndim, -1, w.packed.shape[-1] if clean else 1, tp)
            side = _axis_spec(w.scales.ndim, -1, groups if clean else 1, tp)
        return Int4Weight(data, side, None if w.offsets is None else side, P(),
                          w.group, w.k, w.symmetric, w.act)
    if isinstance(w, Fp8Weight):
        n, k = w.values.shape[-2:]
        if column:
            return Fp8Weight(_axis_spec(w.values.ndim, -2, n, tp),
                             _axis_spec(w.scales.ndim, -1, n, tp), w.act)
        return Fp8Weight(_axis_spec(w.values.ndim, -1, k, tp), P(), w.act)
    n, k = w.shape[-2:]
    return _axis_spec(w.ndim, -2 if column else -1, n if column else k, tp)


def _w4a8_specs(w, column: bool, tp: int):
    """The kernel layout (``pallas_kernels.w4a8.W4A8Weight``): column-parallel splits N
    into whole ``tile_n`` tiles when gated (each device keeps gate/up pairs, so its output
    columns are one contiguous slice); row-parallel splits K into whole ``tile_k`` tiles
    (a tile's two nibble halves stay together), else nothing is split."""
    n, kt = w.packed.shape[-2], 2 * w.packed.shape[-1]
    if column:
        unit = w.tile_n if w.gated else 1
        n_split = n if (n // unit) % tp == 0 and n % unit == 0 else 1
        data = _axis_spec(w.packed.ndim, -2, n_split, tp)
        side = _axis_spec(w.scales.ndim, -2, n_split, tp)
        col = _axis_spec(w.col_scale.ndim, -1, n_split, tp)
    else:
        k_split = kt if (kt // w.tile_k) % tp == 0 else 1
        data = _axis_spec(w.packed.ndim, -1, k_split, tp)
        side = _axis_spec(w.scales.ndim, -1, k_split, tp)
        col = P()
    return type(w)(data, side, None if w.offsets is None else side, col, w.group, w.k,
                   w.symmetric, w.tile_k, w.gated, w.tile_n, w.act)


def param_specs_tp(params: dict, tp: int) -> dict:
    """PartitionSpec pytree mirroring ``params`` (see the module docstring)."""
    out = jax.tree.map(lambda a: P(), params)
    layers = dict(out["layers"])
    for name, w in params["layers"].items():
        if name in COLUMN or name in ROW:
            layers[name] = _linear_specs(w, name, tp)
        elif name in COLUMN_BIAS:
            layers[name] = _axis_spec(w.ndim, -1, w.shape[-1], tp)
    out["layers"] = layers
    return out


def param_shardings(params: dict, mesh: Mesh) -> dict:
    """NamedSharding pytree for ``params`` on a ``"tp"`` mesh."""
    specs = param_specs_tp(params, tp_size(mesh))
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))
