"""Export to ONNX with standard operators only (QDQ): what ONNX Runtime and OpenVINO run.

A model with int8 activation grids is first put in the form of ``mpq.fuse_activations``: each
convolution writes the next layer's uint8 levels (residual add, clamp and quantizer fused after
it), which is where the runtimes' int8 patterns want them. Its multipoint layers then become
standard operators (README, "Export to ONNX Runtime and OpenVINO"):
- input: uint8 levels of the layer before, DequantizeLinear at (scale, zero point ``zp - qmin``);
  or a float input through mpq's input quantizer as QuantizeLinear / DequantizeLinear (a Clip
  first when the grid has fewer than 256 levels; the float formula with Round when it does not
  fit uint8 at all);
- weight: int8 codes stored as such (one byte per code in the file), one scale per row. A
  channel's points that merge exactly into one int8 row do so (the CPU kernels' rule: a_1 = r a_2
  with r whole and |r q_1 + q_2| <= ``max_int8_code``, ``mpq.ops.int8_merged_points``); the other
  channels are padded with zero rows to the layer's most rows per channel and summed on the weight
  (ReduceSum), then one convolution. Summing the outputs of a convolution over all rows instead
  ran EfficientNet-Lite0 3.8x slower in OpenVINO (benchmarks/NOTES.md);
- the convolution: one Conv, its padding (static or 'same' at the example's size) in its ``pads``
  (padding the dequantized input with 0.0 is padding with the level of 0.0), so that nothing
  stands between a DequantizeLinear and its Conv;
- output: ``+ residual`` (a float tensor, or uint8 levels through DequantizeLinear), the clamp
  (left out where it changes no level: a ReLU6 before a grid that ends at 6), QuantizeLinear.

A layer whose output is quantized right after its Conv (no residual, no clamp left) is the QDQ
pattern: its weight stays DequantizeLinear, and with one row per channel ONNX Runtime runs it as
QLinearConv and OpenVINO as an int8 convolution. Other layers of the fused form write their weight
as Cast and Mul, which the runtimes fold into a float constant at load (ONNX Runtime would
otherwise dequantize it on every call and miss its blocked convolution layout). NB: ONNX Runtime
quantizes a float weight that stands between quantized input and output to int8 itself, so a QDQ
layer's weight is never written as a float. ``requantize_rows=True`` rounds the weight of QDQ
layers with several rows per channel to one int8 row (per-channel symmetric, ``requantized_rows``):
they then run on the int8 kernels too, at a weight that is no longer mpq's (each weight moves by at
most half a step of that grid).

The rest of the model is exported by PyTorch's TorchScript-based ONNX exporter as usual.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from mpq.fold import set_submodule
from mpq.nn.fused import FusedMultipointConv2d
from mpq.nn.modules import MultipointConv2d, MultipointLayer, MultipointLinear, is_depthwise, same_padding

__all__ = ["export_onnx", "export_openvino", "exportable", "int8_rows", "requantized_rows", "OnnxMultipointLayer"]

# int8 codes that the runtimes' int8 kernels compute exactly on CPUs with VNNI (and AMX); without
# VNNI, x86 int8 kernels add pairs of uint8 x int8 products in a saturating int16 (mpq's own CPU
# kernels merge there only up to 64 under 8-bit activations, up to 127 under 7-bit ones:
# mpq.ops.int8_kernels_exact).
MAX_INT8_CODE = 127
OPSET = 17


def int8_rows(m: MultipointLayer, max_code: int = MAX_INT8_CODE) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's weight as int8 rows: (codes int8 [C, R, *code_shape], scales float32 [C, R]).

    Row 0 of a channel is its leading points merged exactly (as the CPU kernels merge them: each
    next point k joins while a_before == r a_k for a whole r >= 1, exactly, and the merged codes
    stay within ``max_code``), rows 1.. its further points; R is the layer's most rows per channel,
    shorter channels padded with zero codes at scale 1 (a channel without points: all zero)."""
    codes, scales = m.unpacked()
    C, P = scales.shape
    q = codes.reshape(C, P, -1).to(torch.int32)
    s = scales.double()
    n = m.num_points.long()
    merged, run = q[:, 0].clone(), s[:, 0].clone()
    first = torch.ones(C, dtype=torch.long)  # per channel, its first point that did not merge
    active = n >= 2
    for k in range(1, P):
        sk = s[:, k]
        ok = active & (n > k) & (sk > 0) & (run > 0)
        r = torch.where(ok, run / torch.where(sk > 0, sk, torch.ones_like(sk)), torch.zeros_like(sk)).round()
        ok &= (r >= 1) & (r <= max_code) & (sk * r == run)
        cand = r.to(torch.int32)[:, None] * merged + q[:, k]
        ok &= cand.abs().amax(1) <= max_code
        merged = torch.where(ok[:, None], cand, merged)
        run = torch.where(ok, sk, run)
        first = torch.where(ok, torch.full_like(first, k + 1), first)
        active = ok
    rows = torch.where(n > 0, n - first + 1, torch.zeros_like(n))
    R = max(int(rows.max()) if C else 0, 1)
    out_codes = torch.zeros(C, R, q.shape[2], dtype=torch.int32)
    out_scales = torch.ones(C, R, dtype=torch.float64)
    has = n > 0
    out_codes[has, 0] = merged[has]
    out_scales[has, 0] = run[has]
    for j in range(1, R):  # row j: point first - 1 + j of the channels that have it
        k = first - 1 + j
        sel = (j < rows).nonzero().flatten()
        out_codes[sel, j] = q[sel, k[sel]]
        out_scales[sel, j] = s[sel, k[sel]]
    return out_codes.to(torch.int8).reshape(C, R, *codes.shape[2:]), out_scales.float()


