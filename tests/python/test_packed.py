"""mpq::pack_multipoint, mpq::unpack_multipoint and mpq::multipoint_linear_packed on the CPU.

The packed weight's layout (csrc/kernels/packed_layout.h) round-trips; the packed linear equals
mpq::multipoint_linear bit for bit on the CPU (whichever kernel is named) and the float64 reference
within float32 accumulation; opcheck; the error paths name the op and the argument; MultipointLinear
keeps its packed copy out of state_dict and rebuilds it when its weight changes. The CUDA kernels of
the same op are checked against this CPU op in test_cuda.py.
"""
import sys
from pathlib import Path
from typing import Optional, Tuple

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mpq  # noqa: E402,F401  (loads the ops)
import reference as ref  # noqa: E402
from mpq.nn import MultipointLinear  # noqa: E402
from mpq.ops import multipoint_linear, multipoint_linear_packed, pack_multipoint, unpack_multipoint  # noqa: E402

Tensor = torch.Tensor
ops = torch.ops.mpq
KERNELS = ["auto", "dense", "gemv", "mma", "int8"]


def random_weight(
    C: int, P: int, D: int, w_bits: int = 4, counts: str = "mixed", seed: int = 0
) -> Tuple[Tensor, Tensor, Tensor]:
    """codes int8[C, P, D] over the whole storage range of w_bits (-8..7 for <= 4 bits), scales
    float32[C, P] spread over two decades, num_points int32[C]: "mixed" (0..P, with a 0 and a P),
    "equal" (all P), "ramp" (c % (P + 1))."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-8, 8) if w_bits <= 4 else (-(1 << (w_bits - 1)), 1 << (w_bits - 1))
    codes = torch.randint(lo, hi, (C, P, D), generator=g, dtype=torch.int8)
    scales = ((torch.rand(C, P, generator=g) * 4 - 2).exp() * 0.05).float()
    if counts == "equal":
        num_points = torch.full((C,), P, dtype=torch.int32)
    elif counts == "ramp":
        num_points = (torch.arange(C) % (P + 1)).to(torch.int32)
    else:
        num_points = torch.randint(0, P + 1, (C,), generator=g, dtype=torch.int32)
        if C >= 2:
            num_points[0], num_points[-1] = 0, P
    return codes, scales, num_points


def masked(codes: Tensor, scales: Tensor, num_points: Tensor) -> Tuple[Tensor, Tensor]:
    """codes and scales with the points beyond each channel's count zeroed (what unpack returns)."""
    keep = torch.arange(codes.shape[1])[None, :] < num_points[:, None]
    return torch.where(keep[:, :, None], codes, torch.zeros_like(codes)), torch.where(keep, scales, torch.zeros_like(scales))


SHAPES = [  # (C, P, D)
    (1, 1, 1),
    (5, 2, 16),
    (63, 3, 63),
    (64, 1, 64),
    (65, 4, 65),
    (130, 2, 100),
    (200, 4, 37),
]


# ---- the layout -------------------------------------------------------------------------------


@pytest.mark.parametrize("w_bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("counts", ["mixed", "equal", "ramp"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{c}x{p}x{d}" for c, p, d in SHAPES])
def test_pack_unpack_round_trip(shape, counts, w_bits):
    C, P, D = shape
    codes, scales, num_points = random_weight(C, P, D, w_bits, counts, seed=C + D)
    packed, packed_scales, perm, tile_offsets, row_sums = pack_multipoint(codes, scales, num_points, w_bits)
    c2, s2, n2 = unpack_multipoint(packed, packed_scales, perm, tile_offsets, C, D, P)
    want_codes, want_scales = masked(codes, scales, num_points)
    assert torch.equal(n2, num_points)
    assert torch.equal(c2, want_codes)
    assert torch.equal(s2, want_scales)


