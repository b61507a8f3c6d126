"""Calibration: forward hooks keep, per layer, a bounded random sample of its input rows
(im2col patches for convolutions) and of its input values, plus the input's range.

Memory per layer is ``calib_samples * C_in * kh * kw`` floats for the rows and a fixed number of
activation values, whatever the number of calibration batches.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mpq.config import QuantConfig
from mpq.distributed import ExactSum, agree, batch_generator, gather_objects, world
from mpq.nn.modules import same_padding

logger = logging.getLogger("mpq")

__all__ = ["QuantTarget", "LayerStats", "CalibrationBatches", "find_targets", "calibrate", "collect_batches"]

ACT_SAMPLE_SIZE = 16384
# Input rows drawn from each calibration batch, per layer.
ROWS_PER_BATCH = 1024


@dataclass
class QuantTarget:
    """A layer mpq will quantize, with what is needed to rebuild it as a multipoint layer."""

    name: str
    module: nn.Module
    kind: str  # "linear" or "conv"
    pre_padding: list[int] = field(default_factory=list)  # static (left, right, top, bottom)
    same_padding: bool = False  # TF-style 'same' padding computed at run time
    role: str = "inner"  # "first", "last" or "inner" (set from execution order)

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def groups(self) -> int:
        return self.module.groups if self.kind == "conv" else 1

    def weight_matrix(self) -> torch.Tensor:
        """[C_out, D] with D = C_in/groups * kh * kw (conv) or in_features (linear)."""
        w = self.module.weight.detach()
        return w.reshape(w.shape[0], -1)


def _conv_padding_kind(m: nn.Conv2d) -> tuple[list[int], bool] | None:
    """(static pre-padding, dynamic same padding) for the conv classes mpq can swap, else None."""
    if getattr(m, "padding_mode", "zeros") != "zeros" or isinstance(m.padding, str):
        return None
    if type(m) is nn.Conv2d:
        return [], False
    name = type(m).__name__
    if "DynamicSamePadding" in name:
        return [], True
    static = getattr(m, "static_padding", None)
    if static is not None:
        if isinstance(static, nn.ZeroPad2d):
            return [int(p) for p in static.padding], False
        if not list(static.parameters()) and type(static).__name__ == "Identity":
            return [], False
    return None


def find_targets(model: nn.Module, config: QuantConfig) -> tuple[list[QuantTarget], list[tuple[str, str]]]:
    """The layers to quantize, and (name, reason) for every weighted layer kept in float."""
    targets: list[QuantTarget] = []
    skipped: list[tuple[str, str]] = []
    quantized_names = set()
    for name, m in model.named_modules():
        if any(fnmatch.fnmatchcase(name, p) for p in config.ignore):
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                skipped.append((name, "ignored by config.ignore"))
            continue
        if isinstance(m, nn.Linear):
            targets.append(QuantTarget(name, m, "linear"))
        elif isinstance(m, nn.Conv2d):
            kind = _conv_padding_kind(m)
            if kind is None:
                skipped.append((name, f"unsupported convolution ({type(m).__name__}, padding_mode={m.padding_mode})"))
                continue
            targets.append(QuantTarget(name, m, "conv", pre_padding=kind[0], same_padding=kind[1]))
        else:
            continue
        quantized_names.add(name)
    for name, m in model.named_modules():
        has_weight = isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() >= 2
        if has_weight and name not in quantized_names and not any(name == s for s, _ in skipped):
            if not isinstance(m, (nn.Linear, nn.Conv2d)):
                skipped.append((name, f"unsupported layer type {type(m).__name__}"))
    return targets, skipped


_END = object()


class CalibrationBatches:
    """The calibration inputs, read in one pass over ``calib_loader`` as they are needed: each
    batch (a tensor, or the first element of an (input, target) pair) is checked and moved to
    ``device`` when it is reached. Only the first ``keep`` batches are held (``batches[i]`` and
    ``batches[:k]`` index them, for BatchNorm folding, sensitivity and the simulation check);
    iterating yields every batch once, so the inputs held never exceed ``keep`` batches.

    Under a process group (``mpq.distributed``) ``calib_loader`` is this rank's shard: its j-th
    batch is the global batch ``j * world + rank``, ``max_batches`` and ``keep`` count global
    batches, and ``indexed`` yields the global indices with the batches."""

    def __init__(self, calib_loader: Iterable, max_batches: int, keep: int, device: torch.device | None):
        if isinstance(calib_loader, torch.Tensor) or not hasattr(calib_loader, "__iter__"):
            raise TypeError(
                f"mpq.quantize: expected calib_loader to be an iterable of tensors or (input, target) pairs, "
                f"got {type(calib_loader).__name__}"
            )
        self.rank, self.world = world()
        if max_batches < self.world:
            raise ValueError(
                f"mpq.quantize: config.calib_batches ({max_batches}) is smaller than the number of ranks "
                f"({self.world}): every rank needs at least one calibration batch"
            )
        self._items = iter(calib_loader)
        self._max_batches = self._local(max_batches)
        self._keep = max(1, self._local(max(1, keep)))
        self._global_keep = max(1, keep)
        self._device = device
        self.read = 0  # batches taken from the loader so far
        self.kept: list[torch.Tensor] = []
        if self._next() is None:  # the first batch, read now: an empty loader fails before any work
            raise ValueError(
                "mpq.quantize: calib_loader yielded no batches" + (f" on rank {self.rank}" if self.world > 1 else "")
            )

    def _local(self, count: int) -> int:
        """How many of the first ``count`` global batches are this rank's."""
        return max(0, (count - self.rank + self.world - 1) // self.world)

    def global_index(self, local: int) -> int:
        return local * self.world + self.rank

    def _next(self) -> torch.Tensor | None:
        if self.read >= self._max_batches:
            return None
        item = next(self._items, _END)
        if item is _END:
            return None
        i = self.global_index(self.read)
        x = item[0] if isinstance(item, (tuple, list)) and len(item) > 0 else item
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"mpq.quantize: expected calib_loader to yield tensors or (input, target) pairs, "
                f"batch {i} is {type(item).__name__}"
                + (f" whose first element is {type(x).__name__}" if x is not item else "")
            )
        if x.dtype == torch.bool or x.is_complex():  # integers are token ids (embedding models)
            raise TypeError(
                f"mpq.quantize: expected calib_loader to yield floating or integer inputs, batch {i} has dtype {x.dtype}"
            )
        if x.numel() == 0:
            raise ValueError(f"mpq.quantize: calib_loader batch {i} is empty (shape {tuple(x.shape)})")
        if not torch.isfinite(x).all():
            raise ValueError(f"mpq.quantize: calib_loader batch {i} contains NaN or inf")
        x = x.to(self._device) if self._device is not None else x
        self.read += 1
        if len(self.kept) < self._keep:
            self.kept.append(x)
        return x

    def __getitem__(self, index):
        return self.kept[index]

    def first(self, count: int) -> tuple[list[int], list[torch.Tensor]]:
        """(global indices, batches) of this rank's kept batches among the first ``count`` global
        ones (``count`` <= ``keep``)."""
        n = min(len(self.kept), self._local(count))
        return [self.global_index(j) for j in range(n)], self.kept[:n]

    def indexed(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(global index, batch) for every batch of this rank, in order."""
        done = 0
        while True:
            x = self.kept[done] if done < len(self.kept) else self._next()
            if x is None:
                return
            yield self.global_index(done), x
            done += 1

    def __iter__(self) -> Iterator[torch.Tensor]:
        for _, x in self.indexed():
            yield x


def collect_batches(
    calib_loader: Iterable, max_batches: int, device: torch.device | None, keep: int = 1
) -> CalibrationBatches:
    """The first ``max_batches`` inputs of the loader, read lazily, of which the first ``keep``
    stay in memory (see ``CalibrationBatches``). Reads and checks the first batch now."""
    return CalibrationBatches(calib_loader, max_batches, keep, device)


class Reservoir:
    """Uniform sample of at most ``capacity`` rows over a stream: every row gets a random float64
    key (from ``generator``, which the caller may replace between additions) and the rows with the
    smallest keys are kept. ``sample`` returns them in key order, so that the sample of a stream
    split over ranks and merged (``merge``) is the single stream's, row for row."""

    def __init__(self, capacity: int, generator: torch.Generator):
        self.capacity = capacity
        self.generator = generator
        self.keys: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        keys = torch.rand(rows.shape[0], generator=self.generator, dtype=torch.float64)
        if self.rows is not None:
            rows = torch.cat([self.rows, rows])
            keys = torch.cat([self.keys, keys])
        self._keep(keys, rows)

    def _keep(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        if rows.shape[0] > self.capacity:
            keep = torch.topk(keys, self.capacity, largest=False).indices
            rows, keys = rows[keep], keys[keep]
        self.rows, self.keys = rows, keys

    def sample(self) -> torch.Tensor | None:
        """The kept rows in the order of their keys."""
        if self.rows is None:
            return None
        return self.rows[torch.argsort(self.keys, stable=True)]

    def merge(self, states: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        """Replace this sample by the one of the union of the ``(keys, rows)`` samples (every
        rank's, this one's included)."""
        states = [s for s in states if s is not None]
        if states:
            self._keep(torch.cat([k for k, _ in states]), torch.cat([r for _, r in states]))

    def state(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.rows is None else (self.keys, self.rows)


@dataclass
class LayerStats:
    """What calibration kept for one layer: the second moment of its input rows, either as the
    Gram matrix H = X^T X / N per group (when D <= calib_samples: all sampled rows of all batches
    contribute) or as a uniform sample of at most calib_samples rows X (when D is larger, where
    the sample is the smaller of the two)."""

    gram: torch.Tensor | None  # [groups, D, D] float64, mean of x x^T
    samples: torch.Tensor | None  # [N, groups, D] float32
    act_values: torch.Tensor  # [<= ACT_SAMPLE_SIZE] float32 sample of input values (CPU)
    act_min: float
    act_max: float
    order: int  # position of the layer's first call in the forward pass
    mean: torch.Tensor | None = None  # [groups, D] float64, mean input row (bias correction)
    # The first layer (in forward order) that reads the same input tensor as this one, itself when
    # none does (see ``SharedInputs``): layers reading one tensor share one activation quantizer.
    input_leader: str | None = None


class SharedInputs:
    """Which target layers read the very same input tensor (the same Python object in one forward
    pass, as a ResNet block's first conv and its downsample do): union-find over the calibration
    batches. Such layers get one activation quantizer, computed from the leader's sample, so that
    the tensor is quantized once (one grid: a deployment can pass it on as uint8 levels) rather
    than twice on grids that differ only through which values each layer happened to sample."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[weakref.ref, str]] = {}
        self._parent: dict[str, str] = {}

    def new_batch(self) -> None:
        self._seen.clear()

    def record(self, name: str, x: torch.Tensor) -> None:
        self._parent.setdefault(name, name)
        prev = self._seen.get(id(x))
        if prev is not None and prev[0]() is x:
            a, b = self._root(prev[1]), self._root(name)
            if a != b:
                self._parent[b] = a
        else:
            self._seen[id(x)] = (weakref.ref(x), name)

    def _root(self, name: str) -> str:
        while self._parent[name] != name:
            name = self._parent[name]
        return name

    def leaders(self, order: dict[str, int]) -> dict[str, str]:
        """Each recorded layer's leader: the member of its group called first."""
        groups: dict[str, list[str]] = {}
        for name in self._parent:
            groups.setdefault(self._root(name), []).append(name)
        return {n: min(members, key=lambda m: order[m]) for members in groups.values() for n in members}


class _Recorder:
    def __init__(self, target: QuantTarget, capacity: int, order_counter: list[int], shared: SharedInputs):
        self.target = target
        self.shared = shared
        D = target.weight_matrix().shape[1]
        self.use_gram = D <= capacity
        self.gram = ExactSum()  # [groups, D, D]: sum of x x^T over the sampled rows
        self.count = 0
        self.row_sum = ExactSum()  # [groups, D], over all sampled rows
        self.row_count = 0
        self.generator = torch.Generator()  # the current batch's (``batch_generator``)
        self.rows = Reservoir(capacity, self.generator)
        self.values = Reservoir(ACT_SAMPLE_SIZE, self.generator)
        self.capacity = capacity
        self.lo = float("inf")
        self.hi = float("-inf")
        self.order = -1
        self.order_counter = order_counter

    def new_batch(self, generator: torch.Generator) -> None:
        self.generator = self.rows.generator = self.values.generator = generator

    def __call__(self, module: nn.Module, args) -> None:
        self.shared.record(self.target.name, args[0])
        x = args[0].detach()
        if self.order < 0:
            self.order = self.order_counter[0]
            self.order_counter[0] += 1
        lo, hi = torch.aminmax(x)
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN and inf reach the min or the max
            raise ValueError(
                f"mpq.quantize: the input of layer {self.target.name!r} contains NaN or inf during calibration"
            )
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        flat = x.reshape(-1)
        pick = torch.randint(flat.numel(), (min(flat.numel(), 8192),), generator=self.generator)
        self.values.add(flat[pick.to(flat.device)].float().cpu())
        rows = self._sample_rows(x)  # [n, groups, D]
        self.row_sum.add(rows.sum(0))
        self.row_count += rows.shape[0]
        if self.use_gram:
            r = rows.transpose(0, 1).contiguous()  # [groups, n, D]
            self.gram.add(torch.bmm(r.transpose(1, 2), r))  # float32 products, exact float64 running sum
            self.count += rows.shape[0]
        else:
            self.rows.add(rows.cpu())

    def _sample_rows(self, x: torch.Tensor) -> torch.Tensor:
        n = min(self.capacity, ROWS_PER_BATCH)
        if self.target.kind == "linear":
            rows = x.reshape(-1, x.shape[-1])
            pick = torch.randint(rows.shape[0], (min(rows.shape[0], n),), generator=self.generator)
            return rows[pick.to(rows.device)].float().unsqueeze(1)
        return sample_patches(x, self.target, n, self.generator)

    def summary(self) -> tuple:
        """What ``merge_ranks`` needs of this rank's record besides the sums themselves."""
        return (
            self.gram.layout(),
            self.row_sum.layout(),
            self.count,
            self.row_count,
            self.rows.state(),
            self.values.state(),
            self.lo,
            self.hi,
            self.order,
        )

    def merge_ranks(self, every: list[tuple]) -> None:
        """Merge every rank's record of this layer into each (``mpq.distributed``), given every
        rank's ``summary()``: the sums and counts added, the range widened, the samples those of
        the union; the layer's place in the forward order is rank 0's (the first rank's that
        called it)."""
        what = f"calibration statistics of layer {self.target.name!r}"
        self.gram.merge_ranks(what, [e[0] for e in every])
        self.row_sum.merge_ranks(what, [e[1] for e in every])
        self.count = sum(e[2] for e in every)
        self.row_count = sum(e[3] for e in every)
        self.rows.merge([e[4] for e in every])
        self.values.merge([e[5] for e in every])
        self.lo, self.hi = min(e[6] for e in every), max(e[7] for e in every)
        self.order = next((e[8] for e in every if e[8] >= 0), -1)

    def stats(self) -> LayerStats | None:
        if self.order < 0:
            return None
        gram = (self.gram.value() / self.count).cpu() if self.use_gram else None
        samples = None if self.use_gram else self.rows.sample()
        mean = (self.row_sum.value() / max(1, self.row_count)).cpu()
        return LayerStats(gram, samples, self.values.sample(), self.lo, self.hi, self.order, mean)


def conv_input(x: torch.Tensor, target: QuantTarget) -> torch.Tensor:
    """The conv's input after its static/dynamic 'same' padding and its own zero padding."""
    m = target.module
    if target.same_padding:
        x = F.pad(x, same_padding(x, list(m.kernel_size), list(m.stride), list(m.dilation)))
    elif target.pre_padding:
        x = F.pad(x, target.pre_padding)
    p0, p1 = m.padding
    return F.pad(x, [p1, p1, p0, p0]) if (p0 or p1) else x


def sample_patches(x: torch.Tensor, target: QuantTarget, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random im2col patches of the conv's input, as float32 [count, groups, C_in/groups*kh*kw]
    (the layout of a weight row [C_in/groups, kh, kw])."""
    m = target.module
    xp = conv_input(x, target)
    B, Cin, H, W = xp.shape
    kh, kw = m.kernel_size
    (s0, s1), (d0, d1) = m.stride, m.dilation
    OH = (H - d0 * (kh - 1) - 1) // s0 + 1
    OW = (W - d1 * (kw - 1) - 1) // s1 + 1
    total = B * OH * OW
    idx = torch.randint(total, (min(count, total),), generator=generator).to(xp.device)
    b, rest = idx // (OH * OW), idx % (OH * OW)
    oy, ox = (rest // OW) * s0, (rest % OW) * s1
    rows = xp.permute(0, 2, 3, 1).reshape(B * H * W, Cin)  # NHWC: one pixel is one contiguous row
    base = b * (H * W) + oy * W + ox
    offsets = torch.tensor([i * d0 * W + j * d1 for i in range(kh) for j in range(kw)], device=xp.device)
    patches = rows[(base[:, None] + offsets[None, :]).reshape(-1)].reshape(-1, kh * kw, Cin)
    g = m.groups
    # [n, kh*kw, Cin] -> [n, Cin, kh*kw] -> [n, groups, Cin/groups * kh * kw]
    return patches.transpose(1, 2).reshape(patches.shape[0], g, -1).float()


def calibrate(
    model: nn.Module,
    targets: list[QuantTarget],
    batches: Iterable[torch.Tensor],
    config: QuantConfig,
) -> dict[str, LayerStats]:
    """Run the calibration batches once with hooks on every target layer (one pass: ``batches``
    may be a stream such as ``CalibrationBatches``). The random draws of batch i come from
    ``batch_generator(config.seed, i)``, i its global index (``CalibrationBatches.indexed``; its
    position for a plain iterable). Under a process group the ranks' records are merged, so every
    rank returns the statistics of all ranks' batches."""
    counter = [0]
    shared = SharedInputs()
    recorders = {t.name: _Recorder(t, config.calib_samples, counter, shared) for t in targets}
    items = batches.indexed() if isinstance(batches, CalibrationBatches) else enumerate(batches)

    def one_pass() -> None:
        handles = [t.module.register_forward_pre_hook(recorders[t.name]) for t in targets]
        try:
            with torch.no_grad():
                for i, x in items:
                    shared.new_batch()
                    g = batch_generator(config.seed, i)
                    for r in recorders.values():
                        r.new_batch(g)
                    try:
                        model(x)
                    except torch.cuda.OutOfMemoryError:
                        raise
                    except (RuntimeError, TypeError, ValueError, IndexError) as e:
                        if str(e).startswith("mpq"):  # mpq's own checks (NaN or inf in a layer's input) name themselves
                            raise
                        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                        raise ValueError(
                            f"mpq.quantize: the model fails on calib_loader batch {i} (input {tuple(x.shape)} "
                            f"{x.dtype}): {type(e).__name__}: {first}"
                        ) from e
        finally:
            for h in handles:
                h.remove()

    agree("calibration", one_pass)
    if world()[1] > 1:  # one exchange of the small parts, then two tensor collectives per layer
        every = gather_objects({n: r.summary() for n, r in recorders.items()}, "calibration statistics")
        for t in targets:
            recorders[t.name].merge_ranks([e[t.name] for e in every])
    stats: dict[str, LayerStats] = {}
    for t in targets:
        st = recorders[t.name].stats()
        if st is None:
            logger.warning("mpq: layer %r was never called during calibration; it stays in float", t.name)
            continue
        stats[t.name] = st
    leaders = shared.leaders({name: st.order for name, st in stats.items()})
    for name, st in stats.items():
        st.input_leader = leaders.get(name, name)
    return stats


def _float_tensors(output) -> list[torch.Tensor]:
    """The floating tensors in a model's output (a tensor, or nested tuples, lists and dicts)."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in _float_tensors(o)]
    return []


def _is_logits(output) -> bool:
    """[N, classes] floating rows that are not all of unit L2 norm (normalised rows are embeddings)."""
    if not isinstance(output, torch.Tensor) or output.dim() != 2 or not output.is_floating_point():
        return False
    norms = output.detach().double().norm(dim=1)
    return not bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-4))


def fisher_sensitivity(
    model: nn.Module,
    targets: list[QuantTarget],
    batches: list[torch.Tensor],
    output: str = "auto",
    seed: int = 0,
    indices: list[int] | None = None,
) -> dict[str, torch.Tensor] | None:
    """Per output channel of every target: the mean over samples of the summed (over positions)
    squared gradient, with respect to the layer's output, of the log-likelihood of an output model
    (a diagonal Fisher information): how much an error in that channel moves the model's output.

    - ``output="logits"`` (``"auto"`` for [N, classes] outputs): the cross-entropy to the model's
      own top-1 prediction (the empirical Fisher of a classifier).
    - ``output="gaussian"`` (``"auto"`` for any other output: embeddings, e.g. [N, D] rows of unit
      norm, token states, tuples or dicts of tensors): the Fisher of a Gaussian output model
      N(y, I). Its score for a target y' = y + v drawn from the model is J^T v with v ~ N(0, I), so
      back-propagating ``sum(y * v)`` for one v per batch (from ``batch_generator(seed, i, 1)``,
      i the batch's global index: ``indices``, else its position) gives an unbiased
      estimate of diag(J^T J), the Gauss-Newton diagonal of the squared output error
      ||y_q - y||^2 (for unit-norm embeddings 2 - 2 cos(y_q, y)).

    Layers whose input carries no gradient (integer token ids through an embedding) are handled:
    their output is made a leaf that requires grad. Gradients at padding tokens are zero when the
    model masks them out of its output. None when the output has no floating tensor.

    Under a process group (``mpq.distributed``) ``batches`` are this rank's and the result is
    that of every rank's batches (exact sums, merged).
    """
    if output not in ("auto", "logits", "gaussian"):
        raise ValueError(
            f"mpq.fisher_sensitivity: expected output to be 'auto', 'logits' or 'gaussian', got {output!r}"
        )
    sums = {t.name: ExactSum() for t in targets}
    indices = list(range(len(batches))) if indices is None else indices

    def make_hook(name, channel_dim):
        def hook(module, args, out):
            def grad_hook(g):
                dims = [d for d in range(g.dim()) if d != channel_dim % g.dim()]
                sums[name].add(g.detach().double().pow(2).sum(dim=dims))

            if not out.requires_grad:  # nothing upstream needs a gradient: start the graph here
                # (a non-leaf copy: in-place consumers such as ReLU(inplace=True) refuse a leaf)
                out = out.detach().requires_grad_(True).clone()
            out.register_hook(grad_hook)
            return out

        return hook

    handles = [t.module.register_forward_hook(make_hook(t.name, -1 if t.kind == "linear" else 1)) for t in targets]
    requires = {p: p.requires_grad for p in model.parameters()}
    kind = None if output == "auto" else output
    count = 0

    def backward_passes() -> bool:  # False: the output has no floating tensor
        nonlocal kind, count
        for i, x in zip(indices, batches):
            with torch.enable_grad():
                y = model(x.detach())
                ys = _float_tensors(y)
                if not ys:
                    return False
                if kind is None:
                    kind = "logits" if _is_logits(y) else "gaussian"
                if kind == "logits":
                    if not (isinstance(y, torch.Tensor) and y.dim() == 2 and y.is_floating_point()):
                        raise ValueError(
                            f"mpq.fisher_sensitivity: output='logits' needs [N, classes] outputs, got {type(y).__name__}"
                        )
                    loss = F.cross_entropy(y, y.detach().argmax(dim=1), reduction="sum")
                else:
                    g = batch_generator(seed, i, stream=1)
                    v = [torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device) for t in ys]
                    loss = sum((t * r).sum() for t, r in zip(ys, v))
                if loss.requires_grad:
                    loss.backward()
            count += x.shape[0]
        return True

    try:
        for p in model.parameters():
            p.requires_grad_(False)
        has_float = agree("Fisher sensitivity", backward_passes)
    finally:
        for h in handles:
            h.remove()
        for p, r in requires.items():
            p.requires_grad_(r)
    every = gather_objects((has_float, count), "Fisher sensitivity")
    if not all(h for h, _ in every):
        return None
    count = sum(n for _, n in every)
    merged = {k: v.merged(f"Fisher sensitivity of layer {k!r}") for k, v in sums.items()}
    return {k: (v / count).float().cpu() for k, v in merged.items() if v is not None}
