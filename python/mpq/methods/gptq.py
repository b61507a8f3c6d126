"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023, arXiv 2210.17323; the OBQ lineage).

Per layer, with H = E[x x^T] of the calibration inputs (per group for grouped convolutions), the
columns of W are quantized one at a time and the rounding error of each column is spread over
the not yet quantized columns, weighted by the Cholesky factor of H^-1, so that the layer-output
error tr((W - W_q) H (W - W_q)^T) stays small. As in the paper's reference implementation:
dampening of ``GPTQConfig.damp`` (1%) of the mean diagonal of H, the upper Cholesky factor of
H^-1, lazy batch updates in blocks of 128 columns, optional act-order (columns in decreasing
order of diag(H)), and a per-channel symmetric grid whose scale is fixed from the full-precision
weight before the sweep (``config.rtn_range``: min-max or MSE-optimal).

A layer whose whole H exceeds ``config.hessian_budget_mb`` (e.g. D = 65536 in an audio model's
1024-channel 64 x 1 convolution: 32 GiB) departs further, logged once with the layer's name:
blockwise GPTQ (``gptq_block_factors``, ``gptq_quantize_blocked``). Its columns are swept in
blocks of B, each with the factor of its own diagonal block of the damped H (formed from the kept
input rows, never the whole H); within a block the error feedback is GPTQ's, and the output error
the finished blocks leave is handed to the next block as a least-squares change of its weights
before its sweep, instead of the full H's update of all later columns. The dampening is the whole
H's (a fraction of the mean of its full diagonal) and act-order sorts all columns before they are
split into blocks, so with one block the result is the full sweep's. Measured on a 512-column
layer with dense input correlations (tests/python/test_memory.py): blocks of 128 columns give
1.19x the full sweep's output error (0.45x of rounding to nearest's; 2.09x without the
compensation across blocks).

Another departure: the reference zeroes the columns whose input is always zero on the calibration
data ("dead" inputs). mpq rounds them to nearest instead (their H row is decoupled, so they
neither receive nor spread error): the same calibration error, and no change of the layer when
such an input is non-zero on other data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mpq.methods.base import FittedWeight, LayerContext, MethodConfig, WeightQuantizer, register
from mpq.methods.groupwise import (
    GroupGrid,
    check_grouping,
    code_range,
    group_params,
    groupwise_grid,
    is_grouped,
)
from mpq.methods.uniform import (
    block_columns,
    channel_scales,
    grid_max,
    hessian_block,
    hessian_fits,
    input_diagonal,
    layer_hessian,
)

__all__ = [
    "GPTQQuantizer",
    "gptq_factor",
    "gptq_quantize",
    "gptq_quantize_groups",
    "gptq_quantize_on_grid",
    "gptq_block_factors",
    "gptq_quantize_blocked",
]

BLOCK = 128


def _inverse_cholesky(H: torch.Tensor, damp: float, mean_diag: torch.Tensor | None = None) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1 per group, float64 [G, D, D]
    (``mean_diag`` [G]: that of a larger H whose diagonal block H is).
    NB: calibration H can be singular (fewer rows than D, constant inputs); if the damped matrix
    still fails to factor, the dampening grows tenfold until it does."""
    if mean_diag is None:
        mean_diag = H.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
    for _ in range(8):
        # (no D x D identity, and each D x D array dropped once used: at most three alive here)
        damped = H.clone()
        damped.diagonal(dim1=-2, dim2=-1).add_((damp * mean_diag)[:, None])
        L, info = torch.linalg.cholesky_ex(damped)
        del damped
        if not bool((info != 0).any()):
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
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


def gptq_block_factors(
    stats, groups: int, damp: float, act_order: bool, block: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The block-diagonal counterpart of ``gptq_factor`` for a layer whose whole H exceeds the
    memory budget: [(columns long [G, B], U [G, B, B])] per block of ``block`` consecutive columns
    (in act-order when ``act_order``), U the upper Cholesky factor of the inverse of that diagonal
    block of the damped H (dampening from the whole diagonal). Memory: G x D x block float64 in
    all, one block's H at a time."""
    diag = input_diagonal(stats)  # [G, D]
    G, D = diag.shape
    if G != groups:
        raise ValueError(f"mpq.methods.gptq: expected statistics with {groups} groups, got {G}")
    dead = diag == 0
    diag[dead] = 1.0  # as gptq_factor: a dead input's column is decoupled
    mean_diag = diag.mean(-1).clamp_min(1e-12)
    if act_order:
        order = torch.argsort(diag, dim=-1, descending=True)
    else:
        order = torch.arange(D).expand(G, D)
    blocks = []
    for i1 in range(0, D, block):
        cols = order[:, i1 : i1 + block].contiguous()
        Hb = hessian_block(stats, cols)
        Hb.diagonal(dim1=-2, dim2=-1)[torch.gather(dead, 1, cols)] = 1.0
        blocks.append((cols, _inverse_cholesky(Hb, damp, mean_diag)))
    return blocks


