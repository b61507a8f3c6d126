"""int8 activations between layers: mpq::multipoint_conv2d_fused (convolution + residual + clamp +
the next layer's quantizer, uint8 or float32 in and out) on every path, against the float64
recomputation; mpq.fuse_activations on real models (what it fuses, the check it runs, scripting,
export, the user's model left untouched)."""

import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import mpq
from mpq.fuse import _check_one, check_fused
from mpq.nn.fused import FusedMultipointConv2d

sys.path.insert(0, os.path.dirname(__file__))
from test_stored import GRIDS, _layer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_intraop_thread")

# (C_in, C_out, kernel, stride, padding, dilation, groups): dense 3x3, depthwise (strided, 5x5,
# dilated, 72 channels: a full 64-channel register block and a masked rest), grouped, 1x1
# expansion and projection, a 3-channel stem.
CONVS = [
    (16, 40, 3, 1, 1, 1, 1),
    (24, 24, 3, 2, 1, 1, 24),
    (72, 72, 3, 1, 1, 1, 72),
    (32, 32, 5, 1, 2, 1, 32),
    (16, 16, 3, 1, 2, 2, 16),
    (12, 18, 3, 1, 2, 2, 3),
    (16, 64, 1, 1, 0, 1, 1),
    (64, 16, 1, 1, 0, 1, 1),
    (3, 16, 5, 2, 2, 1, 1),
]
# (clamp_min, clamp_max, residual, next layer's grid or None): the epilogues the rewrite produces.
EPILOGUES = [
    (float("-inf"), float("inf"), False, None),
    (0.0, float("inf"), True, None),
    (0.0, 6.0, False, (0.04, 0, 0, 255)),
    (0.0, 6.0, True, (0.0235, 0, 0, 255)),  # a ReLU6 that the grid implies (255 * 0.0235 < 6): dropped
    (0.0, 6.0, False, (0.06, 0, 0, 127)),  # 7-bit grid, the ReLU6 inside it (127 * 0.06 > 6)
    (float("-inf"), float("inf"), True, (0.05, 3, 0, 127)),  # 7-bit grid, clamped at both ends
    (float("-inf"), float("inf"), True, (0.05, 0, -128, 127)),
    (0.0, float("inf"), False, (0.3, 2, 0, 15)),
]


def _paths(conv):
    cin, cout, _, _, _, _, groups = conv
    paths = ["auto", "int8", "dense"]
    if groups == cin == cout:
        paths.append("depthwise")
    return paths


def _run(f, x, residual, path):
    m = f.layer
    return mpq.ops.multipoint_conv2d_fused(
        x,
        m.point_codes,
        m.point_scales,
        m.num_points,
        m.w_bits,
        m.code_shape,
        m.bias,
        m.act_qparams,
        m.stride,
        m.padding,
        m.dilation,
        m.groups,
        residual,
        f.clamp_min,
        f.clamp_max,
        f.out_qparams,
        path,
        f.residual_qparams,
    )


@pytest.mark.parametrize(
    "epilogue", EPILOGUES, ids=lambda e: f"clamp{e[0]},{e[1]}-res{int(e[2])}-out{e[3] and e[3][2:]}"
)
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[2]}..{g[3]}")
@pytest.mark.parametrize("conv", CONVS, ids=lambda c: "-".join(map(str, c)))
def test_fused_conv_equals_the_float64_reference(conv, grid, epilogue):
    """Every path, float32 and uint8 inputs: float outputs within mpq.simulate.layer_bound (+ the
    residual add's rounding) of the float64 layer, uint8 outputs the float64 levels except one
    level off where the output is within that bound of a rounding boundary (mpq.fuse._check_one)."""
    cin, cout, k, stride, pad, dil, groups = conv
    m = _layer("conv", cin, cout, k, stride, pad, dil, groups)
    m.set_act_qparams(*grid)
    lo, hi, with_residual, out_grid = epilogue
    out_qparams = None if out_grid is None else torch.tensor(out_grid, dtype=torch.float32)
    f = FusedMultipointConv2d(m, lo, hi, out_qparams)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, cin, 11, 13, generator=g)
    if grid[2] >= 0:
        x = x.relu()
    s, zp, qmin, qmax = grid
    levels = (torch.round(x / s) + zp).clamp(qmin, qmax).sub(qmin).to(torch.uint8)
    with torch.no_grad():
        y_shape = m(x).shape
        residual = (
            torch.randn(y_shape, generator=g).contiguous(memory_format=torch.channels_last) if with_residual else None
        )
        for path in _paths(conv):
            for inp in (x, levels):
                y = _run(f, inp, residual, path)
                assert y.dtype == (torch.uint8 if out_grid else torch.float32), path
                assert y.is_contiguous(memory_format=torch.channels_last), path
                check = _check_one(path, f, inp, residual, y, max_samples=8)
                assert check.max_ratio <= 1.0 and check.level_flips <= 1e-3, (path, inp.dtype, check)
            # The module (its own path choice) equals the op.
            assert torch.equal(f(levels, residual), _run(f, levels, residual, "auto"))


