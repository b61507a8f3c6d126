"""A float simulation of a quantized model in plain PyTorch, and the check that the deployed
kernels compute what it says ("simulation = deployment").

The check is per layer: one forward of the deployed model, with hooks on every quantized layer
(multipoint and codebook layers), and each layer's output compared element by element with the
same layer recomputed from the same input in float64. The bound is the worst-case rounding error
of a dot product of length K in the kernel's arithmetic (see :func:`layer_bound`), so it holds on
every CPU code path (AVX2, AVX-512, AMX, the scalar one) and every summation order, and one wrong
channel cannot hide in a model-wide norm. The end-to-end difference between the deployed model
and :func:`simulate` is measured and reported, but never raised on: 8-bit activation roundings
that flip on last-bit differences travel through a network and make it depend on the CPU.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpq.activation import fake_quantize
from mpq.nn.modules import MultipointConv2d, MultipointLayer, MultipointLinear, same_padding

__all__ = ["simulate", "check_simulation", "SimulationCheck", "LayerCheck", "output_difference"]


def _dense_weight(m: MultipointLayer) -> torch.Tensor:
    """sum_{k < n_j} scales[j, k] code_values(codes)[j, k] with torch ops only, in float32."""
    codes, scales = m.unpacked()
    keep = (torch.arange(m.max_points, device=scales.device)[None, :] < m.num_points[:, None]).float()
    coeff = (scales * keep).reshape(*scales.shape, *([1] * (codes.dim() - 2)))
    return (coeff * m.code_values(codes).float()).sum(1)


class _Simulated(nn.Module):
    def __init__(self, m: MultipointLayer):
        super().__init__()
        self.source = m
        self.register_buffer("weight", _dense_weight(m))

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        qp: torch.Tensor | None = self.source.act_qparams
        if qp is None:
            return x
        s, zp, qmin, qmax = qp.tolist()
        return fake_quantize(x, s, int(zp), int(qmin), int(qmax))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.source
        b = m.bias.to(x.dtype) if m.bias is not None else None
        if isinstance(m, MultipointLinear):
            return F.linear(self._quantize_input(x), self.weight.to(x.dtype), b)
        if m.same_padding:
            x = F.pad(x, same_padding(x, m.kernel_size, m.stride, m.dilation))
        elif m.pre_padding:
            x = F.pad(x, m.pre_padding)
        return F.conv2d(self._quantize_input(x), self.weight.to(x.dtype), b, m.stride, m.padding, m.dilation, m.groups)


def simulate(qmodel: nn.Module) -> nn.Module:
    """A copy of ``qmodel`` whose multipoint layers are plain-PyTorch float simulations
    (dequantized weight, fake-quantized input): no mpq op runs in it."""
    sim = copy.deepcopy(qmodel)
    for name, m in list(sim.named_modules()):
        if isinstance(m, (MultipointConv2d, MultipointLinear)):
            parent_name, _, child = name.rpartition(".")
            parent = sim.get_submodule(parent_name) if parent_name else sim
            setattr(parent, child, _Simulated(m))
    return sim


# ---- the per-layer check ------------------------------------------------------------------------


@dataclass
class LayerCheck:
    """One layer's deployed output against its float64 recomputation from the same input."""

    name: str
    elements: int  # output elements compared
    max_ratio: float  # max over elements of |deployed - float64| / bound (the check passes at <= 1)
    max_abs_error: float
    boundary_levels: float  # fraction of input elements whose x/s is within a few ulps of a rounding boundary


@dataclass
class SimulationCheck:
    """What :func:`check_simulation` measured: every quantized layer, and the end-to-end
    relative L2 difference between the deployed model and :func:`simulate` (reported only)."""

    layers: list[LayerCheck] = field(default_factory=list)
    end_to_end: float = float("nan")
    dtype: str = "float32"

    @property
    def max_ratio(self) -> float:
        return max((l.max_ratio for l in self.layers), default=0.0)


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def _accumulation_roundoff(x: torch.Tensor, kind: str) -> float:
    """The unit roundoff of the products and sums inside the layer's kernel: float64 for float64
    inputs, float32 otherwise (the fp16/bf16 kernels accumulate in float32), TF32 where cuBLAS /
    cuDNN are allowed to use it for float32 inputs."""
    if x.dtype == torch.float64:
        return 2.0**-53
    if x.is_cuda and x.dtype == torch.float32:
        tf32 = torch.backends.cudnn.allow_tf32 if kind == "conv" else torch.backends.cuda.matmul.allow_tf32
        if tf32:
            return 2.0**-11
    return 2.0**-24


