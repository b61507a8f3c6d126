"""Stage 2, calibrate: one pass over the calibration data records every quantizable layer's
input statistics; then BatchNorm is folded and the layers are put in execution order, with the
first and last marked (``config.first_last``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from mpq.calibrate import LayerStats, QuantTarget, calibrate
from mpq.config import QuantConfig
from mpq.fold import fold_batchnorm
from mpq.pipeline.prepare import Prepared

__all__ = ["Calibrated", "calibrate_layers", "layer_a_bits"]


def layer_a_bits(t: QuantTarget, cfg: QuantConfig) -> int | None:
    """The activation bits of layer ``t`` (None: float): ``cfg.a_bits``, but 8 for the first and
    last layers set apart by ``first_last``."""
    return cfg.a_bits if t.role == "inner" or cfg.a_bits is None else 8


@dataclass
class Calibrated:
    targets: list[QuantTarget]  # the layers to quantize, in execution order, roles set
    stats: dict[str, LayerStats]  # per layer name
    skipped: list[tuple[str, str]]  # weighted layers that stay in float: (name, reason)
    folded_batchnorms: list[str] = field(default_factory=list)  # names of the BatchNorms folded away
    bn_originals: dict[str, nn.Module] = field(default_factory=dict)  # conv name -> its folded BatchNorm

    def input_stats(self, name: str) -> LayerStats:
        """The statistics of the activation quantizer of layer ``name``'s input: those of the first
        layer reading the same tensor (one quantizer per input tensor)."""
        return self.stats[self.stats[name].input_leader or name]


def calibrate_layers(prep: Prepared, cfg: QuantConfig) -> Calibrated:
    # Calibrate (the one pass over the loader, which checks every batch) before folding
    # BatchNorm, so that a bad batch leaves even an inplace model's weights as they were. Folding
    # keeps every layer's input (the BN follows the conv) and the conv modules themselves.
    stats = calibrate(prep.model, prep.targets, prep.batches, cfg)
    bn_originals: dict[str, nn.Module] = {}
    first = prep.batches[0]
    folded = fold_batchnorm(prep.model, first[: min(2, first.shape[0])], originals=bn_originals)
    targets = sorted((t for t in prep.targets if t.name in stats), key=lambda t: stats[t.name].order)
    skipped = list(prep.skipped)
    if cfg.first_last != "same" and len(targets) >= 2:
        targets[0].role, targets[-1].role = "first", "last"
    if cfg.first_last == "float":
        skipped += [
            (t.name, "first/last layer kept in float (config.first_last)") for t in targets if t.role != "inner"
        ]
        targets = [t for t in targets if t.role == "inner"]
    return Calibrated(targets, stats, skipped, [bn for _, bn in folded], bn_originals)
