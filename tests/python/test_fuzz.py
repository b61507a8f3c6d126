"""Fuzzing the four ops with hypothesis: random shapes (empty ones included: no channel, no
point, no column, no batch), dtypes, layouts, bits, point counts, strides, paddings, dilations and
groups, valid and invalid mixed.

An oracle written from the checks the ops document (csrc/checks.cpp, in their order) decides for
every drawn case whether it is valid. Invalid: the op raises RuntimeError whose message starts
with the op's name and names the first wrong argument. Valid: the result equals the float64
reference (tests/python/reference.py) within the dtype's tolerance, stated per test.

Bounded in time: derandomised (the same examples on every run, no example database), a fixed
number of examples per op, about 15 s in all on the 2-core CPU. The domains of the C++ gaps found
while writing this (no channel or no point, a kernel larger than the padded input, a 0-sized
kernel, non-finite scales, weights whose squared errors overflow float32) are drawn too, with the
behaviour decided for them (tested one by one at the end of test_bad_inputs.py).
"""

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mpq  # noqa: E402,F401  (loads the ops)
import reference as ref  # noqa: E402
from test_layer_ops import away_from_ties  # noqa: E402

ops = torch.ops.mpq

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Tolerances, relative to a bound of the output's magnitude that the tests compute (sum of the
# absolute terms): float64 computes the same sums in another order, float32 rounds each of at most
# a few dozen terms (eps 6e-8), float16 / bfloat16 round the input, the weight and the output.
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}
FLOATS = [torch.float32, torch.float64]
FLT_MAX = torch.finfo(torch.float32).max


