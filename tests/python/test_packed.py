"""mpq::pack_multipoint, mpq::unpack_multipoint, mpq::multipoint_linear_packed and
mpq::multipoint_conv2d_packed on the CPU.

The packed weight's layout (csrc/kernels/packed_layout.h) round-trips; the packed linear equals
mpq::multipoint_linear bit for bit on the CPU (whichever kernel is named) and the float64 reference
within float32 accumulation; opcheck; the error paths name the op and the argument; MultipointLinear
keeps its packed copy out of state_dict and rebuilds it when its weight changes. The packed conv2d
(codes in NHWC column order, tiles within one group) equals mpq::multipoint_conv2d bit for bit on
the CPU; the modules keep their float32 buffers under .half(). The CUDA kernels of the same ops are
checked against these CPU ops in test_cuda.py.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mpq  # noqa: E402,F401  (loads the ops)
import reference as ref  # noqa: E402
from mpq.nn import MultipointConv2d, MultipointLinear  # noqa: E402
from mpq.ops import (  # noqa: E402
    conv_codes_nhwc,
    multipoint_conv2d,
    multipoint_conv2d_packed,
    multipoint_linear,
    multipoint_linear_packed,
    pack_multipoint,
    unpack_multipoint,
)

Tensor = torch.Tensor
ops = torch.ops.mpq
KERNELS = ["auto", "dense", "gemv", "mma", "int8"]


def random_weight(
    C: int, P: int, D: int, w_bits: int = 4, counts: str = "mixed", seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
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


def masked(codes: Tensor, scales: Tensor, num_points: Tensor) -> tuple[Tensor, Tensor]:
    """codes and scales with the points beyond each channel's count zeroed (what unpack returns)."""
    keep = torch.arange(codes.shape[1])[None, :] < num_points[:, None]
    return torch.where(keep[:, :, None], codes, torch.zeros_like(codes)), torch.where(
        keep, scales, torch.zeros_like(scales)
    )


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
        codes, scales, num_points = (
            random_weight(C, P, D, seed=1)
            if P
            else (torch.zeros(C, 0, D, dtype=torch.int8), torch.zeros(C, 0), torch.zeros(C, dtype=torch.int32))
        )
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
@pytest.mark.parametrize(
    "case", LINEAR_CASES, ids=[f"M{'x'.join(map(str, m))}_{c}x{p}x{d}" for m, c, p, d in LINEAR_CASES]
)
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
    with pytest.raises(
        RuntimeError, match=f"{op}: expected kernel to be one of auto, dense, gemv, mma, int8, got 'fast'"
    ):
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
    with pytest.raises(
        RuntimeError, match="mpq::unpack_multipoint: expected max_points >= the largest tile's point count 3"
    ):
        unpack_multipoint(*packed[:4], 70, 37, 2)


# ---- MultipointLinear --------------------------------------------------------------------------


def _module(act: tuple[float, int, int, int] | None = None) -> MultipointLinear:
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
    assert set(m.state_dict()) == {"point_codes", "point_scales", "num_points", "bias"}
    x = torch.randn(3, 37)
    # The packed copy computes the layer's function (CPU: the unpacked reference op, bit for bit
    # the stored op's decoded-weight path; the module itself runs the weight-only kernel at 3 rows
    # on AVX-512, within float32 rounding of it).
    got = multipoint_linear_packed(
        x, m.packed, m.packed_scales, m.perm, m.tile_offsets, m.row_sums, 70, m.bias, m.act_qparams, m.packed_kernel
    )
    dense = torch.ops.mpq.multipoint_linear_stored(
        x, m.point_codes, m.point_scales, m.num_points, m.w_bits, m.in_features, m.bias, m.act_qparams, "dense"
    )
    assert torch.equal(got, dense)
    torch.testing.assert_close(m(x), got, rtol=1e-5, atol=1e-5)


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


# ---- the packed conv2d ---------------------------------------------------------------------------