def _padded_input(m: MultipointLayer, x: torch.Tensor) -> torch.Tensor:
    if isinstance(m, MultipointLinear) or not hasattr(m, "kernel_size"):
        return x
    if m.same_padding:
        return F.pad(x, same_padding(x, m.kernel_size, m.stride, m.dilation))
    if len(m.pre_padding) > 0:
        return F.pad(x, m.pre_padding)
    return x


def _apply_layer(m: MultipointLayer, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if x.dim() >= 3 and hasattr(m, "kernel_size"):
        return F.conv2d(x, w, b, m.stride, m.padding, m.dilation, m.groups)
    return F.linear(x, w, b)


def layer_bound(m: MultipointLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(reference, bound, boundary fraction) for layer ``m`` on its input ``x`` (before padding).

    reference = the layer in float64: the dequantized weight W = sum_k a_k q_k and the input
    quantized in float64, levels L = clamp(round(x / s) + zp, qmin, qmax).
    bound = ((K + P + 3) u_acc + 2 u_in) (|W|·|fq(x)| + |b|) + u_out |reference|
            + s (|W|·1[x/s within 4 u |x/s| of a rounding boundary]),
    the worst case of a length-K dot product accumulated with unit roundoff u_acc (any order,
    any blocking), a weight dequantized from P points and rounded to the input dtype (u_in), an
    output rounded to the output dtype (u_out), and one level of slack where the kernel's own
    x / s may round the other way (``|W|`` is sum_k |a_k| |q_k|)."""
    kind = "linear" if isinstance(m, MultipointLinear) or not hasattr(m, "kernel_size") else "conv"
    u_acc = _accumulation_roundoff(x, kind)
    u_in = max(_unit_roundoff(x.dtype), u_acc)
    x64 = _padded_input(m, x.detach().to(torch.float64))
    codes, scales = m.unpacked()
    codes = codes.to(x64.device).double()
    keep = (torch.arange(m.max_points, device=codes.device)[None, :] < m.num_points.to(codes.device)[:, None]).double()
    coeff = (scales.to(codes.device).double() * keep).reshape(*scales.shape, *([1] * (codes.dim() - 2)))
    codes = m.code_values(codes)  # codebook levels, group scale x (code - zero), or the integers
    w = (coeff * codes).sum(1)  # exact in float64: at most 24 + 8 bits per product
    w_abs = (coeff.abs() * codes.abs()).sum(1)
    b = m.bias.detach().to(x64.device, torch.float64) if m.bias is not None else None
    qp = m.act_qparams
    boundary = None
    if qp is not None:
        s, zp, qmin, qmax = [float(v) for v in qp.detach().cpu().double().tolist()]
        t = x64 / s
        xq = (torch.clamp(torch.round(t) + zp, qmin, qmax) - zp) * s
        tie = (t - torch.floor(t) - 0.5).abs() <= 4 * u_in * t.abs().clamp_min(1.0)
        inside = (t + zp >= qmin - 0.5 - 1e-9) & (t + zp <= qmax + 0.5 + 1e-9)
        boundary = (tie & inside).double()
        frac = float(boundary.mean()) if boundary.numel() else 0.0
    else:
        s, xq, frac = 0.0, x64, 0.0
    P = m.max_points
    K = w[0].numel() if w.shape[0] else 0
    ref = _apply_layer(m, xq, w, b)
    spread = _apply_layer(m, xq.abs(), w_abs, None)
    if b is not None:  # the bias is one more term of the sum (kernels may start the sum from it)
        spread = spread + _bias_view(b, ref, kind)
    bound = ((K + P + 3) * u_acc + 2 * u_in) * spread + _unit_roundoff(x.dtype) * ref.abs()
    if boundary is not None and frac > 0:
        bound = bound + s * _apply_layer(m, boundary, w_abs, None)
    # Denormal floor: an output of exactly 0 vs 1e-45 is not an error.
    bound = bound + torch.finfo(x.dtype).tiny
    return ref, bound, frac


def _bias_view(b: torch.Tensor, ref: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "conv":
        return b.abs().view(1, -1, 1, 1).expand_as(ref)
    return b.abs().expand_as(ref)


def _check_layer(name: str, m: MultipointLayer, x: torch.Tensor, y: torch.Tensor, max_samples: int) -> LayerCheck:
    if x.dim() >= 2:  # the first items of the batch (rows of a Linear's 2-D input)
        x, y = x[:max_samples], y[:max_samples]
    ref, bound, frac = layer_bound(m, x)
    if ref.shape != y.shape:
        raise RuntimeError(
            f"mpq simulation check: layer {name!r} returned shape {tuple(y.shape)}, its float64 recomputation {tuple(ref.shape)}"
        )
    err = (y.detach().to(torch.float64) - ref).abs()
    if not bool(torch.isfinite(y).all()):
        where = tuple(int(i) for i in torch.nonzero(~torch.isfinite(y))[0])
        raise RuntimeError(f"mpq simulation check: layer {name!r} returned {float(y[where])} at element {where}")
    ratio = err / bound
    worst = int(ratio.argmax()) if ratio.numel() else 0
    check = LayerCheck(
        name,
        ratio.numel(),
        float(ratio.max()) if ratio.numel() else 0.0,
        float(err.max()) if err.numel() else 0.0,
        frac,
    )
    if check.max_ratio > 1.0:
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), ratio.shape))
        raise RuntimeError(
            f"mpq simulation check: layer {name!r} ({type(m).__name__}) disagrees with its float64 recomputation "
            f"at output element {idx}: deployed {float(y[idx]):.9g}, float64 {float(ref[idx]):.9g}, "
            f"difference {float(err[idx]):.3e} > bound {float(bound[idx]):.3e}"
        )
    return check


def output_difference(a: Any, b: Any, where: str = "output") -> float:
    """Relative L2 difference of two model outputs: tensors, or tuples/lists/dicts of them
    (the largest over the leaves). Any other output type raises: a check must not pass because
    it could not see the values."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if not a.is_floating_point():
            return 0.0 if torch.equal(a, b) else float("inf")
        return float((a.double() - b.double()).norm() / a.double().norm().clamp_min(1e-30))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        return max((output_difference(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b))), default=0.0)
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return max((output_difference(a[k], b[k], f"{where}[{k!r}]") for k in a), default=0.0)
    if a is None and b is None:
        return 0.0
    raise TypeError(
        f"mpq: cannot compare model outputs of type {type(a).__name__} and {type(b).__name__} at {where} "
        "(expected tensors, or tuples, lists or dicts of them)"
    )


def check_simulation(
    qmodel: nn.Module, example: torch.Tensor, dtype: torch.dtype | None = None, max_samples: int = 8
) -> SimulationCheck:
    """Run ``example`` through the deployed ``qmodel`` once with a hook on every quantized layer,
    recompute each layer from its recorded input in float64 and compare element-wise against
    :func:`layer_bound` (on the first ``max_samples`` items of the batch). Raises RuntimeError
    naming the layer, the element and the bound when one disagrees; returns the per-layer results
    and the end-to-end difference to :func:`simulate` (measured, not checked).

    ``dtype``: run a copy of the model and the example in this floating dtype (float16/bfloat16:
    the fused GPU kernels); default: as they are."""
    model = qmodel
    if dtype is not None:
        model = copy.deepcopy(qmodel).to(dtype)
        if example.is_floating_point():
            example = example.to(dtype)
    result = SimulationCheck(
        dtype=str(dtype or next((p.dtype for p in model.parameters()), torch.float32)).replace("torch.", "")
    )
    failures: list[BaseException] = []

    def hook(name: str):
        def fn(mod: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if failures:
                return
            try:
                with torch.no_grad():
                    result.layers.append(_check_layer(name, mod, inputs[0], output, max_samples))
            except RuntimeError as e:
                failures.append(e)

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, MultipointLayer)]
    try:
        with torch.no_grad():
            deployed = model(example)
    finally:
        for h in handles:
            h.remove()
    if failures:
        raise failures[0]
    with torch.no_grad():
        simulated = simulate(model)(example)
    result.end_to_end = output_difference(simulated, deployed)
    return result
