"""mpq::multipoint_linear_stored, path "weight_only" (csrc/kernels/weight_only_linear.h: the codes kept
packed, decoded in registers): element-wise agreement with the float64 reference op
(mpq::multipoint_linear on the unpacked codes) within the kernel's stated bound, on ATen's AVX-512, AVX2 and
default (scalar) paths, for 2-D and 3-D inputs, with and without bias and act_qparams; "auto" giving
the weight-only bytes where it picks that path; and the errors of a bad call."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mpq

pytestmark = pytest.mark.usefixtures("one_intraop_thread")

U = 2.0**-24  # float32 unit roundoff
# csrc/cpu/multipoint_stored.cpp, kWeightOnlyMaxRows: "auto" runs "weight_only" up to this many rows
# (when ATen runs its AVX-512 or AVX2 kernels).
WEIGHT_ONLY_MAX_ROWS = 8


def _stored(cin, cout, bits, points, seed):
    """A random stored weight: codes over the whole bit width, scales of both signs, 1..points
    points per channel and one channel without points (its output is the bias)."""
    g = torch.Generator().manual_seed(seed)
    K = 2 ** (bits - 1)
    codes = torch.randint(-K, K, (cout, points, cin), generator=g).to(torch.int8)
    scales = (torch.rand(cout, points, generator=g) - 0.5) * 0.04
    counts = torch.randint(1, points + 1, (cout,), generator=g).to(torch.int32)
    counts[min(1, cout - 1)] = 0
    point_codes, point_scales = mpq.ops.pack_points(codes, scales, counts, bits)
    bias = torch.randn(cout, generator=g)
    return point_codes, point_scales, counts, bias


def _input(shape, qp, seed):
    """Random input; with act_qparams (scale, zp, qmin, qmax) every value sits at least 0.15 of a
    step from a rounding boundary, so the kernel's float32 x / s and the float64 reference round alike."""
    g = torch.Generator().manual_seed(seed)
    if qp is None:
        return torch.randn(*shape, generator=g)
    s, zp, qmin, qmax = qp
    levels = torch.randint(int(qmin) - 2, int(qmax) + 3, shape, generator=g).double()
    offset = (torch.rand(*shape, generator=g, dtype=torch.float64) - 0.5) * 0.7
    return ((levels - zp + offset) * s).float()


def _fq64(x, qp):
    if qp is None:
        return x.double()
    s, zp, qmin, qmax = qp
    return ((torch.round(x.double() / s) + zp).clamp(qmin, qmax) - zp) * s


