"""Companding quantizer: a post-training variant of LCQ (Yamamoto, "Learnable Companding
Quantization for Accurate Low-bit Neural Networks", CVPR 2021, arXiv 2103.07156).

A non-uniform symmetric quantizer per layer:

    w  ->  s_j * sign(w) * c^-1( round(K * c(min(|w| / s_j, 1))) / K )

with K = 2^(b-1) - 1 positive levels (2^b - 1 levels in all, like mpq's uniform grid), s_j a
per-output-channel scale and c a monotone piecewise-linear companding function on [0, 1] with
c(0) = 0, c(1) = 1: ``CompandingConfig.breakpoints`` (default 16, as in LCQ) intervals of equal
input width whose slopes are softmax(theta) times their number (LCQ's parametrisation), shared by
all channels of the layer. Rounding happens in the companded domain, as in LCQ. The levels are
s_j * l_i with l_i = c^-1(i / K), i = -K..K (l_-i = -l_i): a per-layer codebook.

Post-training fit (LCQ trains theta and the range with the network): per layer, Adam minimises
the layer-output error tr((W - W_q) H (W - W_q)^T) on the calibration second moment H (per group
for grouped convolutions; the centred H - mu mu^T when ``config.bias_correction`` will remove the
mean shift) over theta and log s, through straight-through rounding as in LCQ, for
``iters`` full-batch steps (default 150) at ``lr`` (default
2e-2 on theta; log s at a fifth of it). It starts from the uniform grid (c = identity, s = K times
the ``config.rtn_range`` step), where it is exactly round to nearest, and keeps the best iterate:
never above uniform RTN on the calibration objective. The straight-through landscape is rough
(the best iterate moves by several percent with the learning rate); measured on
EfficientNet-Lite0 at 3 bits (MSE grid start, output error relative to uniform RTN's):
0.42 / 0.70 / 0.51 / 0.78 / 0.65 on blocks 1 and 3 project, block 5 depthwise, block 14 project
and the classifier.

Storage, honestly: the levels are non-uniform, so they are not codes times one scale and cannot
run in the multipoint kernels (writing them as sums of uniform points would take up to K points
per channel). The layer is swapped for ``mpq.nn.CodebookConv2d`` / ``CodebookLinear``: b-bit codes
(int8 indices into the codebook, in [-K, K]), one 32-bit scale per channel and the layer's
codebook of 2^b - 1 float32 levels; its forward looks the levels up and runs the float
convolution (dequantize, then ATen, like the multipoint CPU path), with the same per-tensor
activation fake quantization. Its ``bits_per_weight`` (the report's average bits) counts b bits
per weight, 32 per channel and the codebook; ``mpq.model_size_bytes`` counts codes and scales but
not the codebook (at most 255 floats per layer). It is an accuracy baseline: ``mpq.save`` refuses
it (the mpq file format knows only uniform multipoint layers; ``torch.save`` and TorchScript
work), and no fused or CUDA kernel exists for it.
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from mpq.methods.adaquant import centred_moment, layer_problem
from mpq.methods.base import FittedWeight, LayerContext, MethodConfig, WeightQuantizer, conv_geometry, register
from mpq.methods.uniform import channel_scales, grid_max, layer_hessian
from mpq.nn.codebook import CodebookConv2d, CodebookLayer, CodebookLinear

__all__ = [
    "CompandingQuantizer",
    "compand",
    "compand_inverse",
    "companding_quantize",
    "build_companded",
]


def _knots(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slopes-as-heights d (softmax(theta), sum 1) and knot heights c_k (0, cumsum d)."""
    d = torch.softmax(theta, 0)
    return d, torch.cat([d.new_zeros(1), torch.cumsum(d, 0)])


