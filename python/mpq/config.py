"""QuantConfig: what ``mpq.quantize`` does, as one validated, serialisable dataclass.

The common options (bits, budget, scope, calibration, first/last, ignore, the post-passes) are
``QuantConfig`` fields; each method's own options are its ``MethodConfig`` dataclass, owned by the
method's file (``mpq.methods.GPTQConfig``, ...) and held in ``QuantConfig.options``.

Config version 1 (mpq 0.1) kept every method's options as flat fields (``gptq_damp``,
``adaround_iters``, ...). Version-1 dicts (``mpq.save`` files, JSON configs) still load, mapped to
the method's config; flat keyword arguments still work with a ``DeprecationWarning``.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mpq.layout import SCALE_BITS, check_max_points, check_w_bits, point_bits

if TYPE_CHECKING:  # pragma: no cover
    from mpq.methods.base import MethodConfig

__all__ = ["QuantConfig", "PRESETS"]

CONFIG_VERSION = 2

# name -> (w_bits, a_bits); a_bits None keeps activations in float. The A7 presets are for CPUs
# without VNNI (AVX2 only): their int8 kernels add pairs of uint8 x int8 products in a saturating
# int16, exact for 8-bit codes (W8, and MultipointConfig(int8_merge=True)'s merged rows) only
# against 7-bit activations, as PyTorch's x86 int8 path does (mpq.ops.int8_kernels_exact).
PRESETS: dict[str, tuple[int, int | None]] = {
    "W4A8": (4, 8),
    "W4A16": (4, None),
    "W3A16": (3, None),
    "W2A16": (2, None),
    "W8A8": (8, 8),
    "W4A7": (4, 7),
    "W8A7": (8, 7),
}

_SCOPES = ("model", "layer")
_FIRST_LAST = ("same", "8bit", "float")
_ACT_RANGES = ("mse", "percentile", "minmax")
_SENSITIVITIES = ("fisher", "fisher_gaussian", "relative")
_RTN_RANGES = ("minmax", "mse")
_BN_REFERENCES = ("running", "float")
# The price of a point's scale in the budget: as stored (float32), or as a float16 deployment would.
_SCALE_BITS = (SCALE_BITS, 16)


@dataclass
class QuantConfig:
    """Configuration of ``mpq.quantize``.

    Weights: ``w_bits``-bit symmetric codes (``mpq.layout.MIN_W_BITS``..``MAX_W_BITS``), up to
    ``max_points`` points per output channel (1..``mpq.layout.MAX_POINTS``: the ops' bounds), points
    allocated under an average of ``avg_bits`` bits per weight (codes and scales counted; default
    ``w_bits + 0.5``): one point of a channel of D weights costs ``D * w_bits + scale_bits`` bits
    (``mpq.layout.point_bits``).

    ``scale_bits`` (32 or 16) is the price of a point's scale in that budget (and in ``ilp``'s), and
    nothing else: the stored form, ``mpq.save`` files and TorchScript files hold float32 scales
    whatever it says, and the report (``QuantReport.avg_bits``, each module's ``bits_per_weight``),
    ``mpq.summary`` and ``mpq.model_size_bytes`` count what is stored, 32 bits per scale. With
    ``scale_bits=16`` the allocation buys more points than ``avg_bits`` pays for at 32-bit scales,
    and the reported average is about ``avg_bits + 16 * points / weights``: it plans for a
    deployment that converts the scales to float16 itself.

    ``scope="model"`` lets all layers compete for the budget, ``"layer"`` gives each layer the same
    average. ``sensitivity`` weighs the layers' output errors: ``"fisher"`` (a diagonal Fisher per output channel: for [N, classes] logits the mean
    squared gradient of the cross-entropy to the model's own predictions; for any other output,
    e.g. embeddings with rows of unit norm, that of a Gaussian output model, the diagonal of
    J^T J for the squared output error), ``"fisher_gaussian"`` (the Gaussian one whatever the
    output, e.g. for unnormalised [N, D] regression outputs) or ``"relative"`` (1 / layer output
    energy).

    Activations: per-tensor ``a_bits`` (None: float), range from calibration by ``act_range``.

    ``first_last``: the first and last quantized layers are quantized like the others
    (``"same"``), with one 8-bit point and 8-bit activations (``"8bit"``, outside the budget), or
    kept in float (``"float"``). ``ignore``: fnmatch patterns of module names kept in float.

    Calibration: at most ``calib_batches`` batches, read in one pass over the loader. Only the
    first ``max(1, sensitivity_batches)`` input batches stay in memory (BatchNorm folding, the
    Fisher sensitivity and the ``verify`` check reuse them); every later batch is dropped once it
    has run through the model, so held inputs never exceed that many batches, whatever
    ``calib_batches``. Per layer, random input rows (im2col patches for convolutions) give the
    second moment H = E[x x^T] of the layer's input: accumulated over all batches when the row
    length D <= ``calib_samples`` (memory D^2 per group), else a uniform sample of
    ``calib_samples`` rows is kept, plus a sample of 16384 input values for the activation range.
    Either way memory does not grow with ``calib_batches`` or the data set.

    ``hessian_budget_mb``: the largest H = E[x x^T] of one layer (float64, all groups, in MiB) that
    the output-aware fits form whole (the GPTQ factorization holds about five arrays of its size).
    A larger layer's GPTQ sweeps (``point_rounding="gptq"``, method ``"gptq"``) use diagonal blocks
    of H that together fit the budget, with one log line naming the layer; the methods that need
    the whole H (adaround, adaquant, companding, ilp) raise instead.

    ``verify``: after quantizing (and packing), run one calibration batch through the deployed
    model and check every quantized layer against its float64 recomputation from its own input,
    element-wise within a worst-case rounding bound (``mpq.simulate.check_simulation``); raise
    naming the layer and the element if one disagrees. The end-to-end difference to the float
    simulation is reported (``QuantReport.simulation_error``), not checked.

    ``method``: a registered weight quantizer (``mpq.methods.available()``) by name, with its
    default options, or its options as the method's config, which selects it:
    ``QuantConfig(method=GPTQConfig(act_order=True))``. After construction ``method`` is the name
    and ``options`` the method's config (``MultipointConfig``, ``RTNConfig``, ``GPTQConfig``,
    ``AdaRoundConfig``, ``AdaQuantConfig``, ``OCSConfig``, ``ILPConfig``, ``CompandingConfig``;
    each documents its options). ``"multipoint"`` (default) fits adaptive points; the baselines
    (docs/ALGORITHM.md section 5) fit one point per channel on the same symmetric per-channel grid,
    whose scale follows ``rtn_range`` (min-max or MSE-optimal) for all of them.

    ``bn_reestimation`` re-collects the statistics of every folded BatchNorm on the quantized
    model and refolds them (after any method, after bias correction): with the BN's running
    statistics as the reference (``bn_reference="running"``, the paper's) or mapped to the float
    layer's output statistics on the same calibration data (``"float"``, the default: the paper's
    mode hurts with small calibration sets, e.g. 8-bit RTN on EfficientNet-Lite0 KL 0.013 -> 1.16
    vs 0.0013; see ``mpq/bn_reestimate.py``). ``bias_correction`` adds (W - W_q) E[x] to every
    quantized layer's bias, after any method.
    """

    w_bits: int = 4
    a_bits: int | None = 8
    max_points: int = 4
    avg_bits: float | None = None
    scale_bits: int = SCALE_BITS
    scope: str = "model"
    sensitivity: str = "fisher"
    first_last: str = "same"
    ignore: tuple[str, ...] = ()
    act_range: str = "mse"
    calib_batches: int = 32
    calib_samples: int = 2048
    sensitivity_batches: int = 8
    method: Any = "multipoint"  # str | MethodConfig; the method's name once built
    options: Any = None  # MethodConfig | None (the method's defaults); the method's config once built
    rtn_range: str = "minmax"
    verify: bool = True
    hessian_budget_mb: float = 1024.0
    bn_reestimation: bool = False
    bn_reference: str = "float"
    bias_correction: bool = False
    seed: int = 0
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self) -> None:
        def fail(name: str, expected: str) -> None:
            raise ValueError(f"mpq.QuantConfig: expected {name} {expected}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        check_w_bits("mpq.QuantConfig", self.w_bits)
        if self.a_bits is not None and (not is_int(self.a_bits) or not 2 <= self.a_bits <= 16):
            fail("a_bits", "to be None or an int in 2..16")
        check_max_points("mpq.QuantConfig", self.max_points)
        if self.scale_bits not in _SCALE_BITS:
            fail("scale_bits", f"to be one of {_SCALE_BITS}")
        if self.avg_bits is not None:
            if isinstance(self.avg_bits, bool) or not isinstance(self.avg_bits, (int, float)):
                fail("avg_bits", "to be None or a number")
            # The most a point costs per weight: a channel of one weight (D = 1).
            most = self.max_points * point_bits(1, self.w_bits, self.scale_bits)
            if not self.w_bits <= float(self.avg_bits) <= most:
                fail(
                    "avg_bits", f"to lie between w_bits ({self.w_bits}) and max_points * (w_bits + scale_bits) ({most})"
                )
        for name, allowed in (
            ("scope", _SCOPES),
            ("sensitivity", _SENSITIVITIES),
            ("first_last", _FIRST_LAST),
            ("act_range", _ACT_RANGES),
            ("rtn_range", _RTN_RANGES),
            ("bn_reference", _BN_REFERENCES),
        ):
            if getattr(self, name) not in allowed:
                fail(name, f"to be one of {allowed}")
        self._check_method(fail)
        if isinstance(self.ignore, str):
            self.ignore = (self.ignore,)
        if not isinstance(self.ignore, (tuple, list)):
            fail("ignore", "to be a tuple of module-name patterns (str)")
        self.ignore = tuple(self.ignore)
        if not all(isinstance(p, str) for p in self.ignore):
            fail("ignore", "to be a tuple of module-name patterns (str)")
        for name in ("calib_batches", "calib_samples", "sensitivity_batches"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                fail(name, "to be an int >= 1")
        if (
            isinstance(self.hessian_budget_mb, bool)
            or not isinstance(self.hessian_budget_mb, (int, float))
            or not 0 < self.hessian_budget_mb < float("inf")
        ):
            fail("hessian_budget_mb", "to be a number > 0 (MiB)")
        if not is_int(self.seed):
            fail("seed", "to be an int")
        for name in ("verify", "bias_correction", "bn_reestimation"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "to be a bool")
        if not is_int(self.version) or self.version < 1:
            fail("version", "to be an int >= 1")
        if self.version > CONFIG_VERSION:
            fail("version", f"<= {CONFIG_VERSION} (written by a newer mpq)")

    def _check_method(self, fail: Any) -> None:
        """``method`` (a name or a method config) and ``options`` to the name and the method's config."""
        from mpq.methods.base import MethodConfig, available, get_method  # the registry: plugins may add methods

        if isinstance(self.method, MethodConfig):
            if self.options is not None and self.options != self.method:
                fail("options", "to be None when method is a method config (it holds the options)")
            self.options, self.method = self.method, self.method.method_name
        if self.method not in available():
            fail("method", f"to be one of {available()} or a method config")
        config_type = get_method(self.method).config_type
        if self.options is None:
            self.options = config_type()
        elif isinstance(self.options, dict):
            self.options = config_type.from_dict(self.options)
        elif not isinstance(self.options, config_type):
            fail("options", f"to be None or a {config_type.__name__} (the options of method {self.method!r})")

    @property
    def budget_bits(self) -> float:
        """Average bits per weight allowed for the multipoint layers."""
        if self.method == "rtn":
            return self.w_bits + 0.0
        return float(self.avg_bits) if self.avg_bits is not None else self.w_bits + 0.5

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> QuantConfig:
        """A preset by name ("W4A8", "W4A16", "W3A16", "W2A16", "W8A8"; "W4A7", "W8A7" for CPUs
        without VNNI) with field overrides."""
        if not isinstance(name, str):
            raise TypeError(
                f"mpq.QuantConfig.preset: expected name to be a preset name (str), got {type(name).__name__}"
            )
        cls._check_field_names("mpq.QuantConfig.preset", overrides)
        key = name.upper()
        if key not in PRESETS:
            raise ValueError(f"mpq.QuantConfig.preset: unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        w_bits, a_bits = PRESETS[key]
        return cls(**{"w_bits": w_bits, "a_bits": a_bits, **overrides})

    @classmethod
    def from_any(cls, config: str | QuantConfig | dict[str, Any] | None) -> QuantConfig:
        if config is None:
            return cls()
        if isinstance(config, QuantConfig):
            return config
        if isinstance(config, str):
            return cls.preset(config)
        if isinstance(config, dict):
            return cls.from_dict(config)
        raise TypeError(
            f"mpq.quantize: expected config to be a preset name, a QuantConfig or a dict, got {type(config).__name__}"
        )

    def replace(self, **changes: Any) -> QuantConfig:
        """A validated copy with some fields changed. A different ``method`` given by name comes
        with its default options unless ``options`` is given too (the same name keeps them)."""
        self._check_field_names("mpq.QuantConfig.replace", changes)
        legacy = _pop_legacy(changes)
        if legacy:
            method = changes.get("method", self.method)
            keep = method == self.method and "options" not in changes  # change the current options
            changes["options"] = _options_from_legacy(
                method, legacy, "mpq.QuantConfig.replace", self.options if keep else None
            )
        if "options" not in changes and changes.get("method", self.method) != self.method:
            changes["options"] = None  # the new method's defaults (or the options a method config holds)
        return dataclasses.replace(self, **changes)

    @classmethod
    def _check_field_names(cls, where: str, d: dict[str, Any]) -> None:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)} - legacy_field_names()
        if unknown:
            raise ValueError(f"{where}: unknown fields {sorted(unknown)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the common fields, ``method`` (the name) and ``options`` (the method's)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["ignore"] = list(self.ignore)
        d["options"] = self.options.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        """From ``to_dict``'s form, or from a version-1 dict of flat fields (mapped to the method's
        config; other methods' flat fields, which version 1 carried along, are dropped)."""
        if not isinstance(d, dict):
            raise TypeError(
                f"mpq.QuantConfig.from_dict: expected d to be a dict of QuantConfig fields, got {type(d).__name__}"
            )
        version = d.get("version", CONFIG_VERSION)
        if isinstance(version, int) and version > CONFIG_VERSION:  # before its fields: they may be new ones
            raise ValueError(
                f"mpq.QuantConfig.from_dict: expected version <= {CONFIG_VERSION}, got {version} "
                "(written by a newer mpq; upgrade mpq to read it)"
            )
        cls._check_field_names("mpq.QuantConfig.from_dict", d)
        d = dict(d)
        if "ignore" in d:
            d["ignore"] = tuple(d["ignore"])
        legacy = _pop_legacy(d)
        if d.get("version", CONFIG_VERSION) == 1:  # a file of mpq 0.1: all flat fields, silently mapped
            d["version"] = CONFIG_VERSION
            d["options"] = _options_from_legacy(d.get("method", "multipoint"), legacy, None)
        elif legacy:
            if d.get("options") is not None:
                raise ValueError(
                    f"mpq.QuantConfig.from_dict: expected either options or the flat fields {sorted(legacy)}, got both"
                )
            d["options"] = _options_from_legacy(d.get("method", "multipoint"), legacy, "mpq.QuantConfig.from_dict")
        return cls(**d)

    def __getattr__(self, name: str) -> Any:
        """Version-1 flat names (``cfg.gptq_damp``) read the method's config, with a warning."""
        if name.startswith("_") or name not in legacy_field_names():
            raise AttributeError(f"'QuantConfig' object has no attribute {name!r}")
        from mpq.methods.base import config_types

        owners = [t for t in config_types() if name in t.legacy_fields]
        options = self.__dict__.get("options")
        owner = next((t for t in owners if isinstance(options, t)), owners[0])
        source = options if isinstance(options, owner) else owner()
        warnings.warn(
            f"mpq.QuantConfig.{name} is deprecated: read config.options.{owner.legacy_fields[name]} "
            f"({owner.__name__}, the options of method {owner.method_name!r})",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(source, owner.legacy_fields[name])


def legacy_field_names() -> set[str]:
    """The flat method fields of config version 1 (``gptq_damp``, ``ilp_bits``, ...)."""
    from mpq.methods.base import config_types

    return set().union(*(t.legacy_names() for t in config_types()))


def _pop_legacy(d: dict[str, Any]) -> dict[str, Any]:
    names = legacy_field_names()
    return {k: d.pop(k) for k in list(d) if k in names}


def _options_from_legacy(
    method: Any, flat: dict[str, Any], warn_from: str | None, start: MethodConfig | None = None
) -> MethodConfig | None:
    """The options of ``method`` (a name) from version-1 flat fields: its defaults, or ``start``
    (its current config) with the fields it owns changed; ``warn_from`` names the caller in the
    ``DeprecationWarning`` (None: no warning). Returns None for a method config or an unknown
    name (``QuantConfig`` reports those)."""
    from mpq.methods.base import available, get_method

    if not isinstance(method, str) or method not in available():
        return None
    config_type = get_method(method).config_type
    used = sorted(set(flat) & (config_type.legacy_names() if start is None else set(config_type.legacy_fields)))
    if warn_from is not None:
        ignored = sorted(set(flat) - set(used))
        warnings.warn(
            f"{warn_from}: the flat method fields {sorted(flat)} are deprecated; pass the method's config, e.g. "
            f"method={config_type.__name__}(...)"
            + (f"; {ignored} do not apply to method {method!r} and are ignored" if ignored else ""),
            DeprecationWarning,
            stacklevel=4,
        )
    if start is None:
        return config_type.from_legacy(flat)
    return dataclasses.replace(start, **{config_type.legacy_fields[k]: flat[k] for k in used})


def _init_with_legacy_fields(init: Any) -> Any:
    """``QuantConfig(gptq_damp=0.02, method="gptq")``, the version-1 form, keeps working: the flat
    method fields become the method's config, with a ``DeprecationWarning``."""

    def __init__(self: QuantConfig, *args: Any, **kwargs: Any) -> None:
        legacy = _pop_legacy(kwargs)
        if legacy:
            if kwargs.get("options") is not None:
                raise ValueError(
                    f"mpq.QuantConfig: expected either options or the flat fields {sorted(legacy)}, got both"
                )
            kwargs["options"] = _options_from_legacy(kwargs.get("method", "multipoint"), legacy, "mpq.QuantConfig")
        init(self, *args, **kwargs)

    __init__.__doc__ = init.__doc__
    return __init__


QuantConfig.__init__ = _init_with_legacy_fields(QuantConfig.__init__)  # type: ignore[method-assign]
