"""Shared pieces of the one-point uniform methods (GPTQ, AdaRound, OCS, ILP): the per-channel
symmetric grid, its scale, and the layer's input second moment H (whole, when it fits
``config.hessian_budget_mb``; else blocks of it, or products with the kept input rows).

Grid for ``b`` bits: ``{-K, ..., K}``, ``K = 2^(b-1) - 1`` (docs/ALGORITHM.md section 1), one scale
per output channel.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from mpq import ops

if TYPE_CHECKING:  # pragma: no cover
    from mpq.calibrate import LayerStats

logger = logging.getLogger("mpq")

__all__ = [
    "grid_max",
    "channel_scales",
    "round_to_grid",
    "layer_hessian",
    "weighted_error",
    "hessian_mib",
    "hessian_fits",
    "hessian_block",
    "input_diagonal",
    "sample_products",
    "block_columns",
]

MIB = 2**20
# Bytes of calibration rows converted to float64 at a time by the products with the kept rows.
CHUNK_BYTES = 32 * MIB


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


def hessian_mib(D: int, groups: int) -> float:
    """MiB of a layer's H: groups x D x D float64."""
    return groups * D * D * 8 / MIB


def _dim(stats: LayerStats) -> int:
    return int((stats.gram if stats.gram is not None else stats.samples).shape[-1])


def hessian_fits(stats: LayerStats, groups: int, budget_mb: float) -> bool:
    """Whether the layer's whole H fits ``budget_mb`` (``config.hessian_budget_mb``)."""
    return hessian_mib(_dim(stats), groups) <= budget_mb


def layer_hessian(
    stats: LayerStats, groups: int, budget_mb: float | None = None, name: str = "?", method: str = ""
) -> torch.Tensor:
    """H = E[x x^T] of the layer's input rows per group, float64 [groups, D, D]: the calibration
    Gram matrix when kept, else formed from the kept sample rows [N, groups, D]. With
    ``budget_mb``: a ValueError naming the layer (``name``) and ``method`` when H exceeds it."""
    if budget_mb is not None and not hessian_fits(stats, groups, budget_mb):
        D = _dim(stats)
        raise ValueError(
            f"mpq.methods: layer {name!r}: its input second moment H (D = {D}, {groups} group(s)) takes "
            f"{hessian_mib(D, groups):.0f} MiB, above config.hessian_budget_mb = {budget_mb:g}, and method "
            f"{method!r} needs the whole H; raise hessian_budget_mb, or use method 'multipoint' or 'gptq' "
            f"(diagonal blocks of H for such layers) or 'rtn'"
        )
    if stats.gram is not None:
        return stats.gram.double().cpu()
    x = stats.samples.double().cpu()  # [N, G, D]
    if x.shape[1] != groups:
        raise ValueError(f"mpq.methods: expected samples with {groups} groups, got {tuple(x.shape)}")
    return torch.einsum("ngd,nge->gde", x, x) / max(1, x.shape[0])


