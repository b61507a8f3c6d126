"""mpq.export_onnx: standard-operator ONNX (QDQ) that ONNX Runtime and OpenVINO run, checked per
layer against the float64 recomputation of the simulation check (mpq.simulate.layer_bound)."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mpq
from mpq.export import export_onnx, exportable, int8_rows, requantized_rows
from mpq.simulate import layer_bound
from test_stored import GRIDS, LAYERS, _layer

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is optional (pip install -e .[export])")
onnx = pytest.importorskip("onnx", reason="onnx is optional (pip install -e .[export])")

pytestmark = pytest.mark.usefixtures("one_intraop_thread")

STANDARD_DOMAINS = {"", "ai.onnx"}
# The largest merged int8 code that x86 int8 kernels (oneDNN's, ONNX Runtime's) compute exactly on
# this CPU under 8-bit activations: without VNNI they add pairs of products in a saturating int16.
MAX_CODE = 127 if mpq.ops.int8_kernels_exact(8) else 64


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _mergeable(m):
    """Scales with a_1 = 9 a_2 exactly (small dyadic a_2): the kernels' and the export's merge rule."""
    codes, scales = m.unpacked()
    g = torch.Generator().manual_seed(3)
    a2 = torch.randint(1, 64, (scales.shape[0],), generator=g).float() / 4096
    scales = scales.clone()
    scales[:, 1] = a2
    scales[:, 0] = 9 * a2
    m.set_weight(codes, scales, m.num_points, m.bias)
    return m


def _same_padding_conv():
    m = mpq.nn.MultipointConv2d(8, 16, [3, 3], 3, 4, [2, 2], [0, 0], [1, 1], 1, same_padding=True)
    ref = _layer("conv", 8, 16, 3, 2, 0, 1, 1)
    m.set_weight(*ref.unpacked(), ref.num_points, ref.bias)
    return m


CASES = [(layer, False) for layer in LAYERS] + [(layer, True) for layer in LAYERS if layer[-1] == 1]


@pytest.mark.parametrize("grid", GRIDS + [None], ids=lambda g: "float" if g is None else f"{g[2]}..{g[3]}")
@pytest.mark.parametrize(
    "case",
    CASES + ["same"],
    ids=lambda c: c if isinstance(c, str) else "-".join(map(str, c[0])) + ("-merged" if c[1] else ""),
)
def test_exported_layer_equals_the_float64_reference(case, grid, tmp_path):
    if case == "same":
        m, kind, cin = _same_padding_conv(), "conv", 8
    else:
        layer, merged = case
        m = _layer(*layer, points=2 if merged else 3)
        if merged:
            _mergeable(m)
        kind, cin = layer[0], layer[1]
    if grid is not None:
        m.set_act_qparams(*grid)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, cin, generator=g) if kind == "linear" else torch.randn(2, cin, 11, 13, generator=g)
    if grid is not None and grid[2] >= 0:
        x = x.relu()
    path = export_onnx(nn.Sequential(m), x[:1], tmp_path / "layer.onnx")
    graph = onnx.load(str(path)).graph
    assert {n.domain for n in graph.node} <= STANDARD_DOMAINS  # no custom operators
    int8 = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert int8 and all(t.name for t in int8)  # the weight travels as int8 codes
    y = torch.from_numpy(_session(path).run(None, {"input": x.numpy()})[0])
    ref, bound, _ = layer_bound(m, x)
    ratio = float(((y.double() - ref).abs() / bound).max())
    assert ratio <= 1.0, ratio
    rows = int8_rows(m)[1].shape[1]
    if case != "same" and case[1]:
        assert rows == 1  # merged into one int8 row per channel: one Conv / MatMul
        assert not any(n.op_type == "ReduceSum" for n in graph.node)
    if grid is None or grid[2] <= grid[1] <= grid[3]:  # padding 0.0 is a level: it goes into the Conv
        assert not any(n.op_type == "Pad" for n in graph.node)


@pytest.mark.parametrize("layer", LAYERS, ids=lambda l: "-".join(map(str, l)))
@pytest.mark.parametrize("merged", [False, True])
def test_int8_rows_are_the_weight_and_follow_the_kernels_merge_rule(layer, merged):
    m = _layer(*layer, points=3)
    if merged:
        _mergeable(m)
    codes, scales = int8_rows(m)
    C, R = scales.shape
    dense = (codes.double() * scales.double().view(C, R, *([1] * (codes.dim() - 2)))).sum(1)
    pc, ps = m.unpacked()
    keep = (torch.arange(m.max_points)[None, :] < m.num_points[:, None]).double()
    expected = (pc.double() * (ps.double() * keep).view(C, m.max_points, *([1] * (pc.dim() - 2)))).sum(1)
    assert torch.equal(dense, expected)  # exact: the same weight in float64
    D = int(torch.Size(m.code_shape).numel())
    first = mpq.ops.int8_merged_points(m.point_codes, m.point_scales, m.num_points, m.w_bits, D).long()
    n = m.num_points.long()
    used_rows = ((codes.reshape(C, R, -1) != 0).any(-1) | (torch.arange(R)[None, :] == 0)).sum(1)
    assert bool((torch.where(n > 0, n - first + 1, 0) >= used_rows.where(n > 0, 0)).all())
    if merged and torch.equal(first, torch.where(n >= 2, 2, 1)):
        assert R == (2 if int(n.max()) == 3 else 1)


class _Net(nn.Module):
    """conv-ReLU6-(max pool)-conv-ReLU-1x1 conv + residual-ReLU-conv: every fused epilogue."""

    def __init__(self, pool: bool):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 2, 1) if pool else None
        self.conv = nn.Conv2d(16, 24, 3, stride=2, padding=1)
        self.project = nn.Conv2d(24, 16, 1)
        self.shortcut = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.head = nn.Conv2d(16, 8, 3, groups=8)

    def forward(self, x):
        a = F.relu6(self.stem(x))
        if self.pool is not None:
            a = self.pool(a)
        b = F.relu(self.project(F.relu(self.conv(a))) + self.shortcut(a))
        return self.head(b)


@pytest.mark.parametrize("pool", [False, True], ids=["", "maxpool"])
@pytest.mark.parametrize("quantize_residuals", [False, True], ids=["float-residual", "uint8-residual"])
@pytest.mark.parametrize("merge", [False, True], ids=["points", "int8-merge"])
def test_uint8_levels_between_layers_run_as_qlinearconv(pool, quantize_residuals, merge, tmp_path):
    """A model with int8 activations exports in its fused form: uint8 levels between layers, and
    each layer whose output is quantized right after its convolution (no clamp left that changes a
    level, no residual) is the QDQ pattern that ONNX Runtime runs as QLinearConv when its channels
    are one int8 row each. Output equal to mpq's fused model (a level may flip on float32 rounding)."""
    torch.manual_seed(0)
    model = _Net(pool).eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 3, 20, 20, generator=g) for _ in range(2)]
    cfg = mpq.QuantConfig.preset("W4A8", method=mpq.MultipointConfig(int8_merge=merge))
    q = mpq.quantize(model, calib, cfg)
    x = torch.randn(4, 3, 20, 20, generator=g)
    fused = mpq.fuse_activations(q, x[:1], quantize_residuals=quantize_residuals)
    source = fused if quantize_residuals else q  # export_onnx fuses (without quantize_residuals) itself
    path = export_onnx(source, x[:1], tmp_path / "net.onnx", max_int8_code=MAX_CODE)
    graph = onnx.load(str(path)).graph
    assert {n.domain for n in graph.node} <= STANDARD_DOMAINS
    assert not any(n.op_type == "Pad" for n in graph.node)
    form = exportable(source, x[:1], MAX_CODE)
    layers = dict(form.named_modules())
    qlinear = {name for name, m in layers.items() if getattr(m, "qdq", False) and m.rows == 1}
    assert {"stem", "conv"} <= {name for name, m in layers.items() if getattr(m, "qdq", False)}
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.optimized_model_filepath = str(tmp_path / "net.opt.onnx")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    y = torch.from_numpy(
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    )
    optimized = [n.op_type for n in onnx.load(str(tmp_path / "net.opt.onnx")).graph.node]
    assert optimized.count("QLinearConv") == len(qlinear), (optimized, qlinear)
    with torch.no_grad():
        ours = fused(x)
        assert float((form(x) - ours).abs().max()) < 1e-4
    # A level that flips in the head's input moves an output by at most its scale times the
    # largest weight of a channel. Levels flip where ONNX Runtime's arithmetic differs from float32:
    # QLinearConv adds the bias rounded to int32 at input scale x weight scale (up to half a unit,
    # a few hundredths of an output level here), which flips a few percent of the levels (measured:
    # 6-8% of the outputs move, by 0.03-0.05 of a flip on average).
    head = fused.get_submodule("head").layer if quantize_residuals else q.head
    flip = float(head.act_qparams[0]) * float(head.dequantized_weight().abs().amax())
    err = (y - ours).abs()
    assert float(err.max()) <= 2 * flip + 1e-4, (float(err.max()), flip)
    assert float(err.mean()) <= 0.1 * flip


