"""The base of the layers that run dequantize-then-float: the codebook layers (non-uniform levels)
and the group-wise layers (a float16 scale per group of input weights). Their stored form is the
multipoint layers' (packed codes, one point per channel) plus their own tables. The codebook
layers decode the dense weight in their forward on every call; the group-wise layers call
``mpq::groupwise_linear`` / ``groupwise_conv2d``, which keep the decoded weight on the CPU."""

import torch
import torch.nn.functional as F

from mpq.nn.modules import MultipointLayer, same_padding

__all__ = ["DequantizedLayer"]


class DequantizedLayer(MultipointLayer):
    """``_linear`` / ``_conv2d``: the float op with a given dense weight, the input fake-quantized
    by ``act_qparams`` first (W·A8) or left as is (W·A16)."""

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        qp = self.act_qparams
        if qp is None:
            return x
        # mpq.activation.fake_quantize with the qparams kept as tensors (no host read: torch.export
        # traces it), the same operations (0-dim tensors do not promote the input's dtype).
        s, zp = qp[0], qp[1]
        return (torch.clamp(torch.round(x / s) + zp, qp[2], qp[3]) - zp) * s

    def _linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(self._quantize_input(x), w.to(x.dtype), b)

    def _conv_input(self, x: torch.Tensor) -> torch.Tensor:
        """A convolution subclass's input (its geometry attributes: ``set_conv_geometry``), padded
        ('same' or ``pre_padding``) and fake-quantized."""
        pads = same_padding(x, self.kernel_size, self.stride, self.dilation) if self.same_padding else self.pre_padding
        if len(pads) > 0:  # TF-style 'same' padding, dynamic or static
            x = F.pad(x, pads)
        return self._quantize_input(x)

    def _conv2d(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """A convolution subclass's forward."""
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.conv2d(self._conv_input(x), w.to(x.dtype), b, self.stride, self.padding, self.dilation, self.groups)