def block_columns(stats: LayerStats, groups: int, budget_mb: float, name: str = "?") -> int:
    """Columns per diagonal block of H for a layer whose whole H exceeds ``budget_mb``: the most
    (a multiple of 128, at least 128, at most 4096) such that all blocks of all groups together,
    groups x D x B float64, fit the budget. Logs the one line that names the layer."""
    D = _dim(stats)
    B = int(budget_mb * MIB // (8 * groups * D)) // 128 * 128
    B = min(max(B, 128), 4096, D)
    logger.warning(
        "mpq: layer %r: H = E[x x^T] takes %.0f MiB (D = %d, %d group(s)), above config.hessian_budget_mb = %g; "
        "its GPTQ sweeps use diagonal blocks of H of %d columns (blockwise GPTQ, see mpq/methods/gptq.py)",
        name,
        hessian_mib(D, groups),
        D,
        groups,
        budget_mb,
        B,
    )
    return B


def input_diagonal(stats: LayerStats) -> torch.Tensor:
    """diag(H) per group, float64 [groups, D], without forming H."""
    if stats.gram is not None:
        return stats.gram.double().cpu().diagonal(dim1=-2, dim2=-1).clone()
    X = stats.samples
    N, G, D = X.shape
    out = torch.zeros(G, D, dtype=torch.float64)
    step = max(1, CHUNK_BYTES // (8 * G * D))
    for r in range(0, N, step):
        out += X[r : r + step].cpu().double().square_().sum(0)
    return out / max(1, N)


def hessian_block(stats: LayerStats, cols: torch.Tensor) -> torch.Tensor:
    """H restricted to columns ``cols`` (long [groups, B], per group), float64 [groups, B, B]:
    equal to the same entries of ``layer_hessian``, without forming the rest."""
    G, B = cols.shape
    if stats.gram is not None:
        gram = stats.gram.double().cpu()
        rows = torch.gather(gram, 1, cols[:, :, None].expand(G, B, gram.shape[-1]))
        return torch.gather(rows, 2, cols[:, None, :].expand(G, B, B))
    X = stats.samples.cpu()
    x = torch.gather(X, 2, cols[None].expand(X.shape[0], G, B)).double()  # [N, G, B]
    return torch.einsum("ngd,nge->gde", x, x) / max(1, x.shape[0])


def sample_products(samples: torch.Tensor, groups: int, mats: list[torch.Tensor]) -> list[torch.Tensor]:
    """For each ``m`` [C, D] of ``mats`` (rows in ``groups`` consecutive groups): the products
    x_n . m_j with the kept input rows ``samples`` [N, groups, D], float64 [N, C], so that
    mean_n (x_n . u_j)(x_n . v_j) = u_j^T H v_j. The rows go to float64 a chunk at a time: no
    array grows with C x N x D or D^2."""
    N, G, D = samples.shape
    ms = [m.double().cpu().reshape(G, -1, D).transpose(1, 2) for m in mats]  # [G, D, C/G]
    outs = [torch.empty(N, m.shape[0], dtype=torch.float64) for m in mats]
    step = max(1, CHUNK_BYTES // (8 * G * D))
    for r in range(0, N, step):
        x = samples[r : r + step].cpu().double().transpose(0, 1)  # [G, n, D]
        for m, out in zip(ms, outs):
            out[r : r + step] = torch.bmm(x, m).transpose(0, 1).reshape(x.shape[1], -1)
    return outs


def weighted_error(delta: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per row j of ``delta`` [C, D]: delta_j^T H_g(j) delta_j (float64 [C]), with H [G, D, D] and
    rows split into G consecutive groups (a grouped conv's output channels)."""
    G = H.shape[0]
    C, D = delta.shape
    d = delta.double().reshape(G, C // G, D)
    return torch.einsum("grd,gde,gre->gr", d, H, d).reshape(C)


def low_rank_factor(H: torch.Tensor) -> torch.Tensor | None:
    """F [G, D, r] float32 with F F^T = H (eigenvalues below 1e-9 of the largest dropped) when
    r <= D / 4, else None. The gradient dW F F^T then costs 2 C D r instead of C D^2 per step:
    much less where the calibration rows are fewer than D (a classifier fed one pooled row per
    image has rank <= the number of calibration images)."""
    D = H.shape[-1]
    if D < 64:
        return None
    evals, evecs = torch.linalg.eigh(H.double().cpu())
    keep = evals > 1e-9 * evals.amax(dim=-1, keepdim=True).clamp_min(1e-300)
    r = max(1, int(keep.sum(-1).max()))
    if r > D // 4:
        return None
    # eigh sorts ascending: the r largest are the last r (zeroed where a group has fewer).
    lam = (evals * keep).clamp_min(0)[:, -r:]
    return (evecs[:, :, -r:] * lam.sqrt()[:, None, :]).float()