def _reference_and_bound(x, point_codes, point_scales, counts, bits, cin, bias, qp):
    """(the float64 reference op's output, the bound of weight_only_linear.h) for every element."""
    P = max(1, int(counts.max()))
    codes, scales = mpq.ops.unpack_points(point_codes, point_scales, counts, bits, cin, P)
    qparams = None if qp is None else torch.tensor(qp, dtype=torch.float32)
    ref = mpq.ops.multipoint_linear(x.double(), codes, scales, counts, bias, qparams)
    # S = |b| + sum_t |scale_t| sum_d |code_td| |fq(x)_d|, in float64.
    b_abs = bias.double().abs() if bias is not None else None
    S = mpq.ops.multipoint_linear(_fq64(x, qp).abs(), codes.abs(), scales.abs(), counts, b_abs, None)
    Pj = counts.long()
    n = torch.maximum(cin + 2 * Pj, Pj * ((cin + 15) // 16)).double() + 6
    return ref, (n * U / (1 - n * U)) * S + 1e-12 * S


def _run(x, w, bits, cin, bias, qp, path):
    point_codes, point_scales, counts = w
    qparams = None if qp is None else torch.tensor(qp, dtype=torch.float32)
    return mpq.ops.multipoint_linear_stored(x, point_codes, point_scales, counts, bits, cin, bias, qparams, path)


# (in_features, out_features): odd in_features (tails inside a 128-code block), whole blocks, MiniLM.
SHAPES = [(37, 11), (128, 20), (131, 9), (384, 64)]
# Activation grids: signed symmetric, unsigned 8-bit, 4-bit with a zero point; None: float input.
GRIDS = [None, (0.05, 0.0, -128.0, 127.0), (0.03, 0.0, 0.0, 255.0), (0.2, 3.0, 0.0, 15.0)]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: "float" if g is None else f"{g[2]:.0f}..{g[3]:.0f}")
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_weight_only_equals_the_float64_reference_within_the_bound(bits, shape, grid, with_bias):
    cin, cout = shape
    point_codes, point_scales, counts, bias = _stored(cin, cout, bits, 4, seed=cin + bits)
    bias = bias if with_bias else None
    for in_shape in [(1, cin), (5, cin), (17, cin), (2, 3, cin)]:  # 3-D: [batch, tokens, features]
        x = _input(in_shape, grid, seed=len(in_shape) * 100 + in_shape[0])
        with torch.no_grad():
            y = _run(x, (point_codes, point_scales, counts), bits, cin, bias, grid, "weight_only")
        ref, bound = _reference_and_bound(x, point_codes, point_scales, counts, bits, cin, bias, grid)
        assert y.dtype == torch.float32 and y.shape == (*in_shape[:-1], cout)
        err = (y.double() - ref).abs()
        assert bool((err <= bound).all()), float((err / bound).max())


@pytest.mark.parametrize("grid", [None, GRIDS[2]], ids=["float", "0..255"])
def test_auto_gives_the_weight_only_bytes_where_it_picks_it(grid):
    cin, cout, bits = 384, 96, 4
    point_codes, point_scales, counts, bias = _stored(cin, cout, bits, 2, seed=3)
    w = (point_codes, point_scales, counts)
    vector = torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX2")
    for rows in [1, 2, 4, 8, 9, 16, 32]:
        x = _input((rows, cin), grid, seed=rows)
        with torch.no_grad():
            auto = _run(x, w, bits, cin, bias, grid, "auto")
            # Beyond the bound (or on ATen's scalar path): "dense" (int8 wins only from 2^23 multiply-adds).
            picked = "weight_only" if vector and rows <= WEIGHT_ONLY_MAX_ROWS else "dense"
            assert torch.equal(auto, _run(x, w, bits, cin, bias, grid, picked)), (rows, picked)


def test_weight_only_follows_in_place_changes_of_the_weight():
    """The prepared layout is cached per weight: an in-place change of the scales is seen."""
    cin, cout, bits = 64, 16, 4
    point_codes, point_scales, counts, bias = _stored(cin, cout, bits, 2, seed=5)
    x = torch.randn(3, cin)
    w = (point_codes, point_scales, counts)
    with torch.no_grad():
        y0 = _run(x, w, bits, cin, None, None, "weight_only")
        point_scales.mul_(2.0)
        y1 = _run(x, w, bits, cin, None, None, "weight_only")
    assert torch.allclose(y1, 2 * y0, rtol=1e-5, atol=1e-6)


def test_weight_only_refuses_bad_calls_naming_the_op_and_argument():
    point_codes, point_scales, counts, bias = _stored(20, 6, 4, 2, seed=7)
    op = mpq.ops.multipoint_linear_stored
    with pytest.raises(
        RuntimeError, match=r'mpq::multipoint_linear_stored: expected path "auto", "int8", "dense" or "weight_only"'
    ):
        op(torch.randn(2, 20), point_codes, point_scales, counts, 4, 20, bias, None, "weight-only")
    with pytest.raises(RuntimeError, match=r"mpq::multipoint_linear_stored: expected input \[\.\.\., 20\]"):
        op(torch.randn(2, 21), point_codes, point_scales, counts, 4, 20, bias, None, "weight_only")
    with pytest.raises(RuntimeError, match=r"mpq::multipoint_linear_stored: expected as many stored points"):
        op(torch.randn(2, 20), point_codes, point_scales, counts + 1, 4, 20, bias, None, "weight_only")
    with pytest.raises(RuntimeError, match=r"mpq::multipoint_linear_stored: expected point_codes rows of"):
        op(torch.randn(2, 20), point_codes, point_scales, counts, 3, 20, bias, None, "weight_only")


_PATH_CHILD = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    import test_weight_only_linear as t
    assert torch.backends.cpu.get_cpu_capability() == sys.argv[2], torch.backends.cpu.get_cpu_capability()
    for bits in (3, 4, 6):
        for shape in t.SHAPES:
            for grid in (None, t.GRIDS[1]):
                t.test_weight_only_equals_the_float64_reference_within_the_bound(bits, shape, grid, True)
    t.test_auto_gives_the_weight_only_bytes_where_it_picks_it(None)
    print("ok")
    """
)


@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_weight_only_forced_paths_equal_the_float64_reference(isa):
    """ATEN_CPU_CAPABILITY=default runs the kernel's scalar path, =avx2 its AVX2 path (on an AVX-512
    machine too); each within the bound, and "auto" picking by that path's rule."""
    if isa == "avx2" and torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("this CPU has no AVX2")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": isa, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _PATH_CHILD, os.path.dirname(__file__), isa.upper()],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-3000:]
