"""AWQ-style activation-aware scaling on a group-wise grid (Lin, Tang, Tang, Yang, Chen, Wang, Xiao,
Dang, Gan, Han, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration",
MLSys 2024, arXiv 2306.00978).

Per layer, the weight's input columns are scaled by s = m^alpha (m: the input channel's activation
magnitude on calibration data, normalized per conv group by sqrt(max m * min m), as the reference
does) before the group-wise grid is fitted, and divided by s again in the dequantized weight:
W_q = Q(W diag(s)) diag(s)^-1. Channels that carry large activations get finer effective steps.
alpha runs over 0, 1/n, ..., (n-1)/n (``AWQConfig.grid``, the reference's 20) and the one with the
lowest layer-output error on calibration data is kept: tr((W - W_q) H (W - W_q)^T), H = E[x x^T]
the calibration second moment (the reference measures the same error on the calibration
activations themselves).

Departures from the reference, each for a reason:
- m is the RMS sqrt(E[x_c^2]) of the channel's inputs (from the kept second moment), not mean |x_c|
  (mpq keeps second moments, not first absolute moments); both rank channels alike.
- s stays in the layer as a float16 vector over the input channels (``GroupwiseLayer.input_scales``,
  16 bits per input channel: 16 / C_out bits per weight, counted) instead of being folded into the
  previous operator: mpq quantizes any graph, where that operator may be absent, shared or
  non-linear. Folded or not, the weights are the same.
- The exponent is searched on min-max grids, as the reference does; the reference's second step
  (a per-group clipping search on the output error) is the group grid's own MSE clipping search
  here (``QuantConfig.rtn_range="mse"``, on the weights), at the chosen exponent; alpha = 0 with
  that clipping is kept when it is better, so AWQ never loses to round to nearest on its grid.
- A layer whose whole H exceeds ``config.hessian_budget_mb`` measures the error with diag(H) only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpq.methods.base import FittedWeight, LayerContext, MethodConfig, WeightQuantizer, register
from mpq.methods.groupwise import GroupGrid, check_grouping, groupwise_codes, groupwise_grid
from mpq.methods.uniform import hessian_fits, input_diagonal, layer_hessian, weighted_error

__all__ = ["AWQConfig", "AWQQuantizer", "awq_input_magnitude", "awq_quantize"]


@dataclass(frozen=True)
class AWQConfig(MethodConfig):
    """AWQ's options: the group-wise grid (``group_size``, ``symmetric``; the reference's int4
    format is asymmetric with groups of 128) and ``grid``, the number of exponents alpha tried."""

    group_size: int = 128
    symmetric: bool = False
    grid: int = 20

    def check(self) -> None:
        check_grouping(self)
        self._check_int("grid", 1)


def awq_input_magnitude(diag: torch.Tensor, kernel: int) -> torch.Tensor:
    """RMS of each input channel's values, float64 [groups, D / kernel] (``kernel`` = kh x kw: the
    flattened columns of one input channel), from ``diag`` [groups, D] = E[x^2] per column."""
    return diag.reshape(diag.shape[0], -1, kernel).mean(-1).clamp_min(0).sqrt()


def awq_quantize(
    w: torch.Tensor, stats, groups: int, bits: int, cfg: AWQConfig, rule: str, kernel: int, budget_mb: float
) -> tuple[torch.Tensor, GroupGrid, float]:
    """(stored codes int8 [C, D], grid with ``input_scales``, alpha chosen) for ``w`` [C, D]
    whose columns are ``kernel`` consecutive weights per input channel."""
    C, D = w.shape
    diag = input_diagonal(stats)  # [groups, D]: E[x^2] per column
    m = awq_input_magnitude(diag, kernel)  # [groups, cin]
    H = layer_hessian(stats, groups) if hessian_fits(stats, groups, budget_mb) else None
    w64 = w.double().cpu()

    def fit(alpha: float, grid_rule: str) -> tuple[float, torch.Tensor, GroupGrid]:
        s = m.clamp_min(1e-8).pow(alpha)
        s = s / (s.amax(-1, keepdim=True) * s.amin(-1, keepdim=True)).sqrt()
        s = s.clamp(1e-4, 1e4).half().double()  # stored as float16
        col = s.repeat_interleave(kernel, 1).repeat_interleave(C // groups, 0)  # [C, D]
        scaled = (w64 * col).float()
        grid = groupwise_grid(scaled, bits, cfg.group_size, cfg.symmetric, grid_rule)
        codes = groupwise_codes(scaled, grid, bits)
        grid = GroupGrid(grid.size, grid.scales, grid.zeros, s.float())
        delta = w64 - grid.values(codes)
        if H is not None:
            return float(weighted_error(delta, H).sum()), codes, grid
        return float((delta.square().reshape(groups, C // groups, D) * diag[:, None, :]).sum()), codes, grid

    # As the reference: the exponent is searched on plain min-max grids, the clipping (here the
    # grid's own rule) applied once at the exponent chosen; alpha = 0 (no scaling) stays a
    # candidate with that rule too, so the result never loses to round to nearest on the grid.
    alphas = [i / cfg.grid for i in range(cfg.grid)]
    alpha = min(alphas, key=lambda a: fit(a, "minmax")[0]) if len(alphas) > 1 else 0.0
    err, codes, grid = fit(alpha, rule)
    if alpha != 0.0:
        err0, codes0, grid0 = fit(0.0, rule)
        if err0 <= err:
            return codes0, grid0, 0.0
    return codes, grid, alpha


@register
class AWQQuantizer(WeightQuantizer):
    """AWQ-style scaling then round to nearest on a group-wise grid (``AWQConfig``)."""

    name = "awq"
    config_type = AWQConfig

    def fit(self, ctx: LayerContext) -> FittedWeight:
        t = ctx.target
        kernel = 1 if t.kind == "linear" else int(t.module.kernel_size[0] * t.module.kernel_size[1])
        codes, grid, _ = awq_quantize(
            ctx.weight,
            ctx.stats,
            t.groups,
            ctx.bits,
            ctx.config.options,
            ctx.config.rtn_range,
            kernel,
            ctx.config.hessian_budget_mb,
        )
        return FittedWeight(codes[:, None, :], torch.ones(codes.shape[0], 1), grid=grid)
