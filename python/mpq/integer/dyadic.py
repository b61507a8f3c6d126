"""Dyadic numbers m / 2^shift: how integer-only inference multiplies by a real number.

HAWQ-V3 (Yao et al. 2021) requantizes between layers with an integer multiply by ``m`` followed
by an arithmetic right shift by ``shift``: ``round(v * real) ~ (v * m + 2^(shift-1)) >> shift``.
These helpers choose (m, shift) at conversion time, in float64 on the host; nothing here runs
inside an integer model.
"""

from __future__ import annotations

import math

import torch

__all__ = ["dyadic", "dyadic_tensor", "common_shift", "round_shift"]


def dyadic(real: float, bits: int = 31) -> tuple[int, int]:
    """(m, shift) with ``m / 2^shift`` the closest dyadic number to ``real`` whose ``|m|`` has at
    most ``bits`` bits, normalised so that ``2^(bits-1) <= |m| < 2^bits`` (``(0, 0)`` for 0).

    Relative error bound: ``|m / 2^shift - real| <= 2^-bits * |real|`` (rounding moves ``|m|`` by
    at most 1/2 and ``|m| >= 2^(bits-1)``). ``shift`` is negative for ``|real| >= 2^bits``
    (then ``m / 2^shift`` is a left shift). With ``bits=31`` ``m`` fits a signed int32.
    """
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 62:
        raise ValueError(f"mpq.integer.dyadic: expected bits to be an int in 2..62, got {bits!r}")
    real = float(real)
    if not math.isfinite(real):
        raise ValueError(f"mpq.integer.dyadic: expected a finite real, got {real}")
    if real == 0.0:
        return 0, 0
    frac, exp = math.frexp(abs(real))  # |real| = frac * 2^exp, frac in [0.5, 1)
    shift = bits - exp
    m = round(frac * (1 << bits))  # in [2^(bits-1), 2^bits]; exact: frac has 53 bits
    if m == 1 << bits:
        m, shift = m >> 1, shift - 1
    return (m if real > 0 else -m), shift


def dyadic_tensor(real: torch.Tensor, bits: int = 31) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise ``dyadic`` of a float tensor: (m int64, shift int64), same shape."""
    r = real.detach().to(torch.float64)
    if not torch.isfinite(r).all():
        raise ValueError("mpq.integer.dyadic_tensor: expected finite reals")
    frac, exp = torch.frexp(r.abs())
    shift = bits - exp.to(torch.int64)
    m = torch.round(frac * float(1 << bits)).to(torch.int64)
    top = m == (1 << bits)
    m = torch.where(top, m >> 1, m)
    shift = torch.where(top, shift - 1, shift)
    zero = r == 0
    m = torch.where(zero, torch.zeros_like(m), torch.where(r < 0, -m, m))
    shift = torch.where(zero, torch.zeros_like(shift), shift)
    return m, shift


def common_shift(reals: torch.Tensor, bits: int = 31) -> torch.Tensor:
    """One shift per row of ``reals`` [R, K] (float64) such that the row's largest |real|
    becomes a ``bits``-bit multiplier: the others of the row are rounded at the same shift, so
    that their products can be summed in int64 before one shift. Never negative."""
    top = reals.detach().to(torch.float64).abs().amax(dim=1)
    _, shift = dyadic_tensor(top, bits)
    return shift.clamp_min(0)


def round_shift(v: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``floor(v / 2^shift + 1/2)`` for int64 ``v`` and ``shift >= 0``: add half, arithmetic
    right shift (rounds half up, also for negative v)."""
    return (v + ((torch.ones_like(shift) << shift) >> 1)) >> shift
