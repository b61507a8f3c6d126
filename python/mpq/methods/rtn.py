"""Round to nearest, per output channel: the one-point baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpq import ops
from mpq.methods.base import FittedWeight, LayerContext, MethodConfig, WeightQuantizer, register
from mpq.methods.groupwise import check_grouping, groupwise_codes, groupwise_grid, is_grouped


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
    """Round to nearest on a per-channel symmetric grid with a float32 scale (the defaults), or on
    a group-wise grid (``mpq.methods.groupwise``): ``group_size`` consecutive input weights per
    float16 scale (0: one per channel), ``symmetric=False`` adds a b-bit zero point per group.
    Scales follow ``QuantConfig.rtn_range`` either way."""

    group_size: int = 0
    symmetric: bool = True

    def check(self) -> None:
        check_grouping(self)


@register
class RTNQuantizer(WeightQuantizer):
    """``config.rtn_range``: ``"minmax"`` (max |w|) or ``"mse"`` (the scale minimising
    ||w - a q||^2, i.e. the exact first greedy point)."""

    name = "rtn"
    config_type = RTNConfig

    def fit(self, ctx: LayerContext) -> FittedWeight:
        opts: RTNConfig = ctx.config.options
        if is_grouped(opts):
            grid = groupwise_grid(ctx.weight, ctx.bits, opts.group_size, opts.symmetric, ctx.config.rtn_range)
            codes = groupwise_codes(ctx.weight, grid, ctx.bits)
            return FittedWeight(codes[:, None, :], torch.ones(codes.shape[0], 1), grid=grid)
        if ctx.config.rtn_range == "minmax":
            return rtn_minmax(ctx.weight, ctx.bits)
        codes, scales, _ = ops.fit_multipoint(ctx.weight.contiguous(), ctx.bits, 1, True)
        return FittedWeight(codes, scales)