def test_uint8_inputs_are_exactly_the_float_inputs_levels():
    """A uint8 input and the float input it quantizes give the same output bit for bit on the
    paths that quantize the input themselves (int8, depthwise): the levels are what they compute."""
    for conv in [CONVS[0], CONVS[1], CONVS[2], CONVS[6]]:
        m = _layer("conv", *conv[:2], *conv[2:])
        m.set_act_qparams(0.03, 0, 0, 255)
        f = FusedMultipointConv2d(m, 0.0, float("inf"), torch.tensor([0.05, 0, 0, 255.0]))
        x = torch.randn(2, conv[0], 9, 9).relu()
        u = (torch.round(x / 0.03)).clamp(0, 255).to(torch.uint8)
        for path in [p for p in _paths(conv) if p in ("int8", "depthwise")]:
            with torch.no_grad():
                assert torch.equal(_run(f, x, None, path), _run(f, u, None, path)), (conv, path)


def test_uint8_residual_is_its_values():
    """A uint8 residual at residual_qparams gives, bit for bit, what the float32 tensor of its
    values (u - (zp - qmin)) * s gives, on every path and epilogue (plain rows and point runs)."""
    g = torch.Generator().manual_seed(7)
    for conv in [CONVS[0], CONVS[1], CONVS[2], CONVS[5], CONVS[6], CONVS[7], CONVS[8]]:
        cin, cout, k, stride, pad, dil, groups = conv
        m = _layer("conv", cin, cout, k, stride, pad, dil, groups)
        m.set_act_qparams(0.03, 0, 0, 255)
        x = torch.randn(2, cin, 9, 9, generator=g).relu()
        with torch.no_grad():
            y_shape = m(x).shape
        for grid in [(0.05, 0, 0, 255), (0.04, 3, -128, 127)]:
            rq = torch.tensor(grid, dtype=torch.float32)
            u = torch.randint(0, 256, y_shape, dtype=torch.uint8, generator=g).contiguous(
                memory_format=torch.channels_last
            )
            values = (u.float() - (grid[1] - grid[2])) * grid[0]
            for out_q in [None, torch.tensor([0.05, 0, 0, 255.0])]:
                f = FusedMultipointConv2d(m, 0.0, float("inf"), out_q, rq)
                for path in _paths(conv):
                    with torch.no_grad():
                        a = _run(f, x, u, path)
                        b = mpq.ops.multipoint_conv2d_fused(
                            x,
                            m.point_codes,
                            m.point_scales,
                            m.num_points,
                            m.w_bits,
                            m.code_shape,
                            m.bias,
                            m.act_qparams,
                            m.stride,
                            m.padding,
                            m.dilation,
                            m.groups,
                            values,
                            0.0,
                            float("inf"),
                            out_q,
                            path,
                        )
                    assert torch.equal(a, b), (conv, grid, path)
                    assert torch.equal(f(x, u), _run(f, x, u, "auto"))


