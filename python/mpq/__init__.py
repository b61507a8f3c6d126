"""mpq: multipoint post-training quantization for PyTorch.

    import mpq
    qmodel = mpq.quantize(model, calib_loader)          # W4A8 multipoint, adaptive points
    print(mpq.summary(qmodel))

``import mpq`` loads the ops library and the quantization core only. The integer-only package
(``mpq.integer``, ``mpq.integer_only``), the export to ONNX / OpenVINO (``mpq.export_onnx``,
``mpq.export_openvino``) and the plots (``mpq.plot_allocation``; matplotlib only when a plot is
drawn) are imported on first use; the command line (``mpq.cli``) and the demo's
models and data (``mpq.examples``) only when imported by name.
"""

from typing import TYPE_CHECKING

from mpq._loader import build_info, library_path, load_ops_library
from mpq.version import __version__

load_ops_library()

from mpq import distributed, nn, ops  # noqa: E402
from mpq.config import PRESETS, QuantConfig  # noqa: E402
from mpq.fuse import fuse_activations  # noqa: E402
from mpq.io import load, save  # noqa: E402
from mpq.methods import (  # noqa: E402  (each method's options: QuantConfig(method=GPTQConfig(...)))
    AdaQuantConfig,
    AdaRoundConfig,
    AWQConfig,
    CompandingConfig,
    GPTQConfig,
    ILPConfig,
    MultipointConfig,
    OCSConfig,
    RTNConfig,
)
from mpq.quantize import QuantReport, last_report, quantize  # noqa: E402
from mpq.summary import model_size_bytes, summary  # noqa: E402

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and editors
    from mpq import integer, plots  # noqa: F401  (mpq.plots: not in __all__)
    from mpq.export import export_onnx, export_openvino
    from mpq.integer import integer_only
    from mpq.plots import plot_allocation


# name -> (module, attribute of that module or None for the module itself), imported on first use
_LAZY = {
    "integer": ("mpq.integer", None),
    "integer_only": ("mpq.integer", "integer_only"),
    "plots": ("mpq.plots", None),
    "plot_allocation": ("mpq.plots", "plot_allocation"),
    "export_onnx": ("mpq.export", "export_onnx"),
    "export_openvino": ("mpq.export", "export_openvino"),
}


def __getattr__(name: str):
    """PEP 562: import the lazy public names on first use (then they are ordinary attributes)."""
    try:
        module, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'mpq' has no attribute {name!r}") from None
    import importlib

    value = importlib.import_module(module)
    if attribute is not None:
        value = getattr(value, attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "__version__",
    "PRESETS",
    "QuantConfig",
    "MultipointConfig",
    "RTNConfig",
    "GPTQConfig",
    "AdaRoundConfig",
    "AWQConfig",
    "AdaQuantConfig",
    "OCSConfig",
    "ILPConfig",
    "CompandingConfig",
    "QuantReport",
    "build_info",
    "distributed",
    "export_onnx",
    "export_openvino",
    "fuse_activations",
    "integer",
    "integer_only",
    "last_report",
    "library_path",
    "load",
    "model_size_bytes",
    "nn",
    "ops",
    "plot_allocation",
    "quantize",
    "save",
    "summary",
]
