"""Weight quantizers behind one interface, selected by ``QuantConfig.method``.

Every method turns one layer's weight (with its calibration statistics) into points:
int8 codes [C, P, D] and float32 scales [C, P], optionally a new bias. Multipoint methods return
P > 1 nested points per channel and ``mpq.quantize`` allocates how many each channel keeps;
single-point methods return P = 1. New methods register with ``@register``.
"""

from mpq.methods.adaquant import AdaQuantQuantizer
from mpq.methods.adaround import AdaRoundQuantizer
from mpq.methods.base import FittedWeight, LayerContext, WeightQuantizer, available, get_method, register
from mpq.methods.bias_correction import corrected_bias
from mpq.methods.companding import CompandingQuantizer
from mpq.methods.gptq import GPTQQuantizer
from mpq.methods.ilp import ILPQuantizer
from mpq.methods.multipoint import MultipointQuantizer
from mpq.methods.ocs import OCSQuantizer
from mpq.methods.rtn import RTNQuantizer

__all__ = [
    "FittedWeight",
    "LayerContext",
    "WeightQuantizer",
    "MultipointQuantizer",
    "RTNQuantizer",
    "GPTQQuantizer",
    "AdaRoundQuantizer",
    "OCSQuantizer",
    "ILPQuantizer",
    "AdaQuantQuantizer",
    "CompandingQuantizer",
    "corrected_bias",
    "available",
    "get_method",
    "register",
]
