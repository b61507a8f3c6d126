"""Weight quantizers behind one interface, selected by ``QuantConfig.method``.

Every method turns one layer's weight (with its calibration statistics) into points:
int8 codes [C, P, D] and float32 scales [C, P], optionally a new bias. Multipoint methods return
P > 1 nested points per channel and ``mpq.quantize`` allocates how many each channel keeps;
single-point methods return P = 1. New methods register with ``@register``.

Each method's options are a frozen dataclass in the method's file (``MultipointConfig``,
``GPTQConfig``, ...), passed as ``QuantConfig(method=GPTQConfig(act_order=True))``.
"""

from mpq.methods.adaquant import AdaQuantConfig, AdaQuantQuantizer
from mpq.methods.adaround import AdaRoundConfig, AdaRoundQuantizer
from mpq.methods.awq import AWQConfig, AWQQuantizer
from mpq.methods.base import (
    FittedWeight,
    LayerContext,
    MethodConfig,
    WeightQuantizer,
    available,
    get_method,
    register,
)
from mpq.methods.bias_correction import corrected_bias
from mpq.methods.companding import CompandingConfig, CompandingQuantizer
from mpq.methods.gptq import GPTQConfig, GPTQQuantizer
from mpq.methods.ilp import ILPConfig, ILPQuantizer
from mpq.methods.multipoint import MultipointConfig, MultipointQuantizer
from mpq.methods.ocs import OCSConfig, OCSQuantizer
from mpq.methods.rtn import RTNConfig, RTNQuantizer

__all__ = [
    "FittedWeight",
    "LayerContext",
    "WeightQuantizer",
    "MethodConfig",
    "MultipointConfig",
    "RTNConfig",
    "GPTQConfig",
    "AdaRoundConfig",
    "OCSConfig",
    "ILPConfig",
    "AdaQuantConfig",
    "AWQConfig",
    "CompandingConfig",
    "MultipointQuantizer",
    "RTNQuantizer",
    "GPTQQuantizer",
    "AdaRoundQuantizer",
    "OCSQuantizer",
    "ILPQuantizer",
    "AdaQuantQuantizer",
    "AWQQuantizer",
    "CompandingQuantizer",
    "corrected_bias",
    "available",
    "get_method",
    "register",
]