def gptq_quantize_blocked(
    w: torch.Tensor, blocks, scale: torch.Tensor | None, bits: int, stats=None, grid: GroupGrid | None = None
) -> torch.Tensor:
    """GPTQ codes (int8 [C, D]) of ``w`` [C, D] swept block by block with ``gptq_block_factors``,
    on the per-row symmetric grid of ``scale`` [C], or on the group-wise ``grid`` (fixed before
    the sweep; stored codes).

    Within a block, GPTQ's error feedback; across blocks, with ``stats`` (the layer's calibration
    statistics), the output error r = X_done (W - W_q)_done that the finished blocks leave is
    handed to the next block before its sweep: its weights move by the least-squares
    compensation delta = (H_nn + damp I)^-1 H_n,done (W - W_q)_done (from the kept input rows,
    X_n^T r / N, or the kept Gram matrix's rows of the block), so no rounding error is dropped at a
    block boundary. Without ``stats``: no feedback across blocks."""
    C, D = w.shape
    G = blocks[0][1].shape[0]
    Cg = C // G
    W = w.double().cpu().reshape(G, Cg, D)
    codes = torch.zeros(G, Cg, D, dtype=torch.int8)
    if grid is None:
        K = grid_max(bits)
        S, lo, hi = scale.double().cpu().reshape(G, Cg, 1).expand(G, Cg, D), -K, K
        Z = torch.zeros_like(S)
    else:
        S, Z = (t.cpu().reshape(G, Cg, D) for t in grid.per_weight(D))
        lo, hi = code_range(bits, grid.symmetric)
    samples = None if stats is None or stats.gram is not None else stats.samples.cpu()
    gram = None if stats is None or stats.gram is None else stats.gram.double().cpu()
    r = None  # [N, G, Cg]: X_done (W - W_q)_done per group (kept input rows)
    done: list[torch.Tensor] = []  # the finished blocks' columns (kept Gram matrix)
    err = None if gram is None else torch.zeros(G, Cg, D, dtype=torch.float64)  # W - W_q on the finished columns
    for cols, U in blocks:
        B = cols.shape[1]
        idx = cols[:, None, :].expand(G, Cg, B)
        Wb = torch.gather(W, 2, idx)  # [G, Cg, B]
        target = Wb
        x = None
        if samples is not None:
            x = torch.gather(samples, 2, cols[None].expand(samples.shape[0], G, B)).double()  # [N, G, B]
            if r is not None:
                g = torch.einsum("ngb,ngc->gbc", x, r) / max(1, x.shape[0])  # H_n,done (W - W_q)_done
        elif gram is not None and done:
            prev = torch.cat(done, 1)  # [G, Dd]
            rows = torch.gather(gram, 1, cols[:, :, None].expand(G, B, D))
            Hnd = torch.gather(rows, 2, prev[:, None, :].expand(G, B, prev.shape[1]))  # [G, B, Dd]
            g = torch.bmm(Hnd, torch.gather(err, 2, prev[:, None, :].expand(G, Cg, prev.shape[1])).transpose(1, 2))
        if (samples is not None and r is not None) or (gram is not None and done):
            # (H_nn + damp I)^-1 g, with U^T U = (H_nn + damp I)^-1
            target = Wb + torch.bmm(U.transpose(1, 2), torch.bmm(U, g)).transpose(1, 2)
        Sb, Zb = torch.gather(S, 2, idx), torch.gather(Z, 2, idx)
        q = _sweep(target.clone(), U, _ColumnGrid(Sb, Zb, lo, hi))
        codes.scatter_(2, idx, q.to(torch.int8))
        e = Wb - (q - Zb) * Sb  # the original weights' error on this block
        if x is not None:
            contrib = torch.einsum("ngb,gcb->ngc", x, e)
            r = contrib if r is None else r + contrib
        elif gram is not None:
            err.scatter_(2, idx, e)
            done.append(cols)
    return codes.reshape(C, D)


