"""What ``mpq.quantize`` did: ``QuantReport`` (per layer, the layers kept in float, timings) and
``last_report``, which finds the report of a quantized model made in this process."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from mpq.config import QuantConfig
    from mpq.simulate import SimulationCheck

__all__ = ["LayerReport", "QuantReport", "last_report", "record_report"]


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]  # (C_out, D)
    w_bits: int
    points_histogram: list[int]  # channels with 1, 2, ... max_points points
    bits_per_weight: float
    output_sqnr_db: float
    fit_seconds: float


@dataclass
class QuantReport:
    """What ``quantize`` did: per layer, the layers kept in float, and totals."""

    config: QuantConfig
    layers: list[LayerReport] = field(default_factory=list)
    float_layers: list[tuple[str, str]] = field(default_factory=list)
    folded_batchnorm_names: list[str] = field(default_factory=list)  # BatchNorms folded and replaced by Identity
    # "simulation = deployment" (mpq.simulate.check_simulation), after packing, on the model's device:
    simulation_error: float = float("nan")  # end-to-end relative L2, deployed vs simulated (reported, not checked)
    simulation_checks: list[SimulationCheck] = field(default_factory=list)  # per layer, per checked dtype
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def folded_batchnorms(self) -> int:
        """How many BatchNorms were folded (their names: ``folded_batchnorm_names``)."""
        return len(self.folded_batchnorm_names)

    @property
    def avg_bits(self) -> float:
        """Average bits per weight over all quantized layers (codes and scales)."""
        bits = sum(l.bits_per_weight * l.shape[0] * l.shape[1] for l in self.layers)
        return bits / max(1, sum(l.shape[0] * l.shape[1] for l in self.layers))


_REPORTS: weakref.WeakKeyDictionary[nn.Module, QuantReport] = weakref.WeakKeyDictionary()


def record_report(qmodel: nn.Module, report: QuantReport) -> None:
    _REPORTS[qmodel] = report


def last_report(qmodel: nn.Module) -> QuantReport | None:
    """The report of the ``quantize`` call that produced ``qmodel`` in this process, if any."""
    return _REPORTS.get(qmodel)