def _values(g: torch.Generator, shape, kind: str, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "zeros":
        x = torch.zeros(shape, dtype=torch.float64)
    elif kind == "huge":
        x = x * 1e15
    elif kind == "beyond":  # squared row norms above FLT_MAX, which fit_multipoint refuses
        x = x * 1e31
    elif kind == "largest" and x.numel():  # squared row norms just below FLT_MAX, accepted
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-300) * (0.98 * FLT_MAX) ** 0.5
    elif kind == "tiny":
        x = x * 1e-30
    elif kind in ("nan", "inf") and x.numel():
        x.view(-1)[int(torch.randint(x.numel(), (1,), generator=g))] = float(kind)
    if dtype.is_floating_point:
        return x.to(dtype)
    return x.clamp(-100, 100).round().to(dtype)


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values, contiguous, every other element of a larger buffer, or (rank >= 2) in
    transposed storage."""
    if layout == "strided" and t.dim() >= 1:
        return torch.stack([t, torch.zeros_like(t)], -1)[..., 0]
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    return t


def _expect_error(op: str, word: str, call) -> None:
    event(f"invalid: {word}")
    with pytest.raises(RuntimeError) as e:
        call()
    msg = str(e.value)
    assert msg.startswith(f"mpq::{op}: "), f"message without the op name: {msg.splitlines()[0]}"
    assert word in msg.split("\n")[0], f"expected the message to name {word!r}: {msg.splitlines()[0]}"


def _first(checks: list[tuple[bool, str]]) -> str | None:
    """The argument the first failing check names, None when all pass."""
    return next((word for failed, word in checks if failed), None)


LAYOUTS = st.sampled_from(["contiguous", "contiguous", "strided", "transposed"])
CHANNELS = st.sampled_from([0, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5])  # no channel in 1 case of 11


def _mistakes(draw, names: list[str]) -> set:
    """None in half the cases, else one or two distinct mistakes (two test the checks' order)."""
    k = draw(st.sampled_from([0, 0, 0, 1, 1, 2]))
    return set(draw(st.lists(st.sampled_from(names), min_size=k, max_size=k, unique=True)))


# ---- fit_multipoint ----------------------------------------------------------------------------

FIT_MISTAKES = [
    "dtype",
    "rank",
    "no_columns",
    "bits_low",
    "bits_high",
    "max_points_low",
    "max_points_high",
    "nan",
    "inf",
    "beyond",
]


@st.composite
def fit_cases(draw) -> dict[str, Any]:
    bad = _mistakes(draw, FIT_MISTAKES)
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.int32] if "dtype" in bad else FLOATS))
    shape = [draw(st.integers(0, 5)), 0 if "no_columns" in bad else draw(st.integers(1, 24))]
    if "rank" in bad:
        shape = draw(st.sampled_from([shape[1:], shape + [2]]))
    values = next((v for v in ("nan", "inf", "beyond") if v in bad), None)
    return dict(
        shape=shape,
        dtype=dtype,
        values=values or draw(st.sampled_from(["randn", "randn", "randn", "zeros", "huge", "tiny", "largest"])),
        bits=draw(
            st.integers(-1, 1) if "bits_low" in bad else st.integers(9, 12) if "bits_high" in bad else st.integers(2, 8)
        ),
        max_points=draw(
            st.integers(-1, 0)
            if "max_points_low" in bad
            else st.just(65)
            if "max_points_high" in bad
            else st.integers(1, 5)
        ),
        exact=draw(st.booleans()),
        layout=draw(LAYOUTS),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@FUZZ
@given(fit_cases())
def test_fuzz_fit_multipoint(case) -> None:
    """Invalid also: a row whose squared norm (float64) exceeds FLT_MAX, the largest float32 sq_error.
    Valid: codes in -K..K; sq_errors non-increasing, equal to ||w - sum a q||^2 recomputed in
    float64 (1e-5 relative plus 1e-12 ||w||^2 for float32 storage, plus float32's smallest
    normal number, below which they flush to zero); the exact solver's errors
    equal the reference's (1e-6 relative, as test_fit); the fast solver's first point is never
    better than the exact optimum; the layout does not change any output bit."""
    g = torch.Generator().manual_seed(case["seed"])
    w = _layout(_values(g, case["shape"], case["values"], case["dtype"]), case["layout"])
    bits, points, exact = case["bits"], case["max_points"], case["exact"]
    finite = bool(torch.isfinite(w).all()) if w.is_floating_point() else True
    word = _first(
        [
            (w.dtype not in FLOATS, "weight"),
            (w.dim() != 2, "weight"),
            (w.dim() == 2 and w.shape[1] < 1, "weight"),
            (not 2 <= bits <= 8, "bits"),
            (not 1 <= points <= 64, "max_points"),
            (w.numel() > 0 and not finite, "weight"),
            (
                w.dtype in FLOATS
                and w.dim() == 2
                and w.numel() > 0
                and finite
                and float((w.double() ** 2).sum(1).max()) > FLT_MAX,
                "weight",
            ),
        ]
    )
    if word is not None:
        _expect_error("fit_multipoint", word, lambda: ops.fit_multipoint(w, bits, points, exact))
        return
    event(f"valid {w.dtype}")
    codes, scales, errs = ops.fit_multipoint(w, bits, points, exact)
    assert bool(torch.isfinite(scales).all()) and bool(torch.isfinite(errs).all())
    C, D = w.shape
    assert codes.shape == (C, points, D) and codes.dtype == torch.int8
    assert scales.shape == errs.shape == (C, points) and scales.dtype == errs.dtype == torch.float32
    assert codes.numel() == 0 or int(codes.abs().max()) <= ref.grid_max(bits)
    c2, s2, e2 = ops.fit_multipoint(w.contiguous(), bits, points, exact)
    assert torch.equal(codes, c2) and torch.equal(scales, s2) and torch.equal(errs, e2)
    if C == 0:
        return
    w64 = w.double()
    w2 = (w64**2).sum(1, keepdim=True)
    approx = torch.cumsum(scales.double()[:, :, None] * codes.double(), 1)
    recomputed = ((w64[:, None, :] - approx) ** 2).sum(2)
    floor = 1e-12 * w2 + torch.finfo(torch.float32).tiny  # float32 errors of 1e-30 weights underflow
    assert bool(((errs.double() - recomputed).abs() <= 1e-5 * recomputed + floor).all())
    assert bool((errs.double()[:, 1:] <= errs.double()[:, :-1] * (1 + 1e-6) + floor).all())
    _, _, errs_ref = ref.fit_multipoint_reference(w, bits, points)
    if exact:
        assert bool(((errs.double() - errs_ref).abs() <= 1e-6 * errs_ref + floor).all())
    else:
        assert bool((errs.double()[:, 0] >= errs_ref[:, 0] * (1 - 1e-6) - floor[:, 0]).all())


# ---- the multipoint weight (codes, scales, num_points) -----------------------------------------

WEIGHT_MISTAKES = [
    "codes_dtype",
    "scales_dtype",
    "scales_shape",
    "points_dtype",
    "points_shape",
    "points_negative",
    "points_too_many",
    "scales_on_meta",
    "scales_nonfinite",
]


def _weight_spec(draw, C: int, inner: tuple[int, ...], bad: set) -> dict[str, Any]:
    return dict(
        C=C,
        P=draw(st.sampled_from([0, 1, 2, 3, 1, 2, 3])),
        inner=inner,
        bad=bad,
        codes_dtype=draw(st.sampled_from([torch.int16, torch.uint8, torch.float32]))
        if "codes_dtype" in bad
        else torch.int8,
        scales_dtype=draw(st.sampled_from([torch.float64, torch.float16])) if "scales_dtype" in bad else torch.float32,
        scales_shape=draw(st.sampled_from(["extra_point", "extra_channel", "flat"]))
        if "scales_shape" in bad
        else "right",
        points_dtype=draw(st.sampled_from([torch.int64, torch.float32])) if "points_dtype" in bad else torch.int32,
        points_shape=draw(st.sampled_from(["extra_channel", "column"])) if "points_shape" in bad else "right",
        layouts=[draw(LAYOUTS) for _ in range(3)],
        nonfinite=draw(st.sampled_from([float("nan"), float("inf"), float("-inf")])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _make_weight(spec):
    g = torch.Generator().manual_seed(spec["seed"])
    C, P = spec["C"], spec["P"]
    codes = torch.randint(-7, 8, (C, P, *spec["inner"]), generator=g, dtype=torch.int8)
    scales_shape = {"right": (C, P), "extra_point": (C, P + 1), "extra_channel": (C + 1, P), "flat": (C * P,)}
    scales = (torch.rand(scales_shape[spec["scales_shape"]], generator=g) * 4 - 2).exp() * 0.05
    n = torch.randint(
        0,
        P + 1,
        {"right": (C,), "extra_channel": (C + 1,), "column": (C, 1)}[spec["points_shape"]],
        generator=g,
        dtype=torch.int32,
    )
    if "scales_nonfinite" in spec["bad"] and C > 0 and P > 0 and scales.dim() == 2:
        # A point in use (as far as the shapes allow: a wrong one is refused before the values).
        c = int(torch.randint(C, (1,), generator=g))
        if n.shape == (C,):
            n[c] = max(int(n[c]), 1)
        k = int(torch.randint(int(n[c]) if n.shape == (C,) else 1, (1,), generator=g))
        scales[c, k] = spec["nonfinite"]
    if "points_negative" in spec["bad"] and n.numel():
        n.view(-1)[0] = -1
    if "points_too_many" in spec["bad"] and n.numel():
        n.view(-1)[-1] = P + 1
    codes = codes.to(spec["codes_dtype"])
    scales = scales.to(spec["scales_dtype"])
    n = n.to(spec["points_dtype"])
    codes, scales, n = (_layout(t, lay) for t, lay in zip((codes, scales, n), spec["layouts"]))
    if "scales_on_meta" in spec["bad"]:  # mixed devices: a meta tensor dispatches to the fake kernel
        scales = scales.to("meta")
    return codes, scales, n


def _weight_checks(spec, code_dims: int) -> list[tuple[bool, str]]:
    """check_multipoint_weight, in its order, after the fake kernels' device check. The values of
    num_points and scales are checked on the CPU only (where every drawn case runs)."""
    bad = spec["bad"]
    n_ok = not {"points_dtype", "points_shape"} & bad
    has_points = spec["C"] > 0 and spec["P"] > 0
    return [
        ("scales_on_meta" in bad, "device"),
        ("codes_dtype" in bad, "codes"),
        (2 + len(spec["inner"]) != code_dims, "codes"),
        ("scales_dtype" in bad, "scales"),
        ("scales_shape" in bad, "scales"),
        ("points_dtype" in bad, "num_points"),
        ("points_shape" in bad, "num_points"),
        (n_ok and spec["C"] > 0 and bool({"points_negative", "points_too_many"} & bad), "num_points"),
        (has_points and "scales_nonfinite" in bad, "scales"),
    ]


# ---- dequantize_multipoint ---------------------------------------------------------------------


@st.composite
def dequantize_cases(draw) -> dict[str, Any]:
    bad = _mistakes(draw, WEIGHT_MISTAKES + ["dtype"])
    inner = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=3)))
    dtypes = (
        [torch.int32, torch.bool, torch.complex64] if "dtype" in bad else FLOATS * 2 + [torch.float16, torch.bfloat16]
    )
    return dict(weight=_weight_spec(draw, draw(CHANNELS), inner, bad), dtype=draw(st.sampled_from(dtypes)))


