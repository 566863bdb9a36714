"""Running Mosaic GPU (Hopper) Pallas kernels on CPU: the interpreter and the lowering.

The Mosaic GPU interpreter lives in a private JAX module, so every test reaches it only
through ``mosaic_interpret()`` here. It simulates every block of a launch, so the
abstract device has few SMs (``num_cores``); kernels that size their grid from the SM
count see that number. ``lowers_for_cuda`` runs the whole Mosaic GPU lowering without a
GPU (compiling needs one), which catches layout and operand-major errors the interpreter
does not model.
"""

from __future__ import annotations

import contextlib

import jax
from jax.sharding import AbstractDevice, AbstractMesh

H100 = "NVIDIA H100 80GB HBM3"


@contextlib.contextmanager
def mosaic_interpret(num_cores: int = 2):
    """Run ``plgpu.kernel`` / Mosaic GPU ``pallas_call``s inside on the CPU interpreter."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc
    from jax._src.pallas.mosaic_gpu.interpret.params import (InterpretGPUParams,
                                                             force_gpu_interpret_mode)

    dev = AbstractDevice(device_kind=H100, platform="gpu", num_cores=num_cores)
    try:
        with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=dev)):
            with force_gpu_interpret_mode(InterpretGPUParams()):
                yield
    finally:
        ipc.reset_gpu_interpret_mode_state()


def lowers_for_cuda(fn, *args) -> str:
    """The StableHLO text of ``jax.jit(fn)`` lowered for CUDA from ``args`` (arrays or
    ShapeDtypeStructs); raises what the GPU lowering rejects."""
    structs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    low = jax.jit(fn).trace(*structs).lower(lowering_platforms=("cuda",))
    return low.as_text()
