"""Export to ONNX with standard operators only (QDQ): what ONNX Runtime and OpenVINO run.

A multipoint layer becomes standard operators (README, "Export to ONNX Runtime and OpenVINO"):
- its input quantizer: QuantizeLinear / DequantizeLinear at (scale, zero point) on uint8 levels
  (the levels of ``mpq.activation.fake_quantize`` shifted by qmin; a Clip first when the grid has
  fewer than 256 levels; the float formula with Round when it does not fit uint8 at all);
- its weight: int8 codes stored as such (one byte per code in the file) and a DequantizeLinear with
  one scale per row, axis 0;
- its points: each channel's points that merge exactly into one int8 row do so (the CPU kernels'
  rule: a_1 = r a_2 with r whole and |r q_1 + q_2| <= 127, ``mpq.ops.int8_merged_points``); when
  every channel is then one row (``MultipointConfig(int8_merge=True)``, or one point per channel)
  the layer is one Conv / MatMul with per-channel int8 weights, the pattern both runtimes run on
  their int8 kernels. Otherwise the rows are laid out channel by channel, padded with zero rows
  to the layer's most rows per channel, dequantized and summed over each channel's rows by a
  ReduceSum on the weight (the dense float weight sum_k a_k q_k, as mpq's simulation builds it),
  then one float Conv / MatMul. Measured (benchmarks/NOTES.md): summing the outputs of an int8
  convolution over all rows instead (R times the output, a grouped convolution with a channel
  multiplier for depthwise layers) ran EfficientNet-Lite0 3.8x slower in OpenVINO.
- bias, padding ('same' padding at the example's size), stride, dilation and groups as in Conv.

The rest of the model is exported by PyTorch's TorchScript-based ONNX exporter as usual.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mpq.fold import set_submodule
from mpq.nn.fused import FusedMultipointConv2d
from mpq.nn.modules import MultipointConv2d, MultipointLayer, MultipointLinear, same_padding

__all__ = ["export_onnx", "export_openvino", "exportable", "int8_rows", "OnnxMultipointLayer"]

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


class _DequantizeRows(torch.autograd.Function):
    """int8 rows times one scale per row; exported as ONNX DequantizeLinear (axis 0)."""

    @staticmethod
    def forward(ctx, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return codes.float() * scales.view(-1, *([1] * (codes.dim() - 1)))

    @staticmethod
    def symbolic(g, codes, scales):  # noqa: ANN001, ANN205 - the TorchScript exporter's graph values
        return g.op("DequantizeLinear", codes, scales, axis_i=0)


def _quantize_input(x: torch.Tensor, qparams: tuple[float, float, float, float] | None) -> torch.Tensor:
    """mpq's input quantizer in exportable operators (module docstring)."""
    if qparams is None:
        return x
    s, zp, qmin, qmax = qparams
    integral = all(float(v).is_integer() for v in (zp, qmin, qmax))
    if not integral or qmax - qmin > 255:  # no uint8 grid: the float formula (ONNX Round is half to even)
        return (torch.clamp(torch.round(x / s) + zp, qmin, qmax) - zp) * s
    if qmax - qmin < 255:  # fewer levels than uint8 has: clip to the grid first
        x = torch.clamp(x, (qmin - zp) * s, (qmax - zp) * s)
    return torch.fake_quantize_per_tensor_affine(x, s, int(zp - qmin), 0, 255)


