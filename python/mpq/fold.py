"""Folding BatchNorm into the convolution that feeds it."""

from __future__ import annotations

import logging

import torch
from torch import nn

from mpq.simulate import output_difference

logger = logging.getLogger("mpq")

__all__ = ["find_conv_bn_pairs", "fold_batchnorm"]


def find_conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(conv name, bn name) for every BatchNorm2d whose input is exactly a Conv2d's output.

    Found by running ``example`` with hooks, so it works for models that torch.fx cannot trace.
    A conv or BN called more than once is left alone.
    """
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # id(output) -> (conv name, output kept alive)
    calls: dict[str, int] = {}
    pairs: dict[str, str] = {}
    handles = []

    def conv_hook(name):
        def hook(module, args, output):
            calls[name] = calls.get(name, 0) + 1
            outputs[id(output)] = (name, output)

        return hook

    def bn_hook(name):
        def hook(module, args):
            calls[name] = calls.get(name, 0) + 1
            hit = outputs.get(id(args[0]))
            if hit is not None and hit[1] is args[0]:
                pairs[name] = hit[0]

        return hook

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook(name)))
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(bn_hook(name)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    used = {}
    for conv in pairs.values():
        used[conv] = used.get(conv, 0) + 1
    return [(conv, bn) for bn, conv in pairs.items() if calls.get(bn) == 1 and calls.get(conv) == 1 and used[conv] == 1]


def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        std = torch.sqrt(bn.running_var.double() + bn.eps)
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(std)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(std)
        factor = gamma / std
        w = conv.weight.double() * factor.view(-1, 1, 1, 1)
        b = conv.bias.double() if conv.bias is not None else torch.zeros_like(std)
        b = (b - bn.running_mean.double()) * factor + beta
        conv.weight.copy_(w.to(conv.weight.dtype))
        if conv.bias is None:
            conv.bias = nn.Parameter(b.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
        else:
            conv.bias.copy_(b.to(conv.bias.dtype))


def fold_batchnorm(
    model: nn.Module, example: torch.Tensor, rtol: float = 1e-3, originals: dict[str, nn.Module] | None = None
) -> list[tuple[str, str]]:
    """Fold every BatchNorm2d fed directly by a Conv2d into that conv (in place, eval mode) and
    replace the BN by ``nn.Identity``. The model's output on ``example`` is compared before and
    after; if it moved by more than ``rtol`` (relative L2) the folding is undone and a warning names
    the pairs. Returns the folded (conv, bn) pairs. ``originals``, when given, receives conv name
    -> the BatchNorm2d module folded into it (removed from the model, its running statistics and
    affine parameters unchanged), for BatchNorm re-estimation after quantization."""
    pairs = find_conv_bn_pairs(model, example)
    if not pairs:
        return []
    modules = dict(model.named_modules())
    with torch.no_grad():
        before = model(example)
    saved = {conv: {k: v.clone() for k, v in modules[conv].state_dict().items()} for conv, _ in pairs}
    had_bias = {conv: modules[conv].bias is not None for conv, _ in pairs}
    for conv, bn in pairs:
        _fold_into(modules[conv], modules[bn])
        set_submodule(model, bn, nn.Identity())
    with torch.no_grad():
        after = model(example)
    err = output_difference(before, after)
    if not err <= rtol:
        for conv, bn in pairs:  # undo
            c = modules[conv]
            if not had_bias[conv]:
                c.bias = None
            c.load_state_dict(saved[conv])
            set_submodule(model, bn, modules[bn])
        logger.warning(
            "mpq: BatchNorm folding changed the output by %.2e; left %d BatchNorms unfolded", err, len(pairs)
        )
        return []
    logger.info("mpq: folded %d BatchNorm layers (output change %.1e)", len(pairs), err)
    if originals is not None:
        originals.update({conv: modules[bn] for conv, bn in pairs})
    return pairs


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Puts ``module`` at the dotted path ``name`` of ``model`` (replacing what is there)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
