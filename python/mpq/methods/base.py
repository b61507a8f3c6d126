"""The weight-quantizer interface and its registry."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from mpq.nn import MultipointConv2d, MultipointLinear

if TYPE_CHECKING:  # pragma: no cover
    from mpq.calibrate import LayerStats, QuantTarget
    from mpq.config import QuantConfig


@dataclass
class LayerContext:
    """What a method sees of one layer."""

    target: QuantTarget
    weight: torch.Tensor  # [C, D] float32, BatchNorm folded
    stats: LayerStats  # second moment of the layer's calibration inputs
    bits: int  # code width for this layer
    max_points: int  # points the method may fit per channel
    config: QuantConfig


@dataclass
class FittedWeight:
    """A layer's quantized weight: W[j] = sum_k scales[j, k] * codes[j, k]."""

    codes: torch.Tensor  # int8 [C, P, D]
    scales: torch.Tensor  # float32 [C, P]
    bias: torch.Tensor | None = None  # replaces the layer's bias when not None
    num_points: torch.Tensor | None = None  # int32 [C]: points in use, for one-point methods that need more (OCS)
    # Other nested point sequences (codes, scales) of the same shapes: mpq.quantize allocates on the
    # per-channel minimum of their output errors and each channel keeps the sequence that is best
    # at its allocated count (multipoint with point_rounding="gptq").
    alternatives: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    # float32 [2K + 1]: a non-uniform per-layer codebook (companding): one point whose codes index
    # it, W[j] = scales[j, 0] * codebook[codes[j, 0] + K], K = (len - 1) / 2. None: uniform codes.
    codebook: torch.Tensor | None = None

    def levels(self) -> torch.Tensor:
        """The codes as the values they stand for (float64 [C, P, D]): the integers themselves, or
        their codebook levels; W = sum_k scales[:, k] * levels()[:, k] over the points in use."""
        if self.codebook is None:
            return self.codes.double()
        K = (self.codebook.numel() - 1) // 2
        return self.codebook.double().to(self.codes.device)[self.codes.long() + K]


class WeightQuantizer:
    """Base class: ``fit`` one layer. ``multipoint`` methods return nested points that
    ``mpq.quantize`` allocates under the average-bits budget.

    The pipeline's hooks (``mpq.pipeline``), each with a default a method may override:
    ``choose_bits`` (a bit width per layer before fitting), ``uses_sensitivity`` (whether the
    Fisher sensitivity is measured for it) and ``build_module`` (the layer that runs the fit)."""

    name: ClassVar[str] = ""
    multipoint: ClassVar[bool] = False

    def fit(self, ctx: LayerContext) -> FittedWeight:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def uses_sensitivity(self) -> bool:
        """Whether the method weighs layers by the Fisher sensitivity (the point allocation does)."""
        return self.multipoint

    def choose_bits(
        self,
        targets: Sequence[QuantTarget],
        stats: dict[str, LayerStats],
        config: QuantConfig,
        sensitivity: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, int]:
        """Bits per layer name, chosen before fitting; layers left out get ``config.w_bits``."""
        return {}

    def build_module(
        self, target: QuantTarget, points: int, bits: int, has_bias: bool, codebook: torch.Tensor | None = None
    ) -> nn.Module:
        """The empty quantized layer that replaces ``target``'s module (``set_weight`` and
        ``set_act_qparams`` fill it): a multipoint layer with room for ``points`` points."""
        m = target.module
        # Built on the layer's device (no .to(): a move to a GPU would pack the still empty weight).
        with torch.device(m.weight.device):
            if target.kind == "linear":
                return MultipointLinear(m.in_features, m.out_features, points, bits, bias=has_bias)
            return MultipointConv2d(
                m.in_channels,
                m.out_channels,
                list(m.kernel_size),
                points,
                bits,
                list(m.stride),
                list(m.padding),
                list(m.dilation),
                m.groups,
                bias=has_bias,
                pre_padding=target.pre_padding,
                same_padding=target.same_padding,
            )


_REGISTRY: dict[str, type[WeightQuantizer]] = {}


def register(cls: type[WeightQuantizer]) -> type[WeightQuantizer]:
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"mpq.methods.register: expected a new, non-empty method name, got {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> WeightQuantizer:
    if name not in _REGISTRY:
        raise ValueError(f"mpq: unknown method {name!r}; expected one of {available()}")
    return _REGISTRY[name]()
