"""QuantConfig: what ``mpq.quantize`` does, as one validated, serialisable dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mpq.layout import MAX_W_BITS, MIN_W_BITS, SCALE_BITS, check_max_points, check_w_bits, point_bits

__all__ = ["QuantConfig", "PRESETS"]

CONFIG_VERSION = 1

# name -> (w_bits, a_bits); a_bits None keeps activations in float.
PRESETS: dict[str, tuple[int, int | None]] = {
    "W4A8": (4, 8),
    "W4A16": (4, None),
    "W3A16": (3, None),
    "W2A16": (2, None),
    "W8A8": (8, 8),
}

_SCOPES = ("model", "layer")
_FIRST_LAST = ("same", "8bit", "float")
_ACT_RANGES = ("mse", "percentile", "minmax")
_SENSITIVITIES = ("fisher", "fisher_gaussian", "relative")
_RTN_RANGES = ("minmax", "mse")
_SCALE_REFITS = ("output", "weight", "none")
_POINT_ROUNDINGS = ("nearest", "gptq")
_ILP_ROUNDINGS = ("rtn", "gptq", "adaround", "adaquant")  # one-point uniform methods
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

    ``scale_refit`` (multipoint methods): once the points per channel are allocated, re-solve each
    channel's scales jointly by least squares on the layer-output error (``"output"``, with the
    calibration H), on the weight error (``"weight"``), or keep the greedy scales (``"none"``).
    ``point_rounding`` (multipoint): ``"nearest"`` = the paper's greedy points (each rounds the
    residual to nearest); ``"gptq"`` (default) = also a second, output-aware point sequence whose
    codes come from GPTQ column sweeps with error feedback (docs/ALGORITHM.md section 1, "beyond the
    paper"; dampening ``point_damp`` of the mean diagonal of H, ``gptq_act_order`` applies), and
    each channel keeps whichever sequence has the lower output error at its allocated count.
    Measured on EfficientNet-Lite0 (KL to FP32, benchmarks/compare_methods.py): W4A8 0.096 -> 0.035,
    W3A16 0.576 -> 0.203, W2A16 3.48 -> 2.14. ``point_damp`` is 0.1 rather than GPTQ's 0.01
    (benchmarks/point_damp.py: Lite0 W4A8 KL 0.043 -> 0.035, MiniLM W4A16 cosine 0.9710 -> 0.9796):
    the calibration H comes from float inputs, while later layers of the quantized model see the
    earlier layers' errors.

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

    ``method``: a registered weight quantizer (``mpq.methods.available()``): ``"multipoint"``, or
    ``"rtn"`` (one point per channel, range ``rtn_range``).

    The baselines (docs/ALGORITHM.md section 5), one point per channel on the same symmetric per-channel
    grid, whose scale follows ``rtn_range`` (min-max or MSE-optimal) for all of them:
    ``"gptq"`` (dampening ``gptq_damp`` of the mean diagonal of H, columns in act-order when
    ``gptq_act_order``); ``"adaround"`` (``adaround_iters`` Adam steps at ``adaround_lr``,
    regulariser weight ``adaround_lambda``); ``"ocs"`` (outlier channel splitting at
    ``ocs_expand_ratio``, halving the weights above ``ocs_split_threshold`` times the split
    channel's maximum, quantization-aware halves when ``ocs_grid_aware``); ``"ilp"`` (a bit width
    per layer from ``ilp_bits`` by an exact integer program under the ``avg_bits`` budget, then
    round with the one-point method ``ilp_rounding``: ``"rtn"``, ``"gptq"``, ``"adaround"`` or
    ``"adaquant"``); ``"adaquant"`` (``adaquant_iters`` Adam steps on the weights' offsets at
    ``adaquant_lr`` and on the log step sizes at ``adaquant_scale_lr``; tunes the bias too);
    ``"companding"`` (non-uniform, a per-layer companding function with
    ``companding_breakpoints`` intervals, ``companding_iters`` Adam steps at ``companding_lr``; runs
    as a codebook layer, see ``mpq/methods/companding.py``). ``bn_reestimation`` re-collects the
    statistics of every folded BatchNorm on the quantized model and refolds them (after any
    method, after bias correction): with the BN's running statistics as the reference
    (``bn_reference="running"``, the paper's) or mapped to the float layer's output statistics on
    the same calibration data (``"float"``, the default: the paper's mode hurts with small
    calibration sets, e.g. 8-bit RTN on EfficientNet-Lite0 KL 0.013 -> 1.16 vs 0.0013; see
    ``mpq/bn_reestimate.py``). ``bias_correction``
    adds (W - W_q) E[x] to every quantized layer's bias, after any method.
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
    method: str = "multipoint"
    rtn_range: str = "minmax"
    exact_fit: bool = False
    scale_refit: str = "output"
    point_rounding: str = "gptq"
    verify: bool = True
    gptq_damp: float = 0.01
    point_damp: float = 0.1
    hessian_budget_mb: float = 1024.0
    gptq_act_order: bool = False
    adaround_iters: int = 500
    adaround_lr: float = 5e-2
    adaround_lambda: float = 0.01
    adaquant_iters: int = 300
    adaquant_lr: float = 3e-3
    adaquant_scale_lr: float = 1e-2
    companding_breakpoints: int = 16
    companding_iters: int = 150
    companding_lr: float = 2e-2
    bn_reestimation: bool = False
    bn_reference: str = "float"
    ocs_expand_ratio: float = 0.05
    ocs_split_threshold: float = 0.5
    ocs_grid_aware: bool = False
    bias_correction: bool = False
    ilp_bits: tuple[int, ...] = (2, 3, 4, 8)
    ilp_rounding: str = "rtn"
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
            ("scale_refit", _SCALE_REFITS),
            ("point_rounding", _POINT_ROUNDINGS),
        ):
            if getattr(self, name) not in allowed:
                fail(name, f"to be one of {allowed}")
        from mpq.methods.base import available  # the registry: methods may be added by plugins

        if self.method not in available():
            fail("method", f"to be one of {available()}")
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
        for name in ("exact_fit", "verify"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "to be a bool")
        self._check_methods(fail, is_int)
        if not is_int(self.version) or self.version < 1:
            fail("version", "to be an int >= 1")
        if self.version > CONFIG_VERSION:
            fail("version", f"<= {CONFIG_VERSION} (written by a newer mpq)")

    def _check_methods(self, fail: Any, is_int: Any) -> None:
        """Validate the options of the baseline methods (gptq, adaround, ocs, ilp, bias correction)."""

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        for name in ("gptq_act_order", "ocs_grid_aware", "bias_correction", "bn_reestimation"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "to be a bool")
        for name in ("gptq_damp", "point_damp"):
            if not is_num(getattr(self, name)) or not 0 < getattr(self, name) <= 1:
                fail(name, "to be a number in (0, 1]")
        if not is_int(self.adaround_iters) or self.adaround_iters < 1:
            fail("adaround_iters", "to be an int >= 1")
        if not is_num(self.adaround_lr) or not self.adaround_lr > 0:
            fail("adaround_lr", "to be a number > 0")
        if not is_num(self.adaround_lambda) or self.adaround_lambda < 0:
            fail("adaround_lambda", "to be a number >= 0")
        for name in ("adaquant_iters", "companding_iters", "companding_breakpoints"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                fail(name, "to be an int >= 1")
        for name in ("adaquant_lr", "adaquant_scale_lr", "companding_lr"):
            if not is_num(getattr(self, name)) or not getattr(self, name) > 0:
                fail(name, "to be a number > 0")
        if not is_num(self.ocs_expand_ratio) or not 0 < self.ocs_expand_ratio <= 1:
            fail("ocs_expand_ratio", "to be a number in (0, 1]")
        if not is_num(self.ocs_split_threshold) or not 0 <= self.ocs_split_threshold < 1:
            fail("ocs_split_threshold", "to be a number in [0, 1)")
        if isinstance(self.ilp_bits, (list, tuple)):
            self.ilp_bits = tuple(self.ilp_bits)
        if (
            not isinstance(self.ilp_bits, tuple)
            or not self.ilp_bits
            or not all(is_int(b) and MIN_W_BITS <= b <= MAX_W_BITS for b in self.ilp_bits)
            or len(set(self.ilp_bits)) != len(self.ilp_bits)
        ):
            fail("ilp_bits", f"to be a non-empty tuple of distinct ints in {MIN_W_BITS}..{MAX_W_BITS}")
        if self.ilp_rounding not in _ILP_ROUNDINGS:
            fail("ilp_rounding", f"to be one of {_ILP_ROUNDINGS}")
        if self.bn_reference not in _BN_REFERENCES:
            fail("bn_reference", f"to be one of {_BN_REFERENCES}")

    @property
    def budget_bits(self) -> float:
        """Average bits per weight allowed for the multipoint layers."""
        if self.method == "rtn":
            return self.w_bits + 0.0
        return float(self.avg_bits) if self.avg_bits is not None else self.w_bits + 0.5

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> QuantConfig:
        """A preset by name ("W4A8", "W4A16", "W3A16", "W2A16", "W8A8") with field overrides."""
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
        """A validated copy with some fields changed."""
        self._check_field_names("mpq.QuantConfig.replace", changes)
        return dataclasses.replace(self, **changes)

    @classmethod
    def _check_field_names(cls, where: str, d: dict[str, Any]) -> None:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{where}: unknown fields {sorted(unknown)}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ignore"] = list(self.ignore)
        d["ilp_bits"] = list(self.ilp_bits)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        if not isinstance(d, dict):
            raise TypeError(
                f"mpq.QuantConfig.from_dict: expected d to be a dict of QuantConfig fields, got {type(d).__name__}"
            )
        cls._check_field_names("mpq.QuantConfig.from_dict", d)
        d = dict(d)
        if "ignore" in d:
            d["ignore"] = tuple(d["ignore"])
        return cls(**d)
