"""The weight-quantizer interface and its registry."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from mpq.methods.groupwise import GroupGrid
from mpq.nn import GroupwiseConv2d, GroupwiseLinear, MultipointConv2d, MultipointLinear

if TYPE_CHECKING:  # pragma: no cover
    from mpq.calibrate import LayerStats, QuantTarget
    from mpq.config import QuantConfig


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class MethodConfig:
    """The options of one weight quantizer. Each method's file owns a frozen subclass, names it as
    the method's ``config_type``, and validates it in ``check``; ``register`` ties the two, so
    ``QuantConfig(method=GPTQConfig(act_order=True))`` selects the method and its options at once.

    ``legacy_fields`` maps the flat ``QuantConfig`` field names of config version 1 (e.g.
    ``gptq_damp``) to this config's fields, so that old code and saved files keep working."""

    method_name: ClassVar[str] = ""  # set by ``register``
    legacy_fields: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ``ValueError`` naming the field when an option is out of range."""

    def _fail(self, name: str, expected: str) -> None:
        raise ValueError(f"mpq.{type(self).__name__}: expected {name} {expected}, got {getattr(self, name)!r}")

    def _check_int(self, name: str, least: int) -> None:
        if not _is_int(getattr(self, name)) or getattr(self, name) < least:
            self._fail(name, f"to be an int >= {least}")

    def _check_number(self, name: str, expected: str, ok: Any) -> None:
        if not _is_number(getattr(self, name)) or not ok(getattr(self, name)):
            self._fail(name, f"to be a number {expected}")

    def _check_bool(self, name: str) -> None:
        if not isinstance(getattr(self, name), bool):
            self._fail(name, "to be a bool")

    def _check_choice(self, name: str, allowed: tuple[str, ...]) -> None:
        if getattr(self, name) not in allowed:
            self._fail(name, f"to be one of {allowed}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields; a nested method config as ``{"method": name, "options": {...}}``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, MethodConfig):
                v = {"method": v.method_name, "options": v.to_dict()}
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MethodConfig:
        if not isinstance(d, dict):
            raise TypeError(f"mpq.{cls.__name__}.from_dict: expected a dict of options, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"mpq.{cls.__name__}.from_dict: unknown options {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def legacy_names(cls) -> set[str]:
        """The flat version-1 field names this config reads (``from_legacy``)."""
        return set(cls.legacy_fields)

    @classmethod
    def from_legacy(cls, flat: dict[str, Any]) -> MethodConfig:
        """This config from flat version-1 fields; fields of other methods are ignored."""
        return cls(**{new: flat[old] for old, new in cls.legacy_fields.items() if old in flat})


def method_config(spec: str | MethodConfig | dict[str, Any], allowed: Sequence[str] | None = None) -> MethodConfig:
    """A method's config from its name (its defaults), itself, or ``{"method": name, "options": {...}}``;
    ``allowed`` restricts the methods. Raises ``ValueError`` naming the choices."""
    if isinstance(spec, dict):
        if set(spec) - {"method", "options"} or "method" not in spec:
            raise ValueError(f'mpq: expected a method config as {{"method": name, "options": {{...}}}}, got {spec!r}')
        name, options = spec["method"], spec.get("options") or {}
    elif isinstance(spec, MethodConfig):
        name, options = spec.method_name, None
    else:
        name, options = spec, {}
    choices = list(allowed) if allowed is not None else available()
    if name not in choices or name not in _REGISTRY:
        raise ValueError(f"mpq: unknown method {name!r}; expected one of {choices}")
    if options is None:
        return spec  # type: ignore[return-value]
    return _REGISTRY[name].config_type.from_dict(options)


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
    # A group-wise grid (mpq.methods.groupwise): one point whose scales are 1 and whose codes stand
    # for W[j, d] = grid.scales[j, g] * (codes[j, 0, d] - grid.zeros[j, g]), g = d // grid.size.
    grid: GroupGrid | None = None

    def levels(self) -> torch.Tensor:
        """The codes as the values they stand for (float64 [C, P, D]): the integers themselves,
        their codebook levels, or scale * (code - zero) of their group; W = sum_k scales[:, k] *
        levels()[:, k] over the points in use."""
        if self.grid is not None:
            return self.grid.values(self.codes[:, 0])[:, None, :]
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
    config_type: ClassVar[type[MethodConfig]] = MethodConfig  # the method's options (``register`` checks)

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
        self,
        target: QuantTarget,
        points: int,
        bits: int,
        has_bias: bool,
        codebook: torch.Tensor | None = None,
        grid: GroupGrid | None = None,
    ) -> nn.Module:
        """The empty quantized layer that replaces ``target``'s module (``set_weight`` and
        ``set_act_qparams`` fill it): a multipoint layer with room for ``points`` points, or, for a
        fit on a group-wise ``grid``, a group-wise layer holding that grid."""
        m = target.module
        # Built on the layer's device (no .to(): a move to a GPU would pack the still empty weight).
        with torch.device(m.weight.device):
            if grid is not None:
                q = _groupwise_module(target, bits, has_bias, grid)
                q.set_grid(grid.scales, grid.zeros, grid.input_scales)
                return q
            if target.kind == "linear":
                return MultipointLinear(m.in_features, m.out_features, points, bits, bias=has_bias)
            return MultipointConv2d(max_points=points, w_bits=bits, bias=has_bias, **conv_geometry(target))


def conv_geometry(target: QuantTarget) -> dict[str, Any]:
    """The geometry keyword arguments of a quantized convolution layer replacing ``target``'s
    Conv2d (``MultipointConv2d``, ``CodebookConv2d``, ``GroupwiseConv2d``)."""
    m = target.module
    return dict(
        in_channels=m.in_channels,
        out_channels=m.out_channels,
        kernel_size=list(m.kernel_size),
        stride=list(m.stride),
        padding=list(m.padding),
        dilation=list(m.dilation),
        groups=m.groups,
        pre_padding=target.pre_padding,
        same_padding=target.same_padding,
    )


def _groupwise_module(target: QuantTarget, bits: int, has_bias: bool, grid: GroupGrid) -> nn.Module:
    m = target.module
    args = dict(group_size=grid.size, symmetric=grid.symmetric, input_scaled=grid.input_scales is not None)
    if target.kind == "linear":
        return GroupwiseLinear(m.in_features, m.out_features, bits, bias=has_bias, **args)
    return GroupwiseConv2d(w_bits=bits, bias=has_bias, **args, **conv_geometry(target))


_REGISTRY: dict[str, type[WeightQuantizer]] = {}


def register(cls: type[WeightQuantizer]) -> type[WeightQuantizer]:
    """Add a method to the registry (``QuantConfig.method``). Its ``config_type`` is its own
    ``MethodConfig`` subclass; a method without one gets an empty config of its own."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"mpq.methods.register: expected a new, non-empty method name, got {cls.name!r}")
    if cls.config_type is MethodConfig:
        cls.config_type = dataclass(frozen=True)(type(f"{cls.__name__}Config", (MethodConfig,), {}))
    if not issubclass(cls.config_type, MethodConfig) or cls.config_type.method_name:
        raise ValueError(
            f"mpq.methods.register: expected {cls.__name__}.config_type to be a MethodConfig subclass of its own, "
            f"got {cls.config_type!r}"
        )
    cls.config_type.method_name = cls.name
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    return sorted(_REGISTRY)


def config_types() -> list[type[MethodConfig]]:
    """The registered methods' config types."""
    return [cls.config_type for cls in _REGISTRY.values()]


def get_method(name: str) -> WeightQuantizer:
    if name not in _REGISTRY:
        raise ValueError(f"mpq: unknown method {name!r}; expected one of {available()}")
    return _REGISTRY[name]()
