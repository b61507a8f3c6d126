"""OCS: outlier channel splitting (Zhao, Hu, Dotzel, De Sa, Zhang, "Improving Neural Network
Quantization without Retraining using Outlier Channel Splitting", ICML 2019, arXiv 1901.09504).

OCS widens a layer: it repeatedly takes the input channel holding the largest |w| of the layer,
halves its large weights and appends a duplicate channel carrying the other halves (the layer's
input channel is duplicated to feed it, so the function is unchanged), until
``ceil(expand_ratio * C_in)`` channels were added; the halved outliers shrink the quantization
range, and the widened weight is then rounded to nearest. As in the authors' reference code
(cornell-zhang/dnn-quant-ocs, ``ocs_wts``), within a split channel only the weights above
``split_threshold`` (0.5) times the channel's maximum are halved (the others stay whole in the
original copy, zero in the duplicate), a channel may be split again, and the optional
quantization-aware split (``OCSConfig.grid_aware``) makes the halves w/2 - s/4 and w/2 + s/4 so
that their rounded sum equals round(w / s). Differences: the threshold uses max |w| of the channel
(the reference uses the signed max), the grid is per output channel (``config.rtn_range``, like
every mpq method; the paper used per-tensor grids with clipping), and for grouped convolutions
the split acts on the weight's input axis (C_in / groups), as the reference code does.

mpq's layers keep their input width, so the split is folded back: the deployed layer holds the
effective weight, each original column being the sum of the quantized values of all its pieces.
This simulates OCS's accuracy faithfully: the widened OCS layer computes exactly
``sum_pieces a_j q_piece x_c`` = (folded weight) . x. All pieces of a row share the row's scale
a_j, so the folded codes q_1 + q_2 (+ ...) lie in [-m K, m K] for a column split m - 1 times; they
are stored as nested points with equal scales: point 1 = clip(sum, -K, K), point 2 = the rest
(clipped again if needed), and a channel gets a second point only where its folded codes leave the
b-bit range.

Bit accounting (honest, two numbers): ``mpq.quantize``'s report and ``mpq.model_size_bytes``
count what the deployed mpq layer stores: b bits per code of every point in use (a whole row of D
codes for a channel's second point) plus one scale per point. OCS's own widened layer would
store ``(C_in/groups + n_split) * kh * kw`` codes per output channel and one scale:
``ocs_nominal_bits`` gives that figure, reported beside it by ``benchmarks/compare_methods.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from mpq.layout import SCALE_BITS, point_bits
from mpq.methods.base import FittedWeight, LayerContext, MethodConfig, WeightQuantizer, register
from mpq.methods.uniform import channel_scales, grid_max, round_to_grid

__all__ = ["OCSQuantizer", "ocs_split", "ocs_fold_codes", "ocs_nominal_bits", "ocs_num_split"]


def ocs_num_split(in_channels: int, expand_ratio: float) -> int:
    """Channels OCS appends to an input axis of ``in_channels``: ceil(expand_ratio * in_channels)."""
    return int(math.ceil(expand_ratio * in_channels - 1e-9))


def ocs_nominal_bits(
    out_channels: int, in_channels: int, kernel: int, bits: int, expand_ratio: float, scale_bits: int = SCALE_BITS
) -> float:
    """Bits per original weight of OCS's widened layer: one point per output channel of
    (C_in + n_split) * k codes and a scale, over C_in * k weights (C_in = input channels per group,
    k = kh * kw)."""
    width = in_channels + ocs_num_split(in_channels, expand_ratio)
    return out_channels * point_bits(width * kernel, bits, scale_bits) / (out_channels * in_channels * kernel)


def ocs_split(
    w: torch.Tensor, expand_ratio: float, split_threshold: float = 0.5
) -> tuple[torch.Tensor, list[int], list[tuple[int, torch.Tensor]]]:
    """Split the input channels of ``w`` [C, I, k] (k = kh * kw; 1 for a linear layer).

    Returns the widened weight [C, I + n, k], the original channel of every widened channel, and
    the splits in order as (split channel, mask of its halved weights [C, k])."""
    W = w.double().clone()
    I = W.shape[1]
    origin = list(range(I))
    splits: list[tuple[int, torch.Tensor]] = []
    for _ in range(ocs_num_split(I, expand_ratio)):
        idx = int(W.abs().amax(dim=(0, 2)).argmax())
        col = W[:, idx].clone()  # NB: W[:, idx] is overwritten below
        mask = col.abs() > split_threshold * col.abs().max()
        W[:, idx] = torch.where(mask, col / 2, col)
        W = torch.cat([W, torch.where(mask, col / 2, torch.zeros_like(col))[:, None]], dim=1)
        origin.append(origin[idx])
        splits.append((idx, mask))
    return W, origin, splits


def _grid_aware(w: torch.Tensor, splits: list[tuple[int, torch.Tensor]], scale: torch.Tensor) -> torch.Tensor:
    """Replay the splits on ``w`` [C, I, k] with quantization-aware halves w/2 -+ scale/4."""
    W = w.double().clone()
    q = (scale.double() / 4)[:, None]
    for idx, mask in splits:
        col = W[:, idx].clone()  # NB: W[:, idx] is overwritten below
        W[:, idx] = torch.where(mask, col / 2 - q, col)
        W = torch.cat([W, torch.where(mask, col / 2 + q, torch.zeros_like(col))[:, None]], dim=1)
    return W


def ocs_fold_codes(
    codes_wide: torch.Tensor, origin: list[int], in_channels: int, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold widened codes [C, I + n, k] back to the I original channels and split the sums into
    nested points of the b-bit grid: codes int8 [C, P, I * k] and points in use per channel int32 [C]."""
    C, _, k = codes_wide.shape
    K = grid_max(bits)
    total = torch.zeros(C, in_channels, k, dtype=torch.float64)
    total.index_add_(1, torch.tensor(origin), codes_wide.double())
    total = total.reshape(C, in_channels * k)
    need = torch.ceil(total.abs().amax(dim=1) / K).clamp_min(1).to(torch.int32)
    points, rest = [], total
    for _ in range(int(need.max())):
        p = torch.clamp(rest, -K, K)
        points.append(p)
        rest = rest - p
    return torch.stack(points, dim=1).to(torch.int8), need


