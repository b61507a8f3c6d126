"""Integer-only inference (mpq.integer_only, HAWQ-V3 style): dyadic numbers, agreement with the
float64 simulation of the same integer pipeline (within one LSB of each output grid), no float
tensor inside the network, fidelity to the fake-quantized and FP32 models, TorchScript, errors."""

import io
import math
import random
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torchvision.models.resnet import BasicBlock

import mpq
from mpq.examples.demo import fidelity
from mpq.integer import dyadic, dyadic_tensor, layerwise_differences, round_shift, simulate_integer
from mpq.integer.modules import IntegerAdd, IntegerClamp, IntegerConv2d, IntegerLinear, IntegerMean, IntegerRequant
from small_models import randomize_batchnorm, small_cnn

pytestmark = pytest.mark.usefixtures("one_intraop_thread")


# ---- dyadic numbers -----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 16, 31])
def test_dyadic_relative_error_bound(bits):
    rng = random.Random(bits)
    reals = [rng.choice([-1.0, 1.0]) * 10.0 ** rng.uniform(-12, 12) for _ in range(4000)]
    reals += [1.0, 0.5, 2.0**-40, 1.0 - 2.0**-40, 3.0, 2.0**bits - 0.25, -(2.0 ** (bits + 3)) + 1.0]
    worst = 0.0
    for r in reals:
        m, shift = dyadic(r, bits)
        assert 2 ** (bits - 1) <= abs(m) < 2**bits and (m > 0) == (r > 0)
        approx = math.ldexp(m, -shift)  # exact in float64: |m| < 2^53
        err = abs(approx - r) / abs(r)  # the subtraction is exact (Sterbenz)
        worst = max(worst, err)
        assert err <= 2.0**-bits, (r, m, shift, err)
    assert worst > 2.0 ** -(bits + 2)  # the bound is tight, not vacuous
    t = torch.tensor(reals, dtype=torch.float64)
    mt, st = dyadic_tensor(t, bits)
    assert mt.tolist() == [dyadic(r, bits)[0] for r in reals]
    assert st.tolist() == [dyadic(r, bits)[1] for r in reals]


def test_dyadic_edge_cases():
    assert dyadic(0.0) == (0, 0)
    assert dyadic(1.0, 31) == (2**30, 30)
    m, s = dyadic(1.0 - 2.0**-40, 31)  # 2^31 (1 - 2^-40) rounds up to 2^31: renormalised
    assert (m, s) == (2**30, 30)
    with pytest.raises(ValueError, match="bits"):
        dyadic(0.3, 63)
    with pytest.raises(ValueError, match="finite"):
        dyadic(float("inf"))


def test_round_shift_rounds_half_up():
    g = torch.Generator().manual_seed(0)
    v = torch.randint(-(2**40), 2**40, (2000,), generator=g, dtype=torch.int64)
    v[:8] = torch.tensor([-3, -2, -1, 0, 1, 2, 3, 5])
    s = torch.randint(0, 41, (2000,), generator=g, dtype=torch.int64)
    s[:8] = 1
    got = round_shift(v, s).tolist()
    want = [math.floor(Fraction(int(a), 2 ** int(b)) + Fraction(1, 2)) for a, b in zip(v, s)]
    assert got == want


# ---- helpers ------------------------------------------------------------------------------------


