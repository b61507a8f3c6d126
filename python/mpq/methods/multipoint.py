"""Multipoint: max_points greedy points per channel (ALGORITHM.md section 1)."""
from __future__ import annotations

from mpq import ops
from mpq.methods.base import FittedWeight, LayerContext, WeightQuantizer, register


@register
class MultipointQuantizer(WeightQuantizer):
    """Nested greedy points from ``mpq::fit_multipoint`` (exact sweep when ``config.exact_fit``)."""

    name = "multipoint"
    multipoint = True

    def fit(self, ctx: LayerContext) -> FittedWeight:
        codes, scales, _ = ops.fit_multipoint(ctx.weight.contiguous(), ctx.bits, ctx.max_points, ctx.config.exact_fit)
        return FittedWeight(codes, scales)
