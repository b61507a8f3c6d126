"""CUDA kernels (csrc/cuda/*.cu) against the CPU kernels (csrc/cpu/*.cpp).

Every test here needs a GPU and an mpq built with its CUDA kernels; without them the whole module
is skipped with the reason.
"""

import warnings

import pytest
import torch

import mpq

_CUDA = torch.cuda.is_available()
_KERNELS = bool(mpq.build_info().get("cuda_kernels", False))
pytestmark = [
    pytest.mark.skipif(not _CUDA, reason="torch.cuda.is_available() is False: no GPU (or a CPU-only torch)"),
    pytest.mark.skipif(_CUDA and not _KERNELS, reason="mpq was built without its CUDA kernels"),
]

ops = torch.ops.mpq


# float32 accumulation everywhere: no TF32 (cuDNN's float32 default), and no float16 / bfloat16
# partial sums in cuBLAS's split-K reductions (allowed by default), which the element-wise bounds
# (reference.multipoint_output_bound) do not allow for.
_FLOAT32_ACCUMULATION = [
    (torch.backends.cuda.matmul, "allow_tf32", False),
    (torch.backends.cudnn, "allow_tf32", False),
    (torch.backends.cuda.matmul, "allow_fp16_reduced_precision_reduction", False),
    (torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False),
]


@pytest.fixture(autouse=True)
def _no_tf32():
    """IEEE float32 accumulation in cuBLAS and cuDNN (see _FLOAT32_ACCUMULATION)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = [(obj, name, getattr(obj, name)) for obj, name, _ in _FLOAT32_ACCUMULATION if hasattr(obj, name)]
        for obj, name, value in _FLOAT32_ACCUMULATION:
            if hasattr(obj, name):
                setattr(obj, name, value)
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obj, name, value in saved:
            setattr(obj, name, value)


# ---- fit_multipoint ---------------------------------------------------------------------------


def _weight(C, D, dtype=torch.float32, seed=0):
    """Gaussian rows, and when there are enough rows: an all-zero row, a Laplace row with 15x
    outliers, rows scaled by 1e15 and 1e-15, a Gaussian row rounded to 1/64 (many duplicates)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    if C >= 6:
        w[1] = 0.0
        lap = torch.empty(D, dtype=torch.float64).exponential_(generator=g)
        lap *= torch.randint(0, 2, (D,), generator=g).double() * 2 - 1
        lap[::37] *= 15.0
        w[2] = lap
        w[3] *= 1e15
        w[4] *= 1e-15
        w[5] = torch.round(w[5] * 64) / 64
    return w.to(dtype)


