"""Scriptable multipoint layers; their state lives in buffers and plain ints/floats."""
from mpq.nn.fused import FusedMultipointConv2d
from mpq.nn.modules import MultipointConv2d, MultipointLinear

__all__ = ["FusedMultipointConv2d", "MultipointConv2d", "MultipointLinear"]
