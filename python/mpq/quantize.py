"""``mpq.quantize``: copy -> fold BatchNorm -> calibrate -> fit -> allocate points -> swap."""
from __future__ import annotations

import copy
import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from mpq.activation import activation_qparams
from mpq.bn_reestimate import reestimate_batchnorm
from mpq.allocate import LayerErrors, allocate_points, output_energy, output_errors
from mpq.calibrate import QuantTarget, calibrate, collect_batches, find_targets, fisher_sensitivity
from mpq.config import QuantConfig
from mpq.fold import _set_submodule, fold_batchnorm
from mpq.methods import FittedWeight, LayerContext, corrected_bias, get_method
from mpq.methods.companding import build_companded
from mpq.nn import MultipointConv2d, MultipointLinear
from mpq.refit import refit_scales
from mpq.simulate import SimulationCheck, check_simulation

logger = logging.getLogger("mpq")

__all__ = ["quantize", "QuantReport", "LayerReport"]


@dataclass
class LayerReport:
    name: str
    shape: Tuple[int, int]  # (C_out, D)
    w_bits: int
    points_histogram: List[int]  # channels with 1, 2, ... max_points points
    bits_per_weight: float
    output_sqnr_db: float
    fit_seconds: float


@dataclass
class QuantReport:
    """What ``quantize`` did: per layer, the layers kept in float, and totals."""

    config: QuantConfig
    layers: List[LayerReport] = field(default_factory=list)
    float_layers: List[Tuple[str, str]] = field(default_factory=list)
    folded_batchnorm_names: List[str] = field(default_factory=list)  # BatchNorms folded and replaced by Identity
    # "simulation = deployment" (mpq.simulate.check_simulation), after packing, on the model's device:
    simulation_error: float = float("nan")  # end-to-end relative L2, deployed vs simulated (reported, not checked)
    simulation_checks: List["SimulationCheck"] = field(default_factory=list)  # per layer, per checked dtype
    seconds: Dict[str, float] = field(default_factory=dict)

    @property
    def folded_batchnorms(self) -> int:
        """How many BatchNorms were folded (their names: ``folded_batchnorm_names``)."""
        return len(self.folded_batchnorm_names)

    @property
    def avg_bits(self) -> float:
        """Average bits per weight over all quantized layers (codes and scales)."""
        bits = sum(l.bits_per_weight * l.shape[0] * l.shape[1] for l in self.layers)
        return bits / max(1, sum(l.shape[0] * l.shape[1] for l in self.layers))


_REPORTS: "weakref.WeakKeyDictionary[nn.Module, QuantReport]" = weakref.WeakKeyDictionary()


def last_report(qmodel: nn.Module) -> Optional[QuantReport]:
    """The report of the ``quantize`` call that produced ``qmodel`` in this process, if any."""
    return _REPORTS.get(qmodel)


def _build_module(
    t: QuantTarget, points: int, bits: int, has_bias: Optional[bool] = None, codebook: Optional[torch.Tensor] = None
) -> nn.Module:
    m = t.module
    has_bias = m.bias is not None if has_bias is None else has_bias
    if codebook is not None:  # non-uniform levels (companding): a codebook layer
        return build_companded(t, bits, codebook, has_bias)
    # Built on the layer's device (no .to(): a move to a GPU would pack the still empty weight).
    with torch.device(m.weight.device):
        if t.kind == "linear":
            q = MultipointLinear(m.in_features, m.out_features, points, bits, bias=has_bias)
        else:
            q = MultipointConv2d(
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
                pre_padding=t.pre_padding,
                same_padding=t.same_padding,
            )
    return q


def _best_sequences(paths, path_errors: torch.Tensor, counts: torch.Tensor):
    """(codes, scales): for each channel, the point sequence of ``paths`` whose output error
    ``path_errors`` [S, C, P] is lowest at the channel's count."""
    C = counts.numel()
    rows = torch.arange(C)
    best = path_errors[:, rows, (counts.long().cpu() - 1).clamp_min(0)].argmin(0)
    codes = torch.stack([c.cpu() for c, _ in paths])[best, rows]
    scales = torch.stack([a.cpu() for _, a in paths])[best, rows]
    return codes.to(paths[0][0].device), scales.to(paths[0][1].device)