def _assert_fit_matches_cpu(w, bits, max_points, exact):
    """Per row: points with identical codes have errors within 1e-5 relative (floor 1e-10 ||w_j||^2)
    and scales within 1e-6; at the first point whose codes differ the errors must still agree (an
    exact tie between candidates, e.g. proportional code vectors of a 2-element row, whose gains
    round differently in the CPU's sequential sweep and the kernel's block scan); after it the greedy
    fits go on from different but equally good residuals and are not compared. Ties are rare: at
    most 1% of the rows of D >= 8 (tests/cpp/test_kernel_emulation.cpp checks the same criterion on
    the kernels' source run on the CPU)."""
    c_ref, s_ref, e_ref = ops.fit_multipoint(w, bits, max_points, exact)
    out = ops.fit_multipoint(w.cuda(), bits, max_points, exact)
    for t, expected in zip(out, (c_ref, s_ref, e_ref)):
        assert t.device.type == "cuda"
        assert t.dtype == expected.dtype and t.shape == expected.shape
    c, s, e = (t.cpu() for t in out)
    C, P = s.shape
    if C == 0 or P == 0:
        return
    differs = (c != c_ref).any(-1)  # [C, P]
    first = torch.where(differs.any(1), differs.int().argmax(1), torch.full((C,), P))  # first tie, or P
    points = torch.arange(P)[None, :]
    norm2 = w.double().pow(2).sum(1, keepdim=True)
    tol = 1e-5 * e_ref.double().abs() + 1e-10 * norm2
    compared = points <= first[:, None]  # up to and including the tie
    ok = ((e.double() - e_ref.double()).abs() <= tol) | ~compared
    assert bool(ok.all()), (
        f"sq_errors differ beyond tolerance at (row, point) {ok.logical_not().nonzero()[:5].tolist()}"
    )
    same = points < first[:, None]
    torch.testing.assert_close(s[same], s_ref[same], rtol=1e-6, atol=0.0)
    if w.shape[1] >= 8:
        ties = int((first < P).sum())
        assert ties <= max(1, C // 100), f"{ties} of {C} rows met a tie"


FIT_SHAPES = [(1, 1), (1, 7), (5, 1), (6, 2), (7, 33), (9, 127), (32, 576), (6, 4608), (3, 12289)]


@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("shape", FIT_SHAPES, ids=[f"{c}x{d}" for c, d in FIT_SHAPES])
def test_fit_multipoint_matches_cpu(shape, bits, exact):
    # 576 and 4608: the residual in shared memory; 12289: in the global scratch (fast mode).
    _assert_fit_matches_cpu(_weight(*shape, seed=bits), bits, 4, exact)


@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
@pytest.mark.parametrize("shape", [(7, 1), (8, 300), (6, 5000)], ids=["7x1", "8x300", "6x5000"])
def test_fit_multipoint_float64_matches_cpu(shape, exact):
    _assert_fit_matches_cpu(_weight(*shape, dtype=torch.float64, seed=11), 4, 3, exact)


@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
@pytest.mark.parametrize("bits", [4, 6, 8])
def test_fit_multipoint_exact_ties(bits, exact):
    # Multiples of 1/4 up to ~3 are fitted exactly by several scales (1/4, 1/8, 1/12, ...) at high
    # bit widths: equal gains in exact arithmetic, so either kernel may take any of them (rounding
    # decides). Only the errors must agree, and each kernel's errors must match its own points.
    g = torch.Generator().manual_seed(bits)
    w = (torch.round(torch.randn(16, 127, generator=g, dtype=torch.float64) * 4) / 4).float()
    _, _, e_ref = ops.fit_multipoint(w, bits, 3, exact)
    codes, scales, errors = (t.cpu() for t in ops.fit_multipoint(w.cuda(), bits, 3, exact))
    norm2 = w.double().pow(2).sum(1, keepdim=True)
    torch.testing.assert_close(errors.double(), e_ref.double(), rtol=1e-5, atol=1e-10 * norm2.max().item())
    approx = (scales.double().unsqueeze(-1) * codes.double()).cumsum(1)
    own = (w.double().unsqueeze(1) - approx).pow(2).sum(-1)
    torch.testing.assert_close(errors.double(), own, rtol=1e-5, atol=1e-10 * norm2.max().item())


def test_fit_multipoint_many_rows_and_chunks():
    # Exact mode at 8 bits sorts rows in chunks of at most 2^24 breakpoints: 40 rows of 4608 at
    # 127 breakpoints each need two chunks.
    w = _weight(40, 4608, seed=3)
    _assert_fit_matches_cpu(w, 8, 2, True)
    _assert_fit_matches_cpu(torch.randn(3000, 27, generator=torch.Generator().manual_seed(4)), 4, 4, False)


def test_fit_multipoint_zero_rows_and_empty():
    w = torch.zeros(4, 10)
    codes, scales, errors = (t.cpu() for t in ops.fit_multipoint(w.cuda(), 4, 3, False))
    assert codes.eq(0).all() and scales.eq(0).all() and errors.eq(0).all()
    codes, scales, errors = ops.fit_multipoint(torch.zeros(0, 5, device="cuda"), 3, 2, True)
    assert codes.shape == (0, 2, 5) and scales.shape == (0, 2) and errors.shape == (0, 2)


@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
def test_fit_multipoint_error_never_increases(exact):
    w = torch.randn(64, 576, device="cuda")
    _, scales, errors = ops.fit_multipoint(w, 3, 6, exact)
    assert bool((errors[:, 1:] <= errors[:, :-1]).all())
    assert bool((errors[:, 0] < w.double().pow(2).sum(1).float()).all())


def test_fit_multipoint_non_contiguous_and_other_device_index():
    w = torch.randn(40, 33)
    got = ops.fit_multipoint(w.t().cuda(), 4, 2, False)  # [33, 40], non-contiguous
    ref = ops.fit_multipoint(w.t().contiguous(), 4, 2, False)
    assert bool((got[0].cpu() == ref[0]).all())
    if torch.cuda.device_count() > 1:
        dev = torch.device("cuda", 1)
        got1 = ops.fit_multipoint(w.t().to(dev), 4, 2, False)
        assert got1[0].device == dev and bool((got1[0].cpu() == ref[0]).all())


def test_fit_multipoint_rejects_bad_arguments_on_cuda():
    w = torch.randn(3, 8, device="cuda")
    with pytest.raises(RuntimeError, match="mpq::fit_multipoint: expected bits"):
        ops.fit_multipoint(w, 9, 2, False)
    with pytest.raises(RuntimeError, match="mpq::fit_multipoint: weight contains NaN"):
        ops.fit_multipoint(torch.full((2, 3), float("nan"), device="cuda"), 4, 2, True)
    with pytest.raises(RuntimeError, match=r"mpq::fit_multipoint: expected every row of weight to have a squared norm"):
        ops.fit_multipoint(torch.full((2, 16), 1e20, device="cuda"), 4, 2, False)


# ---- layers -----------------------------------------------------------------------------------


def _multipoint(C, P, inner, seed=0, bits=4):
    g = torch.Generator().manual_seed(seed)
    K = 2 ** (bits - 1) - 1
    codes = torch.randint(-K, K + 1, (C, P, *inner), generator=g, dtype=torch.int8)
    scales = torch.rand(C, P, generator=g) * 0.1 + 0.01
    num_points = torch.randint(0, P + 1, (C,), generator=g, dtype=torch.int32)
    return codes, scales, num_points


def _cuda(*tensors):
    return tuple(None if t is None else t.cuda() for t in tensors)


def _assert_close(got, ref):
    assert got.device.type == "cuda"
    got = got.cpu()
    scale = max(ref.abs().max().item(), 1.0) if ref.numel() else 1.0
    tol = 1e-10 if ref.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("inner", [(1,), (5,), (33,), (3, 3, 3), (7, 1, 1)])
def test_dequantize_matches_cpu(inner, dtype):
    codes, scales, num_points = _multipoint(9, 4, inner, seed=len(inner))
    ref = ops.dequantize_multipoint(codes, scales, num_points, dtype)
    got = ops.dequantize_multipoint(*_cuda(codes, scales, num_points), dtype)
    assert got.dtype == dtype and got.shape == ref.shape
    torch.testing.assert_close(got.cpu(), ref)


def test_dequantize_clamps_num_points_on_cuda():
    # num_points is range-checked on the CPU only (a device check would sync): counts are clamped.
    codes, scales, _ = _multipoint(3, 2, (6,))
    got = ops.dequantize_multipoint(*_cuda(codes, scales, torch.tensor([5, -1, 2], dtype=torch.int32)), torch.float64)
    ref = ops.dequantize_multipoint(codes, scales, torch.tensor([2, 0, 2], dtype=torch.int32), torch.float64)
    torch.testing.assert_close(got.cpu(), ref)


def _act_qparams(x, where):
    if where is None:
        return None
    scale = (x.abs().max().item() if x.numel() else 1.0) / 100.0 or 0.01
    qp = torch.tensor([scale, 3.0, -128.0, 127.0], dtype=torch.float32)
    return qp if where == "cpu" else qp.cuda()


# name: (shape of the tensor drawn, view taken of it on each device)
LINEAR_INPUTS = {
    "M1": ((1, 7), None),
    "odd": ((3, 33), None),
    "batched": ((2, 3, 64), None),
    "vector": ((65,), None),
    "transposed": ((31, 5), lambda t: t.t()),  # dense, not contiguous
    "strided": ((4, 62), lambda t: t[:, ::2]),  # not dense
    "empty": ((0, 9), None),
}


@pytest.mark.parametrize("act", [None, "cpu", "cuda"], ids=["float_act", "qparams_cpu", "qparams_cuda"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(LINEAR_INPUTS))
def test_multipoint_linear_matches_cpu(case, dtype, with_bias, act):
    shape, view = LINEAR_INPUTS[case]
    base = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    view = view or (lambda t: t)
    x, x_cuda = view(base), view(base.cuda())
    N = 13 if case != "vector" else 1
    codes, scales, num_points = _multipoint(N, 3, (x.shape[-1],), seed=N)
    bias = torch.randn(N, dtype=dtype) if with_bias else None
    qp = _act_qparams(x, act)
    ref = ops.multipoint_linear(x, codes, scales, num_points, bias, None if qp is None else qp.cpu())
    got = ops.multipoint_linear(x_cuda, *_cuda(codes, scales, num_points, bias), qp)
    assert got.dtype == dtype and got.shape == ref.shape
    _assert_close(got, ref)


CONV_CASES = {
    # name: (N, C_in, H, W, C_out, kh, kw, stride, padding, dilation, groups)
    "batch1": (1, 3, 9, 11, 8, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    "groups": (2, 8, 10, 10, 12, 3, 3, (2, 2), (1, 0), (1, 1), 4),
    "depthwise_dilated": (2, 6, 9, 9, 6, 3, 3, (1, 1), (2, 2), (2, 2), 6),
    "pointwise_strided": (3, 5, 7, 8, 7, 1, 1, (1, 2), (0, 0), (1, 1), 1),
    "odd_kernel": (1, 4, 12, 12, 4, 5, 3, (3, 2), (2, 1), (1, 2), 2),
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("act", [None, "cpu", "cuda"], ids=["float_act", "qparams_cpu", "qparams_cuda"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_multipoint_conv2d_matches_cpu(case, dtype, act, channels_last):
    N, Cin, H, W, Cout, kh, kw, stride, padding, dilation, groups = CONV_CASES[case]
    torch.manual_seed(1)
    x = torch.randn(N, Cin, H, W, dtype=dtype)
    codes, scales, num_points = _multipoint(Cout, 2, (Cin // groups, kh, kw), seed=Cout)
    bias = torch.randn(Cout, dtype=dtype)
    qp = _act_qparams(x, act)
    args = (list(stride), list(padding), list(dilation), groups)
    ref = ops.multipoint_conv2d(x, codes, scales, num_points, bias, None if qp is None else qp.cpu(), *args)
    x_cuda = x.cuda()
    if channels_last:
        x_cuda = x_cuda.to(memory_format=torch.channels_last)
    got = ops.multipoint_conv2d(x_cuda, *_cuda(codes, scales, num_points, bias), qp, *args)
    assert got.dtype == dtype and got.shape == ref.shape
    _assert_close(got, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_fake_quantization_matches_cpu(dtype):
    # Each step of the CPU's fake quantization rounds to the tensor's dtype, and so does the kernel.
    # An identity weight (one point, one code of 1 per channel) makes the layer return fq(x) exactly.
    x = (torch.randn(4, 64) * 3).to(dtype)
    eye_codes = torch.zeros(64, 1, 64, dtype=torch.int8)
    eye_codes[torch.arange(64), 0, torch.arange(64)] = 1
    eye = (eye_codes, torch.ones(64, 1), torch.ones(64, dtype=torch.int32))
    qp = _act_qparams(x.float(), "cpu")
    ref = ops.multipoint_linear(x, *eye, None, qp)
    got = ops.multipoint_linear(x.cuda(), *_cuda(*eye), None, qp.cuda())
    assert got.dtype == dtype
    torch.testing.assert_close(got.cpu(), ref, rtol=0.0, atol=0.0)


def test_invalid_act_qparams():
    x = torch.randn(2, 8, device="cuda")
    codes, scales, num_points = _cuda(*_multipoint(3, 2, (8,)))
    bad = torch.tensor([0.0, 0.0, -128.0, 127.0])
    with pytest.raises(RuntimeError, match=r"mpq::multipoint_linear: expected act_qparams with a finite scale > 0"):
        ops.multipoint_linear(x, codes, scales, num_points, None, bad)
    # On the device they cannot be checked without a sync: the output is NaN instead.
    out = ops.multipoint_linear(x, codes, scales, num_points, None, bad.cuda())
    assert bool(out.isnan().all())


def test_layer_ops_reject_mixed_devices():
    codes, scales, num_points = _cuda(*_multipoint(3, 2, (8,)))
    with pytest.raises(RuntimeError, match="mpq::multipoint_linear: .*input"):
        ops.multipoint_linear(torch.randn(2, 8), codes, scales, num_points, None, None)
    with pytest.raises(RuntimeError, match="mpq::multipoint_linear: .*codes, scales and num_points on one device"):
        ops.multipoint_linear(torch.randn(2, 8, device="cuda"), codes, scales.cpu(), num_points, None, None)
    codes5, scales5, np5 = _cuda(*_multipoint(4, 2, (2, 3, 3)))
    with pytest.raises(RuntimeError, match="mpq::multipoint_conv2d: .*input"):
        ops.multipoint_conv2d(torch.randn(1, 2, 5, 5), codes5, scales5, np5, None, None, [1, 1], [0, 0], [1, 1], 1)


# ---- opcheck ----------------------------------------------------------------------------------


def test_opcheck_fit_multipoint():
    w = torch.randn(5, 19, device="cuda")
    torch.library.opcheck(ops.fit_multipoint.default, (w, 4, 3, False))
    torch.library.opcheck(ops.fit_multipoint.default, (w.double(), 3, 2, True))


def test_opcheck_dequantize_multipoint():
    codes, scales, num_points = _cuda(*_multipoint(6, 3, (4, 3, 3)))
    torch.library.opcheck(ops.dequantize_multipoint.default, (codes, scales, num_points, torch.float32))
    torch.library.opcheck(ops.dequantize_multipoint.default, (codes, scales, num_points, torch.float16))


def test_opcheck_multipoint_linear():
    codes, scales, num_points = _cuda(*_multipoint(6, 3, (10,)))
    x = torch.randn(4, 10, device="cuda")
    qp = _act_qparams(x, "cuda")
    torch.library.opcheck(
        ops.multipoint_linear.default, (x, codes, scales, num_points, torch.randn(6, device="cuda"), qp)
    )
    torch.library.opcheck(ops.multipoint_linear.default, (x, codes, scales, num_points, None, None))


def test_opcheck_multipoint_conv2d():
    codes, scales, num_points = _cuda(*_multipoint(8, 2, (2, 3, 3)))
    x = torch.randn(2, 4, 7, 7, device="cuda")
    qp = _act_qparams(x, "cuda")
    args = (x, codes, scales, num_points, torch.randn(8, device="cuda"), qp, [1, 2], [1, 1], [1, 1], 2)
    torch.library.opcheck(ops.multipoint_conv2d.default, args)


# ---- the packed weight (csrc/cuda/multipoint_packed.cu) ---------------------------------------
# Every kernel of mpq::multipoint_linear_packed against the CPU packed op (which equals
# mpq::multipoint_linear bit for bit) and the float64 reference: element by element within
# reference.multipoint_output_bound (the worst case of float32 accumulation and the input dtype's
# roundings: one wrong output among millions fails), and by ||out - ref|| / ||ref||.

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference as ref  # noqa: E402

# ||out - ref|| / ||ref|| bounds: fp16 / bf16 operands with float32 accumulation, and float32.
REL_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2, torch.float32: 1e-5}
PACKED_ACT = {
    "int8": (0.05, 0.0, -128.0, 127.0),
    "uint8": (0.02, 128.0, 0.0, 255.0),
    "uint4": (0.15, 3.0, 0.0, 15.0),
}


def _packed_weight(C, P, D, w_bits, seed):
    """codes over the whole storage range, scales over two decades, mixed counts with a 0 and a P."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-8, 8) if w_bits <= 4 else (-(1 << (w_bits - 1)), 1 << (w_bits - 1))
    codes = torch.randint(lo, hi, (C, P, D), generator=g, dtype=torch.int8)
    scales = ((torch.rand(C, P, generator=g) * 4 - 2).exp() * 0.05).float()
    num_points = torch.randint(0, P + 1, (C,), generator=g, dtype=torch.int32)
    if C >= 2:
        num_points[0], num_points[-1] = 0, P
    return codes, scales, num_points


def _poison(numel, dtype):
    """Leaves a NaN-filled block in the caching allocator, which the next output of that size
    reuses: an element the kernel never writes stays NaN."""
    t = torch.full((max(numel, 1),), float("nan"), dtype=dtype, device="cuda")
    del t


def _rel_err(got, want):
    got, want = got.double().cpu(), want.double().cpu()
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def _assert_elementwise(got, want64, bound, want_cpu=None):
    """Every output within the bound of the float64 reference; the CPU kernel's output, itself
    within the bound, within twice of it."""
    ref.assert_within_bound(got, want64, bound, "CUDA vs float64")
    if want_cpu is not None:
        ref.assert_within_bound(got, want_cpu.double(), 2 * bound, "CUDA vs CPU")


# (M, C, P, D): M = 1 and 16 (gemv), 17..200 (mma); odd C and D, D not a multiple of 64, one tile
# with a long K (K split across CTAs: the workspace and finalize path), many tiles.
PACKED_CASES = [
    (1, 70, 3, 37),
    (1, 64, 1, 4096),
    (16, 130, 2, 100),
    (5, 257, 4, 65),
    (17, 65, 4, 1029),
    (130, 300, 2, 300),
    (1, 1000, 2, 2048),
    (16, 64, 2, 8192),
]


@pytest.mark.parametrize("kernel", ["auto", "gemv", "mma", "dense"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("w_bits", [4, 8])
@pytest.mark.parametrize("case", PACKED_CASES, ids=[f"M{m}_C{c}_P{p}_D{d}" for m, c, p, d in PACKED_CASES])
def test_packed_weight_only_matches_cpu_and_reference(case, w_bits, dtype, kernel):
    M, C, P, D = case
    codes, scales, num_points = _packed_weight(C, P, D, w_bits, seed=M + C + D)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, D, generator=g).to(dtype)
    bias = torch.randn(C, generator=g)
    packed = ops.pack_multipoint(codes, scales, num_points, w_bits)
    want_cpu = ops.multipoint_linear_packed(x, *packed, C, bias, None, kernel)
    want64, bound = ref.multipoint_output_bound(x, codes, scales, num_points, bias, None)
    _poison(M * C, dtype)
    got = ops.multipoint_linear_packed(x.cuda(), *_cuda(*packed), C, bias.cuda(), None, kernel)
    assert got.device.type == "cuda" and got.dtype == dtype and got.shape == (M, C)
    assert not bool(got.isnan().any()), "unwritten (NaN-poisoned) or NaN outputs"
    _assert_elementwise(got, want64, bound, want_cpu)
    assert _rel_err(got, want64) <= REL_TOL[dtype]
    assert _rel_err(got, want_cpu) <= 2 * REL_TOL[dtype]


@pytest.mark.parametrize("where", ["cpu", "cuda"], ids=["qparams_cpu", "qparams_cuda"])
@pytest.mark.parametrize("act", list(PACKED_ACT))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("w_bits", [4, 8])
@pytest.mark.parametrize("case", PACKED_CASES, ids=[f"M{m}_C{c}_P{p}_D{d}" for m, c, p, d in PACKED_CASES])
def test_packed_int8_matches_cpu_and_reference(case, w_bits, dtype, act, where):
    M, C, P, D = case
    codes, scales, num_points = _packed_weight(C, P, D, w_bits, seed=M * C + D)
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(M, D, generator=g) * 2).to(dtype)
    bias = torch.randn(C, generator=g)
    qp = torch.tensor(PACKED_ACT[act], dtype=torch.float32)
    packed = ops.pack_multipoint(codes, scales, num_points, w_bits)
    want_cpu = ops.multipoint_linear_packed(x, *packed, C, bias, qp, "int8")
    want64, bound = ref.multipoint_output_bound(x, codes, scales, num_points, bias, qp, int8_levels=True)
    _poison(M * C, dtype)
    got = ops.multipoint_linear_packed(
        x.cuda(), *_cuda(*packed), C, bias.cuda(), qp if where == "cpu" else qp.cuda(), "int8"
    )
    assert got.dtype == dtype and got.shape == (M, C)
    assert not bool(got.isnan().any())
    _assert_elementwise(got, want64, bound, want_cpu)
    # The int8 kernel's dot products are exact; the CPU rounds fq(x) to the input dtype first.
    tol = max(REL_TOL[dtype], 1e-4)
    assert _rel_err(got, want_cpu) <= 2 * tol
    assert _rel_err(got, want64) <= 2 * tol


def test_packed_int8_invalid_qparams_on_device_give_nan():
    codes, scales, num_points = _packed_weight(70, 3, 37, 4, seed=3)
    packed = _cuda(*ops.pack_multipoint(codes, scales, num_points, 4))
    x = torch.randn(3, 37, device="cuda").half()
    for bad in ([0.0, 0.0, -128.0, 127.0], [0.1, 0.0, -1000.0, 1000.0], [0.1, 0.5, -128.0, 127.0]):
        out = ops.multipoint_linear_packed(x, *packed, 70, None, torch.tensor(bad, device="cuda"), "int8")
        assert bool(out.isnan().all())
    with pytest.raises(
        RuntimeError, match="mpq::multipoint_linear_packed: kernel 'int8' expects act_qparams with integer"
    ):
        ops.multipoint_linear_packed(x, *packed, 70, None, torch.tensor([0.1, 0.0, -1000.0, 1000.0]), "int8")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", [None, "uint8"])
def test_packed_dense_equals_the_generic_path(dtype, act):
    # The dense decode sums the points as the generic dequantize does: the same weight, the same GEMM.
    codes, scales, num_points = _packed_weight(130, 3, 100, 4, seed=4)
    x = torch.randn(9, 100, dtype=dtype, device="cuda")
    bias = torch.randn(130, dtype=dtype, device="cuda")
    qp = None if act is None else torch.tensor(PACKED_ACT[act], device="cuda")
    packed = _cuda(*ops.pack_multipoint(codes, scales, num_points, 4))
    got = ops.multipoint_linear_packed(x, *packed, 130, bias, qp)
    want = ops.multipoint_linear(x, *_cuda(codes, scales, num_points), bias, qp)
    assert torch.equal(got, want)


def test_packed_empty_and_batched_shapes():
    codes, scales, num_points = _packed_weight(70, 2, 37, 4, seed=5)
    packed = ops.pack_multipoint(codes, scales, num_points, 4)
    packed_cuda = _cuda(*packed)
    for shape in [(0, 37), (2, 3, 37), (37,)]:
        x = torch.randn(shape).half()
        got = ops.multipoint_linear_packed(x.cuda(), *packed_cuda, 70)
        want = ops.multipoint_linear_packed(x, *packed, 70)
        assert got.shape == want.shape
        if want.numel():
            want64, bound = ref.multipoint_output_bound(x, codes, scales, num_points)
            _assert_elementwise(got, want64, bound, want)
            assert _rel_err(got, want) <= 2 * REL_TOL[torch.float16]


def test_pack_and_unpack_on_cuda_match_cpu():
    codes, scales, num_points = _packed_weight(200, 4, 70, 4, seed=6)
    want = ops.pack_multipoint(codes, scales, num_points, 4)
    got = ops.pack_multipoint(*_cuda(codes, scales, num_points), 4)
    for g_, w_ in zip(got, want):
        assert g_.device.type == "cuda" and torch.equal(g_.cpu(), w_)
    unpacked = ops.unpack_multipoint(*got[:4], 200, 70, 4)
    assert torch.equal(unpacked[2].cpu(), num_points)


def test_opcheck_packed_ops():
    codes, scales, num_points = _packed_weight(70, 3, 37, 4, seed=7)
    cuda = _cuda(codes, scales, num_points)
    torch.library.opcheck(ops.pack_multipoint.default, (*cuda, 4))
    packed = ops.pack_multipoint(*cuda, 4)
    torch.library.opcheck(ops.unpack_multipoint.default, (*packed[:4], 70, 37, 3))
    x = torch.randn(3, 37, device="cuda").half()
    qp = torch.tensor(PACKED_ACT["uint8"], device="cuda")
    for kernel, act in [("auto", None), ("gemv", None), ("mma", qp), ("int8", qp), ("dense", None)]:
        torch.library.opcheck(
            ops.multipoint_linear_packed.default, (x, *packed, 70, torch.randn(70, device="cuda"), act, kernel)
        )


def test_multipoint_linear_module_uses_the_packed_path_on_cuda():
    from mpq.nn import MultipointLinear

    codes, scales, num_points = _packed_weight(300, 2, 300, 4, seed=8)
    for act in [None, (0.05, 0, -128, 127)]:
        m = MultipointLinear(300, 300, 2, 4)
        m.set_weight(codes, scales, num_points, torch.randn(300))
        if act is not None:
            m.set_act_qparams(*act)
        x = torch.randn(5, 300)
        want = m(x.half())  # CPU: mpq::multipoint_linear
        m = m.cuda()
        got = m(x.cuda().half())
        assert m.tile_offsets.numel() > 1 and m.packed.is_cuda
        assert m.packed_kernel == ("auto" if act is None else "int8")
        assert _rel_err(got, want) <= 2 * REL_TOL[torch.float16]
        assert set(m.state_dict()) == {"codes", "scales", "num_points", "bias"} | ({"act_qparams"} if act else set())
        # float32 input keeps the unpacked op on the GPU
        torch.testing.assert_close(m(x.cuda()).cpu(), m.cpu()(x), rtol=1e-5, atol=1e-5)


# ---- empty weights, conv2d geometry, non-finite scales (the CPU side: test_bad_inputs.py) ------


def test_zero_channels_and_zero_points_match_cpu():
    """C = 0: empty outputs; P = 0: the zero weight (the layers return the bias), as on the CPU."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64)
    image = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    bias = torch.randn(4, generator=g, dtype=torch.float64)
    conv = ([2, 1], [1, 0], [1, 1], 1)
    for C, P in [(0, 2), (4, 0), (0, 0)]:
        scales, n = torch.rand(C, P, generator=g), torch.full((C,), P, dtype=torch.int32)
        for inner in [(6,), (3, 3, 3)]:
            codes = torch.ones(C, P, *inner, dtype=torch.int8)
            ref = ops.dequantize_multipoint(codes, scales, n, torch.float32)
            got = ops.dequantize_multipoint(*_cuda(codes, scales, n), torch.float32)
            assert got.device.type == "cuda" and got.shape == ref.shape and torch.equal(got.cpu(), ref)
        codes = torch.ones(C, P, 6, dtype=torch.int8)
        for b in (None, bias[:C]):
            ref = ops.multipoint_linear(x, codes, scales, n, b, None)
            got = ops.multipoint_linear(*_cuda(x, codes, scales, n, b), None)
            assert got.shape == ref.shape and torch.equal(got.cpu(), ref)
            codes5 = torch.ones(C, P, 3, 3, 3, dtype=torch.int8)
            ref = ops.multipoint_conv2d(image, codes5, scales, n, b, None, *conv)
            got = ops.multipoint_conv2d(*_cuda(image, codes5, scales, n, b), None, *conv)
            assert got.shape == ref.shape == (2, C, 3, 4) and torch.equal(got.cpu(), ref)


@pytest.mark.parametrize("kernel", ["auto", "dense", "gemv", "mma", "int8"])
def test_packed_linear_with_zero_channels_or_points_matches_cpu(kernel):
    x = torch.randn(3, 37).half()
    bias = torch.randn(70)
    qp = torch.tensor(PACKED_ACT["int8"])
    for C, P in [(0, 2), (70, 0)]:
        codes, scales = torch.ones(C, P, 37, dtype=torch.int8), torch.rand(C, P)
        packed = ops.pack_multipoint(codes, scales, torch.full((C,), P, dtype=torch.int32), 4)
        want = ops.multipoint_linear_packed(x, *packed, C, bias[:C], qp)
        got = ops.multipoint_linear_packed(x.cuda(), *_cuda(*packed), C, bias[:C].cuda(), qp.cuda(), kernel)
        assert got.shape == want.shape == (3, C) and torch.equal(got.cpu(), want)


def test_conv2d_geometry_is_refused_on_cuda_as_on_cpu():
    codes, scales, n = _cuda(*_multipoint(4, 2, (3, 3, 3)))
    for x, pattern in [
        (torch.randn(2, 3, 2, 2), r"padded size 2 < dilated kernel size 3 in dimension 2"),
        (torch.randn(2, 3, 6, 0), r"with H, W >= 1"),
    ]:
        with pytest.raises(
            RuntimeError, match=r"^mpq::multipoint_conv2d: expected input \[N, C_in, H, W\] .*" + pattern
        ):
            ops.multipoint_conv2d(x.cuda(), codes, scales, n, None, None, [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match=r"^mpq::multipoint_conv2d: expected codes .* kernel of at least 1 x 1"):
        ops.multipoint_conv2d(
            torch.randn(2, 3, 6, 6, device="cuda"), codes[:, :, :, :0], scales, n, None, None, [1, 1], [0, 0], [1, 1], 1
        )


def test_non_finite_scales_propagate_on_cuda():
    """Not checked on CUDA: reading the scales would sync the device (csrc/checks.h). A NaN scale
    of a point in use makes its channel's weight and outputs NaN; the other channels are exact.
    The CPU kernels refuse it (test_bad_inputs.py::test_non_finite_scales_are_refused_on_cpu)."""
    codes, scales, _ = _multipoint(4, 2, (6,))
    n = torch.full((4,), 2, dtype=torch.int32)
    bad = scales.clone()
    bad[1, 0] = float("nan")
    w = ops.dequantize_multipoint(*_cuda(codes, bad, n), torch.float64).cpu()
    assert bool(w[1].isnan().all())
    keep = [0, 2, 3]
    torch.testing.assert_close(w[keep], ops.dequantize_multipoint(codes, scales, n, torch.float64)[keep])
    y = ops.multipoint_linear(torch.randn(3, 6, device="cuda"), *_cuda(codes, bad, n), None, None).cpu()
    assert bool(y[:, 1].isnan().all()) and bool(torch.isfinite(y[:, keep]).all())


# ---- the packed conv2d: implicit GEMM on NHWC (csrc/cuda/multipoint_packed.cu, ConvWeightOnly / ConvInt8)
# Every kernel of mpq::multipoint_conv2d_packed against the CPU packed op (which equals
# mpq::multipoint_conv2d bit for bit) and the float64 reference, outputs poisoned first.

# (N, C_in, H, W, C_out, kh, kw, stride, padding, dilation, groups): batch 1, odd C (scalar loads),
# 1x1, stride 2, dilation, groups of 16 and 32 channels, rectangular kernels, a kernel larger than
# the image, C_out not a multiple of 64, many output rows (M > 65535 / 128 blocks loop), depthwise.
PACKED_CONV_CASES = [
    (1, 3, 17, 15, 40, 7, 7, (2, 2), (3, 3), (1, 1), 1),
    (2, 32, 9, 9, 64, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    (1, 64, 14, 14, 70, 1, 1, (1, 1), (0, 0), (1, 1), 1),
    (3, 48, 11, 10, 130, 3, 3, (2, 2), (1, 1), (1, 1), 1),
    (1, 64, 8, 8, 128, 3, 3, (1, 1), (2, 2), (2, 2), 2),
    (2, 48, 5, 6, 192, 3, 2, (2, 1), (1, 0), (1, 2), 3),
    (1, 16, 3, 3, 16, 7, 7, (1, 1), (3, 3), (1, 1), 1),
    (1, 6, 9, 9, 6, 3, 3, (1, 1), (1, 1), (1, 1), 6),
    (1, 5, 6, 7, 9, 2, 3, (1, 1), (0, 1), (1, 1), 1),
    (64, 16, 34, 34, 64, 3, 3, (1, 1), (1, 1), (1, 1), 1),
]
PACKED_CONV_IDS = [
    f"N{c[0]}_C{c[1]}_{c[2]}x{c[3]}_O{c[4]}_k{c[5]}x{c[6]}_s{c[7][0]}_g{c[10]}" for c in PACKED_CONV_CASES
]


def _packed_conv(case, w_bits, seed):
    N, C, H, W, O, kh, kw, stride, padding, dilation, groups = case
    codes, scales, num_points = _packed_weight(O, 3, C // groups * kh * kw, w_bits, seed)
    codes = codes.view(O, 3, C // groups, kh, kw)
    packed = ops.pack_multipoint(mpq.ops.conv_codes_nhwc(codes), scales, num_points, w_bits, groups)
    geometry = ([kh, kw], list(stride), list(padding), list(dilation), groups)
    return codes, scales, num_points, packed, geometry


def _conv_call(x, packed, O, geometry, bias, qp, kernel):
    kernel_size, stride, padding, dilation, groups = geometry
    return ops.multipoint_conv2d_packed(x, *packed, O, kernel_size, bias, qp, stride, padding, dilation, groups, kernel)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("kernel", ["auto", "igemm", "dense"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("w_bits", [4, 8])
@pytest.mark.parametrize("case", PACKED_CONV_CASES, ids=PACKED_CONV_IDS)
def test_packed_conv2d_weight_only_matches_cpu_and_reference(case, w_bits, dtype, kernel, channels_last):
    N, C, H, W, O = case[:5]
    codes, scales, num_points, packed, geometry = _packed_conv(case, w_bits, seed=C * O + w_bits)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(N, C, H, W, generator=g).to(dtype)
    bias = torch.randn(O, generator=g)
    want64, bound = ref.multipoint_output_bound(x, codes, scales, num_points, bias, None, conv=geometry[1:])
    want_cpu = _conv_call(x.float(), packed, O, geometry, bias, None, "auto")
    xc = x.cuda()
    if channels_last:
        xc = xc.to(memory_format=torch.channels_last)
    _poison(want64.numel(), dtype)
    got = _conv_call(xc, _cuda(*packed), O, geometry, bias.cuda(), None, kernel)
    assert got.dtype == dtype and got.shape == want64.shape
    if kernel != "dense":  # the fused kernels write NHWC and return the input's layout
        assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert not bool(got.isnan().any()), "unwritten (NaN-poisoned) or NaN outputs"
    if kernel != "dense":  # "dense" is cuDNN's, whose Winograd / FFT algorithms are no dot products
        _assert_elementwise(got, want64, bound, want_cpu)
    assert _rel_err(got, want64) <= REL_TOL[dtype]
    assert _rel_err(got, want_cpu) <= 2 * REL_TOL[dtype]


@pytest.mark.parametrize("where", ["cpu", "cuda"], ids=["qparams_cpu", "qparams_cuda"])
@pytest.mark.parametrize("act", list(PACKED_ACT))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("w_bits", [4, 8])
@pytest.mark.parametrize(
    "case",
    [c for c in PACKED_CONV_CASES if (c[1] // c[10]) % 16 == 0],
    ids=[i for c, i in zip(PACKED_CONV_CASES, PACKED_CONV_IDS) if (c[1] // c[10]) % 16 == 0],
)
def test_packed_conv2d_int8_matches_cpu_and_reference(case, w_bits, dtype, act, where):
    N, C, H, W, O = case[:5]
    codes, scales, num_points, packed, geometry = _packed_conv(case, w_bits, seed=C + O * w_bits)
    g = torch.Generator().manual_seed(12)
    x = (torch.randn(N, C, H, W, generator=g) * 2).to(dtype)
    bias = torch.randn(O, generator=g)
    qp = torch.tensor(PACKED_ACT[act], dtype=torch.float32)
    want64, bound = ref.multipoint_output_bound(
        x, codes, scales, num_points, bias, qp, conv=geometry[1:], int8_levels=True
    )
    want_cpu = _conv_call(x, packed, O, geometry, bias, qp, "int8")
    _poison(want64.numel(), dtype)
    got = _conv_call(x.cuda(), _cuda(*packed), O, geometry, bias.cuda(), qp if where == "cpu" else qp.cuda(), "int8")
    assert got.dtype == dtype and got.shape == want64.shape
    assert not bool(got.isnan().any())
    _assert_elementwise(got, want64, bound, want_cpu)
    # Exact int32 dot products with the level of 0 in the padding; the CPU rounds fq(x) to the dtype.
    tol = max(REL_TOL[dtype], 1e-4)
    assert _rel_err(got, want_cpu) <= 2 * tol
    assert _rel_err(got, want64) <= 2 * tol


def test_packed_conv2d_auto_picks_int8_only_where_it_fits():
    # C_in / groups = 32 and host qparams: int8 (exact integer products); 5 channels: igemm on fq(x).
    for case in (PACKED_CONV_CASES[1], PACKED_CONV_CASES[8]):
        N, C, H, W, O = case[:5]
        codes, scales, num_points, packed, geometry = _packed_conv(case, 4, seed=13)
        x = torch.randn(N, C, H, W).half()
        qp = torch.tensor(PACKED_ACT["uint8"])
        int8 = (C // geometry[4]) % 16 == 0  # what auto picks here (host qparams with 256 levels)
        want64, bound = ref.multipoint_output_bound(
            x, codes, scales, num_points, None, qp, conv=geometry[1:], int8_levels=int8
        )
        got = _conv_call(x.cuda(), _cuda(*packed), O, geometry, None, qp, "auto")
        _assert_elementwise(got, want64, bound)
        assert _rel_err(got, want64) <= 2 * REL_TOL[torch.float16]
    with pytest.raises(
        RuntimeError, match="mpq::multipoint_conv2d_packed: kernel 'int8' expects input channels per group"
    ):
        _conv_call(x.cuda(), _cuda(*packed), O, geometry, None, qp, "int8")


def test_packed_conv2d_int8_zero_point_outside_the_levels_gives_nan_on_device():
    case = PACKED_CONV_CASES[1]
    codes, scales, num_points, packed, geometry = _packed_conv(case, 4, seed=14)
    x = torch.randn(2, 32, 9, 9, device="cuda").half()
    # zero point above qmax: representable for the linear kernel, not as the conv's padding level
    bad = torch.tensor([0.05, 400.0, 0.0, 255.0], device="cuda")
    assert bool(_conv_call(x, _cuda(*packed), 64, geometry, None, bad, "int8").isnan().all())
    with pytest.raises(RuntimeError, match="qmin <= zero_point <= qmin \\+ 255"):
        _conv_call(x, _cuda(*packed), 64, geometry, None, bad.cpu(), "int8")


def test_opcheck_packed_conv2d_on_cuda():
    case = PACKED_CONV_CASES[4]
    codes, scales, num_points, packed, geometry = _packed_conv(case, 4, seed=15)
    packed = _cuda(*packed)
    x = torch.randn(1, 64, 8, 8, device="cuda").half()
    qp = torch.tensor(PACKED_ACT["uint8"], device="cuda")
    kernel_size, stride, padding, dilation, groups = geometry
    for kernel, act in [("auto", None), ("igemm", qp), ("int8", qp), ("dense", None)]:
        torch.library.opcheck(
            ops.multipoint_conv2d_packed.default,
            (
                x,
                *packed,
                128,
                kernel_size,
                torch.randn(128, device="cuda"),
                act,
                stride,
                padding,
                dilation,
                groups,
                kernel,
            ),
        )


def test_conv_module_packs_when_moved_and_runs_the_fused_path():
    from mpq.nn import MultipointConv2d

    codes, scales, num_points = _packed_weight(64, 2, 32 * 9, 4, seed=16)
    for act in [None, (0.02, 128, 0, 255)]:
        m = MultipointConv2d(32, 64, [3, 3], 2, 4, [1, 1], [1, 1], [1, 1])
        m.set_weight(codes.view(m.codes.shape), scales, num_points, torch.randn(64))
        if act is not None:
            m.set_act_qparams(*act)
        x = torch.randn(2, 32, 10, 10)
        want = m(x)  # CPU, float32
        m = m.cuda().half()
        assert m.tile_offsets.numel() > 1 and m.packed.is_cuda, "packed at the move, before any forward"
        assert m.scales.dtype == torch.float32
        assert m.packed_kernel == ("auto" if act is None else "int8")
        packed_ptr = m.packed.data_ptr()
        got = m(x.cuda().half().to(memory_format=torch.channels_last))
        assert m.packed.data_ptr() == packed_ptr, "never repacked per forward"
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert _rel_err(got, want) <= 4 * REL_TOL[torch.float16]
        m = m.cpu()
        assert m.tile_offsets.numel() == 0


def test_quantize_on_cuda_packs_every_fused_layer():
    import small_models
    from mpq.nn import MultipointConv2d, MultipointLinear

    model = small_models.small_cnn().cuda().eval()
    data = [torch.randn(4, 3, 16, 16, device="cuda") for _ in range(2)]
    qmodel = mpq.quantize(model, data, "W4A8")
    layers = [m for m in qmodel.modules() if isinstance(m, (MultipointConv2d, MultipointLinear))]
    assert layers and all(m.tile_offsets.numel() > 1 for m in layers if m.packable())
    x = data[0]
    want = qmodel(x)  # float32: the generic path
    got = qmodel.half()(x.half())
    assert _rel_err(got, want) <= 1e-2


# ---- depthwise: the direct kernel of mpq::multipoint_conv2d (channels_last float16/bfloat16) ----

DEPTHWISE_CASES = [
    # (N, C, H, W, kh, kw, stride, padding, dilation)
    (1, 32, 14, 14, 3, 3, (1, 1), (1, 1), (1, 1)),
    (2, 96, 9, 11, 5, 5, (2, 2), (2, 2), (1, 1)),
    (3, 7, 8, 8, 3, 3, (1, 1), (2, 2), (2, 2)),
    (1, 16, 4, 4, 7, 5, (1, 2), (3, 2), (1, 1)),
]


@pytest.mark.parametrize("act", [None, "cpu", "cuda"], ids=["float_act", "qparams_cpu", "qparams_cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "case", DEPTHWISE_CASES, ids=[f"N{c[0]}_C{c[1]}_k{c[4]}x{c[5]}_s{c[6][0]}" for c in DEPTHWISE_CASES]
)
def test_depthwise_direct_kernel_matches_reference_and_generic_path(case, dtype, act):
    N, C, H, W, kh, kw, stride, padding, dilation = case
    codes, scales, num_points = _packed_weight(C, 3, kh * kw, 4, seed=C + kh)
    codes = codes.view(C, 3, 1, kh, kw)
    g = torch.Generator().manual_seed(17)
    x = (torch.randn(N, C, H, W, generator=g) * 2).to(dtype)
    bias = torch.randn(C, generator=g)
    qp = None if act is None else torch.tensor(PACKED_ACT["uint8"])
    geometry = (list(stride), list(padding), list(dilation), C)
    want64, bound = ref.multipoint_output_bound(x, codes, scales, num_points, bias, qp, conv=geometry)
    cuda = _cuda(codes, scales, num_points)
    qpc = None if qp is None else (qp if act == "cpu" else qp.cuda())
    generic = ops.multipoint_conv2d(x.cuda(), *cuda, bias.cuda(), qpc, *geometry)  # NCHW: dequantize + cuDNN
    _poison(want64.numel(), dtype)
    got = ops.multipoint_conv2d(x.cuda().to(memory_format=torch.channels_last), *cuda, bias.cuda(), qpc, *geometry)
    assert got.is_contiguous(memory_format=torch.channels_last) and got.dtype == dtype
    assert not bool(got.isnan().any())
    _assert_elementwise(got, want64, bound)
    assert _rel_err(got, want64) <= REL_TOL[dtype]
    assert _rel_err(got, generic) <= 2 * REL_TOL[dtype]


def test_depthwise_direct_kernel_invalid_device_qparams_give_nan():
    codes, scales, num_points = _packed_weight(8, 2, 9, 4, seed=18)
    x = torch.randn(1, 8, 6, 6, device="cuda").half().to(memory_format=torch.channels_last)
    bad = torch.tensor([0.0, 0.0, 0.0, 255.0], device="cuda")
    out = ops.multipoint_conv2d(
        x, *_cuda(codes.view(8, 2, 1, 3, 3), scales, num_points), None, bad, [1, 1], [1, 1], [1, 1], 8
    )
    assert bool(out.isnan().all())
