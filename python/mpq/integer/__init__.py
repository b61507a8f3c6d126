"""Integer-only inference (HAWQ-V3 style) for models quantized by ``mpq.quantize``.

    imodel = mpq.integer_only(qmodel, calib_batch)   # int8 activations, int32 accumulation, dyadic requantization
    y = imodel(x)                                   # float in, float out; integers in between
    sim = mpq.integer.simulate_integer(imodel)      # the same pipeline in float64 with real multipliers

Floats remain only at the entry (quantizing the input) and the exit (dequantizing the output).
The integer modules are in ``mpq.integer.modules``.
"""

from mpq.integer import modules
from mpq.integer.convert import Grid, integer_only, layerwise_differences, simulate_integer
from mpq.integer.dyadic import common_shift, dyadic, dyadic_tensor, round_shift
from mpq.integer.modules import IntegerModel

__all__ = [
    "Grid",
    "IntegerModel",
    "common_shift",
    "dyadic",
    "dyadic_tensor",
    "integer_only",
    "layerwise_differences",
    "modules",
    "round_shift",
    "simulate_integer",
]
