"""Quantized checkpoints stored in the INT4 x FP8 kernel's weight layout.

A checkpoint of a precision with INT4 weights and FP8 activations (``fireq``,
``fireq-g32``) holds those weights as the GPU kernel reads them
(``pallas_kernels.w4a8.W4A8Weight``: split-halves nibbles per ``tile_k``, column scales,
gate and up fused per ``tile_n``), so a GPU serves them without reordering anything at
load. The metadata names the layout::

    "weight_layout": {"name": "w4a8-split-halves-v1", "tile_k": 128, "tile_n": 128}

Loading on a backend that runs the XLA reference (the CPU) turns them back into
``Int4Weight``s bit for bit (``from_kernel``): the reordering is a permutation of codes,
the column scale holds exactly ``2**-m`` and padding groups are dropped again.
Checkpoints written without the key hold ``Int4Weight``s and load as before.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints.errors import CheckpointError

LAYOUT_KEY = "weight_layout"


def _w4a8():
    from pallas_kernels import w4a8

    return w4a8


def to_kernel(params: dict, tile_k: int = 128, tile_n: int = 128) -> tuple[dict, dict | None]:
    """(params in the kernel layout, the metadata entry naming it), or (params, None)
    when no weight has the kernel's format."""
    w4a8 = _w4a8()
    out = w4a8.kernel_layout(params, tile_k, tile_n)
    if not any(isinstance(w, w4a8.W4A8Weight) for w in out["layers"].values()):
        return params, None
    return out, {"name": w4a8.LAYOUT, "tile_k": tile_k, "tile_n": tile_n}


def check_layout(entry: Any, where: str = "checkpoint") -> dict:
    """The metadata entry, validated: a known layout name and power-of-two tiles."""
    w4a8 = _w4a8()
    if not isinstance(entry, dict) or entry.get("name") != w4a8.LAYOUT:
        name = entry.get("name") if isinstance(entry, dict) else entry
        raise CheckpointError(f"{where}: weight layout {name!r} is not known to this version "
                              f"(it reads {w4a8.LAYOUT!r}); convert the source again")
    for f in ("tile_k", "tile_n"):
        v = entry.get(f)
        if not isinstance(v, int) or v < 32 or v & (v - 1):
            raise CheckpointError(f"{where}: weight layout {f} must be a power of two >= 32, "
                                  f"got {v!r}")
    return entry


def abstract_kernel(target: dict, entry: dict) -> dict:
    """The restore target of a checkpoint in the kernel layout, from the ``Int4Weight``
    target (shapes only; nothing is computed)."""
    return jax.eval_shape(lambda p: to_kernel(p, entry["tile_k"], entry["tile_n"])[0], target)


def to_int4(w) -> Any:
    """An ungated ``W4A8Weight`` back as the ``Int4Weight`` it was made from."""
    from fineserve_jax.quant.int4 import Int4Weight, pack_int4

    if w.gated:
        raise ValueError("to_int4: split a gated weight first (split_gate_up)")
    kp = -(-w.k // w.group) * w.group
    codes = w.codes()[..., :kp]
    scales = w.scales[..., : kp // w.group]
    offsets = None if w.offsets is None else w.offsets[..., : kp // w.group]
    if w.symmetric:  # col_scale = 2**-m exactly: read m from the float's exponent bits
        bits = jax.lax.bitcast_convert_type(jnp.asarray(w.col_scale[..., 0], jnp.float32),
                                            jnp.int32)
        exponent = 127 - (bits >> 23)
    else:
        exponent = jnp.zeros(w.col_scale.shape[:-1], jnp.int32)
    return Int4Weight(pack_int4(codes), scales, offsets, exponent.astype(jnp.int32), w.group,
                      w.k, w.symmetric, w.act)


def split_gate_up(w) -> tuple[Any, Any]:
    """A gated ``W4A8Weight`` (gate and up rows interleaved per ``tile_n``) as two."""
    h = w.tile_n // 2

    def unmix(a):  # (..., 2F, X) -> two (..., F, X)
        *lead, n2, x = a.shape
        t = a.reshape(*lead, n2 // w.tile_n, 2, h, x)
        return (t[..., 0, :, :].reshape(*lead, n2 // 2, x),
                t[..., 1, :, :].reshape(*lead, n2 // 2, x))

    def unmix_col(a):
        g, u = unmix(a[..., None])
        return g[..., 0], u[..., 0]

    (pg, pu), (sg, su) = unmix(w.packed), unmix(w.scales)
    og, ou = (None, None) if w.offsets is None else unmix(w.offsets)
    cg, cu = unmix_col(w.col_scale)
    cls = type(w)
    make = lambda p, s, o, c: cls(p, s, o, c, w.group, w.k, w.symmetric, w.tile_k, act=w.act)
    return make(pg, sg, og, cg), make(pu, su, ou, cu)


def from_kernel(params: dict) -> dict:
    """Every ``W4A8Weight`` of the layers back as ``Int4Weight`` (``w_gate_up`` split
    into ``w_gate`` and ``w_up``); other leaves untouched."""
    w4a8 = _w4a8()
    layers = dict(params["layers"])
    gu = layers.pop("w_gate_up", None)
    if gu is not None:
        layers["w_gate"], layers["w_up"] = split_gate_up(gu)
    for name, w in list(layers.items()):
        if isinstance(w, w4a8.W4A8Weight):
            layers[name] = to_int4(w)
    return {**params, "layers": layers}


def for_backend(params: dict, meta: dict, backend: str | None = None) -> dict:
    """Params of a loaded checkpoint as ``backend`` runs them: a GPU keeps the kernel
    layout, other backends get ``Int4Weight``s."""
    if meta.get(LAYOUT_KEY) is None:
        return params
    if (backend or jax.default_backend()) == "gpu":
        return params
    return jax.tree.map(np.asarray, from_kernel(params))  # loaded params are numpy
