"""AdaQuant (Hubara, Nahshan, Hanani, Banner, Soudry, "Improving Post Training Neural Quantization:
Layer-wise Calibration and Integer Programming", arXiv 2006.10518; ICML 2021 as "Accurate Post
Training Quantization With Small Calibration Sets"), section 3.

Per layer, AdaQuant optimises the weight's continuous values, the bias and the quantizer's step
sizes with Adam, to minimise the MSE between the full-precision and the quantized layer output on
calibration data:

    W_q = s * clamp(round((W + V) / s), -K, K)      (straight-through rounding)
    min_{V, s, db}  E || W x + b - (W_q x + b + db) ||^2

with V a per-weight offset (initialised at 0), s the per-output-channel step size of the
symmetric b-bit grid (initialised by ``config.rtn_range``: min-max or MSE) and db a bias change.

The objective is computed exactly from the calibration statistics instead of mini-batches of
stored inputs: with Delta = W - W_q, H = E[x x^T] and mu = E[x] of the layer's calibration input
rows (im2col patches; per group for grouped convolutions),

    E || Delta x - db ||^2 = tr(Delta H Delta^T) - 2 db . (Delta mu) + ||db||^2,

which is the mean over all calibration rows the statistics were accumulated from (exact on the
calibration data, no sampling noise; the Gram matrix is formed from a uniform row sample where D
exceeds ``config.calib_samples``). For a given W_q the best bias change is db = Delta mu (the mean
output shift), so mpq eliminates db in closed form and Adam minimises the remaining
tr(Delta (H - mu mu^T) Delta^T) over V and s: the joint optimum of the paper's three parameter
sets, the bias one reached exactly at every step instead of by Adam. The gradient is analytic
(one product with the centred second moment per step, low-rank when the calibration rows are
few, as in AdaRound). The objective separates over output channels, so every channel keeps the
best iterate it reached (the start is round to nearest: AdaQuant never ends above RTN on the
calibration objective).

The returned bias is b + Delta mu ("bias tuning"). When ``config.bias_correction`` is on, mpq's
bias correction adds exactly that Delta mu after the fit, so AdaQuant then leaves the bias to it
(no double correction). The paper's "BN tuning" is ``config.bn_reestimation``; both compose with
this method through ``mpq.quantize``.

Settings and departures: ``AdaQuantConfig.iters`` (default 300) full-batch Adam steps, V in
units of the initial grid step at ``lr`` (default 3e-3), log s at
``scale_lr`` (default 1e-2), chosen on EfficientNet-Lite0 layers (V at 1e-2 or
3e-2 ended 5-25% higher); public code derived from the paper's runs 100 mini-batch steps on
stored inputs (learning rates 1e-5 on the raw weights, 1e-3 on bias and weight range). The layer
input is the full-precision model's (the paper's parallel variant; its sequential variant feeds
the quantized model's inputs), and the output is compared before the activation function.

Measured on EfficientNet-Lite0 (16 calibration crops, 4 bits, MSE grid start; output error
relative to the layer's output energy): RTN / RTN with bias correction / AdaQuant 0.0142 / 0.0037
/ 0.0020 (block 1 project conv), 0.0095 / 0.0026 / 0.0012 (block 3 project), 0.0017 / 0.0007 /
0.0005 (block 5 depthwise); mean over all 50 layers 0.0158 / 0.0068 / 0.0030 (GPTQ 0.0037, 0.0032
with bias correction). Whole model, float activations: KL to FP32 0.22, agreement 76% (RTN 2.97 /
16%, RTN with bias correction 0.37 / 68%, GPTQ with bias correction 0.23 / 73%).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from mpq.methods.base import FittedWeight, LayerContext, MethodConfig, WeightQuantizer, register
from mpq.methods.uniform import channel_scales, grid_max, layer_hessian, low_rank_factor

__all__ = ["AdaQuantQuantizer", "adaquant_quantize", "centred_moment", "layer_problem"]


def centred_moment(H: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor:
    """H - mu mu^T per group (float64 [G, D, D]): the input covariance, which weighs the output
    error once the bias absorbs the mean shift. ``mean`` None: H itself."""
    H = H.double().cpu()
    if mean is None:
        return H
    mu = mean.double().cpu()
    return H - mu[:, :, None] * mu[:, None, :]


def layer_problem(
    w: torch.Tensor, H: torch.Tensor, scale: torch.Tensor, method: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """The per-layer optimisation set-up shared by AdaQuant and the companding fit.

    Returns W (float32 [G, R, D], rows split into the G = H.shape[0] groups), the per-row scale
    [G, R, 1] (1 where ``scale`` is 0), the mask of rows with a scale > 0, and d -> d H per group
    (through a low-rank factor of H where the calibration rows are few, as in AdaRound)."""
    G, D, _ = H.shape
    C = w.shape[0]
    if C % G or w.shape[1] != D:
        raise ValueError(f"mpq.methods.{method}: expected w [C, {D}] with C divisible by {G}, got {tuple(w.shape)}")
    W = w.float().cpu().reshape(G, C // G, D)
    s = scale.float().cpu().reshape(G, C // G, 1)
    live = s > 0
    F = low_rank_factor(H)  # H = F F^T, [G, D, r], or None: use H
    Hf = H.float().cpu()

    def times_h(d: torch.Tensor) -> torch.Tensor:
        return torch.bmm(d, Hf) if F is None else torch.bmm(torch.bmm(d, F), F.transpose(1, 2))

    return W, torch.where(live, s, torch.ones_like(s)), live, times_h


def adaquant_quantize(
    w: torch.Tensor,
    H: torch.Tensor,
    mean: torch.Tensor | None,
    scale: torch.Tensor,
    bits: int,
    iters: int = 300,
    lr: float = 3e-3,
    scale_lr: float = 1e-2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AdaQuant codes, step sizes and bias change of ``w``.

    Args:
        w (Tensor[C, D]): the weight; rows split into G = H.shape[0] consecutive groups.
        H (Tensor[G, D, D]): E[x x^T] of each group's calibration inputs.
        mean (Tensor[G, D] or None): E[x] per group; None optimises without a bias change.
        scale (Tensor[C]): initial per-row step size.
        bits: code width; grid -K..K.
        iters, lr, scale_lr: Adam steps, learning rate of V (in grid steps) and of log s.

    Returns:
        codes (int8 [C, D]), scales (float64 [C]) and the bias change db = (W - W_q) mu
        (float64 [C]; zeros when ``mean`` is None).
    """
    K = grid_max(bits)
    W, s0, live, times_cov = layer_problem(w, centred_moment(H, mean), scale, "adaquant")
    G, R, D = W.shape
    C = G * R
    energy = (W * times_cov(W)).sum(-1).mean().clamp_min(1e-30)  # the loss is relative to it
    v = torch.zeros_like(W)  # V / s0: the offset in initial grid steps
    t = torch.zeros_like(s0)  # log(s / s0)
    v.grad, t.grad = torch.zeros_like(v), torch.zeros_like(t)
    opt = torch.optim.Adam([{"params": [v], "lr": lr}, {"params": [t], "lr": scale_lr}])
    best_err = torch.full(W.shape[:2], float("inf"))
    best_q = torch.zeros_like(W)
    best_s = s0.clone()
    for it in range(iters + 1):
        s = s0 * torch.exp(t)
        u = (W + s0 * v) / s
        q = torch.clamp(torch.round(u), -K, K)
        delta = W - s * q
        dC = times_cov(delta)
        err = (delta * dC).sum(-1)  # [G, R]: each channel's output error (bias change included)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_q = torch.where(better[..., None], q, best_q)
        best_s = torch.where(better[..., None], s, best_s)
        if it == iters:
            break
        # d loss / d W_q = -2 Delta cov; straight-through round, clamp passes inside the grid.
        g = -2.0 * dC / energy
        inside = ((u >= -K) & (u <= K)).float()
        v.grad.copy_(g * s0 * inside)
        t.grad.copy_((g * (q - u * inside)).sum(-1, keepdim=True) * s)
        opt.step()
    codes = torch.where(live, best_q, torch.zeros_like(best_q))
    if not math.isfinite(float(best_err.sum())):
        raise RuntimeError("mpq.methods.adaquant: the optimisation diverged")
    scales = torch.where(live, best_s, torch.zeros_like(best_s)).double()
    delta = W.double() - scales * codes.double()
    if mean is None:
        db = torch.zeros(C, dtype=torch.float64)
    else:
        db = torch.einsum("grd,gd->gr", delta, mean.double().cpu()).reshape(C)
    return codes.reshape(C, D).to(torch.int8), scales.reshape(C), db