@pytest.mark.parametrize("w_bits", [4, 8])
def test_pack_layout_facts(w_bits):
    C, P, D = 200, 4, 70
    codes, scales, num_points = random_weight(C, P, D, w_bits, seed=3)
    packed, packed_scales, perm, tile_offsets, row_sums = pack_multipoint(codes, scales, num_points, w_bits)
    tiles = perm.numel() // 64
    assert packed.dtype == torch.uint8 and packed.shape[1:] == (128 // 16, 512 if w_bits == 4 else 1024)
    assert packed_scales.shape == (packed.shape[0], 64) and tile_offsets.shape == (tiles + 1,)
    assert int(tile_offsets[0]) == 0 and int(tile_offsets[-1]) == packed.shape[0]
    # perm: every channel once, -1 for padding rows.
    real = perm[perm >= 0]
    assert torch.equal(real.sort().values, torch.arange(C, dtype=torch.int32))
    # One count per tile, equal to each of its channels' count; counts descend tile by tile.
    per_tile = torch.diff(tile_offsets)
    assert bool((per_tile[1:] <= per_tile[:-1]).all())
    for t in range(tiles):
        rows = perm[64 * t : 64 * (t + 1)]
        chans = rows[rows >= 0].long()
        assert chans.numel() > 0
        assert bool((num_points[chans] == per_tile[t]).all())
        assert bool((torch.diff(chans) > 0).all())  # stable: equal counts keep channel order
        blocks = packed_scales[int(tile_offsets[t]) : int(tile_offsets[t + 1])]
        assert bool((blocks[:, rows < 0] == 0).all())  # padding rows have no scale
    # Padding per count group: fewer than 64 rows.
    assert perm.numel() - C < 64 * (P + 1)
    # row_sums: the sum of each dequantized row, from float64.
    W = ref.dequantize_reference(codes, scales, num_points)
    want = torch.zeros(perm.numel(), dtype=torch.float64)
    want[perm >= 0] = W.sum(1)[real.long()]
    torch.testing.assert_close(row_sums.double(), want, rtol=1e-6, atol=1e-6 * float(W.abs().sum(1).max()))


def test_pack_edge_cases():
    # No channel, no column, no point at all.
    for C, P, D in [(0, 2, 5), (3, 2, 0), (4, 0, 8)]:
        codes, scales, num_points = random_weight(C, P, D, seed=1) if P else (
            torch.zeros(C, 0, D, dtype=torch.int8), torch.zeros(C, 0), torch.zeros(C, dtype=torch.int32))
        out = pack_multipoint(codes, scales, num_points, 4)
        c2, s2, n2 = unpack_multipoint(*out[:4], C, D, P)
        assert torch.equal(c2, masked(codes, scales, num_points)[0]) and torch.equal(n2, num_points)


# ---- the packed linear -------------------------------------------------------------------------

ACT = {
    "none": None,
    "int8": (0.05, 0.0, -128.0, 127.0),
    "uint8": (0.02, 128.0, 0.0, 255.0),
    "uint4": (0.15, 3.0, 0.0, 15.0),
}

LINEAR_CASES = [  # (M shape, C, P, D)
    ((1,), 70, 3, 37),
    ((1,), 64, 1, 64),
    ((3,), 65, 4, 65),
    ((2, 5), 130, 2, 100),
    ((17,), 33, 2, 129),
    ((0,), 9, 2, 20),
]


@pytest.mark.parametrize("act", list(ACT))
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", LINEAR_CASES, ids=[f"M{'x'.join(map(str, m))}_{c}x{p}x{d}" for m, c, p, d in LINEAR_CASES])
def test_packed_linear_equals_unpacked(case, dtype, with_bias, act):
    lead, C, P, D = case
    codes, scales, num_points = random_weight(C, P, D, seed=C * D)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, D, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(C, generator=g) if with_bias else None
    qp = None if ACT[act] is None else torch.tensor(ACT[act], dtype=torch.float32)
    packed = pack_multipoint(codes, scales, num_points, 4)
    want = multipoint_linear(x, codes, scales, num_points, bias, qp)
    got = multipoint_linear_packed(x, *packed, C, bias, qp)
    assert got.dtype == dtype and got.shape == want.shape == (*lead, C)
    assert torch.equal(got, want)


@pytest.mark.parametrize("w_bits", [3, 4, 6, 8])
@pytest.mark.parametrize("counts", ["mixed", "equal", "ramp"])
def test_packed_linear_matches_float64_reference(counts, w_bits):
    C, P, D = 150, 4, 301
    codes, scales, num_points = random_weight(C, P, D, w_bits, counts, seed=w_bits)
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(2))
    bias = torch.randn(C)
    packed = pack_multipoint(codes, scales, num_points, w_bits)
    got = multipoint_linear_packed(x, *packed, C, bias, None)
    want = ref.multipoint_linear_reference(x, codes, scales, num_points, bias, None)
    # float32 accumulation over D = 301 products of magnitude ~|x| |W|.
    scale = float((x.double().abs() @ ref.dequantize_reference(codes, scales, num_points).abs().t()).max())
    torch.testing.assert_close(got.double(), want, rtol=0.0, atol=1e-6 * scale)
    got64 = multipoint_linear_packed(x.double(), *packed, C, bias, None)
    torch.testing.assert_close(got64, want, rtol=0.0, atol=1e-12 * scale)


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_kernel_name_computes_the_same_function_on_cpu(kernel):
    C, P, D = 70, 3, 37
    codes, scales, num_points = random_weight(C, P, D, seed=9)
    packed = pack_multipoint(codes, scales, num_points, 4)
    x = torch.randn(4, D).half()
    qp = torch.tensor(ACT["uint8"])
    want = multipoint_linear(x, codes, scales, num_points, None, qp)
    assert torch.equal(multipoint_linear_packed(x, *packed, C, None, qp, kernel), want)


