"""Loads the ops library, so that ``torch.ops.mpq.*`` exists."""

import json
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent


def load_ops_library() -> None:
    """Import the stub extension ``mpq._C``; its DT_NEEDED entry loads ``libmpq_ops.so``,
    whose static initialisers register every ``mpq::`` op with the dispatcher."""
    try:
        from mpq import _C  # noqa: F401
    except ImportError as e:  # pragma: no cover - only without a build
        raise ImportError(
            "mpq: the compiled ops library is missing; build it with "
            "`pip install --no-build-isolation -e .` (see README.md)"
        ) from e


def library_path() -> str:
    """Path of ``libmpq_ops.so`` inside the package (what a C++ program links or dlopens)."""
    return str(_HERE / "libmpq_ops.so")


def build_info() -> dict:
    """What the ops library was built with: mpq and torch versions, whether CUDA kernels were
    compiled and for which architectures, and the torch running now."""
    info = json.loads(torch.ops.mpq._build_info())
    info["torch_runtime_version"] = torch.__version__
    info["library_path"] = library_path()
    return info
