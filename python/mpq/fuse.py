"""int8 activations between layers: the graph rewrite that fuses each multipoint convolution with
what follows it (a residual add, ReLU / ReLU6 / clamp, the next layer's activation quantizer).

    qmodel = mpq.quantize(model, calib)
    deployed = mpq.fuse_activations(qmodel, example)   # torch.fx.GraphModule; qmodel is untouched
    torch.jit.script(deployed)                          # or torch.export

In the quantized model, a convolution writes float32, ReLU reads and writes it again, and the next
layer reads it once more to quantize it to uint8. After the rewrite the convolution writes the next
layer's uint8 levels directly (clamp and quantizer in its epilogue) when every consumer is a
multipoint convolution with the same ``act_qparams``; otherwise it writes float32 with the residual
add and the clamp fused. The function computed is the same up to float32 rounding (the adds and
the clamp are exact operations on the same values; a level may differ by one where the float32
output lies within its rounding error of a quantizer's rounding boundary): :func:`check_fused`
measures that per layer against a float64 recomputation, and ``fuse_activations`` runs it on the
example before returning.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.utils import _pair

from mpq.layout import int8_levels_fit
from mpq.nn.fused import FusedMultipointConv2d
from mpq.nn.modules import MultipointConv2d, MultipointLayer
from mpq.simulate import layer_bound

__all__ = ["fuse_activations", "check_fused", "FusedCheck"]

_INF = float("inf")


class _LeafTracer(torch.fx.Tracer):
    """Keeps mpq's quantized layers as single call_module nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (MultipointLayer, FusedMultipointConv2d)) or super().is_leaf_module(m, qualname)


def _int8_levels(qp: torch.Tensor | None) -> bool:
    """Whether the fused op's int8 paths take act_qparams ``qp`` (the ops' rule: ``mpq::int8_levels_fit``)."""
    return qp is not None and int8_levels_fit(qp)


def _eligible(m: Any) -> bool:
    return type(m) is MultipointConv2d and m.point_codes.device.type == "cpu" and _int8_levels(m.act_qparams)


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _clamp_of(node: torch.fx.Node, modules: dict[str, nn.Module], src: torch.fx.Node) -> tuple[float, float] | None:
    """(lo, hi) when ``node`` is a ReLU, ReLU6, Hardtanh or clamp with constant bounds applied to ``src``."""
    if not node.args or node.args[0] is not src:
        return None
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.ReLU):
            return 0.0, _INF
        if isinstance(m, nn.Hardtanh):  # ReLU6 too
            return float(m.min_val), float(m.max_val)
        return None
    rest = list(node.args[1:])
    if (
        node.op == "call_function"
        and node.target in (F.relu, torch.relu, torch.relu_)
        or (node.op == "call_method" and node.target in ("relu", "relu_"))
    ):
        return 0.0, _INF
    if node.op == "call_function" and node.target is F.relu6:
        return 0.0, 6.0
    if node.op == "call_function" and node.target is F.hardtanh:
        lo = node.kwargs.get("min_val", rest[0] if len(rest) > 0 else -1.0)
        hi = node.kwargs.get("max_val", rest[1] if len(rest) > 1 else 1.0)
        return (float(lo), float(hi)) if all(isinstance(v, (int, float)) for v in (lo, hi)) else None
    if (node.op == "call_function" and node.target in (torch.clamp, torch.clip)) or (
        node.op == "call_method" and node.target in ("clamp", "clamp_", "clip", "clip_")
    ):
        lo = node.kwargs.get("min", rest[0] if len(rest) > 0 else None)
        hi = node.kwargs.get("max", rest[1] if len(rest) > 1 else None)
        if all(v is None or isinstance(v, (int, float)) for v in (lo, hi)):
            return -_INF if lo is None else float(lo), _INF if hi is None else float(hi)
    return None