def test_packed_linear_non_contiguous_input():
    C, P, D = 40, 2, 31
    codes, scales, num_points = random_weight(C, P, D, seed=4)
    packed = pack_multipoint(codes, scales, num_points, 4)
    base = torch.randn(D, 9)
    x = base.t()  # dense, not contiguous
    assert torch.equal(multipoint_linear_packed(x, *packed, C), multipoint_linear(x, codes, scales, num_points))
    x2 = torch.randn(6, 2 * D)[:, ::2]  # not dense
    assert torch.equal(multipoint_linear_packed(x2, *packed, C), multipoint_linear(x2, codes, scales, num_points))


def test_packed_linear_with_fitted_weight():
    torch.manual_seed(0)
    w = torch.randn(96, 200)
    codes, scales, _ = ops.fit_multipoint(w, 4, 3, False)
    num_points = torch.randint(1, 4, (96,), dtype=torch.int32)
    packed = pack_multipoint(codes, scales, num_points, 4)
    x = torch.randn(5, 200)
    assert torch.equal(multipoint_linear_packed(x, *packed, 96), multipoint_linear(x, codes, scales, num_points))


# ---- opcheck ----------------------------------------------------------------------------------


def test_opcheck_pack_and_unpack():
    codes, scales, num_points = random_weight(70, 3, 37, seed=5)
    torch.library.opcheck(ops.pack_multipoint.default, (codes, scales, num_points, 4))
    torch.library.opcheck(ops.pack_multipoint.default, (codes, scales, num_points, 8))
    packed = pack_multipoint(codes, scales, num_points, 4)
    torch.library.opcheck(ops.unpack_multipoint.default, (*packed[:4], 70, 37, 3))


@pytest.mark.parametrize("act", ["none", "uint8"])
def test_opcheck_multipoint_linear_packed(act):
    codes, scales, num_points = random_weight(70, 3, 37, seed=6)
    packed = pack_multipoint(codes, scales, num_points, 4)
    qp = None if ACT[act] is None else torch.tensor(ACT[act])
    x = torch.randn(3, 37)
    torch.library.opcheck(ops.multipoint_linear_packed.default, (x, *packed, 70, torch.randn(70), qp, "auto"))
    torch.library.opcheck(ops.multipoint_linear_packed.default, (x.double(), *packed, 70, None, qp, "dense"))


def test_fake_kernel_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    codes, scales, num_points = random_weight(70, 3, 37, seed=7)
    packed = pack_multipoint(codes, scales, num_points, 4)
    x = torch.randn(2, 5, 37)
    real = multipoint_linear_packed(x, *packed, 70)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = multipoint_linear_packed(mode.from_tensor(x), *packed, 70)
    assert fake.shape == real.shape == (2, 5, 70) and fake.dtype == real.dtype


# ---- errors -----------------------------------------------------------------------------------