def test_int8_path_on_many_input_shapes():
    """oneDNN's weight is packed per input shape (8 shapes, then one packed for any shape): every
    batch size and image size, the packed ones and those beyond, stays within the bound, and an
    image's output does not depend on the batch it came in (int32 sums, the same scaling)."""
    m = _layer("conv", *CONVS[0][:2], *CONVS[0][2:])
    m.set_act_qparams(0.03, 0, 0, 255)
    f = FusedMultipointConv2d(m, 0.0, float("inf"), None)
    g = torch.Generator().manual_seed(5)
    full = torch.randn(12, CONVS[0][0], 9, 9, generator=g).relu()
    with torch.no_grad():
        ref = _run(f, full, None, "int8")
        for n in range(1, 13):  # 12 batch sizes: past the 8 packed shapes
            y = _run(f, full[:n], None, "int8")
            assert torch.equal(y, ref[:n]), n
        for hw in [(7, 7), (9, 13), (16, 5)]:
            x = torch.randn(2, CONVS[0][0], *hw, generator=g).relu()
            check = _check_one("int8", f, x, None, _run(f, x, None, "int8"), max_samples=8)
            assert check.max_ratio <= 1.0, (hw, check)


def test_large_outputs_reuse_their_blocks():
    """Outputs of 16 MB and more come from mpq's cache of freed blocks (no fresh pages per call):
    a freed output's block serves the next output of its size, and its values are the layer's."""
    m = _layer("conv", 64, 64, 1, 1, 0, 1, 1)
    m.set_act_qparams(0.03, 0, 0, 255)
    f = FusedMultipointConv2d(m, 0.0, float("inf"), None)
    x = torch.randn(16, 64, 64, 64, generator=torch.Generator().manual_seed(3)).relu()
    with torch.no_grad():
        y = _run(f, x, None, "int8")
        assert y.numel() * 4 >= 16 << 20
        first, expected = y.data_ptr(), y.clone()
        del y
        y = _run(f, x, None, "int8")
        assert y.data_ptr() == first
        assert torch.equal(y, expected)
        check = _check_one("int8", f, x, None, y, max_samples=4)
        assert check.max_ratio <= 1.0, check


