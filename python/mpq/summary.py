"""``mpq.summary``: a per-layer table of a quantized model, read from its modules."""

from __future__ import annotations

import math

import torch
from torch import nn

from mpq.nn.modules import MultipointLayer
from mpq.pipeline.report import last_report

__all__ = ["summary", "model_size_bytes"]


def summary(qmodel: nn.Module) -> str:
    """Layer, shape (C_out x D), bit width, channels per point count, bits per weight and output
    SQNR on calibration data, for every multipoint layer; then the layers left in float, with
    their type: every module with a weight of two or more dimensions (Conv2d and Linear that were
    ignored, and layer types mpq does not quantize, such as Conv1d or Embedding)."""
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"mpq.summary: expected qmodel to be a torch.nn.Module, got {type(qmodel).__name__}")
    rows: list[list[str]] = []
    total_bits = total_weights = 0.0
    floats = []
    for name, m in qmodel.named_modules():
        if isinstance(m, MultipointLayer):
            C = m.num_points.shape[0]
            D = math.prod(m.code_shape)
            hist = torch.bincount(m.num_points.long().cpu(), minlength=m.max_points + 1)[1:].tolist()
            bpw = m.bits_per_weight()
            total_bits += bpw * C * D
            total_weights += C * D
            sqnr = "-" if math.isnan(m.output_sqnr_db) else f"{m.output_sqnr_db:.1f}"
            kind = "conv" if len(m.code_shape) == 3 else "linear"
            rows.append([name, kind, f"{C}x{D}", str(m.w_bits), "/".join(map(str, hist)), f"{bpw:.2f}", sqnr])
        elif isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() >= 2:
            floats.append(f"{name} ({type(m).__name__})")
    header = ["layer", "type", "C x D", "bits", "channels with 1/2/.. points", "bits/weight", "SQNR dB"]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    avg = total_bits / total_weights if total_weights else float("nan")
    out.append(f"{len(rows)} multipoint layers, {int(total_weights)} weights, {avg:.3f} bits per weight on average")
    out.append(f"{len(floats)} layers in float" + (f": {', '.join(floats)}" if floats else ""))
    report = last_report(qmodel)
    for check in report.simulation_checks if report is not None else []:
        out.append(
            f"simulation check ({check.dtype}): {len(check.layers)} layers within their float64 bound "
            f"(largest error / bound {check.max_ratio:.2f}); end-to-end difference to the float simulation "
            f"{check.end_to_end:.2e} (relative L2)"
        )
    return "\n".join(out)


def model_size_bytes(model: nn.Module) -> int:
    """Storage of the model as deployed: quantized layers count their weight as stored (their
    ``bits_per_weight``: for multipoint layers ``mpq.layout.point_bits``, b bits per code and a
    float32 scale per point in use; codebook and group-wise layers their tables) and 8 bits per channel's point
    count (a count fits a byte; ``state_dict`` holds it as int32, ``mpq.layout.COUNT_BITS``); every
    other parameter and float buffer its own dtype's size."""
    bits = 0
    seen = set()
    for m in model.modules():
        if isinstance(m, MultipointLayer):
            C, D = m.num_points.numel(), math.prod(m.code_shape)
            bits += round(m.bits_per_weight() * C * D) + C * 8
            for t in (m.bias, m.act_qparams):
                if t is not None:
                    bits += t.numel() * t.element_size() * 8
            seen.update(id(b) for b in m.buffers())
    for p in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
        if id(p) not in seen:
            bits += p.numel() * p.element_size() * 8
            seen.add(id(p))
    return bits // 8
