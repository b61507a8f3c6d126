"""Integer-programming bit allocation (Hubara, Nahshan, Hanani, Banner, Soudry, "Accurate Post
Training Quantization With Small Calibration Sets", ICML 2021 (AdaQuant / CalibTIP), section 4;
Yao et al., "HAWQ-V3: Dyadic Neural Network Quantization", ICML 2021, section 3.3).

Every layer l gets one bit width b from ``ILPConfig.bits`` (default {2, 3, 4, 8}); the choice
minimises the summed sensitivity sum_l Omega_l(b_l) under a size budget, solved exactly as a
0-1 integer program with ``scipy.optimize.milp`` (HiGHS): one binary x_lb per layer and width,
sum_b x_lb = 1 per layer, sum_lb size_lb x_lb <= budget.

- Omega_l(b) = sum_j s_lj (w_j - w_j^(b))^T H_l (w_j - w_j^(b)): the layer-output error of the
  layer quantized at b bits by the one-point method ``ILPConfig.rounding`` (``"rtn"``: round to
  nearest; ``"gptq"``, ``"adaround"``, ``"adaquant"``, or their configs: that method at width b), with
  H_l the centred second moment H - mu mu^T when the bias will absorb the mean output shift (the
  method tunes the bias, as AdaQuant does, or ``config.bias_correction``), weighted per output
  channel exactly like the multipoint allocation (``allocate.py``): the Fisher
  sensitivity of the model's output to the channel (``config.sensitivity="fisher"``) or
  1 / the layer's output energy (``"relative"``). CalibTIP measures the loss increase of each
  layer quantized alone and HAWQ-V3 a Hessian trace times the weight perturbation; both are
  second-order estimates of the same loss increase as this one.
- size_lb = C_l (D_l b + scale_bits) bits (codes and one scale per output channel), budget =
  ``config.budget_bits`` (``avg_bits``, default ``w_bits + 0.5``) times the weights of the layers
  in the program: the same accounting as the multipoint budget, so both run at equal size. Layers
  pinned to 8 bits by ``first_last="8bit"`` are outside the program, as they are outside the
  multipoint budget.

``mpq.quantize`` calls ``choose_bits`` before fitting (the per-layer bits hook), then ``fit`` at
the chosen width; the fits made for the program are reused.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from mpq.layout import MAX_W_BITS, MIN_W_BITS, point_bits
from mpq.methods.adaquant import centred_moment
from mpq.methods.base import (
    FittedWeight,
    LayerContext,
    MethodConfig,
    WeightQuantizer,
    config_types,
    get_method,
    method_config,
    register,
)
from mpq.methods.uniform import channel_scales, layer_hessian, round_to_grid, weighted_error

if TYPE_CHECKING:  # pragma: no cover
    from mpq.calibrate import LayerStats, QuantTarget
    from mpq.config import QuantConfig

logger = logging.getLogger("mpq")

__all__ = ["ILPConfig", "ILPQuantizer", "solve_bit_allocation"]

ILP_ROUNDINGS = ("rtn", "gptq", "adaround", "adaquant")  # the one-point uniform methods


@dataclass(frozen=True)
class ILPConfig(MethodConfig):
    """ILP's options: the candidate widths ``bits``, and the one-point method that rounds each
    layer at its width, ``rounding``: a name of ``ILP_ROUNDINGS`` (with its defaults) or that
    method's config, e.g. ``ILPConfig(rounding=GPTQConfig(act_order=True))``."""

    bits: tuple[int, ...] = (2, 3, 4, 8)
    rounding: Any = "rtn"  # str | MethodConfig; a MethodConfig once built

    legacy_fields: ClassVar[dict[str, str]] = {"ilp_bits": "bits", "ilp_rounding": "rounding"}

    def check(self) -> None:
        if isinstance(self.bits, list):
            object.__setattr__(self, "bits", tuple(self.bits))
        if (
            not isinstance(self.bits, tuple)
            or not self.bits
            or not all(
                isinstance(b, int) and not isinstance(b, bool) and MIN_W_BITS <= b <= MAX_W_BITS for b in self.bits
            )
            or len(set(self.bits)) != len(self.bits)
        ):
            self._fail("bits", f"to be a non-empty tuple of distinct ints in {MIN_W_BITS}..{MAX_W_BITS}")
        try:
            rounding = method_config(self.rounding, ILP_ROUNDINGS)
        except ValueError:
            rounding = None
        if rounding is None:
            self._fail("rounding", f"to be one of {ILP_ROUNDINGS} or its method config")
        object.__setattr__(self, "rounding", rounding)

    @classmethod
    def legacy_names(cls) -> set[str]:
        return set(cls.legacy_fields).union(
            *(t.legacy_names() for t in config_types() if t.method_name in ILP_ROUNDINGS)
        )

    @classmethod
    def from_legacy(cls, flat: dict[str, Any]) -> ILPConfig:
        """``ilp_bits``, ``ilp_rounding`` and the rounding method's own version-1 fields (``gptq_damp``, ...)."""
        rounding = flat.get("ilp_rounding", "rtn")
        if rounding in ILP_ROUNDINGS:
            rounding = get_method(rounding).config_type.from_legacy(flat)
        return cls(**({"bits": flat["ilp_bits"]} if "ilp_bits" in flat else {}), rounding=rounding)


