"""mpq::dequantize_multipoint, mpq::multipoint_linear and mpq::multipoint_conv2d against the
float64 reference (tests/python/reference.py); opcheck on every op; the error paths."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mpq  # noqa: E402,F401  (loads the ops)
import reference as ref  # noqa: E402
from mpq.ops import dequantize_multipoint, fit_multipoint, multipoint_conv2d, multipoint_linear  # noqa: E402

Tensor = torch.Tensor

# (scale, zero_point, qmin, qmax): signed int8, unsigned int8 with a zero point, unsigned int4.
ACT_QPARAMS = {
    "none": None,
    "int8": (0.05, 0.0, -128.0, 127.0),
    "uint8": (0.02, 128.0, 0.0, 255.0),
    "uint4": (0.15, 3.0, 0.0, 15.0),
}


def act_tensor(name: str) -> Tensor | None:
    p = ACT_QPARAMS[name]
    return None if p is None else torch.tensor(p, dtype=torch.float32)


def random_multipoint(
    g: torch.Generator, C: int, P: int, inner: tuple[int, ...], bits: int = 4
) -> tuple[Tensor, Tensor, Tensor]:
    """codes int8[C, P, *inner] in -K..K, scales float32[C, P] > 0 (spread over two decades),
    num_points int32[C] in 0..P with at least one 0-point and one P-point channel."""
    K = ref.grid_max(bits)
    codes = torch.randint(-K, K + 1, (C, P, *inner), generator=g, dtype=torch.int8)
    scales = (torch.rand(C, P, generator=g) * 4 - 2).exp().mul(0.05).to(torch.float32)
    num_points = torch.randint(0, P + 1, (C,), generator=g, dtype=torch.int32)
    num_points[0] = 0
    num_points[-1] = P
    return codes, scales, num_points


def assert_close_rel(got: Tensor, want: Tensor, rtol: float) -> None:
    """Elementwise |got - want| <= rtol * max|want| (sums of mixed signs have no elementwise
    relative bound; the scale of the output is the meaningful one)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got.to(torch.float64), want, rtol=0.0, atol=rtol * max(scale, 1e-300))


def away_from_ties(x: Tensor, act: Tensor | None) -> Tensor:
    """Moves x off the rounding boundaries of the activation quantizer (x / scale at a
    half-integer), where float32 and float64 may round differently."""
    if act is None:
        return x
    scale = float(act[0])
    x64 = x.to(torch.float64) / scale
    frac = x64 - torch.floor(x64)
    frac = frac.clamp(0.1, 0.9)
    frac = torch.where((frac - 0.5).abs() < 0.1, frac + 0.2 * torch.sign(frac - 0.5 + 1e-9), frac)
    return ((torch.floor(x64) + frac) * scale).to(x.dtype)


# ---- dequantize_multipoint --------------------------------------------------------------------


