"""MultipointLinear / MultipointConv2d: what ``mpq.quantize`` swaps in.

State (buffers, what files hold): the *stored form* of the weight (``mpq::pack_points``): only the
points in use, channel-major, codes bit-packed at ``w_bits`` bits, ``point_codes`` (uint8[T,
ceil(D * w_bits / 8)], T = sum(num_points)), ``point_scales`` (float32[T]), ``num_points``
(int32[C]); ``bias`` (float32[C] or None), ``act_qparams`` (float32[4] = scale, zero_point, qmin,
qmax, or None for float activations). A 4-bit layer with 1.25 points per channel is 5 bits per
weight on disk, in ``state_dict()``, TorchScript files and ``mpq.save`` files alike. ``codes``
(int8[C, P, ...]) and ``scales`` (float32[C, P]) are decoded on demand (``unpacked()``).

The forward is one ``torch.ops.mpq`` call, so the module runs under TorchScript and in C++ with the
ops library. On the CPU, ``mpq::multipoint_{linear,conv2d}_stored`` run int8 activations on
oneDNN's int8 kernels (VNNI / AMX) and float activations on a dense weight decoded once; the
prepared weights live in the ops library's cache, never in the module (csrc/cpu/multipoint_stored.cpp).

On a GPU with float16/bfloat16 inputs both modules run fused kernels on a packed copy of the
weight (``mpq::pack_multipoint``; non-persistent buffers): packed once when the module moves to a
GPU (``.to``/``.cuda``), at the end of ``mpq.quantize`` on a GPU, or, for TorchScript/C++ callers,
on the first such forward. ``.half()``/``.to(dtype)`` keep the weight's float32 buffers
(point_scales, bias, act_qparams) in float32 (the ops' format): the layer then takes inputs of the
new dtype and returns outputs of that dtype.
"""

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import mpq.ops  # noqa: F401  (registers torch.ops.mpq)
from mpq import layout
from mpq.layout import check_max_points, check_w_bits, point_bits, stored_row_bytes


def is_depthwise(m: torch.nn.Module) -> bool:
    """Whether a quantized layer is a depthwise(-like) convolution: groups > 1 and one input channel
    per group. The CPU runs those on mpq's own kernel (not oneDNN's int8 rows: no int8_merge there),
    and the ONNX runtimes' depthwise int8 kernels widen every product (no code cap)."""
    return getattr(m, "groups", 1) > 1 and m.code_shape[0] == 1


