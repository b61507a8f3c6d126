"""Stage 3, fit: the per-channel weights of the output errors (Fisher sensitivity), then every
layer fitted once by the configured method with up to ``max_points`` points (the first k points
are the k-point fit; two where ``MultipointConfig.int8_merge`` makes each channel one int8 row),
with the output error of each channel at each point count."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from mpq.allocate import LayerErrors, output_energy, output_errors
from mpq.calibrate import QuantTarget, fisher_sensitivity
from mpq.config import QuantConfig
from mpq.distributed import move_tensors, split_map
from mpq.layout import point_bits
from mpq.methods import FittedWeight, LayerContext, WeightQuantizer
from mpq.pipeline.prepare import Prepared
from mpq.pipeline.statistics import Calibrated, layer_a_bits

logger = logging.getLogger("mpq")

__all__ = ["LayerFit", "layer_sensitivity", "fit_layers", "int8_merged_layer"]


@dataclass
class LayerFit:
    """One layer's fit: its points, their output errors and what the allocation weighs them by."""

    target: QuantTarget
    weight: torch.Tensor  # [C, D] float32, BatchNorm folded
    bits: int  # code width
    fitted: FittedWeight  # codes [C, P, D], scales [C, P], optional bias / counts / alternatives / codebook
    errors: LayerErrors  # output error per channel and point count, cost, sensitivity
    energy: torch.Tensor  # [C] float64: the channels' output energy (SQNR)
    # Point sequences [(codes, scales)] (the fit's own first) and their output errors [S, C, P],
    # when the method offers alternatives: each channel keeps the best at its allocated count.
    paths: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    path_errors: torch.Tensor | None = None
    seconds: float = 0.0

    @property
    def points(self) -> int:
        return self.fitted.codes.shape[1]


def int8_merged_layer(t: QuantTarget, cfg: QuantConfig, method: WeightQuantizer) -> bool:
    """Whether ``MultipointConfig.int8_merge`` applies to the layer: a multipoint fit of a layer
    that runs on the CPU's int8 rows (8-bit or fewer activations, not a depthwise convolution:
    those have their own kernel, which gains nothing from merged points)."""
    if not (method.multipoint and getattr(cfg.options, "int8_merge", False)):
        return False
    a_bits = layer_a_bits(t, cfg)
    depthwise = t.kind != "linear" and t.groups > 1 and t.module.weight.shape[1] == 1
    return a_bits is not None and a_bits <= 8 and not depthwise


def max_points_of(t: QuantTarget, cfg: QuantConfig, method: WeightQuantizer) -> int:
    """The points a layer is fitted with: one for the first and last layers (8-bit, one point),
    at most two where int8_merge makes each channel's points one int8 row (a third point would be
    a further int8 column added in float before the output is requantized, which takes the whole
    layer off oneDNN's fused uint8-output path: benchmarks/NOTES.md), else ``max_points``."""
    if t.role != "inner":
        return 1
    return min(cfg.max_points, 2) if int8_merged_layer(t, cfg, method) else cfg.max_points


def layer_sensitivity(
    prep: Prepared, cal: Calibrated, cfg: QuantConfig, method: WeightQuantizer
) -> dict[str, torch.Tensor] | None:
    """Per layer, the weight [C] of each output channel's error in the model's output (diagonal
    Fisher), where the method allocates by it; None: relative sensitivity (1 / layer energy)."""
    if not method.uses_sensitivity or cfg.sensitivity == "relative":
        return None
    output = "gaussian" if cfg.sensitivity == "fisher_gaussian" else "auto"
    indices, batches = prep.batches.first(cfg.sensitivity_batches)
    sensitivity = fisher_sensitivity(prep.model, cal.targets, batches, output, cfg.seed, indices)
    if sensitivity is None:
        logger.info("mpq: the model's output has no floating tensor; using relative sensitivity")
    return sensitivity


def fit_cost(t: QuantTarget) -> float:
    """A layer's fitting work, roughly (C * D for the points, C * D^2 for the output errors)."""
    C, D = t.weight_matrix().shape
    return float(C) * D * (D / t.groups + 64)


def fit_layers(
    cal: Calibrated, cfg: QuantConfig, method: WeightQuantizer, sensitivity: dict[str, torch.Tensor] | None
) -> list[LayerFit]:
    """Every layer fitted; under a process group each rank fits its share of the layers
    (``split_work``) and every rank returns them all."""
    # A method may choose each layer's bit width before fitting (ILP bit allocation).
    chosen_bits = method.choose_bits(cal.targets, cal.stats, cfg, sensitivity)
    return split_map(
        cal.targets,
        [fit_cost(t) for t in cal.targets],
        lambda t: fit_layer(t, cal, cfg, method, sensitivity, chosen_bits),
        "fitting",
        # sent without the module and the weight, which every rank holds
        strip=lambda f: dataclasses.replace(f, target=None, weight=None),
        restore=lambda t, f: dataclasses.replace(
            f,
            target=t,
            weight=t.weight_matrix().to(torch.float32),
            fitted=move_tensors(f.fitted, t.weight.device),
            paths=move_tensors(f.paths, t.weight.device),
        ),
    )


def fit_layer(
    t: QuantTarget,
    cal: Calibrated,
    cfg: QuantConfig,
    method: WeightQuantizer,
    sensitivity: dict[str, torch.Tensor] | None,
    chosen_bits: dict[str, int],
) -> LayerFit:
    tl = time.perf_counter()
    w = t.weight_matrix().to(torch.float32)
    special = t.role != "inner"
    bits = 8 if special else chosen_bits.get(t.name, cfg.w_bits)
    s = cal.stats[t.name]
    fit = method.fit(LayerContext(t, w, s, bits, max_points_of(t, cfg, method), cfg))
    e = output_errors(w.cpu(), fit.levels().cpu(), fit.scales.cpu(), s, t.groups)
    paths = path_errors = None
    if fit.alternatives:  # each channel will keep the sequence that is best at its count
        paths = [(fit.codes, fit.scales)] + list(fit.alternatives)
        path_errors = torch.stack(
            [e] + [output_errors(w.cpu(), c.cpu(), a.cpu(), s, t.groups) for c, a in fit.alternatives]
        )
        e = path_errors.amin(0)
    energy = output_energy(w.cpu(), s, t.groups)
    if sensitivity is not None and t.name in sensitivity:
        sens = sensitivity[t.name].double()
    else:
        sens = torch.full((w.shape[0],), 1.0 / max(float(energy.sum()), 1e-30), dtype=torch.float64)
    errors = LayerErrors(e, w.shape[1], point_bits(w.shape[1], bits, cfg.scale_bits), sens)
    return LayerFit(t, w, bits, fit, errors, energy, paths, path_errors, time.perf_counter() - tl)
