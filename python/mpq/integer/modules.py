"""The modules of an integer-only model (HAWQ-V3 style), built by ``mpq.integer_only``.

Every activation between layers is an integer tensor on a per-tensor grid (scale s, zero point
zp, range [qmin, qmax]; 8-bit grids are stored as uint8/int8): the real value it stands for is
``(q - zp) * s``. Inside the network everything is integer arithmetic:

- ``IntegerConv2d`` / ``IntegerLinear``: ``x - zp_x`` in int32, one int32 accumulator per
  multipoint point (``acc_jk = sum_i (x_i - zp_x) q_jki`` by an int32 convolution or matmul over
  the int8 codes; the conversion checks that no such sum can leave int32, else it uses int64),
  then in int64
  ``v_j = sum_k m_jk acc_jk + bias_j [+ m_rj (r - zp_r)]`` and ``y_j = clamp((v_j + 2^(S_j-1))
  >> S_j, lo, hi)``: the dyadic numbers ``m_jk / 2^S_j`` approximate ``s_x a_jk / s_y`` (one
  shift per output channel, so the points are summed before it), the bias (with the output zero
  point folded in) is an int64 in the same fixed-point scale ``s_y 2^-S_j``, and ``[lo, hi]`` is
  the output grid intersected with any ReLU / ReLU6 clamp that follows. ``r`` is an optional
  residual fused into the requantization (``conv(x) + r``).
- ``IntegerAdd``: ``(m_a (a - zp_a) + m_b (b - zp_b) + zp_y 2^S) >> S`` in int64.
- ``IntegerMean``: an int64 sum over the pooled dims, then the dyadic multiply by
  ``s_x / (N s_y)`` (the 1/N folded into the multiplier; N is fixed at conversion).
- ``IntegerRequant``: moves a tensor to another grid (dyadic ``s_x / s_y``), with a clamp.
- ``IntegerClamp``: ReLU / ReLU6 on a tensor's own grid: ``clamp(q, lo, hi)``.

Floating point remains only at the two ends: ``QuantizeInput`` (``clamp(round(x / s) + zp)``, the
input image) and ``DequantizeOutput`` (``(q - zp) * s``, the logits).

Each module also keeps the real multipliers (float64 buffers whose names start with ``real_``) that
its dyadic ones approximate; the integer forward never reads them. With ``simulate = True`` (see
``mpq.integer.simulate_integer``) a module runs the same pipeline in float64 with those real
multipliers and ``floor(v + 1/2)`` rounding, on float64 tensors holding the same integer codes:
the reference the integer model is tested against.
"""

import torch
import torch.nn.functional as F
from torch import nn

from mpq.nn.modules import same_padding

__all__ = [
    "IntegerConv2d",
    "IntegerLinear",
    "IntegerAdd",
    "IntegerMean",
    "IntegerRequant",
    "IntegerClamp",
    "QuantizeInput",
    "DequantizeOutput",
    "IntegerModel",
    "storage_dtype",
]


def storage_dtype(qmin: int, qmax: int) -> torch.dtype:
    """The smallest integer dtype holding [qmin, qmax]: uint8, int8, int16 or int32."""
    if 0 <= qmin and qmax <= 255:
        return torch.uint8
    if -128 <= qmin and qmax <= 127:
        return torch.int8
    if -(2**15) <= qmin and qmax < 2**15:
        return torch.int16
    return torch.int32


class _Requantizer(nn.Module):
    """The common epilogue: int64 fixed-point values ``v`` (scale ``s_y 2^-shift``, zero point
    folded in) -> ``clamp(round_half_up(v / 2^shift), lo, hi)`` in the output's storage dtype."""

    def __init__(self, shift: torch.Tensor, lo: int, hi: int, out_dtype: torch.dtype):
        super().__init__()
        self.register_buffer("shift", shift.to(torch.int64))
        self.register_buffer("rounding", (torch.ones_like(self.shift) << self.shift) >> 1)
        self.lo = int(lo)
        self.hi = int(hi)
        self.out_dtype = out_dtype
        self.simulate = False

    def _finish(self, v: torch.Tensor, shift: torch.Tensor, rounding: torch.Tensor) -> torch.Tensor:
        if self.simulate:
            return torch.clamp(torch.floor(v + 0.5), self.lo, self.hi)
        return torch.clamp((v + rounding) >> shift, self.lo, self.hi).to(self.out_dtype)

    def _center(self, x: torch.Tensor, zero_point: int, dtype: torch.dtype) -> torch.Tensor:
        """``x - zp`` in ``dtype`` (float64 when simulating)."""
        return x.to(torch.float64 if self.simulate else dtype) - zero_point