@pytest.mark.parametrize("inner", [(1,), (17,), (3, 3, 3), (5, 1, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dequantize_matches_reference(inner: tuple[int, ...], dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(len(inner) * 10 + inner[0])
    codes, scales, num_points = random_multipoint(g, 7, 4, inner)
    got = dequantize_multipoint(codes, scales, num_points, dtype)
    want = ref.dequantize_reference(codes, scales, num_points)
    assert got.dtype == dtype and got.shape == (7, *inner)
    assert_close_rel(got, want, 1e-12 if dtype == torch.float64 else 1e-6)
    assert float(got[0].abs().max()) == 0.0  # the 0-point channel


def test_dequantize_non_contiguous_and_fitted() -> None:
    g = torch.Generator().manual_seed(5)
    codes, scales, num_points = random_multipoint(g, 6, 8, (10,))
    c, s = codes[:, ::2], scales[:, ::2]  # P = 4, non-contiguous
    n = num_points.clamp(max=4)
    assert not c.is_contiguous() and not s.is_contiguous()
    got = dequantize_multipoint(c, s, n, torch.float64)
    assert_close_rel(got, ref.dequantize_reference(c, s, n), 1e-12)
    # With every point of a fit, the dense weight is w minus the fit's residual.
    w = torch.randn(5, 40, generator=g, dtype=torch.float64)
    codes, scales, errs = fit_multipoint(w, 3, 3, exact=True)
    full = torch.full((5,), 3, dtype=torch.int32)
    what = dequantize_multipoint(codes, scales, full, torch.float64)
    torch.testing.assert_close(((w - what) ** 2).sum(1), errs[:, 2].double(), rtol=1e-6, atol=0.0)


# ---- multipoint_linear ------------------------------------------------------------------------

LINEAR_INPUT_SHAPES: list[tuple[int, ...]] = [(1, 33), (5, 33), (2, 3, 33), (33,), (0, 33)]


@pytest.mark.parametrize("act", list(ACT_QPARAMS))
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("in_shape", LINEAR_INPUT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_float64_matches_reference(in_shape: tuple[int, ...], with_bias: bool, act: str) -> None:
    g = torch.Generator().manual_seed(sum(in_shape) + 7 * with_bias)
    C, P, D = 9, 3, in_shape[-1]
    codes, scales, num_points = random_multipoint(g, C, P, (D,))
    x = torch.randn(*in_shape, generator=g, dtype=torch.float64) * 3  # beyond the int4 range
    bias = torch.randn(C, generator=g, dtype=torch.float64) if with_bias else None
    a = act_tensor(act)
    got = multipoint_linear(x, codes, scales, num_points, bias, a)
    want = ref.multipoint_linear_reference(x, codes, scales, num_points, bias, a)
    assert got.dtype == torch.float64 and got.shape == (*in_shape[:-1], C)
    assert_close_rel(got, want, 1e-12)
    if x.numel():
        # The 0-point channel outputs the bias alone.
        expect0 = bias[0].item() if bias is not None else 0.0
        assert torch.allclose(got[..., 0], torch.full_like(got[..., 0], expect0), rtol=0, atol=1e-15)


@pytest.mark.parametrize("act", list(ACT_QPARAMS))
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_float32_matches_reference(with_bias: bool, act: str) -> None:
    g = torch.Generator().manual_seed(11 + with_bias)
    C, P, D = 16, 4, 70
    codes, scales, num_points = random_multipoint(g, C, P, (D,))
    a = act_tensor(act)
    x = away_from_ties(torch.randn(4, 6, D, generator=g) * 3, a)
    bias = torch.randn(C, generator=g) if with_bias else None
    got = multipoint_linear(x, codes, scales, num_points, bias, a)
    want = ref.multipoint_linear_reference(x, codes, scales, num_points, bias, a)
    assert got.dtype == torch.float32
    assert_close_rel(got, want, 2e-6)


def test_linear_non_contiguous_input_and_float32_bias_with_float64_input() -> None:
    g = torch.Generator().manual_seed(12)
    codes, scales, num_points = random_multipoint(g, 5, 2, (12,))
    x = torch.randn(12, 8, generator=g, dtype=torch.float64).t()  # [8, 12], non-contiguous
    bias = torch.randn(5, generator=g)  # float32 bias is cast to the input's dtype
    got = multipoint_linear(x, codes, scales, num_points, bias, None)
    want = ref.multipoint_linear_reference(x, codes, scales, num_points, bias, None)
    assert got.dtype == torch.float64
    assert_close_rel(got, want, 1e-12)


def test_linear_with_fitted_weight_matches_dense_linear() -> None:
    g = torch.Generator().manual_seed(13)
    w = torch.randn(10, 48, generator=g, dtype=torch.float64)
    codes, scales, _ = fit_multipoint(w, 4, 4, exact=False)
    num_points = torch.tensor([1, 2, 3, 4, 4, 3, 2, 1, 0, 4], dtype=torch.int32)
    x = torch.randn(3, 48, generator=g, dtype=torch.float64)
    W = ref.dequantize_reference(codes, scales, num_points)
    assert_close_rel(multipoint_linear(x, codes, scales, num_points), x @ W.t(), 1e-12)


# ---- multipoint_conv2d ------------------------------------------------------------------------

# (N, C_in, H, W, C_out, (kh, kw), stride, padding, dilation, groups)
CONV_CASES = [
    (2, 6, 9, 11, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (1, 4, 10, 7, 6, (3, 2), (2, 1), (0, 2), (1, 1), 1),  # batch 1, non-square everything
    (2, 6, 12, 12, 4, (3, 3), (2, 2), (2, 2), (2, 2), 2),  # groups, dilation
    (1, 8, 8, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 8),  # depthwise
    (2, 4, 7, 7, 8, (5, 5), (1, 1), (2, 2), (1, 1), 4),  # depthwise, multiplier 2
    (3, 5, 6, 5, 7, (1, 1), (1, 1), (0, 0), (1, 1), 1),  # pointwise
    (1, 3, 11, 13, 5, (3, 3), (3, 2), (1, 0), (2, 3), 1),  # stride and dilation per axis
]


def _conv_case(case, g: torch.Generator, dtype: torch.dtype):
    N, C_in, H, W, C_out, (kh, kw), stride, padding, dilation, groups = case
    codes, scales, num_points = random_multipoint(g, C_out, 3, (C_in // groups, kh, kw))
    x = torch.randn(N, C_in, H, W, generator=g, dtype=torch.float64).mul(3).to(dtype)
    bias = torch.randn(C_out, generator=g, dtype=torch.float64).to(dtype)
    return x, codes, scales, num_points, bias, list(stride), list(padding), list(dilation), groups


@pytest.mark.parametrize("act", list(ACT_QPARAMS))
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("case", CONV_CASES, ids=[f"case{i}" for i in range(len(CONV_CASES))])
def test_conv2d_float64_matches_reference(case, with_bias: bool, act: str) -> None:
    g = torch.Generator().manual_seed(CONV_CASES.index(case) * 3 + with_bias)
    x, codes, scales, num_points, bias, stride, padding, dilation, groups = _conv_case(case, g, torch.float64)
    bias = bias if with_bias else None
    a = act_tensor(act)
    got = multipoint_conv2d(x, codes, scales, num_points, bias, a, stride, padding, dilation, groups)
    want = ref.multipoint_conv2d_reference(x, codes, scales, num_points, bias, a, stride, padding, dilation, groups)
    assert got.dtype == torch.float64
    assert_close_rel(got, want, 1e-12)
    # Cross-check the reference itself against torch's conv2d on the dense weight.
    W = ref.dequantize_reference(codes, scales, num_points)
    xq = ref.fake_quantize_reference(x, a)
    dense = torch.nn.functional.conv2d(xq, W, bias, stride, padding, dilation, groups)
    assert_close_rel(want, dense, 1e-12)


@pytest.mark.parametrize("act", ["none", "uint8", "uint4"])
@pytest.mark.parametrize("case", CONV_CASES[:5], ids=[f"case{i}" for i in range(5)])
def test_conv2d_float32_matches_reference(case, act: str) -> None:
    g = torch.Generator().manual_seed(100 + CONV_CASES.index(case))
    x, codes, scales, num_points, bias, stride, padding, dilation, groups = _conv_case(case, g, torch.float32)
    a = act_tensor(act)
    x = away_from_ties(x, a)
    got = multipoint_conv2d(x, codes, scales, num_points, bias, a, stride, padding, dilation, groups)
    want = ref.multipoint_conv2d_reference(x, codes, scales, num_points, bias, a, stride, padding, dilation, groups)
    assert got.dtype == torch.float32
    assert_close_rel(got, want, 2e-6)


def test_conv2d_non_contiguous_input_and_empty_batch() -> None:
    g = torch.Generator().manual_seed(21)
    x, codes, scales, num_points, bias, stride, padding, dilation, groups = _conv_case(CONV_CASES[0], g, torch.float64)
    for xi in (x.contiguous(memory_format=torch.channels_last), x[:, :, 1:, :]):
        args = (xi, codes, scales, num_points, bias, None, stride, padding, dilation, groups)
        assert_close_rel(multipoint_conv2d(*args), ref.multipoint_conv2d_reference(*args), 1e-12)
    empty = x[:0]
    got = multipoint_conv2d(empty, codes, scales, num_points, bias, None, stride, padding, dilation, groups)
    assert got.shape == (0, 8, 9, 11)


# ---- opcheck ----------------------------------------------------------------------------------


def _opcheck(op, args) -> None:
    torch.library.opcheck(op, args)


def test_opcheck_fit_multipoint() -> None:
    g = torch.Generator().manual_seed(31)
    w = torch.randn(6, 20, generator=g)
    _opcheck(torch.ops.mpq.fit_multipoint.default, (w, 4, 3, False))
    _opcheck(torch.ops.mpq.fit_multipoint.default, (w.double(), 3, 2, True))


def test_opcheck_dequantize_multipoint() -> None:
    g = torch.Generator().manual_seed(32)
    codes, scales, num_points = random_multipoint(g, 5, 3, (4, 3, 3))
    _opcheck(torch.ops.mpq.dequantize_multipoint.default, (codes, scales, num_points, torch.float32))
    _opcheck(torch.ops.mpq.dequantize_multipoint.default, (codes[:, :, 0, 0], scales, num_points, torch.float64))


@pytest.mark.parametrize("act", ["none", "uint8"])
def test_opcheck_multipoint_linear(act: str) -> None:
    g = torch.Generator().manual_seed(33)
    codes, scales, num_points = random_multipoint(g, 6, 2, (10,))
    x = torch.randn(3, 10, generator=g)
    bias = torch.randn(6, generator=g)
    _opcheck(torch.ops.mpq.multipoint_linear.default, (x, codes, scales, num_points, bias, act_tensor(act)))
    _opcheck(torch.ops.mpq.multipoint_linear.default, (x.double(), codes, scales, num_points, None, act_tensor(act)))


@pytest.mark.parametrize("act", ["none", "int8"])
def test_opcheck_multipoint_conv2d(act: str) -> None:
    g = torch.Generator().manual_seed(34)
    for case in (CONV_CASES[1], CONV_CASES[2]):
        x, codes, scales, num_points, bias, stride, padding, dilation, groups = _conv_case(case, g, torch.float32)
        args = (x, codes, scales, num_points, bias, act_tensor(act), stride, padding, dilation, groups)
        _opcheck(torch.ops.mpq.multipoint_conv2d.default, args)


# ---- error paths ------------------------------------------------------------------------------


def _linear_args(g: torch.Generator):
    codes, scales, num_points = random_multipoint(g, 6, 3, (10,))
    return dict(
        input=torch.randn(4, 10, generator=g),
        codes=codes,
        scales=scales,
        num_points=num_points,
        bias=torch.randn(6, generator=g),
        act_qparams=torch.tensor([0.05, 0.0, -128.0, 127.0]),
    )


def _weight_mistakes(codes: Tensor, scales: Tensor, num_points: Tensor):
    """(argument, wrong value) pairs shared by every op taking the multipoint weight triple."""
    C, P = codes.shape[:2]
    return [
        ("codes", codes.to(torch.int16)),
        ("codes", codes.to(torch.float32)),
        ("codes", codes.to(torch.uint8)),
        ("codes", codes.reshape(C, -1)),
        ("codes", codes.unsqueeze(-1)),
        ("scales", scales.double()),
        ("scales", scales.half()),
        ("scales", scales[:, :-1]),
        ("scales", scales[:-1]),
        ("scales", scales[:, 0]),
        ("num_points", num_points.long()),
        ("num_points", num_points.float()),
        ("num_points", num_points[:-1]),
        ("num_points", num_points.unsqueeze(1)),
        ("num_points", torch.full_like(num_points, -1)),
        ("num_points", torch.full_like(num_points, P + 1)),
    ]


def test_linear_errors() -> None:
    g = torch.Generator().manual_seed(41)
    base = _linear_args(g)
    mistakes = _weight_mistakes(base["codes"], base["scales"], base["num_points"]) + [
        ("input", torch.randn(4, 11, generator=g)),
        ("input", torch.randint(0, 5, (4, 10), generator=g)),
        ("bias", torch.randn(7, generator=g)),
        ("bias", torch.randn(1, 6, generator=g)),
        ("bias", torch.randint(0, 5, (6,), generator=g)),
        ("act_qparams", base["act_qparams"].double()),
        ("act_qparams", base["act_qparams"][:3]),
        ("act_qparams", base["act_qparams"].reshape(2, 2)),
    ]
    for arg, value in mistakes:
        kwargs = dict(base)
        kwargs[arg] = value
        with pytest.raises(RuntimeError, match=f"mpq::multipoint_linear: .*{arg}"):
            multipoint_linear(**kwargs)


def _conv_args(g: torch.Generator):
    x, codes, scales, num_points, bias, stride, padding, dilation, groups = _conv_case(CONV_CASES[2], g, torch.float32)
    return dict(
        input=x, codes=codes, scales=scales, num_points=num_points, bias=bias,
        act_qparams=torch.tensor([0.02, 128.0, 0.0, 255.0]),
        stride=stride, padding=padding, dilation=dilation, groups=groups,
    )  # fmt: skip


def test_conv2d_errors() -> None:
    g = torch.Generator().manual_seed(42)
    base = _conv_args(g)
    x = base["input"]
    mistakes = (
        _weight_mistakes(base["codes"], base["scales"], base["num_points"])
        + [
            ("codes", base["codes"][:, :, :, :, 0]),  # rank 4
            ("input", x[:, :5]),  # wrong input channels
            ("input", torch.cat([x, x], 1)),
            ("input", x[0]),  # rank 3
            ("input", x.to(torch.int32)),
            ("bias", torch.randn(5, generator=g)),
            ("act_qparams", torch.tensor([0.02, 128.0, 0.0])),
            ("groups", 3),  # does not divide C_out = 4
            ("groups", 0),
            ("groups", -2),
            ("stride", [0, 1]),
            ("padding", [-1, 0]),
            ("dilation", [1, 0]),
        ]
    )
    for arg, value in mistakes:
        kwargs = dict(base)
        kwargs[arg] = value
        with pytest.raises(RuntimeError, match=f"mpq::multipoint_conv2d: .*{arg}"):
            multipoint_conv2d(**kwargs)
    # groups = 4 divides C_out = 4 but not C_in = 6: reported on the input's channels.
    kwargs = dict(base, groups=4)
    with pytest.raises(RuntimeError, match="mpq::multipoint_conv2d: .*input"):
        multipoint_conv2d(**kwargs)


def test_dequantize_errors() -> None:
    g = torch.Generator().manual_seed(43)
    codes, scales, num_points = random_multipoint(g, 5, 3, (4, 2))
    for arg, value in _weight_mistakes(codes, scales, num_points):
        if arg == "codes" and value.dim() != codes.dim() and value.dim() >= 3:
            continue  # any rank >= 3 is a valid dequantize_multipoint shape
        kwargs = dict(codes=codes, scales=scales, num_points=num_points, dtype=torch.float32)
        kwargs[arg] = value
        with pytest.raises(RuntimeError, match="mpq::dequantize_multipoint: .*" + arg):
            dequantize_multipoint(**kwargs)
    for dtype in (torch.int32, torch.int8, torch.bool):
        with pytest.raises(RuntimeError, match="mpq::dequantize_multipoint: .*dtype"):
            dequantize_multipoint(codes, scales, num_points, dtype)


@pytest.mark.parametrize("values", [(0.0, 0.0, 0.0, 255.0), (-0.1, 0.0, 0.0, 255.0), (0.1, 0.0, 5.0, 5.0)])
def test_act_qparams_values_error_names_op(values) -> None:
    g = torch.Generator().manual_seed(44)
    kwargs = _linear_args(g)
    kwargs["act_qparams"] = torch.tensor(values)
    with pytest.raises(RuntimeError, match="mpq::multipoint_linear: .*act_qparams"):
        multipoint_linear(**kwargs)


@pytest.mark.parametrize("values", [(0.0, 0.0, 0.0, 255.0), (float("nan"), 0.0, 0.0, 255.0), (0.1, 0.0, 9.0, 5.0)])
def test_act_qparams_values_rejected(values) -> None:
    g = torch.Generator().manual_seed(45)
    kwargs = _linear_args(g)
    kwargs["act_qparams"] = torch.tensor(values)
    with pytest.raises(RuntimeError, match="act_qparams"):
        multipoint_linear(**kwargs)
    ckw = _conv_args(g)
    ckw["act_qparams"] = torch.tensor(values)
    with pytest.raises(RuntimeError, match="act_qparams"):
        multipoint_conv2d(**ckw)