@dataclass(frozen=True)
class OCSConfig(MethodConfig):
    """OCS's options: split ``expand_ratio`` of the input channels, halving the weights above
    ``split_threshold`` times the split channel's maximum; quantization-aware halves when
    ``grid_aware``."""

    expand_ratio: float = 0.05
    split_threshold: float = 0.5
    grid_aware: bool = False

    legacy_fields: ClassVar[dict[str, str]] = {
        "ocs_expand_ratio": "expand_ratio",
        "ocs_split_threshold": "split_threshold",
        "ocs_grid_aware": "grid_aware",
    }

    def check(self) -> None:
        self._check_number("expand_ratio", "in (0, 1]", lambda v: 0 < v <= 1)
        self._check_number("split_threshold", "in [0, 1)", lambda v: 0 <= v < 1)
        self._check_bool("grid_aware")


@register
class OCSQuantizer(WeightQuantizer):
    """Outlier channel splitting (``OCSConfig``) then round to nearest, folded back to the layer's
    width as equal-scale points (see the module docstring for the bit accounting)."""

    name = "ocs"
    config_type = OCSConfig

    def fit(self, ctx: LayerContext) -> FittedWeight:
        cfg = ctx.config
        C, D = ctx.weight.shape
        I = ctx.target.module.weight.shape[1]  # input channels per group (in_features for Linear)
        w3 = ctx.weight.double().cpu().reshape(C, I, D // I)
        opts: OCSConfig = cfg.options
        wide, origin, splits = ocs_split(w3, opts.expand_ratio, opts.split_threshold)
        scale = channel_scales(wide.reshape(C, -1), ctx.bits, cfg.rtn_range).cpu()
        if opts.grid_aware:
            wide = _grid_aware(w3, splits, scale)
        codes_wide = round_to_grid(wide, scale, ctx.bits)
        codes, points = ocs_fold_codes(codes_wide, origin, I, ctx.bits)
        scales = scale.float()[:, None].expand(C, codes.shape[1]).contiguous()
        return FittedWeight(codes, scales, num_points=points)
