"""Quantized models through torch.export, torch.compile(fullgraph=True) and AOTInductor.

The mpq ops trace through their fake kernels (python/mpq/ops.py) and stay single nodes in the
graph; at run time the exported program, the compiled graph and the AOTInductor package call the
same CPU/CUDA kernels as the eager model, so outputs are compared exactly where nothing else in
the graph is recompiled (export), and closely where Inductor generates the code around the ops.
"""

import io
import json
import shutil
import warnings
import zipfile

import pytest
import torch
import torchvision
from torch import nn
from torch.export import Dim

import mpq

_CUDA = torch.cuda.is_available() and bool(mpq.build_info().get("cuda_kernels", False))
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not _CUDA, reason="no GPU, or mpq built without CUDA kernels")),
]
# Inductor (torch.compile, AOTInductor) compiles C++ on the CPU: it needs a C++ compiler.
_CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
needs_cxx = pytest.mark.skipif(_CXX is None, reason="no C++ compiler on PATH: Inductor cannot build its CPU kernels")

MPQ_OPS = {torch.ops.mpq.multipoint_conv2d_stored.default, torch.ops.mpq.multipoint_linear_stored.default}


@pytest.fixture(autouse=True)
def _no_tf32():
    """cuDNN and cuBLAS default to TF32 in float32 on a GPU; the comparisons here want IEEE float32."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TF32 flags are deprecated in favour of fp32_precision
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _cnn() -> nn.Module:
    """Conv-BN-ReLU, a grouped strided conv, a depthwise dilated conv, a Linear head. Only exact
    ops (ReLU, flatten) sit between the mpq layers, so that 8-bit activations see the same
    inputs in eager and in code Inductor generates."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=4),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=2, dilation=2, groups=32),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    ).eval()
    g = torch.Generator().manual_seed(1)
    bn = model[1]
    bn.running_mean.copy_(torch.randn(16, generator=g) * 0.1)
    bn.running_var.copy_(torch.rand(16, generator=g) + 0.5)
    return model


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 8)).eval()


# avg_bits 8: most channels get 2 to 4 points on these small layers.
W3A8 = mpq.QuantConfig(w_bits=3, a_bits=8, avg_bits=8.0)
W4A16 = mpq.QuantConfig(w_bits=4, a_bits=None, avg_bits=8.0)


def _quantized_cnn(device: str = "cpu") -> nn.Module:
    g = torch.Generator().manual_seed(2)
    qmodel = mpq.quantize(_cnn(), [torch.randn(8, 3, 8, 8, generator=g) for _ in range(3)], W3A8)
    assert max(int(m.num_points.max()) for m in qmodel.modules() if isinstance(m, mpq.nn.MultipointConv2d)) > 1
    return qmodel.to(device)


def _quantized_mlp(config, device: str = "cpu") -> nn.Module:
    g = torch.Generator().manual_seed(3)
    return mpq.quantize(_mlp(), [torch.randn(16, 64, generator=g) for _ in range(3)], config).to(device)


def _mpq_nodes(ep: torch.export.ExportedProgram):
    return [n for n in ep.graph.nodes if n.op == "call_function" and n.target in MPQ_OPS]