class _ColumnGrid:
    """The grid each column is rounded on during a sweep, as per-weight scale and zero, float64
    [G, R, D] in the sweep's column order: fixed before the sweep (``dynamic`` None), or, for a
    group-wise grid swept in natural order (``dynamic`` = (group size, bits, symmetric, scale
    rule)), chosen from the weights as they stand when the sweep reaches a group's first column
    (error feedback included), as GPTQ's reference does without ``static_groups``."""

    def __init__(self, S: torch.Tensor, Z: torch.Tensor, lo: int, hi: int, dynamic=None):
        self.S, self.Z, self.lo, self.hi, self.dynamic = S, Z, lo, hi, dynamic

    def column(self, c: int, W1: torch.Tensor, i: int, W: torch.Tensor, i2: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(stored codes, their values) of column ``c`` (``W1[:, :, i]``, the block's current
        weights; ``W[:, :, i2:]`` the later columns)."""
        if self.dynamic is not None and c % self.dynamic[0] == 0:
            size, bits, symmetric, rule = self.dynamic
            cur = torch.cat([W1[:, :, i:], W[:, :, i2:]], 2)[:, :, :size]
            G, R, n = cur.shape
            sc, z = group_params(cur.reshape(G * R, n), bits, symmetric, rule)
            self.S[:, :, c : c + n] = sc.reshape(G, R, 1)
            self.Z[:, :, c : c + n] = z.reshape(G, R, 1)
        s, z = self.S[:, :, c], self.Z[:, :, c]
        col = W1[:, :, i]
        safe = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.where(s > 0, torch.clamp(torch.round(col / safe) + z, self.lo, self.hi), z)
        return q, (q - z) * s


def _sweep(W: torch.Tensor, U: torch.Tensor, grid: _ColumnGrid) -> torch.Tensor:
    """GPTQ's column sweep of ``W`` [G, R, D] (columns in sweep order; changed in place) with the
    upper Cholesky factor ``U`` [G, D, D] of H^-1: stored codes float64 [G, R, D]."""
    D = W.shape[2]
    Q = torch.zeros_like(W)
    for i1 in range(0, D, BLOCK):
        i2 = min(i1 + BLOCK, D)
        W1 = W[:, :, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            q, value = grid.column(i1 + i, W1, i, W, i2)
            Q[:, :, i1 + i] = q
            err = (W1[:, :, i] - value) / U1[:, i, i][:, None]
            W1[:, :, i:] -= err[:, :, None] * U1[:, None, i, i:]
            E1[:, :, i] = err
        W[:, :, i2:] -= torch.bmm(E1, U[:, i1:i2, i2:])
    return Q


def _in_groups(w: torch.Tensor, H: torch.Tensor | None, factor) -> tuple[torch.Tensor, int]:
    G, D, _ = (H if H is not None else factor[0]).shape
    C = w.shape[0]
    if C % G or w.shape[1] != D:
        raise ValueError(f"mpq.methods.gptq: expected w [C, {D}] with C divisible by {G}, got {tuple(w.shape)}")
    return w.double().cpu().reshape(G, C // G, D).clone(), G


def _permuted(t: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    return t if perm is None else torch.gather(t, 2, perm[:, None, :].expand_as(t))


def _unpermuted(t: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    return t if perm is None else torch.empty_like(t).scatter_(2, perm[:, None, :].expand_as(t), t)


def gptq_quantize(
    w: torch.Tensor,
    H: torch.Tensor | None,
    scale: torch.Tensor,
    bits: int,
    damp: float = 0.01,
    act_order: bool = False,
    factor=None,
) -> torch.Tensor:
    """GPTQ codes of ``w``.

    Args:
        w (Tensor[C, D]): the weight; rows are split into G = H.shape[0] consecutive groups.
        H (Tensor[G, D, D], float64): E[x x^T] of each group's inputs (None when ``factor`` is given).
        scale (Tensor[C]): per-row grid scale (fixed before the sweep).
        bits: code width; grid -K..K.
        damp: dampening as a fraction of the mean diagonal of H.
        act_order: quantize columns in decreasing order of diag(H).
        factor: ``gptq_factor(H, damp, act_order)`` when already computed.

    Returns:
        codes (Tensor[C, D], int8) with w ~ scale[:, None] * codes.
    """
    W, G = _in_groups(w, H, factor)
    K = grid_max(bits)
    S = scale.double().cpu().reshape(G, -1, 1).expand_as(W)
    U, perm = factor if factor is not None else gptq_factor(H, damp, act_order)
    Q = _sweep(_permuted(W, perm), U, _ColumnGrid(S, torch.zeros_like(S), -K, K))
    return _unpermuted(Q, perm).reshape(w.shape).to(torch.int8)


def gptq_quantize_groups(
    w: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    rule: str,
    damp: float = 0.01,
    act_order: bool = False,
) -> tuple[torch.Tensor, GroupGrid]:
    """GPTQ on a group-wise grid (``mpq.methods.groupwise``): (stored codes int8 [C, D], grid).

    In natural column order each group's scale (and zero) is chosen when the sweep reaches the
    group, from the weights with the error feedback they have received (GPTQ's reference,
    ``static_groups=False``). With ``act_order`` the groups' grids are fixed from the original
    weight before the sweep (the reference's ``static_groups=True``): the groups stay consecutive
    in the stored layout, with no per-column group index (``g_idx``), as the fast int4 kernels
    (vLLM, exllama) require; the columns are still swept in decreasing diag(H) order."""
    C, D = w.shape
    if act_order:
        grid = groupwise_grid(w, bits, group_size, symmetric, rule)
        return gptq_quantize_on_grid(w, H, grid, bits, damp, act_order), grid
    W, G = _in_groups(w, H, None)
    U, _ = gptq_factor(H, damp, False)
    g = D if group_size <= 0 else min(group_size, D)
    lo, hi = code_range(bits, symmetric)
    S, Z = torch.zeros_like(W), torch.zeros_like(W)
    Q = _sweep(W, U, _ColumnGrid(S, Z, lo, hi, dynamic=(g, bits, symmetric, rule)))
    scales = S.reshape(C, D)[:, ::g].float()
    zeros = None if symmetric else Z.reshape(C, D)[:, ::g].to(torch.int8)
    return Q.reshape(C, D).to(torch.int8), GroupGrid(g, scales, zeros)


def gptq_quantize_on_grid(
    w: torch.Tensor,
    H: torch.Tensor | None,
    grid: GroupGrid,
    bits: int,
    damp: float = 0.01,
    act_order=False,
    factor=None,
) -> torch.Tensor:
    """GPTQ codes (stored, int8 [C, D]) of ``w`` on a group-wise grid fixed before the sweep."""
    W, G = _in_groups(w, H, factor)
    U, perm = factor if factor is not None else gptq_factor(H, damp, act_order)
    s, z = grid.per_weight(w.shape[1])
    lo, hi = code_range(bits, grid.symmetric)
    S, Z = (_permuted(t.cpu().reshape(W.shape), perm) for t in (s, z))
    Q = _sweep(_permuted(W, perm), U, _ColumnGrid(S, Z, lo, hi))
    return _unpermuted(Q, perm).reshape(w.shape).to(torch.int8)


@dataclass(frozen=True)
class GPTQConfig(MethodConfig):
    """GPTQ's options: dampening ``damp`` of the mean diagonal of H (the paper's 1%); columns in
    decreasing diag(H) order when ``act_order``; ``group_size`` and ``symmetric`` as
    ``RTNConfig``'s (a group-wise grid when group_size > 0 or symmetric is False:
    ``gptq_quantize_groups``)."""

    damp: float = 0.01
    act_order: bool = False
    group_size: int = 0
    symmetric: bool = True

    legacy_fields: ClassVar[dict[str, str]] = {"gptq_damp": "damp", "gptq_act_order": "act_order"}

    def check(self) -> None:
        self._check_number("damp", "in (0, 1]", lambda v: 0 < v <= 1)
        self._check_bool("act_order")
        check_grouping(self)


@register
class GPTQQuantizer(WeightQuantizer):
    """GPTQ, one point per channel (``GPTQConfig``; scale rule ``config.rtn_range``)."""

    name = "gptq"
    config_type = GPTQConfig

    def fit(self, ctx: LayerContext) -> FittedWeight:
        return gptq_fit(
            ctx.weight, ctx.stats, ctx.target.groups, ctx.bits, ctx.config, getattr(ctx.target, "name", "?")
        )


def gptq_fit(w: torch.Tensor, stats, groups: int, bits: int, config, name: str = "?") -> FittedWeight:
    """One GPTQ point for ``w`` [C, D] from the layer's calibration statistics (block-diagonal H
    when the whole H exceeds ``config.hessian_budget_mb``), on the per-channel grid or, with
    ``GPTQConfig.group_size`` / ``symmetric=False``, a group-wise one."""
    opts: GPTQConfig = config.options
    if is_grouped(opts):
        return _gptq_fit_groups(w, stats, groups, bits, config, name)
    scale = channel_scales(w, bits, config.rtn_range)
    if hessian_fits(stats, groups, config.hessian_budget_mb):
        codes = gptq_quantize(w, layer_hessian(stats, groups), scale, bits, opts.damp, opts.act_order)
    else:
        block = block_columns(stats, groups, config.hessian_budget_mb, name)
        blocks = gptq_block_factors(stats, groups, opts.damp, opts.act_order, block)
        codes = gptq_quantize_blocked(w, blocks, scale, bits, stats)
    return FittedWeight(codes[:, None, :], scale.float()[:, None])


def _gptq_fit_groups(w: torch.Tensor, stats, groups: int, bits: int, config, name: str) -> FittedWeight:
    opts: GPTQConfig = config.options
    args = (opts.group_size, opts.symmetric, config.rtn_range)
    if hessian_fits(stats, groups, config.hessian_budget_mb):
        H = layer_hessian(stats, groups)
        codes, grid = gptq_quantize_groups(w, H, bits, *args, opts.damp, opts.act_order)
    else:  # blockwise GPTQ: the groups' grids fixed before the sweep, as with act-order
        grid = groupwise_grid(w, bits, *args)
        block = block_columns(stats, groups, config.hessian_budget_mb, name)
        blocks = gptq_block_factors(stats, groups, opts.damp, opts.act_order, block)
        codes = gptq_quantize_blocked(w, blocks, None, bits, stats, grid)
    return FittedWeight(codes[:, None, :], torch.ones(codes.shape[0], 1), grid=grid)
