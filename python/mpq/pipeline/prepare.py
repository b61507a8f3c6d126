"""Stage 1, prepare: check the arguments, open the calibration data, find the quantizable layers
and copy the model (unless in place) onto the device where calibration and fitting run."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from mpq.calibrate import CalibrationBatches, QuantTarget, collect_batches, find_targets
from mpq.config import QuantConfig
from mpq.distributed import agree, gather_objects, world

__all__ = ["Prepared", "prepare", "resolve_device"]


@dataclass
class Prepared:
    model: nn.Module  # the model being quantized: the user's copy (or the model itself, in place), eval, on device
    targets: list[QuantTarget]  # its quantizable layers
    skipped: list[tuple[str, str]]  # weighted layers that stay in float: (name, reason)
    batches: CalibrationBatches  # the calibration inputs, read in one pass
    device: torch.device


def resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """``device``, or the model's (its first parameter's; the CPU without parameters)."""
    params = list(model.parameters())
    inferred = device is None
    if device is None:
        device = params[0].device if params else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"mpq.quantize: expected device to be a torch.device or a device string, got {device!r} ({e})"
        ) from None
    if device.type == "meta":
        raise ValueError(
            "mpq.quantize: expected device to hold data, got the meta device"
            + (" (where the model's parameters are: load its weights first)" if inferred else "")
        )
    return device


def prepare(
    model: nn.Module, calib_loader: Iterable, cfg: QuantConfig, *, inplace: bool, device: str | torch.device | None
) -> Prepared:
    """Checks everything before any work: the model, ``inplace``, ``device``, the first calibration
    batch and the model's parameters; then copies the model (unless ``inplace``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"mpq.quantize: expected model to be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"mpq.quantize: expected inplace to be a bool, got {type(inplace).__name__}")
    device = resolve_device(model, device)
    batches = agree(
        "reading the calibration data",
        lambda: collect_batches(calib_loader, cfg.calib_batches, device, keep=cfg.sensitivity_batches),
    )
    # The trial search for quantizable layers runs on the user's model without touching it.
    targets, skipped = find_targets(model, cfg)
    if not targets:
        raise ValueError(
            "mpq.quantize: the model has no quantizable layer (Conv2d or Linear)"
            + (f"; kept in float: {skipped}" if skipped else "")
        )
    for name, p in model.named_parameters():
        if p.is_meta:
            raise ValueError(f"mpq.quantize: parameter {name!r} of model is on the meta device (it holds no values)")
        if not torch.isfinite(p).all():
            raise ValueError(f"mpq.quantize: parameter {name!r} of model contains NaN or inf")
    if world()[1] > 1:
        check_same_job(model, cfg)
    qmodel = model if inplace else copy.deepcopy(model)
    qmodel.eval().to(device)
    targets, skipped = find_targets(qmodel, cfg)
    return Prepared(qmodel, targets, skipped, batches, device)


def check_same_job(model: nn.Module, cfg: QuantConfig) -> None:
    """Under a process group: every rank must quantize the same model (names, shapes and values
    of its parameters and buffers) with the same config; a rank that differs is named."""
    digest = hashlib.sha256(repr(sorted(cfg.to_dict().items())).encode())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    every = gather_objects(digest.hexdigest(), "checking that every rank runs the same job")
    differ = [r for r, d in enumerate(every) if d != every[0]]
    if differ:
        raise ValueError(
            f"mpq.quantize: ranks {differ} of {len(every)} hold a different model or config than rank 0 "
            f"(every rank must quantize the same model with the same config; only the calibration data differ)"
        )