@FUZZ
@given(dequantize_cases())
def test_fuzz_dequantize_multipoint(case) -> None:
    """Valid: equal to the float64 reference within TOL[dtype] x max|W| (the op dequantizes in
    float32, or float64 for float64, and casts)."""
    spec, dtype = case["weight"], case["dtype"]
    codes, scales, n = _make_weight(spec)
    word = _first(_weight_checks(spec, codes.dim()) + [(not dtype.is_floating_point, "dtype")])
    if word is not None:
        _expect_error("dequantize_multipoint", word, lambda: ops.dequantize_multipoint(codes, scales, n, dtype))
        return
    event(f"valid {dtype}")
    if spec["C"] == 0 or spec["P"] == 0:
        event("valid, no channel or no point")
    got = ops.dequantize_multipoint(codes, scales, n, dtype)
    want = ref.dequantize_reference(codes, scales, n)
    assert got.dtype == dtype and got.shape == want.shape
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got.double(), want, rtol=0, atol=max(TOL[dtype] * scale, 1e-300))


# ---- the layers: input, bias, act_qparams --------------------------------------------------------

ACTS = {
    "int8": (0.05, 0.0, -128.0, 127.0),
    "uint4": (0.15, 3.0, 0.0, 15.0),
    "act_scale_zero": (0.0, 0.0, 0.0, 255.0),
    "act_scale_nan": (float("nan"), 0.0, -128.0, 127.0),
    "act_empty_range": (0.1, 0.0, 9.0, 5.0),
}
ACT_VALUE_MISTAKES = ["act_scale_zero", "act_scale_nan", "act_empty_range"]
LAYER_MISTAKES = (
    WEIGHT_MISTAKES + ["input_dtype", "bias_dtype", "bias_shape", "act_dtype", "act_shape"] + ACT_VALUE_MISTAKES
)


