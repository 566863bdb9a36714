"""Quantized weights and activations behind the one ``linear(x, w)`` dispatch.

``fp8``: E4M3 casts, per-token dynamic scaling, per-channel ``Fp8Weight``. ``int4``: nibble
packing and ``Int4Weight`` (symmetric with FP8 group scales and a power-of-two per-tensor
multiplier, or asymmetric with f16/bf16 scale and offset, see ``grid``). Importing this
package registers the reference ``linear`` implementations of both weight types.
"""

from fineserve_jax.quant import linear_impls as _linear_impls  # noqa: F401  (registers)
from fineserve_jax.quant.fp8 import (E4M3, E4M3_MAX, E4M3_MIN_NORMAL, E4M3_MIN_SUBNORMAL,
                                     Fp8Weight, dequantize, fake_quant_per_token,
                                     quantize_fp8_weight, quantize_per_token, to_e4m3)
from fineserve_jax.quant.int4 import (GROUP_SIZES, SCALE_DTYPES, Int4Weight, pack_int4,
                                      pow2_exponent, quantize_int4, unpack_int4)
from fineserve_jax.quant.linear_impls import reference_linear

__all__ = [
    "E4M3", "E4M3_MAX", "E4M3_MIN_NORMAL", "E4M3_MIN_SUBNORMAL", "GROUP_SIZES", "SCALE_DTYPES",
    "Fp8Weight", "Int4Weight", "dequantize", "fake_quant_per_token", "pack_int4",
    "pow2_exponent", "quantize_fp8_weight", "quantize_int4", "quantize_per_token",
    "reference_linear", "to_e4m3", "unpack_int4",
]
