"""The base of the layers that run dequantize-then-float: the codebook layers (non-uniform levels)
and the group-wise layers (a float16 scale per group of input weights). Their stored form is the
multipoint layers' (packed codes, one point per channel) plus their own tables; the forward
decodes the dense weight and runs the float op on the (fake-quantized) input, on every device."""

import torch
import torch.nn.functional as F

from mpq.activation import fake_quantize
from mpq.nn.modules import MultipointLayer, same_padding

__all__ = ["DequantizedLayer"]


class DequantizedLayer(MultipointLayer):
    """``_linear`` / ``_conv2d``: the float op with a given dense weight, the input fake-quantized
    by ``act_qparams`` first (W·A8) or left as is (W·A16)."""

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        qp = self.act_qparams
        if qp is None:
            return x
        return fake_quantize(x, float(qp[0]), int(qp[1]), int(qp[2]), int(qp[3]))

    def _linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(self._quantize_input(x), w.to(x.dtype), b)

    def _conv2d(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """A convolution subclass's forward (its geometry attributes: ``set_conv_geometry``)."""
        pads = same_padding(x, self.kernel_size, self.stride, self.dilation) if self.same_padding else self.pre_padding
        if len(pads) > 0:  # TF-style 'same' padding, dynamic or static
            x = F.pad(x, pads)
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.conv2d(
            self._quantize_input(x), w.to(x.dtype), b, self.stride, self.padding, self.dilation, self.groups
        )
