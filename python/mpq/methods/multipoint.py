"""Multipoint: max_points greedy points per channel (docs/ALGORITHM.md section 1)."""

from __future__ import annotations

import torch

from mpq import ops
from mpq.methods.base import FittedWeight, LayerContext, WeightQuantizer, register
from mpq.methods.gptq import gptq_block_factors, gptq_factor, gptq_quantize, gptq_quantize_blocked
from mpq.methods.uniform import block_columns, hessian_fits, layer_hessian, round_to_grid, sample_products


@register
class MultipointQuantizer(WeightQuantizer):
    """Nested greedy points from ``mpq::fit_multipoint`` (exact sweep when ``config.exact_fit``);
    with ``config.point_rounding == "gptq"`` also a second, output-aware sequence of points
    (``gptq_points``) from which each channel may take its points instead."""

    name = "multipoint"
    multipoint = True

    def fit(self, ctx: LayerContext) -> FittedWeight:
        codes, scales, _ = ops.fit_multipoint(ctx.weight.contiguous(), ctx.bits, ctx.max_points, ctx.config.exact_fit)
        fit = FittedWeight(codes, scales)
        if ctx.config.point_rounding == "gptq":
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
    groups = ctx.target.groups
    stats = ctx.stats
    blocks = None
    if hessian_fits(stats, groups, cfg.hessian_budget_mb):
        H = layer_hessian(stats, groups)
        factor = gptq_factor(H, cfg.point_damp, cfg.gptq_act_order)
    else:
        block = block_columns(stats, groups, cfg.hessian_budget_mb, getattr(ctx.target, "name", "?"))
        blocks = gptq_block_factors(stats, groups, cfg.point_damp, cfg.gptq_act_order, block)
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
        _, s, _ = ops.fit_multipoint(residual.float().contiguous(), ctx.bits, 1, cfg.exact_fit)
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
