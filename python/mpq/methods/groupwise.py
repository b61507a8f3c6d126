"""Group-wise grids: the 4-bit weight format of GPTQ / AWQ checkpoints, torchao's int4 weight-only
and NNCF's weight compression, as a peer of multipoint at equal memory (docs/ALGORITHM.md section 6).

The D input weights of an output channel (a convolution's flattened in/groups x kh x kw) are cut
into groups of ``group_size`` consecutive weights (the last group shorter when the size does not
divide D; ``group_size`` 0 or >= D: one group per channel), each with its own float16 scale and,
for an asymmetric grid, its own b-bit zero point:

    w[j, d] = scale[j, g] * (code[j, d] - zero[j, g]),   g = d // group_size

Codes and zero points are stored as signed b-bit integers: symmetric codes -K..K (K = 2^(b-1) - 1,
the project's grid) with zero 0; asymmetric codes and zeros -2^(b-1)..2^(b-1) - 1 (the unsigned
0..2^b - 1 of GPTQ's format minus 2^(b-1), the same weights). Bits per weight, as stored:
b + 16 / group_size (+ b / group_size asymmetric): 4.125 bits for symmetric int4 g128, 4.156 for
asymmetric g128, 4.5 symmetric g32.

Scales are chosen per group by ``QuantConfig.rtn_range``: ``"minmax"`` (max |w| / K; asymmetric:
the group's min and max) or ``"mse"`` (symmetric: the exact MSE-optimal scale, the first greedy
point of ``mpq::fit_multipoint``; asymmetric: the clipping range shrunk in 1% steps down to 20%
of min/max, keeping the lowest squared error, as GPTQ's reference ``find_params(mse=True)`` does
with norm 2). Every scale is rounded to float16 before its codes are chosen, so the codes fit the
scale that is stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpq import ops
from mpq.layout import group_count

__all__ = [
    "GroupGrid",
    "groupwise_grid",
    "groupwise_codes",
    "group_params",
    "check_grouping",
    "is_grouped",
]

SHRINK_STEPS = 100  # asymmetric MSE search: clipping ranges p * [min, max], p = 1, 0.99, ..., 0.2
MAX_SHRINK = 0.8


def check_grouping(cfg) -> None:
    """A method config's ``group_size`` (0: per channel, else at least 2 weights per group) and
    ``symmetric`` fields (``MethodConfig.check``)."""
    cfg._check_int("group_size", 0)
    if cfg.group_size == 1:
        cfg._fail("group_size", "to be 0 (one scale per output channel) or an int >= 2")
    cfg._check_bool("symmetric")


def is_grouped(cfg) -> bool:
    """Whether a method config asks for the group-wise grid (group_size > 0 or asymmetric) rather
    than the per-channel symmetric grid with a float32 scale."""
    return cfg.group_size > 0 or not cfg.symmetric


@dataclass
class GroupGrid:
    """A layer's group-wise grid: ``scales`` float32 [C, G] (float16 values), ``zeros`` int8
    [C, G] in the codes' signed range (None: symmetric, all zero), groups of ``size`` consecutive
    input weights (0: one group per channel); ``input_scales`` float32 [conv groups, in/groups]
    (float16 values, AWQ's s): the weights of input channel c are divided by it, None: all 1."""

    size: int
    scales: torch.Tensor
    zeros: torch.Tensor | None
    input_scales: torch.Tensor | None = None

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def per_weight(self, D: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) of every weight, float64 [C, D] each."""
        g = D if self.size <= 0 else self.size
        idx = torch.arange(D, device=self.scales.device) // g
        s = self.scales.double()[:, idx]
        z = torch.zeros_like(s) if self.zeros is None else self.zeros.double()[:, idx]
        return s, z

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        """The weight the codes [C, D] (or [C, 1, D]) stand for: scale * (code - zero), divided by
        the input channel's scale, float64 [C, D]."""
        c = codes.reshape(codes.shape[0], -1).double()
        s, z = self.per_weight(c.shape[1])
        v = s.to(c.device) * (c - z.to(c.device))
        if self.input_scales is None:
            return v
        G, cin = self.input_scales.shape
        per_column = self.input_scales.double().repeat_interleave(c.shape[1] // cin, 1)  # [G, D]
        return v / per_column.repeat_interleave(c.shape[0] // G, 0).to(c.device)


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """(lowest, highest) stored code: -K..K symmetric, -2^(b-1)..2^(b-1) - 1 asymmetric."""
    h = 2 ** (bits - 1)
    return (-(h - 1), h - 1) if symmetric else (-h, h - 1)


def _symmetric_scales(x: torch.Tensor, bits: int, rule: str) -> torch.Tensor:
    """Per row of ``x`` [R, n]: the symmetric grid's scale, float64 [R] (before float16 rounding)."""
    if rule == "minmax":
        return x.double().abs().amax(dim=1) / (2 ** (bits - 1) - 1)
    _, scales, _ = ops.fit_multipoint(x.float().contiguous().cpu(), bits, 1, True)
    return scales[:, 0].double().to(x.device)


def _asymmetric_params(x: torch.Tensor, bits: int, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``x`` [R, n]: (float16-valued scale, integer zero in 0..2^b - 1), float64 [R]
    each, of the asymmetric grid whose range is [min, max] (``"minmax"``) or the shrunk range of
    lowest squared error (``"mse"``)."""
    x = x.double()
    maxq = 2**bits - 1
    lo0, hi0 = x.amin(1).clamp(max=0), x.amax(1).clamp(min=0)
    best_s = best_z = best_err = None
    steps = 1 if rule == "minmax" else int(MAX_SHRINK * SHRINK_STEPS) + 1
    for i in range(steps):
        p = 1 - i / SHRINK_STEPS
        lo, hi = p * lo0, p * hi0
        s = ((hi - lo) / maxq).half().double()
        safe = torch.where(s > 0, s, torch.ones_like(s))
        z = torch.clamp(torch.round(-lo / safe), 0, maxq)
        q = torch.clamp(torch.round(x / safe[:, None]) + z[:, None], 0, maxq)
        err = (safe[:, None] * (q - z[:, None]) - x).square().sum(1)
        err = torch.where(s > 0, err, x.square().sum(1))
        if best_err is None:
            best_s, best_z, best_err = s, z, err
        else:
            better = err < best_err
            best_s, best_z, best_err = (
                torch.where(better, s, best_s),
                torch.where(better, z, best_z),
                torch.where(better, err, best_err),
            )
    return best_s, best_z


def group_params(x: torch.Tensor, bits: int, symmetric: bool, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``x`` [R, n] (one group each): (scale, stored zero), float64 [R] each; the scale
    holds a float16 value, the zero is 0 (symmetric) or in -2^(b-1)..2^(b-1) - 1."""
    if symmetric:
        s = _symmetric_scales(x, bits, rule).half().double()
        return s, torch.zeros_like(s)
    s, z = _asymmetric_params(x, bits, rule)
    return s, z - 2 ** (bits - 1)


def round_to_groups(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Stored codes clamp(round(w / s) + z) of ``w`` with per-weight scale and zero (same shapes),
    float64; the zero where the scale is 0."""
    lo, hi = code_range(bits, symmetric)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.clamp(torch.round(w.double() / safe) + z, lo, hi)
    return torch.where(s > 0, q, z)


def groupwise_grid(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, rule: str) -> GroupGrid:
    """The grid of every group of ``w`` [C, D] from the weights themselves (round to nearest; GPTQ
    with act-order's static groups)."""
    C, D = w.shape
    g = D if group_size <= 0 else min(group_size, D)
    G = group_count(D, g)
    scales = torch.empty(C, G, dtype=torch.float64, device=w.device)
    zeros = torch.empty(C, G, dtype=torch.float64, device=w.device)
    full = D // g
    if full:
        s, z = group_params(w[:, : full * g].reshape(C * full, g), bits, symmetric, rule)
        scales[:, :full], zeros[:, :full] = s.reshape(C, full), z.reshape(C, full)
    if full < G:  # the shorter last group
        s, z = group_params(w[:, full * g :], bits, symmetric, rule)
        scales[:, full], zeros[:, full] = s, z
    return GroupGrid(g, scales.float(), None if symmetric else zeros.to(torch.int8))


def groupwise_codes(w: torch.Tensor, grid: GroupGrid, bits: int) -> torch.Tensor:
    """Round to nearest on ``grid``: stored codes int8 [C, D] of ``w`` [C, D]."""
    s, z = grid.per_weight(w.shape[1])
    return round_to_groups(w, s.to(w.device), z.to(w.device), bits, grid.symmetric).to(torch.int8)