class _IntegerWeighted(_Requantizer):
    """Shared by conv and linear. The points are stored as slabs: ``weight0`` holds every
    channel's first point; the extra points (k >= 1 of the channels that have them) are
    ``weight_extra``, in ``num_slabs`` slabs of ``slab_rows`` rows, row r adding into channel
    ``extra_channel[r]``: one slab of exactly the extra points when groups == 1, else one slab of
    all channels per point index (a grouped conv needs whole groups; unused points are zero)."""

    def __init__(
        self,
        weight0: torch.Tensor,
        mult0: torch.Tensor,
        weight_extra: torch.Tensor,
        mult_extra: torch.Tensor,
        extra_channel: torch.Tensor,
        num_slabs: int,
        bias: torch.Tensor,
        residual_mult: torch.Tensor | None,
        shift: torch.Tensor,
        real: list[torch.Tensor],
        in_zero_point: int,
        residual_zero_point: int,
        lo: int,
        hi: int,
        out_dtype: torch.dtype,
        acc_dtype: torch.dtype,
        view: list[int],
    ):
        super().__init__(shift.view(view), lo, hi, out_dtype)
        self.register_buffer("weight0", weight0.to(torch.int8))
        self.register_buffer("weight_extra", weight_extra.to(torch.int8))
        self.register_buffer("extra_channel", extra_channel.to(torch.int64))
        self.register_buffer("mult0", mult0.to(torch.int64).view(view))
        self.register_buffer("mult_extra", mult_extra.to(torch.int64))
        self.register_buffer("bias", bias.to(torch.int64).view(view))
        has_res = residual_mult is not None
        self.register_buffer("residual_mult", residual_mult.to(torch.int64).view(view) if has_res else None)
        self.register_buffer("real_mult0", real[0].to(torch.float64).view(view))
        self.register_buffer("real_mult_extra", real[1].to(torch.float64))
        self.register_buffer("real_bias", real[2].to(torch.float64).view(view))
        self.register_buffer("real_residual_mult", real[3].to(torch.float64).view(view) if has_res else None)
        self.num_slabs = int(num_slabs)
        self.slab_rows = int(weight_extra.shape[0]) // max(1, int(num_slabs))
        self.in_zero_point = int(in_zero_point)
        self.residual_zero_point = int(residual_zero_point)
        self.acc_dtype = acc_dtype
        self.view = list(view)

    def _accumulate(self, xc: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _run(self, xc: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        sim = self.simulate
        wdtype = torch.float64 if sim else self.acc_dtype
        mult0 = self.real_mult0 if sim else self.mult0
        mult_extra = self.real_mult_extra if sim else self.mult_extra
        acc = self._accumulate(xc, self.weight0.to(wdtype))
        v = acc.to(mult0.dtype) * mult0 + (self.real_bias if sim else self.bias)
        dim = 1  # channels: [N, C, H, W] for conv, [N, C] for linear
        for s in range(self.num_slabs):
            lo = s * self.slab_rows
            hi = lo + self.slab_rows
            acc = self._accumulate(xc, self.weight_extra[lo:hi].to(wdtype))
            m = mult_extra[lo:hi].view([-1] + [1] * (acc.dim() - dim - 1))
            v = v.index_add(dim, self.extra_channel[lo:hi], acc.to(m.dtype) * m)
        if residual is not None:
            rm = self.real_residual_mult if sim else self.residual_mult
            if rm is None:
                raise RuntimeError("mpq integer layer: got a residual input, but the layer was built without one")
            v = v + self._center(residual, self.residual_zero_point, torch.int64) * rm
        return self._finish(v, self.shift, self.rounding)


class IntegerConv2d(_IntegerWeighted):
    """Integer-only multipoint Conv2d (see the module docstring): input int8/uint8 codes on the
    layer's activation grid [N, C_in, H, W], optional residual codes [N, C_out, H', W'] on their own
    grid, output codes on the next layer's grid [N, C_out, H', W']. Dilated kernels are stored with
    their zeros inserted (dilation 1): ATen has no int32 dilated convolution."""

    stride: list[int]
    padding: list[int]
    dilation: list[int]
    kernel_size: list[int]
    pre_padding: list[int]

    def __init__(self, stride, padding, dilation, groups, kernel_size, pre_padding, same_padding_, **kw):
        super().__init__(view=[1, -1, 1, 1], **kw)
        self.stride = list(stride)
        self.padding = list(padding)
        self.dilation = list(dilation)
        self.groups = int(groups)
        self.kernel_size = list(kernel_size)
        self.pre_padding = list(pre_padding)
        self.same_padding = bool(same_padding_)

    def _accumulate(self, xc: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(xc, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        xc = self._center(x, self.in_zero_point, self.acc_dtype)
        # Zero padding of x - zp is padding with the real value 0, as in the float model.
        if self.same_padding:
            xc = F.pad(xc, same_padding(xc, self.kernel_size, self.stride, self.dilation))
        elif len(self.pre_padding) > 0:
            xc = F.pad(xc, self.pre_padding)
        return self._run(xc, residual)

    def extra_repr(self) -> str:
        return (
            f"out_channels={self.weight0.shape[0]}, kernel_size={tuple(self.kernel_size)}, stride={tuple(self.stride)}, "
            f"groups={self.groups}, extra_points={self.weight_extra.shape[0]}, acc={self.acc_dtype}, out={self.out_dtype}, "
            f"clamp=[{self.lo}, {self.hi}], residual={self.residual_mult is not None}"
        )


class IntegerLinear(_IntegerWeighted):
    """Integer-only multipoint Linear: input codes [..., in_features], output codes [..., out_features]."""

    def __init__(self, **kw):
        super().__init__(view=[-1], **kw)

    def _accumulate(self, xc: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.matmul(xc, weight.t())

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        xc = self._center(x, self.in_zero_point, self.acc_dtype).reshape(-1, shape[-1])
        if residual is not None:
            residual = residual.reshape(-1, residual.shape[-1])
        y = self._run(xc, residual)
        return y.reshape(list(shape[:-1]) + [y.shape[-1]])

    def extra_repr(self) -> str:
        return (
            f"out_features={self.weight0.shape[0]}, extra_points={self.weight_extra.shape[0]}, acc={self.acc_dtype}, "
            f"out={self.out_dtype}, clamp=[{self.lo}, {self.hi}], residual={self.residual_mult is not None}"
        )


class _ScalarRequantizer(_Requantizer):
    """Per-tensor dyadic multipliers ``mult[i] / 2^shift`` (one per input) and an int64 bias
    (the output zero point in fixed point)."""

    def __init__(
        self, mult: torch.Tensor, real_mult: torch.Tensor, bias: int, real_bias: float, shift: int, lo, hi, out_dtype
    ):
        super().__init__(torch.tensor(shift, dtype=torch.int64), lo, hi, out_dtype)
        self.register_buffer("mult", mult.to(torch.int64))
        self.register_buffer("bias", torch.tensor(bias, dtype=torch.int64))
        self.register_buffer("real_mult", real_mult.to(torch.float64))
        self.register_buffer("real_bias", torch.tensor(real_bias, dtype=torch.float64))

    def _affine(self, i: int, xc: torch.Tensor) -> torch.Tensor:
        return xc * (self.real_mult[i] if self.simulate else self.mult[i])

    def _offset(self) -> torch.Tensor:
        return self.real_bias if self.simulate else self.bias


class IntegerAdd(_ScalarRequantizer):
    """``a + b`` of two tensors on their own grids, onto the output grid (dyadic rescale of both)."""

    def __init__(self, zero_points: list[int], **kw):
        super().__init__(**kw)
        self.zp_a = int(zero_points[0])
        self.zp_b = int(zero_points[1])

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        v = self._affine(0, self._center(a, self.zp_a, torch.int64)) + self._affine(
            1, self._center(b, self.zp_b, torch.int64)
        )
        return self._finish(v + self._offset(), self.shift, self.rounding)

    def extra_repr(self) -> str:
        return f"out={self.out_dtype}, clamp=[{self.lo}, {self.hi}]"


class IntegerMean(_ScalarRequantizer):
    """Mean over ``dims`` (adaptive average pooling to 1x1): int64 sum, then the dyadic multiplier
    ``s_x / (count * s_y)``. ``count`` (the number of summed elements) is fixed at conversion."""

    dims: list[int]

    def __init__(self, dims: list[int], keepdim: bool, count: int, zero_point: int, **kw):
        super().__init__(**kw)
        self.dims = list(dims)
        self.keepdim = bool(keepdim)
        self.count = int(count)
        self.zero_point = int(zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = 1
        for d in self.dims:
            n *= x.shape[d]
        if n != self.count:
            raise ValueError(
                f"mpq IntegerMean: converted for means over {self.count} elements, got {n} (input shape {list(x.shape)}); "
                "convert with an example input of the deployed size"
            )
        s = torch.sum(self._center(x, self.zero_point, torch.int64), self.dims, self.keepdim)
        return self._finish(self._affine(0, s) + self._offset(), self.shift, self.rounding)

    def extra_repr(self) -> str:
        return f"dims={self.dims}, count={self.count}, out={self.out_dtype}"


class IntegerRequant(_ScalarRequantizer):
    """Moves codes from one grid to another: ``(m (x - zp_x) + zp_y 2^S) >> S``, clamped."""

    def __init__(self, zero_point: int, **kw):
        super().__init__(**kw)
        self.zero_point = int(zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self._affine(0, self._center(x, self.zero_point, torch.int64))
        return self._finish(v + self._offset(), self.shift, self.rounding)

    def extra_repr(self) -> str:
        return f"out={self.out_dtype}, clamp=[{self.lo}, {self.hi}]"


class IntegerClamp(nn.Module):
    """ReLU / ReLU6 / hardtanh on a tensor's own grid: ``clamp(q, lo, hi)``."""

    def __init__(self, lo: int, hi: int):
        super().__init__()
        self.lo = int(lo)
        self.hi = int(hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, self.lo, self.hi)

    def extra_repr(self) -> str:
        return f"[{self.lo}, {self.hi}]"


class QuantizeInput(nn.Module):
    """Entry (float): ``clamp(round(x / scale) + zp, qmin, qmax)`` as ``out_dtype`` (float64 codes
    when simulating). The same rounding as the fake quantization of the first layer's input."""

    def __init__(self, scale: float, zero_point: int, qmin: int, qmax: int):
        super().__init__()
        self.scale = float(scale)
        self.zero_point = int(zero_point)
        self.qmin = int(qmin)
        self.qmax = int(qmax)
        self.out_dtype = storage_dtype(qmin, qmax)
        self.simulate = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(x / self.scale) + self.zero_point, self.qmin, self.qmax)
        return q.to(torch.float64) if self.simulate else q.to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}, zero_point={self.zero_point}, range=[{self.qmin}, {self.qmax}], out={self.out_dtype}"


class DequantizeOutput(nn.Module):
    """Exit (float): ``(q - zp) * scale`` in float32."""

    def __init__(self, scale: float, zero_point: int):
        super().__init__()
        self.scale = float(scale)
        self.zero_point = int(zero_point)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return ((q.to(torch.float64) - self.zero_point) * self.scale).to(torch.float32)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}, zero_point={self.zero_point}"


class IntegerModel(nn.Module):
    """What ``mpq.integer_only`` returns: ``dequantize_output(body(quantize_input(x)))``.

    ``body`` (a ``torch.fx.GraphModule``) maps the input's integer codes to the output's integer
    codes with integer tensors only; ``quantize_input`` and ``dequantize_output`` are the only
    floating-point steps. ``forward_integer(x_q)`` runs the body alone.
    """

    def __init__(self, quantize_input: QuantizeInput, body: nn.Module, dequantize_output: DequantizeOutput):
        super().__init__()
        self.quantize_input = quantize_input
        self.body = body
        self.dequantize_output = dequantize_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequantize_output(self.body(self.quantize_input(x)))

    @torch.jit.export
    def forward_integer(self, x_q: torch.Tensor) -> torch.Tensor:
        """Input codes on the input grid -> output codes on the output grid."""
        return self.body(x_q)
