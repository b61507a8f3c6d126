"""Stage 6, swap: each layer's final weight becomes its quantized module (the method's layer
type, with its activation quantizer), put in place of the float layer."""

from __future__ import annotations

import logging

import torch
from torch import nn

from mpq.activation import activation_qparams
from mpq.config import QuantConfig
from mpq.fold import set_submodule
from mpq.methods import WeightQuantizer
from mpq.pipeline.refit import LayerWeight
from mpq.pipeline.report import LayerReport
from mpq.pipeline.statistics import Calibrated, layer_a_bits

logger = logging.getLogger("mpq")

__all__ = ["build_layer", "swap_layer"]


def build_layer(lw: LayerWeight, cal: Calibrated, cfg: QuantConfig, method: WeightQuantizer) -> nn.Module:
    """The quantized module of one layer: weight, bias and activation quantizer set."""
    t = lw.target
    bias = lw.bias if lw.bias is not None else t.module.bias
    q = method.build_module(t, lw.points, lw.bits, bias is not None, lw.codebook, lw.grid)
    C = lw.codes.shape[0]
    q.set_weight(lw.codes.reshape([C, q.max_points] + q.code_shape), lw.scales, lw.counts, bias)
    a_bits = layer_a_bits(t, cfg)
    if a_bits is not None:
        s = cal.input_stats(t.name)  # one quantizer per input tensor
        q.set_act_qparams(*activation_qparams(s.act_values, s.act_min, s.act_max, a_bits, cfg.act_range))
    q.output_sqnr_db = lw.output_sqnr_db
    return q


def swap_layer(model: nn.Module, lw: LayerWeight, q: nn.Module, fit_seconds: float) -> LayerReport:
    """Puts ``q`` in place of ``lw``'s float layer in ``model``; its line of the report."""
    set_submodule(model, lw.target.name, q)
    C, D = lw.codes.shape[0], lw.target.weight_matrix().shape[1]
    hist = torch.bincount(lw.counts.long(), minlength=lw.points + 1)[1:].tolist()
    layer = LayerReport(lw.target.name, (C, D), lw.bits, hist, q.bits_per_weight(), q.output_sqnr_db, fit_seconds)
    logger.info(
        "mpq: %-40s %5d x %-5d %d-bit points %s  %.2f bits/weight  SQNR %.1f dB  %.2fs",
        layer.name,
        C,
        D,
        layer.w_bits,
        hist,
        layer.bits_per_weight,
        layer.output_sqnr_db,
        fit_seconds,
    )
    return layer