def _layer_spec(draw, bad: set) -> dict[str, Any]:
    act_value = next((a for a in ACT_VALUE_MISTAKES if a in bad), None)
    dtype = torch.int64 if "input_dtype" in bad else draw(st.sampled_from(FLOATS * 3 + [torch.float16]))
    act = act_value or draw(st.sampled_from(["none", "none", "int8", "uint4"]))
    if dtype == torch.float16 and act in ACTS and act not in ACT_VALUE_MISTAKES:
        act = "none"  # float16 rounds x / scale far from float64: no elementwise reference there
    return dict(
        dtype=dtype,
        layout=draw(LAYOUTS),
        bias="int"
        if "bias_dtype" in bad
        else "wrong_shape"
        if "bias_shape" in bad
        else draw(st.sampled_from(["none", "float32", "float64"])),
        act="float64" if "act_dtype" in bad else "length3" if "act_shape" in bad else act,
    )


def _layer_tensors(g: torch.Generator, spec, shape, C: int):
    """(input, bias, act_qparams); a float32 input is moved off the activation grid's ties."""
    x = _values(g, shape, "randn", spec["dtype"]) * (3 if spec["dtype"].is_floating_point else 1)
    kind = spec["act"]
    act = (
        None
        if kind == "none"
        else torch.tensor(ACTS["int8"], dtype=torch.float64)
        if kind == "float64"
        else torch.tensor(ACTS["int8"][:3])
        if kind == "length3"
        else torch.tensor(ACTS[kind])
    )
    if spec["dtype"] == torch.float32:
        x = away_from_ties(x, act)
    bias = None
    if spec["bias"] != "none":
        bias = torch.randn(C + (spec["bias"] == "wrong_shape"), generator=g)
        bias = bias.to({"float64": torch.float64, "int": torch.int32}.get(spec["bias"], torch.float32))
    return _layout(x, spec["layout"]), bias, act