def test_depthwise_codes_up_to_127_are_exact_in_the_runtimes_int8_kernels(tmp_path):
    """8-bit depthwise codes at +-127 against uint8 levels at 255 everywhere, as QLinearConv: the
    runtimes' depthwise int8 kernels widen each product (no int16 pair saturation, on any CPU), so
    export keeps 127 there whatever ``max_int8_code`` says."""
    dw = _layer("conv", 24, 24, 3, 1, 1, 1, 24, bits=8, points=1)
    codes, scales = dw.unpacked()
    sign = torch.where(torch.arange(codes[:, 0].numel()).reshape(codes[:, 0].shape) % 5 == 0, -1, 1)
    codes = (127 * sign).to(codes.dtype)[:, None]
    dw.set_weight(codes, torch.full_like(scales, 1 / 64), dw.num_points, dw.bias)
    dw.set_act_qparams(0.03, 0, 0, 255)
    pw = _layer("conv", 24, 8, 1, 1, 0, 1, 1, points=1)
    pw.set_act_qparams(1.0, 0, 0, 255)  # the depthwise sums (up to 9 x 255 x 127 / 64 x 0.03) fit
    model = nn.Sequential(dw, nn.ReLU(), pw)
    x = torch.full((2, 24, 9, 9), 0.03 * 255)
    fused = mpq.fuse_activations(model, x[:1])
    path = export_onnx(model, x[:1], tmp_path / "dw.onnx", max_int8_code=64)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "dw.opt.onnx")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    y = torch.from_numpy(
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    )
    assert [n.op_type for n in onnx.load(str(tmp_path / "dw.opt.onnx")).graph.node].count("QLinearConv") == 1
    with torch.no_grad():
        levels = fused.get_submodule("0")(x)  # the depthwise layer's uint8 output: large, unsaturated
        assert int(levels.max()) > 100 and int(levels.max()) < 255
        ours = fused(x)
    # One flipped level of the depthwise output moves an output by at most pw's scale x max|w|.
    flip = 1.0 * float(pw.dequantized_weight().abs().amax())
    assert float((y - ours).abs().max()) <= flip + 1e-4


