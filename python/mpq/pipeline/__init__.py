"""The stages of ``mpq.quantize``, each a function with typed inputs and outputs:

    prepare            (prepare.py)     arguments checked, calibration data opened, model copied  -> Prepared
    calibrate_layers   (statistics.py)  layer input statistics, BatchNorm folded, layer order     -> Calibrated
    layer_sensitivity  (fit.py)         per-channel weights of the output errors (Fisher)         -> {layer: [C]}
    fit_layers         (fit.py)         every layer fitted by the method, errors per point count  -> [LayerFit]
    allocate_layers    (allocate.py)    points per channel under the bits budget                  -> {layer: counts}
    refit_layers       (refit.py)       best sequence, scales re-solved, bias corrected           -> [LayerWeight]
    build_layer, swap_layer (swap.py)   the quantized module in place of the float one            -> LayerReport
    reestimate_batchnorms, pack_for_device, verify (finish.py)                                    -> [SimulationCheck]

``mpq.quantize`` (quantize.py) runs them in this order and collects a ``QuantReport`` (report.py).
"""

from mpq.pipeline.allocate import allocate_layers
from mpq.pipeline.finish import pack_for_device, reestimate_batchnorms, verify
from mpq.pipeline.fit import LayerFit, fit_layers, layer_sensitivity
from mpq.pipeline.prepare import Prepared, prepare, resolve_device
from mpq.pipeline.refit import LayerWeight, best_sequences, refit_layer, refit_layers
from mpq.pipeline.report import LayerReport, QuantReport, last_report, record_report
from mpq.pipeline.statistics import Calibrated, calibrate_layers
from mpq.pipeline.swap import build_layer, swap_layer

__all__ = [
    "Calibrated",
    "LayerFit",
    "LayerReport",
    "LayerWeight",
    "Prepared",
    "QuantReport",
    "allocate_layers",
    "best_sequences",
    "build_layer",
    "calibrate_layers",
    "fit_layers",
    "last_report",
    "layer_sensitivity",
    "pack_for_device",
    "prepare",
    "reestimate_batchnorms",
    "record_report",
    "refit_layer",
    "refit_layers",
    "resolve_device",
    "swap_layer",
    "verify",
]
