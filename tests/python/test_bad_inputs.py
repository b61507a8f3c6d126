"""Every public entry point refuses bad input before doing work, with an exception whose message
names the function (or op) and the argument: mpq.quantize, QuantConfig and its presets,
mpq.save / mpq.load, mpq.summary, mpq.plot_allocation, the four torch.ops.mpq ops, the
multipoint modules' set_weight / set_act_qparams, and the CLI. Non-contiguous inputs are
accepted and give the same result. The C++ validation gaps found earlier (empty weights, conv2d
geometry, non-finite scales, fit_multipoint's float32 overflow) end the file, as decided."""

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import mpq
from mpq import cli
from mpq.nn import MultipointConv2d, MultipointLinear

ops = torch.ops.mpq


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()


def _calib(n: int = 2):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(n)]


CFG = mpq.QuantConfig(calib_batches=4, sensitivity_batches=1)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("bad_inputs")
    return {"qmodel": mpq.quantize(_model(), _calib(), CFG), "tmp": tmp}


class _Log(nn.Module):
    """log(x): NaN for the negative inputs, so the next layer's calibration input has NaN."""

    def forward(self, x):
        return torch.log(x)


def _nan_weight_model() -> nn.Module:
    m = _model()
    with torch.no_grad():
        m[0].weight[0, 0, 0, 0] = float("nan")
    return m


def _then_bad(bad: torch.Tensor, at: int = 2):
    """A one-shot generator: good batches, then ``bad`` as batch ``at``."""
    yield from _calib(at)
    yield bad


def _linear_weight(C=4, P=2, D=6):
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(-7, 8, (C, P, D), generator=g, dtype=torch.int8)
    scales = torch.rand(C, P, generator=g) * 0.1 + 0.01
    return codes, scales, torch.full((C,), P, dtype=torch.int32)


def _conv_weight(C=4, P=2, cin=3, k=3):
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(-7, 8, (C, P, cin, k, k), generator=g, dtype=torch.int8)
    scales = torch.rand(C, P, generator=g) * 0.1 + 0.01
    return codes, scales, torch.full((C,), P, dtype=torch.int32)


def _linear(**kw):
    codes, scales, n = _linear_weight()
    args = dict(input=torch.randn(3, 6), codes=codes, scales=scales, num_points=n, bias=None, act_qparams=None)
    args.update(kw)
    return mpq.ops.multipoint_linear(**args)


def _conv(**kw):
    codes, scales, n = _conv_weight()
    args = dict(
        input=torch.randn(2, 3, 6, 6),
        codes=codes,
        scales=scales,
        num_points=n,
        bias=None,
        act_qparams=None,
        stride=[1, 1],
        padding=[0, 0],
        dilation=[1, 1],
        groups=1,
    )
    args.update(kw)
    return mpq.ops.multipoint_conv2d(**args)


def _set_weight(module: str = "linear", **kw):
    if module == "linear":
        m = MultipointLinear(6, 4, 2, 4, bias=True)
        codes, scales, n = _linear_weight()
    else:
        m = MultipointConv2d(3, 4, [3, 3], 2, 4, [1, 1], [0, 0], [1, 1], bias=False)
        codes, scales, n = _conv_weight()
    args = dict(codes=codes, scales=scales, num_points=n, bias=torch.zeros(4) if module == "linear" else None)
    args.update(kw)
    m.set_weight(**args)


def _act(scale=0.1, zero_point=0, qmin=-128, qmax=127):
    MultipointLinear(6, 4, 2, 4).set_act_qparams(scale, zero_point, qmin, qmax)


