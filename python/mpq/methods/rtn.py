"""Round to nearest, per output channel: the one-point baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpq import ops
from mpq.methods.base import FittedWeight, LayerContext, MethodConfig, WeightQuantizer, register


def rtn_minmax(w: torch.Tensor, bits: int) -> FittedWeight:
    """scale = max |w_j| / K per channel, codes = round(w / scale): one point."""
    K = 2 ** (bits - 1) - 1
    scale = (w.abs().amax(dim=1) / K).float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(w / safe[:, None]), -K, K).to(torch.int8)
    codes = torch.where(scale[:, None] > 0, codes, torch.zeros_like(codes))
    return FittedWeight(codes[:, None, :], scale[:, None])


@dataclass(frozen=True)
class RTNConfig(MethodConfig):
    """Round to nearest has no options of its own: its grid follows ``QuantConfig.rtn_range``."""


@register
class RTNQuantizer(WeightQuantizer):
    """``config.rtn_range``: ``"minmax"`` (max |w|) or ``"mse"`` (the scale minimising
    ||w - a q||^2, i.e. the exact first greedy point)."""

    name = "rtn"
    config_type = RTNConfig

    def fit(self, ctx: LayerContext) -> FittedWeight:
        if ctx.config.rtn_range == "minmax":
            return rtn_minmax(ctx.weight, ctx.bits)
        codes, scales, _ = ops.fit_multipoint(ctx.weight.contiguous(), ctx.bits, 1, True)
        return FittedWeight(codes, scales)