class _Recorder(TorchDispatchMode):
    """Every aten op that runs, with the dtypes of its tensor arguments and results."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        self.ops.append((str(func), [t.dtype for t in tensors]))
        return out


def _assert_integer_inside(imodel, x):
    """No floating-point tensor is read or produced between the entry and the exit."""
    x_q = imodel.quantize_input(x)
    assert not x_q.is_floating_point()
    rec = _Recorder()
    with torch.no_grad(), rec:
        y_q = imodel.body(x_q)
    assert not y_q.is_floating_point()
    floats = [(op, dt) for op, dt in rec.ops if any(d.is_floating_point or d.is_complex for d in dt)]
    assert rec.ops and not floats, floats[:5]
    # And the graph calls only integer modules, max pooling and shape ops.
    allowed = (
        IntegerConv2d,
        IntegerLinear,
        IntegerAdd,
        IntegerMean,
        IntegerRequant,
        IntegerClamp,
        nn.MaxPool2d,
        nn.Flatten,
    )
    for node in imodel.body.graph.nodes:
        if node.op == "call_module":
            assert isinstance(imodel.body.get_submodule(node.target), allowed), node.format_node()
        elif node.op == "call_function":
            assert node.target in (torch.flatten, torch.reshape, F.max_pool2d), node.format_node()
    return rec


def _lsb_differences(imodel, x):
    """(max |int - sim| at the output in output LSBs, differing entries, entries)."""
    sim = simulate_integer(imodel)
    with torch.no_grad():
        a = imodel.forward_integer(imodel.quantize_input(x))
        b = sim.forward_integer(sim.quantize_input(x))
    assert b.dtype == torch.float64 and torch.equal(b, b.round())
    d = (a.double() - b).abs()
    return float(d.max()), int((d > 0).sum()), d.numel()


def _check_layerwise(imodel, x):
    diffs = layerwise_differences(imodel, x)
    assert diffs and max(v[0] for v in diffs.values()) <= 1, {k: v for k, v in diffs.items() if v[0] > 1}
    flips, total = sum(v[1] for v in diffs.values()), sum(v[2] for v in diffs.values())
    assert flips <= 1e-5 * total, (flips, total)
    return flips, total


def _relative(a, b):
    return float((a - b).double().norm() / b.double().norm())


def _check_model(imodel, qmodel, x, tolerance=0.05):
    """Within one LSB of the simulation at the output and per layer, integers inside, close to the
    fake-quantized model (relative L2 of the outputs below ``tolerance``)."""
    assert _lsb_differences(imodel, x)[0] <= 1
    _check_layerwise(imodel, x)
    _assert_integer_inside(imodel, x)
    with torch.no_grad():
        assert _relative(imodel(x), qmodel(x)) < tolerance


# Quick W4A8 settings (the integer conversion does not depend on them).
_FAST = dict(sensitivity="relative", calib_samples=256, options=mpq.MultipointConfig(scale_refit="none"))


# ---- ResNet-18 (random weights, randomised BatchNorm statistics, 64x64) --------------------------


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.resnet18(num_classes=10).eval(), seed=1)
    calib = [torch.randn(4, 3, 64, 64) for _ in range(2)]
    qmodel = mpq.quantize(model, calib, mpq.QuantConfig(**_FAST))
    imodel = mpq.integer_only(qmodel, calib)
    x = torch.randn(8, 3, 64, 64)
    return model, qmodel, imodel, x


def test_resnet18_equals_its_simulation_within_one_lsb(resnet18):
    _, _, imodel, x = resnet18
    worst, differing, total = _lsb_differences(imodel, x)
    print(f"\nResNet-18 logits: max |int - sim| = {worst:g} LSB, {differing}/{total} entries differ")
    assert worst <= 1
    flips, codes = _check_layerwise(imodel, x)
    print(f"ResNet-18 per layer: {flips} of {codes} codes differ by 1 LSB")


def test_resnet18_runs_on_integers_only(resnet18):
    _, _, imodel, x = resnet18
    rec = _assert_integer_inside(imodel, x)
    assert any("convolution" in op for op, _ in rec.ops)
    mods = list(imodel.body.modules())
    layers = [m for m in mods if isinstance(m, (IntegerConv2d, IntegerLinear))]
    assert len(layers) == 21  # 20 convs and the fc; the 8 residual adds are fused into conv2
    assert not any(isinstance(m, (IntegerAdd, IntegerClamp)) for m in mods)  # every ReLU fused too
    assert all(m.acc_dtype == torch.int32 for m in layers)  # no accumulation can leave int32
    assert sum(isinstance(m, IntegerConv2d) and m.residual_mult is not None for m in mods) == 8
    inner = [m for m in layers if m is not imodel.body.fc]
    assert all(m.out_dtype in (torch.uint8, torch.int8) for m in inner)
    assert imodel.body.fc.out_dtype == torch.int16  # the logits' 16-bit grid
    assert any(m.num_slabs > 0 for m in layers)  # multipoint channels present


def test_resnet18_close_to_fake_quant(resnet18):
    model, qmodel, imodel, x = resnet18
    with torch.no_grad():
        ref, fake, integer = model(x), qmodel(x), imodel(x)
    vs_fake, fake_vs_fp32, int_vs_fp32 = _relative(integer, fake), _relative(fake, ref), _relative(integer, ref)
    print(
        f"\nResNet-18 relative L2 of logits: int vs fake-quant {vs_fake:.4f}, fake vs FP32 {fake_vs_fp32:.4f}, "
        f"int vs FP32 {int_vs_fp32:.4f}"
    )
    # Measured 0.017-0.021: the residual stream on 8-bit grids, requantized downsample inputs.
    # (int vs FP32 <= fake vs FP32 + this, by the triangle inequality.)
    assert vs_fake < 0.05


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_torchscript_and_trace(resnet18):
    _, _, imodel, x = resnet18
    with torch.no_grad():
        want = imodel(x)
        buf = io.BytesIO()
        torch.jit.save(torch.jit.script(imodel), buf)
        buf.seek(0)
        loaded = torch.jit.load(buf)
        assert torch.equal(loaded(x), want)
        x_q = imodel.quantize_input(x)
        assert torch.equal(loaded.forward_integer(x_q), imodel.forward_integer(x_q))
        traced = torch.jit.trace(imodel, x, check_trace=False)
        assert torch.equal(traced(x), want)


def test_mean_size_is_fixed_at_conversion(resnet18):
    _, _, imodel, _ = resnet18
    with pytest.raises(ValueError, match="converted for means over 4 elements, got 16"):
        imodel(torch.randn(1, 3, 128, 128))


# ---- real data: sklearn's 8x8 digits, a small trained ResNet ------------------------------------


def _load_digits():
    try:
        from sklearn.datasets import load_digits

        d = load_digits()
        data, target = d.data, d.target
    except Exception:  # the venv may not see Debian's python3-sklearn: read its bundled file
        files = [
            Path(p) / "sklearn/datasets/data/digits.csv.gz"
            for p in ("/usr/lib/python3/dist-packages", "/usr/local/lib/python3/dist-packages")
        ]
        found = [f for f in files if f.exists()]
        if not found:
            pytest.skip("sklearn digits not found: apt-get install python3-sklearn (or pip install scikit-learn)")
        raw = np.loadtxt(found[0], delimiter=",")
        data, target = raw[:, :-1], raw[:, -1]
    x = torch.tensor(data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0 - 0.5
    return x, torch.tensor(target, dtype=torch.long)


@pytest.fixture(scope="module")
def digits():
    x, y = _load_digits()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
        BasicBlock(16, 16),
        BasicBlock(16, 32, 2, downsample=down),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(8):
        model.train()
        for idx in train[torch.randperm(len(train), generator=g)].split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    calib = list(x[train[:800]].split(100))
    qmodel = mpq.quantize(model, calib, mpq.QuantConfig(**_FAST))
    imodel = mpq.integer_only(qmodel, calib)
    return model, qmodel, imodel, x[test], y[test]


def test_digits_integer_model(digits):
    model, qmodel, imodel, x, y = digits
    worst, differing, total = _lsb_differences(imodel, x)
    flips, codes = _check_layerwise(imodel, x)
    _assert_integer_inside(imodel, x)
    with torch.no_grad():
        ref, fake, integer = model(x), qmodel(x), imodel(x)
    f_fake, f_int, f_int_fake = fidelity(fake, ref, y), fidelity(integer, ref, y), fidelity(integer, fake, y)
    print(
        f"\ndigits ({len(y)} test images): logits max |int - sim| = {worst:g} LSB, {differing}/{total} differ; "
        f"per layer {flips}/{codes} codes differ\n"
        f"  top-1: FP32 {fidelity(ref, ref, y)['top1']:.4f}, fake-quant {f_fake['top1']:.4f}, integer {f_int['top1']:.4f}\n"
        f"  vs FP32: fake agreement {f_fake['agreement']:.4f} KL {f_fake['kl']:.5f}; "
        f"integer agreement {f_int['agreement']:.4f} KL {f_int['kl']:.5f}\n"
        f"  integer vs fake-quant: agreement {f_int_fake['agreement']:.4f} KL {f_int_fake['kl']:.2e}"
    )
    assert worst <= 1
    assert f_int["top1"] >= 0.95
    assert f_int_fake["agreement"] >= 0.99 and f_int_fake["kl"] < 1e-3  # measured 1.0 and 3e-6
    assert f_int["agreement"] >= f_fake["agreement"] - 0.01


# ---- a small mobile-style net: depthwise, ReLU6, mean, plain adds, shared pre-ReLU values -------


class _Mobile(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.side = nn.Conv2d(16, 16, 1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16, 7)

    def forward(self, x):
        x = self.stem(x)
        x = self.project(self.dw(x)) + x  # fused into project's requantization
        h = self.side(x)
        a = F.relu(h)  # h is also read unclamped below: a requantization with a clamp
        b = self.pool(h + a)  # a plain integer add
        return self.fc(b.mean([2, 3]))


def test_mobile_net_depthwise_relu6_plain_add():
    torch.manual_seed(0)
    model = randomize_batchnorm(_Mobile().eval(), seed=2)
    calib = [torch.randn(4, 3, 24, 24) for _ in range(2)]
    qmodel = mpq.quantize(model, calib, mpq.QuantConfig(avg_bits=7.0, **_FAST))  # extra points in the depthwise conv
    imodel = mpq.integer_only(qmodel, calib)
    kinds = {type(m).__name__ for m in imodel.body.modules()}
    assert {"IntegerConv2d", "IntegerLinear", "IntegerAdd", "IntegerMean"} <= kinds
    assert "IntegerRequant" in kinds or "IntegerClamp" in kinds
    assert imodel.body.dw_0.groups == 16 and imodel.body.dw_0.num_slabs > 0
    s = float(qmodel.project[0].act_qparams[0])
    assert imodel.body.dw_0.hi == min(255, round(6.0 / s))  # the ReLU6 clamp fused into the grid's range
    _check_model(imodel, qmodel, torch.randn(6, 3, 24, 24))


def test_small_cnn_dilated_depthwise_grouped():
    model = randomize_batchnorm(small_cnn())
    calib = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    qmodel = mpq.quantize(model, calib, mpq.QuantConfig(avg_bits=7.0, **_FAST))
    imodel = mpq.integer_only(qmodel, calib)
    grouped = [m for m in imodel.body.modules() if isinstance(m, IntegerConv2d) and m.groups > 1]
    assert {m.groups for m in grouped} == {16, 4} and all(m.num_slabs > 0 for m in grouped)
    _check_model(imodel, qmodel, torch.randn(8, 3, 16, 16))


# ---- errors -------------------------------------------------------------------------------------


def _tiny(*tail):
    return nn.Sequential(nn.Conv2d(3, 8, 3), *tail, nn.Flatten(), nn.LazyLinear(4)).eval()


def _quantized(model, cfg="W4A8"):
    calib = [torch.randn(2, 3, 8, 8)]
    with torch.no_grad():
        model(calib[0])  # materialise lazy layers
    return mpq.quantize(model, calib, mpq.QuantConfig.preset(cfg, **_FAST) if isinstance(cfg, str) else cfg), calib


def test_unsupported_node_is_named():
    q, calib = _quantized(_tiny(nn.GELU()))
    with pytest.raises(ValueError, match=r"unsupported node '_1' \(call_module '1' of type GELU\)"):
        mpq.integer_only(q, calib)


def test_unfolded_batchnorm_is_named():
    q, calib = _quantized(_tiny(nn.ReLU(), nn.BatchNorm2d(8)))
    with pytest.raises(ValueError, match=r"unsupported node '_2' \(call_module '2' of type BatchNorm2d\).*not folded"):
        mpq.integer_only(q, calib)


def test_float_activations_rejected():
    q, calib = _quantized(_tiny(nn.ReLU()), "W4A16")
    with pytest.raises(ValueError, match="float activations"):
        mpq.integer_only(q, calib)


def test_clamp_on_the_input_and_linear_only():
    model = nn.Sequential(nn.ReLU(), nn.Conv2d(3, 8, 3), nn.Hardtanh(-1.0, 2.0), nn.Flatten(), nn.LazyLinear(4))
    q, calib = _quantized(model.eval())
    imodel = mpq.integer_only(q, calib)
    assert isinstance(imodel.body.get_submodule("_0"), IntegerClamp)  # the entry grid is not a requantization
    _check_model(imodel, q, torch.randn(5, 3, 8, 8), tolerance=0.02)


def test_argument_errors():
    q, calib = _quantized(_tiny(nn.ReLU()))
    with pytest.raises(ValueError, match="no multipoint layer"):
        mpq.integer_only(nn.Sequential(nn.Linear(2, 2)), torch.randn(1, 2))
    with pytest.raises(ValueError, match="aux_range"):
        mpq.integer_only(q, calib, aux_range="max")
    with pytest.raises(ValueError, match="multiplier_bits"):
        mpq.integer_only(q, calib, multiplier_bits=63)
    with pytest.raises(TypeError, match="example_inputs"):
        mpq.integer_only(q, [torch.zeros(2, 3, 8, 8, dtype=torch.int64)])
