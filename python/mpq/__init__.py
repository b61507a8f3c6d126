"""mpq: multipoint post-training quantization for PyTorch.

    import mpq
    qmodel = mpq.quantize(model, calib_loader)          # W4A8 multipoint, adaptive points
    print(mpq.summary(qmodel))
"""
from mpq._loader import build_info, library_path, load_ops_library

load_ops_library()

from mpq import integer, nn, ops  # noqa: E402
from mpq.config import PRESETS, QuantConfig  # noqa: E402
from mpq.fuse import fuse_activations  # noqa: E402
from mpq.integer import integer_only  # noqa: E402
from mpq.io import load, save  # noqa: E402
from mpq.plots import plot_allocation  # noqa: E402
from mpq.quantize import QuantReport, last_report, quantize  # noqa: E402
from mpq.summary import model_size_bytes, summary  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "QuantConfig",
    "QuantReport",
    "build_info",
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