def test_pack_errors():
    codes, scales, num_points = random_weight(6, 2, 10, seed=8)
    with pytest.raises(RuntimeError, match="mpq::pack_multipoint: expected w_bits in 2..8"):
        pack_multipoint(codes, scales, num_points, 9)
    with pytest.raises(RuntimeError, match="mpq::pack_multipoint: expected codes to have 3 dimensions"):
        pack_multipoint(codes.unsqueeze(-1), scales, num_points, 4)
    with pytest.raises(RuntimeError, match="mpq::pack_multipoint: expected scales to be float32"):
        pack_multipoint(codes, scales.double(), num_points, 4)
    with pytest.raises(RuntimeError, match="mpq::pack_multipoint: expected num_points in 0..2"):
        pack_multipoint(codes, scales, num_points + 5, 4)
    big = codes.clone()
    big[0, 0, 0] = 9
    num_points[0] = 1
    with pytest.raises(RuntimeError, match="mpq::pack_multipoint: expected codes of the points in use in -8..7"):
        pack_multipoint(big, scales, num_points, 4)
    num_points[0] = 0  # an unused point may hold anything
    pack_multipoint(big, scales, num_points, 4)
    pack_multipoint(big, scales, torch.full_like(num_points, 2), 5)  # 8-bit storage


def test_packed_linear_errors():
    C, P, D = 70, 3, 37
    codes, scales, num_points = random_weight(C, P, D, seed=10)
    packed, packed_scales, perm, tile_offsets, row_sums = pack_multipoint(codes, scales, num_points, 4)
    w = (packed, packed_scales, perm, tile_offsets, row_sums)
    x = torch.randn(2, D)
    op = "mpq::multipoint_linear_packed"
    with pytest.raises(RuntimeError, match=f"{op}: expected input \\[..., D\\] with D rounded up"):
        multipoint_linear_packed(torch.randn(2, 80), *w, C)
    with pytest.raises(RuntimeError, match=f"{op}: expected packed to be uint8"):
        multipoint_linear_packed(x, packed.to(torch.int8), *w[1:], C)
    with pytest.raises(RuntimeError, match=f"{op}: expected packed_scales of shape"):
        multipoint_linear_packed(x, packed, packed_scales[:, :32], *w[2:], C)
    with pytest.raises(RuntimeError, match=f"{op}: expected perm to be int32"):
        multipoint_linear_packed(x, packed, packed_scales, perm.long(), *w[3:], C)
    with pytest.raises(RuntimeError, match=f"{op}: expected tile_offsets of shape"):
        multipoint_linear_packed(x, packed, packed_scales, perm, tile_offsets[:-1], row_sums, C)
    bad_offsets = tile_offsets.clone()
    bad_offsets[1] = 99
    with pytest.raises(RuntimeError, match=f"{op}: expected tile_offsets to rise from 0 to num_blocks"):
        multipoint_linear_packed(x, packed, packed_scales, perm, bad_offsets, row_sums, C)
    bad_perm = perm.clone()
    bad_perm[0] = bad_perm[1]
    with pytest.raises(RuntimeError, match=f"{op}: expected perm to hold every channel"):
        multipoint_linear_packed(x, packed, packed_scales, bad_perm, tile_offsets, row_sums, C)
    with pytest.raises(RuntimeError, match=f"{op}: expected perm to hold every channel 0..{C - 2} once"):
        multipoint_linear_packed(x, *w, C - 1)
    short_perm = perm.clone()
    short_perm[short_perm == 5] = -1
    with pytest.raises(RuntimeError, match=f"{op}: expected perm to hold all {C} channels, got {C - 1}"):
        multipoint_linear_packed(x, packed, packed_scales, short_perm, tile_offsets, row_sums, C)
    with pytest.raises(RuntimeError, match=f"{op}: expected row_sums to be float32"):
        multipoint_linear_packed(x, *w[:4], row_sums[:-1], C)
    with pytest.raises(RuntimeError, match=f"{op}: expected bias of shape"):
        multipoint_linear_packed(x, *w, C, torch.randn(C + 1))
    with pytest.raises(RuntimeError, match=f"{op}: expected act_qparams to be float32\\[4\\]"):
        multipoint_linear_packed(x, *w, C, None, torch.ones(3))
    with pytest.raises(RuntimeError, match=f"{op}: expected act_qparams with a finite scale > 0"):
        multipoint_linear_packed(x, *w, C, None, torch.tensor([0.0, 0.0, -128.0, 127.0]))
    with pytest.raises(RuntimeError, match=f"{op}: expected kernel to be one of auto, dense, gemv, mma, int8, got 'fast'"):
        multipoint_linear_packed(x, *w, C, None, None, "fast")
    with pytest.raises(RuntimeError, match=f"{op}: kernel 'gemv' expects a float16 or bfloat16 input"):
        multipoint_linear_packed(x, *w, C, None, None, "gemv")
    with pytest.raises(RuntimeError, match=f"{op}: kernel 'int8' expects act_qparams"):
        multipoint_linear_packed(x, *w, C, None, None, "int8")
    with pytest.raises(RuntimeError, match=f"{op}: expected input to be a floating tensor"):
        multipoint_linear_packed(x.to(torch.int32), *w, C)


