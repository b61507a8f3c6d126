"""Codebook layers: one point per output channel whose int8 codes index a per-layer table of
non-uniform levels (``codebook``, float32 [2^b - 1]): weight[j] = scales[j, 0] * codebook[codes[j, 0] + K].
The non-uniform methods (``mpq.methods.companding``) build them; they run dequantize-then-float on
every device (no integer kernel computes a table lookup), and save and load like the multipoint
layers (kinds "codebook_linear", "codebook_conv")."""

import math
from typing import Any

import torch

from mpq.layout import point_bits
from mpq.nn.dequantized import DequantizedLayer
from mpq.nn.modules import (
    SpecReader,
    conv_code_shape,
    conv_geometry_from_spec,
    conv_spec_arguments,
    linear_spec_arguments,
    register_layer_kind,
    set_conv_geometry,
)

__all__ = ["CodebookLayer", "CodebookLinear", "CodebookConv2d"]


class CodebookLayer(DequantizedLayer):
    """The codebook layers' base: ``set_weight`` / ``set_act_qparams`` as for the multipoint
    layers (one point per channel), plus ``set_codebook``."""

    def __init__(self, out_channels: int, code_shape: list[int], w_bits: int, bias: bool):
        super().__init__(out_channels, 1, code_shape, w_bits, bias)
        self.levels = 2 ** (w_bits - 1) - 1
        self.register_buffer("codebook", torch.zeros(2 * self.levels + 1, dtype=torch.float32))

    def set_codebook(self, codebook: torch.Tensor) -> None:
        if codebook.shape != self.codebook.shape:
            raise ValueError(
                f"{type(self).__name__}.set_codebook: expected {tuple(self.codebook.shape)} levels, got {tuple(codebook.shape)}"
            )
        self.codebook.copy_(codebook.to(torch.float32))

    def _levels(self, codes: torch.Tensor) -> torch.Tensor:
        """The codebook level each code indexes (float32, the codes' shape and device)."""
        return self.codebook.to(codes.device)[(codes.long() + self.levels).clamp(0, 2 * self.levels)]

    @torch.jit.export
    def dequantized_weight(self) -> torch.Tensor:
        codes, scales = self.unpacked()
        w = self._levels(codes[:, 0])
        shape = [-1] + [1] * (w.dim() - 1)
        return w * (scales[:, 0] * (self.num_points > 0).float()).view(shape)

    def code_values(self, codes: torch.Tensor) -> torch.Tensor:
        return self._levels(codes).double()

    def bits_per_weight(self) -> float:
        """b bits per code, a 32-bit scale per channel (one point each: ``mpq.layout.point_bits``)
        and the float32 codebook, per weight."""
        C = self.num_points.shape[0]
        D = math.prod(self.code_shape)
        codebook_bits = self.codebook.numel() * self.codebook.element_size() * 8
        return (C * point_bits(D, self.w_bits) + codebook_bits) / (C * D)


class CodebookLinear(CodebookLayer):
    """Linear layer with a codebook weight (codes int8[out_features, 1, in_features])."""

    def __init__(self, in_features: int, out_features: int, w_bits: int, bias: bool = True):
        super().__init__(out_features, [in_features], w_bits, bias)
        self.in_features = int(in_features)
        self.out_features = int(out_features)

    def spec_arguments(self) -> dict[str, Any]:
        return linear_spec_arguments(self)

    @classmethod
    def from_spec_arguments(cls, spec: SpecReader, w_bits: int, max_points: int, bias: bool) -> "CodebookLinear":
        return cls(spec.get("in_features", int), spec.get("out_features", int), w_bits, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.dequantized_weight())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, w_bits={self.w_bits}, codebook"


class CodebookConv2d(CodebookLayer):
    """Conv2d with a codebook weight (codes int8[out_channels, 1, in_channels/groups, kh, kw]);
    arguments and padding (``pre_padding``, ``same_padding``) as ``MultipointConv2d``."""

    # Declared for TorchScript, which cannot infer the element type of an empty list.
    kernel_size: list[int]
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    pre_padding: list[int]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: list[int],
        w_bits: int,
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        groups: int = 1,
        bias: bool = True,
        pre_padding: list[int] | None = None,
        same_padding: bool = False,
    ):
        code_shape = conv_code_shape("CodebookConv2d", in_channels, out_channels, kernel_size, groups)
        super().__init__(out_channels, code_shape, w_bits, bias)
        set_conv_geometry(
            self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, pre_padding, same_padding
        )

    def spec_arguments(self) -> dict[str, Any]:
        return conv_spec_arguments(self)

    @classmethod
    def from_spec_arguments(cls, spec: SpecReader, w_bits: int, max_points: int, bias: bool) -> "CodebookConv2d":
        return cls(w_bits=w_bits, bias=bias, **conv_geometry_from_spec(spec))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv2d(x, self.dequantized_weight())

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.kernel_size)}, stride={tuple(self.stride)}, "
            f"padding={tuple(self.padding)}, groups={self.groups}, w_bits={self.w_bits}, codebook"
        )


register_layer_kind("codebook_linear", CodebookLinear)
register_layer_kind("codebook_conv", CodebookConv2d)