def _qparams(t: torch.Tensor) -> tuple[float, float, float, float]:
    """A quantizer's (scale, zero_point, qmin, qmax) tensor as Python floats."""
    s, zp, qmin, qmax = (float(v) for v in t.detach().cpu().double().tolist())
    return s, zp, qmin, qmax


def _grid(qparams: tuple[float, float, float, float]) -> tuple[float, int, int, bool]:
    """(scale, uint8 zero point, levels, whether it is a uint8 grid) of act_qparams (s, zp, qmin, qmax):
    the levels ``L - qmin`` of mpq's quantizer as ONNX's uint8 QuantizeLinear writes them."""
    s, zp, qmin, qmax = qparams
    uint8 = all(float(v).is_integer() for v in (zp, qmin, qmax)) and qmax - qmin <= 255
    return s, int(zp - qmin) if uint8 else 0, int(qmax - qmin) + 1 if uint8 else 0, uint8


def _const(g, value: float | int, dtype: torch.dtype):  # noqa: ANN001, ANN202 - the exporter's graph values
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


def requantized_rows(
    codes: torch.Tensor, scales: torch.Tensor, max_code: int = MAX_INT8_CODE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [C, R, ...] and their scales [C, R] rounded to one int8 row per channel: the weight
    sum_r a_r q_r (float64) at the symmetric per-channel scale max|w| / max_code, round half to even.
    Not mpq's weight: each weight moves by at most half that scale (an 8-bit grid per channel)."""
    C, R = scales.shape
    w = (codes.double() * scales.double().view(C, R, *([1] * (codes.dim() - 2)))).sum(1)
    step = w.reshape(C, -1).abs().amax(1) / max_code
    step = torch.where(step > 0, step, torch.ones_like(step)).float().double()  # float32 scales, exact steps
    q = torch.round(w / step.view(C, *([1] * (w.dim() - 1)))).clamp(-max_code, max_code)
    return q.to(torch.int8).unsqueeze(1), step.float().view(C, 1)


class _WeightRows(torch.autograd.Function):
    """int8 rows times one scale per row. Exported as DequantizeLinear (axis 0), the weight of the
    QDQ pattern that the runtimes run on their int8 kernels, or as Cast and Mul: a float weight
    that ONNX Runtime and OpenVINO fold into a constant when the session loads (the file keeps the
    int8 codes; ONNX Runtime never folds a DequantizeLinear: it would dequantize on every call and
    run the convolution without its blocked layout, measured in benchmarks/NOTES.md)."""

    @staticmethod
    def forward(ctx, codes: torch.Tensor, scales: torch.Tensor, dequantize_linear: bool) -> torch.Tensor:  # noqa: ARG004
        return codes.float() * scales.view(-1, *([1] * (codes.dim() - 1)))

    @staticmethod
    def symbolic(g, codes, scales, dequantize_linear: bool):  # noqa: ANN001, ANN205
        if dequantize_linear:
            return g.op("DequantizeLinear", codes, scales, axis_i=0)
        axes = g.op("Constant", value_t=torch.arange(1, codes.type().dim(), dtype=torch.int64))
        return g.op("Mul", g.op("Cast", codes, to_i=1), g.op("Unsqueeze", scales, axes))  # to_i=1: FLOAT


class _Dequantize(torch.autograd.Function):
    """uint8 levels to values at (scale, uint8 zero point): ONNX DequantizeLinear."""

    @staticmethod
    def forward(ctx, levels: torch.Tensor, scale: float, zero: int) -> torch.Tensor:  # noqa: ARG004
        # No "- 0": the exporter's peephole pass fails on such no-op nodes inside a function's trace.
        x = levels.float()
        return (x - zero if zero else x) * scale

    @staticmethod
    def symbolic(g, levels, scale: float, zero: int):  # noqa: ANN001, ANN205
        return g.op("DequantizeLinear", levels, _const(g, scale, torch.float32), _const(g, zero, torch.uint8))


class _Quantize(torch.autograd.Function):
    """Values to uint8 levels at (scale, uint8 zero point), rounding half to even and saturating
    at 0..255: ONNX QuantizeLinear."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float, zero: int) -> torch.Tensor:  # noqa: ARG004
        r = torch.round(x / scale)
        return torch.clamp(r + zero if zero else r, 0, 255).to(torch.uint8)  # no "+ 0" (_Dequantize)

    @staticmethod
    def symbolic(g, x, scale: float, zero: int):  # noqa: ANN001, ANN205
        return g.op("QuantizeLinear", x, _const(g, scale, torch.float32), _const(g, zero, torch.uint8))


class _Conv2d(torch.autograd.Function):
    """A convolution with zero padding given per side (top, left, bottom, right): one ONNX Conv with
    asymmetric ``pads``, so that no Pad stands between a DequantizeLinear and its Conv."""

    @staticmethod
    def forward(ctx, x, w, b, pads: list[int], stride: list[int], dilation: list[int], groups: int):  # noqa: ANN001, ARG004
        top, left, bottom, right = pads
        return F.conv2d(F.pad(x, [left, right, top, bottom]), w, b, stride, 0, dilation, groups)

    @staticmethod
    def symbolic(g, x, w, b, pads, stride, dilation, groups):  # noqa: ANN001, ANN205
        return g.op("Conv", x, w, b, pads_i=pads, strides_i=stride, dilations_i=dilation, group_i=groups)


def _quantize_input(x: torch.Tensor, qparams: tuple[float, float, float, float] | None) -> torch.Tensor:
    """mpq's input quantizer in exportable operators (module docstring)."""
    if qparams is None:
        return x
    s, zp, qmin, qmax = qparams
    scale, zero, levels, uint8 = _grid(qparams)
    if not uint8:  # no uint8 grid: the float formula (ONNX Round is half to even)
        return (torch.clamp(torch.round(x / s) + zp, qmin, qmax) - zp) * s
    if levels < 256:  # fewer levels than uint8 has: clip to the grid first
        x = torch.clamp(x, (qmin - zp) * s, (qmax - zp) * s)
    return torch.fake_quantize_per_tensor_affine(x, s, zero, 0, 255)


def _level(value: float, scale: float, zero: int) -> float:
    """The unsaturated level QuantizeLinear computes for ``value`` (in float32, as the runtimes do)."""
    return (
        float(torch.round(torch.tensor(value, dtype=torch.float32) / torch.tensor(scale, dtype=torch.float32))) + zero
    )


class OnnxMultipointLayer(nn.Module):
    """A multipoint layer in the operators of the module docstring.

    Unfused (``epilogue`` None): float in, float out. With the ``FusedMultipointConv2d`` that wraps
    it: ``x`` float or uint8 levels (at the layer's act_qparams), ``+ residual`` (float or uint8
    levels), clamp, and the output as uint8 levels where the fused layer writes them."""

    def __init__(
        self,
        m: MultipointLayer,
        max_code: int = MAX_INT8_CODE,
        epilogue: FusedMultipointConv2d | None = None,
        residual: bool = False,
        requantize: bool = False,
    ):
        super().__init__()
        qp = m.act_qparams
        self.act_qparams = None if qp is None else _qparams(qp)
        self.clamp: tuple[float, float] | None = None
        self.out_grid: tuple[float, int, int] | None = None
        self.residual_grid: tuple[float, int] | None = None
        if epilogue is not None:
            self._take_epilogue(epilogue)
        # The QDQ pattern: DequantizeLinear on input and weight, QuantizeLinear right after the
        # Conv. With one row per channel, ONNX Runtime fuses it into QLinearConv and OpenVINO into
        # an int8 convolution. Such a layer keeps its weight as DequantizeLinear even with several
        # rows: ONNX Runtime quantizes a float weight between quantized input and output to int8
        # per channel itself (measured), which would not be mpq's weight.
        self.qdq = self.out_grid is not None and not residual and self.clamp is None
        # Otherwise a fused layer's weight is Cast / Mul (_WeightRows), which the runtimes fold into a
        # float constant. An unfused layer's output may meet the next layer's QuantizeLinear, so it
        # keeps DequantizeLinear.
        self.dequantize_linear = self.qdq or epilogue is None
        # Depthwise int8 kernels widen each product into int32 on every CPU (measured in ONNX
        # Runtime and OpenVINO on AVX2: 9 x 255 x 127 exact), so max_code does not bound them.
        depthwise = isinstance(m, MultipointConv2d) and is_depthwise(m)
        code_limit = MAX_INT8_CODE if depthwise else max_code
        codes, scales = int8_rows(m, code_limit)
        if self.qdq and requantize and scales.shape[1] > 1:
            codes, scales = requantized_rows(codes, scales, code_limit)
        C, R = scales.shape
        self.channels, self.rows = C, R
        self.is_conv = isinstance(m, MultipointConv2d)
        self.register_buffer("codes", codes.reshape(C * R, *codes.shape[2:]).contiguous())
        self.register_buffer("scales", scales.reshape(-1).contiguous())
        bias = torch.zeros(C) if m.bias is None else m.bias.detach().float()
        self.register_buffer("bias", bias.clone())
        if self.is_conv:
            self.stride, self.padding, self.dilation = list(m.stride), list(m.padding), list(m.dilation)
            self.groups, self.kernel_size = m.groups, list(m.kernel_size)
            self.same_padding, self.pre_padding = m.same_padding, list(m.pre_padding)
            # Padding goes into the Conv (after the input quantizer) where quantizing 0.0 gives 0.0.
            _, zp, qmin, qmax = self.act_qparams if self.act_qparams is not None else (1.0, 0.0, 0.0, 0.0)
            self.pad_in_conv = self.act_qparams is None or qmin <= zp <= qmax

    def _take_epilogue(self, f: FusedMultipointConv2d) -> None:
        lo, hi = f.clamp_min, f.clamp_max
        if f.out_qparams is not None:
            qp = _qparams(f.out_qparams)
            scale, zero, levels, _ = _grid(qp)
            s, zp, qmin, qmax = qp
            self.out_grid = (scale, zero, levels)
            if levels < 256:  # the grid's own bounds: uint8 saturation stops at 0..255 only
                lo, hi = max(lo, (qmin - zp) * s), min(hi, (qmax - zp) * s)
            elif _level(lo, scale, zero) <= 0 and _level(hi, scale, zero) >= 255:
                lo, hi = -math.inf, math.inf  # a clamp that changes no level (ReLU6 before a grid up to 6)
        if math.isfinite(lo) or math.isfinite(hi):
            self.clamp = (lo, hi)
        if f.residual_qparams is not None:
            scale, zero, _, _ = _grid(_qparams(f.residual_qparams))
            self.residual_grid = (scale, zero)

    def weight(self) -> torch.Tensor:
        w = _WeightRows.apply(self.codes, self.scales, self.dequantize_linear)
        return w.unflatten(0, (self.channels, self.rows)).sum(1) if self.rows > 1 else w

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if not self.is_conv:
            return F.linear(_quantize_input(x, self.act_qparams), self.weight(), self.bias)
        if self.same_padding:  # at the traced input's size
            left, right, top, bottom = same_padding(x, self.kernel_size, self.stride, self.dilation)
        else:
            left, right, top, bottom = self.pre_padding if self.pre_padding else [0, 0, 0, 0]
        if x.dtype == torch.uint8:  # levels written by the fused layer before
            assert self.act_qparams is not None
            scale, zero, _, _ = _grid(self.act_qparams)
            xq = _Dequantize.apply(x, scale, zero)  # padding 0.0 is padding the level of 0.0
        elif self.pad_in_conv:
            xq = _quantize_input(x, self.act_qparams)
        else:
            xq = _quantize_input(F.pad(x, [left, right, top, bottom]), self.act_qparams)
            left = right = top = bottom = 0
        ph, pw = self.padding
        pads = [int(v) for v in (top + ph, left + pw, bottom + ph, right + pw)]  # constants of the trace
        y = _Conv2d.apply(xq, self.weight(), self.bias, pads, self.stride, self.dilation, self.groups)
        if residual is not None:
            if residual.dtype == torch.uint8:
                assert self.residual_grid is not None
                residual = _Dequantize.apply(residual, *self.residual_grid)
            y = y + residual
        if self.clamp is not None:
            lo, hi = self.clamp
            y = torch.clamp(y, None if math.isinf(lo) else lo, None if math.isinf(hi) else hi)
        if self.out_grid is not None:
            return _Quantize.apply(y, self.out_grid[0], self.out_grid[1])
        return y


def _max_pool_levels(levels: torch.Tensor, kernel, stride, padding, dilation, ceil_mode) -> torch.Tensor:  # noqa: ANN001
    """``mpq::max_pool2d_levels`` as ONNX MaxPool on uint8 (padding never wins a max)."""
    return F.max_pool2d(levels, kernel, stride, padding, dilation, ceil_mode)


def _has_int8_convs(model: nn.Module) -> bool:
    from mpq.fuse import _eligible

    return any(_eligible(m) for m in model.modules())


def exportable(
    model: nn.Module,
    example: torch.Tensor | None = None,
    max_code: int = MAX_INT8_CODE,
    requantize_rows: bool = False,
) -> nn.Module:
    """The form that ``export_onnx`` writes (it computes in PyTorch what the ONNX file computes):
    a copy of ``model`` whose multipoint layers are :class:`OnnxMultipointLayer`.

    With ``example``, a model whose convolutions have int8 activation grids is first rewritten by
    ``mpq.fuse_activations`` (uint8 levels between layers); a model that ``mpq.fuse_activations``
    already returned is taken as it is."""
    unsupported = [
        f"{name} ({type(m).__name__})"
        for name, m in model.named_modules()
        if isinstance(m, MultipointLayer) and type(m) not in (MultipointConv2d, MultipointLinear)
    ]
    if unsupported:
        raise ValueError(
            "mpq.export_onnx: expected a model from mpq.quantize (or mpq.fuse_activations) with MultipointConv2d / "
            f"MultipointLinear layers (not codebook or group-wise layers), got {unsupported}"
        )
    out = copy.deepcopy(model).cpu().eval()
    if example is not None and _has_int8_convs(out):
        from mpq.fuse import fuse_activations

        try:
            out = fuse_activations(out, example)  # shares the copy's weights
        except RuntimeError as e:
            raise RuntimeError(
                f"mpq.export_onnx: the int8 form of the model (mpq.fuse_activations) failed: {e}; "
                "export with int8_activations=False (float between layers)"
            ) from e
    # Which fused layers add a residual (their call's second argument).
    residual = set()
    if isinstance(out, torch.fx.GraphModule):
        residual = {n.target for n in out.graph.nodes if n.op == "call_module" and len(n.args) == 2}
    modules = list(out.named_modules())
    inner = {id(m.layer) for _, m in modules if isinstance(m, FusedMultipointConv2d)}
    for name, m in modules:
        if isinstance(m, FusedMultipointConv2d):
            set_submodule(out, name, OnnxMultipointLayer(m.layer, max_code, m, name in residual, requantize_rows))
        elif isinstance(m, (MultipointConv2d, MultipointLinear)) and id(m) not in inner:
            set_submodule(out, name, OnnxMultipointLayer(m, max_code))
    if isinstance(out, torch.fx.GraphModule):
        for node in out.graph.nodes:
            if node.op == "call_function" and node.target is torch.ops.mpq.max_pool2d_levels:
                node.target = _max_pool_levels
        out.recompile()
    return out


def export_onnx(
    model: nn.Module,
    example: torch.Tensor | tuple[torch.Tensor, ...],
    path: str | Path,
    dynamic_batch: bool = True,
    int8_activations: bool = True,
    max_int8_code: int = MAX_INT8_CODE,
    requantize_rows: bool = False,
) -> Path:
    """Writes ``model`` (from ``mpq.quantize``, or ``mpq.fuse_activations``) as an ONNX file of
    standard operators (opset 17, QDQ: module docstring) that ONNX Runtime and OpenVINO load without
    plugins; returns the path.

    ``example``: the input (or a tuple of inputs) the exporter traces with, on the CPU; 'same'
    padding is fixed at its spatial size. ``dynamic_batch``: the first dimension of every input and
    output stays free. ``int8_activations``: convolutions with int8 activation grids pass uint8
    levels between them (``mpq.fuse_activations`` first, with its per-layer check on ``example``),
    the form the runtimes run on their int8 kernels; False exports every layer with float input and
    output. ``max_int8_code``: the largest merged int8 code outside depthwise convolutions (127; 64
    for runtimes on CPUs without VNNI under 8-bit activations, whose int8 kernels add pairs of
    products in a saturating int16; their depthwise kernels widen to int32 and keep 127).
    ``requantize_rows``: layers of the QDQ pattern whose channels keep several int8 rows are
    rounded to one per channel (module docstring), so that they run on the int8 kernels too; the
    weight is then not mpq's exactly. The model is not modified."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"mpq.export_onnx: expected model to be an nn.Module, got {type(model).__name__}")
    inputs = example if isinstance(example, tuple) else (example,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("mpq.export_onnx: expected example to be a tensor or a tuple of tensors")
    if any(t.device.type != "cpu" for t in inputs):
        raise ValueError("mpq.export_onnx: expected example on the CPU (move the model and the example there)")
    if not isinstance(path, (str, Path)):
        raise TypeError(f"mpq.export_onnx: expected path to be a str or Path, got {type(path).__name__}")
    if isinstance(max_int8_code, bool) or not isinstance(max_int8_code, int) or not 1 <= max_int8_code <= 127:
        raise ValueError(f"mpq.export_onnx: expected max_int8_code to be an int in 1..127, got {max_int8_code!r}")
    path = Path(path)
    example_for_fusion = inputs[0] if int8_activations and len(inputs) == 1 else None
    form = exportable(model, example_for_fusion, max_int8_code, requantize_rows)
    names = [f"input_{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))]
    axes = {name: {0: "batch"} for name in names} if dynamic_batch else None
    if axes is not None:
        axes["output"] = {0: "batch"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        # The exporter's notices (TorchScript-based export is deprecated; 'same' padding traced at
        # the example's size, as documented above).
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning, torch.jit.TracerWarning))
        torch.onnx.export(
            form,
            inputs,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=names,
            output_names=["output"],
            dynamic_axes=axes,
            # Not folded here: the runtimes fold the Cast / Mul weights (_WeightRows) when they
            # load the file, which keeps the int8 codes.
            do_constant_folding=False,
        )
    return path


def export_openvino(
    model: nn.Module,
    example: torch.Tensor | tuple[torch.Tensor, ...],
    path: str | Path,
    dynamic_batch: bool = True,
    int8_activations: bool = True,
    max_int8_code: int = MAX_INT8_CODE,
    requantize_rows: bool = False,
) -> Path:
    """Writes ``model`` as an OpenVINO IR (``path`` ending in .xml, its weights beside it in .bin):
    the ONNX file of :func:`export_onnx` (the same options), converted by ``openvino.convert_model``
    (OpenVINO turns the QDQ pairs into its FakeQuantize and runs the int8 parts on its int8
    kernels). Needs the ``openvino`` package (an optional dependency: ``pip install mpq[export]``)."""
    path = Path(path) if isinstance(path, (str, Path)) else path
    if not isinstance(path, Path) or path.suffix != ".xml":
        raise ValueError(f"mpq.export_openvino: expected path to be a .xml file, got {path!r}")
    try:
        import openvino as ov
    except ImportError as e:
        raise ImportError("mpq.export_openvino: needs the openvino package (pip install openvino)") from e
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(
            model, example, Path(tmp) / "model.onnx", dynamic_batch, int8_activations, max_int8_code, requantize_rows
        )
        ir = ov.convert_model(str(onnx_path))
    path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(ir, str(path), compress_to_fp16=False)
    return path
