"""``mpq.integer_only``: a model from ``mpq.quantize`` -> an integer-only model (HAWQ-V3 style).

How the conversion works:

1. Trace the quantized model with ``torch.fx`` (``MultipointConv2d`` / ``MultipointLinear`` are
   leaves) and run the calibration inputs through it, keeping per node a sample of its float
   values and its range (for the grids that no layer defines) and its shapes.
2. Drop identities (``Identity`` left by BatchNorm folding, ``Dropout``); classify every node,
   raising a ``ValueError`` that names the first unsupported one. Supported: multipoint conv
   (grouped, depthwise, dilated, static or dynamic 'same' padding) and linear, ReLU / ReLU6 /
   hardtanh / clamp with constant bounds, residual adds of two tensors,
   max pooling, adaptive average pooling to 1x1 and means over dims, flatten / view / reshape /
   squeeze / unsqueeze / permute / transpose / contiguous, and shape arithmetic (``x.size(0)``).
3. Fuse: a residual add one of whose operands is a layer output used only by that add becomes
   that layer's requantization with a residual input (``conv(x) + r``, as HAWQ-V3 adds the
   identity branch to the int32 accumulator); a clamp (ReLU) is folded into the requantization
   clamp of the op that produces its input when nothing else reads the unclamped value.
4. Grids. Ops that keep values on their input's grid (clamps, max pooling, shape ops) share one
   grid with it: a *value class*. A class's grid is the activation grid (``act_qparams``) of the
   first quantized layer that reads it; other quantized readers with a different grid get an
   ``IntegerRequant`` in front. A class that no quantized layer reads is calibrated: the model's
   output on a signed ``output_bits`` grid spanning twice the calibrated max |y|; any other (in
   ResNets: the downsample branch, added to conv2's output, and the last block's output, which
   feeds the average pool) on an ``aux_bits`` grid by ``mpq.activation.activation_qparams`` (``aux_range``: MSE-optimal
   clipping, percentile or min-max of the float values of the fake-quantized model, unsigned when
   never negative).
5. Emit a new ``torch.fx`` graph of ``mpq.integer.modules`` and wrap it between the input's
   quantization and the output's dequantization.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from mpq.activation import activation_qparams
from mpq.calibrate import ACT_SAMPLE_SIZE, Reservoir
from mpq.integer.dyadic import common_shift
from mpq.integer.modules import (
    DequantizeOutput,
    IntegerAdd,
    IntegerClamp,
    IntegerConv2d,
    IntegerLinear,
    IntegerMean,
    IntegerModel,
    IntegerRequant,
    QuantizeInput,
    storage_dtype,
)
from mpq.nn.dequantized import DequantizedLayer
from mpq.nn.modules import MultipointConv2d, MultipointLayer, MultipointLinear

__all__ = ["integer_only", "simulate_integer", "layerwise_differences", "Grid"]

_ACT_RANGES = ("mse", "percentile", "minmax")
# Fixed-point sums stay below 2^62 (int64 with a factor 2 to spare).
_INT64_BUDGET = 2.0**62


class Grid(NamedTuple):
    """A per-tensor integer grid: real value = (q - zero_point) * scale, q in [qmin, qmax]."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int

    @property
    def span(self) -> int:
        """max |q - zero_point| over the grid."""
        return max(abs(self.qmin - self.zero_point), abs(self.qmax - self.zero_point))

    def code(self, real: float) -> int:
        """The code of a real bound (clamp limits), unclamped: zp + round(real / scale)."""
        return self.zero_point + int(round(real / self.scale))


def _act_grid(m: MultipointLayer) -> Grid:
    s, zp, qmin, qmax = m.act_qparams.tolist()
    return Grid(float(s), int(zp), int(qmin), int(qmax))


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, MultipointLayer) or super().is_leaf_module(m, qualname)


# ---- calibration ------------------------------------------------------------------------------


class _NodeStats:
    def __init__(self, generator: torch.Generator):
        self.lo = math.inf
        self.hi = -math.inf
        self.values = Reservoir(ACT_SAMPLE_SIZE, generator)
        self.generator = generator

    def add(self, t: torch.Tensor) -> None:
        flat = t.detach().reshape(-1)
        if flat.numel() == 0:
            return
        self.lo = min(self.lo, float(flat.min()))
        self.hi = max(self.hi, float(flat.max()))
        pick = torch.randint(flat.numel(), (min(flat.numel(), 8192),), generator=self.generator)
        self.values.add(flat[pick.to(flat.device)].float().cpu())