def solve_bit_allocation(costs: np.ndarray, sizes: np.ndarray, budget: int) -> list[int]:
    """The exact solution of min sum_l costs[l, c_l] subject to sum_l sizes[l, c_l] <= budget.

    Args:
        costs (float [L, B]): cost of each layer at each choice.
        sizes (int [L, B]): size in bits of each layer at each choice.
        budget: total bits allowed.

    Returns:
        the chosen column c_l of every layer. If even the smallest choices exceed the budget, the
        smallest size of every layer (with a warning).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    costs = np.asarray(costs, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.int64)
    L, B = costs.shape
    if sizes.shape != (L, B):
        raise ValueError(f"mpq.methods.ilp: expected sizes {costs.shape}, got {sizes.shape}")
    budget = int(budget)
    smallest = sizes.argmin(axis=1)
    if int(sizes.min(axis=1).sum()) > budget:
        logger.warning(
            "mpq: the smallest bit widths already need %d bits, above the budget of %d; every layer takes its smallest width",
            int(sizes.min(axis=1).sum()),
            budget,
        )
        return smallest.tolist()
    # Normalised costs keep HiGHS's absolute tolerances meaningful whatever the error scale.
    scale = float(np.abs(costs).max()) or 1.0
    one_per_layer = LinearConstraint(np.kron(np.eye(L), np.ones(B)), 1, 1)
    within_budget = LinearConstraint(sizes.reshape(1, -1).astype(np.float64), -np.inf, budget)
    res = milp(
        (costs / scale).ravel(),
        integrality=np.ones(L * B),
        bounds=Bounds(0, 1),
        constraints=[one_per_layer, within_budget],
        options={"mip_rel_gap": 0.0},
    )
    if res.x is None:
        raise RuntimeError(f"mpq.methods.ilp: the bit-allocation program failed: {res.message}")
    choice = res.x.reshape(L, B).argmax(axis=1)
    if int(sizes[np.arange(L), choice].sum()) > budget:  # tolerance of the solver; never seen
        raise RuntimeError("mpq.methods.ilp: the solver's allocation exceeds the budget")
    return choice.tolist()


def _rtn_fit(w: torch.Tensor, bits: int, rule: str) -> FittedWeight:
    scale = channel_scales(w, bits, rule)
    codes = round_to_grid(w.double(), scale, bits).to(torch.int8)
    return FittedWeight(codes[:, None, :].cpu(), scale.float()[:, None].cpu())


@register
class ILPQuantizer(WeightQuantizer):
    """Per-layer bit widths from an exact integer program, then the one-point method
    ``ILPConfig.rounding`` at each layer's width (round to nearest, GPTQ, AdaRound, AdaQuant)."""

    name = "ilp"
    config_type = ILPConfig

    def __init__(self) -> None:
        self._fits: dict[tuple[str, int], FittedWeight] = {}
        self.chosen: dict[str, int] = {}
        self.program: dict[str, dict[int, float]] = {}  # layer -> bits -> weighted output error

    def _fit(
        self, target: QuantTarget, w: torch.Tensor, stats: LayerStats, bits: int, config: QuantConfig
    ) -> FittedWeight:
        key = (target.name, bits)
        if key not in self._fits:
            rounding: MethodConfig = config.options.rounding
            if rounding.method_name == "rtn":
                self._fits[key] = _rtn_fit(w, bits, config.rtn_range)
            else:  # the rounding method, with its own options
                ctx = LayerContext(target, w, stats, bits, 1, config.replace(method=rounding))
                self._fits[key] = get_method(rounding.method_name).fit(ctx)
        return self._fits[key]

    @property
    def uses_sensitivity(self) -> bool:
        return True  # the integer program weighs each layer's output error by it

    def choose_bits(
        self,
        targets: Sequence[QuantTarget],
        stats: dict[str, LayerStats],
        config: QuantConfig,
        sensitivity: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, int]:
        """Bits per layer name for the layers in the program (role "inner")."""
        layers = [t for t in targets if t.role == "inner"]
        if not layers:
            return {}
        widths = sorted(config.options.bits)
        costs = np.zeros((len(layers), len(widths)))
        sizes = np.zeros((len(layers), len(widths)), dtype=np.int64)
        total_weights = 0
        for i, t in enumerate(layers):
            w = t.weight_matrix().float().cpu()
            C, D = w.shape
            total_weights += C * D
            H = layer_hessian(stats[t.name], t.groups, config.hessian_budget_mb, t.name, "ilp")
            if sensitivity is not None and t.name in sensitivity:
                sens = sensitivity[t.name].double().cpu()
            else:
                sens = torch.full((C,), 1.0 / max(float(weighted_error(w, H).sum()), 1e-30), dtype=torch.float64)
            self.program[t.name] = {}
            for k, b in enumerate(widths):
                fit = self._fit(t, w, stats[t.name], b, config)
                wq = fit.scales[:, 0].double()[:, None] * fit.codes[:, 0].double()
                centred = config.bias_correction or fit.bias is not None  # the bias removes the mean shift
                Hb = centred_moment(H, stats[t.name].mean) if centred else H
                costs[i, k] = float((sens * weighted_error(w - wq, Hb)).sum())
                sizes[i, k] = C * point_bits(D, b, config.scale_bits)
                self.program[t.name][b] = costs[i, k]
        budget = int(np.floor(config.budget_bits * total_weights + 1e-6))
        choice = solve_bit_allocation(costs, sizes, budget)
        self.chosen = {t.name: widths[c] for t, c in zip(layers, choice)}
        used = int(sizes[np.arange(len(layers)), choice].sum())
        logger.info(
            "mpq: ilp bits per layer %s, %.3f bits per weight (budget %.3f)",
            {b: sum(1 for v in self.chosen.values() if v == b) for b in widths},
            used / total_weights,
            config.budget_bits,
        )
        return dict(self.chosen)

    def fit(self, ctx: LayerContext) -> FittedWeight:
        return self._fit(ctx.target, ctx.weight.float().cpu(), ctx.stats, ctx.bits, ctx.config)
