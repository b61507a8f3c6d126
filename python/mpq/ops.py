"""Typed wrappers over ``torch.ops.mpq.*`` and their fake kernels (for torch.compile/export).

The schemas live in C++ (``csrc/registration.cpp``); the dispatcher chooses the CPU or CUDA
kernel from the tensors' device.
"""

import torch

from mpq._loader import load_ops_library

load_ops_library()

from mpq.layout import (  # noqa: E402  (the shapes of the fake kernels follow the C++ layout rules)
    MAX_POINTS,
    MAX_W_BITS,
    MIN_W_BITS,
    SLAB_K,
    TILE_N,
    padded_k,
    slab_bytes,
    stored_row_bytes,
)

__all__ = [
    "int8_kernels_exact",
    "int8_merged_points",
    "fit_multipoint",
    "dequantize_multipoint",
    "multipoint_linear",
    "multipoint_conv2d",
    "pack_multipoint",
    "unpack_multipoint",
    "multipoint_linear_packed",
    "conv_codes_nhwc",
    "multipoint_conv2d_packed",
    "pack_points",
    "unpack_points",
    "multipoint_linear_stored",
    "max_pool2d_levels",
    "multipoint_conv2d_stored",
    "groupwise_linear",
    "groupwise_conv2d",
    "multipoint_conv2d_fused",
]