# (N, C_in, H, W, C_out, kh, kw, stride, padding, dilation, groups)
CONV_CASES = [
    (2, 3, 9, 7, 8, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    (1, 32, 8, 8, 64, 3, 3, (2, 2), (1, 1), (1, 1), 1),
    (2, 64, 5, 6, 70, 1, 1, (1, 1), (0, 0), (1, 1), 1),
    (1, 64, 8, 8, 128, 3, 3, (1, 1), (2, 2), (2, 2), 2),
    (1, 48, 5, 6, 192, 3, 2, (2, 1), (1, 0), (1, 2), 3),
    (3, 6, 4, 4, 6, 2, 2, (2, 2), (0, 1), (1, 1), 3),
    (1, 24, 6, 6, 24, 3, 3, (1, 1), (1, 1), (1, 1), 24),  # depthwise
    (1, 16, 3, 3, 16, 7, 7, (1, 1), (3, 3), (1, 1), 1),
]
CONV_IDS = [f"N{c[0]}_C{c[1]}_{c[2]}x{c[3]}_O{c[4]}_k{c[5]}x{c[6]}_g{c[10]}" for c in CONV_CASES]


def conv_weight(case, P=3, w_bits=4, seed=0):
    N, C, H, W, O, kh, kw, stride, padding, dilation, groups = case
    codes, scales, num_points = random_weight(O, P, C // groups * kh * kw, w_bits, seed=seed)
    return codes.view(O, P, C // groups, kh, kw), scales, num_points


def test_conv_codes_nhwc_orders_columns_kh_kw_c():
    codes = torch.arange(2 * 1 * 3 * 2 * 2, dtype=torch.int8).view(2, 1, 3, 2, 2)
    flat = conv_codes_nhwc(codes)
    assert flat.shape == (2, 1, 12)
    for i in range(2):
        for j in range(2):
            for c in range(3):
                assert int(flat[1, 0, (i * 2 + j) * 3 + c]) == int(codes[1, 0, c, i, j])


@pytest.mark.parametrize("groups", [1, 2, 5])
def test_pack_with_groups_keeps_each_tile_in_one_group(groups):
    codes, scales, num_points = random_weight(150, 3, 40, seed=groups)
    packed, packed_scales, perm, tile_offsets, row_sums = pack_multipoint(codes, scales, num_points, 4, groups)
    per_group = 150 // groups
    for tile in perm.view(-1, 64):
        real = tile[tile >= 0]
        assert real.numel() > 0 and int(tile[0]) >= 0  # the first row of a tile is a channel
        assert len(set((real // per_group).tolist())) == 1
        assert len(set(num_points[real.long()].tolist())) == 1
    c2, s2, n2 = unpack_multipoint(packed, packed_scales, perm, tile_offsets, 150, 40, 3)
    want_codes, want_scales = masked(codes, scales, num_points)
    assert torch.equal(c2, want_codes) and torch.equal(s2, want_scales) and torch.equal(n2, num_points)
    if groups == 1:  # groups=1 is the plain packing
        assert all(
            torch.equal(a, b)
            for a, b in zip(
                pack_multipoint(codes, scales, num_points, 4), (packed, packed_scales, perm, tile_offsets, row_sums)
            )
        )


@pytest.mark.parametrize("act", list(ACT))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_packed_conv2d_equals_unpacked(case, dtype, act):
    N, C, H, W, O, kh, kw, stride, padding, dilation, groups = case
    codes, scales, num_points = conv_weight(case, seed=O + C)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(O, generator=g)
    qp = None if ACT[act] is None else torch.tensor(ACT[act], dtype=torch.float32)
    packed = pack_multipoint(conv_codes_nhwc(codes), scales, num_points, 4, groups)
    geometry = (list(stride), list(padding), list(dilation), groups)
    want = multipoint_conv2d(x, codes, scales, num_points, bias, qp, *geometry)
    for kernel in (
        ["auto", "dense", "igemm", "int8"] if dtype == torch.bfloat16 and qp is not None else ["auto", "dense"]
    ):
        got = multipoint_conv2d_packed(x, *packed, O, [kh, kw], bias, qp, *geometry, kernel)
        assert got.dtype == dtype and got.shape == want.shape
        assert torch.equal(got, want)


@pytest.mark.parametrize("case", CONV_CASES[:5], ids=CONV_IDS[:5])
def test_packed_conv2d_matches_float64_reference(case):
    N, C, H, W, O, kh, kw, stride, padding, dilation, groups = case
    codes, scales, num_points = conv_weight(case, seed=7)
    x = torch.randn(N, C, H, W, generator=torch.Generator().manual_seed(4))
    qp = torch.tensor(ACT["uint8"])
    packed = pack_multipoint(conv_codes_nhwc(codes), scales, num_points, 4, groups)
    got = multipoint_conv2d_packed(
        x, *packed, O, [kh, kw], None, qp, list(stride), list(padding), list(dilation), groups
    )
    want = ref.multipoint_conv2d_reference(
        x.double(), codes, scales, num_points, None, qp, stride, padding, dilation, groups
    )
    assert float((got.double() - want).norm() / want.norm()) < 1e-5


def test_packed_conv2d_channels_last_input_gives_the_same_values():
    case = CONV_CASES[1]
    codes, scales, num_points = conv_weight(case, seed=8)
    x = torch.randn(1, 32, 8, 8)
    packed = pack_multipoint(conv_codes_nhwc(codes), scales, num_points, 4)
    args = (64, [3, 3], None, None, [2, 2], [1, 1], [1, 1], 1)
    a = multipoint_conv2d_packed(x, *packed, *args)
    b = multipoint_conv2d_packed(x.to(memory_format=torch.channels_last), *packed, *args)
    assert b.is_contiguous(memory_format=torch.channels_last)  # the output follows the input's layout
    assert float((a - b).norm() / a.norm()) < 1e-6  # float32, another summation order


def test_opcheck_multipoint_conv2d_packed():
    case = CONV_CASES[3]
    codes, scales, num_points = conv_weight(case, seed=9)
    packed = pack_multipoint(conv_codes_nhwc(codes), scales, num_points, 4, 2)
    x = torch.randn(1, 64, 8, 8)
    torch.library.opcheck(ops.pack_multipoint.default, (conv_codes_nhwc(codes), scales, num_points, 4, 2))
    for qp in [None, torch.tensor(ACT["uint8"])]:
        torch.library.opcheck(
            ops.multipoint_conv2d_packed.default,
            (x, *packed, 128, [3, 3], torch.randn(128), qp, [1, 1], [2, 2], [2, 2], 2, "auto"),
        )


def test_packed_conv2d_errors():
    case = CONV_CASES[1]
    codes, scales, num_points = conv_weight(case, seed=10)
    packed = pack_multipoint(conv_codes_nhwc(codes), scales, num_points, 4)
    x = torch.randn(1, 32, 8, 8)
    geo = ([1, 1], [1, 1], [1, 1])
    op = "mpq::multipoint_conv2d_packed"
    cases = [
        (
            lambda: multipoint_conv2d_packed(x[0], *packed, 64, [3, 3], None, None, *geo, 1),
            "expected input \\[N, C_in, H, W\\]",
        ),
        (
            lambda: multipoint_conv2d_packed(x, *packed, 64, [3, 0], None, None, *geo, 1),
            "expected kernel_size \\[kh, kw\\] with kh, kw >= 1",
        ),
        (
            lambda: multipoint_conv2d_packed(x, *packed, 64, [3, 3], None, None, *geo, 3),
            "expected groups >= 1 dividing out_channels",
        ),
        (
            lambda: multipoint_conv2d_packed(x, *packed, 64, [5, 5], None, None, *geo, 1),
            "expected kh \\* kw \\* C_in / groups = 800",
        ),
        (
            lambda: multipoint_conv2d_packed(x, *packed, 64, [3, 3], None, None, *geo, 1, "gemv"),
            "expected kernel to be one of auto, dense, igemm, int8, got 'gemv'",
        ),
        (
            lambda: multipoint_conv2d_packed(x, *packed, 64, [3, 3], None, None, *geo, 1, "igemm"),
            "kernel 'igemm' expects a float16 or bfloat16 input",
        ),
        (
            lambda: multipoint_conv2d_packed(x, *packed, 64, [3, 3], None, None, *geo, 1, "int8"),
            "kernel 'int8' expects act_qparams",
        ),
        (
            lambda: multipoint_conv2d_packed(x, *packed, 65, [3, 3], None, None, *geo, 1),
            "expected perm to hold all 65 channels",
        ),
        (
            lambda: multipoint_conv2d_packed(x, *packed, 64, [3, 3], torch.randn(3), None, *geo, 1),
            "expected bias of shape \\[64\\]",
        ),
        (
            lambda: multipoint_conv2d_packed(x, *packed, 64, [3, 3], None, None, [0, 1], [1, 1], [1, 1], 1),
            "expected stride >= 1",
        ),
        (
            lambda: multipoint_conv2d_packed(
                x[:, :, :1, :1], *packed, 64, [3, 3], None, None, [1, 1], [0, 0], [1, 1], 1
            ),
            "padded size 1 < dilated kernel size 3",
        ),
        (
            lambda: multipoint_conv2d_packed(
                x, *packed, 64, [3, 3], None, torch.tensor([0.0, 0.0, 0.0, 255.0]), *geo, 1
            ),
            "expected act_qparams with a finite scale > 0",
        ),
        (
            lambda: pack_multipoint(conv_codes_nhwc(codes), scales, num_points, 4, 3),
            "mpq::pack_multipoint: expected groups >= 1 dividing the 64 output channels, got groups = 3",
        ),
    ]
    for call, pattern in cases:
        with pytest.raises(RuntimeError, match=(pattern if pattern.startswith("mpq::") else f"{op}: .*{pattern}")):
            call()


# ---- MultipointConv2d and dtype casts ----------------------------------------------------------


def _conv_module(act=(0.02, 128, 0, 255), groups=1, in_channels=32, out_channels=64) -> MultipointConv2d:
    m = MultipointConv2d(in_channels, out_channels, [3, 3], 3, 4, [1, 1], [1, 1], [1, 1], groups=groups)
    codes, scales, num_points = random_weight(out_channels, 3, in_channels // groups * 9, seed=14)
    m.set_weight(codes.view(m.codes.shape), scales, num_points, torch.randn(out_channels))
    if act is not None:
        m.set_act_qparams(*act)
    return m


@pytest.mark.parametrize(
    "act, groups, kernel", [(None, 1, "auto"), ((0.02, 128, 0, 255), 1, "int8"), ((0.02, 128, 0, 255), 2, "auto")]
)
def test_conv_module_packs_in_nhwc_order_and_picks_its_kernel(act, groups, kernel):
    # groups = 2: 16 input channels, 8 per group (int8 needs whole 16-channel slabs), 64 outputs per group
    m = _conv_module(act, groups, in_channels=32 // groups, out_channels=64 * groups)
    m.pack_()
    assert m.packed_kernel == kernel
    x = torch.randn(2, m.in_channels, 7, 7)
    got = multipoint_conv2d_packed(
        x,
        m.packed,
        m.packed_scales,
        m.perm,
        m.tile_offsets,
        m.row_sums,
        m.out_channels,
        m.kernel_size,
        m.bias,
        m.act_qparams,
        m.stride,
        m.padding,
        m.dilation,
        m.groups,
        m.packed_kernel,
    )
    # The packed op's CPU kernel is the reference path; the module runs the stored-form kernels
    # (oneDNN int8 / a decoded dense weight): both within the simulation check's bound of float64.
    from mpq.simulate import layer_bound

    ref, bound, _ = layer_bound(m, x)
    for y in (got, m(x)):
        assert bool(((y.double() - ref).abs() <= bound).all())
    assert set(m.state_dict()) == {"point_codes", "point_scales", "num_points", "bias"} | (
        {"act_qparams"} if act else set()
    )


def test_conv_module_packability():
    assert _conv_module(groups=1).packable()
    depthwise = MultipointConv2d(64, 64, [3, 3], 2, 4, [1, 1], [1, 1], [1, 1], groups=64)
    assert not depthwise.packable()  # one channel per group: a 64-row tile would be 63/64 padding
    with pytest.raises(RuntimeError, match="pack_: this layer has no fused kernels"):
        depthwise.pack_()
    assert MultipointConv2d(256, 256, [3, 3], 2, 4, [1, 1], [1, 1], [1, 1], groups=4).packable()


@pytest.mark.parametrize("cast", ["half", "bfloat16", "double", "to_float16"])
def test_dtype_casts_keep_the_float32_buffers(cast):
    for m in (_conv_module(), _module((0.05, 0, -128, 127))):
        x = torch.randn(2, 32, 7, 7) if isinstance(m, MultipointConv2d) else torch.randn(3, 37)
        want = m(x)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        m = m.to(torch.float16) if cast == "to_float16" else getattr(m, cast)()
        after = m.state_dict()
        for k, v in before.items():
            assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
        assert torch.equal(m(x), want)  # a float32 input still runs in float32
        y = m(x.to(torch.float64))
        assert y.dtype == torch.float64


def test_channels_last_conversion_leaves_the_codes_and_the_function():
    m = _conv_module()
    x = torch.randn(2, 32, 7, 7)
    want = m(x)
    codes = m.codes.clone()
    m = m.to(memory_format=torch.channels_last)  # what a CNN gets before NHWC inference
    assert torch.equal(m.codes, codes) and m.scales.dtype == torch.float32
    got = m(x.to(memory_format=torch.channels_last))
    assert float((got - want).norm() / want.norm()) < 1e-6  # float32, another summation order


def test_conv_module_scripts_and_packs_under_torchscript():
    m = _conv_module()
    x = torch.randn(1, 32, 6, 6)
    scripted = torch.jit.script(m)
    assert torch.equal(scripted(x), m(x))
    scripted.pack_()
    assert scripted.packed_kernel == "int8" and scripted.tile_offsets.numel() > 1
