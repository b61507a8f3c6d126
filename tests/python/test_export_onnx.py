"""mpq.export_onnx: standard-operator ONNX (QDQ) that ONNX Runtime and OpenVINO run, checked per
layer against the float64 recomputation of the simulation check (mpq.simulate.layer_bound)."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import mpq
from mpq.export import export_onnx, int8_rows
from mpq.simulate import layer_bound
from test_stored import GRIDS, LAYERS, _layer

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is optional (pip install -e .[export])")
onnx = pytest.importorskip("onnx", reason="onnx is optional (pip install -e .[export])")

pytestmark = pytest.mark.usefixtures("one_intraop_thread")

STANDARD_DOMAINS = {"", "ai.onnx"}


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
    fused = mpq.fuse_activations(nn.Sequential(m, nn.ReLU()), torch.randn(1, 16, 8, 8))
    with pytest.raises(ValueError, match="mpq.export_onnx: expected a model from mpq.quantize"):
        export_onnx(fused, torch.randn(1, 16, 8, 8), tmp_path / "a.onnx")
    export_onnx(model, torch.randn(1, 16, 8, 8), tmp_path / "a.onnx")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_efficientnet_lite0_in_onnx_runtime_and_openvino(lite0, tmp_path):
    """The bundled model at W4A8 with int8_merge: the runtimes' logits agree with mpq's own."""
    model, data, ref = lite0
    cfg = mpq.QuantConfig.preset("W4A8", method=mpq.MultipointConfig(int8_merge=True))
    q = mpq.quantize(model, data.calib_batches[:2], cfg)
    path = export_onnx(q, data.eval_images[:1], tmp_path / "lite0.onnx")
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
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0 and f"({fmt}," in res.stdout, res.stderr
    cli = torch.from_numpy(_session(tmp_path / "cli.onnx").run(None, {"input": data.eval_images.numpy()})[0])
    assert torch.equal(cli, outs["onnxruntime"])  # the same file, written from the saved model
    size = path.stat().st_size
    stored = sum(m.point_codes.numel() for m in q.modules() if isinstance(m, mpq.nn.MultipointLayer))
    assert size < 0.35 * sum(p.numel() * 4 for p in model.parameters()), size  # int8 codes, not float32
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
