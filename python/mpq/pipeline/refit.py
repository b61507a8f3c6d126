"""Stage 5, refit: each layer's final weight at its allocated point counts: the best point
sequence per channel, the scales re-solved jointly (``MultipointConfig.scale_refit``), the bias corrected
(``config.bias_correction``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from mpq.allocate import output_errors
from mpq.calibrate import LayerStats, QuantTarget
from mpq.config import QuantConfig
from mpq.distributed import move_tensors, split_map
from mpq.methods import FittedWeight, WeightQuantizer, corrected_bias
from mpq.methods.groupwise import GroupGrid
from mpq.pipeline.fit import LayerFit, fit_cost, int8_merged_layer
from mpq.pipeline.statistics import Calibrated
from mpq.refit import int8_mergeable_scales, refit_scales

__all__ = ["LayerWeight", "refit_layer", "refit_layers", "best_sequences"]


@dataclass
class LayerWeight:
    """A layer's final quantized weight, ready to become a module."""

    target: QuantTarget
    bits: int
    codes: torch.Tensor  # int8 [C, P, D]
    scales: torch.Tensor  # float32 [C, P]
    counts: torch.Tensor  # int [C]: points in use per channel
    bias: torch.Tensor | None  # the layer's new bias (None: the float layer's own)
    codebook: torch.Tensor | None  # non-uniform levels (companding), None for integer codes
    output_sqnr_db: float  # output signal over the output error of the kept points (calibration H)
    grid: GroupGrid | None = None  # a group-wise grid (mpq.methods.groupwise), None for per-point scales

    @property
    def points(self) -> int:
        return self.codes.shape[1]


def best_sequences(paths, path_errors: torch.Tensor, counts: torch.Tensor):
    """(codes, scales): for each channel, the point sequence of ``paths`` whose output error
    ``path_errors`` [S, C, P] is lowest at the channel's count."""
    C = counts.numel()
    rows = torch.arange(C)
    best = path_errors[:, rows, (counts.long().cpu() - 1).clamp_min(0)].argmin(0)
    codes = torch.stack([c.cpu() for c, _ in paths])[best, rows]
    scales = torch.stack([a.cpu() for _, a in paths])[best, rows]
    return codes.to(paths[0][0].device), scales.to(paths[0][1].device)


def refit_layer(
    fit: LayerFit, counts: torch.Tensor, stats: LayerStats, cfg: QuantConfig, method: WeightQuantizer
) -> LayerWeight:
    t, n = fit.target, counts
    codes, scales = fit.fitted.codes, fit.fitted.scales
    codebook, new_bias = fit.fitted.codebook, fit.fitted.bias
    errors = fit.errors.errors
    if fit.paths is not None:
        codes, scales = best_sequences(fit.paths, fit.path_errors, n)
    refit = getattr(cfg.options, "scale_refit", "none") if method.multipoint else "none"  # multipoint options
    merge = int8_merged_layer(t, cfg, method)
    if refit != "none":
        scales = refit_scales(t.weight_matrix().float(), codes, scales, n, stats, t.groups, refit)
    if merge:
        mode = refit if refit != "none" else "weight"
        scales = int8_mergeable_scales(t.weight_matrix().float(), codes, scales, n, stats, t.groups, fit.bits, mode)
    if refit != "none" or merge:  # the errors of the scales kept, once
        errors = output_errors(t.weight_matrix().float().cpu(), codes.cpu(), scales.cpu(), stats, t.groups)
    if cfg.bias_correction:  # on the weight each channel finally keeps (after the refit)
        kept = (torch.arange(fit.points)[None, :] < n[:, None]).double() * scales.double().cpu()
        levels = FittedWeight(codes, scales, codebook=codebook, grid=fit.fitted.grid).levels().cpu()
        wq = (kept[:, :, None] * levels).sum(1)
        base = new_bias if new_bias is not None else t.module.bias
        new_bias = corrected_bias(t.weight_matrix().cpu(), wq, base, stats.mean)
    C = codes.shape[0]
    noise = float(errors[torch.arange(C), (n.long() - 1).clamp_min(0)].sum())
    sqnr = float(10 * torch.log10(torch.tensor(max(float(fit.energy.sum()), 1e-30) / max(noise, 1e-30))))
    return LayerWeight(t, fit.bits, codes, scales, n, new_bias, codebook, sqnr, fit.fitted.grid)


def refit_layers(
    fits: list[LayerFit], counts: dict[str, torch.Tensor], cal: Calibrated, cfg: QuantConfig, method: WeightQuantizer
) -> list[LayerWeight]:
    """``refit_layer`` for every layer; under a process group each rank refits its share and
    every rank returns them all."""
    return split_map(
        fits,
        [fit_cost(f.target) for f in fits],
        lambda f: refit_layer(f, counts[f.target.name], cal.stats[f.target.name], cfg, method),
        "refitting",
        strip=lambda w: dataclasses.replace(w, target=None),  # every rank holds the module
        restore=lambda f, w: dataclasses.replace(move_tensors(w, f.target.weight.device), target=f.target),
    )
