"""MultipointLinear / MultipointConv2d: what ``mpq.quantize`` swaps in.

State (buffers): ``codes`` (int8[C, P, ...]), ``scales`` (float32[C, P]), ``num_points``
(int32[C]), ``bias`` (float32[C] or None), ``act_qparams`` (float32[4] = scale, zero_point,
qmin, qmax, or None for float activations). The forward is one ``torch.ops.mpq`` call, so the
module runs under TorchScript and in C++ with the ops library.
"""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import mpq.ops  # noqa: F401  (registers torch.ops.mpq)


def same_padding(x: torch.Tensor, kernel_size: List[int], stride: List[int], dilation: List[int]) -> List[int]:
    """F.pad amounts (left, right, top, bottom) of TensorFlow's 'SAME' padding for input x."""
    pads: List[int] = []
    for d in [1, 0]:  # F.pad order: width first, then height
        size = x.shape[2 + d]
        out = (size + stride[d] - 1) // stride[d]
        total = max((out - 1) * stride[d] + (kernel_size[d] - 1) * dilation[d] + 1 - size, 0)
        pads += [total // 2, total - total // 2]
    return pads


class _MultipointBase(nn.Module):
    def __init__(self, out_channels: int, max_points: int, code_shape: List[int], w_bits: int, bias: bool):
        super().__init__()
        self.w_bits = w_bits
        self.max_points = max_points
        self.output_sqnr_db = float("nan")  # measured on calibration data by mpq.quantize
        self.register_buffer("codes", torch.zeros([out_channels, max_points] + code_shape, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(out_channels, max_points, dtype=torch.float32))
        self.register_buffer("num_points", torch.ones(out_channels, dtype=torch.int32))
        if bias:
            self.register_buffer("bias", torch.zeros(out_channels, dtype=torch.float32))
        else:
            self.register_buffer("bias", None)
        self.register_buffer("act_qparams", None)

    def set_weight(
        self, codes: torch.Tensor, scales: torch.Tensor, num_points: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> None:
        """Load a fitted multipoint weight; codes beyond a channel's count are zeroed."""
        if codes.shape != self.codes.shape or scales.shape != self.scales.shape:
            raise ValueError(
                f"{type(self).__name__}.set_weight: expected codes {tuple(self.codes.shape)} and scales "
                f"{tuple(self.scales.shape)}, got {tuple(codes.shape)} and {tuple(scales.shape)}"
            )
        keep = torch.arange(self.max_points, device=codes.device)[None, :] < num_points.to(codes.device)[:, None]
        shape = list(keep.shape) + [1] * (codes.dim() - 2)
        self.codes.copy_(torch.where(keep.view(shape), codes, torch.zeros_like(codes)))
        self.scales.copy_(torch.where(keep, scales, torch.zeros_like(scales)))
        self.num_points.copy_(num_points.to(torch.int32))
        if bias is not None:
            if self.bias is None:
                raise ValueError(f"{type(self).__name__}.set_weight: the module was built without a bias")
            self.bias.copy_(bias.detach().to(torch.float32))

    def set_act_qparams(self, scale: float, zero_point: int, qmin: int, qmax: int) -> None:
        """Per-tensor fake quantization of the input: clamp(round(x / scale) + zp, qmin, qmax)."""
        if not scale > 0:
            raise ValueError(f"{type(self).__name__}.set_act_qparams: expected scale > 0, got {scale}")
        self.act_qparams = torch.tensor(
            [scale, zero_point, qmin, qmax], dtype=torch.float32, device=self.scales.device
        )

    @torch.jit.export
    def dequantized_weight(self) -> torch.Tensor:
        """The dense float32 weight sum_k scales[j,k] codes[j,k]."""
        return torch.ops.mpq.dequantize_multipoint(self.codes, self.scales, self.num_points, torch.float32)

    def bits_per_weight(self) -> float:
        """Codes and scales of the points in use, per weight."""
        per_channel = self.codes[0, 0].numel()
        total_points = int(self.num_points.sum())
        return total_points * (per_channel * self.w_bits + 32) / (self.codes.shape[0] * per_channel)


class MultipointLinear(_MultipointBase):
    """Linear layer with a multipoint weight: codes int8[out_features, max_points, in_features]."""

    def __init__(self, in_features: int, out_features: int, max_points: int, w_bits: int, bias: bool = True):
        super().__init__(out_features, max_points, [in_features], w_bits, bias)
        self.in_features = in_features
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mpq.multipoint_linear(x, self.codes, self.scales, self.num_points, self.bias, self.act_qparams)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, w_bits={self.w_bits}, max_points={self.max_points}"


class MultipointConv2d(_MultipointBase):
    """Conv2d with a multipoint weight: codes int8[out_channels, max_points, in_channels/groups, kh, kw].

    ``pre_padding`` (left, right, top, bottom) zero-pads the input before the convolution, as
    TensorFlow-style 'same' convolutions with a static padding module do; ``same_padding``
    computes that padding from the input size at run time (their dynamic variant).
    """

    # Declared for TorchScript, which cannot infer the element type of an empty list.
    kernel_size: List[int]
    stride: List[int]
    padding: List[int]
    dilation: List[int]
    pre_padding: List[int]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: List[int],
        max_points: int,
        w_bits: int,
        stride: List[int],
        padding: List[int],
        dilation: List[int],
        groups: int = 1,
        bias: bool = True,
        pre_padding: Optional[List[int]] = None,
        same_padding: bool = False,
    ):
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"MultipointConv2d: expected groups ({groups}) to divide in_channels ({in_channels}) and out_channels ({out_channels})"
            )
        super().__init__(out_channels, max_points, [in_channels // groups, kernel_size[0], kernel_size[1]], w_bits, bias)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = list(kernel_size)
        self.stride = list(stride)
        self.padding = list(padding)
        self.dilation = list(dilation)
        self.groups = groups
        self.pre_padding = list(pre_padding) if pre_padding is not None else []
        self.same_padding = same_padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_padding:
            x = F.pad(x, same_padding(x, self.kernel_size, self.stride, self.dilation))
        elif len(self.pre_padding) > 0:
            x = F.pad(x, self.pre_padding)
        return torch.ops.mpq.multipoint_conv2d(
            x,
            self.codes,
            self.scales,
            self.num_points,
            self.bias,
            self.act_qparams,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.kernel_size)}, stride={tuple(self.stride)}, "
            f"padding={tuple(self.padding)}, groups={self.groups}, w_bits={self.w_bits}, max_points={self.max_points}"
        )
