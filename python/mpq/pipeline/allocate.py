"""Stage 4, allocate: how many points each output channel keeps, from the output errors under the
average-bits budget (multipoint methods); one-point methods keep what they fitted."""

from __future__ import annotations

import torch

from mpq.allocate import allocate_points
from mpq.config import QuantConfig
from mpq.methods import WeightQuantizer
from mpq.pipeline.fit import LayerFit

__all__ = ["allocate_layers"]


def allocate_layers(fits: list[LayerFit], cfg: QuantConfig, method: WeightQuantizer) -> dict[str, torch.Tensor]:
    """Per layer name, the points each channel keeps (int [C]). The first and last layers
    (``config.first_last="8bit"``) stay outside the budget with their one point."""
    inner = {f.target.name: f.errors for f in fits if f.target.role == "inner"}
    counts = (
        allocate_points(inner, cfg.budget_bits, cfg.scope) if method.multipoint and cfg.max_points > 1 and inner else {}
    )
    for f in fits:
        if f.target.name not in counts:
            own = f.fitted.num_points
            counts[f.target.name] = own.cpu() if own is not None else torch.ones(f.weight.shape[0], dtype=torch.int32)
    return counts