def _max_pool_of(node: torch.fx.Node, modules: dict[str, nn.Module], src: torch.fx.Node) -> list[Any] | None:
    """The arguments of ``mpq::max_pool2d_levels`` (kernel_size, stride, padding, dilation,
    ceil_mode) when ``node`` is an ``nn.MaxPool2d`` (no indices) applied to ``src``, else None."""
    if node.op != "call_module" or not node.args or node.args[0] is not src or len(node.args) != 1 or node.kwargs:
        return None
    m = modules[node.target]
    if type(m) is not nn.MaxPool2d or m.return_indices:
        return None
    kernel = list(_pair(m.kernel_size))
    stride = list(_pair(m.stride if m.stride is not None else m.kernel_size))
    return [kernel, stride, list(_pair(m.padding)), list(_pair(m.dilation)), bool(m.ceil_mode)]


def _residual_of(node: torch.fx.Node, src: torch.fx.Node) -> torch.fx.Node | None:
    """The other operand when ``node`` is ``src + other`` (same shape, float32), else None."""
    is_add = (node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add)) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )
    if not is_add or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    other = b if a is src else (a if b is src else None)
    if not isinstance(other, torch.fx.Node) or other is src:
        return None
    meta_src, meta_other = src.meta.get("tensor_meta"), other.meta.get("tensor_meta")
    if meta_src is None or meta_other is None or meta_other.dtype != torch.float32:
        return None
    return other if tuple(meta_src.shape) == tuple(meta_other.shape) else None


def _fused_residual_add(u: torch.fx.Node, src: torch.fx.Node, eligible: set, modules: dict[str, nn.Module]) -> bool:
    """Whether ``u`` is ``src + other`` where ``other`` is an eligible convolution's single-use chain
    (through Identity modules): an add that the rewrite will fuse into that convolution, with
    ``src`` as its residual."""
    other = _residual_of(u, src)
    if other is None or len(other.users) != 1:
        return False
    p = other
    while p.op == "call_module" and isinstance(modules[p.target], nn.Identity) and len(p.users) == 1 and p.args:
        p = p.args[0]
    return p in eligible and len(p.users) == 1 and len(p.args) == 1 and not p.kwargs


