"""Joint least-squares refit of a channel's point scales (ALGORITHM.md section 1, "beyond the
paper"): once the greedy codes q_1..q_n of channel j are fixed, re-solve all its scales a_1..a_n
at once, either for the weight error ||w - sum a_k q_k||^2 or for the layer-output error
(w - sum a_k q_k)^T H (w - sum a_k q_k) with H = E[x x^T] from calibration. An n x n system per
channel; never worse than the greedy scales in the error it minimises (checked per channel)."""
from __future__ import annotations

import torch

from mpq.calibrate import LayerStats

__all__ = ["refit_scales"]


def _normal_equations(Q: torch.Tensor, w: torch.Tensor, stats: LayerStats, group: torch.Tensor, mode: str):
    """A = Q H Q^T and b = Q H w per channel (H = I for mode "weight"). Q [m, n, D], w [m, D],
    group [m] the group of each channel."""
    if mode == "weight":
        return Q @ Q.transpose(1, 2), (Q @ w.unsqueeze(2)).squeeze(2)
    if stats.gram is not None:
        if stats.gram.shape[0] == 1:
            HQ = Q @ stats.gram[0]  # [m, n, D]
        else:
            HQ = torch.bmm(Q, stats.gram[group])
        return HQ @ Q.transpose(1, 2), (HQ @ w.unsqueeze(2)).squeeze(2)
    X = stats.samples.double()  # [N, G, D]
    Xc = X[:, group].transpose(0, 1)  # [m, N, D]
    Y = Q @ Xc.transpose(1, 2)  # [m, n, N]
    y = (Xc @ w.unsqueeze(2)).squeeze(2)  # [m, N]
    N = X.shape[0]
    return Y @ Y.transpose(1, 2) / N, (Y @ y.unsqueeze(2)).squeeze(2) / N


def _error(A: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """a^T A a - 2 a^T b: the error up to the constant w^T H w."""
    return (a.unsqueeze(1) @ A @ a.unsqueeze(2)).reshape(-1) - 2 * (a * b).sum(1)


def refit_scales(
    weight: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, counts: torch.Tensor, stats: LayerStats,
    groups: int, mode: str = "output",
) -> torch.Tensor:
    """New float32 scales [C, P]: for each channel j, its first counts[j] scales re-solved jointly.

    weight [C, D], codes int8 [C, P, D], scales [C, P], counts int [C]."""
    C, P, D = codes.shape
    out = scales.clone().float()
    group_of = torch.arange(C) // (C // groups)
    for n in range(1, P + 1):
        rows = (counts.cpu() == n).nonzero().flatten()
        if rows.numel() == 0:
            continue
        Q = codes[rows, :n].double().cpu()
        w = weight[rows].double().cpu()
        A, b = _normal_equations(Q, w, stats, group_of[rows], mode)
        old = scales[rows, :n].double().cpu()
        ridge = 1e-12 * A.diagonal(dim1=1, dim2=2).sum(1).clamp_min(1e-300) / n
        A_reg = A + ridge[:, None, None] * torch.eye(n, dtype=A.dtype)
        new, info = torch.linalg.solve_ex(A_reg, b)
        ok = (info == 0) & torch.isfinite(new).all(1) & (_error(A, b, new) <= _error(A, b, old))
        out[rows, :n] = torch.where(ok[:, None], new, old).float()
    return out