class _Recorder(fx.Interpreter):
    """Runs the traced float (fake-quantized) model and keeps, per node, whether it made a
    tensor, its shape on the first batch, and value statistics of float tensors."""

    def __init__(self, gm: fx.GraphModule, generator: torch.Generator):
        super().__init__(gm)
        self.generator = generator
        self.values: dict[str, Any] = {}  # first batch: the node's output (tensors: their meta)
        self.stats: dict[str, _NodeStats] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name not in self.values:
            self.values[n.name] = (
                torch.empty(out.shape, dtype=out.dtype, device="meta") if isinstance(out, torch.Tensor) else out
            )
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            self.stats.setdefault(n.name, _NodeStats(self.generator)).add(out)
        return out


def _batches(example_inputs: torch.Tensor | Iterable, max_batches: int) -> list[torch.Tensor]:
    items = [example_inputs] if isinstance(example_inputs, torch.Tensor) else example_inputs
    out: list[torch.Tensor] = []
    for i, item in enumerate(items):
        if i >= max_batches:
            break
        x = item[0] if isinstance(item, (tuple, list)) and item else item
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(
                "mpq.integer_only: expected example_inputs to be a float tensor or an iterable of float tensors "
                f"or (input, target) pairs, got {type(x).__name__}"
                + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else "")
            )
        out.append(x)
    if not out:
        raise ValueError("mpq.integer_only: example_inputs yielded no batch")
    return out


# ---- node classification -----------------------------------------------------------------------

_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.AlphaDropout)
_IDENTITY_FUNCTIONS = (F.dropout, F.dropout2d, F.dropout1d, F.alpha_dropout, torch.nn.functional.dropout)
_IDENTITY_METHODS = ("contiguous", "detach")
_SHAPE_FUNCTIONS = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose)
_SHAPE_METHODS = ("view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose")
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)
_SUPPORTED = (
    "MultipointConv2d/MultipointLinear (with activation quantization), ReLU/ReLU6/Hardtanh/clamp, residual add "
    "of two tensors, MaxPool2d, AdaptiveAvgPool2d(1)/mean, flatten/view/reshape/squeeze/unsqueeze/permute/transpose, "
    "Identity/Dropout, shape arithmetic"
)


class _Kind(NamedTuple):
    kind: str  # input output layer identity clamp maxpool mean add shape meta
    info: Any = None


def _describe(n: fx.Node, gm: fx.GraphModule) -> str:
    if n.op == "call_module":
        return f"call_module {n.target!r} of type {type(gm.get_submodule(n.target)).__name__}"
    if n.op == "call_function":
        return f"call_function {getattr(n.target, '__name__', n.target)}"
    return f"{n.op} {n.target!r}"


def _unsupported(n: fx.Node, gm: fx.GraphModule, why: str = "") -> ValueError:
    return ValueError(
        f"mpq.integer_only: unsupported node {n.name!r} ({_describe(n, gm)}){': ' + why if why else ''}. "
        f"Supported: {_SUPPORTED}"
    )