# (id, call(ctx), exception type, pattern naming the function or op and the argument)
CASES = [
    # ---- mpq.quantize ----
    (
        "quantize-model-type",
        lambda c: mpq.quantize("resnet", _calib(), CFG),
        TypeError,
        r"mpq\.quantize: expected model to be a torch\.nn\.Module",
    ),
    (
        "quantize-loader-not-iterable",
        lambda c: mpq.quantize(_model(), 5, CFG),
        TypeError,
        r"mpq\.quantize: expected calib_loader to be an iterable",
    ),
    (
        "quantize-loader-tensor",
        lambda c: mpq.quantize(_model(), torch.randn(4, 3, 8, 8), CFG),
        TypeError,
        r"mpq\.quantize: expected calib_loader to be an iterable",
    ),
    (
        "quantize-loader-empty",
        lambda c: mpq.quantize(_model(), [], CFG),
        ValueError,
        r"mpq\.quantize: calib_loader yielded no batches",
    ),
    (
        "quantize-loader-yields-dict",
        lambda c: mpq.quantize(_model(), [{"x": torch.randn(4, 3, 8, 8)}], CFG),
        TypeError,
        r"mpq\.quantize: expected calib_loader to yield tensors .*batch 0 is dict",
    ),
    (
        "quantize-loader-yields-pairs-of-str",
        lambda c: mpq.quantize(_model(), [("img.png", 3)], CFG),
        TypeError,
        r"mpq\.quantize: expected calib_loader to yield tensors .*first element is str",
    ),
    (
        "quantize-loader-bool-dtype",
        lambda c: mpq.quantize(_model(), [torch.ones(4, 3, 8, 8, dtype=torch.bool)], CFG),
        TypeError,
        r"mpq\.quantize: expected calib_loader to yield floating .*torch\.bool",
    ),
    (
        "quantize-loader-complex-dtype",
        lambda c: mpq.quantize(_model(), [torch.ones(4, 3, 8, 8, dtype=torch.cfloat)], CFG),
        TypeError,
        r"mpq\.quantize: expected calib_loader to yield floating .*complex",
    ),
    (
        "quantize-loader-empty-batch",
        lambda c: mpq.quantize(_model(), [torch.randn(0, 3, 8, 8)], CFG),
        ValueError,
        r"mpq\.quantize: calib_loader batch 0 is empty",
    ),
    (
        "quantize-loader-nan",
        lambda c: mpq.quantize(_model(), [torch.full((4, 3, 8, 8), math.nan)], CFG),
        ValueError,
        r"mpq\.quantize: calib_loader batch 0 contains NaN or inf",
    ),
    (
        "quantize-loader-inf-in-a-later-batch",
        lambda c: mpq.quantize(_model(), _then_bad(torch.full((4, 3, 8, 8), math.inf)), CFG),
        ValueError,
        r"mpq\.quantize: calib_loader batch 2 contains NaN or inf",
    ),
    (
        "quantize-loader-wrong-type-in-a-later-batch",
        lambda c: mpq.quantize(_model(), _then_bad("oops"), CFG),
        TypeError,
        r"mpq\.quantize: expected calib_loader to yield tensors .*batch 2 is str",
    ),
    (
        "quantize-loader-shape-the-model-rejects",
        lambda c: mpq.quantize(_model(), [torch.randn(4, 5, 8, 8)], CFG),
        ValueError,
        r"mpq\.quantize: the model fails on calib_loader batch 0 \(input \(4, 5, 8, 8\)",
    ),
    (
        "quantize-nan-activation",
        lambda c: mpq.quantize(nn.Sequential(_Log(), nn.Linear(8, 4)).eval(), [torch.randn(4, 8)], CFG),
        ValueError,
        r"mpq\.quantize: the input of layer '1' contains NaN or inf",
    ),
    (
        "quantize-no-quantizable-layer",
        lambda c: mpq.quantize(nn.Sequential(nn.Conv1d(3, 3, 1), nn.ReLU()).eval(), [torch.randn(2, 3, 8)], CFG),
        ValueError,
        r"mpq\.quantize: the model has no quantizable layer .*'0', 'unsupported layer type Conv1d'",
    ),
    (
        "quantize-all-layers-ignored",
        lambda c: mpq.quantize(_model(), _calib(), CFG.replace(ignore=("*",))),
        ValueError,
        r"mpq\.quantize: the model has no quantizable layer .*ignored by config\.ignore",
    ),
    (
        "quantize-nan-weight",
        lambda c: mpq.quantize(_nan_weight_model(), _calib(), CFG),
        ValueError,
        r"mpq\.quantize: parameter '0\.weight' of model contains NaN or inf",
    ),
    (
        "quantize-meta-model",
        lambda c: mpq.quantize(_model().to("meta"), _calib(), CFG),
        ValueError,
        r"mpq\.quantize: expected device to hold data, got the meta device \(where the model's parameters are",
    ),
    (
        "quantize-meta-parameter",
        lambda c: mpq.quantize(_model().to("meta"), _calib(), CFG, device="cpu"),
        ValueError,
        r"mpq\.quantize: parameter '0\.weight' of model is on the meta device",
    ),
    (
        "quantize-device-string",
        lambda c: mpq.quantize(_model(), _calib(), CFG, device="gpu0"),
        ValueError,
        r"mpq\.quantize: expected device to be a torch\.device or a device string, got 'gpu0'",
    ),
    (
        "quantize-inplace-type",
        lambda c: mpq.quantize(_model(), _calib(), CFG, inplace="yes"),
        TypeError,
        r"mpq\.quantize: expected inplace to be a bool",
    ),
    (
        "quantize-config-type",
        lambda c: mpq.quantize(_model(), _calib(), 4),
        TypeError,
        r"mpq\.quantize: expected config to be a preset name, a QuantConfig or a dict, got int",
    ),
    (
        "quantize-config-preset",
        lambda c: mpq.quantize(_model(), _calib(), "W5A5"),
        ValueError,
        r"mpq\.QuantConfig\.preset: unknown preset 'W5A5'",
    ),
    (
        "quantize-config-dict",
        lambda c: mpq.quantize(_model(), _calib(), {"bits": 4}),
        ValueError,
        r"mpq\.QuantConfig\.from_dict: unknown fields \['bits'\]",
    ),
    # ---- QuantConfig ----
    (
        "config-w_bits-low",
        lambda c: mpq.QuantConfig(w_bits=1),
        ValueError,
        r"mpq\.QuantConfig: expected w_bits .*2\.\.8",
    ),
    (
        "config-w_bits-high",
        lambda c: mpq.QuantConfig(w_bits=9),
        ValueError,
        r"mpq\.QuantConfig: expected w_bits .*2\.\.8",
    ),
    ("config-w_bits-bool", lambda c: mpq.QuantConfig(w_bits=True), ValueError, r"mpq\.QuantConfig: expected w_bits"),
    ("config-a_bits", lambda c: mpq.QuantConfig(a_bits=1), ValueError, r"mpq\.QuantConfig: expected a_bits"),
    (
        "config-max_points-zero",
        lambda c: mpq.QuantConfig(max_points=0),
        ValueError,
        r"mpq\.QuantConfig: expected max_points to be an int in 1\.\.",
    ),
    (
        "config-avg_bits-nan",
        lambda c: mpq.QuantConfig(avg_bits=math.nan),
        ValueError,
        r"mpq\.QuantConfig: expected avg_bits",
    ),
    (
        "config-calib_batches-zero",
        lambda c: mpq.QuantConfig(calib_batches=0),
        ValueError,
        r"mpq\.QuantConfig: expected calib_batches to be an int >= 1",
    ),
    (
        "config-calib_samples-float",
        lambda c: mpq.QuantConfig(calib_samples=2048.0),
        ValueError,
        r"mpq\.QuantConfig: expected calib_samples to be an int >= 1",
    ),
    ("config-ignore-type", lambda c: mpq.QuantConfig(ignore=5), ValueError, r"mpq\.QuantConfig: expected ignore"),
    ("config-method", lambda c: mpq.QuantConfig(method="magic"), ValueError, r"mpq\.QuantConfig: expected method"),
    ("config-version-type", lambda c: mpq.QuantConfig(version="1"), ValueError, r"mpq\.QuantConfig: expected version"),
    (
        "config-version-newer",
        lambda c: mpq.QuantConfig(version=99),
        ValueError,
        r"mpq\.QuantConfig: expected version <= .*newer mpq",
    ),
    (
        "config-preset-name-type",
        lambda c: mpq.QuantConfig.preset(4),
        TypeError,
        r"mpq\.QuantConfig\.preset: expected name to be a preset name",
    ),
    (
        "config-preset-override",
        lambda c: mpq.QuantConfig.preset("W4A8", bits=3),
        ValueError,
        r"mpq\.QuantConfig\.preset: unknown fields \['bits'\]",
    ),
    (
        "config-replace-unknown",
        lambda c: mpq.QuantConfig().replace(bits=3),
        ValueError,
        r"mpq\.QuantConfig\.replace: unknown fields \['bits'\]",
    ),
    (
        "config-from_dict-type",
        lambda c: mpq.QuantConfig.from_dict("W4A8"),
        TypeError,
        r"mpq\.QuantConfig\.from_dict: expected d to be a dict",
    ),
    # ---- mpq.save / mpq.load ----
    ("save-qmodel-type", lambda c: mpq.save("model", c["tmp"] / "a.mpq"), TypeError, r"mpq\.save: expected qmodel"),
    (
        "save-float-model",
        lambda c: mpq.save(_model(), c["tmp"] / "a.mpq"),
        ValueError,
        r"mpq\.save: qmodel has no multipoint layer",
    ),
    ("save-path-type", lambda c: mpq.save(c["qmodel"], 5), TypeError, r"mpq\.save: expected path to be a str"),
    (
        "save-path-folder",
        lambda c: mpq.save(c["qmodel"], c["tmp"] / "missing" / "a.mpq"),
        FileNotFoundError,
        r"mpq\.save: expected path in an existing folder",
    ),
    (
        "save-config-type",
        lambda c: mpq.save(c["qmodel"], c["tmp"] / "a.mpq", config={"w_bits": 4}),
        TypeError,
        r"mpq\.save: expected config to be a QuantConfig",
    ),
    (
        "save-architecture",
        lambda c: mpq.save(c["qmodel"], c["tmp"] / "a.mpq", architecture="resnet"),
        ValueError,
        r"mpq\.save: expected architecture",
    ),
    ("load-path-type", lambda c: mpq.load(None), TypeError, r"mpq\.load: expected path to be a str"),
    (
        "load-missing-file",
        lambda c: mpq.load(c["tmp"] / "nope.mpq"),
        ValueError,
        r"mpq\.load: .*nope\.mpq: no such file",
    ),
    (
        "load-model-type",
        lambda c: (mpq.save(c["qmodel"], c["tmp"] / "m.mpq"), mpq.load(c["tmp"] / "m.mpq", "net")),
        TypeError,
        r"mpq\.load: expected model to be a torch\.nn\.Module",
    ),
    # ---- mpq.summary / mpq.plot_allocation ----
    ("summary-qmodel-type", lambda c: mpq.summary({"layer": 1}), TypeError, r"mpq\.summary: expected qmodel"),
    (
        "plot-qmodel-type",
        lambda c: mpq.plot_allocation("model", c["tmp"] / "p.png"),
        TypeError,
        r"mpq\.plot_allocation: expected qmodel",
    ),
    (
        "plot-float-model",
        lambda c: mpq.plot_allocation(_model(), c["tmp"] / "p.png"),
        ValueError,
        r"mpq\.plot_allocation: qmodel has no multipoint layer",
    ),
    (
        "plot-path-folder",
        lambda c: mpq.plot_allocation(c["qmodel"], c["tmp"] / "missing" / "p.png"),
        FileNotFoundError,
        r"mpq\.plot_allocation: expected path in an existing folder",
    ),
    # ---- MultipointLinear / MultipointConv2d ----
    (
        "module-w_bits",
        lambda c: MultipointLinear(6, 4, 2, 9),
        ValueError,
        r"MultipointLinear: expected w_bits .*2\.\.8",
    ),
    (
        "module-max_points",
        lambda c: MultipointConv2d(3, 4, [3, 3], 0, 4, [1, 1], [0, 0], [1, 1]),
        ValueError,
        r"MultipointConv2d: expected max_points",
    ),
    (
        "module-groups",
        lambda c: MultipointConv2d(3, 4, [3, 3], 2, 4, [1, 1], [0, 0], [1, 1], groups=2),
        ValueError,
        r"MultipointConv2d: expected groups \(2\) to divide in_channels",
    ),
    (
        "set_weight-codes-dtype",
        lambda c: _set_weight(codes=_linear_weight()[0].float()),
        TypeError,
        r"MultipointLinear\.set_weight: expected codes to be int8",
    ),
    (
        "set_weight-codes-shape",
        lambda c: _set_weight(codes=_linear_weight(D=5)[0]),
        ValueError,
        r"MultipointLinear\.set_weight: expected codes \(4, 2, 6\)",
    ),
    (
        "set_weight-codes-type",
        lambda c: _set_weight(codes=[[1]]),
        TypeError,
        r"MultipointLinear\.set_weight: expected codes to be a tensor",
    ),
    (
        "set_weight-scales-dtype",
        lambda c: _set_weight(scales=torch.ones(4, 2, dtype=torch.int32)),
        TypeError,
        r"MultipointLinear\.set_weight: expected scales to be a floating",
    ),
    (
        "set_weight-scales-nan",
        lambda c: _set_weight(scales=torch.full((4, 2), math.nan)),
        ValueError,
        r"MultipointLinear\.set_weight: scales contains NaN or inf",
    ),
    (
        "set_weight-num_points-dtype",
        lambda c: _set_weight(num_points=torch.ones(4)),
        TypeError,
        r"MultipointLinear\.set_weight: expected num_points to be an integer",
    ),
    (
        "set_weight-num_points-range",
        lambda c: _set_weight(num_points=torch.full((4,), 3)),
        ValueError,
        r"MultipointLinear\.set_weight: expected num_points in 0\.\.2, got values in 3\.\.3",
    ),
    (
        "set_weight-num_points-shape",
        lambda c: _set_weight(num_points=torch.ones(3, dtype=torch.int32)),
        ValueError,
        r"MultipointLinear\.set_weight: expected num_points of shape \(4,\)",
    ),
    (
        "set_weight-bias-shape",
        lambda c: _set_weight(bias=torch.zeros(5)),
        ValueError,
        r"MultipointLinear\.set_weight: expected bias of shape \(4,\)",
    ),
    (
        "set_weight-bias-inf",
        lambda c: _set_weight(bias=torch.full((4,), math.inf)),
        ValueError,
        r"MultipointLinear\.set_weight: bias contains NaN or inf",
    ),
    (
        "set_weight-bias-without-bias",
        lambda c: _set_weight("conv", bias=torch.zeros(4)),
        ValueError,
        r"MultipointConv2d\.set_weight: the module was built without a bias; expected bias None",
    ),
    (
        "set_act_qparams-scale-zero",
        lambda c: _act(scale=0.0),
        ValueError,
        r"MultipointLinear\.set_act_qparams: expected scale to be a finite number > 0",
    ),
    (
        "set_act_qparams-scale-inf",
        lambda c: _act(scale=math.inf),
        ValueError,
        r"MultipointLinear\.set_act_qparams: expected scale to be a finite number > 0",
    ),
    (
        "set_act_qparams-scale-nan",
        lambda c: _act(scale=math.nan),
        ValueError,
        r"MultipointLinear\.set_act_qparams: expected scale to be a finite number > 0",
    ),
    (
        "set_act_qparams-qmin-qmax",
        lambda c: _act(qmin=5, qmax=5),
        ValueError,
        r"MultipointLinear\.set_act_qparams: expected qmin < qmax",
    ),
    (
        "set_act_qparams-zero_point-type",
        lambda c: _act(zero_point=0.5),
        TypeError,
        r"MultipointLinear\.set_act_qparams: expected zero_point to be an int",
    ),
    (
        "set_act_qparams-zero_point-range",
        lambda c: _act(zero_point=300, qmin=0, qmax=255),
        ValueError,
        r"MultipointLinear\.set_act_qparams: expected zero_point in qmin\.\.qmax",
    ),
    # ---- torch.ops.mpq ----
    (
        "fit-bits-low",
        lambda c: ops.fit_multipoint(torch.randn(3, 5), 1, 2, False),
        RuntimeError,
        r"mpq::fit_multipoint: expected bits in 2\.\.8, got 1",
    ),
    (
        "fit-bits-high",
        lambda c: ops.fit_multipoint(torch.randn(3, 5), 9, 2, True),
        RuntimeError,
        r"mpq::fit_multipoint: expected bits in 2\.\.8, got 9",
    ),
    (
        "fit-max_points",
        lambda c: ops.fit_multipoint(torch.randn(3, 5), 4, 0, False),
        RuntimeError,
        r"mpq::fit_multipoint: expected max_points in 1\.\.",
    ),
    (
        "fit-weight-dtype",
        lambda c: ops.fit_multipoint(torch.randn(3, 5).half(), 4, 2, False),
        RuntimeError,
        r"mpq::fit_multipoint: expected weight to be float32 or float64",
    ),
    (
        "fit-weight-shape",
        lambda c: ops.fit_multipoint(torch.randn(3, 5, 2), 4, 2, False),
        RuntimeError,
        r"mpq::fit_multipoint: expected weight to be 2-D",
    ),
    (
        "fit-weight-inf",
        lambda c: ops.fit_multipoint(torch.tensor([[1.0, math.inf]]), 4, 2, False),
        RuntimeError,
        r"mpq::fit_multipoint: weight contains NaN or inf",
    ),
    (
        "dequantize-dtype",
        lambda c: ops.dequantize_multipoint(*_linear_weight(), torch.int32),
        RuntimeError,
        r"mpq::dequantize_multipoint: expected a floating dtype",
    ),
    (
        "dequantize-num_points-dtype",
        lambda c: ops.dequantize_multipoint(*_linear_weight()[:2], torch.ones(4, dtype=torch.int64), torch.float32),
        RuntimeError,
        r"mpq::dequantize_multipoint: expected num_points to be int32",
    ),
    (
        "dequantize-mixed-devices",
        lambda c: ops.dequantize_multipoint(
            _linear_weight()[0], _linear_weight()[1].to("meta"), _linear_weight()[2], torch.float32
        ),
        RuntimeError,
        r"mpq::dequantize_multipoint: expected every tensor argument on one device, got .*scales on meta",
    ),
    (
        "linear-input-shape",
        lambda c: _linear(input=torch.randn(3, 7)),
        RuntimeError,
        r"mpq::multipoint_linear: expected input \[\.\.\., 6\]",
    ),
    (
        "linear-input-dtype",
        lambda c: _linear(input=torch.ones(3, 6, dtype=torch.int64)),
        RuntimeError,
        r"mpq::multipoint_linear: expected input to be a floating",
    ),
    (
        "linear-codes-dtype",
        lambda c: _linear(codes=_linear_weight()[0].to(torch.int16)),
        RuntimeError,
        r"mpq::multipoint_linear: expected codes to be int8",
    ),
    (
        "linear-num_points-range",
        lambda c: _linear(num_points=torch.full((4,), 3, dtype=torch.int32)),
        RuntimeError,
        r"mpq::multipoint_linear: expected num_points in 0\.\.2",
    ),
    (
        "linear-act_qparams-values",
        lambda c: _linear(act_qparams=torch.tensor([math.nan, 0.0, -128.0, 127.0])),
        RuntimeError,
        r"mpq::multipoint_linear: expected act_qparams with a finite scale",
    ),
    (
        "linear-mixed-devices",
        lambda c: _linear(input=torch.randn(3, 6, device="meta")),
        RuntimeError,
        r"mpq::multipoint_linear: expected every tensor argument on one device, got .*input on meta",
    ),
    (
        "linear-bias-mixed-devices",
        lambda c: _linear(bias=torch.zeros(4, device="meta")),
        RuntimeError,
        r"mpq::multipoint_linear: expected every tensor argument on one device, got .*bias on meta",
    ),
    ("conv-groups", lambda c: _conv(groups=3), RuntimeError, r"mpq::multipoint_conv2d: expected groups >= 1 dividing"),
    ("conv-stride", lambda c: _conv(stride=[0, 1]), RuntimeError, r"mpq::multipoint_conv2d: expected stride >= 1"),
    (
        "conv-padding-length",
        lambda c: _conv(padding=[0, 0, 0]),
        RuntimeError,
        r"mpq::multipoint_conv2d: expected stride, padding and dilation of length 2",
    ),
    (
        "conv-input-rank",
        lambda c: _conv(input=torch.randn(3, 6, 6)),
        RuntimeError,
        r"mpq::multipoint_conv2d: expected input \[N, C_in, H, W\]",
    ),
    (
        "conv-input-channels",
        lambda c: _conv(input=torch.randn(2, 4, 6, 6)),
        RuntimeError,
        r"mpq::multipoint_conv2d: expected input with 3 channels",
    ),
    (
        "conv-bias-shape",
        lambda c: _conv(bias=torch.zeros(5)),
        RuntimeError,
        r"mpq::multipoint_conv2d: expected bias of shape \[4\]",
    ),
    (
        "conv-mixed-devices",
        lambda c: _conv(codes=_conv_weight()[0].to("meta")),
        RuntimeError,
        r"mpq::multipoint_conv2d: expected every tensor argument on one device, got codes on meta",
    ),
]