def fuse_activations(
    qmodel: nn.Module, example: torch.Tensor, check: bool = True, quantize_residuals: bool = False
) -> torch.fx.GraphModule:
    """The deployable form of a quantized model with int8 activations between its layers.

    Traces ``qmodel`` with torch.fx (mpq's layers as leaves), fuses every multipoint convolution
    whose ``act_qparams`` have integer levels (at most 256) with the single-use chain after it:
    ``+ residual`` (same shape), then one ReLU / ReLU6 / Hardtanh / clamp, then, when every user of
    the result is such a convolution with the same ``act_qparams``, that quantizer (uint8 output).
    A ``nn.MaxPool2d`` between such a convolution and its readers then pools the uint8 levels
    (``mpq::max_pool2d_levels``: exact, since quantizing is monotone).
    Layers that do not fit (float activations, Linear layers, CUDA) are left as they are.

    ``quantize_residuals``: also write uint8 levels where the other users of a result are residual
    adds fused into later convolutions (ResNet's and MBConv's skip connections): those adds then
    read the tensor's values at the convolutions' quantizer instead of float32, as PyTorch's own
    int8 path does, and no float32 tensor is left between blocks. NB: this changes the function
    (the skip path is rounded, and clipped to the quantizer's range), which ``mpq.quantize``'s
    simulation does not model: measure the fused model's accuracy (``check`` still verifies each
    layer against its float64 recomputation from the inputs it got). Off by default.

    ``example``: an input on which shapes are propagated and, with ``check``, the fused model is
    checked layer by layer (:func:`check_fused`; raises naming the layer on a disagreement).
    ``qmodel`` is not modified; the returned GraphModule shares its weights.
    """
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"mpq.fuse_activations: qmodel must be an nn.Module, got {type(qmodel).__name__}")
    if not isinstance(example, torch.Tensor):
        raise TypeError(f"mpq.fuse_activations: example must be a Tensor, got {type(example).__name__}")
    try:
        graph = _LeafTracer().trace(qmodel)
    except Exception as e:  # noqa: BLE001 - torch.fx raises many types for untraceable code
        raise RuntimeError(
            f"mpq.fuse_activations: torch.fx cannot trace {type(qmodel).__name__} ({type(e).__name__}: {e}); "
            "deploy the quantized model unfused"
        ) from e
    gm = torch.fx.GraphModule(qmodel, graph)
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    modules = dict(gm.named_modules())
    eligible = {n for n in gm.graph.nodes if n.op == "call_module" and _eligible(modules[n.target])}
    residual_grid: dict[torch.fx.Node, torch.Tensor] = {}  # add node -> the quantizer of its uint8 residual
    for n in list(gm.graph.nodes):
        if n not in eligible or len(n.args) != 1 or n.kwargs:
            continue
        layer: MultipointConv2d = modules[n.target]
        chain: list[torch.fx.Node] = []
        cur, residual, residual_qparams, lo, hi = n, None, None, -_INF, _INF
        nxt = _only_user(cur)
        while nxt is not None and nxt.op == "call_module" and isinstance(modules[nxt.target], nn.Identity):
            chain.append(nxt)
            cur, nxt = nxt, _only_user(nxt)
        if nxt is not None and (other := _residual_of(nxt, cur)) is not None:
            chain.append(nxt)
            residual_qparams = residual_grid.get(nxt)
            residual, cur, nxt = other, nxt, _only_user(nxt)
        if nxt is not None and (bounds := _clamp_of(nxt, modules, cur)) is not None:
            chain.append(nxt)
            (lo, hi), cur = bounds, nxt
        # A max pool next (a ResNet stem's) runs on the levels when convolutions read its result.
        pool = _only_user(cur)
        pool_args = _max_pool_of(pool, modules, cur) if pool is not None else None
        if pool_args is None:
            pool = None
        src = cur if pool is None else pool
        users = list(src.users)
        convs = [u for u in users if u in eligible and u.args and u.args[0] is src and len(u.args) == 1]
        adds = [
            u for u in users if quantize_residuals and u not in convs and _fused_residual_add(u, src, eligible, modules)
        ]
        out_qparams = None
        if convs and len(convs) + len(adds) == len(users):
            qps = [modules[u.target].act_qparams for u in convs]
            if all(torch.equal(qps[0], q) for q in qps[1:]):
                out_qparams = qps[0]
                residual_grid.update({u: out_qparams for u in adds})
        fused = FusedMultipointConv2d(layer, lo, hi, out_qparams, residual_qparams)
        gm.add_submodule(n.target, fused)  # gm's own container: qmodel keeps its layer
        modules[n.target] = fused
        with gm.graph.inserting_after(cur):
            new = gm.graph.call_module(n.target, (n.args[0],) if residual is None else (n.args[0], residual))
        new.meta = dict(cur.meta)
        cur.replace_all_uses_with(new)
        for old in reversed([n] + chain):
            gm.graph.erase_node(old)
        if pool is not None and out_qparams is not None:
            with gm.graph.inserting_after(pool):
                pooled = gm.graph.call_function(torch.ops.mpq.max_pool2d_levels, (new, *pool_args))
            pooled.meta = dict(pool.meta)
            pool.replace_all_uses_with(pooled)
            gm.graph.erase_node(pool)
        eligible.discard(n)
        eligible.add(new)
    gm.graph.lint()
    gm.recompile()
    if check:
        check_fused(gm, example)
    return gm


# ---- the per-layer check ------------------------------------------------------------------------


@dataclass
class FusedLayerCheck:
    name: str
    elements: int
    max_ratio: float  # float outputs: max |y - ref| / bound (passes at <= 1)
    level_flips: float  # uint8 outputs: fraction of levels off the float64 one (each within the bound)


@dataclass
class FusedCheck:
    layers: list[FusedLayerCheck] = field(default_factory=list)

    @property
    def max_ratio(self) -> float:
        return max((c.max_ratio for c in self.layers), default=0.0)

    @property
    def level_flips(self) -> float:
        return max((c.level_flips for c in self.layers), default=0.0)