def _bias_and_act_checks(bad: set) -> list[tuple[bool, str]]:
    """check_bias_and_act, in its order."""
    return [
        ("input_dtype" in bad, "input"),
        ("bias_dtype" in bad, "bias"),
        ("bias_shape" in bad, "bias"),
        (bool({"act_dtype", "act_shape"} & bad), "act_qparams"),
    ]


def _assert_matches(got, want, xq, W, bias, conv=None) -> None:
    """|got - want| <= TOL[dtype] x (|fq(x)| |W| + |bias|), elementwise, in float64."""
    assert got.shape == want.shape, (got.shape, want.shape)
    if got.numel() == 0:  # (F.conv2d, for the bound, refuses a weight without output channels)
        return
    if conv is None:
        bound = xq.double().abs() @ W.abs().t()
    else:
        bound = F.conv2d(xq.double().abs(), W.abs(), None, *conv)
    if bias is not None:
        bound = bound + (bias.double().abs() if conv is None else bias.double().abs().reshape(1, -1, 1, 1))
    tol = TOL[got.dtype]
    assert bool(((got.double() - want).abs() <= tol * bound + 1e-300).all()), float((got.double() - want).abs().max())


# ---- multipoint_linear -------------------------------------------------------------------------


@st.composite
def linear_cases(draw) -> dict[str, Any]:
    bad = _mistakes(draw, LAYER_MISTAKES + ["input_width", "input_rank0"])
    D = draw(st.integers(0, 8))
    lead = draw(st.lists(st.integers(0, 3), max_size=2))
    shape = [] if "input_rank0" in bad else [*lead, D + ("input_width" in bad)]
    return dict(
        weight=_weight_spec(draw, draw(CHANNELS), (D,), bad), layer=_layer_spec(draw, bad), shape=shape, bad=bad
    )


@FUZZ
@given(linear_cases())
def test_fuzz_multipoint_linear(case) -> None:
    """Valid: equal to the float64 reference within TOL[dtype] x (|fq(x)| |W|^T + |bias|)
    elementwise."""
    _check_layer("multipoint_linear", case, [(bool({"input_width", "input_rank0"} & case["bad"]), "input")])


def _check_layer(
    op: str,
    case,
    own_checks: list[tuple[bool, str]],
    conv: tuple | None = None,
    code_checks: list[tuple[bool, str]] = (),
) -> None:
    """Runs the layer op on the drawn case: the error the oracle expects, or the reference's
    result. ``code_checks``: the op's checks of codes after check_multipoint_weight;
    ``own_checks``: those between check_bias_and_act and the kernel's check of the act_qparams
    values."""
    spec, bad = case["weight"], case["bad"]
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    codes, scales, n = _make_weight(spec)
    x, bias, act = _layer_tensors(g, case["layer"], case["shape"], spec["C"])
    word = _first(
        _weight_checks(spec, 3 if conv is None else 5)
        + list(code_checks)
        + _bias_and_act_checks(bad)
        + own_checks
        + [(bool(set(ACT_VALUE_MISTAKES) & bad), "act_qparams")]
    )
    args = (x, codes, scales, n, bias, act) + (conv or ())
    call = lambda: getattr(ops, op)(*args)  # noqa: E731
    if word is not None:
        _expect_error(op, word, call)
        return
    event(f"valid {x.dtype}")
    if spec["C"] == 0 or spec["P"] == 0:
        event("valid, no channel or no point")
    got = call()
    want = getattr(ref, f"{op}_reference")(*args)
    assert got.dtype == x.dtype
    _assert_matches(
        got, want, ref.fake_quantize_reference(x, act), ref.dequantize_reference(codes, scales, n), bias, conv
    )