@pytest.mark.parametrize("layer", LAYERS, ids=lambda l: "-".join(map(str, l)))
@pytest.mark.parametrize("max_code", [127, 64])
def test_requantized_rows_move_each_weight_by_at_most_half_a_step(layer, max_code):
    m = _layer(*layer, points=3)
    codes, scales = int8_rows(m)
    q, step = requantized_rows(codes, scales, max_code)
    C, R = scales.shape
    assert q.dtype == torch.int8 and q.shape == (C, 1, *codes.shape[2:]) and step.dtype == torch.float32
    assert int(q.abs().max()) <= max_code
    view = (C, *([1] * (codes.dim() - 2)))
    w = (codes.double() * scales.double().view(C, R, *view[1:])).sum(1)
    moved = (q[:, 0].double() * step.double().view(view) - w).abs()
    assert bool((moved <= step.double().view(view) / 2 * (1 + 1e-12)).all())
    top = w.reshape(C, -1).abs().amax(1)
    assert bool(((q[:, 0].reshape(C, -1).abs().amax(1) == max_code) | (top == 0)).all())  # the grid spans max|w|


def test_export_refuses_what_it_cannot_write_and_leaves_the_model_alone(tmp_path):
    m = _layer("conv", 16, 40, 3, 1, 1, 1, 1)
    m.set_act_qparams(0.05, 0, 0, 255)
    model = nn.Sequential(m)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="mpq.export_onnx: expected model to be an nn.Module"):
        export_onnx("model", torch.randn(1, 16, 8, 8), tmp_path / "a.onnx")
    with pytest.raises(TypeError, match="mpq.export_onnx: expected example to be a tensor"):
        export_onnx(model, [1, 2], tmp_path / "a.onnx")
    with pytest.raises(TypeError, match="mpq.export_onnx: expected path to be a str or Path"):
        export_onnx(model, torch.randn(1, 16, 8, 8), 3)
    for bad in (0, 128, True):
        with pytest.raises(ValueError, match="mpq.export_onnx: expected max_int8_code to be an int in 1..127"):
            export_onnx(model, torch.randn(1, 16, 8, 8), tmp_path / "a.onnx", max_int8_code=bad)
    export_onnx(model, torch.randn(1, 16, 8, 8), tmp_path / "a.onnx")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_efficientnet_lite0_in_onnx_runtime_and_openvino(lite0, tmp_path):
    """The bundled model at W4A8 with int8_merge: the runtimes' logits agree with mpq's own."""
    model, data, ref = lite0
    cfg = mpq.QuantConfig.preset("W4A8", method=mpq.MultipointConfig(int8_merge=True))
    q = mpq.quantize(model, data.calib_batches[:2], cfg)
    path = export_onnx(q, data.eval_images[:1], tmp_path / "lite0.onnx", max_int8_code=MAX_CODE)
    graph = onnx.load(str(path)).graph
    assert {n.domain for n in graph.node} <= STANDARD_DOMAINS
    with torch.no_grad():
        ours = q(data.eval_images)
    outs = {"onnxruntime": torch.from_numpy(_session(path).run(None, {"input": data.eval_images.numpy()})[0])}
    try:
        import openvino as ov
    except ImportError:  # pragma: no cover - optional
        ov = None
    if ov is not None:
        compiled = ov.Core().compile_model(
            ov.convert_model(str(path)), "CPU", {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"}
        )
        outs["openvino"] = torch.from_numpy(np.asarray(compiled(data.eval_images.numpy())[0]))
    p = ours.softmax(1)
    for name, y in outs.items():
        # Activation roundings that flip on last-bit differences travel through the network (as
        # between CPU code paths, mpq.simulate's module docstring): bounded in distribution.
        kl = float((p * (p.clamp_min(1e-12).log() - y.log_softmax(1))).sum(1).mean())
        agree = float((y.argmax(1) == ours.argmax(1)).double().mean())
        assert kl < 0.01 and agree >= 0.9, (name, kl, agree)
    # The same from the command line, from the saved file: the ONNX file and the OpenVINO IR.
    saved = tmp_path / "lite0.mpq.safetensors"
    mpq.save(q, saved, architecture="efficientnet_lite0")
    for fmt, out in (("onnx", tmp_path / "cli.onnx"), ("openvino", tmp_path / "cli.xml")):
        if fmt == "openvino" and ov is None:
            continue
        cmd = [sys.executable, "-m", "mpq", "export", "--model", str(saved), "--format", fmt, "--out", str(out)]
        cmd += ["--max-int8-code", str(MAX_CODE)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0 and f"({fmt}," in res.stdout, res.stderr
    cli = torch.from_numpy(_session(tmp_path / "cli.onnx").run(None, {"input": data.eval_images.numpy()})[0])
    assert torch.equal(cli, outs["onnxruntime"])  # the same file, written from the saved model
    size = path.stat().st_size
    stored = sum(m.point_codes.numel() for m in q.modules() if isinstance(m, mpq.nn.MultipointLayer))
    # int8 codes, not float32 (0.28 of it at 127, 0.36 where max_int8_code 64 leaves more rows)
    assert size < 0.4 * sum(p.numel() * 4 for p in model.parameters()), size
    assert stored < size  # ONNX holds one byte per code (int8), mpq.save two 4-bit codes per byte


def test_openvino_ir_and_the_command_line(tmp_path):
    """`python -m mpq export` writes the ONNX file and the OpenVINO IR of a saved model; OpenVINO's
    output equals the float64 reference of the layer within the simulation check's bound."""
    ov = pytest.importorskip("openvino", reason="openvino is optional (pip install -e .[export])")
    m = _layer("conv", 16, 40, 3, 1, 1, 1, 1)
    m.set_act_qparams(0.05, 0, 0, 255)
    x = torch.randn(2, 16, 9, 9).relu()
    xml = mpq.export_openvino(nn.Sequential(m), x[:1], tmp_path / "ir" / "layer.xml")
    assert xml.with_suffix(".bin").is_file()
    # f32: OpenVINO runs float parts in bfloat16 by default on CPUs with AMX
    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    y = torch.from_numpy(np.asarray(compiled(x.numpy())[0]))
    ref, bound, _ = layer_bound(m, x)
    assert float(((y.double() - ref).abs() / bound).max()) <= 1.0
    with pytest.raises(ValueError, match="mpq.export_openvino: expected path to be a .xml file"):
        mpq.export_openvino(nn.Sequential(m), x[:1], tmp_path / "layer.bin")

    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3)).eval()
    calib = [torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    q = mpq.quantize(model, calib, mpq.QuantConfig.preset("W4A8"))
    saved = tmp_path / "q.mpq.safetensors"
    mpq.save(q, saved)
    # A model saved without an architecture cannot be rebuilt by the CLI: a clear error, no file.
    run = [sys.executable, "-m", "mpq", "export", "--model", str(saved), "--out", str(tmp_path / "q.onnx")]
    res = subprocess.run(run, capture_output=True, text=True)
    assert res.returncode != 0 and "saved without an architecture" in res.stderr
    assert not (tmp_path / "q.onnx").exists()