def fit_multipoint(
    weight: torch.Tensor, bits: int, max_points: int, exact: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    bias: torch.Tensor | None = None,
    act_qparams: torch.Tensor | None = None,
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
    bias: torch.Tensor | None,
    act_qparams: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """``conv2d(fq(input), W, bias, stride, padding, dilation, groups)`` with W the multipoint
    weight (codes int8[C_out, P, C_in/groups, kh, kw]); ``act_qparams`` as in multipoint_linear."""
    return torch.ops.mpq.multipoint_conv2d(
        input, codes, scales, num_points, bias, act_qparams, stride, padding, dilation, groups
    )


def pack_multipoint(
    codes: torch.Tensor, scales: torch.Tensor, num_points: torch.Tensor, w_bits: int, groups: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The packed weight of the fused kernels (layout: ``csrc/kernels/packed_layout.h``), made once.

    Channels are sorted by point count (descending, stable) into tiles of 64 rows with one count
    each; codes are stored as nibbles (``w_bits <= 4``, values -8..7) or int8, in the order the lanes
    of a warp load them as ``mma.sync`` operands.

    Args:
        codes (Tensor[C, P, D], int8), scales (Tensor[C, P], float32), num_points (Tensor[C], int32).
        w_bits: the codes' bit width, 2..8.
        groups: channel groups of a grouped convolution (dividing C): channels are sorted by group
            first, so that no tile mixes groups (channel c is in group c // (C // groups)).
    Returns:
        packed (Tensor[num_blocks, Kp/16, 512 or 1024], uint8), Kp = D rounded up to 64;
        packed_scales (Tensor[num_blocks, 64], float32); perm (Tensor[num_tiles*64], int32): the
        original channel of each packed row, -1 for padding; tile_offsets (Tensor[num_tiles+1], int32):
        tile t's points are blocks tile_offsets[t] .. tile_offsets[t+1]-1; row_sums
        (Tensor[num_tiles*64], float32): sum over k of each dequantized row.
    """
    return torch.ops.mpq.pack_multipoint(codes, scales, num_points, w_bits, groups)


def unpack_multipoint(
    packed: torch.Tensor,
    packed_scales: torch.Tensor,
    perm: torch.Tensor,
    tile_offsets: torch.Tensor,
    out_features: int,
    in_features: int,
    max_points: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of :func:`pack_multipoint`: codes (Tensor[C, max_points, D], int8, zero beyond
    each channel's count), scales (Tensor[C, max_points], float32), num_points (Tensor[C], int32)."""
    return torch.ops.mpq.unpack_multipoint(
        packed, packed_scales, perm, tile_offsets, out_features, in_features, max_points
    )


def multipoint_linear_packed(
    input: torch.Tensor,
    packed: torch.Tensor,
    packed_scales: torch.Tensor,
    perm: torch.Tensor,
    tile_offsets: torch.Tensor,
    row_sums: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None = None,
    act_qparams: torch.Tensor | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """:func:`multipoint_linear` on a packed weight: ``fq(input) @ W^T + bias`` -> [..., out_features].

    ``kernel`` picks the CUDA kernel ("auto", "dense", "gemv", "mma", "int8"); every choice
    computes the same function (the CPU kernel runs the reference path for all of them).
    "gemv"/"mma" need a float16/bfloat16 input, "int8" needs ``act_qparams`` with at most 256
    integer levels (on the GPU, other values give NaN instead of an error, as checking them would
    need a host sync).
    """
    return torch.ops.mpq.multipoint_linear_packed(
        input, packed, packed_scales, perm, tile_offsets, row_sums, out_features, bias, act_qparams, kernel
    )


def conv_codes_nhwc(codes: torch.Tensor) -> torch.Tensor:
    """Conv codes [C_out, P, C_in/groups, kh, kw] as the rows [C_out, P, kh * kw * C_in/groups] of
    :func:`multipoint_conv2d_packed`'s packed weight (columns in NHWC order: kh, kw, then c)."""
    return codes.permute(0, 1, 3, 4, 2).reshape(codes.shape[0], codes.shape[1], -1)


def multipoint_conv2d_packed(
    input: torch.Tensor,
    packed: torch.Tensor,
    packed_scales: torch.Tensor,
    perm: torch.Tensor,
    tile_offsets: torch.Tensor,
    row_sums: torch.Tensor,
    out_channels: int,
    kernel_size: list[int],
    bias: torch.Tensor | None,
    act_qparams: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    kernel: str = "auto",
) -> torch.Tensor:
    """:func:`multipoint_conv2d` on a packed weight, made by
    ``pack_multipoint(conv_codes_nhwc(codes), scales, num_points, w_bits, groups)``.

    ``kernel`` picks the CUDA kernel ("auto", "dense", "igemm": fused implicit GEMM on NHWC with
    float16/bfloat16 activations, "int8": int8 activations and tensor cores); every choice computes
    the same function. The output of the fused kernels is channels_last.
    """
    return torch.ops.mpq.multipoint_conv2d_packed(
        input,
        packed,
        packed_scales,
        perm,
        tile_offsets,
        row_sums,
        out_channels,
        kernel_size,
        bias,
        act_qparams,
        stride,
        padding,
        dilation,
        groups,
        kernel,
    )


def pack_points(
    codes: torch.Tensor, scales: torch.Tensor, num_points: torch.Tensor, w_bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored form of a multipoint weight (what files hold): only the points in use
    (``k < num_points[j]``), channel-major, each point's D codes bit-packed at ``w_bits`` bits.

    Args:
        codes (Tensor[C, P, ...], int8, the codes in use within -2^(w_bits-1)..2^(w_bits-1)-1),
        scales (Tensor[C, P], float32), num_points (Tensor[C], int32 in 0..P), w_bits: 2..8.
    Returns:
        point_codes (Tensor[T, ceil(D * w_bits / 8)], uint8), point_scales (Tensor[T], float32),
        T = sum(num_points), D = prod(codes.shape[2:]).
    """
    return torch.ops.mpq.pack_points(codes, scales, num_points, w_bits)


def unpack_points(
    point_codes: torch.Tensor,
    point_scales: torch.Tensor,
    num_points: torch.Tensor,
    w_bits: int,
    in_features: int,
    max_points: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`pack_points`: codes (Tensor[C, max_points, in_features], int8, zero
    beyond each channel's count) and scales (Tensor[C, max_points], float32)."""
    return torch.ops.mpq.unpack_points(point_codes, point_scales, num_points, w_bits, in_features, max_points)


def multipoint_linear_stored(
    input: torch.Tensor,
    point_codes: torch.Tensor,
    point_scales: torch.Tensor,
    num_points: torch.Tensor,
    w_bits: int,
    in_features: int,
    bias: torch.Tensor | None = None,
    act_qparams: torch.Tensor | None = None,
    path: str = "auto",
) -> torch.Tensor:
    """:func:`multipoint_linear` on the stored form (:func:`pack_points`) -> [..., C].

    On the CPU with a float32 input, ``path`` "int8" runs oneDNN's int8 inner product on the
    points (``act_qparams`` with at most 256 integer levels), "dense" a weight decoded once on the
    fake-quantized input, "auto" picks by the layer's shape; both are prepared once per weight and
    cached by the ops library. Every choice computes the same function."""
    return torch.ops.mpq.multipoint_linear_stored(
        input, point_codes, point_scales, num_points, w_bits, in_features, bias, act_qparams, path
    )


def multipoint_conv2d_stored(
    input: torch.Tensor,
    point_codes: torch.Tensor,
    point_scales: torch.Tensor,
    num_points: torch.Tensor,
    w_bits: int,
    code_shape: list[int],
    bias: torch.Tensor | None,
    act_qparams: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    path: str = "auto",
) -> torch.Tensor:
    """:func:`multipoint_conv2d` on the stored form, ``code_shape = [C_in/groups, kh, kw]``; kernels
    as :func:`multipoint_linear_stored` (oneDNN's int8 convolution). The CPU output is channels_last."""
    return torch.ops.mpq.multipoint_conv2d_stored(
        input,
        point_codes,
        point_scales,
        num_points,
        w_bits,
        code_shape,
        bias,
        act_qparams,
        stride,
        padding,
        dilation,
        groups,
        path,
    )


def groupwise_linear(
    input: torch.Tensor,
    point_codes: torch.Tensor,
    group_scales: torch.Tensor,
    group_zeros: torch.Tensor,
    input_scales: torch.Tensor,
    w_bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """A group-wise Linear (``mpq.nn.GroupwiseLinear``'s tables) on ``input`` as it comes: the dense
    weight scale * (code - zero) / input_scale, then ``F.linear``. On the CPU the weight is decoded
    once and cached by the ops library (float32's speed and memory); elsewhere per call."""
    return torch.ops.mpq.groupwise_linear(
        input, point_codes, group_scales, group_zeros, input_scales, w_bits, group_size, bias
    )


def groupwise_conv2d(
    input: torch.Tensor,
    point_codes: torch.Tensor,
    group_scales: torch.Tensor,
    group_zeros: torch.Tensor,
    input_scales: torch.Tensor,
    w_bits: int,
    group_size: int,
    code_shape: list[int],
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """:func:`groupwise_linear` for ``mpq.nn.GroupwiseConv2d`` (``code_shape = [C_in/groups, kh, kw]``;
    padding as ``F.conv2d``'s)."""
    return torch.ops.mpq.groupwise_conv2d(
        input,
        point_codes,
        group_scales,
        group_zeros,
        input_scales,
        w_bits,
        group_size,
        code_shape,
        bias,
        stride,
        padding,
        dilation,
        groups,
    )


def multipoint_conv2d_fused(
    input: torch.Tensor,
    point_codes: torch.Tensor,
    point_scales: torch.Tensor,
    num_points: torch.Tensor,
    w_bits: int,
    code_shape: list[int],
    bias: torch.Tensor | None,
    act_qparams: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    residual: torch.Tensor | None = None,
    clamp_min: float | None = None,
    clamp_max: float | None = None,
    out_qparams: torch.Tensor | None = None,
    path: str = "auto",
    residual_qparams: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`multipoint_conv2d_stored` with int8 activations between layers:
    ``y = clamp(conv(fq(input)) + bias + residual, clamp_min, clamp_max)`` (None or an infinite
    value: no bound), returned as float32 or,
    with ``out_qparams`` (the next layer's ``act_qparams``), as that quantizer's uint8 levels
    ``L - qmin``. ``input`` is float32, or uint8 levels at this layer's ``act_qparams``;
    ``residual`` float32, or uint8 levels at ``residual_qparams`` (their values are added).
    ``path``: "auto", "int8" (oneDNN), "depthwise" (mpq's kernel), "dense"; the same function on
    every path. The CPU output is channels_last."""
    return torch.ops.mpq.multipoint_conv2d_fused(
        input,
        point_codes,
        point_scales,
        num_points,
        w_bits,
        code_shape,
        bias,
        act_qparams,
        stride,
        padding,
        dilation,
        groups,
        residual,
        clamp_min,
        clamp_max,
        out_qparams,
        path,
        residual_qparams,
    )


def max_pool2d_levels(
    levels: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    ceil_mode: bool = False,
) -> torch.Tensor:
    """Max pooling of uint8 activation levels ``[N, C, H, W]``: exactly the levels of the pooled
    values (quantizing is monotone). The CPU output is channels_last."""
    return torch.ops.mpq.max_pool2d_levels(levels, kernel_size, stride, padding, dilation, ceil_mode)


def int8_kernels_exact(w_bits: int, act_levels: int = 256) -> bool:
    """Whether the CPU int8 paths compute ``w_bits``-bit weight codes exactly on this CPU against
    activations of ``act_levels`` levels: 8-bit codes under 8-bit activations need VNNI (oneDNN's
    kernels without it add pairs of uint8 x int8 products into a saturating int16: exact while
    2 (levels - 1) max|code| <= 32767, so under 7-bit activations every int8 code is exact); where
    not, the ops' "auto" path takes the float path for them."""
    return torch.ops.mpq.int8_kernels_exact(w_bits, act_levels)


def int8_merged_points(
    point_codes: torch.Tensor,
    point_scales: torch.Tensor,
    num_points: torch.Tensor,
    w_bits: int,
    D: int,
    act_levels: int = 256,
) -> torch.Tensor:
    """Per channel of a stored weight (a multipoint layer's ``point_codes``, ``point_scales``,
    ``num_points``), how many of its leading points the CPU int8 kernels run as one int8 row
    against activations of ``act_levels`` levels (``MultipointConfig(int8_merge=True)``): int32
    ``[C]``, 1 where none merge, 0 for channels without points."""
    return torch.ops.mpq.int8_merged_points(point_codes, point_scales, num_points, w_bits, D, act_levels)


# ---- fake kernels: shapes and dtypes only, for tracing -------------------------------------


def _check_one_device(
    op: str,
    input: torch.Tensor | None,
    codes: torch.Tensor,
    scales: torch.Tensor,
    num_points: torch.Tensor,
    bias: torch.Tensor | None = None,
    act_qparams: torch.Tensor | None = None,
) -> None:
    """The device rule of the C++ checks. NB: a meta tensor among CPU tensors dispatches here,
    to the fake kernel, which would otherwise return an uninitialised CPU tensor."""
    named = [("codes", codes), ("scales", scales), ("num_points", num_points), ("input", input), ("bias", bias)]
    devices = {name: t.device for name, t in named if t is not None}
    torch._check(
        len(set(devices.values())) == 1,
        lambda: (
            f"{op}: expected every tensor argument on one device, got "
            + ", ".join(f"{name} on {d}" for name, d in devices.items())
        ),
    )
    if act_qparams is not None:
        torch._check(
            act_qparams.device.type == "cpu" or act_qparams.device == codes.device,
            lambda: f"{op}: expected act_qparams on the CPU or on {codes.device}, got {act_qparams.device}",
        )


@torch.library.register_fake("mpq::fit_multipoint")
def _fit_multipoint_fake(weight, bits, max_points, exact):
    torch._check(weight.dim() == 2, lambda: "mpq::fit_multipoint: expected weight to be 2-D [C, D]")
    torch._check(
        MIN_W_BITS <= bits <= MAX_W_BITS,
        lambda: f"mpq::fit_multipoint: expected bits in {MIN_W_BITS}..{MAX_W_BITS}, got {bits}",
    )
    torch._check(
        1 <= max_points <= MAX_POINTS,
        lambda: f"mpq::fit_multipoint: expected max_points in 1..{MAX_POINTS}, got {max_points}",
    )
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


def _conv_output_format(input: torch.Tensor) -> torch.memory_format:
    """The memory format of a convolution's output: channels_last for a channels_last input (ATen's
    suggest_memory_format), as cuDNN, oneDNN and the fused NHWC kernels return it."""
    if input.dim() == 4 and not input.is_contiguous() and input.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


@torch.library.register_fake("mpq::multipoint_conv2d")
def _multipoint_conv2d_fake(input, codes, scales, num_points, bias, act_qparams, stride, padding, dilation, groups):
    _check_one_device("mpq::multipoint_conv2d", input, codes, scales, num_points, bias, act_qparams)
    N, _, H, W = input.shape
    kh, kw = codes.shape[3], codes.shape[4]
    oh = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return input.new_empty((N, codes.shape[0], oh, ow)).contiguous(memory_format=_conv_output_format(input))


@torch.library.register_fake("mpq::pack_points")
def _pack_points_fake(codes, scales, num_points, w_bits):
    torch._check(
        MIN_W_BITS <= w_bits <= MAX_W_BITS,
        lambda: f"mpq::pack_points: expected w_bits in {MIN_W_BITS}..{MAX_W_BITS}, got {w_bits}",
    )
    D = 1
    for v in codes.shape[2:]:
        D *= v
    points = torch.library.get_ctx().new_dynamic_size()  # sum(num_points): data-dependent
    return (
        codes.new_empty((points, stored_row_bytes(D, w_bits)), dtype=torch.uint8),
        scales.new_empty((points,), dtype=torch.float32),
    )


@torch.library.register_fake("mpq::unpack_points")
def _unpack_points_fake(point_codes, point_scales, num_points, w_bits, in_features, max_points):
    C = num_points.shape[0]
    return (
        point_codes.new_empty((C, max_points, in_features), dtype=torch.int8),
        point_scales.new_empty((C, max_points), dtype=torch.float32),
    )


@torch.library.register_fake("mpq::multipoint_linear_stored")
def _multipoint_linear_stored_fake(
    input, point_codes, point_scales, num_points, w_bits, in_features, bias, act_qparams, path="auto"
):
    torch._check(
        input.shape[-1] == in_features, lambda: "mpq::multipoint_linear_stored: input and in_features disagree"
    )
    return input.new_empty((*input.shape[:-1], num_points.shape[0]))


@torch.library.register_fake("mpq::multipoint_conv2d_stored")
def _multipoint_conv2d_stored_fake(
    input,
    point_codes,
    point_scales,
    num_points,
    w_bits,
    code_shape,
    bias,
    act_qparams,
    stride,
    padding,
    dilation,
    groups,
    path="auto",
):
    N, _, H, W = input.shape
    kh, kw = code_shape[1], code_shape[2]
    oh = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    fmt = torch.channels_last if input.device.type == "cpu" else _conv_output_format(input)
    return input.new_empty((N, num_points.shape[0], oh, ow)).contiguous(memory_format=fmt)


@torch.library.register_fake("mpq::groupwise_linear")
def _groupwise_linear_fake(input, point_codes, group_scales, group_zeros, input_scales, w_bits, group_size, bias):
    return input.new_empty((*input.shape[:-1], group_scales.shape[0]))


@torch.library.register_fake("mpq::groupwise_conv2d")
def _groupwise_conv2d_fake(
    input,
    point_codes,
    group_scales,
    group_zeros,
    input_scales,
    w_bits,
    group_size,
    code_shape,
    bias,
    stride,
    padding,
    dilation,
    groups,
):
    C = group_scales.shape[0]
    weight = input.new_empty((C, *code_shape))
    return torch.nn.functional.conv2d(input, weight, None, stride, padding, dilation, groups)


@torch.library.register_fake("mpq::multipoint_conv2d_fused")
def _multipoint_conv2d_fused_fake(
    input,
    point_codes,
    point_scales,
    num_points,
    w_bits,
    code_shape,
    bias,
    act_qparams,
    stride,
    padding,
    dilation,
    groups,
    residual,
    clamp_min,
    clamp_max,
    out_qparams,
    path="auto",
    residual_qparams=None,
):
    y = _multipoint_conv2d_stored_fake(
        input.float(),
        point_codes,
        point_scales,
        num_points,
        w_bits,
        code_shape,
        bias,
        act_qparams,
        stride,
        padding,
        dilation,
        groups,
    )
    return y if out_qparams is None else y.to(torch.uint8)


@torch.library.register_fake("mpq::max_pool2d_levels")
def _max_pool2d_levels_fake(levels, kernel_size, stride, padding, dilation, ceil_mode):
    torch._check(
        levels.dtype == torch.uint8 and levels.dim() == 4,
        lambda: "mpq::max_pool2d_levels: expected levels uint8 [N, C, H, W]",
    )
    y = torch.nn.functional.max_pool2d(
        levels.new_empty(levels.shape, dtype=torch.float32), kernel_size, stride, padding, dilation, ceil_mode
    )
    return y.to(torch.uint8).contiguous(memory_format=torch.channels_last)


@torch.library.register_fake("mpq::pack_multipoint")
def _pack_multipoint_fake(codes, scales, num_points, w_bits, groups=1):
    torch._check(codes.dim() == 3, lambda: "mpq::pack_multipoint: expected codes [C, P, D]")
    torch._check(
        MIN_W_BITS <= w_bits <= MAX_W_BITS,
        lambda: f"mpq::pack_multipoint: expected w_bits in {MIN_W_BITS}..{MAX_W_BITS}, got {w_bits}",
    )
    # The numbers of blocks and tiles depend on the point counts' values.
    ctx = torch.library.get_ctx()
    blocks = ctx.new_dynamic_size()
    tiles = ctx.new_dynamic_size()
    packed = codes.new_empty((blocks, padded_k(codes.shape[2]) // SLAB_K, slab_bytes(w_bits)), dtype=torch.uint8)
    packed_scales = scales.new_empty((blocks, TILE_N), dtype=torch.float32)
    perm = num_points.new_empty((tiles * TILE_N,), dtype=torch.int32)
    tile_offsets = num_points.new_empty((tiles + 1,), dtype=torch.int32)
    return packed, packed_scales, perm, tile_offsets, scales.new_empty((tiles * TILE_N,), dtype=torch.float32)


@torch.library.register_fake("mpq::unpack_multipoint")
def _unpack_multipoint_fake(packed, packed_scales, perm, tile_offsets, out_features, in_features, max_points):
    codes = packed.new_empty((out_features, max_points, in_features), dtype=torch.int8)
    scales = packed_scales.new_empty((out_features, max_points), dtype=torch.float32)
    return codes, scales, perm.new_empty((out_features,), dtype=torch.int32)


@torch.library.register_fake("mpq::multipoint_linear_packed")
def _multipoint_linear_packed_fake(
    input, packed, packed_scales, perm, tile_offsets, row_sums, out_features, bias, act_qparams, kernel="auto"
):
    torch._check(
        padded_k(input.shape[-1]) == packed.shape[1] * SLAB_K,
        lambda: "mpq::multipoint_linear_packed: input and packed disagree on D",
    )
    return input.new_empty((*input.shape[:-1], out_features))


@torch.library.register_fake("mpq::multipoint_conv2d_packed")
def _multipoint_conv2d_packed_fake(
    input,
    packed,
    packed_scales,
    perm,
    tile_offsets,
    row_sums,
    out_channels,
    kernel_size,
    bias,
    act_qparams,
    stride,
    padding,
    dilation,
    groups,
    kernel="auto",
):
    N, C, H, W = input.shape
    kh, kw = kernel_size
    torch._check(
        padded_k(kh * kw * (C // groups)) == packed.shape[1] * SLAB_K,
        lambda: "mpq::multipoint_conv2d_packed: input, kernel_size and packed disagree on kh * kw * C_in / groups",
    )
    oh = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return input.new_empty((N, out_channels, oh, ow)).contiguous(memory_format=_conv_output_format(input))
