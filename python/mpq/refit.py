"""Joint least-squares refit of a channel's point scales (docs/ALGORITHM.md section 1, "beyond the
paper"): once the greedy codes q_1..q_n of channel j are fixed, re-solve all its scales a_1..a_n
at once, either for the weight error ||w - sum a_k q_k||^2 or for the layer-output error
(w - sum a_k q_k)^T H (w - sum a_k q_k) with H = E[x x^T] from calibration. An n x n system per
channel; never worse than the greedy scales in the error it minimises (checked per channel)."""

from __future__ import annotations

import torch

from mpq.calibrate import LayerStats
from mpq.methods.uniform import CHUNK_BYTES

__all__ = ["refit_scales", "int8_mergeable_scales"]


def _normal_equations(Q: torch.Tensor, w: torch.Tensor, stats: LayerStats, group: torch.Tensor, mode: str):
    """A = Q H Q^T and b = Q H w per channel (H = I for mode "weight"). Q [m, n, D], w [m, D],
    group [m] the group of each channel.

    Memory: O(m n D) beside the statistics. With a kept Gram matrix of several groups, the [m, D, D]
    stack of each channel's H is formed for a chunk of channels at a time; with kept input rows
    X [N, G, D] (H = X^T X / N, D > N), A = Y Y^T / N and b = Y y / N from the products
    Y = Q X^T [m, n, N] and y = X w, accumulated over chunks of rows (never the [m, N, D] rows of
    every channel)."""
    if mode == "weight":
        return Q @ Q.transpose(1, 2), (Q @ w.unsqueeze(2)).squeeze(2)
    m, n, D = Q.shape
    if stats.gram is not None and stats.gram.shape[0] == 1:
        HQ = Q @ stats.gram[0]  # [m, n, D]
        return HQ @ Q.transpose(1, 2), (HQ @ w.unsqueeze(2)).squeeze(2)
    A = torch.empty(m, n, n, dtype=torch.float64)
    b = torch.empty(m, n, dtype=torch.float64)
    if stats.gram is not None:
        step = max(1, CHUNK_BYTES // (8 * D * D))
        for r in range(0, m, step):
            Qr = Q[r : r + step]
            HQ = torch.bmm(Qr, stats.gram[group[r : r + step]])  # [k, n, D]
            A[r : r + step] = HQ @ Qr.transpose(1, 2)
            b[r : r + step] = (HQ @ w[r : r + step].unsqueeze(2)).squeeze(2)
        return A, b
    N = stats.samples.shape[0]
    for g in torch.unique(group).tolist():
        rows = (group == g).nonzero().flatten()
        Qg, wg = Q[rows], w[rows]  # [mg, n, D], [mg, D]
        X = stats.samples[:, g]  # [N, D] float32
        step = max(1, CHUNK_BYTES // (8 * max(D, rows.numel() * (n + 1))))
        Ag = torch.zeros(rows.numel(), n, n, dtype=torch.float64)
        bg = torch.zeros(rows.numel(), n, dtype=torch.float64)
        for r in range(0, N, step):
            xt = X[r : r + step].double().t()  # [D, k]
            Y = Qg @ xt  # [mg, n, k]
            y = wg @ xt  # [mg, k]
            Ag += Y @ Y.transpose(1, 2)
            bg += (Y @ y.unsqueeze(2)).squeeze(2)
        A[rows], b[rows] = Ag / N, bg / N
    return A, b


def _error(A: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """a^T A a - 2 a^T b: the error up to the constant w^T H w."""
    return (a.unsqueeze(1) @ A @ a.unsqueeze(2)).reshape(-1) - 2 * (a * b).sum(1)


def refit_scales(
    weight: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    counts: torch.Tensor,
    stats: LayerStats,
    groups: int,
    mode: str = "output",
    group_of: torch.Tensor | None = None,
) -> torch.Tensor:
    """New float32 scales [C, P]: for each channel j, its first counts[j] scales re-solved jointly.

    weight [C, D], codes int8 [C, P, D], scales [C, P], counts int [C]; ``group_of`` [C]: each
    channel's group (default: the layer's C channels in ``groups`` equal groups)."""
    C, P, D = codes.shape
    out = scales.clone().float()
    if group_of is None:
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


def int8_mergeable_scales(
    weight: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    counts: torch.Tensor,
    stats: LayerStats,
    groups: int,
    w_bits: int,
    mode: str = "output",
    code_bound: int = 127,
) -> torch.Tensor:
    """Scales under which each channel's first two points merge exactly into one int8 point.

    For a channel with n >= 2 points, r = round(a_1 / a_2) clamped to 1..(code_bound - K) // K
    (K = 2**(w_bits - 1) - 1, so |r q_1 + q_2| <= code_bound), then the scales of the codes
    (r q_1 + q_2, q_3, ..., q_n) are re-solved jointly (``refit_scales``, ``mode``), the merged one
    rounded to 24 - bits(r_max) significant bits (a: 19 at 4 bits), so that r a is exact in
    float32, and the channel keeps a_1 = r a, a_2 = a: the same codes,
    and a weight that the CPU int8 kernels compute as one row (``mpq::multipoint_*_stored``'s
    exact merge). Channels with one point, or non-positive scales, keep theirs. Returns new float32
    scales [C, P]; weight [C, D], codes int8 [C, P, D], counts int [C]."""
    C, P, D = codes.shape
    K = 2 ** (w_bits - 1) - 1
    r_max = (code_bound - K) // K
    s = scales.double().cpu()
    n = counts.long().cpu()
    merge = (n >= 2) & (s[:, 0] > 0) & (s[:, 1] > 0) if P >= 2 else torch.zeros(C, dtype=torch.bool)
    if r_max < 1 or not bool(merge.any()):
        return scales.clone().float()
    rows = merge.nonzero().flatten()
    r = (s[rows, 0] / s[rows, 1]).round().clamp(1, r_max)
    q = codes[rows].cpu().to(torch.int16)
    merged = torch.cat([(r.to(torch.int16)[:, None] * q[:, 0] + q[:, 1])[:, None], q[:, 2:]], 1).to(torch.int8)
    group_of = rows // (C // groups)
    a = refit_scales(weight[rows], merged, s[rows, 1:].float(), n[rows] - 1, stats, groups, mode, group_of=group_of)
    keep = 24 - int(r_max).bit_length()  # float32 has 24 significant bits; r needs bits(r_max) of them
    mantissa, exponent = torch.frexp(a[:, 0].double())
    a0 = torch.ldexp(torch.round(mantissa * 2**keep), exponent - keep)
    out = scales.clone().float().cpu()
    out[rows, 0] = (a0 * r).float()
    out[rows, 1] = a0.float()
    out[rows, 2:] = a[:, 1:].float()
    return out.to(scales.device)
