"""Per-tensor activation quantizer ranges from calibration (docs/ALGORITHM.md section 3)."""

from __future__ import annotations

import torch

__all__ = ["activation_qparams", "fake_quantize"]


def fake_quantize(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """What the ops do to an input: clamp(round(x / scale) + zp, qmin, qmax) - zp, times scale."""
    return (torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale


def activation_qparams(
    values: torch.Tensor, lo: float, hi: float, bits: int, method: str
) -> tuple[float, int, int, int]:
    """(scale, zero_point, qmin, qmax) for an input whose calibration range is [lo, hi] and whose
    sampled values are ``values``. Unsigned grid 0..2^b-1 when the input is never negative, else
    the symmetric signed grid; the clipping point by MSE on the sample (``"mse"``), the 99.99th
    percentile of |x| (``"percentile"``) or max |x| (``"minmax"``)."""
    unsigned = lo >= 0.0
    qmin, qmax = (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    top = max(abs(lo), abs(hi))
    if top == 0.0:
        return 1.0, 0, qmin, qmax
    if method == "minmax":
        clip = top
    elif method == "percentile":
        clip = float(torch.quantile(values.abs().double(), 0.9999)) if values.numel() else top
        clip = clip if clip > 0 else top
    else:
        v = values.float()
        candidates = top * torch.linspace(0.02, 1.0, 64, dtype=torch.float64)
        best, clip = float("inf"), top
        for c in candidates.tolist():
            s = c / qmax
            err = float((fake_quantize(v, s, 0, qmin, qmax) - v).pow(2).mean())
            if err < best:
                best, clip = err, c
    return clip / qmax, 0, qmin, qmax
