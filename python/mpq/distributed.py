"""mpq across processes and machines, on ``torch.distributed`` (gloo on CPUs, NCCL on GPUs).

Inside an initialised default process group (``torchrun``, or ``torch.distributed.init_process_group``
called by the user), ``mpq.quantize`` and ``python -m mpq eval`` split their work over the ranks:

- **Data.** Rank r of N reads its own shard of the calibration batches: its j-th batch is the
  global batch ``j * N + r`` (``shard`` gives rank r the batches r, r + N, ... of a loader). Every
  random draw that a batch causes (the rows and values sampled from it, the Fisher probe vector)
  comes from a generator seeded by ``config.seed`` and the batch's global index, so a batch gives
  the same draws on whichever rank reads it.
- **Statistics** are merged exactly: sums (second moments, mean rows, Fisher sums) are kept as
  double-double accumulators (``ExactSum``) whose merge does not depend on how the batches were
  split, counts are summed, ranges take the min / max, and the bounded samples keep the rows with
  the smallest random keys of the union. For the same seed and data, N = 1, 2 or 4 ranks give
  the same statistics bit for bit (the exact sums are correctly rounded to float64 unless a sum
  lies within ~1e-30 relative of a rounding boundary).
- **Fitting and refitting** are split by layer (largest first, each to the least-loaded rank),
  the allocation runs on rank 0, and the results are gathered so every rank ends with the same
  quantized model. Only rank 0 writes files and prints.
- **Failure.** Every collective carries the process group's timeout; a rank that fails raises its
  own error and the others raise ``DistributedError`` naming the stage, instead of hanging.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch

__all__ = [
    "DistributedError",
    "ExactSum",
    "world",
    "is_main",
    "shard",
    "batch_generator",
    "gather_objects",
    "gather_tensors",
    "broadcast_object",
    "agree",
    "split_work",
    "on_main",
    "move_tensors",
    "split_map",
    "init_from_env",
]

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 600.0


class DistributedError(RuntimeError):
    """A collective failed: another rank stopped, disagreed or did not answer within the timeout."""


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)


def is_main() -> bool:
    """Whether this process is rank 0 (or runs alone): the one that writes files and prints."""
    return world()[0] == 0


def shard(batches: Iterable[T], rank: int | None = None, size: int | None = None) -> Iterator[T]:
    """The items r, r + N, r + 2N, ... of ``batches`` for rank r of N (default: this process's).
    Rank r's j-th item is the global item j * N + r, as ``mpq.quantize`` counts it."""
    r, n = world()
    rank = r if rank is None else rank
    size = n if size is None else size
    if not (isinstance(size, int) and size >= 1 and isinstance(rank, int) and 0 <= rank < size):
        raise ValueError(f"mpq.distributed.shard: expected 0 <= rank < size, got rank={rank!r}, size={size!r}")
    for i, item in enumerate(batches):
        if i % size == rank:
            yield item


def batch_generator(seed: int, index: int, stream: int = 0) -> torch.Generator:
    """The generator of the random draws that global batch ``index`` causes in ``stream`` (0:
    calibration sampling, 1: the Fisher probe), the same on every rank."""
    mixed = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def _failed(what: str, e: BaseException) -> DistributedError:
    rank, size = world()
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return DistributedError(
        f"mpq.distributed: {what} failed on rank {rank} of {size}: another rank stopped or did not answer "
        f"within the process group's timeout ({type(e).__name__}: {text})"
    )


def gather_objects(obj: Any, what: str) -> list[Any]:
    """Every rank's ``obj`` (picklable; tensors travel on the CPU), in rank order."""
    dist = _dist()
    if dist is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(out, obj)
    except Exception as e:  # gloo raises RuntimeError, NCCL DistBackendError; both mean a lost peer
        raise _failed(what, e) from e
    return out


def broadcast_object(obj: Any, what: str, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    dist = _dist()
    if dist is None:
        return obj
    box = [obj if dist.get_rank() == src else None]
    try:
        dist.broadcast_object_list(box, src=src)
    except Exception as e:
        raise _failed(what, e) from e
    return box[0]


def agree(what: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank and stop them all if it fails on any: the rank where it failed
    raises its own error, the others a ``DistributedError`` that names that rank and its error
    (a bad batch on one rank must not leave the others waiting in the next collective)."""
    if _dist() is None:
        return fn()
    error: BaseException | None = None
    try:
        result = fn()
    except Exception as e:
        error, result = e, None
    errors = gather_objects(None if error is None else f"{type(error).__name__}: {error}", what)
    if error is not None:
        raise error
    bad = [(r, text) for r, text in enumerate(errors) if text is not None]
    if bad:
        r, text = bad[0]
        raise DistributedError(f"mpq.distributed: {what} failed on rank {r}: {text}")
    return result


def split_work(costs: list[float], size: int | None = None) -> list[int]:
    """The rank that does each item: largest cost first, each to the least-loaded rank (ties to
    the lower rank); the same on every rank."""
    n = world()[1] if size is None else size
    load = [0.0] * n
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(n), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


def _two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


class ExactSum:
    """A float64 sum of tensors kept as hi + lo (double-double, Knuth's TwoSum), so that the
    result is the correctly rounded exact sum whatever the order of the terms: the same for one
    process and for any split over ranks (``merged``)."""

    def __init__(self) -> None:
        self.hi: torch.Tensor | None = None
        self.lo: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.double()
        if self.hi is None:
            self.hi, self.lo = x.clone(), torch.zeros_like(x)
            return
        self.hi, err = _two_sum(self.hi, x)
        self.lo = self.lo + err

    def _add_pair(self, hi: torch.Tensor, lo: torch.Tensor) -> None:
        if self.hi is None:
            self.hi, self.lo = hi.clone(), lo.clone()
            return
        self.hi, err = _two_sum(self.hi, hi)
        self.lo = self.lo + lo + err

    def value(self) -> torch.Tensor | None:
        """The sum, rounded to float64 (None: nothing added)."""
        if self.hi is None:
            return None
        hi, lo = _two_sum(self.hi, self.lo)
        return hi + lo

    def state(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.hi is None else (self.hi.cpu(), self.lo.cpu())

    @classmethod
    def combine(cls, states: Iterable[tuple[torch.Tensor, torch.Tensor] | None]) -> ExactSum:
        total = cls()
        for st in states:
            if st is not None:
                total._add_pair(*st)
        return total

    def layout(self) -> tuple[tuple[int, ...], torch.dtype] | None:
        """(shape, dtype) of the sum, None before any term."""
        return None if self.hi is None else (tuple(self.hi.shape), self.hi.dtype)

    def merge_ranks(self, what: str, layouts: list | None = None) -> None:
        """Make this the sum over every rank's terms, the same on every rank (a no-op without a
        process group): the (hi, lo) pairs travel as one tensor collective, a rank without terms
        sending zeros (exact in the sum). ``layouts``: every rank's ``layout()``, when the caller
        has gathered them already."""
        if _dist() is None:
            return
        if layouts is None:
            layouts = gather_objects(self.layout(), what)
        shape = next((s for s in layouts if s is not None), None)
        if shape is None:
            return
        device = self.hi.device if self.hi is not None else torch.device("cpu")
        mine = torch.stack([self.hi, self.lo]) if self.hi is not None else torch.zeros((2, *shape[0]), dtype=shape[1])
        total = ExactSum.combine((p[0], p[1]) for p in gather_tensors(mine, what))
        self.hi, self.lo = total.hi.to(device), total.lo.to(device)

    def merged(self, what: str) -> torch.Tensor | None:
        """The sum over every rank's terms (this rank's alone without a process group)."""
        self.merge_ranks(what)
        return self.value()


def gather_tensors(t: torch.Tensor, what: str) -> list[torch.Tensor]:
    """Every rank's ``t`` (the same shape and dtype on every rank), in rank order, on ``t``'s
    device; with NCCL they travel through this rank's GPU."""
    dist = _dist()
    if dist is None:
        return [t]
    nccl = dist.get_backend() == "nccl"
    x = (t.cuda() if nccl else t.cpu()).contiguous()
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    try:
        dist.all_gather(out, x)
    except Exception as e:
        raise _failed(what, e) from e
    return [o.to(t.device) for o in out]


class _RankZeroOnly(logging.Filter):
    """mpq's log records from rank 0 alone (the other ranks compute the same things)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return is_main()


logging.getLogger("mpq").addFilter(_RankZeroOnly())


def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group that ``torchrun`` describes (WORLD_SIZE > 1 in the environment):
    NCCL with one GPU per local rank where CUDA is available, else gloo. False when the process
    runs alone or a group already exists."""
    import torch.distributed as dist

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise DistributedError("mpq.distributed: WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    backend = "gloo"
    if torch.cuda.is_available() and dist.is_nccl_available():
        backend = "nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as e:
        raise DistributedError(
            f"mpq.distributed: could not join the process group of {size} ranks "
            f"(MASTER_ADDR={os.environ.get('MASTER_ADDR')}, MASTER_PORT={os.environ.get('MASTER_PORT')}) "
            f"within {timeout_s:g} s: {type(e).__name__}: {e}"
        ) from e
    return True


def on_main(what: str, fn: Callable[[], T]) -> T:
    """``fn()`` computed on rank 0 and sent to every rank (a decision all ranks must share even
    where their floating-point arithmetic could differ, e.g. on machines with other CPUs)."""
    if _dist() is None:
        return fn()
    result = agree(what, lambda: fn() if is_main() else None)
    return broadcast_object(result, what)


def move_tensors(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with every tensor in it (nested in lists, tuples, dicts and dataclasses) on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_tensors(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: move_tensors(v, device) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: move_tensors(getattr(obj, f.name), device) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    return obj


def split_map(
    items: list[T],
    costs: list[float],
    fn: Callable[[T], Any],
    what: str,
    strip: Callable[[Any], Any] = lambda r: r,
    restore: Callable[[T, Any], Any] = lambda item, r: r,
) -> list[Any]:
    """``[fn(item) for item in items]``; under a process group each rank computes its share
    (``split_work`` by ``costs``) and every rank returns all results, each sent as ``strip(result)``
    with its tensors on the CPU and rebuilt as ``restore(item, sent)`` (on every rank alike)."""
    rank, size = world()
    if size == 1:
        return [fn(item) for item in items]
    owners = split_work(costs)
    mine = agree(what, lambda: {k: strip(fn(item)) for k, item in enumerate(items) if owners[k] == rank})
    every: dict[int, Any] = {}
    for part in gather_objects(move_tensors(mine, "cpu"), f"gathering the results of {what}"):
        every.update(part)
    return [restore(item, every[k]) for k, item in enumerate(items)]
