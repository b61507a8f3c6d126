"""The layout rules of mpq's weights, as the ops library defines them.

Every rule that Python shares with the C++ kernels is defined once, in C++
(``csrc/kernels/layout.h``, ``csrc/kernels/packed_layout.h``), and read here once at import:
``torch.ops.mpq.layout_constants()`` gives the constants by name, ``torch.ops.mpq.int8_levels_fit``
and ``torch.ops.mpq.packed_int8_fits`` evaluate the eligibility predicates. ``QuantConfig``, the
modules (``mpq.nn``), the fake kernels (``mpq.ops``), the allocation, the report and the summary use
the names below and write no number of their own.

- ``MIN_W_BITS``..``MAX_W_BITS``: code widths; ``MAX_POINTS``: points per output channel
  (``max_points`` in 1..MAX_POINTS everywhere: QuantConfig, the modules, ``mpq::fit_multipoint``);
- ``SCALE_BITS``, ``COUNT_BITS``: what the stored form holds per point scale (float32) and per
  channel count (int32); :func:`point_bits` is the bit cost of one point, the only place it is
  written;
- ``INT8_LEVELS``: levels of an activation quantizer the int8 paths take;
- the packed weight of the fused CUDA kernels: ``TILE_N`` rows per tile (one point count each),
  ``SLAB_K`` columns per slab, ``K_ALIGN`` (Kp = :func:`padded_k`), :func:`slab_bytes`,
  ``INT8_MAX_K`` (the int8 kernels' largest Kp), ``PACKED_FORMAT_VERSION``.
"""

import torch

from mpq._loader import load_ops_library

load_ops_library()

__all__ = [
    "CONSTANTS",
    "MIN_W_BITS",
    "MAX_W_BITS",
    "MAX_POINTS",
    "SCALE_BITS",
    "COUNT_BITS",
    "INT8_LEVELS",
    "PACKED_FORMAT_VERSION",
    "TILE_N",
    "SLAB_K",
    "K_ALIGN",
    "NIBBLE_MAX_W_BITS",
    "INT8_MAX_K",
    "check_w_bits",
    "check_max_points",
    "point_bits",
    "stored_row_bytes",
    "padded_k",
    "slab_bytes",
    "int8_levels_fit",
    "packed_int8_fits",
]

#: Every constant of ``mpq::layout_constants()``, by its C++ name (a copy: changing it changes nothing).
CONSTANTS: dict[str, int] = dict(torch.ops.mpq.layout_constants())

MIN_W_BITS: int = CONSTANTS["min_w_bits"]
MAX_W_BITS: int = CONSTANTS["max_w_bits"]
MAX_POINTS: int = CONSTANTS["max_points"]
SCALE_BITS: int = CONSTANTS["scale_bits"]
COUNT_BITS: int = CONSTANTS["count_bits"]
INT8_LEVELS: int = CONSTANTS["int8_levels"]
PACKED_FORMAT_VERSION: int = CONSTANTS["packed_format_version"]
TILE_N: int = CONSTANTS["tile_n"]
SLAB_K: int = CONSTANTS["slab_k"]
K_ALIGN: int = CONSTANTS["k_align"]
NIBBLE_MAX_W_BITS: int = CONSTANTS["nibble_max_w_bits"]
INT8_MAX_K: int = CONSTANTS["int8_max_k"]
_SLAB_BYTES_NIBBLE: int = CONSTANTS["slab_bytes_nibble"]
_SLAB_BYTES_INT8: int = CONSTANTS["slab_bytes_int8"]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_w_bits(where: str, w_bits: object, name: str = "w_bits") -> None:
    """Raise ``ValueError`` unless ``w_bits`` is an int in MIN_W_BITS..MAX_W_BITS (as the C++ ops)."""
    if not _is_int(w_bits) or not MIN_W_BITS <= w_bits <= MAX_W_BITS:
        raise ValueError(f"{where}: expected {name} to be an int in {MIN_W_BITS}..{MAX_W_BITS}, got {w_bits!r}")


def check_max_points(where: str, max_points: object) -> None:
    """Raise ``ValueError`` unless ``max_points`` is an int in 1..MAX_POINTS (as the C++ ops)."""
    if not _is_int(max_points) or not 1 <= max_points <= MAX_POINTS:
        raise ValueError(f"{where}: expected max_points to be an int in 1..{MAX_POINTS}, got {max_points!r}")


def point_bits(weights_per_channel: int, w_bits: int, scale_bits: int = SCALE_BITS) -> int:
    """Bits of one point of a channel of ``weights_per_channel`` (D) weights: its D codes of
    ``w_bits`` bits and its scale of ``scale_bits`` bits.

    The default ``scale_bits`` is what the stored form holds (float32 point scales): the modules'
    ``bits_per_weight``, the report and ``mpq.summary`` count that. Only the allocation budget
    (``QuantConfig.scale_bits``) may price a scale differently."""
    return weights_per_channel * w_bits + scale_bits


GROUP_SCALE_BITS = 16  # the group-wise layers' float16 group scales (mpq.nn.groupwise)


def group_count(weights_per_channel: int, group_size: int) -> int:
    """Groups of a channel of D weights cut into groups of ``group_size`` (the last one shorter):
    ceil(D / group_size); one when ``group_size`` is 0."""
    return 1 if group_size <= 0 else -(-weights_per_channel // group_size)


def groupwise_bits(weights_per_channel: int, w_bits: int, group_size: int, symmetric: bool) -> float:
    """Stored bits per weight of a group-wise channel: D codes of ``w_bits`` bits, a float16 scale
    and, unless ``symmetric``, a ``w_bits``-bit zero point per group."""
    G = group_count(weights_per_channel, group_size)
    return (weights_per_channel * w_bits + G * (GROUP_SCALE_BITS + (0 if symmetric else w_bits))) / weights_per_channel


def stored_row_bytes(weights_per_channel: int, w_bits: int) -> int:
    """Bytes of one point's row of ``point_codes``: D codes of ``w_bits`` bits, the last byte padded."""
    return (weights_per_channel * w_bits + 7) // 8


def padded_k(weights_per_channel: int) -> int:
    """Kp of the packed weight: D rounded up to a multiple of K_ALIGN (works on SymInts too)."""
    return (weights_per_channel + K_ALIGN - 1) // K_ALIGN * K_ALIGN


def slab_bytes(w_bits: int) -> int:
    """Bytes of one slab (SLAB_K columns of one tile) of the packed weight: nibbles for
    ``w_bits <= NIBBLE_MAX_W_BITS``, int8 codes otherwise."""
    return _SLAB_BYTES_NIBBLE if w_bits <= NIBBLE_MAX_W_BITS else _SLAB_BYTES_INT8


def int8_levels_fit(act_qparams: torch.Tensor) -> bool:
    """Whether the int8 paths represent ``act_qparams`` (float32[4] = scale, zero_point, qmin, qmax)
    exactly: valid, integer zero point and range, at most INT8_LEVELS levels (``mpq::int8_levels_fit``,
    read on the host)."""
    return bool(torch.ops.mpq.int8_levels_fit(act_qparams))


def packed_int8_fits(act_qparams: torch.Tensor, code_shape: list[int]) -> bool:
    """Whether the packed int8 CUDA kernel computes a layer with ``act_qparams`` and ``code_shape``
    (``[in_features]``, or ``[C_in/groups, kh, kw]`` for a convolution): ``mpq::packed_int8_fits``."""
    return bool(torch.ops.mpq.packed_int8_fits(act_qparams, [int(v) for v in code_shape]))
