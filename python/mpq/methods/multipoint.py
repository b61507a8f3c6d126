"""Multipoint: max_points greedy points per channel (docs/ALGORITHM.md section 1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mpq import ops
from mpq.methods.base import FittedWeight, LayerContext, MethodConfig, WeightQuantizer, register
from mpq.methods.gptq import gptq_block_factors, gptq_factor, gptq_quantize, gptq_quantize_blocked
from mpq.methods.uniform import block_columns, hessian_fits, layer_hessian, round_to_grid, sample_products

_POINT_ROUNDINGS = ("nearest", "gptq")
_SCALE_REFITS = ("output", "weight", "none")


@dataclass(frozen=True)
class MultipointConfig(MethodConfig):
    """Multipoint's options.

    ``point_rounding``: ``"nearest"`` = the paper's greedy points (each rounds the residual to
    nearest); ``"gptq"`` (default) = also a second, output-aware point sequence whose codes come
    from GPTQ column sweeps with error feedback (docs/ALGORITHM.md section 1, "beyond the paper";
    dampening ``point_damp`` of the mean diagonal of H, columns in act-order when ``act_order``),
    and each channel keeps whichever sequence has the lower output error at its allocated count.
    Measured on EfficientNet-Lite0 (KL to FP32, benchmarks/compare_methods.py): W4A8 0.098 -> 0.036,
    W3A16 0.576 -> 0.205, W2A16 3.48 -> 2.13. ``point_damp`` is 0.1 rather than GPTQ's 0.01, chosen
    on held-out data (benchmarks/results/point_damp_holdout.md): the calibration H comes from float
    inputs, while later layers of the quantized model see the earlier layers' errors.

    ``scale_refit``: once the points per channel are allocated, re-solve each channel's scales
    jointly by least squares on the layer-output error (``"output"``, with the calibration H), on
    the weight error (``"weight"``), or keep the greedy scales (``"none"``). ``exact_fit``: the
    greedy step's exact sweep over all candidate scales (``mpq::fit_multipoint``).

    ``int8_merge`` (off by default; departs from the paper): in layers that run with 8-bit
    activations (the CPU int8 kernels), tie each channel's first two scales to a whole-number ratio
    r (a_1 = r a_2, ``mpq.refit.int8_mergeable_scales``), so that its first two points are one int8
    row r q_1 + q_2 for the kernels: a channel of two points costs one int8 column instead of two.
    Those layers are fitted with at most two points per channel (a third would be a further int8
    column, added in float before the output is requantized: the whole layer would leave oneDNN's
    fused uint8-output path; ResNet-50 W4A8 at batch 1: 17.4 -> 16.0 ms, 13.6 ms with uint8 skip
    connections, benchmarks/NOTES.md), so every channel is one int8 row; the budget the cap frees
    goes to other channels. The codes stay the greedy fit's; the scales are re-solved under the tie."""

    point_rounding: str = "gptq"
    point_damp: float = 0.1
    act_order: bool = False
    scale_refit: str = "output"
    exact_fit: bool = False
    int8_merge: bool = False

    legacy_fields: ClassVar[dict[str, str]] = {
        "point_rounding": "point_rounding",
        "point_damp": "point_damp",
        "gptq_act_order": "act_order",
        "scale_refit": "scale_refit",
        "exact_fit": "exact_fit",
    }

    def check(self) -> None:
        self._check_choice("point_rounding", _POINT_ROUNDINGS)
        self._check_number("point_damp", "in (0, 1]", lambda v: 0 < v <= 1)
        self._check_bool("act_order")
        self._check_choice("scale_refit", _SCALE_REFITS)
        self._check_bool("exact_fit")
        self._check_bool("int8_merge")


@register
class MultipointQuantizer(WeightQuantizer):
    """Nested greedy points from ``mpq::fit_multipoint`` (``MultipointConfig``): exact sweep when
    ``exact_fit``; with ``point_rounding == "gptq"`` also a second, output-aware sequence of points
    (``gptq_points``) from which each channel may take its points instead."""

    name = "multipoint"
    multipoint = True
    config_type = MultipointConfig

    def fit(self, ctx: LayerContext) -> FittedWeight:
        opts: MultipointConfig = ctx.config.options
        codes, scales, _ = ops.fit_multipoint(ctx.weight.contiguous(), ctx.bits, ctx.max_points, opts.exact_fit)
        fit = FittedWeight(codes, scales)
        if opts.point_rounding == "gptq":
            fit.alternatives = [gptq_points(ctx)]
        return fit


