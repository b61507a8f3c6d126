"""A multipoint convolution with its epilogue fused in: + residual, clamp (ReLU, ReLU6), and the
next layer's activation quantizer, so that uint8 levels, not float32 tensors, flow between
layers (``mpq.fuse_activations`` builds models of them; ``mpq::multipoint_conv2d_fused``)."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from mpq.nn.modules import MultipointConv2d, same_padding

__all__ = ["FusedMultipointConv2d"]


def _finite_or_none(v: float) -> float | None:
    """None for an infinite clamp bound: the op's "no bound", which torch.export and AOTInductor
    packages can hold (their format has no infinite float)."""
    return None if math.isinf(v) else v


class FusedMultipointConv2d(nn.Module):
    """``y = clamp(layer(x) + residual, clamp_min, clamp_max)``, as float32, or with
    ``out_qparams`` as the uint8 levels ``L - qmin`` of that quantizer (the next layer's input).

    ``x`` is float32 or uint8 levels at ``layer.act_qparams`` (what a fused layer before it wrote);
    the layer's weight is shared with ``layer``, not copied. ``residual`` is float32, or with
    ``residual_qparams`` uint8 levels of that quantizer. Static or 'same' pre-padding of a uint8
    input pads with the level of 0.0, as padding the float input with zeros would."""

    pre_padding: list[int]

    def __init__(
        self,
        layer: MultipointConv2d,
        clamp_min: float = float("-inf"),
        clamp_max: float = float("inf"),
        out_qparams: torch.Tensor | None = None,
        residual_qparams: torch.Tensor | None = None,
    ):
        super().__init__()
        if layer.act_qparams is None:
            raise ValueError("FusedMultipointConv2d: layer needs act_qparams (int8 activations)")
        self.layer = layer
        self.clamp_min = float(clamp_min)
        self.clamp_max = float(clamp_max)
        self.register_buffer("out_qparams", None if out_qparams is None else out_qparams.detach().float().clone())
        # The quantizer of a uint8 residual (mpq.fuse_activations(quantize_residuals=True)).
        self.register_buffer(
            "residual_qparams", None if residual_qparams is None else residual_qparams.detach().float().clone()
        )
        s, zp, qmin, qmax = [float(v) for v in layer.act_qparams.tolist()]
        self.zero_level = zp - qmin  # the uint8 level of 0.0
        self.pre_padding = list(layer.pre_padding)
        self.same_padding = bool(layer.same_padding)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        m = self.layer
        value = self.zero_level if x.dtype == torch.uint8 else 0.0
        if self.same_padding:
            x = F.pad(x, same_padding(x, m.kernel_size, m.stride, m.dilation), value=value)
        elif len(self.pre_padding) > 0:
            x = F.pad(x, self.pre_padding, value=value)
        act_qparams = m.act_qparams
        assert act_qparams is not None
        return torch.ops.mpq.multipoint_conv2d_fused(
            x,
            m.point_codes,
            m.point_scales,
            m.num_points,
            m.w_bits,
            m.code_shape,
            m.bias,
            act_qparams,
            m.stride,
            m.padding,
            m.dilation,
            m.groups,
            residual,
            _finite_or_none(self.clamp_min),
            _finite_or_none(self.clamp_max),
            self.out_qparams,
            "auto",
            self.residual_qparams,
        )

    def extra_repr(self) -> str:
        parts = []
        if self.clamp_min != float("-inf") or self.clamp_max != float("inf"):
            parts.append(f"clamp=({self.clamp_min}, {self.clamp_max})")
        if self.out_qparams is not None:
            parts.append("uint8 output")
        if self.residual_qparams is not None:
            parts.append("uint8 residual")
        return ", ".join(parts)