def quantize(
    model: nn.Module,
    calib_loader: Iterable,
    config: Union[str, QuantConfig, dict, None] = "W4A8",
    *,
    inplace: bool = False,
    device: Union[str, torch.device, None] = None,
) -> nn.Module:
    """Quantize ``model``'s Conv2d and Linear layers with multipoint weights (or RTN).

    Args:
        model: an ``nn.Module``; left untouched unless ``inplace=True``.
        calib_loader: iterable of input tensors or (input, target) pairs; at most
            ``config.calib_batches`` batches are used, read in one pass, and only the first
            ``max(1, config.sensitivity_batches)`` of them are held in memory.
        config: a preset name ("W4A8", "W4A16", "W3A16", "W2A16", "W8A8"), a ``QuantConfig`` or a dict.
        device: where to calibrate and fit (default: the model's device).

    Returns:
        The quantized model (eval mode), with ``MultipointConv2d`` / ``MultipointLinear`` layers.
    """
    cfg = QuantConfig.from_any(config)
    if not isinstance(model, nn.Module):
        raise TypeError(f"mpq.quantize: expected model to be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"mpq.quantize: expected inplace to be a bool, got {type(inplace).__name__}")
    params = list(model.parameters())
    inferred = device is None
    if device is None:
        device = params[0].device if params else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"mpq.quantize: expected device to be a torch.device or a device string, got {device!r} ({e})") from None
    if device.type == "meta":
        raise ValueError(
            "mpq.quantize: expected device to hold data, got the meta device"
            + (" (where the model's parameters are: load its weights first)" if inferred else "")
        )
    report = QuantReport(cfg)
    t_start = time.perf_counter()
    batches = collect_batches(calib_loader, cfg.calib_batches, device, keep=cfg.sensitivity_batches)

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

    qmodel = model if inplace else copy.deepcopy(model)
    qmodel.eval().to(device)
    targets, skipped = find_targets(qmodel, cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    # Calibrate (the one pass over the loader, which checks every batch) before folding
    # BatchNorm, so that a bad batch leaves even an inplace model's weights as they were. Folding
    # keeps every layer's input (the BN follows the conv) and the conv modules themselves.
    stats = calibrate(qmodel, targets, batches, cfg, generator)
    bn_originals: Dict[str, nn.Module] = {}  # conv -> its folded BatchNorm, for bn_reestimation
    folded = fold_batchnorm(qmodel, batches[0][: min(2, batches[0].shape[0])], originals=bn_originals)
    report.folded_batchnorm_names = [bn for _, bn in folded]
    targets = sorted((t for t in targets if t.name in stats), key=lambda t: stats[t.name].order)
    if cfg.first_last != "same" and len(targets) >= 2:
        targets[0].role, targets[-1].role = "first", "last"
    if cfg.first_last == "float":
        skipped += [(t.name, "first/last layer kept in float (config.first_last)") for t in targets if t.role != "inner"]
        targets = [t for t in targets if t.role == "inner"]
    report.seconds["calibrate"] = time.perf_counter() - t_start

    # Per-channel weights of the output errors.
    sensitivity: Optional[Dict[str, torch.Tensor]] = None
    t0 = time.perf_counter()
    method = get_method(cfg.method)
    if (method.multipoint or hasattr(method, "choose_bits")) and cfg.sensitivity != "relative":
        output = "gaussian" if cfg.sensitivity == "fisher_gaussian" else "auto"
        sensitivity = fisher_sensitivity(qmodel, targets, batches[: cfg.sensitivity_batches], output, generator)
        if sensitivity is None:
            logger.info("mpq: the model's output has no floating tensor; using relative sensitivity")
    report.seconds["sensitivity"] = time.perf_counter() - t0

    # Fit every layer once with max_points points; the first k points are the k-point fit.
    fitted = {}
    codebooks: Dict[str, torch.Tensor] = {}  # non-uniform methods' per-layer levels
    errors: Dict[str, LayerErrors] = {}
    fit_seconds: Dict[str, float] = {}
    alternatives: Dict[str, tuple] = {}
    t0 = time.perf_counter()
    # Hook: a method may choose each layer's bit width before fitting (ILP bit allocation).
    chosen_bits: Dict[str, int] = method.choose_bits(targets, stats, cfg, sensitivity) if hasattr(method, "choose_bits") else {}
    for t in targets:
        tl = time.perf_counter()
        w = t.weight_matrix().to(torch.float32)
        special = t.role != "inner"
        bits = 8 if special else chosen_bits.get(t.name, cfg.w_bits)
        s = stats[t.name]
        fit = method.fit(LayerContext(t, w, s, bits, 1 if special else cfg.max_points, cfg))
        codes, scales = fit.codes, fit.scales
        points = codes.shape[1]
        e = output_errors(w.cpu(), fit.levels().cpu(), scales.cpu(), s, t.groups)
        if fit.alternatives:  # each channel will keep the sequence that is best at its count
            paths = [(codes, scales)] + list(fit.alternatives)
            path_errors = torch.stack([e] + [output_errors(w.cpu(), c.cpu(), a.cpu(), s, t.groups) for c, a in fit.alternatives])
            alternatives[t.name] = (paths, path_errors)
            e = path_errors.amin(0)
        energy = output_energy(w.cpu(), s, t.groups)
        if sensitivity is not None and t.name in sensitivity:
            sens = sensitivity[t.name].double()
        else:
            sens = torch.full((w.shape[0],), 1.0 / max(float(energy.sum()), 1e-30), dtype=torch.float64)
        fitted[t.name] = (codes, scales, bits, points, energy, fit.bias, fit.num_points)
        if fit.codebook is not None:
            codebooks[t.name] = fit.codebook
        errors[t.name] = LayerErrors(e, w.shape[1], w.shape[1] * bits + cfg.scale_bits, sens)
        fit_seconds[t.name] = time.perf_counter() - tl
    report.seconds["fit"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    inner = {t.name: errors[t.name] for t in targets if t.role == "inner"}
    if method.multipoint and cfg.max_points > 1 and inner:
        counts = allocate_points(inner, cfg.budget_bits, cfg.scope)
    else:
        counts = {}
    report.seconds["allocate"] = time.perf_counter() - t0

    for t in targets:
        codes, scales, bits, points, energy, new_bias, own_points = fitted[t.name]
        C, D = t.weight_matrix().shape
        n = counts.get(t.name, own_points.cpu() if own_points is not None else torch.ones(C, dtype=torch.int32))
        if t.name in alternatives:
            codes, scales = _best_sequences(*alternatives[t.name], n)
        if method.multipoint and cfg.scale_refit != "none":
            scales = refit_scales(t.weight_matrix().float(), codes, scales, n, stats[t.name], t.groups, cfg.scale_refit)
            errors[t.name].errors = output_errors(t.weight_matrix().float().cpu(), codes.cpu(), scales.cpu(), stats[t.name], t.groups)
        if cfg.bias_correction:  # on the weight each channel finally keeps (after the refit)
            kept = (torch.arange(points)[None, :] < n[:, None]).double() * scales.double().cpu()
            wq = (kept[:, :, None] * FittedWeight(codes, scales, codebook=codebooks.get(t.name)).levels().cpu()).sum(1)
            base = new_bias if new_bias is not None else t.module.bias
            new_bias = corrected_bias(t.weight_matrix().cpu(), wq, base, stats[t.name].mean)
        q = _build_module(t, points, bits, has_bias=new_bias is not None or t.module.bias is not None, codebook=codebooks.get(t.name))
        q.set_weight(
            codes.reshape([C, q.max_points] + q.code_shape),
            scales,
            n,
            new_bias if new_bias is not None else t.module.bias,
        )
        a_bits = cfg.a_bits if t.role == "inner" or cfg.a_bits is None else 8
        if a_bits is not None:
            s = stats[stats[t.name].input_leader or t.name]  # one quantizer per input tensor
            q.set_act_qparams(*activation_qparams(s.act_values, s.act_min, s.act_max, a_bits, cfg.act_range))
        noise = float(errors[t.name].errors[torch.arange(C), (n.long() - 1).clamp_min(0)].sum())
        q.output_sqnr_db = float(10 * torch.log10(torch.tensor(max(float(energy.sum()), 1e-30) / max(noise, 1e-30))))
        _set_submodule(qmodel, t.name, q)
        hist = torch.bincount(n.long(), minlength=points + 1)[1:].tolist()
        layer = LayerReport(t.name, (C, D), bits, hist, q.bits_per_weight(), q.output_sqnr_db, fit_seconds[t.name])
        report.layers.append(layer)
        logger.info(
            "mpq: %-40s %5d x %-5d %d-bit points %s  %.2f bits/weight  SQNR %.1f dB  %.2fs",
            t.name, C, D, bits, hist, layer.bits_per_weight, layer.output_sqnr_db, layer.fit_seconds,
        )
    if cfg.bn_reestimation and bn_originals:  # on the quantized model, after bias correction
        t0 = time.perf_counter()
        float_modules = {t.name: t.module for t in targets} if cfg.bn_reference == "float" else None
        reestimate_batchnorm(qmodel, bn_originals, batches[: max(1, cfg.sensitivity_batches)], float_modules)
        report.seconds["bn_reestimation"] = time.perf_counter() - t0
    report.float_layers = skipped
    for mod in qmodel.modules():  # on a GPU: the packed weights of the fused kernels, once, here
        if isinstance(mod, (MultipointLinear, MultipointConv2d)) and mod.point_codes.is_cuda and mod._packable():
            mod.pack_()
    if cfg.verify:  # the deployed model as it will run: after packing, on its device
        t0 = time.perf_counter()
        report.simulation_checks.append(check_simulation(qmodel, batches[0]))
        if device.type == "cuda" and batches[0].is_floating_point():  # the fused float16 kernels
            report.simulation_checks.append(check_simulation(qmodel, batches[0], dtype=torch.float16))
        report.simulation_error = report.simulation_checks[0].end_to_end
        report.seconds["verify"] = time.perf_counter() - t0
    if skipped:
        logger.warning("mpq: %d weighted layers stay in float: %s", len(skipped), "; ".join(f"{n} ({r})" for n, r in skipped))
    report.seconds["total"] = time.perf_counter() - t_start
    logger.info(
        "mpq: quantized %d layers, %.3f bits per weight on average, %.1fs", len(report.layers), report.avg_bits, report.seconds["total"]
    )
    _REPORTS[qmodel] = report
    return qmodel
