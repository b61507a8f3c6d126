"""Stage 7, finish: BatchNorm statistics re-estimated on the quantized model
(``config.bn_reestimation``), the weights packed for the device's kernels, and the deployed
model checked layer by layer against its float64 recomputation (``config.verify``)."""

from __future__ import annotations

import torch
from torch import nn

from mpq.bn_reestimate import reestimate_batchnorm
from mpq.config import QuantConfig
from mpq.nn import MultipointConv2d, MultipointLinear
from mpq.pipeline.prepare import Prepared
from mpq.pipeline.statistics import Calibrated
from mpq.simulate import SimulationCheck, check_simulation

__all__ = ["reestimate_batchnorms", "pack_for_device", "verify"]


def reestimate_batchnorms(
    prep: Prepared, cal: Calibrated, cfg: QuantConfig, float_modules: dict[str, nn.Module] | None
) -> None:
    """Re-collect every folded BatchNorm's statistics on the quantized model and refold them
    (after bias correction); ``float_modules``: the float layers by name (``bn_reference="float"``)."""
    _, batches = prep.batches.first(max(1, cfg.sensitivity_batches))  # this rank's share
    reestimate_batchnorm(prep.model, cal.bn_originals, batches, float_modules)


def pack_for_device(model: nn.Module) -> None:
    """On a GPU: the packed weights of the fused kernels, once, here."""
    for mod in model.modules():
        if isinstance(mod, (MultipointLinear, MultipointConv2d)) and mod.point_codes.is_cuda and mod.packable():
            mod.pack_()


def verify(prep: Prepared) -> list[SimulationCheck]:
    """The deployed model as it will run (after packing, on its device) against its float64
    recomputation, layer by layer, on the first calibration batch; on a GPU also in float16."""
    first = prep.batches[0]
    checks = [check_simulation(prep.model, first)]
    if prep.device.type == "cuda" and first.is_floating_point():  # the fused float16 kernels
        checks.append(check_simulation(prep.model, first, dtype=torch.float16))
    return checks