_ISA_CHILD = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    import test_fuse as t
    for conv in t.CONVS:
        for e in t.EPILOGUES[1:4]:
            t.test_fused_conv_equals_the_float64_reference(conv, t.GRIDS[1], e)
    print("ok", torch.backends.cpu.get_cpu_capability())
    """
)


@pytest.mark.parametrize("isa", ["SSE41", "AVX2", "AVX512_CORE_VNNI", "ALL"])
def test_fused_kernels_agree_on_every_isa(isa):
    """oneDNN's int8 kernels per ISA (ONEDNN_MAX_CPU_ISA), mpq's epilogue and depthwise kernels per
    ATen capability (their function clones follow the CPU; ATEN_CPU_CAPABILITY caps ATen's)."""
    cap = "default" if isa == "SSE41" else "avx2" if "AVX2" in isa else "avx512"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa, "ATEN_CPU_CAPABILITY": cap}
    out = subprocess.run(
        [sys.executable, "-c", _ISA_CHILD, os.path.dirname(__file__)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-3000:]


def test_fused_op_refuses_bad_arguments_before_any_work():
    m = _layer("conv", 16, 40, 3, 1, 1, 1, 1)
    m.set_act_qparams(0.03, 0, 0, 255)
    x = torch.rand(1, 16, 8, 8)
    args = (m.point_codes, m.point_scales, m.num_points, 4, m.code_shape, m.bias)
    geo = (m.stride, m.padding, m.dilation, 1)
    op = torch.ops.mpq.multipoint_conv2d_fused
    inf = float("inf")
    with pytest.raises(
        RuntimeError,
        match=r"mpq::multipoint_conv2d_fused: expected residual float32 or uint8 levels of the output's shape",
    ):
        op(x, *args, m.act_qparams, *geo, torch.zeros(1, 40, 4, 4), -inf, inf, None)
    with pytest.raises(RuntimeError, match=r"mpq::multipoint_conv2d_fused: a uint8 residual needs residual_qparams"):
        op(x, *args, m.act_qparams, *geo, torch.zeros(1, 40, 8, 8, dtype=torch.uint8), -inf, inf, None)
    with pytest.raises(RuntimeError, match=r"mpq::multipoint_conv2d_fused: residual_qparams must have at most 256"):
        op(
            x,
            *args,
            m.act_qparams,
            *geo,
            torch.zeros(1, 40, 8, 8, dtype=torch.uint8),
            -inf,
            inf,
            None,
            "auto",
            torch.tensor([0.1, 0, -1000, 1000.0]),
        )
    with pytest.raises(RuntimeError, match=r"mpq::multipoint_conv2d_fused: expected clamp_min <= clamp_max"):
        op(x, *args, m.act_qparams, *geo, None, 1.0, 0.0, None)
    with pytest.raises(
        RuntimeError, match=r"mpq::multipoint_conv2d_fused: a uint8 input needs act_qparams with at most 256"
    ):
        op(x.to(torch.uint8), *args, torch.tensor([0.1, 0.5, 0, 255.0]), *geo, None, -inf, inf, None)
    with pytest.raises(RuntimeError, match=r'mpq::multipoint_conv2d_fused: path "depthwise" needs groups'):
        op(x, *args, m.act_qparams, *geo, None, -inf, inf, None, "depthwise")
    with pytest.raises(RuntimeError, match=r"mpq::multipoint_conv2d_fused: out_qparams must have at most 256"):
        op(x, *args, m.act_qparams, *geo, None, -inf, inf, torch.tensor([0.1, 0, -1000, 1000.0]))
    with pytest.raises(RuntimeError, match=r"mpq::multipoint_conv2d_fused: expected a float32 input or uint8"):
        op(x.double(), *args, m.act_qparams, *geo, None, -inf, inf, None)
    with pytest.raises(TypeError, match=r"mpq.fuse_activations: qmodel must be an nn.Module"):
        mpq.fuse_activations(lambda x: x, x)


@pytest.fixture(scope="module")
def resnet18_w4a8():
    """torchvision ResNet-18 (random weights: the structure is what matters here), W4A8."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(4, 3, 96, 96, generator=g)]
    q = mpq.quantize(model, calib, mpq.QuantConfig.preset("W4A8", seed=0, calib_batches=1))
    return model, q, calib


def test_fuse_resnet18_structure_check_and_artifacts(resnet18_w4a8, tmp_path):
    model, q, calib = resnet18_w4a8
    state = {k: v.clone() for k, v in q.state_dict().items()}
    x = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(5))
    f = mpq.fuse_activations(q, x)
    fused = {n: m for n, m in f.named_modules() if isinstance(m, FusedMultipointConv2d)}
    # Every conv (20) is fused. conv1 of each block writes uint8 for conv2 (8 blocks). conv2 (+
    # residual + ReLU) writes float32 where its users include the next block's add; before a
    # downsampling block its users are that block's conv1 and downsample conv, which read the same
    # tensor and so share one quantizer (mpq.calibrate.SharedInputs): it writes their uint8 levels.
    # The stem (max-pool next) and the downsamples (the add next) write float32.
    assert len(fused) == 20
    uint8_out = {n for n, m in fused.items() if m.out_qparams is not None}
    expected = {f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)} | {
        f"layer{i}.1.conv2" for i in range(1, 4)
    }
    for i in range(1, 5):
        assert torch.equal(
            q.get_submodule(f"layer{i}.0.conv1").act_qparams,
            q.get_submodule(f"layer{i}.0.downsample.0" if i > 1 else "layer1.0.conv1").act_qparams,
        )
    assert uint8_out == expected, sorted(uint8_out ^ expected)
    assert all(fused[f"layer{i}.{j}.conv2"].clamp_min == 0.0 for i in range(1, 5) for j in range(2))
    # The user's model is untouched.
    assert all(isinstance(q.get_submodule(n), mpq.nn.MultipointConv2d) for n in fused)
    assert all(torch.equal(v, q.state_dict()[k]) for k, v in state.items())
    check = check_fused(f, x)
    assert len(check.layers) == 20 and check.max_ratio <= 1.0 and check.level_flips <= 1e-3
    with torch.no_grad():
        y_q, y_f = q(x), f(x)
    # End to end: the rare one-level flips travel; measured 0.0 here (no flip on this input).
    assert float((y_f - y_q).norm() / y_q.norm()) <= 2e-2
    scripted = torch.jit.script(f)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    with torch.no_grad():
        assert torch.equal(loaded(x), y_f)
    ep = torch.export.export(f, (x,))
    with torch.no_grad():
        assert torch.equal(ep.module()(x), y_f)


def test_fuse_resnet18_with_quantized_residuals(resnet18_w4a8):
    """quantize_residuals=True: every block output that feeds convolutions and the next block's
    add is written as uint8 levels, and that add reads them (residual_qparams); each layer still
    within its float64 bound; the end-to-end change against the simulation is the skip path's
    rounding (measured and bounded here), and the artifacts round-trip."""
    model, q, calib = resnet18_w4a8
    x = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(5))
    f = mpq.fuse_activations(q, x, quantize_residuals=True)
    fused = {n: m for n, m in f.named_modules() if isinstance(m, FusedMultipointConv2d)}
    assert len(fused) == 20
    expected_out = {f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)}
    expected_out |= {f"layer{i}.0.conv2" for i in range(1, 5)}  # the next block's conv1 and add
    expected_out |= {f"layer{i}.1.conv2" for i in range(1, 4)}  # a downsampling block's conv1 and downsample
    expected_out.add("conv1")  # the stem: the max pool runs on its levels, read by layer1.0's conv1 and add
    assert {n for n, m in fused.items() if m.out_qparams is not None} == expected_out
    assert [n.target for n in f.graph.nodes if n.op == "call_function" and "max_pool2d" in str(n.target)] == [
        torch.ops.mpq.max_pool2d_levels
    ]
    # The second block of each stage adds the first block's uint8 output; layer1.0 the pooled stem's.
    assert {n for n, m in fused.items() if m.residual_qparams is not None} == {
        f"layer{i}.1.conv2" for i in range(1, 5)
    } | {"layer1.0.conv2"}
    for i in range(1, 5):
        assert torch.equal(fused[f"layer{i}.1.conv2"].residual_qparams, fused[f"layer{i}.0.conv2"].out_qparams)
    assert torch.equal(fused["layer1.0.conv2"].residual_qparams, fused["conv1"].out_qparams)
    check = check_fused(f, x)
    assert len(check.layers) == 20 and check.max_ratio <= 1.0 and check.level_flips <= 1e-3
    with torch.no_grad():
        y_q, y_f = q(x), f(x)
        y_plain = mpq.fuse_activations(q, x)(x)
    change = float((y_f - y_q).norm() / y_q.norm())
    # Measured 0.0081 (the simulation itself is 0.024 from FP32 here): 1.5x that.
    assert 0.0 < change <= 0.0121, change
    assert not torch.equal(y_f, y_plain)
    scripted = torch.jit.script(f)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    with torch.no_grad():
        assert torch.equal(torch.jit.load(buf)(x), y_f)
        assert torch.equal(torch.export.export(f, (x,)).module()(x), y_f)


@pytest.mark.parametrize(
    "epilogue", EPILOGUES, ids=lambda e: f"clamp{e[0]},{e[1]}-res{int(e[2])}-out{e[3] and e[3][2:]}"
)
@pytest.mark.parametrize("act_levels", [256, 128])
def test_one_point_layers_where_onednn_writes_the_levels(epilogue, act_levels):
    """One point per channel (the W8A8 preset): with no further points to add, oneDNN writes the
    uint8 levels itself (its ReLU, or its hardtanh at the clamp's and the output grid's bounds),
    adding a uint8 residual with its sum post-op (float32 and uint8 residuals, two residual grids);
    the same bounds hold, and the caller's residual is left as it was."""
    lo, hi, with_residual, out_grid = epilogue
    g = torch.Generator().manual_seed(3)
    # 8-bit codes (the W8A8 preset) on a CPU with VNNI or under 7-bit activations; otherwise the
    # forced int8 path takes codes of at most 7 bits (oneDNN saturates pairs of products in int16
    # there: mpq.ops.int8_kernels_exact).
    bits = 8 if mpq.ops.int8_kernels_exact(8, act_levels) else 7
    for conv in [CONVS[0], CONVS[6], CONVS[7]]:
        cin, cout, k, stride, pad, dil, groups = conv
        m = _layer("conv", cin, cout, k, stride, pad, dil, groups, bits=bits, points=1)
        m.set_act_qparams(0.03, 0, 0, act_levels - 1)
        x = torch.randn(2, cin, 10, 10, generator=g).relu()
        with torch.no_grad():
            y_shape = m(x).shape
        residuals = [(None, None)]
        if with_residual:
            residuals = [(torch.randn(y_shape, generator=g).contiguous(memory_format=torch.channels_last), None)]
            for grid in [(0.05, 0, 0, 255), (0.04, 3, -128, 127)]:
                u = torch.randint(0, 256, y_shape, dtype=torch.uint8, generator=g)
                residuals.append((u.contiguous(memory_format=torch.channels_last), torch.tensor(grid)))
        for residual, rq in residuals:
            f = FusedMultipointConv2d(m, lo, hi, None if out_grid is None else torch.tensor(out_grid), rq)
            kept = None if residual is None else residual.clone()
            with torch.no_grad():
                for path in ("auto", "int8"):
                    y = _run(f, x, residual, path)
                    check = _check_one(path, f, x, residual, y, max_samples=8)
                    assert check.max_ratio <= 1.0 and check.level_flips <= 1e-3, (conv, path, check)
            assert kept is None or torch.equal(residual, kept)


class _StemPoolTwoReaders(nn.Module):
    """A ResNet-50-like entry: stem conv + ReLU + max pool, read by two convolutions."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, stride=2, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.a, self.b = nn.Conv2d(32, 32, 3, padding=1), nn.Conv2d(32, 32, 1)

    def forward(self, x):
        h = self.pool(self.relu(self.stem(x)))
        return self.a(h) + self.b(h)


def test_max_pool_between_fused_convolutions_runs_on_levels():
    """The stem writes uint8 levels and the max pool pools them (mpq::max_pool2d_levels, exactly
    the levels of the pooled values), read by both convolutions; the per-layer check holds, the
    output stays within the simulation's margin, and TorchScript and torch.export give the same."""
    torch.manual_seed(0)
    model = _StemPoolTwoReaders().eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
    q = mpq.quantize(model, calib, mpq.QuantConfig.preset("W4A8", seed=0))
    x = torch.randn(2, 3, 32, 32, generator=g)
    f = mpq.fuse_activations(q, x)
    assert f.stem.out_qparams is not None and torch.equal(f.stem.out_qparams, q.a.act_qparams)
    assert [n.target for n in f.graph.nodes if n.op == "call_function"] == [torch.ops.mpq.max_pool2d_levels]
    assert not any(n.op == "call_module" and isinstance(f.get_submodule(n.target), nn.MaxPool2d) for n in f.graph.nodes)
    check = check_fused(f, x)
    assert len(check.layers) == 3 and check.max_ratio <= 1.0 and check.level_flips <= 1e-3
    with torch.no_grad():
        y_q, y_f = q(x), f(x)
        assert float((y_f - y_q).norm() / y_q.norm()) <= 2e-2
        buf = io.BytesIO()
        torch.jit.save(torch.jit.script(f), buf)
        buf.seek(0)
        assert torch.equal(torch.jit.load(buf)(x), y_f)
        assert torch.equal(torch.export.export(f, (x,)).module()(x), y_f)


def test_max_pool2d_levels_is_the_pooled_values_levels():
    """Exactly PyTorch's float max pool of the levels (shapes, ceil_mode, dilation, channel counts
    around the vector width), channels_last; bad arguments named before any work."""
    g = torch.Generator().manual_seed(2)
    for shape, k, s, p, d, ceil in [
        ((2, 16, 13, 13), 3, 2, 1, 1, False),
        ((1, 64, 20, 20), 3, 2, 1, 1, False),
        ((2, 8, 9, 9), 2, 2, 0, 1, True),
        ((1, 5, 11, 11), 3, 1, 1, 2, False),
        ((1, 3, 10, 10), 3, 2, 1, 1, True),
        ((2, 70, 5, 8), 2, 3, 1, 1, True),
        ((1, 130, 7, 7), 3, 3, 1, 2, True),
    ]:
        u = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        y = mpq.ops.max_pool2d_levels(u, [k, k], [s, s], [p, p], [d, d], ceil)
        assert torch.equal(y, F.max_pool2d(u.float(), k, s, p, d, ceil).to(torch.uint8))
        assert y.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match=r"mpq::max_pool2d_levels: expected levels uint8"):
        mpq.ops.max_pool2d_levels(torch.zeros(1, 2, 4, 4), [2, 2], [2, 2], [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match=r"mpq::max_pool2d_levels: expected padding"):
        mpq.ops.max_pool2d_levels(torch.zeros(1, 2, 4, 4, dtype=torch.uint8), [2, 2], [2, 2], [2, 2], [1, 1], False)