def gptq_points(ctx: LayerContext):
    """Multipoint joined with GPTQ (docs/ALGORITHM.md section 1, beyond the paper): nested points
    (codes int8 [C, P, D], scales float32 [C, P]) fitted to the layer-output error.

    Point k approximates the residual R_k = W - sum_{i<k} a_i q_i. Its grid is the greedy step's
    (``mpq::fit_multipoint`` with one point on R_k); its codes come from a GPTQ column sweep of R_k
    on that grid, which spreads each column's rounding error over the columns not yet rounded so
    that e(a, q) = (R_k - a q)^T H (R_k - a q) stays small; then a is re-solved for e
    (a = q^T H R_k / q^T H q). Per channel, the point keeps whichever of (GPTQ codes, re-solved a)
    and the plain greedy step has the lower e. The next point fits the true residual, so the first
    k points are the k-point fit. H^-1's factor is computed once per layer.

    Measured (tests/python/test_multipoint_gptq.py): the output error of the first one or two
    points falls to 0.6-0.8 of the greedy points', but with 3-4 points it can be up to 2x worse
    (the GPTQ residual is larger in weight norm, and the next grids follow it). Hence mpq.quantize
    keeps both sequences and each channel takes the better one at its allocated count.

    Departure for a layer whose whole H exceeds ``config.hessian_budget_mb`` (logged once with the
    layer's name): the GPTQ sweeps are blockwise (``gptq.gptq_quantize_blocked``: diagonal blocks
    of H, GPTQ's error feedback within a block, a least-squares compensation across blocks), and
    when calibration kept input rows rather than H, the re-solved a and the errors e come from the
    rows (x_n . R_k, x_n . q per channel: the same values as with H, up to rounding). The choice
    against the greedy step is kept, so each point's e is still never above the greedy step's.
    """
    cfg = ctx.config
    opts: MultipointConfig = cfg.options
    groups = ctx.target.groups
    stats = ctx.stats
    blocks = None
    if hessian_fits(stats, groups, cfg.hessian_budget_mb):
        H = layer_hessian(stats, groups)
        factor = gptq_factor(H, opts.point_damp, opts.act_order)
    else:
        block = block_columns(stats, groups, cfg.hessian_budget_mb, getattr(ctx.target, "name", "?"))
        blocks = gptq_block_factors(stats, groups, opts.point_damp, opts.act_order, block)
        H = None if stats.gram is None else stats.gram.double().cpu()  # a kept Gram matrix is used as it is
    residual = ctx.weight.double().cpu()
    C, D = residual.shape

    def output_error(delta: torch.Tensor) -> torch.Tensor:  # delta_j^T H delta_j per channel
        d = delta.reshape(groups, C // groups, D)
        return torch.einsum("gcd,gde,gce->gc", d, H, d).reshape(C)

    def solve_and_compare(residual, q, greedy_q, greedy_a):
        """(a re-solved for the GPTQ codes, their error, the greedy step's error) per channel."""
        if H is not None:
            HQ = torch.bmm(q.reshape(groups, C // groups, D), H).reshape(C, D)  # (H q_j) per channel, H of its group
            den = (HQ * q).sum(1)
            a = torch.where(den > 0, (HQ * residual).sum(1) / den.clamp_min(1e-300), greedy_a)
            return a, output_error(residual - a[:, None] * q), output_error(residual - greedy_a[:, None] * greedy_q)
        xr, xq, xg = sample_products(stats.samples, groups, [residual, q, greedy_q])  # [N, C] each
        den = (xq * xq).mean(0)
        a = torch.where(den > 0, (xq * xr).mean(0) / den.clamp_min(1e-300), greedy_a)
        return a, (xr - a * xq).pow(2).mean(0), (xr - greedy_a * xg).pow(2).mean(0)

    codes, scales = [], []
    for _ in range(ctx.max_points):
        _, s, _ = ops.fit_multipoint(residual.float().contiguous(), ctx.bits, 1, opts.exact_fit)
        greedy_a = s[:, 0].double()
        greedy_q = round_to_grid(residual, greedy_a, ctx.bits)
        if blocks is None:
            q = gptq_quantize(residual, H, greedy_a, ctx.bits, factor=factor).double()
        else:
            q = gptq_quantize_blocked(residual, blocks, greedy_a, ctx.bits, stats).double()
        a, e_gptq, e_greedy = solve_and_compare(residual, q, greedy_q, greedy_a)
        keep = e_gptq <= e_greedy
        q = torch.where(keep[:, None], q, greedy_q)
        a = torch.where(keep, a, greedy_a)
        codes.append(q.to(torch.int8))
        scales.append(a)
        residual = residual - a[:, None] * q
    device = ctx.weight.device
    return torch.stack(codes, 1).to(device), torch.stack(scales, 1).float().to(device)