def compand(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """c(x) for x in [0, 1]: piecewise linear through (k / n, c_k), n = theta.numel()."""
    n = theta.numel()
    d, c = _knots(theta)
    k = torch.clamp(torch.floor(x * n), 0, n - 1).long()
    return c[k] + d[k] * (x * n - k)


def compand_inverse(y: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """c^-1(y) for y in [0, 1]."""
    n = theta.numel()
    d, c = _knots(theta)
    k = torch.clamp(torch.searchsorted(c[1:-1].detach().contiguous(), y.detach().contiguous(), right=True), 0, n - 1)
    return (k + (y - c[k]) / d[k].clamp_min(1e-12)) / n


def _levels(theta: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The K + 1 non-negative levels l_i = c^-1(i / K) (differentiable in theta) and the slope
    dc^-1/dy at each of them (1 / (n d_j), j the interval of i / K)."""
    n = theta.numel()
    y = torch.arange(K + 1, dtype=theta.dtype) / K
    d, c = _knots(theta.detach())
    j = torch.clamp(torch.searchsorted(c[1:-1].contiguous(), y, right=True), 0, n - 1)
    return compand_inverse(y, theta), 1.0 / (n * d[j].clamp_min(1e-12))


def _pick(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for a small 1-D table (index_select: much faster than advanced indexing)."""
    return table.index_select(0, index.reshape(-1)).reshape(index.shape)


def _assign(absw: torch.Tensor, s: torch.Tensor, theta: torch.Tensor, K: int):
    """Codes r = round(K c(min(|w| / s, 1))) in 0..K and what the gradients need."""
    n = theta.numel()
    d, c = _knots(theta.detach())
    a = absw / s
    inside = a < 1
    x = torch.where(inside, a, torch.ones_like(a))
    k = torch.clamp(torch.floor(x * n), max=n - 1).long()
    frac = x * n - k
    dk = _pick(d.to(absw.dtype), k)
    r = torch.round((_pick(c[:n].to(absw.dtype), k) + dk * frac) * K).long()
    return r, k, frac, dk, a, inside


def companding_quantize(
    w: torch.Tensor,
    H: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    breakpoints: int = 16,
    iters: int = 150,
    lr: float = 2e-2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit the companding quantizer of ``w``.

    Args:
        w (Tensor[C, D]): the weight; rows split into G = H.shape[0] consecutive groups.
        H (Tensor[G, D, D]): the second moment weighing the output error.
        scale (Tensor[C]): the uniform grid's step per row (the start: s = K * scale).
        bits: code width (2^bits - 1 levels).
        breakpoints, iters, lr: intervals of c, Adam steps and learning rate (theta; log s at lr / 5).

    Returns:
        codes (int8 [C, D] in [-K, K]), scales s (float64 [C]) and the codebook (float64 [2K + 1],
        level of code i = codebook[i + K]; W_q = s[:, None] * codebook[codes + K]).

    The gradient is analytic (straight-through round in the companded domain, as LCQ's autograd
    would give): with g = dLoss/dW_q, W_q = sign(w) s l_r, y = c(x), x = min(|w| / s, 1),
    dLoss/dl_i = sum_{r = i} g sign(w) s, dLoss/dy = g sign(w) s (c^-1)'(l_r) per weight, gathered
    per interval of c for theta; dW_q/ds = sign(w) (l_r - (c^-1)'(l_r) c'(x) x [x < 1]).
    """
    K = grid_max(bits)
    n = breakpoints
    W, s0, live, times_h = layer_problem(w, H.double(), K * scale.double(), "companding")
    C, D = w.shape
    sgn, absw = torch.sign(W), W.abs()

    energy = float((W * times_h(W)).sum().clamp_min(1e-30))
    theta = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    t = torch.zeros_like(s0)
    t.grad = torch.zeros_like(t)
    opt = torch.optim.Adam([{"params": [theta], "lr": lr}, {"params": [t], "lr": lr / 5}])
    best = (float("inf"), theta.detach().clone(), s0.clone())
    for it in range(iters + 1):
        s = s0 * torch.exp(t)
        levels, slope = _levels(theta, K)
        r, k, frac, dk, a, inside = _assign(absw, s, theta, K)
        lr_, sr = _pick(levels.detach().float(), r), _pick(slope.float(), r)
        delta = W - sgn * s * lr_
        dH = times_h(delta)
        loss = float((delta * dH).sum()) / energy
        if loss < best[0]:
            best = (loss, theta.detach().clone(), s.clone())
        if it == iters:
            break
        g = (-2.0 / energy) * dH * sgn  # dLoss/dW_q times sign(w)
        gl = g * s
        gy = gl * sr
        g_levels = torch.bincount(r.reshape(-1), gl.reshape(-1), minlength=K + 1).double()
        g_c = torch.bincount(k.reshape(-1), gy.reshape(-1), minlength=n).double()
        g_d = torch.bincount(k.reshape(-1), (gy * frac).reshape(-1), minlength=n).double()
        d_t, c_t = _knots(theta)
        theta.grad = None
        torch.autograd.backward([levels, c_t[:n], d_t], [g_levels, g_c, g_d])
        t.grad.copy_((g * (lr_ - sr * dk * n * a * inside)).sum(-1, keepdim=True) * s)
        opt.step()
    if not math.isfinite(best[0]):
        raise RuntimeError("mpq.methods.companding: the optimisation diverged")
    _, theta, s = best
    with torch.no_grad():
        r = _assign(absw, s, theta, K)[0]
        half = compand_inverse(torch.arange(K + 1, dtype=torch.float64) / K, theta)
    codebook = torch.cat([-half.flip(0)[:-1], half])
    codes = torch.where(live, sgn * r, torch.zeros_like(W))
    scales = torch.where(live, s, torch.zeros_like(s)).double()
    return codes.reshape(C, D).to(torch.int8), scales.reshape(C), codebook


@dataclass(frozen=True)
class CompandingConfig(MethodConfig):
    """Companding's options: ``breakpoints`` intervals of the piecewise-linear function, ``iters``
    full-batch Adam steps at ``lr``."""

    breakpoints: int = 16
    iters: int = 150
    lr: float = 2e-2

    legacy_fields: ClassVar[dict[str, str]] = {
        "companding_breakpoints": "breakpoints",
        "companding_iters": "iters",
        "companding_lr": "lr",
    }

    def check(self) -> None:
        self._check_int("breakpoints", 1)
        self._check_int("iters", 1)
        self._check_number("lr", "> 0", lambda v: v > 0)


@register
class CompandingQuantizer(WeightQuantizer):
    """Post-training LCQ: a per-layer companding function and per-channel scales
    (``CompandingConfig``; start from the ``config.rtn_range`` grid). Runs as ``CodebookConv2d`` /
    ``CodebookLinear``."""

    name = "companding"
    config_type = CompandingConfig

    def fit(self, ctx: LayerContext) -> FittedWeight:
        cfg = ctx.config
        H = layer_hessian(
            ctx.stats, ctx.target.groups, ctx.config.hessian_budget_mb, getattr(ctx.target, "name", "?"), self.name
        )
        if cfg.bias_correction:
            H = centred_moment(H, ctx.stats.mean)
        codes, scales, codebook = companding_quantize(
            ctx.weight,
            H,
            channel_scales(ctx.weight, ctx.bits, cfg.rtn_range),
            ctx.bits,
            cfg.options.breakpoints,
            cfg.options.iters,
            cfg.options.lr,
        )
        return FittedWeight(codes[:, None, :], scales.float()[:, None], codebook=codebook.float())

    def build_module(
        self, target, points: int, bits: int, has_bias: bool, codebook: torch.Tensor | None = None, grid=None
    ) -> nn.Module:
        """A codebook layer (``CodebookConv2d`` / ``CodebookLinear``) holding the fit's levels."""
        if codebook is None:
            raise ValueError(f"mpq: method 'companding' needs the fit's codebook to build layer {target.name!r}")
        return build_companded(target, bits, codebook, has_bias)


def build_companded(target, bits: int, codebook: torch.Tensor, has_bias: bool) -> nn.Module:
    """The codebook layer replacing ``target``'s module (``mpq.quantize`` then calls
    ``set_weight`` and ``set_act_qparams`` on it as on a multipoint layer)."""
    m = target.module
    with torch.device(m.weight.device):
        if target.kind == "linear":
            q: CodebookLayer = CodebookLinear(m.in_features, m.out_features, bits, bias=has_bias)
        else:
            q = CodebookConv2d(w_bits=bits, bias=has_bias, **conv_geometry(target))
    q.set_codebook(codebook)
    return q