def test_unpack_errors():
    codes, scales, num_points = random_weight(70, 3, 37, seed=11)
    packed = pack_multipoint(codes, scales, num_points, 4)
    with pytest.raises(RuntimeError, match="mpq::unpack_multipoint: expected in_features with Kp = 64"):
        unpack_multipoint(*packed[:4], 70, 65, 3)
    with pytest.raises(RuntimeError, match="mpq::unpack_multipoint: expected max_points >= the largest tile's point count 3"):
        unpack_multipoint(*packed[:4], 70, 37, 2)


# ---- MultipointLinear --------------------------------------------------------------------------


def _module(act: Optional[Tuple[float, int, int, int]] = None) -> MultipointLinear:
    codes, scales, num_points = random_weight(70, 3, 37, seed=12)
    m = MultipointLinear(37, 70, 3, 4)
    m.set_weight(codes, scales, num_points, torch.randn(70))
    if act is not None:
        m.set_act_qparams(*act)
    return m


def test_module_packed_buffers_stay_out_of_state_dict():
    m = _module()
    m.pack_()
    assert m.tile_offsets.numel() > 1 and m.packed.numel() > 0
    assert set(m.state_dict()) == {"codes", "scales", "num_points", "bias"}
    x = torch.randn(3, 37)
    # The packed copy computes what the module computes (CPU: the unpacked op).
    got = multipoint_linear_packed(x, m.packed, m.packed_scales, m.perm, m.tile_offsets, m.row_sums, 70, m.bias,
                                   m.act_qparams, m.packed_kernel)
    assert torch.equal(got, m(x))


@pytest.mark.parametrize(
    "act, kernel",
    [(None, "auto"), ((0.05, 0, -128, 127), "int8"), ((0.02, 128, 0, 255), "int8"), ((0.01, 0, -1000, 1000), "auto")],
)
def test_module_picks_the_int8_kernel_when_levels_fit(act, kernel):
    m = _module(act)
    m.pack_()
    assert m.packed_kernel == kernel


def test_module_drops_its_packed_copy_when_the_weight_changes():
    m = _module((0.05, 0, -128, 127))
    m.pack_()
    assert m.packed_kernel == "int8"
    m.set_act_qparams(0.05, 0, -1000, 1000)
    assert m.tile_offsets.numel() == 0 and m.packed_kernel == "auto"
    m.pack_()
    codes, scales, num_points = random_weight(70, 3, 37, seed=13)
    m.set_weight(codes, scales, num_points, None)
    assert m.tile_offsets.numel() == 0
    m.pack_()
    other = _module((0.05, 0, -1000, 1000))
    m.load_state_dict(other.state_dict())
    assert m.tile_offsets.numel() == 0
    m.pack_()
    c2, s2, n2 = unpack_multipoint(m.packed, m.packed_scales, m.perm, m.tile_offsets, 70, 37, 3)
    assert torch.equal(c2, other.codes) and torch.equal(n2, other.num_points)


def test_module_scripts_and_packs_under_torchscript():
    m = _module((0.05, 0, -128, 127))
    x = torch.randn(4, 37)
    scripted = torch.jit.script(m)
    assert torch.equal(scripted(x), m(x))
    scripted.pack_()
    assert scripted.packed_kernel == "int8" and scripted.tile_offsets.numel() > 1