def same_padding(x: torch.Tensor, kernel_size: list[int], stride: list[int], dilation: list[int]) -> list[int]:
    """F.pad amounts (left, right, top, bottom) of TensorFlow's 'SAME' padding for input x."""
    pads: list[int] = []
    for d in [1, 0]:  # F.pad order: width first, then height
        size = x.shape[2 + d]
        out = (size + stride[d] - 1) // stride[d]
        total = max((out - 1) * stride[d] + (kernel_size[d] - 1) * dilation[d] + 1 - size, 0)
        pads += [total // 2, total - total // 2]
    return pads


# The packed weight of the CUDA path (mpq::pack_multipoint), non-persistent buffers.
_PACKED_BUFFERS = (
    ("packed", torch.uint8),
    ("packed_scales", torch.float32),
    ("perm", torch.int32),
    ("tile_offsets", torch.int32),
    ("row_sums", torch.float32),
)


class MultipointLayer(nn.Module):
    """The base of every quantized layer of mpq (MultipointConv2d, MultipointLinear, the codebook
    layers): the stored form of the points (``point_codes``, ``point_scales``, ``num_points``),
    ``w_bits``, the optional bias and activation quantizer, and the packed GPU copy."""

    # state_dict version: 2 = the stored form (point_codes, point_scales); 1 = codes [C, P, ...] and
    # scales [C, P], converted on load (_load_from_state_dict).
    _version = 2
    __jit_unused_properties__ = ["codes", "scales"]

    code_shape: list[int]

    def __init__(self, out_channels: int, max_points: int, code_shape: list[int], w_bits: int, bias: bool):
        check_w_bits(type(self).__name__, w_bits)  # the bounds of the ops (mpq.layout)
        check_max_points(type(self).__name__, max_points)
        super().__init__()
        self.w_bits = w_bits
        self.max_points = max_points
        self.code_shape = [int(v) for v in code_shape]
        self.output_sqnr_db = float("nan")  # measured on calibration data by mpq.quantize
        D = math.prod(self.code_shape)
        # One zero point per channel until set_weight (the stored form of an all-zero weight).
        self.register_buffer("point_codes", torch.zeros(out_channels, stored_row_bytes(D, w_bits), dtype=torch.uint8))
        self.register_buffer("point_scales", torch.zeros(out_channels, dtype=torch.float32))
        self.register_buffer("num_points", torch.ones(out_channels, dtype=torch.int32))
        if bias:
            self.register_buffer("bias", torch.zeros(out_channels, dtype=torch.float32))
        else:
            self.register_buffer("bias", None)
        self.register_buffer("act_qparams", None)
        self.packed_kernel = "auto"
        for name, dtype in _PACKED_BUFFERS:
            self.register_buffer(name, torch.empty(0, dtype=dtype), persistent=False)

    # ---- the weight ----

    @torch.jit.export
    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes int8[C, max_points, *code_shape], scales float32[C, max_points]), decoded from the
        stored form, zero beyond each channel's count."""
        D = 1
        for v in self.code_shape:
            D *= v
        codes, scales = torch.ops.mpq.unpack_points(
            self.point_codes, self.point_scales, self.num_points, self.w_bits, D, self.max_points
        )
        return codes.view([codes.shape[0], self.max_points] + self.code_shape), scales

    @property
    def codes(self) -> torch.Tensor:
        """int8[C, max_points, *code_shape], decoded (a new tensor: writing to it changes nothing)."""
        return self.unpacked()[0]

    @property
    def scales(self) -> torch.Tensor:
        """float32[C, max_points], decoded (a new tensor: use ``point_scales`` to change the weight)."""
        return self.unpacked()[1]

    def stored_bytes(self) -> int:
        """Bytes of the stored weight: point codes, point scales and point counts."""
        return sum(t.numel() * t.element_size() for t in (self.point_codes, self.point_scales, self.num_points))

    # ---- the packed weight of the fused CUDA kernels ----

    def packable(self) -> bool:
        """Whether fused kernels serve this layer: MultipointLinear, MultipointConv2d except
        depthwise-like convolutions; not the codebook layers that share this base."""
        return False

    def _pack_args(self) -> tuple[torch.Tensor, int, int]:
        """(codes [C, P, D] in the packed column order, groups, D) for mpq::pack_multipoint."""
        codes = self.unpacked()[0]
        codes = codes.reshape(codes.shape[0], codes.shape[1], -1)
        return codes, 1, codes.shape[2]

    def _int8_kernel_fits(self) -> bool:
        """Whether act_qparams (read on the host) and the shape suit the packed int8 kernel: the
        kernels' own rule, ``mpq::packed_int8_fits`` (levels, Kp, and for a convolution whole
        slabs of input channels per group)."""
        qp = self.act_qparams
        if qp is None:
            return False
        return torch.ops.mpq.packed_int8_fits(qp, self.code_shape)

    @torch.jit.export
    def pack_(self) -> None:
        """Builds the packed weight (``mpq::pack_multipoint``) on the codes' device and picks the
        kernel: "int8" when act_qparams has integer zero point and range of at most 256 levels
        (read once on the host here, so that the forward never syncs), else "auto"."""
        if not self.packable():
            raise RuntimeError(
                "pack_: this layer has no fused kernels (codebook layers, grouped convolutions with fewer than "
                + str(layout.TILE_N)
                + " output channels per group: a packed tile's rows)"
            )
        codes, groups, _ = self._pack_args()
        packed, packed_scales, perm, tile_offsets, row_sums = torch.ops.mpq.pack_multipoint(
            codes, self.unpacked()[1], self.num_points, self.w_bits, groups
        )
        self.packed = packed
        self.packed_scales = packed_scales
        self.perm = perm
        self.tile_offsets = tile_offsets
        self.row_sums = row_sums
        self.packed_kernel = "int8" if self._int8_kernel_fits() else "auto"

    def _drop_packed(self) -> None:
        for name, dtype in _PACKED_BUFFERS:
            setattr(self, name, torch.empty(0, dtype=dtype, device=self.point_codes.device))
        self.packed_kernel = "auto"

    def _ensure_packed(self) -> None:
        """Packs unless a packed weight for the codes' device is already there (it follows .to())."""
        if self.tile_offsets.numel() == 0 or self.tile_offsets.device != self.point_codes.device:
            self.pack_()

    def _use_packed(self, x: torch.Tensor) -> bool:
        """The fused path: a float16/bfloat16 input on a GPU (packing first if needed)."""
        if not (x.is_cuda and (x.dtype == torch.float16 or x.dtype == torch.bfloat16) and self.packable()):
            return False
        self._ensure_packed()
        return True

    def _apply(self, fn, recurse: bool = True):
        # Device moves apply as usual; dtype casts (.half(), .to(dtype)) leave the float32 buffers
        # as they are (moved to the new device only): the ops take float32 scales, bias, act_qparams.
        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if t.is_floating_point() and out.dtype != t.dtype:
                out = t.to(device=out.device)
            return out

        super()._apply(keep_dtype, recurse)
        if self.point_codes.is_cuda and self.packable():
            self._ensure_packed()  # once per device (e.g. not again for .half() after .cuda())
        elif self.tile_offsets.numel() > 0:
            self._drop_packed()
        return self

    def set_weight(
        self, codes: torch.Tensor, scales: torch.Tensor, num_points: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        """Load a fitted multipoint weight into the stored form (only the points in use are kept).

        Args:
            codes (Tensor[C, P, ...], int8), scales (Tensor[C, P], floating, finite),
            num_points (Tensor[C], integer in 0..P), bias (Tensor[C], floating, finite, or None).
            Any device and layout: the values are copied into the module's buffers.
        """
        self._check_weight(codes, scales, num_points, bias)
        device = self.point_codes.device
        point_codes, point_scales = torch.ops.mpq.pack_points(
            codes.detach().cpu().contiguous(),
            scales.detach().cpu().to(torch.float32).contiguous(),
            num_points.detach().cpu().to(torch.int32),
            self.w_bits,
        )
        self.point_codes = point_codes.to(device)
        self.point_scales = point_scales.to(device)
        self.num_points.copy_(num_points.to(torch.int32))
        if bias is not None:
            self.bias.copy_(bias.detach().to(torch.float32))
        self._drop_packed()

    def _check_weight(
        self, codes: torch.Tensor, scales: torch.Tensor, num_points: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        """set_weight's argument checks, all before any buffer changes."""
        where = f"{type(self).__name__}.set_weight"
        C = self.num_points.shape[0]
        expected_codes = tuple([C, self.max_points] + self.code_shape)
        for arg, value in (("codes", codes), ("scales", scales), ("num_points", num_points), ("bias", bias)):
            if not isinstance(value, torch.Tensor) and not (arg == "bias" and value is None):
                raise TypeError(f"{where}: expected {arg} to be a tensor, got {type(value).__name__}")
        if codes.dtype != torch.int8:
            raise TypeError(f"{where}: expected codes to be int8, got {codes.dtype}")
        if not scales.is_floating_point():
            raise TypeError(f"{where}: expected scales to be a floating tensor, got {scales.dtype}")
        if num_points.is_floating_point() or num_points.is_complex() or num_points.dtype == torch.bool:
            raise TypeError(f"{where}: expected num_points to be an integer tensor, got {num_points.dtype}")
        if tuple(codes.shape) != expected_codes or tuple(scales.shape) != (C, self.max_points):
            raise ValueError(
                f"{where}: expected codes {expected_codes} and scales "
                f"{(C, self.max_points)}, got {tuple(codes.shape)} and {tuple(scales.shape)}"
            )
        if tuple(num_points.shape) != (C,):
            raise ValueError(f"{where}: expected num_points of shape ({C},), got {tuple(num_points.shape)}")
        if C and not (0 <= int(num_points.min()) and int(num_points.max()) <= self.max_points):
            raise ValueError(
                f"{where}: expected num_points in 0..{self.max_points}, got values in "
                f"{int(num_points.min())}..{int(num_points.max())}"
            )
        if not bool(torch.isfinite(scales).all()):
            raise ValueError(f"{where}: scales contains NaN or inf")
        if bias is not None:
            if self.bias is None:
                raise ValueError(f"{where}: the module was built without a bias; expected bias None")
            if not bias.is_floating_point():
                raise TypeError(f"{where}: expected bias to be a floating tensor, got {bias.dtype}")
            if tuple(bias.shape) != (C,):
                raise ValueError(f"{where}: expected bias of shape ({C},), got {tuple(bias.shape)}")
            if not bool(torch.isfinite(bias).all()):
                raise ValueError(f"{where}: bias contains NaN or inf")

    def set_act_qparams(self, scale: float, zero_point: int, qmin: int, qmax: int) -> None:
        """Per-tensor fake quantization of the input: clamp(round(x / scale) + zp, qmin, qmax).

        ``scale`` a finite number > 0; ``zero_point``, ``qmin``, ``qmax`` integers with
        qmin < qmax and qmin <= zero_point <= qmax."""
        where = f"{type(self).__name__}.set_act_qparams"
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (0 < scale < math.inf):
            raise ValueError(f"{where}: expected scale to be a finite number > 0, got {scale!r}")
        for arg, value in (("zero_point", zero_point), ("qmin", qmin), ("qmax", qmax)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{where}: expected {arg} to be an int, got {value!r}")
        if not qmin < qmax:
            raise ValueError(f"{where}: expected qmin < qmax, got qmin {qmin}, qmax {qmax}")
        if not qmin <= zero_point <= qmax:
            raise ValueError(f"{where}: expected zero_point in qmin..qmax ({qmin}..{qmax}), got {zero_point}")
        self.act_qparams = torch.tensor(
            [scale, zero_point, qmin, qmax], dtype=torch.float32, device=self.point_scales.device
        )
        self._drop_packed()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        old_codes, old_scales, counts = prefix + "codes", prefix + "scales", prefix + "num_points"
        if old_codes in state_dict and old_scales in state_dict and counts in state_dict:  # version 1: unpacked
            codes, scales = state_dict.pop(old_codes), state_dict.pop(old_scales)
            keep = torch.arange(codes.shape[1])[None, :] < state_dict[counts].cpu().long()[:, None]
            state_dict[prefix + "point_codes"], state_dict[prefix + "point_scales"] = torch.ops.mpq.pack_points(
                codes.cpu(),
                torch.where(keep, scales.cpu().float(), torch.zeros(())),
                state_dict[counts].cpu().int(),
                self.w_bits,
            )
        if prefix + "act_qparams" in state_dict and self.act_qparams is None:  # a module built before set_act_qparams
            self.act_qparams = torch.zeros(4, dtype=torch.float32, device=self.point_scales.device)
        for name in ("point_codes", "point_scales"):  # the stored form's length is the number of points in use
            t = state_dict.get(prefix + name)
            mine = getattr(self, name)
            if isinstance(t, torch.Tensor) and t.dim() == mine.dim() and t.shape[1:] == mine.shape[1:]:
                setattr(self, name, torch.empty(t.shape, dtype=mine.dtype, device=mine.device))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._drop_packed()

    @torch.jit.export
    def dequantized_weight(self) -> torch.Tensor:
        """The dense float32 weight sum_k scales[j,k] codes[j,k]."""
        codes, scales = self.unpacked()
        return torch.ops.mpq.dequantize_multipoint(codes, scales, self.num_points, torch.float32)

    def code_values(self, codes: torch.Tensor) -> torch.Tensor:
        """What the codes [C, P, ...] of this layer stand for, float64 of their shape: the weight is
        sum_k scales[:, k] * code_values(codes)[:, k]. The integers themselves here; the codebook
        and group-wise layers map them to their levels."""
        return codes.double()

    def scale_channels_(self, a: torch.Tensor) -> None:
        """Output channel j's weight times a[j] (BatchNorm re-estimation): its point scales."""
        # The stored form holds num_points[j] consecutive point scales per channel j.
        per_point = a.to(self.point_scales).repeat_interleave(self.num_points.long().to(a.device))
        self.point_scales.mul_(per_point.to(self.point_scales.device))
        self._drop_packed()

    def bits_per_weight(self) -> float:
        """Codes and scales of the points in use, per weight, as stored (``mpq.layout.point_bits``:
        float32 scales, whatever ``QuantConfig.scale_bits`` priced them at in the budget)."""
        per_channel = math.prod(self.code_shape)
        total_points = int(self.num_points.sum())
        return total_points * point_bits(per_channel, self.w_bits) / (self.num_points.shape[0] * per_channel)

    # ---- the layer as JSON data (mpq.save's metadata) ----

    def to_spec(self) -> dict[str, Any]:
        """The layer's type (``kind``, a key of ``LAYER_KINDS``), constructor arguments and
        non-tensor state as JSON data: ``MultipointLayer.from_spec`` rebuilds it (tensors zero,
        for a file's to be loaded into)."""
        kinds = [k for k, cls in LAYER_KINDS.items() if cls is type(self)]
        if not kinds:
            raise ValueError(
                f"{type(self).__name__}.to_spec: the layer type is not registered (mpq.nn.register_layer_kind)"
            )
        sqnr = float(self.output_sqnr_db)
        spec: dict[str, Any] = {
            "kind": kinds[0],
            "w_bits": int(self.w_bits),
            "max_points": int(self.max_points),
            "output_sqnr_db": None if math.isnan(sqnr) else sqnr,
            "has_bias": self.bias is not None,
            "has_act_qparams": self.act_qparams is not None,
        }
        spec.update(self.spec_arguments())
        return spec

    def spec_arguments(self) -> dict[str, Any]:
        """The layer type's own constructor arguments (shapes, geometry) as JSON data."""
        raise NotImplementedError(f"{type(self).__name__}.spec_arguments")

    @classmethod
    def from_spec_arguments(cls, spec: "SpecReader", w_bits: int, max_points: int, bias: bool) -> "MultipointLayer":
        """The layer built from ``spec_arguments``' data (read through ``spec``, which checks types)."""
        raise NotImplementedError(f"{cls.__name__}.from_spec_arguments")

    @staticmethod
    def from_spec(spec: dict[str, Any], name: str = "?", where: str = "mpq.load") -> "MultipointLayer":
        """The layer that ``to_spec`` described, its tensors zero; errors name ``where`` and the
        layer ``name``."""
        if not isinstance(spec, dict):
            raise ValueError(f"{where}: layer {name!r}: expected a JSON object, got {spec!r}")
        kind = spec.get("kind")
        cls = LAYER_KINDS.get(kind) if isinstance(kind, str) else None
        if cls is None:
            raise ValueError(f"{where}: layer {name!r}: unknown kind {kind!r} (expected one of {sorted(LAYER_KINDS)})")
        r = SpecReader(spec, name, where)
        try:
            m = cls.from_spec_arguments(r, r.get("w_bits", int), r.get("max_points", int), r.get("has_bias", bool))
        except (RuntimeError, IndexError) as e:  # e.g. negative sizes from a damaged header
            raise ValueError(f"{where}: layer {name!r}: invalid layer arguments in the metadata ({e})") from None
        if r.get("has_act_qparams", bool):
            m.act_qparams = torch.zeros(4, dtype=torch.float32)
        sqnr = spec.get("output_sqnr_db")
        if sqnr is not None and not isinstance(sqnr, (int, float)):
            raise ValueError(f"{where}: layer {name!r}: expected output_sqnr_db to be a number or null, got {sqnr!r}")
        m.output_sqnr_db = float("nan") if sqnr is None else float(sqnr)
        return m


class SpecReader:
    """Typed reads of a layer spec's values, with errors that name the layer and the key."""

    def __init__(self, spec: dict[str, Any], name: str, where: str):
        self.spec, self.name, self.where = spec, name, where

    def get(self, key: str, kind: type) -> Any:
        if key not in self.spec:
            raise ValueError(f"{self.where}: layer {self.name!r}: the metadata lacks {key!r}")
        v = self.spec[key]
        ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
        if kind is list:
            ok = ok and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
        if not ok:
            raise ValueError(f"{self.where}: layer {self.name!r}: expected {key} to be {kind.__name__}, got {v!r}")
        return v


# kind (the "kind" of a layer spec) -> layer type: what mpq.save can write and mpq.load rebuild.
LAYER_KINDS: dict[str, type[MultipointLayer]] = {}


def register_layer_kind(kind: str, cls: type[MultipointLayer]) -> type[MultipointLayer]:
    """Makes layer type ``cls`` saveable under ``kind`` (its ``to_spec`` / ``from_spec``)."""
    if kind in LAYER_KINDS and LAYER_KINDS[kind] is not cls:
        raise ValueError(f"mpq.nn.register_layer_kind: kind {kind!r} is taken by {LAYER_KINDS[kind].__name__}")
    LAYER_KINDS[kind] = cls
    return cls


def linear_spec_arguments(m: nn.Module) -> dict[str, Any]:
    return {"in_features": int(m.in_features), "out_features": int(m.out_features)}


def conv_code_shape(layer: str, in_channels: int, out_channels: int, kernel_size: list[int], groups: int) -> list[int]:
    """[in_channels / groups, kh, kw], the codes of one output channel of a convolution layer."""
    if in_channels % groups or out_channels % groups:
        raise ValueError(
            f"{layer}: expected groups ({groups}) to divide in_channels ({in_channels}) and out_channels ({out_channels})"
        )
    return [in_channels // groups, kernel_size[0], kernel_size[1]]


def set_conv_geometry(
    m: nn.Module,
    in_channels: int,
    out_channels: int,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    pre_padding: list[int] | None,
    same_padding: bool,
) -> None:
    """The geometry attributes of a convolution layer (those of the float Conv2d it replaces, plus
    the padding it applies first: ``pre_padding`` static, ``same_padding`` TF-style at run time)."""
    m.in_channels, m.out_channels, m.groups = int(in_channels), int(out_channels), int(groups)
    m.kernel_size = [int(v) for v in kernel_size]
    m.stride = [int(v) for v in stride]
    m.padding = [int(v) for v in padding]
    m.dilation = [int(v) for v in dilation]
    m.pre_padding = [int(v) for v in pre_padding] if pre_padding is not None else []
    m.same_padding = bool(same_padding)


def conv_geometry_from_spec(spec: "SpecReader") -> dict[str, Any]:
    """The keyword arguments of a convolution layer's geometry, read from its spec."""
    g = spec.get
    return dict(
        in_channels=g("in_channels", int),
        out_channels=g("out_channels", int),
        kernel_size=g("kernel_size", list),
        stride=g("stride", list),
        padding=g("padding", list),
        dilation=g("dilation", list),
        groups=g("groups", int),
        pre_padding=g("pre_padding", list),
        same_padding=g("same_padding", bool),
    )


def conv_spec_arguments(m: nn.Module) -> dict[str, Any]:
    return {
        "in_channels": int(m.in_channels),
        "out_channels": int(m.out_channels),
        "kernel_size": [int(k) for k in m.kernel_size],
        "stride": [int(v) for v in m.stride],
        "padding": [int(v) for v in m.padding],
        "dilation": [int(v) for v in m.dilation],
        "groups": int(m.groups),
        "pre_padding": [int(v) for v in m.pre_padding],
        "same_padding": bool(m.same_padding),
    }


class MultipointLinear(MultipointLayer):
    """Linear layer with a multipoint weight: codes int8[out_features, max_points, in_features].

    On a GPU with a float16/bfloat16 input, the forward runs ``mpq::multipoint_linear_packed`` on
    the packed weight (module docstring): fused kernels that read the 4-bit codes directly, with
    int8 tensor cores when ``act_qparams`` has integer levels that fit int8 (``packed_kernel`` says
    which). Other inputs run ``mpq::multipoint_linear_stored`` (on the CPU: oneDNN int8 or a
    decoded weight). NB: move the model to the GPU (or call ``pack_()``) before ``torch.compile``/``torch.export``, so that tracing does not meet the packing.
    """

    packed_kernel: str

    def __init__(self, in_features: int, out_features: int, max_points: int, w_bits: int, bias: bool = True):
        super().__init__(out_features, max_points, [in_features], w_bits, bias)
        self.in_features = in_features
        self.out_features = out_features

    def packable(self) -> bool:
        return True

    def spec_arguments(self) -> dict[str, Any]:
        return linear_spec_arguments(self)

    @classmethod
    def from_spec_arguments(cls, spec: SpecReader, w_bits: int, max_points: int, bias: bool) -> "MultipointLinear":
        return cls(spec.get("in_features", int), spec.get("out_features", int), max_points, w_bits, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_packed(x):
            return torch.ops.mpq.multipoint_linear_packed(
                x,
                self.packed,
                self.packed_scales,
                self.perm,
                self.tile_offsets,
                self.row_sums,
                self.out_features,
                self.bias,
                self.act_qparams,
                self.packed_kernel,
            )
        return torch.ops.mpq.multipoint_linear_stored(
            x,
            self.point_codes,
            self.point_scales,
            self.num_points,
            self.w_bits,
            self.in_features,
            self.bias,
            self.act_qparams,
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, w_bits={self.w_bits}, max_points={self.max_points}"


class MultipointConv2d(MultipointLayer):
    """Conv2d with a multipoint weight: codes int8[out_channels, max_points, in_channels/groups, kh, kw].

    ``pre_padding`` (left, right, top, bottom) zero-pads the input before the convolution, as
    TensorFlow-style 'same' convolutions with a static padding module do; ``same_padding``
    computes that padding from the input size at run time (their dynamic variant).

    On a GPU with a float16/bfloat16 input, the forward runs ``mpq::multipoint_conv2d_packed``
    (module docstring): an implicit GEMM over the NHWC input (channels_last in, channels_last out),
    with int8 activations and int8 tensor cores when ``act_qparams`` fit int8 and
    in_channels/groups is a whole number of slabs (``mpq::packed_int8_fits``; ``mpq.layout.SLAB_K``
    channels). Grouped convolutions with fewer than ``mpq.layout.TILE_N`` output channels per group
    keep ``mpq::multipoint_conv2d_stored`` (a packed tile holds that many channels of one group): a
    direct kernel for depthwise ones on channels_last inputs, dequantize then cuDNN otherwise.
    """

    packed_kernel: str

    # Declared for TorchScript, which cannot infer the element type of an empty list.
    kernel_size: list[int]
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    pre_padding: list[int]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: list[int],
        max_points: int,
        w_bits: int,
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        groups: int = 1,
        bias: bool = True,
        pre_padding: list[int] | None = None,
        same_padding: bool = False,
    ):
        code_shape = conv_code_shape("MultipointConv2d", in_channels, out_channels, kernel_size, groups)
        super().__init__(out_channels, max_points, code_shape, w_bits, bias)
        set_conv_geometry(
            self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, pre_padding, same_padding
        )

    def packable(self) -> bool:
        # A packed tile holds TILE_N channels of one group: fewer per group would be mostly padding.
        return self.groups == 1 or self.out_channels // self.groups >= layout.TILE_N

    def spec_arguments(self) -> dict[str, Any]:
        return conv_spec_arguments(self)

    @classmethod
    def from_spec_arguments(cls, spec: SpecReader, w_bits: int, max_points: int, bias: bool) -> "MultipointConv2d":
        return cls(max_points=max_points, w_bits=w_bits, bias=bias, **conv_geometry_from_spec(spec))

    def _pack_args(self) -> tuple[torch.Tensor, int, int]:
        # Columns in NHWC order (kh, kw, c): mpq.ops.conv_codes_nhwc.
        codes = self.unpacked()[0]
        codes = codes.permute(0, 1, 3, 4, 2).reshape(codes.shape[0], codes.shape[1], -1)
        return codes, self.groups, codes.shape[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_padding:
            x = F.pad(x, same_padding(x, self.kernel_size, self.stride, self.dilation))
        elif len(self.pre_padding) > 0:
            x = F.pad(x, self.pre_padding)
        if self._use_packed(x):
            return torch.ops.mpq.multipoint_conv2d_packed(
                x,
                self.packed,
                self.packed_scales,
                self.perm,
                self.tile_offsets,
                self.row_sums,
                self.out_channels,
                self.kernel_size,
                self.bias,
                self.act_qparams,
                self.stride,
                self.padding,
                self.dilation,
                self.groups,
                self.packed_kernel,
            )
        return torch.ops.mpq.multipoint_conv2d_stored(
            x,
            self.point_codes,
            self.point_scales,
            self.num_points,
            self.w_bits,
            self.code_shape,
            self.bias,
            self.act_qparams,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.kernel_size)}, stride={tuple(self.stride)}, "
            f"padding={tuple(self.padding)}, groups={self.groups}, w_bits={self.w_bits}, max_points={self.max_points}"
        )


register_layer_kind("linear", MultipointLinear)
register_layer_kind("conv", MultipointConv2d)
