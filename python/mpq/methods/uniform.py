"""Shared pieces of the one-point uniform methods (GPTQ, AdaRound, OCS, ILP): the per-channel
symmetric grid, its scale, and the layer's input second moment H.

Grid for ``b`` bits: ``{-K, ..., K}``, ``K = 2^(b-1) - 1`` (ALGORITHM.md section 1), one scale
per output channel.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mpq import ops

if TYPE_CHECKING:  # pragma: no cover
    from mpq.calibrate import LayerStats

__all__ = ["grid_max", "channel_scales", "round_to_grid", "layer_hessian", "weighted_error"]


def grid_max(bits: int) -> int:
    """K = 2^(bits-1) - 1: the largest code of the symmetric b-bit grid."""
    return 2 ** (bits - 1) - 1


def channel_scales(w: torch.Tensor, bits: int, rule: str) -> torch.Tensor:
    """Per-row scale (float64 [C]) of ``w`` [C, D] for the b-bit grid: ``"minmax"`` = max|w_j| / K,
    ``"mse"`` = the scale minimising ||w_j - a q||^2 over a and q (the exact first greedy point of
    ``mpq::fit_multipoint``, which clips outliers when that lowers the error)."""
    if rule == "minmax":
        return w.double().abs().amax(dim=1) / grid_max(bits)
    if rule == "mse":
        _, scales, _ = ops.fit_multipoint(w.float().contiguous().cpu(), bits, 1, True)
        return scales[:, 0].double().to(w.device)
    raise ValueError(f"mpq.methods: expected a scale rule 'minmax' or 'mse', got {rule!r}")


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes clamp(round(w / scale), -K, K) of ``w`` [C, ...] with per-row ``scale`` [C]; rows with
    scale 0 get code 0. Returns the codes in w's dtype (integers as floats)."""
    K = grid_max(bits)
    shape = [-1] + [1] * (w.dim() - 1)
    s = scale.to(w.dtype).reshape(shape)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.clamp(torch.round(w / safe), -K, K)
    return torch.where(s > 0, q, torch.zeros_like(q))


def layer_hessian(stats: "LayerStats", groups: int) -> torch.Tensor:
    """H = E[x x^T] of the layer's input rows per group, float64 [groups, D, D]: the calibration
    Gram matrix when kept, else formed from the kept sample rows [N, groups, D]."""
    if stats.gram is not None:
        return stats.gram.double().cpu()
    x = stats.samples.double().cpu()  # [N, G, D]
    if x.shape[1] != groups:
        raise ValueError(f"mpq.methods: expected samples with {groups} groups, got {tuple(x.shape)}")
    return torch.einsum("ngd,nge->gde", x, x) / max(1, x.shape[0])


def weighted_error(delta: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per row j of ``delta`` [C, D]: delta_j^T H_g(j) delta_j (float64 [C]), with H [G, D, D] and
    rows split into G consecutive groups (a grouped conv's output channels)."""
    G = H.shape[0]
    C, D = delta.shape
    d = delta.double().reshape(G, C // G, D)
    return torch.einsum("grd,gde,gre->gr", d, H, d).reshape(C)
