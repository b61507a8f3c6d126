"""AdaRound (Nagel, Amjad, van Baalen, Louizos, Blankevoort, "Up or Down? Adaptive Rounding for
Post-Training Quantization", ICML 2020, arXiv 2004.10568).

Per layer, every weight is rounded down or up, learned: W_soft = s * clip(floor(W / s) + h(V), -K, K)
with the rectified sigmoid h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1), zeta = 1.1,
gamma = -0.1, V initialised so that h(V) equals the fractional part of W / s. Adam minimises

    tr((W - W_soft) H (W - W_soft)^T) + lambda * sum(1 - |2 h(V) - 1|^beta)

where the first term is ||W X - W_soft X||^2 per output position (summed over output channels,
averaged over the calibration rows; H = E[x x^T], per group for grouped convs), and the
regulariser, off during the first 20% of the iterations, then weighted by ``lambda`` with beta
annealed linearly from 20 to 2, drives every h(V) to 0 or 1. The final codes are
clip(floor(W / s) + [V >= 0], -K, K). Paper / reference-code settings kept: zeta, gamma, the 20%
warm-up, beta 20 -> 2, lambda = 0.01 (``AdaRoundConfig.reg_lambda``), Adam on V only.

Departures, for a bounded CPU budget: the loss is the layer's own output error from H (the
paper's eq. 21 also passes the output through the activation function and uses the quantized
model's inputs, which needs the inputs themselves); ``AdaRoundConfig.iters`` full-batch steps
(default 500; the paper uses 10k-20k mini-batch steps at learning rate 1e-3) at a larger
learning rate ``lr`` (default 5e-2). Measured on EfficientNet-Lite0 layers
(output error relative to RTN's, 2 and 4 bits, five layers): 300 steps at 1e-2 left 32-102% of
RTN's error, 1000 steps at 3e-2 8-98% (98%: a 2-bit depthwise layer, where the MSE grid clips
most weights and floor/ceil leaves no choice); GPTQ was lower still on most of them. The grid scale per channel comes
from ``config.rtn_range`` (min-max or MSE) and stays fixed. The gradient is computed in closed
form (one product with H per step). NB: lambda weighs the regulariser against the absolute size
of the output error, as in the paper; for trained CNN layers (weights ~0.05, inputs ~1) the
regulariser dominates after the warm-up and every h(V) settles at 0 or 1; for layers whose
output error per weight is far above lambda (std-1 weights), raise ``reg_lambda``.

Group-wise (``AdaRoundConfig(group_size=..., symmetric=...)``, issue 15's peers at equal memory):
the grid is the one round to nearest would use (``mpq.methods.groupwise.groupwise_grid``: float16
scales and, asymmetric, zero points per group, fixed), and the same optimisation learns each stored
code as floor(w / s) + zero or one more, within the stored codes' range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from mpq.methods.base import FittedWeight, LayerContext, MethodConfig, WeightQuantizer, register
from mpq.methods.groupwise import check_grouping, code_range, groupwise_grid, is_grouped
from mpq.methods.uniform import channel_scales, grid_max, layer_hessian, low_rank_factor

__all__ = ["AdaRoundQuantizer", "adaround_quantize"]

ZETA, GAMMA = 1.1, -0.1
WARMUP = 0.2
BETA_START, BETA_END = 20.0, 2.0


def adaround_quantize(
    w: torch.Tensor,
    H: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    iters: int = 500,
    lr: float = 5e-2,
    lam: float = 0.01,
    zero: torch.Tensor | None = None,
    limits: tuple[int, int] | None = None,
) -> torch.Tensor:
    """AdaRound codes of ``w``.

    Args:
        w (Tensor[C, D]): the weight; rows split into G = H.shape[0] consecutive groups.
        H (Tensor[G, D, D]): E[x x^T] of each group's inputs.
        scale (Tensor[C] or Tensor[C, D]): the grid scale per row, or per weight (a group-wise
            grid, ``mpq.methods.groupwise``); fixed.
        bits: code width; grid -K..K unless ``limits``.
        iters, lr, lam: Adam iterations, learning rate and regulariser weight.
        zero (Tensor[C, D] or None): each weight's stored zero point (asymmetric group-wise grids).
        limits ((lo, hi) or None): the stored codes' range (default -K..K).

    Returns:
        codes (Tensor[C, D], int8) with w ~ scale * (codes - zero), each code floor(w / s) + zero or
        that + 1, within the range; the zero point where the scale is 0.
    """
    G, D, _ = H.shape
    C = w.shape[0]
    if C % G or w.shape[1] != D:
        raise ValueError(f"mpq.methods.adaround: expected w [C, {D}] with C divisible by {G}, got {tuple(w.shape)}")
    if scale.dim() == 2 and tuple(scale.shape) != (C, D):
        raise ValueError(f"mpq.methods.adaround: expected scale [C] or [{C}, {D}], got {tuple(scale.shape)}")
    K = grid_max(bits)
    lo, hi = (-K, K) if limits is None else limits
    W = w.float().cpu().reshape(G, C // G, D)
    s = scale.float().cpu().reshape(G, C // G, -1)  # [G, C / G, 1 or D]
    z = torch.zeros(()) if zero is None else zero.float().cpu().reshape(G, C // G, D)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    x = W / safe
    down = torch.floor(x)
    base = down + z  # the stored code rounded down
    rest = (x - down).clamp(1e-6, 1 - 1e-6)
    # h(V0) = rest: sigmoid(V0) = (rest - gamma) / (zeta - gamma)
    V = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)
    V.grad = torch.zeros_like(V)
    F = low_rank_factor(H)  # H = F F^T, [G, D, r], or None: use H
    Hf = H.float().cpu()
    opt = torch.optim.Adam([V], lr=lr)
    warm = int(WARMUP * iters)
    for it in range(iters):
        # Analytic gradient (one product with H per step instead of autograd's two):
        # d tr(dW H dW^T) / d W_soft = -2 dW H.
        sig = torch.sigmoid(V)
        u = sig * (ZETA - GAMMA) + GAMMA
        h = u.clamp(0.0, 1.0)
        grid = base + h
        dW = W - s * (grid.clamp(lo, hi) - z)
        dWH = torch.bmm(dW, Hf) if F is None else torch.bmm(torch.bmm(dW, F), F.transpose(1, 2))
        g_h = -2.0 * dWH * s * ((grid >= lo) & (grid <= hi))
        if it >= warm:
            rel = (it - warm) / max(1, iters - warm)
            beta = BETA_END + (BETA_START - BETA_END) * max(0.0, 1.0 - rel)
            t = 2 * h - 1
            # d/dh of lam * (1 - |2h - 1|^beta)
            g_h = g_h - lam * 2 * beta * t.abs().pow(beta - 1) * torch.sign(t)
        V.grad.copy_(g_h * ((u > 0) & (u < 1)) * sig * (1 - sig) * (ZETA - GAMMA))
        opt.step()
    codes = torch.clamp(base + (V.detach() >= 0).float(), lo, hi)
    codes = torch.where(s > 0, codes, z * torch.ones_like(codes))
    if not math.isfinite(float(codes.abs().sum())):
        raise RuntimeError("mpq.methods.adaround: the optimisation diverged")
    return codes.reshape(C, D).to(torch.int8)


@dataclass(frozen=True)
class AdaRoundConfig(MethodConfig):
    """AdaRound's options: ``iters`` full-batch Adam steps on V at learning rate ``lr``, rounding
    regulariser weight ``reg_lambda`` (the paper's lambda); ``group_size`` / ``symmetric`` as
    ``RTNConfig``'s: the rounding learned on the group-wise grid that round to nearest would use
    (its float16 scales and zero points, fixed)."""

    iters: int = 500
    lr: float = 5e-2
    reg_lambda: float = 0.01
    group_size: int = 0
    symmetric: bool = True

    legacy_fields: ClassVar[dict[str, str]] = {
        "adaround_iters": "iters",
        "adaround_lr": "lr",
        "adaround_lambda": "reg_lambda",
    }

    def check(self) -> None:
        self._check_int("iters", 1)
        self._check_number("lr", "> 0", lambda v: v > 0)
        self._check_number("reg_lambda", ">= 0", lambda v: v >= 0)
        check_grouping(self)


@register
class AdaRoundQuantizer(WeightQuantizer):
    """AdaRound, one point per channel (``AdaRoundConfig``; scale rule ``config.rtn_range``)."""

    name = "adaround"
    config_type = AdaRoundConfig

    def fit(self, ctx: LayerContext) -> FittedWeight:
        cfg = ctx.config
        H = layer_hessian(
            ctx.stats, ctx.target.groups, ctx.config.hessian_budget_mb, getattr(ctx.target, "name", "?"), self.name
        )
        opts: AdaRoundConfig = cfg.options
        if is_grouped(opts):
            grid = groupwise_grid(ctx.weight, ctx.bits, opts.group_size, opts.symmetric, cfg.rtn_range)
            s, z = grid.per_weight(ctx.weight.shape[1])
            codes = adaround_quantize(
                ctx.weight,
                H,
                s,
                ctx.bits,
                opts.iters,
                opts.lr,
                opts.reg_lambda,
                z,
                code_range(ctx.bits, opts.symmetric),
            )
            return FittedWeight(codes[:, None, :], torch.ones(codes.shape[0], 1), grid=grid)
        scale = channel_scales(ctx.weight, ctx.bits, cfg.rtn_range)
        codes = adaround_quantize(ctx.weight, H, scale, ctx.bits, opts.iters, opts.lr, opts.reg_lambda)
        return FittedWeight(codes[:, None, :], scale.float()[:, None])
