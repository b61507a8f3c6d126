"""The weight-quantizer interface and its registry."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Dict, List, Optional, Tuple, Type

import torch

if TYPE_CHECKING:  # pragma: no cover
    from mpq.calibrate import LayerStats, QuantTarget
    from mpq.config import QuantConfig


@dataclass
class LayerContext:
    """What a method sees of one layer."""

    target: "QuantTarget"
    weight: torch.Tensor  # [C, D] float32, BatchNorm folded
    stats: "LayerStats"  # second moment of the layer's calibration inputs
    bits: int  # code width for this layer
    max_points: int  # points the method may fit per channel
    config: "QuantConfig"


@dataclass
class FittedWeight:
    """A layer's quantized weight: W[j] = sum_k scales[j, k] * codes[j, k]."""

    codes: torch.Tensor  # int8 [C, P, D]
    scales: torch.Tensor  # float32 [C, P]
    bias: Optional[torch.Tensor] = None  # replaces the layer's bias when not None
    num_points: Optional[torch.Tensor] = None  # int32 [C]: points in use, for one-point methods that need more (OCS)
    # Other nested point sequences (codes, scales) of the same shapes: mpq.quantize allocates on the
    # per-channel minimum of their output errors and each channel keeps the sequence that is best
    # at its allocated count (multipoint with point_rounding="gptq").
    alternatives: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None
    # float32 [2K + 1]: a non-uniform per-layer codebook (companding): one point whose codes index
    # it, W[j] = scales[j, 0] * codebook[codes[j, 0] + K], K = (len - 1) / 2. None: uniform codes.
    codebook: Optional[torch.Tensor] = None

    def levels(self) -> torch.Tensor:
        """The codes as the values they stand for (float64 [C, P, D]): the integers themselves, or
        their codebook levels; W = sum_k scales[:, k] * levels()[:, k] over the points in use."""
        if self.codebook is None:
            return self.codes.double()
        K = (self.codebook.numel() - 1) // 2
        return self.codebook.double().to(self.codes.device)[self.codes.long() + K]


class WeightQuantizer:
    """Base class: ``fit`` one layer. ``multipoint`` methods return nested points that
    ``mpq.quantize`` allocates under the average-bits budget."""

    name: ClassVar[str] = ""
    multipoint: ClassVar[bool] = False

    def fit(self, ctx: LayerContext) -> FittedWeight:  # pragma: no cover - interface
        raise NotImplementedError


_REGISTRY: Dict[str, Type[WeightQuantizer]] = {}


def register(cls: Type[WeightQuantizer]) -> Type[WeightQuantizer]:
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"mpq.methods.register: expected a new, non-empty method name, got {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> List[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> WeightQuantizer:
    if name not in _REGISTRY:
        raise ValueError(f"mpq: unknown method {name!r}; expected one of {available()}")
    return _REGISTRY[name]()
