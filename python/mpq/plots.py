"""Report plots (matplotlib, imported only when a plot is made).

- ``plot_allocation(qmodel, path)``: per multipoint layer, the fraction of output channels with
  1, 2, ... points (stacked bars) and its bits per weight (line, right axis).
- ``plot_sweep(rows, path)``: quality (top-1, top-5, agreement with FP32) against average bits per
  weight, one line per method; what ``python -m mpq sweep`` draws.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["plot_allocation", "plot_sweep"]

PathLike = str | os.PathLike


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("mpq plots need matplotlib: `pip install matplotlib`") from None
    matplotlib.use("Agg", force=False)  # files only; never opens a window
    import matplotlib.pyplot as plt

    return plt


def plot_allocation(qmodel: nn.Module, path: PathLike, title: str | None = None) -> dict[str, Any]:
    """Write a PNG of how ``mpq.quantize`` spent the bits, layer by layer in model order.

    Bars: the fraction of each layer's output channels that have 1, 2, ..., P points (stacked).
    Line (right axis): the layer's bits per weight (codes and scales); dashed: the model average.

    Returns the plotted data: ``{"layers": [...], "fractions": [[...]], "bits_per_weight": [...],
    "avg_bits": float}``.
    """
    from mpq.io import check_output_path
    from mpq.nn.modules import MultipointLayer

    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"mpq.plot_allocation: expected qmodel to be a torch.nn.Module, got {type(qmodel).__name__}")
    check_output_path("mpq.plot_allocation", path)
    names: list[str] = []
    fractions: list[list[float]] = []
    bpw: list[float] = []
    weights: list[int] = []
    max_p = 1
    for m in qmodel.modules():
        if isinstance(m, MultipointLayer):
            max_p = max(max_p, int(m.max_points))
    for name, m in qmodel.named_modules():
        if isinstance(m, MultipointLayer):
            n = m.num_points.long().cpu()
            hist = torch.bincount(n, minlength=max_p + 1)[1 : max_p + 1].double()
            names.append(name or "(model)")
            fractions.append((hist / max(1, n.numel())).tolist())
            bpw.append(float(m.bits_per_weight()))
            weights.append(int(m.num_points.shape[0] * math.prod(m.code_shape)))
    if not names:
        raise ValueError("mpq.plot_allocation: qmodel has no multipoint layer; expected the output of mpq.quantize")
    avg = sum(b * w for b, w in zip(bpw, weights)) / sum(weights)

    plt = _pyplot()
    L = len(names)
    width = min(max(7.0, 0.22 * L + 2.5), 40.0)
    fig, ax = plt.subplots(figsize=(width, 5.2), dpi=110)
    cmap = plt.get_cmap("YlGnBu")  # light: few points, dark: many
    colors = [cmap(0.2 + 0.75 * i / max(1, max_p - 1)) for i in range(max_p)]
    x = list(range(L))
    bottom = [0.0] * L
    for p in range(max_p):
        vals = [f[p] for f in fractions]
        ax.bar(
            x,
            vals,
            bottom=bottom,
            width=0.85,
            color=colors[p],
            label=f"{p + 1} point{'s' if p else ''}",
            edgecolor="none",
        )
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylim(0, 1)
    ax.set_xlim(-0.6, L - 0.4)
    ax.set_ylabel("fraction of output channels")
    ax.set_xticks(x)
    upright = L <= 8 and max(len(n) for n in names) <= 14
    ax.set_xticklabels(names, rotation=0 if upright else 90, fontsize=7 if L > 20 else 8)
    ax.margins(x=0)
    ax2 = ax.twinx()
    ax2.plot(x, bpw, color="crimson", marker="o", markersize=3, linewidth=1.2, label="bits / weight")
    ax2.axhline(avg, color="crimson", linestyle="--", linewidth=1, label=f"model average {avg:.2f}")
    ax2.set_ylabel("bits per weight (codes + scales)", color="crimson")
    ax2.tick_params(axis="y", colors="crimson")
    ax2.set_ylim(0, max(bpw) * 1.15)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(
        h1 + h2, l1 + l2, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(h1 + h2), fontsize=8, frameon=False
    )
    fig.suptitle(
        title or f"Points per output channel: {L} multipoint layers, {avg:.2f} bits per weight on average", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(os.fspath(path))
    plt.close(fig)
    return {"layers": names, "fractions": fractions, "bits_per_weight": bpw, "avg_bits": avg}


def plot_sweep(
    rows: Sequence[dict[str, Any]],
    path: PathLike,
    reference: dict[str, Any] | None = None,
    title: str | None = None,
) -> None:
    """Write a PNG of quality against average bits per weight.

    Args:
        rows: one dict per quantized model with ``method``, ``avg_bits`` and the metrics
            ``top1``, ``top5`` (fractions; None when unknown) and ``agreement`` (top-1 agreement
            with FP32).
        reference: the FP32 row (drawn as a dashed line per metric), optional.
    """
    metrics = [
        (k, label)
        for k, label in (("top1", "top-1"), ("top5", "top-5"), ("agreement", "top-1 agreement with FP32"))
        if any(r.get(k) is not None for r in rows)
    ]
    if not rows or not metrics:
        raise ValueError("mpq.plot_sweep: expected rows with avg_bits and at least one of top1, top5, agreement")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 4.0), dpi=110, squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    markers = "osD^v<>"
    cmap = plt.get_cmap("tab10")
    for ax, (key, label) in zip(axes[0], metrics):
        for i, method in enumerate(methods):
            pts = sorted(
                (r["avg_bits"], 100 * r[key]) for r in rows if r["method"] == method and r.get(key) is not None
            )
            if pts:
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    marker=markers[i % len(markers)],
                    color=cmap(i),
                    linewidth=1.5,
                    label=method,
                )
        if reference is not None and reference.get(key) is not None:
            ax.axhline(
                100 * reference[key],
                color="black",
                linestyle="--",
                linewidth=1,
                label=f"FP32 ({100 * reference[key]:.1f}%)",
            )
        ax.set_ylim(0, 102)
        ax.set_xlabel("average bits per weight (codes + scales)")
        ax.set_ylabel(f"{label} (%)")
        ax.set_title(label, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(os.fspath(path))
    plt.close(fig)