@dataclass(frozen=True)
class AdaQuantConfig(MethodConfig):
    """AdaQuant's options: ``iters`` full-batch Adam steps, on the weights' offsets at ``lr`` and on
    the log step sizes at ``scale_lr``."""

    iters: int = 300
    lr: float = 3e-3
    scale_lr: float = 1e-2

    legacy_fields: ClassVar[dict[str, str]] = {
        "adaquant_iters": "iters",
        "adaquant_lr": "lr",
        "adaquant_scale_lr": "scale_lr",
    }

    def check(self) -> None:
        self._check_int("iters", 1)
        for name in ("lr", "scale_lr"):
            self._check_number(name, "> 0", lambda v: v > 0)


@register
class AdaQuantQuantizer(WeightQuantizer):
    """AdaQuant, one point per channel (``AdaQuantConfig``; initial step sizes by
    ``config.rtn_range``); tunes the bias too."""

    name = "adaquant"
    config_type = AdaQuantConfig

    def fit(self, ctx: LayerContext) -> FittedWeight:
        cfg = ctx.config
        H = layer_hessian(
            ctx.stats, ctx.target.groups, ctx.config.hessian_budget_mb, getattr(ctx.target, "name", "?"), self.name
        )
        codes, scales, db = adaquant_quantize(
            ctx.weight,
            H,
            ctx.stats.mean,
            channel_scales(ctx.weight, ctx.bits, cfg.rtn_range),
            ctx.bits,
            cfg.options.iters,
            cfg.options.lr,
            cfg.options.scale_lr,
        )
        bias = None
        if not cfg.bias_correction:  # else mpq's bias correction adds the same db after the fit
            b = ctx.target.module.bias
            base = torch.zeros_like(db) if b is None else b.detach().double().cpu()
            bias = (base + db).float()
        return FittedWeight(codes[:, None, :], scales.float()[:, None], bias=bias)
