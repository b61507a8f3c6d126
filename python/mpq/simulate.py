"""A float simulation of a quantized model in plain PyTorch, and the check that the deployed
kernels agree with it ("simulation = deployment")."""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mpq.activation import fake_quantize
from mpq.nn.modules import MultipointConv2d, MultipointLinear, _MultipointBase, same_padding

__all__ = ["simulate", "check_simulation"]


def _dense_weight(m: _MultipointBase) -> torch.Tensor:
    """sum_{k < n_j} scales[j, k] codes[j, k] with torch ops only, in float32."""
    keep = (torch.arange(m.max_points, device=m.scales.device)[None, :] < m.num_points[:, None]).float()
    coeff = (m.scales * keep).reshape(*m.scales.shape, *([1] * (m.codes.dim() - 2)))
    return (coeff * m.codes.float()).sum(1)


class _Simulated(nn.Module):
    def __init__(self, m: _MultipointBase):
        super().__init__()
        self.source = m
        self.register_buffer("weight", _dense_weight(m))

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        qp: Optional[torch.Tensor] = self.source.act_qparams
        if qp is None:
            return x
        s, zp, qmin, qmax = qp.tolist()
        return fake_quantize(x, s, int(zp), int(qmin), int(qmax))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.source
        b = m.bias.to(x.dtype) if m.bias is not None else None
        if isinstance(m, MultipointLinear):
            return F.linear(self._quantize_input(x), self.weight.to(x.dtype), b)
        if m.same_padding:
            x = F.pad(x, same_padding(x, m.kernel_size, m.stride, m.dilation))
        elif m.pre_padding:
            x = F.pad(x, m.pre_padding)
        return F.conv2d(self._quantize_input(x), self.weight.to(x.dtype), b, m.stride, m.padding, m.dilation, m.groups)


def simulate(qmodel: nn.Module) -> nn.Module:
    """A copy of ``qmodel`` whose multipoint layers are plain-PyTorch float simulations
    (dequantized weight, fake-quantized input): no mpq op runs in it."""
    sim = copy.deepcopy(qmodel)
    for name, m in list(sim.named_modules()):
        if isinstance(m, (MultipointConv2d, MultipointLinear)):
            parent_name, _, child = name.rpartition(".")
            parent = sim.get_submodule(parent_name) if parent_name else sim
            setattr(parent, child, _Simulated(m))
    return sim


def check_simulation(qmodel: nn.Module, example: torch.Tensor, rtol: float = 1e-4) -> float:
    """Run ``example`` through the kernels and through ``simulate(qmodel)``; raise if the outputs
    differ by more than ``rtol`` (relative L2), or by more than 16 units of rounding of the least
    precise floating dtype among ``example`` and the model's parameters (float16 and bfloat16
    models: the kernels dequantize in float32, the simulation in the model's dtype). Returns the
    measured difference."""
    from mpq.fold import _relative_error

    dtypes = [t.dtype for t in [example, *qmodel.parameters()] if t.is_floating_point()]
    rtol = max([rtol] + [16 * torch.finfo(d).eps for d in dtypes])
    with torch.no_grad():
        deployed = qmodel(example)
        simulated = simulate(qmodel)(example)
    err = _relative_error(simulated, deployed)
    if not err <= rtol:
        raise RuntimeError(
            f"mpq.quantize: the quantized model's kernels and its float simulation disagree: relative "
            f"difference {err:.3e} > {rtol:.0e} on a calibration batch"
        )
    return err