def _check_one(
    name: str,
    f: FusedMultipointConv2d,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    y: torch.Tensor,
    max_samples: int,
) -> FusedLayerCheck:
    m = f.layer
    x, y = x[:max_samples], y[:max_samples]
    if x.dtype == torch.uint8:  # the levels' values, in the float32 the kernels compute in (the
        s, zp, qmin, _ = [float(v) for v in m.act_qparams.tolist()]  # recomputation quantizes them back exactly)
        x = (x.float() - (zp - qmin)) * s
    ref, bound, _ = layer_bound(m, x)
    if residual is not None:
        r = residual[:max_samples]
        if r.dtype == torch.uint8:  # the levels' values, in float32 as the kernels compute them
            rs, rzp, rqmin, _ = [float(v) for v in f.residual_qparams.tolist()]
            r = (r.float() - (rzp - rqmin)) * rs
        r = r.double()
        ref = ref + r
        bound = bound + 2.0**-24 * ref.abs()  # the add's rounding
    ref = ref.clamp(f.clamp_min, f.clamp_max)
    if f.out_qparams is None:
        err = (y.double() - ref).abs()
        ratio = err / bound
        worst = float(ratio.max()) if ratio.numel() else 0.0
        if worst > 1.0:
            idx = tuple(int(i) for i in torch.unravel_index(ratio.argmax(), ratio.shape))
            raise RuntimeError(
                f"mpq.fuse_activations: fused layer {name!r} disagrees with its float64 recomputation at output "
                f"element {idx}: {float(y[idx]):.9g} vs {float(ref[idx]):.9g}, bound {float(bound[idx]):.3e}"
            )
        return FusedLayerCheck(name, ratio.numel(), worst, 0.0)
    s, zp, qmin, qmax = [float(v) for v in f.out_qparams.tolist()]

    def levels(v: torch.Tensor) -> torch.Tensor:
        return (torch.round(v / s) + zp).clamp(qmin, qmax) - qmin

    # The kernel's float32 value lies within `bound` of ref, so its level lies between the levels
    # of ref - bound and ref + bound (plus the division's own rounding): one level off where ref is
    # near a rounding boundary, more where the input's own boundary slack makes the bound wide.
    slack = bound + 2.0**-22 * ref.abs()
    level, lo, hi = levels(ref), levels(ref - slack), levels(ref + slack)
    yd = y.double()
    diff = (yd - level).abs()
    bad = (yd < lo) | (yd > hi)
    if bool(bad.any()):
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise RuntimeError(
            f"mpq.fuse_activations: fused layer {name!r} wrote level {int(y[idx])} at output element {idx}, "
            f"float64 says {int(level[idx])} (allowed {int(lo[idx])}..{int(hi[idx])}: x/s = {float(ref[idx] / s):.9g}, "
            f"bound {float(bound[idx] / s):.3e} levels)"
        )
    return FusedLayerCheck(name, diff.numel(), 0.0, float((diff > 0).double().mean()) if diff.numel() else 0.0)


def check_fused(gm: nn.Module, example: torch.Tensor, max_samples: int = 8) -> FusedCheck:
    """One forward of the fused model with hooks on every fused layer; each layer recomputed from
    its own recorded input (and residual) in float64 (:func:`mpq.simulate.layer_bound`), then the
    residual add, the clamp and, for uint8 outputs, the quantizer. Float outputs must be within the
    bound; a uint8 level must be one of the levels of the values within the bound."""
    result = FusedCheck()
    failures: list[BaseException] = []

    def hook(name: str):
        def fn(mod: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
            if failures:
                return
            try:
                with torch.no_grad():
                    res = inputs[1] if len(inputs) > 1 else None
                    result.layers.append(_check_one(name, mod, inputs[0], res, output, max_samples))
            except RuntimeError as e:
                failures.append(e)

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in gm.named_modules() if isinstance(m, FusedMultipointConv2d)]
    try:
        with torch.no_grad():
            gm(example)
    finally:
        for h in handles:
            h.remove()
    if failures:
        raise failures[0]
    return result