class OnnxMultipointLayer(nn.Module):
    """A multipoint layer in the operators of the module docstring (float in, float out)."""

    def __init__(self, m: MultipointLayer):
        super().__init__()
        codes, scales = int8_rows(m)
        C, R = scales.shape
        self.channels, self.rows = C, R
        self.is_conv = isinstance(m, MultipointConv2d)
        self.register_buffer("codes", codes.reshape(C * R, *codes.shape[2:]).contiguous())
        self.register_buffer("scales", scales.reshape(-1).contiguous())
        self.register_buffer("bias", None if m.bias is None else m.bias.detach().float().clone())
        qp = m.act_qparams
        self.act_qparams = None if qp is None else tuple(float(v) for v in qp.detach().cpu().double().tolist())
        if self.is_conv:
            self.stride, self.padding, self.dilation = list(m.stride), list(m.padding), list(m.dilation)
            self.groups, self.kernel_size = m.groups, list(m.kernel_size)
            self.same_padding, self.pre_padding = m.same_padding, list(m.pre_padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = _DequantizeRows.apply(self.codes, self.scales)
        if self.rows > 1:  # the dense weight: each channel's rows summed
            w = w.unflatten(0, (self.channels, self.rows)).sum(1)
        if self.is_conv:
            if self.same_padding:  # at the traced input's size
                x = F.pad(x, same_padding(x, self.kernel_size, self.stride, self.dilation))
            elif self.pre_padding:
                x = F.pad(x, self.pre_padding)
            xq = _quantize_input(x, self.act_qparams)
            return F.conv2d(xq, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return F.linear(_quantize_input(x, self.act_qparams), w, self.bias)


def exportable(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose multipoint layers are :class:`OnnxMultipointLayer` (the form that
    ``export_onnx`` writes; it computes in PyTorch what the ONNX file computes)."""
    unsupported = [
        f"{name} ({type(m).__name__})"
        for name, m in model.named_modules()
        if isinstance(m, MultipointLayer) and type(m) not in (MultipointConv2d, MultipointLinear)
    ]
    fused = [
        f"{name} ({type(m).__name__})" for name, m in model.named_modules() if isinstance(m, FusedMultipointConv2d)
    ]
    if unsupported or fused:
        raise ValueError(
            "mpq.export_onnx: expected a model from mpq.quantize with MultipointConv2d / MultipointLinear "
            f"layers (not mpq.fuse_activations' fused form, not codebook or group-wise layers), got {unsupported + fused}"
        )
    out = copy.deepcopy(model).eval()
    for name, m in list(out.named_modules()):
        if isinstance(m, (MultipointConv2d, MultipointLinear)):
            set_submodule(out, name, OnnxMultipointLayer(m))
    return out


def export_onnx(
    model: nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...], path: str | Path, dynamic_batch: bool = True
) -> Path:
    """Writes ``model`` (from ``mpq.quantize``) as an ONNX file of standard operators (opset 17,
    QDQ: module docstring) that ONNX Runtime and OpenVINO load without plugins; returns the path.

    ``example``: the input (or a tuple of inputs) the exporter traces with, on the CPU; 'same'
    padding is fixed at its spatial size. ``dynamic_batch``: the first dimension of every input and
    output stays free. The model is not modified."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"mpq.export_onnx: expected model to be an nn.Module, got {type(model).__name__}")
    inputs = example if isinstance(example, tuple) else (example,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("mpq.export_onnx: expected example to be a tensor or a tuple of tensors")
    if any(t.device.type != "cpu" for t in inputs):
        raise ValueError("mpq.export_onnx: expected example on the CPU (move the model and the example there)")
    if not isinstance(path, (str, Path)):
        raise TypeError(f"mpq.export_onnx: expected path to be a str or Path, got {type(path).__name__}")
    path = Path(path)
    form = exportable(model).cpu()
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
            do_constant_folding=True,
        )
    return path


def export_openvino(
    model: nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...], path: str | Path, dynamic_batch: bool = True
) -> Path:
    """Writes ``model`` as an OpenVINO IR (``path`` ending in .xml, its weights beside it in .bin):
    the ONNX file of :func:`export_onnx`, converted by ``openvino.convert_model`` (OpenVINO turns
    the QDQ pairs into its FakeQuantize and runs the int8 parts on its int8 kernels). Needs the
    ``openvino`` package (an optional dependency: ``pip install mpq[export]``)."""
    path = Path(path) if isinstance(path, (str, Path)) else path
    if not isinstance(path, Path) or path.suffix != ".xml":
        raise ValueError(f"mpq.export_openvino: expected path to be a .xml file, got {path!r}")
    try:
        import openvino as ov
    except ImportError as e:
        raise ImportError("mpq.export_openvino: needs the openvino package (pip install openvino)") from e
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(model, example, Path(tmp) / "model.onnx", dynamic_batch)
        ir = ov.convert_model(str(onnx_path))
    path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(ir, str(path), compress_to_fp16=False)
    return path
