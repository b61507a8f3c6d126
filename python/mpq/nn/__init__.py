"""Scriptable multipoint layers; their state lives in buffers and plain ints/floats."""
from mpq.nn.modules import MultipointConv2d, MultipointLinear

__all__ = ["MultipointConv2d", "MultipointLinear"]