def _const(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _classify(n: fx.Node, gm: fx.GraphModule, values: dict[str, Any]) -> _Kind:
    if n.op == "placeholder":
        return _Kind("input")
    if n.op == "output":
        return _Kind("output")
    out = values.get(n.name)
    if not isinstance(out, torch.Tensor):
        ok = (
            out is None
            or isinstance(out, (int, bool, torch.Size))
            or (isinstance(out, (tuple, list)) and all(isinstance(v, int) for v in out))
        )
        if not ok:
            raise _unsupported(n, gm, f"it produces a {type(out).__name__}, not a tensor or shape arithmetic")
        return _Kind("meta")
    if not out.is_floating_point():
        raise _unsupported(n, gm, f"it produces a {out.dtype} tensor in the float model")
    args = n.args
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if isinstance(m, MultipointLayer):
            if isinstance(m, DequantizedLayer):
                raise ValueError(
                    f"mpq.integer_only: layer {n.target!r} is a {type(m).__name__}, whose codes stand for table levels "
                    "or group-wise scaled values; integer-only inference needs integer codes with one scale per point "
                    "(multipoint or the per-channel methods)"
                )
            if m.act_qparams is None:
                raise ValueError(
                    f"mpq.integer_only: layer {n.target!r} has float activations (a_bits=None); integer-only inference "
                    "needs activation quantization (quantize with a config such as 'W4A8' or 'W8A8')"
                )
            return _Kind("layer", m)
        if isinstance(m, _IDENTITY_MODULES):
            return _Kind("identity")
        if isinstance(m, nn.ReLU):
            return _Kind("clamp", (0.0, math.inf))
        if isinstance(m, nn.Hardtanh):  # ReLU6 included
            return _Kind("clamp", (float(m.min_val), float(m.max_val)))
        if isinstance(m, nn.MaxPool2d):
            if m.return_indices:
                raise _unsupported(n, gm, "return_indices=True")
            return _Kind("maxpool")
        if isinstance(m, nn.AdaptiveAvgPool2d):
            size = m.output_size if isinstance(m.output_size, (tuple, list)) else (m.output_size, m.output_size)
            if tuple(size) != (1, 1):
                raise _unsupported(n, gm, f"only output_size 1 is supported, got {m.output_size}")
            return _Kind("mean", ([-2, -1], True))
        if isinstance(m, nn.Flatten):
            return _Kind("shape")
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            raise _unsupported(
                n,
                gm,
                "a BatchNorm that was not folded (mpq.quantize folds a BatchNorm2d only when a Conv2d feeds it directly)",
            )
        raise _unsupported(n, gm)
    if n.op == "call_function":
        f = n.target
        if f in _IDENTITY_FUNCTIONS:
            if n.kwargs.get("training", args[2] if len(args) > 2 else True):
                raise _unsupported(n, gm, "dropout with training=True")
            return _Kind("identity")
        if f in _RELU_FUNCTIONS:
            return _Kind("clamp", (0.0, math.inf))
        if f is F.relu6:
            return _Kind("clamp", (0.0, 6.0))
        if f is F.hardtanh:
            lo = n.kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
            hi = n.kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
            return _Kind("clamp", (float(lo), float(hi)))
        if f in (torch.clamp, torch.clip):
            return _clamp_kind(n, gm, args[1:], n.kwargs)
        if f in (F.max_pool2d, torch.max_pool2d):
            if n.kwargs.get("return_indices", False):
                raise _unsupported(n, gm, "return_indices=True")
            return _Kind("maxpool")
        if f is F.adaptive_avg_pool2d:
            size = n.kwargs.get("output_size", args[1] if len(args) > 1 else None)
            if size not in (1, (1, 1), [1, 1]):
                raise _unsupported(n, gm, f"only output_size 1 is supported, got {size}")
            return _Kind("mean", ([-2, -1], True))
        if f is torch.mean:
            return _mean_kind(n, gm, args[1:], n.kwargs)
        if f in _ADD_FUNCTIONS:
            return _add_kind(n, gm, args, n.kwargs, values)
        if f in _SHAPE_FUNCTIONS:
            return _Kind("shape")
        raise _unsupported(n, gm)
    if n.op == "call_method":
        name = n.target
        if name in _IDENTITY_METHODS:
            return _Kind("identity")
        if name in ("relu", "relu_"):
            return _Kind("clamp", (0.0, math.inf))
        if name in ("clamp", "clamp_", "clip"):
            return _clamp_kind(n, gm, args[1:], n.kwargs)
        if name == "mean":
            return _mean_kind(n, gm, args[1:], n.kwargs)
        if name in ("add", "add_"):
            return _add_kind(n, gm, args, n.kwargs, values)
        if name in _SHAPE_METHODS:
            return _Kind("shape")
        raise _unsupported(n, gm)
    raise _unsupported(n, gm)


def _clamp_kind(n, gm, args, kwargs) -> _Kind:
    lo = kwargs.get("min", args[0] if len(args) > 0 else None)
    hi = kwargs.get("max", args[1] if len(args) > 1 else None)
    if not all(v is None or _const(v) for v in (lo, hi)):
        raise _unsupported(n, gm, "clamp bounds must be constants")
    return _Kind("clamp", (-math.inf if lo is None else float(lo), math.inf if hi is None else float(hi)))


def _mean_kind(n, gm, args, kwargs) -> _Kind:
    dims = kwargs.get("dim", args[0] if len(args) > 0 else None)
    keepdim = kwargs.get("keepdim", args[1] if len(args) > 1 else False)
    if dims is None or "dtype" in kwargs:
        raise _unsupported(n, gm, "mean needs explicit dims and no dtype")
    dims = [dims] if isinstance(dims, int) else list(dims)
    return _Kind("mean", (dims, bool(keepdim)))


def _add_kind(n, gm, args, kwargs, values) -> _Kind:
    tensors = [isinstance(a, fx.Node) and isinstance(values.get(a.name), torch.Tensor) for a in args]
    if kwargs.get("alpha", 1) != 1 or len(args) != 2 or not all(tensors):
        raise _unsupported(n, gm, "only the sum of two tensors is supported (no constants, no alpha)")
    return _Kind("add")


# ---- fixed point ----------------------------------------------------------------------------------


def _fixed_point(
    reals: torch.Tensor, bias: torch.Tensor, bounds: torch.Tensor, bits: int, where: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer multipliers m [R, K], bias [R] and one shift [R] per row such that
    ``(sum_k m[r, k] t_k + bias_int[r]) / 2^shift[r] ~ sum_k reals[r, k] t_k + bias[r]`` with every
    |t_k| <= bounds[r, k]: the row's largest |real| gets a ``bits``-bit multiplier, and the shift
    is lowered where the int64 sum could otherwise exceed 2^62."""
    reals = reals.to(torch.float64)
    bias = bias.to(torch.float64)
    bounds = bounds.to(torch.float64)
    shift = common_shift(reals, bits)
    while True:
        scale = torch.ldexp(torch.ones_like(bias), shift)
        m = torch.round(reals * scale[:, None])
        b = torch.round(bias * scale)
        total = (m.abs() * bounds).sum(1) + b.abs() + scale
        over = total >= _INT64_BUDGET
        if not bool(over.any()):
            break
        if bool((shift[over] == 0).any()):
            raise ValueError(f"mpq.integer_only: {where}: the requantization cannot fit int64 (multipliers too large)")
        need = torch.ceil(torch.log2(total / _INT64_BUDGET)).clamp_min(1).to(torch.int64)
        shift = torch.where(over, (shift - need).clamp_min(0), shift)
    return m.to(torch.int64), b.to(torch.int64), shift


def _weighted_module(
    m: MultipointLayer, x_grid: Grid, out: Grid, lo: int, hi: int, res_grid: Grid | None, bits: int, name: str
) -> nn.Module:
    codes = m.codes.detach().cpu()
    C, P = m.scales.shape
    n = m.num_points.detach().cpu().long()
    used = torch.arange(P)[None, :] < n[:, None]
    reals = x_grid.scale * m.scales.detach().cpu().double() / out.scale * used
    bias = (
        m.bias.detach().cpu().double() / out.scale if m.bias is not None else torch.zeros(C, dtype=torch.float64)
    ) + out.zero_point
    code_sums = codes.reshape(C, P, -1).long().abs().sum(-1).double()  # sum_i |q_jki|
    acc_bound = x_grid.span * code_sums  # max |acc_jk|
    bounds = acc_bound
    if res_grid is not None:
        reals = torch.cat([reals, torch.full((C, 1), res_grid.scale / out.scale, dtype=torch.float64)], 1)
        bounds = torch.cat([bounds, torch.full((C, 1), float(res_grid.span), dtype=torch.float64)], 1)
    mult, bias_int, shift = _fixed_point(reals, bias, bounds, bits, f"layer {name!r}")
    acc_dtype = torch.int32 if float(acc_bound.max()) < 2.0**31 else torch.int64
    groups = m.groups if isinstance(m, MultipointConv2d) else 1
    if groups == 1:  # pack the extra points of the channels that have them
        j, k = torch.nonzero(used[:, 1:], as_tuple=True)
        k = k + 1
        num_slabs = 1 if j.numel() else 0
    else:  # grouped: one full slab of all channels per extra point index (unused points are zero)
        p_used = int(n.max())
        k = torch.arange(1, p_used).repeat_interleave(C)
        j = torch.arange(C).repeat(max(0, p_used - 1))
        num_slabs = max(0, p_used - 1)
    kw = dict(
        weight0=codes[:, 0],
        mult0=mult[:, 0],
        weight_extra=codes[j, k],
        mult_extra=mult[j, k],
        extra_channel=j,
        num_slabs=num_slabs,
        bias=bias_int,
        residual_mult=mult[:, P] if res_grid is not None else None,
        shift=shift,
        real=[reals[:, 0], reals[j, k], bias, reals[:, P] if res_grid is not None else torch.zeros(C)],
        in_zero_point=x_grid.zero_point,
        residual_zero_point=res_grid.zero_point if res_grid is not None else 0,
        lo=lo,
        hi=hi,
        out_dtype=storage_dtype(out.qmin, out.qmax),
        acc_dtype=acc_dtype,
    )
    if isinstance(m, MultipointLinear):
        return IntegerLinear(**kw)
    kernel_size, dilation = list(m.kernel_size), list(m.dilation)
    if dilation != [1, 1]:  # ATen has no int32 dilated conv: insert the zeros into the kernel
        kernel_size = [dilation[0] * (kernel_size[0] - 1) + 1, dilation[1] * (kernel_size[1] - 1) + 1]
        for key in ("weight0", "weight_extra"):
            w = kw[key]
            z = w.new_zeros(list(w.shape[:2]) + kernel_size)
            z[:, :, :: dilation[0], :: dilation[1]] = w
            kw[key] = z
        dilation = [1, 1]
    return IntegerConv2d(
        stride=m.stride,
        padding=m.padding,
        dilation=dilation,
        groups=m.groups,
        kernel_size=kernel_size,
        pre_padding=m.pre_padding,
        same_padding_=m.same_padding,
        **kw,
    )


def _scalar_kw(
    reals: list[float], bounds: list[float], out: Grid, lo: int, hi: int, bits: int, name: str
) -> dict[str, Any]:
    r = torch.tensor([reals], dtype=torch.float64)
    b = torch.tensor([float(out.zero_point)], dtype=torch.float64)
    mult, bias_int, shift = _fixed_point(r, b, torch.tensor([bounds], dtype=torch.float64), bits, name)
    return dict(
        mult=mult[0],
        real_mult=r[0],
        bias=int(bias_int[0]),
        real_bias=float(out.zero_point),
        shift=int(shift[0]),
        lo=lo,
        hi=hi,
        out_dtype=storage_dtype(out.qmin, out.qmax),
    )


# ---- the conversion ------------------------------------------------------------------------------


def integer_only(
    qmodel: nn.Module,
    example_inputs: torch.Tensor | Iterable,
    *,
    aux_bits: int = 8,
    aux_range: str = "mse",
    output_bits: int = 16,
    multiplier_bits: int = 31,
    max_batches: int = 32,
) -> IntegerModel:
    """Convert a model returned by ``mpq.quantize`` (with activation quantization) into an
    integer-only model (HAWQ-V3 style): integer activations between layers (8-bit grids stored
    as uint8/int8), int32 accumulation per multipoint point, dyadic requantization (int64
    multiply, rounding arithmetic right shift) onto the next layer's activation grid, BatchNorm
    already folded by ``mpq.quantize``. No floating-point tensor is made inside the network:
    floats remain only in ``quantize_input`` (the input) and ``dequantize_output`` (the output).

    Args:
        qmodel: the quantized model (not modified). Its graph must be traceable by torch.fx with
            the multipoint layers as leaves; unsupported nodes raise a ``ValueError`` naming them.
        example_inputs: a float batch, or an iterable of batches (or (input, target) pairs; at
            most ``max_batches``): they fix the shapes and calibrate the grids that no layer
            defines (the output and the non-fused branch of two-layer residual adds). Use the
            deployed input size: average pooling fixes its element count.
        aux_bits, aux_range: bits and range method ("mse", "percentile", "minmax") of those
            intermediate grids.
        output_bits: bits of the output's signed grid (range: twice the calibrated max |y|).
        multiplier_bits: bits of the largest dyadic multiplier of each requantization; the
            default 31 fits int32 (as in HAWQ-V3), and the relative error of each real multiplier
            is then at most 2^-31. Up to 62, lowered per channel where the int64 sum needs it.

    Returns:
        An ``IntegerModel`` on the CPU: ``forward(x)`` takes and returns float32 like ``qmodel``;
        ``forward_integer(x_q)`` / ``.body`` map integer input codes to integer output codes.
        ``mpq.integer.simulate_integer(model)`` is its float64 reference.
    """
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"mpq.integer_only: expected qmodel to be a torch.nn.Module, got {type(qmodel).__name__}")
    layers = [name for name, m in qmodel.named_modules() if isinstance(m, MultipointLayer)]
    if not layers:
        raise ValueError("mpq.integer_only: qmodel has no multipoint layer; quantize it with mpq.quantize first")
    for name, v in (("aux_bits", aux_bits), ("output_bits", output_bits)):
        if not isinstance(v, int) or isinstance(v, bool) or not 2 <= v <= 16:
            raise ValueError(f"mpq.integer_only: expected {name} to be an int in 2..16, got {v!r}")
    if not isinstance(multiplier_bits, int) or isinstance(multiplier_bits, bool) or not 8 <= multiplier_bits <= 62:
        raise ValueError(f"mpq.integer_only: expected multiplier_bits to be an int in 8..62, got {multiplier_bits!r}")
    if aux_range not in _ACT_RANGES:
        raise ValueError(f"mpq.integer_only: expected aux_range to be one of {_ACT_RANGES}, got {aux_range!r}")
    batches = _batches(example_inputs, max_batches)

    try:
        graph = _Tracer().trace(qmodel)
    except Exception as e:  # fx raises many types for untraceable code
        raise ValueError(f"mpq.integer_only: torch.fx cannot trace the model ({type(e).__name__}: {e})") from e
    gm = fx.GraphModule(qmodel, graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ValueError(f"mpq.integer_only: expected a model with one tensor input, got {len(placeholders)} inputs")
    recorder = _Recorder(gm, torch.Generator().manual_seed(0))
    device = next((b.device for b in qmodel.buffers()), torch.device("cpu"))
    was_training = qmodel.training
    qmodel.eval()
    try:
        with torch.no_grad():
            for x in batches:
                recorder.run(x.to(device))
    finally:
        qmodel.train(was_training)

    plan = _Plan(gm, graph, recorder, aux_bits, aux_range, output_bits)
    body, gin, gout = _emit(plan, multiplier_bits)
    return IntegerModel(
        QuantizeInput(gin.scale, gin.zero_point, gin.qmin, gin.qmax),
        body,
        DequantizeOutput(gout.scale, gout.zero_point),
    ).eval()


class _Plan:
    """The analysis of the traced graph: node kinds, fused adds and clamps, value classes and
    their grids (steps 2 to 4 of the module docstring)."""

    def __init__(
        self, gm: fx.GraphModule, graph: fx.Graph, recorder: _Recorder, aux_bits: int, aux_range: str, output_bits: int
    ):
        self.gm = gm
        self.recorder = recorder
        self.kinds = {n: _classify(n, gm, recorder.values) for n in graph.nodes}
        for n in list(graph.nodes):  # identities: every use goes to the identity's input
            if self.kind(n) == "identity":
                n.replace_all_uses_with(n.args[0])
                graph.erase_node(n)
        self.nodes = list(graph.nodes)
        self.input = next(n for n in self.nodes if n.op == "placeholder")
        out_value = self.nodes[-1].args[0]
        if not isinstance(out_value, fx.Node) or not isinstance(recorder.values.get(out_value.name), torch.Tensor):
            raise ValueError("mpq.integer_only: expected a model whose output is one tensor")
        self.out_value: fx.Node = out_value
        self._fuse_adds()
        self._classes()
        self._grids(aux_bits, aux_range, output_bits)

    def kind(self, n: fx.Node) -> str:
        return self.kinds[n].kind

    def value_users(self, n: fx.Node) -> list[fx.Node]:
        return [u for u in n.users if self.kind(u) != "meta"]

    def _fuse_adds(self) -> None:
        """A residual add one of whose operands is a layer read by nothing else is done by that
        layer's requantization: ``fused[add] = (layer, residual)``."""
        self.fused: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}
        self.absorbed = set()
        for n in self.nodes:
            if self.kind(n) != "add":
                continue
            a, b = n.args
            for layer, res in ((a, b), (b, a)):
                if (
                    a is not b
                    and self.kind(layer) == "layer"
                    and self.value_users(layer) == [n]
                    and layer not in self.absorbed
                ):
                    self.fused[n] = (layer, res)
                    self.absorbed.add(layer)
                    break

    def layer_of(self, n: fx.Node) -> fx.Node | None:
        """The multipoint layer call a node runs (itself, or the layer fused into an add)."""
        if self.kind(n) == "layer" and n not in self.absorbed:
            return n
        return self.fused[n][0] if n in self.fused else None

    def _classes(self) -> None:
        """root[n]: the node that produces n's codes. Shape ops and max pooling keep their
        input's grid; a clamp too when nothing else reads its unclamped input (``solo``), and
        then it is fused into the root's requantization (``fused_clamps``)."""
        self.root: dict[fx.Node, fx.Node] = {}
        solo: dict[fx.Node, bool] = {}
        self.fused_clamps: dict[fx.Node, list[fx.Node]] = {}
        for n in self.nodes:
            k = self.kind(n)
            if k in ("output", "meta") or n in self.absorbed:
                continue
            if k in ("shape", "maxpool") or (k == "clamp" and solo[n.args[0]]):
                src = n.args[0]
                self.root[n] = self.root[src]
                solo[n] = solo[src] and len(self.value_users(n)) == 1
                if k == "clamp":
                    self.fused_clamps.setdefault(self.root[n], []).append(n)
            else:
                self.root[n] = n
                solo[n] = len(self.value_users(n)) == 1
        self.members: dict[fx.Node, list[fx.Node]] = {}
        for n, r in self.root.items():
            self.members.setdefault(r, []).append(n)

    def _grids(self, aux_bits: int, aux_range: str, output_bits: int) -> None:
        """grid[root]: the first quantized reader's activation grid, else calibrated."""
        order = {n: i for i, n in enumerate(self.nodes)}
        stats = self.recorder.stats
        self.grid: dict[fx.Node, Grid] = {}
        for r, ms in self.members.items():
            inside = set(ms)
            # Layer calls (fused into an add or not) whose input is a member.
            readers = [u for m in ms for u in self.value_users(m) if self.kind(u) == "layer" and u.args[0] is m]
            if readers:
                self.grid[r] = _act_grid(self.gm.get_submodule(min(readers, key=order.__getitem__).target))
            elif self.out_value in inside:
                st = stats[self.out_value.name]
                top = max(abs(st.lo), abs(st.hi))
                qmax = 2 ** (output_bits - 1) - 1
                self.grid[r] = Grid(2.0 * top / qmax if top > 0 else 1.0, 0, -qmax - 1, qmax)
            else:
                feeding = [m for m in ms if any(u not in inside for u in self.value_users(m))] or ms
                values = torch.cat([stats[m.name].values.rows for m in feeding])
                lo, hi = min(stats[m.name].lo for m in feeding), max(stats[m.name].hi for m in feeding)
                s, zp, qmin, qmax = activation_qparams(values, lo, hi, aux_bits, aux_range)
                self.grid[r] = Grid(float(s), int(zp), int(qmin), int(qmax))

    def grid_of(self, n: fx.Node) -> Grid:
        return self.grid[self.root[n]]

    def bounds(self, r: fx.Node, clamps: list[fx.Node] | None = None) -> tuple[int, int]:
        """[lo, hi] of root r's codes: its grid's range and its fused clamps (or ``clamps``)."""
        g = self.grid[r]
        lo, hi = g.qmin, g.qmax
        for c in self.fused_clamps.get(r, []) if clamps is None else clamps:
            a, b = self.kinds[c].info
            if a > -math.inf:
                lo = max(lo, g.code(a))
            if b < math.inf:
                hi = min(hi, g.code(b))
        return lo, min(max(lo, hi), g.qmax)


def _emit(plan: _Plan, bits: int) -> tuple[fx.GraphModule, Grid, Grid]:
    """The integer graph (step 5), with the input's and the output's grids."""
    gm = plan.gm
    new = fx.Graph()
    body_root = nn.Module()
    env: dict[fx.Node, fx.Node] = {}
    requants: dict[tuple[fx.Node, Grid], fx.Node] = {}

    def call(name: str, module: nn.Module, args: tuple, kwargs: dict | None = None) -> fx.Node:
        body_root.add_module(name, module)
        return new.call_module(name, args, kwargs or {})

    def requant(have: Grid, want: Grid, lo: int, hi: int, where: str) -> IntegerRequant:
        kw = _scalar_kw([have.scale / want.scale], [have.span], want, lo, hi, bits, where)
        return IntegerRequant(zero_point=have.zero_point, **kw)

    def read(m: fx.Node, want: Grid, reader: str) -> fx.Node:
        """Node m's codes on grid ``want`` (through an IntegerRequant when its grid differs)."""
        have = plan.grid_of(m)
        if have == want:
            return env[m]
        if (m, want) not in requants:
            mod = requant(have, want, want.qmin, want.qmax, f"requant of {m.name!r}")
            requants[(m, want)] = call(f"{reader}_requant", mod, (env[m],))
        return requants[(m, want)]

    for n in plan.nodes:
        k = plan.kind(n)
        if n in plan.absorbed:
            continue
        if k == "input":
            env[n] = new.placeholder(n.name)
        elif k == "output":
            new.output(env[plan.out_value])
        elif k in ("meta", "shape", "maxpool"):  # the same op on the codes
            if n.op == "call_module":
                args, kwargs = fx.map_arg((n.args, n.kwargs), env.__getitem__)
                env[n] = call(n.name, copy.deepcopy(gm.get_submodule(n.target)), args, kwargs)
            else:
                env[n] = new.node_copy(n, env.__getitem__)
        elif k == "clamp" and plan.root[n] is not n:
            if plan.kind(plan.root[n]) == "input":  # the entry is not fused: clamp on the shared grid
                env[n] = call(n.name, IntegerClamp(*plan.bounds(plan.root[n], [n])), (env[n.args[0]],))
            else:  # done by the requantization of the class root
                env[n] = env[n.args[0]]
        elif k == "clamp":  # others read its input unclamped: requantize onto its own grid
            src = n.args[0]
            have, want = plan.grid_of(src), plan.grid[n]
            lo, hi = plan.bounds(n, [n] + plan.fused_clamps.get(n, []))
            mod = IntegerClamp(lo, hi) if have == want else requant(have, want, lo, hi, f"node {n.name!r}")
            env[n] = call(n.name, mod, (env[src],))
        elif plan.layer_of(n) is not None:
            layer = plan.layer_of(n)
            m = gm.get_submodule(layer.target)
            x_grid = _act_grid(m)
            residual = plan.fused[n][1] if n in plan.fused else None
            res_grid = plan.grid_of(residual) if residual is not None else None
            mod = _weighted_module(m, x_grid, plan.grid[n], *plan.bounds(n), res_grid, bits, layer.target)
            args = (read(layer.args[0], x_grid, n.name),) + ((env[residual],) if residual is not None else ())
            env[n] = call(n.name, mod, args)
        elif k == "add":
            a, b = n.args
            ga, gb, out = plan.grid_of(a), plan.grid_of(b), plan.grid[n]
            kw = _scalar_kw(
                [ga.scale / out.scale, gb.scale / out.scale],
                [ga.span, gb.span],
                out,
                *plan.bounds(n),
                bits,
                f"add {n.name!r}",
            )
            env[n] = call(n.name, IntegerAdd(zero_points=[ga.zero_point, gb.zero_point], **kw), (env[a], env[b]))
        elif k == "mean":
            src = n.args[0]
            shape = plan.recorder.values[src.name].shape
            dims, keepdim = plan.kinds[n].info
            dims = sorted({d % len(shape) for d in dims})
            count = math.prod(shape[d] for d in dims)
            g, out = plan.grid_of(src), plan.grid[n]
            kw = _scalar_kw(
                [g.scale / (count * out.scale)], [float(count * g.span)], out, *plan.bounds(n), bits, f"mean {n.name!r}"
            )
            env[n] = call(
                n.name, IntegerMean(dims=dims, keepdim=keepdim, count=count, zero_point=g.zero_point, **kw), (env[src],)
            )
        else:
            raise _unsupported(n, gm)
    body = fx.GraphModule(body_root, new, class_name="IntegerBody")
    return body, plan.grid[plan.input], plan.grid_of(plan.out_value)


def simulate_integer(model: IntegerModel) -> IntegerModel:
    """A copy of an integer-only model that runs the same pipeline in float64: the same grids,
    clamps and integer codes, but the real multipliers instead of the dyadic ones, and
    ``floor(v + 1/2)`` instead of the rounding shift. Its tensors are float64 holding integers."""
    if not isinstance(model, IntegerModel):
        raise TypeError(f"mpq.integer.simulate_integer: expected an IntegerModel, got {type(model).__name__}")
    sim = copy.deepcopy(model)
    for m in sim.modules():
        if hasattr(m, "simulate"):
            m.simulate = True
    return sim


def layerwise_differences(model: IntegerModel, x: torch.Tensor) -> dict[str, tuple[int, int, int]]:
    """Run ``x`` through ``model`` and give every module of its body that requantizes the same
    integer inputs in float64 with the real multipliers (``simulate_integer``). Returns, per
    module name, (max |int - sim| in output LSBs, number of differing codes, number of codes):
    what the dyadic approximation alone changes, layer by layer (at most 1 LSB by construction)."""
    sim = dict(simulate_integer(model).body.named_modules())
    out: dict[str, tuple[int, int, int]] = {}

    class _Compare(fx.Interpreter):
        def call_module(self, target, args, kwargs):
            y = super().call_module(target, args, kwargs)
            if getattr(sim[target], "simulate", False):
                ref = sim[target](*[a.double() if isinstance(a, torch.Tensor) else a for a in args])
                d = (y.double() - ref).abs()
                out[target] = (int(d.max()) if d.numel() else 0, int((d > 0).sum()), d.numel())
            return y

    with torch.no_grad():
        _Compare(model.body).run(model.quantize_input(x))
    return out
