"""``mpq.quantize``: the pipeline's stages in order (``mpq.pipeline``): prepare -> calibrate ->
sensitivity -> fit -> allocate -> refit -> swap -> BatchNorm re-estimation -> pack -> verify."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch
from torch import nn

from mpq.config import QuantConfig
from mpq.distributed import on_main
from mpq.methods import get_method
from mpq.pipeline import (
    LayerReport,
    QuantReport,
    allocate_layers,
    build_layer,
    calibrate_layers,
    fit_layers,
    last_report,
    layer_sensitivity,
    pack_for_device,
    prepare,
    record_report,
    reestimate_batchnorms,
    refit_layers,
    swap_layer,
    verify,
)

logger = logging.getLogger("mpq")

__all__ = ["quantize", "QuantReport", "LayerReport", "last_report"]


def quantize(
    model: nn.Module,
    calib_loader: Iterable,
    config: str | QuantConfig | dict | None = "W4A8",
    *,
    inplace: bool = False,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Quantize ``model``'s Conv2d and Linear layers with multipoint weights (or RTN).

    Args:
        model: an ``nn.Module``; left untouched unless ``inplace=True``.
        calib_loader: iterable of input tensors or (input, target) pairs; at most
            ``config.calib_batches`` batches are used, read in one pass, and only the first
            ``max(1, config.sensitivity_batches)`` of them are held in memory.
        config: a preset name ("W4A8", "W4A16", "W3A16", "W2A16", "W8A8"), a ``QuantConfig`` or a dict.
        device: where to calibrate and fit (default: the model's device).

    Under an initialised ``torch.distributed`` process group every rank calls ``quantize`` with
    the same model and config and its own shard of the calibration batches (``mpq.distributed``):
    the statistics are merged, the layers fitted in parallel, and every rank returns the same model.

    Returns:
        The quantized model (eval mode), with ``MultipointConv2d`` / ``MultipointLinear`` layers.
    """
    cfg = QuantConfig.from_any(config)
    report = QuantReport(cfg)
    seconds = report.seconds
    t_start = t0 = time.perf_counter()
    prep = prepare(model, calib_loader, cfg, inplace=inplace, device=device)
    cal = calibrate_layers(prep, cfg)
    seconds["calibrate"] = time.perf_counter() - t0
    report.folded_batchnorm_names = cal.folded_batchnorms

    t0 = time.perf_counter()
    method = get_method(cfg.method)
    sensitivity = layer_sensitivity(prep, cal, cfg, method)
    seconds["sensitivity"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    fits = fit_layers(cal, cfg, method, sensitivity)
    seconds["fit"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    counts = on_main("allocating points", lambda: allocate_layers(fits, cfg, method))
    seconds["allocate"] = time.perf_counter() - t0

    for fit, layer in zip(fits, refit_layers(fits, counts, cal, cfg, method)):
        report.layers.append(swap_layer(prep.model, layer, build_layer(layer, cal, cfg, method), fit.seconds))
    if cfg.bn_reestimation and cal.bn_originals:  # on the quantized model, after bias correction
        t0 = time.perf_counter()
        float_modules = {t.name: t.module for t in cal.targets} if cfg.bn_reference == "float" else None
        reestimate_batchnorms(prep, cal, cfg, float_modules)
        seconds["bn_reestimation"] = time.perf_counter() - t0
    report.float_layers = cal.skipped
    pack_for_device(prep.model)
    if cfg.verify:  # the deployed model as it will run: after packing, on its device
        t0 = time.perf_counter()
        report.simulation_checks = on_main("the simulation check", lambda: verify(prep))
        report.simulation_error = report.simulation_checks[0].end_to_end
        seconds["verify"] = time.perf_counter() - t0
    if cal.skipped:
        logger.warning(
            "mpq: %d weighted layers stay in float: %s",
            len(cal.skipped),
            "; ".join(f"{n} ({r})" for n, r in cal.skipped),
        )
    seconds["total"] = time.perf_counter() - t_start
    logger.info(
        "mpq: quantized %d layers, %.3f bits per weight on average, %.1fs",
        len(report.layers),
        report.avg_bits,
        seconds["total"],
    )
    record_report(prep.model, report)
    return prep.model
