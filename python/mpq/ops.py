"""Typed wrappers over ``torch.ops.mpq.*`` and their fake kernels (for torch.compile/export).

The schemas live in C++ (``csrc/registration.cpp``); the dispatcher chooses the CPU or CUDA
kernel from the tensors' device.
"""
from typing import List, Optional, Tuple

import torch

from mpq._loader import load_ops_library

load_ops_library()

__all__ = [
    "fit_multipoint",
    "dequantize_multipoint",
    "multipoint_linear",
    "multipoint_conv2d",
]


def fit_multipoint(
    weight: torch.Tensor, bits: int, max_points: int, exact: bool = False
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy multipoint fit of every row of ``weight``.

    Args:
        weight (Tensor[C, D], float32/float64): one row per output channel.
        bits: code width, 2..8 (symmetric grid -K..K, K = 2^(bits-1) - 1).
        max_points: points fitted per row (nested: the first k are the k-point fit).
        exact: breakpoint sweep (true optimum of each greedy step) or the fast grid solver.

    Returns:
        codes (Tensor[C, max_points, D], int8), scales (Tensor[C, max_points], float32),
        sq_errors (Tensor[C, max_points], float32): ||w_j - sum_{i<=k} scales[j,i] codes[j,i]||^2.
    """
    return torch.ops.mpq.fit_multipoint(weight, bits, max_points, exact)


def dequantize_multipoint(
    codes: torch.Tensor, scales: torch.Tensor, num_points: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Dense weight ``W[j] = sum_{k < num_points[j]} scales[j,k] * codes[j,k]``.

    Args:
        codes (Tensor[C, P, ...], int8), scales (Tensor[C, P], float32), num_points (Tensor[C], int32).
    Returns:
        Tensor[C, ...] of ``dtype``.
    """
    return torch.ops.mpq.dequantize_multipoint(codes, scales, num_points, dtype)


def multipoint_linear(
    input: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    num_points: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    act_qparams: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``fq(input) @ W^T + bias`` with W the multipoint weight (codes int8[C, P, D]).

    ``act_qparams`` (Tensor[4], float32) = (scale, zero_point, qmin, qmax) fake-quantizes the
    input per tensor; None keeps it in float.
    """
    return torch.ops.mpq.multipoint_linear(input, codes, scales, num_points, bias, act_qparams)


def multipoint_conv2d(
    input: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    num_points: torch.Tensor,
    bias: Optional[torch.Tensor],
    act_qparams: Optional[torch.Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
) -> torch.Tensor:
    """``conv2d(fq(input), W, bias, stride, padding, dilation, groups)`` with W the multipoint
    weight (codes int8[C_out, P, C_in/groups, kh, kw]); ``act_qparams`` as in multipoint_linear."""
    return torch.ops.mpq.multipoint_conv2d(
        input, codes, scales, num_points, bias, act_qparams, stride, padding, dilation, groups
    )


# ---- fake kernels: shapes and dtypes only, for tracing -------------------------------------


def _check_one_device(op: str, input: Optional[torch.Tensor], codes: torch.Tensor, scales: torch.Tensor,
                      num_points: torch.Tensor, bias: Optional[torch.Tensor] = None,
                      act_qparams: Optional[torch.Tensor] = None) -> None:
    """The device rule of the C++ checks. NB: a meta tensor among CPU tensors dispatches here,
    to the fake kernel, which would otherwise return an uninitialised CPU tensor."""
    named = [("codes", codes), ("scales", scales), ("num_points", num_points), ("input", input), ("bias", bias)]
    devices = {name: t.device for name, t in named if t is not None}
    torch._check(
        len(set(devices.values())) == 1,
        lambda: f"{op}: expected every tensor argument on one device, got "
        + ", ".join(f"{name} on {d}" for name, d in devices.items()),
    )
    if act_qparams is not None:
        torch._check(
            act_qparams.device.type == "cpu" or act_qparams.device == codes.device,
            lambda: f"{op}: expected act_qparams on the CPU or on {codes.device}, got {act_qparams.device}",
        )


@torch.library.register_fake("mpq::fit_multipoint")
def _fit_multipoint_fake(weight, bits, max_points, exact):
    torch._check(weight.dim() == 2, lambda: "mpq::fit_multipoint: expected weight to be 2-D [C, D]")
    torch._check(2 <= bits <= 8, lambda: f"mpq::fit_multipoint: expected bits in 2..8, got {bits}")
    torch._check(max_points >= 1, lambda: f"mpq::fit_multipoint: expected max_points >= 1, got {max_points}")
    C, D = weight.shape
    codes = weight.new_empty((C, max_points, D), dtype=torch.int8)
    scales = weight.new_empty((C, max_points), dtype=torch.float32)
    return codes, scales, weight.new_empty((C, max_points), dtype=torch.float32)


@torch.library.register_fake("mpq::dequantize_multipoint")
def _dequantize_multipoint_fake(codes, scales, num_points, dtype):
    _check_one_device("mpq::dequantize_multipoint", None, codes, scales, num_points)
    return codes.new_empty((codes.shape[0], *codes.shape[2:]), dtype=dtype)


@torch.library.register_fake("mpq::multipoint_linear")
def _multipoint_linear_fake(input, codes, scales, num_points, bias, act_qparams):
    _check_one_device("mpq::multipoint_linear", input, codes, scales, num_points, bias, act_qparams)
    torch._check(input.shape[-1] == codes.shape[2], lambda: "mpq::multipoint_linear: input and codes disagree on D")
    return input.new_empty((*input.shape[:-1], codes.shape[0]))


@torch.library.register_fake("mpq::multipoint_conv2d")
def _multipoint_conv2d_fake(input, codes, scales, num_points, bias, act_qparams, stride, padding, dilation, groups):
    _check_one_device("mpq::multipoint_conv2d", input, codes, scales, num_points, bias, act_qparams)
    N, _, H, W = input.shape
    kh, kw = codes.shape[3], codes.shape[4]
    oh = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return input.new_empty((N, codes.shape[0], oh, ow))