def _eager(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


# ---- torch.export -----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_export_quantized_cnn_equals_eager(device):
    qmodel = _quantized_cnn(device)
    x = torch.randn(4, 3, 8, 8, device=device)
    ep = torch.export.export(qmodel, (x,))
    # One graph node per quantized layer: the fake kernels trace the ops without decomposing them.
    layers = sum(isinstance(m, (mpq.nn.MultipointConv2d, mpq.nn.MultipointLinear)) for m in qmodel.modules())
    assert len(_mpq_nodes(ep)) == layers == 4
    assert torch.equal(ep.module()(x), _eager(qmodel, x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", [W3A8, W4A16], ids=["w3a8", "w4a16"])
def test_export_quantized_linear_model_equals_eager(device, config):
    qmodel = _quantized_mlp(config, device)
    x = torch.randn(3, 5, 64, device=device)  # leading dimensions pass through multipoint_linear
    ep = torch.export.export(qmodel, (x,))
    assert len(_mpq_nodes(ep)) == 2
    assert torch.equal(ep.module()(x), _eager(qmodel, x))


def test_export_with_dynamic_batch_equals_eager():
    qmodel = _quantized_cnn()
    x = torch.randn(4, 3, 8, 8)
    # The fake kernels compute symbolic output shapes (the Linear head fixes the spatial size).
    ep = torch.export.export(qmodel, (x,), dynamic_shapes=({0: Dim("batch", min=1, max=64)},))
    for n in (1, 3, 17):
        xn = torch.randn(n, 3, 8, 8)
        assert torch.equal(ep.module()(xn), _eager(qmodel, xn))


def test_exported_program_saves_and_loads():
    qmodel = _quantized_mlp(W3A8)
    x = torch.randn(6, 64)
    buf = io.BytesIO()
    torch.export.save(torch.export.export(qmodel, (x,)), buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    assert len(_mpq_nodes(loaded)) == 2
    assert torch.equal(loaded.module()(x), _eager(qmodel, x))


def test_fake_kernels_give_the_shapes_of_the_real_ones():
    """Export with the fake kernels only (FakeTensorMode) on odd sizes, strides and padding."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    qmodel = _quantized_cnn()
    conv = qmodel[3]
    assert isinstance(conv, mpq.nn.MultipointConv2d) and conv.groups == 4
    x = torch.randn(2, 16, 11, 7)
    real = conv(x)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = conv(mode.from_tensor(x))
    assert fake.shape == real.shape and fake.dtype == real.dtype


# ---- torch.compile ----------------------------------------------------------------------------


@needs_cxx
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_quantized_cnn(device):
    torch._dynamo.reset()
    qmodel = _quantized_cnn(device)
    compiled = torch.compile(qmodel, fullgraph=True)
    for n in (4, 4, 2):  # a recompile for the new batch size
        x = torch.randn(n, 3, 8, 8, device=device)
        with torch.no_grad():
            out = compiled(x)
        # The mpq ops run as extern kernels; Inductor's code around them is ReLU and views only.
        torch.testing.assert_close(out, _eager(qmodel, x), rtol=1e-6, atol=1e-6)


@needs_cxx
def test_compile_fullgraph_quantized_linear_model():
    torch._dynamo.reset()
    qmodel = _quantized_mlp(W4A16)
    compiled = torch.compile(qmodel, fullgraph=True)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        out = compiled(x)
    # Inductor's GELU differs from ATen's in the last bits.
    torch.testing.assert_close(out, _eager(qmodel, x), rtol=1e-5, atol=1e-6)


# ---- AOTInductor ------------------------------------------------------------------------------


@needs_cxx
def test_aoti_package_calls_the_mpq_ops_through_the_proxy_executor(tmp_path):
    """AOTInductor needs no C shim for the mpq ops: it serialises each call into the package
    (wrapper.json) and its proxy executor calls the op through the dispatcher at run time, so
    the ops library must be loaded in the process that runs the package (import mpq in Python,
    mpq::ops in C++)."""
    qmodel = _quantized_cnn()
    x = torch.randn(4, 3, 8, 8)
    ep = torch.export.export(qmodel, (x,), dynamic_shapes=({0: Dim("batch", min=1, max=64)},))
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "qcnn.pt2"))
    with zipfile.ZipFile(path) as z:
        extern = [json.loads(z.read(n)) for n in z.namelist() if n.endswith(".wrapper.json")]
    targets = [node["node"]["target"] for doc in extern for node in doc["nodes"]]
    assert targets.count("mpq::multipoint_conv2d_stored") == 3 and targets.count("mpq::multipoint_linear_stored") == 1
    runner = torch._inductor.aoti_load_package(path)
    for n in (4, 1, 9):
        xn = torch.randn(n, 3, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(runner(xn), _eager(qmodel, xn), rtol=1e-6, atol=1e-6)


@needs_cxx
def test_aoti_package_of_a_fused_model(tmp_path):
    """The deployed form (mpq.fuse_activations: uint8 levels between layers, ReLU bounds, the
    uint8 max pool) through torch.export and AOTInductor: the package holds the fused ops'
    arguments (an unbounded clamp as None: the package format has no infinite float) and gives the
    fused model's output bit for bit, as TorchScript does."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(4, 3, 64, 64, generator=g)]
    q = mpq.quantize(model, calib, mpq.QuantConfig.preset("W4A8", seed=0, calib_batches=1))
    x = torch.randn(2, 3, 64, 64, generator=g)
    f = mpq.fuse_activations(q, x, quantize_residuals=True)
    path = torch._inductor.aoti_compile_and_package(
        torch.export.export(f, (x,)), package_path=str(tmp_path / "r18.pt2")
    )
    with zipfile.ZipFile(path) as z:
        extern = [json.loads(z.read(n)) for n in z.namelist() if n.endswith(".wrapper.json")]
    targets = [node["node"]["target"] for doc in extern for node in doc["nodes"]]
    assert targets.count("mpq::multipoint_conv2d_fused") == 20 and targets.count("mpq::max_pool2d_levels") == 1
    runner = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        assert torch.equal(runner(x), f(x))
