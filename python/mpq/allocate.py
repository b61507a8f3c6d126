"""Adaptive number of points per channel (docs/ALGORITHM.md section 2).

Every channel starts with one point; one more point at a time goes to the channel whose next
point buys the largest weighted output-error reduction per bit, until the average-bits budget is
spent. All layers compete (scope "model") or each layer gets the same average (scope "layer").
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass

import torch

from mpq.calibrate import LayerStats

logger = logging.getLogger("mpq")

__all__ = ["LayerErrors", "output_errors", "allocate_points"]


@dataclass
class LayerErrors:
    """Output error of every channel with k = 1..P points and the cost of one point."""

    errors: torch.Tensor  # [C, P] float64: E_j(k) = mean over calibration rows of (x . (w_j - w_j^(k)))^2
    weights_per_channel: int  # D
    point_bits: int  # bits of one point in the budget: mpq.layout.point_bits(D, w_bits, config.scale_bits)
    sensitivity: torch.Tensor  # [C] float64 weight of channel j's output error


def _quadratic_form(delta: torch.Tensor, stats: LayerStats, groups: int) -> torch.Tensor:
    """Per row j of delta [C, D]: delta_j^T H_g(j) delta_j, with H the input's second moment."""
    C, D = delta.shape
    d = delta.reshape(groups, C // groups, D)
    if stats.gram is not None:
        d = d.double()
        out = torch.einsum("gcd,gde,gce->gc", d, stats.gram, d)
    else:
        y = torch.einsum("ngd,gcd->ngc", stats.samples.float(), d.float())  # [N, groups, C/groups]
        out = y.double().pow(2).mean(0)
    return out.reshape(C)


def output_errors(
    weight: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, stats: LayerStats, groups: int
) -> torch.Tensor:
    """E[j, k] = E_x (x . (w_j - sum_{i<=k} a_ji q_ji))^2 for k = 0..P-1 (k+1 points), as
    delta^T H delta with H = E[x x^T] of calibration inputs. weight [C, D], codes int8 [C, P, D],
    scales [C, P]."""
    C, P, D = codes.shape
    partial = torch.zeros(C, D, dtype=torch.float64)
    out = torch.empty(C, P, dtype=torch.float64)
    w = weight.double()
    for k in range(P):
        partial = partial + scales[:, k : k + 1].double() * codes[:, k].double()
        out[:, k] = _quadratic_form(w - partial, stats, groups)
    return out


def output_energy(weight: torch.Tensor, stats: LayerStats, groups: int) -> torch.Tensor:
    """Per channel E_x (x . w_j)^2: the signal against which output errors are measured."""
    return _quadratic_form(weight.double(), stats, groups)


def allocate_points(layers: dict[str, LayerErrors], avg_bits: float, scope: str = "model") -> dict[str, torch.Tensor]:
    """Points per channel (int32 [C] per layer) under ``avg_bits`` bits per weight on average.

    Greedy by benefit per cost with a heap: gain = sensitivity_j * (E_j(k) - E_j(k+1)), cost = one
    point's bits. If one point everywhere already exceeds the budget, every channel keeps one."""
    if scope == "layer":
        out: dict[str, torch.Tensor] = {}
        for name, layer in layers.items():
            out.update(allocate_points({name: layer}, avg_bits, "model"))
        return out
    counts = {name: torch.ones(l.errors.shape[0], dtype=torch.int32) for name, l in layers.items()}
    total_weights = sum(l.errors.shape[0] * l.weights_per_channel for l in layers.values())
    budget = avg_bits * total_weights - sum(l.errors.shape[0] * l.point_bits for l in layers.values())
    if budget < 0:
        logger.warning(
            "mpq: one point per channel already costs %.3f bits per weight, above the budget of %.3f; "
            "every channel keeps one point",
            avg_bits - budget / total_weights,
            avg_bits,
        )
    heap: list = []
    errs = {name: l.errors.tolist() for name, l in layers.items()}
    sens = {name: l.sensitivity.tolist() for name, l in layers.items()}

    def push(name: str, j: int, k: int) -> None:  # candidate: channel j goes from k to k + 1 points
        e = errs[name][j]
        if k >= len(e):
            return
        gain = sens[name][j] * (e[k - 1] - e[k])
        heapq.heappush(heap, (-gain / layers[name].point_bits, name, j, k))

    for name, l in layers.items():
        for j in range(l.errors.shape[0]):
            push(name, j, 1)
    while heap and budget > 0:
        neg_ratio, name, j, k = heapq.heappop(heap)
        if -neg_ratio <= 0:
            break
        cost = layers[name].point_bits
        if cost > budget:
            continue  # a cheaper point elsewhere may still fit
        budget -= cost
        counts[name][j] = k + 1
        push(name, j, k + 1)
    return counts
