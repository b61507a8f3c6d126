"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023, arXiv 2210.17323; the OBQ lineage).

Per layer, with H = E[x x^T] of the calibration inputs (per group for grouped convolutions), the
columns of W are quantized one at a time and the rounding error of each column is spread over
the not yet quantized columns, weighted by the Cholesky factor of H^-1, so that the layer-output
error tr((W - W_q) H (W - W_q)^T) stays small. As in the paper's reference implementation:
dampening of ``config.gptq_damp`` (1%) of the mean diagonal of H, the upper Cholesky factor of
H^-1, lazy batch updates in blocks of 128 columns, optional act-order (columns in decreasing
order of diag(H)), and a per-channel symmetric grid whose scale is fixed from the full-precision
weight before the sweep (``config.rtn_range``: min-max or MSE-optimal).

One departure: the reference zeroes the columns whose input is always zero on the calibration
data ("dead" inputs). mpq rounds them to nearest instead (their H row is decoupled, so they
neither receive nor spread error): the same calibration error, and no change of the layer when
such an input is non-zero on other data.
"""
from __future__ import annotations

import torch

from mpq.methods.base import FittedWeight, LayerContext, WeightQuantizer, register
from mpq.methods.uniform import channel_scales, grid_max, layer_hessian

__all__ = ["GPTQQuantizer", "gptq_factor", "gptq_quantize"]

BLOCK = 128


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1 per group, float64 [G, D, D].
    NB: calibration H can be singular (fewer rows than D, constant inputs); if the damped matrix
    still fails to factor, the dampening grows tenfold until it does."""
    G, D, _ = H.shape
    eye = torch.eye(D, dtype=H.dtype)
    mean_diag = H.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(H + (damp * mean_diag)[:, None, None] * eye)
        if not bool((info != 0).any()):
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if not bool((info != 0).any()):
                return U
        damp = max(damp * 10, 1e-6)
    raise RuntimeError("mpq.methods.gptq: the layer's input second moment could not be factored")


def gptq_factor(H: torch.Tensor, damp: float = 0.01, act_order: bool = False):
    """What the column sweep needs from H [G, D, D], computed once per layer and reusable for
    several sweeps (multipoint + GPTQ runs one per point): (U [G, D, D], column order [G, D] or None)."""
    H = H.double().cpu().clone()
    diag = H.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    diag[dead] = 1.0  # a dead input's column is decoupled: rounded to nearest, no error spread
    perm = None
    if act_order:
        perm = torch.argsort(diag, dim=-1, descending=True)  # [G, D]
        H = torch.gather(torch.gather(H, 1, perm[:, :, None].expand_as(H)), 2, perm[:, None, :].expand_as(H))
    return _inverse_cholesky(H, damp), perm


def gptq_quantize(
    w: torch.Tensor, H: torch.Tensor, scale: torch.Tensor, bits: int, damp: float = 0.01, act_order: bool = False,
    factor=None,
) -> torch.Tensor:
    """GPTQ codes of ``w``.

    Args:
        w (Tensor[C, D]): the weight; rows are split into G = H.shape[0] consecutive groups.
        H (Tensor[G, D, D], float64): E[x x^T] of each group's inputs.
        scale (Tensor[C]): per-row grid scale (fixed before the sweep).
        bits: code width; grid -K..K.
        damp: dampening as a fraction of the mean diagonal of H.
        act_order: quantize columns in decreasing order of diag(H).
        factor: ``gptq_factor(H, damp, act_order)`` when already computed.

    Returns:
        codes (Tensor[C, D], int8) with w ~ scale[:, None] * codes.
    """
    G, D, _ = H.shape
    C = w.shape[0]
    if C % G or w.shape[1] != D:
        raise ValueError(f"mpq.methods.gptq: expected w [C, {D}] with C divisible by {G}, got {tuple(w.shape)}")
    K = grid_max(bits)
    W = w.double().cpu().reshape(G, C // G, D).clone()
    s = scale.double().cpu().reshape(G, C // G, 1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    U, perm = factor if factor is not None else gptq_factor(H, damp, act_order)
    if perm is not None:
        W = torch.gather(W, 2, perm[:, None, :].expand_as(W))
    Q = torch.zeros_like(W)
    for i1 in range(0, D, BLOCK):
        i2 = min(i1 + BLOCK, D)
        W1 = W[:, :, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = W1[:, :, i]  # [G, R]
            q = torch.clamp(torch.round(col / safe[:, :, 0]), -K, K)
            Q[:, :, i1 + i] = q
            err = (col - q * s[:, :, 0]) / U1[:, i, i][:, None]
            W1[:, :, i:] -= err[:, :, None] * U1[:, None, i, i:]
            E1[:, :, i] = err
        W[:, :, i2:] -= torch.bmm(E1, U[:, i1:i2, i2:])
    if perm is not None:
        Q = torch.empty_like(Q).scatter_(2, perm[:, None, :].expand_as(Q), Q)
    Q = torch.where(s > 0, Q, torch.zeros_like(Q))
    return Q.reshape(C, D).to(torch.int8)


@register
class GPTQQuantizer(WeightQuantizer):
    """GPTQ, one point per channel (``config.gptq_damp``, ``config.gptq_act_order``, scale rule
    ``config.rtn_range``)."""

    name = "gptq"

    def fit(self, ctx: LayerContext) -> FittedWeight:
        return gptq_fit(ctx.weight, ctx.stats, ctx.target.groups, ctx.bits, ctx.config)


def gptq_fit(w: torch.Tensor, stats, groups: int, bits: int, config) -> FittedWeight:
    """One GPTQ point for ``w`` [C, D] from the layer's calibration statistics."""
    scale = channel_scales(w, bits, config.rtn_range)
    codes = gptq_quantize(w, layer_hessian(stats, groups), scale, bits, config.gptq_damp, config.gptq_act_order)
    return FittedWeight(codes[:, None, :], scale.float()[:, None])
