"""Group-wise layers: the weight format of GPTQ / AWQ checkpoints and torchao's int4 weight-only,
built by ``method="rtn"`` / ``"gptq"`` with ``group_size`` (``mpq.methods.groupwise``):

    weight[j, d] = group_scales[j, g] * (code[j, d] - zero[j, g]),   g = d // group_size

over the flattened D = in/groups x kh x kw input weights of channel j (the last group shorter when
``group_size`` does not divide D).

State: the codes as the multipoint layers store one point per channel (``point_codes``, packed at
``w_bits``, ``num_points`` all 1; no per-channel scale: ``point_scales`` is empty),
``group_scales`` (float16 [C, G]) and, for an asymmetric grid, ``group_zeros`` (the zero points
packed at ``w_bits`` like codes, uint8 [C, ceil(G * w_bits / 8)]; [0, ...] when symmetric) and,
for AWQ's activation-aware scaling, ``input_scales`` (float16 [in_channels], empty without): the
weights of input channel c are divided by input_scales[c]. Bits per weight: w_bits + 16 /
group_size (+ w_bits / group_size asymmetric; + 16 in_channels / (C D) with input scales). They run
through ``mpq::groupwise_linear`` / ``groupwise_conv2d`` (the dense weight decoded once and cached by
the ops library on the CPU, per call elsewhere) and save and load like the other layers (kinds
"groupwise_linear", "groupwise_conv").
"""

import math
from typing import Any

import torch

from mpq.layout import group_count, groupwise_bits, stored_row_bytes
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

__all__ = ["GroupwiseLayer", "GroupwiseLinear", "GroupwiseConv2d"]


