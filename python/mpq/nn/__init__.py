"""Scriptable quantized layers; their state lives in buffers and plain ints/floats. Every layer
type owns its JSON spec (``to_spec`` / ``MultipointLayer.from_spec``, registered in ``LAYER_KINDS``)
and its ``bits_per_weight``."""

from mpq.nn.codebook import CodebookConv2d, CodebookLayer, CodebookLinear
from mpq.nn.fused import FusedMultipointConv2d
from mpq.nn.groupwise import GroupwiseConv2d, GroupwiseLayer, GroupwiseLinear
from mpq.nn.modules import (
    LAYER_KINDS,
    MultipointConv2d,
    MultipointLayer,
    MultipointLinear,
    is_depthwise,
    register_layer_kind,
)

__all__ = [
    "LAYER_KINDS",
    "CodebookConv2d",
    "CodebookLayer",
    "CodebookLinear",
    "FusedMultipointConv2d",
    "GroupwiseConv2d",
    "GroupwiseLayer",
    "GroupwiseLinear",
    "MultipointConv2d",
    "MultipointLayer",
    "MultipointLinear",
    "is_depthwise",
    "register_layer_kind",
]