@pytest.mark.parametrize("call, exc, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_naming_function_and_argument(ctx, call: Callable, exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        call(ctx)


# ---- the CLI: one line naming the command and the argument, exit status 2 ----------------------


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (
            ["quantize", "--model", "efficientnet_lite0", "--calib", "{tmp}", "--out", "{tmp}/q", "--batch-size", "0"],
            r"^python -m mpq quantize: argument --batch-size: expected a positive integer, got 0",
        ),
        (
            [
                "quantize",
                "--model",
                "efficientnet_lite0",
                "--calib",
                "{tmp}",
                "--out",
                "{tmp}/q",
                "--calib-images",
                "x",
            ],
            r"^python -m mpq quantize: argument --calib-images: expected a positive integer, got 'x'",
        ),
        (
            ["quantize", "--model", "efficientnet_lite0", "--calib", "{tmp}", "--out", "{tmp}/q", "--avg-bits", "four"],
            r"^python -m mpq quantize: argument --avg-bits: invalid float value",
        ),
        (
            ["eval", "--model", "efficientnet_lite0", "--data", "{tmp}", "--workers", "-1"],
            r"^python -m mpq eval: argument --workers: expected an integer >= 0",
        ),
    ],
)
def test_cli_usage_mistakes(tmp_path: Path, capsys, argv, pattern) -> None:
    argv = [a.format(tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    _assert_one_line(capsys, pattern)


def _assert_one_line(capsys, pattern: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(pattern, err[0]), err


@pytest.mark.parametrize(
    "config, pattern",
    [
        ('{"w_bits": 12}', r"^mpq quantize: mpq\.QuantConfig: expected w_bits to be an int in 2\.\.8, got 12$"),
        ('{"max_points": 0}', r"^mpq quantize: mpq\.QuantConfig: expected max_points"),
        ('{"calib_batches": -1}', r"^mpq quantize: mpq\.QuantConfig: expected calib_batches"),
        ('{"bits": 4}', r"^mpq quantize: mpq\.QuantConfig\.from_dict: unknown fields \['bits'\]$"),
        ("[4, 8]", r"^mpq quantize: config file .* expected a JSON object of QuantConfig fields$"),
    ],
)
def test_cli_config_mistakes(tmp_path: Path, capsys, config: str, pattern: str) -> None:
    (tmp_path / "cfg.json").write_text(config)
    argv = [
        "quantize",
        "--model",
        "efficientnet_lite0",
        "--calib",
        str(tmp_path),
        "--out",
        str(tmp_path / "q"),
        "--config",
        str(tmp_path / "cfg.json"),
        "--quiet",
        "--workers",
        "0",
    ]
    assert cli.main(argv) == 2
    _assert_one_line(capsys, pattern)


# ---- non-contiguous inputs: accepted, same result -------------------------------------------------


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a strided layout (every other element of a twice-as-large buffer)."""
    out = torch.stack([t, torch.zeros_like(t)], -1)[..., 0]
    assert not out.is_contiguous()
    return out


def test_set_weight_accepts_non_contiguous_tensors() -> None:
    codes, scales, n = _linear_weight()
    n = torch.tensor([0, 1, 2, 2], dtype=torch.int32)
    a, b = MultipointLinear(6, 4, 2, 4), MultipointLinear(6, 4, 2, 4)
    bias = torch.randn(4)
    a.set_weight(codes, scales, n, bias)
    b.set_weight(_non_contiguous(codes), _non_contiguous(scales), _non_contiguous(n), _non_contiguous(bias))
    for name, buf in a.named_buffers():
        assert torch.equal(buf, dict(b.named_buffers())[name]), name


def test_quantize_accepts_non_contiguous_and_channels_last_batches() -> None:
    calib = _calib(2)
    ref = mpq.quantize(_model(), calib, CFG).state_dict()
    for layout in (
        lambda x: x.to(memory_format=torch.channels_last),
        lambda x: x.transpose(2, 3).contiguous().transpose(2, 3),
    ):
        batches = [layout(x) for x in calib]
        assert not batches[0].is_contiguous()
        got = mpq.quantize(_model(), batches, CFG).state_dict()
        for k, v in ref.items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)


# ---- the former C++ validation gaps: the decided behaviour -------------------------------------
# Empty weights compute (C = 0: an empty output; P = 0: the zero weight); a conv2d whose kernel is
# empty or does not fit the padded input, non-finite scales (CPU) and weights whose squared errors
# would overflow fit_multipoint's float32 sq_errors are refused naming the op and the argument.
# test_fuzz.py draws from all of these domains; test_cuda.py checks the CUDA kernels agree.

FLT_MAX = torch.finfo(torch.float32).max


@pytest.mark.parametrize("inner", [(6,), (3, 3, 3), (0,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_dequantize_zero_channels_gives_an_empty_weight(inner, dtype) -> None:
    codes = torch.zeros(0, 2, *inner, dtype=torch.int8)
    out = ops.dequantize_multipoint(codes, torch.zeros(0, 2), torch.zeros(0, dtype=torch.int32), dtype)
    assert out.shape == (0, *inner) and out.dtype == dtype


@pytest.mark.parametrize("inner", [(6,), (3, 3, 3)])
def test_dequantize_zero_points_gives_the_zero_weight(inner) -> None:
    codes = torch.zeros(4, 0, *inner, dtype=torch.int8)
    out = ops.dequantize_multipoint(codes, torch.zeros(4, 0), torch.zeros(4, dtype=torch.int32), torch.float64)
    assert out.dtype == torch.float64 and torch.equal(out, torch.zeros(4, *inner, dtype=torch.float64))


@pytest.mark.parametrize("act", [None, (0.1, 0.0, -128.0, 127.0)], ids=["float_act", "int8_act"])
def test_linear_zero_points_gives_the_bias(act) -> None:
    codes, scales, _ = _linear_weight()
    empty = dict(
        codes=codes[:, :0],
        scales=scales[:, :0],
        num_points=torch.zeros(4, dtype=torch.int32),
        act_qparams=None if act is None else torch.tensor(act),
    )
    assert torch.equal(_linear(**empty), torch.zeros(3, 4))
    bias = torch.randn(4)
    assert torch.equal(_linear(bias=bias, **empty), bias.expand(3, 4))


def test_linear_zero_channels_gives_an_empty_output() -> None:
    codes, scales, n = _linear_weight()
    weight = dict(codes=codes[:0], scales=scales[:0], num_points=n[:0])
    for x, bias in [
        (torch.randn(3, 6), None),
        (torch.randn(2, 5, 6, dtype=torch.float64), torch.zeros(0)),
        (torch.randn(0, 6), None),
    ]:
        out = _linear(input=x, bias=bias, **weight)
        assert out.shape == (*x.shape[:-1], 0) and out.dtype == x.dtype


@pytest.mark.parametrize(
    "x_shape, cin_g, stride, padding, dilation, groups, want",
    [
        ((2, 3, 6, 6), 3, [1, 1], [0, 0], [1, 1], 1, (2, 0, 4, 4)),
        ((1, 3, 7, 5), 1, [2, 1], [1, 0], [1, 2], 3, (1, 0, 4, 1)),
        ((0, 3, 3, 3), 3, [1, 1], [0, 0], [1, 1], 1, (0, 0, 1, 1)),
    ],
)
def test_conv2d_zero_output_channels_gives_an_empty_output(
    x_shape, cin_g, stride, padding, dilation, groups, want
) -> None:
    codes = torch.zeros(0, 2, cin_g, 3, 3, dtype=torch.int8)
    out = _conv(
        input=torch.randn(x_shape, dtype=torch.float64),
        codes=codes,
        scales=torch.zeros(0, 2),
        num_points=torch.zeros(0, dtype=torch.int32),
        bias=torch.zeros(0),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )
    assert out.shape == want and out.dtype == torch.float64


def test_conv2d_zero_points_gives_the_bias() -> None:
    codes, scales, _ = _conv_weight()
    bias = torch.randn(4)
    out = _conv(
        codes=codes[:, :0],
        scales=scales[:, :0],
        num_points=torch.zeros(4, dtype=torch.int32),
        bias=bias,
        padding=[1, 0],
    )
    assert torch.equal(out, bias.reshape(1, 4, 1, 1).expand(2, 4, 6, 4))


@pytest.mark.parametrize(
    "x_shape, padding, dilation, pattern",
    [
        ((2, 3, 2, 2), [0, 0], [1, 1], r"padding \[0, 0\]: padded size 2 < dilated kernel size 3 in dimension 2"),
        ((2, 3, 6, 2), [0, 0], [1, 1], r"padded size 2 < dilated kernel size 3 in dimension 3"),
        ((2, 3, 4, 6), [0, 0], [2, 1], r"padded size 4 < dilated kernel size 5 in dimension 2"),
        ((2, 3, 1, 6), [0, 0], [1, 1], r"padded size 1 < dilated kernel size 3 in dimension 2"),
        ((0, 3, 2, 2), [0, 0], [1, 1], r"padded size 2 < dilated kernel size 3 in dimension 2"),
        ((2, 3, 0, 6), [2, 0], [1, 1], r"with H, W >= 1, got shape \[2, 3, 0, 6\]"),
        ((2, 3, 6, 0), [0, 0], [1, 1], r"with H, W >= 1, got shape \[2, 3, 6, 0\]"),
    ],
    ids=["kernel-larger", "kernel-wider", "dilated", "one-row", "empty-batch", "zero-height-padded", "zero-width"],
)
def test_conv2d_kernel_must_fit_the_padded_input(x_shape, padding, dilation, pattern) -> None:
    with pytest.raises(RuntimeError, match=r"^mpq::multipoint_conv2d: expected input \[N, C_in, H, W\] .*" + pattern):
        _conv(input=torch.randn(x_shape), padding=padding, dilation=dilation)


def test_conv2d_kernel_that_just_fits_gives_one_output_pixel() -> None:
    assert _conv(input=torch.randn(2, 3, 3, 3)).shape == (2, 4, 1, 1)
    assert _conv(input=torch.randn(2, 3, 1, 1), padding=[1, 1]).shape == (2, 4, 1, 1)
    assert _conv(input=torch.randn(2, 3, 5, 3), dilation=[2, 1]).shape == (2, 4, 1, 1)


@pytest.mark.parametrize("kh, kw", [(0, 3), (3, 0), (0, 0)])
def test_conv2d_refuses_an_empty_kernel(kh, kw) -> None:
    codes, scales, n = _conv_weight()
    with pytest.raises(
        RuntimeError,
        match=r"^mpq::multipoint_conv2d: expected codes \[C_out, P, C_in/groups, kh, kw\] "
        r"with a kernel of at least 1 x 1, got shape \[4, 2, 3, " + f"{kh}, {kw}" + r"\]",
    ):
        _conv(codes=codes[:, :, :, :kh, :kw])


def _nan_scales_call(op: str, scales: torch.Tensor):
    if op == "dequantize_multipoint":
        codes, _, n = _linear_weight()
        return lambda: ops.dequantize_multipoint(codes, scales, n, torch.float32)
    if op == "multipoint_linear":
        return lambda: _linear(scales=scales)
    if op == "multipoint_conv2d":
        return lambda: _conv(scales=scales)
    codes, _, n = _linear_weight()
    return lambda: ops.pack_multipoint(codes, scales, n, 4)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("op", ["dequantize_multipoint", "multipoint_linear", "multipoint_conv2d", "pack_multipoint"])
def test_non_finite_scales_are_refused_on_cpu(op, value) -> None:
    """CPU only: the scales of the points in use are checked in one pass over [C, P]. Not checked
    on CUDA (reading them would sync the device): there they propagate as NaN into the weight and
    the output, as csrc/checks.h states (test_cuda.py::test_non_finite_scales_propagate_on_cuda)."""
    scales = _linear_weight()[1]
    scales[2, 1] = value
    with pytest.raises(
        RuntimeError,
        match=rf"^mpq::{op}: expected finite scales for the points in use, got "
        rf"-?(nan|inf) at scales\[2, 1\] \(num_points\[2\] = 2\)",
    ):
        _nan_scales_call(op, scales)()


def test_non_finite_scales_of_unused_points_are_ignored() -> None:
    """Points at or beyond a channel's count contribute nothing, whatever their scale."""
    codes, scales, _ = _linear_weight()
    n = torch.tensor([2, 1, 0, 2], dtype=torch.int32)
    bad = scales.clone()
    bad[1, 1], bad[2, 0] = math.nan, math.inf
    want = ops.dequantize_multipoint(codes, scales, n, torch.float64)
    assert torch.equal(ops.dequantize_multipoint(codes, bad, n, torch.float64), want)
    x = torch.randn(3, 6)
    assert torch.equal(_linear(input=x, scales=bad, num_points=n), _linear(input=x, scales=scales, num_points=n))


def test_packed_linear_refuses_non_finite_packed_scales_on_cpu() -> None:
    """CPU only, as the scales above (on CUDA NaN propagates)."""
    codes, scales, n = _linear_weight()
    packed, packed_scales, perm, offsets, row_sums = ops.pack_multipoint(codes, scales, n, 4)
    packed_scales = packed_scales.clone()
    packed_scales[1, 3] = math.nan
    with pytest.raises(
        RuntimeError,
        match=r"^mpq::multipoint_linear_packed: expected finite packed_scales, got nan "
        r"at packed_scales\[1, 3\]",
    ):
        ops.multipoint_linear_packed(torch.randn(3, 6), packed, packed_scales, perm, offsets, row_sums, 4, None, None)


def test_packed_ops_with_zero_channels_or_points() -> None:
    codes, scales, _ = _linear_weight()
    x, bias = torch.randn(3, 6), torch.randn(4)
    empty = ops.pack_multipoint(codes[:0], scales[:0], torch.zeros(0, dtype=torch.int32), 4)
    assert [tuple(t.shape) for t in empty] == [(0, 4, 512), (0, 64), (0,), (1,), (0,)]
    assert ops.multipoint_linear_packed(x, *empty, 0, None, None).shape == (3, 0)
    zero = ops.pack_multipoint(codes[:, :0], scales[:, :0], torch.zeros(4, dtype=torch.int32), 4)
    assert zero[0].shape[0] == 0 and torch.equal(zero[3], torch.tensor([0, 0], dtype=torch.int32))
    assert torch.equal(ops.multipoint_linear_packed(x, *zero, 4, bias, None), bias.expand(3, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fit_multipoint_refuses_rows_whose_squared_errors_overflow_float32(dtype) -> None:
    """sq_errors are float32 and never exceed the row's squared norm: a row's sum_d w[j, d]^2 (in
    float64) must be at most FLT_MAX = 3.40282e+38. Just below it, every output is finite (with the
    exact solver, and with the fast one, which 8-bit rows of 1024 use)."""
    g = torch.Generator().manual_seed(4)
    for D, bits in [(16, 4), (1024, 8)]:
        unit = torch.randn(3, D, generator=g, dtype=torch.float64)
        unit = unit / unit.norm(dim=1, keepdim=True)
        for exact in (False, True):
            below = (unit * math.sqrt(0.99 * FLT_MAX)).to(dtype)
            codes, scales, errs = ops.fit_multipoint(below, bits, 3, exact)
            assert bool(torch.isfinite(scales).all()) and bool(torch.isfinite(errs).all())
            assert float(errs[:, 0].max()) <= 0.99 * FLT_MAX
    above = unit[:, :16] / unit[:, :16].norm(dim=1, keepdim=True)
    above[1] *= math.sqrt(1.01 * FLT_MAX)
    with pytest.raises(
        RuntimeError,
        match=r"^mpq::fit_multipoint: expected every row of weight to have a squared "
        r"norm sum_d w\[j, d\]\^2 <= 3\.40282e\+38 \(the float32 maximum: sq_errors are float32\), "
        r"got 3\.43\d*e\+38 in row 1",
    ):
        ops.fit_multipoint(above.to(dtype), 4, 2, False)
    huge = torch.full((2, 16), 1e20, dtype=dtype)
    huge[1] *= 2  # |w| = 2e20: squared norm 16 * 4e40
    with pytest.raises(RuntimeError, match=r"^mpq::fit_multipoint: .*squared norm .* got 6\.4e\+41 in row 1"):
        ops.fit_multipoint(huge, 4, 2, False)
    if dtype == torch.float64:  # squares beyond float64 too
        with pytest.raises(RuntimeError, match=r"^mpq::fit_multipoint: .*squared norm .* got inf in row 0"):
            ops.fit_multipoint(torch.full((1, 3), 1e300, dtype=dtype), 4, 2, True)