class GroupwiseLayer(DequantizedLayer):
    """The group-wise layers' base: ``set_weight`` (codes [C, 1, ...], scales all 1) and
    ``set_grid`` (group scales and zero points), ``set_act_qparams`` as for every layer."""

    def __init__(
        self,
        out_channels: int,
        code_shape: list[int],
        w_bits: int,
        group_size: int,
        symmetric: bool,
        bias: bool,
        input_channels: int,
    ):
        """``input_channels``: the number of input scales (the layer's in_channels), 0 for none."""
        super().__init__(out_channels, 1, code_shape, w_bits, bias)
        D = math.prod(self.code_shape)
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0 or group_size == 1:
            raise ValueError(f"{type(self).__name__}: expected group_size 0 or an int >= 2, got {group_size!r}")
        self.group_size = D if group_size == 0 else min(group_size, max(D, 1))
        self.symmetric = bool(symmetric)
        G = group_count(D, self.group_size)
        self.register_buffer("group_scales", torch.zeros(out_channels, G, dtype=torch.float16))
        zero_rows = 0 if self.symmetric else out_channels
        self.register_buffer("group_zeros", torch.zeros(zero_rows, stored_row_bytes(G, w_bits), dtype=torch.uint8))
        self.register_buffer("input_scales", torch.ones(input_channels, dtype=torch.float16))
        self.point_scales = torch.zeros(0, dtype=torch.float32)

    def set_weight(
        self, codes: torch.Tensor, scales: torch.Tensor, num_points: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        """As ``MultipointLayer.set_weight`` with one point per channel whose scales are all 1
        (the group scales carry the magnitude: ``set_grid``)."""
        if isinstance(scales, torch.Tensor) and scales.is_floating_point() and not bool((scales == 1).all()):
            raise ValueError(f"{type(self).__name__}.set_weight: expected scales all 1 (the group scales: set_grid)")
        if isinstance(num_points, torch.Tensor) and num_points.numel() and not bool((num_points == 1).all()):
            raise ValueError(f"{type(self).__name__}.set_weight: expected one point per channel (num_points all 1)")
        super().set_weight(codes, scales, num_points, bias)
        self.point_scales = torch.zeros(0, dtype=torch.float32, device=self.point_codes.device)

    def set_grid(
        self, scales: torch.Tensor, zeros: torch.Tensor | None, input_scales: torch.Tensor | None = None
    ) -> None:
        """``scales`` [C, G] (finite, >= 0; stored as float16), ``zeros`` int [C, G] in the codes'
        signed w_bits range, or None for a symmetric layer; ``input_scales`` (finite, > 0, one
        per input channel, any shape) for a layer built with them, else None."""
        where = f"{type(self).__name__}.set_grid"
        C, G = self.group_scales.shape
        if not isinstance(scales, torch.Tensor) or not scales.is_floating_point() or tuple(scales.shape) != (C, G):
            raise ValueError(f"{where}: expected scales, a floating tensor of shape {(C, G)}, got {scales!r:.80}")
        s16 = scales.detach().to(torch.float16)
        if not bool(torch.isfinite(s16).all()) or bool((s16 < 0).any()):
            raise ValueError(f"{where}: expected finite scales >= 0 within float16's range")
        if (zeros is None) != self.symmetric:
            raise ValueError(
                f"{where}: expected zeros {'None (symmetric layer)' if self.symmetric else 'of shape ' + str((C, G))}"
            )
        n_in = self.input_scales.numel()
        if (input_scales is None) != (n_in == 0):
            raise ValueError(
                f"{where}: expected input_scales {'None' if n_in == 0 else 'with ' + str(n_in) + ' values'}"
            )
        if input_scales is not None:
            s_in = input_scales.detach().reshape(-1).to(torch.float16)
            if s_in.numel() != n_in or not bool(torch.isfinite(s_in).all()) or not bool((s_in > 0).all()):
                raise ValueError(f"{where}: expected {n_in} finite input_scales > 0 within float16's range")
        if zeros is not None:
            if tuple(zeros.shape) != (C, G) or zeros.is_floating_point():
                raise ValueError(f"{where}: expected zeros an integer tensor of shape {(C, G)}, got {zeros!r:.80}")
            packed, _ = torch.ops.mpq.pack_points(
                zeros.detach().cpu().to(torch.int8)[:, None, :],
                torch.ones(C, 1),
                torch.ones(C, dtype=torch.int32),
                self.w_bits,
            )
            self.group_zeros = packed.to(self.group_zeros.device)
        if input_scales is not None:
            self.input_scales.copy_(s_in)
        self.group_scales.copy_(s16)

    @torch.jit.export
    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes int8[C, 1, *code_shape], scales float32[C, 1] all 1)."""
        D = 1
        for v in self.code_shape:
            D *= v
        ones = torch.ones(self.point_codes.shape[0], dtype=torch.float32, device=self.point_codes.device)
        codes, scales = torch.ops.mpq.unpack_points(self.point_codes, ones, self.num_points, self.w_bits, D, 1)
        return codes.view([codes.shape[0], 1] + self.code_shape), scales

    @torch.jit.export
    def zero_points(self) -> torch.Tensor:
        """int8 [C, G]: each group's zero point (all 0 for a symmetric layer)."""
        C, G = self.group_scales.shape
        if self.symmetric:
            return torch.zeros(C, G, dtype=torch.int8, device=self.group_scales.device)
        ones = torch.ones(C, dtype=torch.float32, device=self.group_zeros.device)
        counts = torch.ones(C, dtype=torch.int32, device=self.group_zeros.device)
        return torch.ops.mpq.unpack_points(self.group_zeros, ones, counts, self.w_bits, G, 1)[0][:, 0]

    def _per_weight(self, t: torch.Tensor, D: int) -> torch.Tensor:
        return t.repeat_interleave(self.group_size, 1)[:, :D]

    def _input_divisor(self, C: int, D: int) -> torch.Tensor:
        """[C, D]: each weight's input-channel scale (conv groups: their own input channels)."""
        cin = self.code_shape[0]
        G = self.input_scales.numel() // cin
        per_column = self.input_scales.view(G, cin).repeat_interleave(D // cin, 1)
        return per_column.repeat_interleave(C // G, 0)

    @torch.jit.export
    def dequantized_weight(self) -> torch.Tensor:
        """The dense float32 weight scale * (code - zero)."""
        codes = self.unpacked()[0]
        C = codes.shape[0]
        q = codes.reshape(C, -1).float()
        D = q.shape[1]
        s = self._per_weight(self.group_scales.float(), D)
        if not self.symmetric:
            q = q - self._per_weight(self.zero_points().float(), D)
        w = q * s
        if self.input_scales.numel() > 0:
            w = w / self._input_divisor(C, D).float()
        return w.view([C] + self.code_shape)

    def code_values(self, codes: torch.Tensor) -> torch.Tensor:
        C = codes.shape[0]
        c = codes.reshape(C, codes.shape[1], -1).double()
        D = c.shape[2]
        s = self._per_weight(self.group_scales.double(), D).to(c.device)
        z = self._per_weight(self.zero_points().double(), D).to(c.device)
        v = s[:, None] * (c - z[:, None])
        if self.input_scales.numel() > 0:
            v = v / self._input_divisor(C, D).double().to(c.device)[:, None]
        return v.view(codes.shape)

    def scale_channels_(self, a: torch.Tensor) -> None:
        """Output channel j's weight times a[j] (BatchNorm re-estimation): the group scales,
        re-rounded to float16."""
        self.group_scales.copy_((self.group_scales.double() * a.double().to(self.group_scales.device)[:, None]).half())

    def stored_bytes(self) -> int:
        tables = (self.group_scales, self.group_zeros, self.input_scales)
        return super().stored_bytes() + sum(t.numel() * t.element_size() for t in tables)

    def bits_per_weight(self) -> float:
        """b bits per code, a float16 scale and (asymmetric) a b-bit zero point per group, and the
        float16 input scales spread over the layer's weights."""
        C, D = self.group_scales.shape[0], math.prod(self.code_shape)
        input_bits = 16 * self.input_scales.numel() / max(C * D, 1)
        return groupwise_bits(D, self.w_bits, self.group_size, self.symmetric) + input_bits

    def grid_spec(self) -> dict[str, Any]:
        return {
            "group_size": int(self.group_size),
            "symmetric": bool(self.symmetric),
            "input_scaled": self.input_scales.numel() > 0,
        }

    def grid_repr(self) -> str:
        scaled = ", input scales" if self.input_scales.numel() > 0 else ""
        return f"group_size={self.group_size}, {'symmetric' if self.symmetric else 'asymmetric'}{scaled}"


class GroupwiseLinear(GroupwiseLayer):
    """Linear layer with a group-wise weight (codes int8[out_features, 1, in_features])."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        w_bits: int,
        group_size: int,
        symmetric: bool = True,
        bias: bool = True,
        input_scaled: bool = False,
    ):
        inputs = in_features if input_scaled else 0
        super().__init__(out_features, [in_features], w_bits, group_size, symmetric, bias, inputs)
        self.in_features = int(in_features)
        self.out_features = int(out_features)

    def spec_arguments(self) -> dict[str, Any]:
        return {**linear_spec_arguments(self), **self.grid_spec()}

    @classmethod
    def from_spec_arguments(cls, spec: SpecReader, w_bits: int, max_points: int, bias: bool) -> "GroupwiseLinear":
        return cls(
            spec.get("in_features", int),
            spec.get("out_features", int),
            w_bits,
            spec.get("group_size", int),
            spec.get("symmetric", bool),
            bias=bias,
            input_scaled=spec.get("input_scaled", bool),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # mpq::groupwise_linear: dequantized_weight's decode, kept by the ops library on the CPU.
        return torch.ops.mpq.groupwise_linear(
            self._quantize_input(x),
            self.point_codes,
            self.group_scales,
            self.group_zeros,
            self.input_scales,
            self.w_bits,
            self.group_size,
            self.bias,
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, w_bits={self.w_bits}, {self.grid_repr()}"


class GroupwiseConv2d(GroupwiseLayer):
    """Conv2d with a group-wise weight (codes int8[out_channels, 1, in_channels/groups, kh, kw],
    grouped along the flattened in/groups x kh x kw); arguments and padding as ``MultipointConv2d``."""

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
        group_size: int,
        symmetric: bool,
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        groups: int = 1,
        bias: bool = True,
        pre_padding: list[int] | None = None,
        same_padding: bool = False,
        input_scaled: bool = False,
    ):
        code_shape = conv_code_shape("GroupwiseConv2d", in_channels, out_channels, kernel_size, groups)
        inputs = in_channels if input_scaled else 0
        super().__init__(out_channels, code_shape, w_bits, group_size, symmetric, bias, inputs)
        set_conv_geometry(
            self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, pre_padding, same_padding
        )

    def spec_arguments(self) -> dict[str, Any]:
        return {**conv_spec_arguments(self), **self.grid_spec()}

    @classmethod
    def from_spec_arguments(cls, spec: SpecReader, w_bits: int, max_points: int, bias: bool) -> "GroupwiseConv2d":
        return cls(
            w_bits=w_bits,
            group_size=spec.get("group_size", int),
            symmetric=spec.get("symmetric", bool),
            bias=bias,
            input_scaled=spec.get("input_scaled", bool),
            **conv_geometry_from_spec(spec),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # mpq::groupwise_conv2d: dequantized_weight's decode, kept by the ops library on the CPU.
        return torch.ops.mpq.groupwise_conv2d(
            self._conv_input(x),
            self.point_codes,
            self.group_scales,
            self.group_zeros,
            self.input_scales,
            self.w_bits,
            self.group_size,
            self.code_shape,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.kernel_size)}, stride={tuple(self.stride)}, "
            f"padding={tuple(self.padding)}, groups={self.groups}, w_bits={self.w_bits}, {self.grid_repr()}"
        )


register_layer_kind("groupwise_linear", GroupwiseLinear)
register_layer_kind("groupwise_conv", GroupwiseConv2d)