# ---- multipoint_conv2d -------------------------------------------------------------------------

CONV_MISTAKES = [
    "stride_zero",
    "padding_negative",
    "dilation_zero",
    "stride_length",
    "dilation_length",
    "groups_zero",
    "groups_not_dividing",
    "input_channels",
    "input_rank",
    "kernel_empty",
    "input_small",
]


@st.composite
def conv_cases(draw) -> dict[str, Any]:
    bad = _mistakes(draw, LAYER_MISTAKES + CONV_MISTAKES)
    groups = draw(st.integers(1, 3))
    # C_out = 0 (cout_g = 0) is valid, but every groups divides it
    cin_g = draw(st.integers(1, 3))
    cout_g = draw(st.sampled_from([1, 2] if "groups_not_dividing" in bad else [0, 1, 2, 1, 2]))
    kernel = [draw(st.integers(1, 3)), draw(st.integers(1, 3))]
    if "kernel_empty" in bad:
        kernel[draw(st.integers(0, 1))] = 0
    stride = [draw(st.integers(1, 3)), draw(st.integers(1, 3))]
    padding = [draw(st.integers(0, 2)), draw(st.integers(0, 2))]
    dilation = [draw(st.integers(1, 2)), draw(st.integers(1, 2))]
    # The input holds the dilated kernel after padding, except for "input_small": smaller (H or W
    # can be 0, which is refused even when the padding would hold the kernel).
    extent = [dilation[d] * (kernel[d] - 1) + 1 - 2 * padding[d] for d in range(2)]
    size = [max(1, extent[d]) + draw(st.integers(0, 4)) for d in range(2)]
    if "input_small" in bad:
        d = draw(st.integers(0, 1))
        size[d] = draw(st.integers(0, max(0, extent[d] - 1)))
    C_in = cin_g * groups + ("input_channels" in bad)
    shape = [draw(st.integers(0, 2)), C_in, *size][1 if "input_rank" in bad else 0 :]
    if "stride_zero" in bad:
        stride[1] = 0
    if "padding_negative" in bad:
        padding[0] = -1
    if "dilation_zero" in bad:
        dilation[0] = 0
    if "stride_length" in bad:
        stride = stride[:1]
    if "dilation_length" in bad:
        dilation = dilation + [1]
    C_out = groups * cout_g
    if "groups_zero" in bad:
        groups = 0
    elif "groups_not_dividing" in bad:
        groups = C_out + 1
    return dict(
        weight=_weight_spec(draw, C_out, (cin_g, *kernel), bad),
        layer=_layer_spec(draw, bad),
        shape=shape,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bad=bad,
    )


@FUZZ
@given(conv_cases())
def test_fuzz_multipoint_conv2d(case) -> None:
    """Valid: equal to the float64 reference within TOL[dtype] x (conv(|fq(x)|, |W|) + |bias|)
    elementwise; no output channel: an empty output of the right shape."""
    bad = case["bad"]
    _check_layer(
        "multipoint_conv2d",
        case,
        [
            ("input_rank" in bad, "input"),
            (bool({"groups_zero", "groups_not_dividing"} & bad), "groups"),
            ("input_channels" in bad, "input"),
            (bool({"stride_length", "dilation_length"} & bad), "stride, padding and dilation"),
            ("stride_zero" in bad, "stride"),
            ("padding_negative" in bad, "padding"),
            ("dilation_zero" in bad, "dilation"),
            ("input_small" in bad, "input"),
        ],
        (case["stride"], case["padding"], case["dilation"], case["groups"]),
        code_checks=[("kernel_empty" in bad, "codes")],
    )
