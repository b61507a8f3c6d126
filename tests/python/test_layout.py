"""One source for the layout rules: the constants and predicates Python uses (``mpq.layout``) are
the C++ library's (``mpq::layout_constants``, ``mpq::int8_levels_fit``, ``mpq::packed_int8_fits``),
and every validation site agrees on them: ``QuantConfig``, the modules, the C++ op checks and the
fake kernels accept and refuse the same ``max_points`` and ``w_bits``; the bit cost of a point is
counted once (``point_bits``) by the modules, the summary and the allocation's callers."""

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

import mpq
from mpq import layout
from mpq.nn import MultipointConv2d, MultipointLinear

ops = torch.ops.mpq


def test_python_constants_are_the_ops_constants():
    c = dict(ops.layout_constants())
    assert layout.CONSTANTS == c
    named = {
        "min_w_bits": layout.MIN_W_BITS,
        "max_w_bits": layout.MAX_W_BITS,
        "max_points": layout.MAX_POINTS,
        "scale_bits": layout.SCALE_BITS,
        "count_bits": layout.COUNT_BITS,
        "int8_levels": layout.INT8_LEVELS,
        "packed_format_version": layout.PACKED_FORMAT_VERSION,
        "tile_n": layout.TILE_N,
        "slab_k": layout.SLAB_K,
        "k_align": layout.K_ALIGN,
        "nibble_max_w_bits": layout.NIBBLE_MAX_W_BITS,
        "int8_max_k": layout.INT8_MAX_K,
    }
    for key, value in named.items():
        assert value == c[key], key
    assert set(c) == set(named) | {"slab_bytes_nibble", "slab_bytes_int8"}
    # The stored form holds what the constants say: float32 scales, int32 counts.
    q = MultipointLinear(8, 3, 2, 4)
    assert q.point_scales.element_size() * 8 == layout.SCALE_BITS
    assert q.num_points.element_size() * 8 == layout.COUNT_BITS


def test_constants_op_needs_no_tensor_and_traces():
    """layout_constants has no tensor argument: it answers in every mode that may meet it."""
    with FakeTensorMode():
        assert dict(ops.layout_constants()) == layout.CONSTANTS
    with torch.device("meta"):
        assert dict(ops.layout_constants()) == layout.CONSTANTS


@pytest.mark.parametrize("w_bits", [2, 4, 5, 8])
@pytest.mark.parametrize("D", [1, 63, 64, 65, 200])
def test_packed_and_stored_shapes_follow_the_constants(w_bits, D):
    """The real ops' shapes, and the fake kernels' (which read mpq.layout), agree with the constants."""
    C, P = 70, 3
    K = 2 ** (w_bits - 1) - 1
    codes = torch.randint(-K, K + 1, (C, P, D), dtype=torch.int8)
    scales = torch.rand(C, P)
    num_points = torch.randint(0, P + 1, (C,), dtype=torch.int32)
    packed, packed_scales, perm, tile_offsets, row_sums = ops.pack_multipoint(codes, scales, num_points, w_bits, 1)
    assert packed.shape[1] * layout.SLAB_K == layout.padded_k(D) and layout.padded_k(D) % layout.K_ALIGN == 0
    assert packed.shape[2] == layout.slab_bytes(w_bits)
    assert packed_scales.shape[1] == layout.TILE_N and perm.numel() % layout.TILE_N == 0
    point_codes, _ = ops.pack_points(codes, scales, num_points, w_bits)
    assert point_codes.shape[1] == layout.stored_row_bytes(D, w_bits) == math.ceil(D * w_bits / 8)
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        fake = ops.pack_multipoint(*(mode.from_tensor(t) for t in (codes, scales, num_points)), w_bits, 1)
        assert tuple(fake[0].shape[1:]) == tuple(packed.shape[1:])
        assert fake[1].shape[1] == packed_scales.shape[1]
        fake_points = ops.pack_points(*(mode.from_tensor(t) for t in (codes, scales, num_points)), w_bits)
        assert fake_points[0].shape[1] == point_codes.shape[1]


def _accepts(fn) -> bool:
    try:
        fn()
    except (ValueError, RuntimeError):
        return False
    return True


@pytest.mark.parametrize("max_points", [-1, 0, 1, 2, 16, 17, layout.MAX_POINTS, layout.MAX_POINTS + 1])
def test_max_points_bound_is_one(max_points):
    """QuantConfig, both modules, mpq::fit_multipoint and its fake kernel accept the same max_points."""
    expected = 1 <= max_points <= layout.MAX_POINTS
    w = torch.randn(3, 5)
    sites = {
        "QuantConfig": lambda: mpq.QuantConfig(max_points=max_points),
        "MultipointLinear": lambda: MultipointLinear(5, 3, max_points, 4),
        "MultipointConv2d": lambda: MultipointConv2d(2, 3, [1, 1], max_points, 4, [1, 1], [0, 0], [1, 1]),
        "mpq::fit_multipoint": lambda: ops.fit_multipoint(w, 4, max_points, False),
    }
    for name, site in sites.items():
        assert _accepts(site) == expected, name
    with FakeTensorMode() as mode:  # the fake kernel (torch.compile / torch.export)
        fake_w = mode.from_tensor(w)
        assert _accepts(lambda: ops.fit_multipoint(fake_w, 4, max_points, False)) == expected


@pytest.mark.parametrize("w_bits", [0, 1, layout.MIN_W_BITS, 4, layout.MAX_W_BITS, layout.MAX_W_BITS + 1])
def test_w_bits_bound_is_one(w_bits):
    """QuantConfig (w_bits), ILPConfig (bits), the modules and the C++ ops accept the same code widths."""
    expected = layout.MIN_W_BITS <= w_bits <= layout.MAX_W_BITS
    codes = torch.zeros(2, 1, 4, dtype=torch.int8)
    scales, counts = torch.ones(2, 1), torch.ones(2, dtype=torch.int32)
    sites = {
        "QuantConfig": lambda: mpq.QuantConfig(w_bits=w_bits, avg_bits=None),
        "ILPConfig.bits": lambda: mpq.ILPConfig(bits=(w_bits,)),
        "MultipointLinear": lambda: MultipointLinear(4, 2, 1, w_bits),
        "MultipointConv2d": lambda: MultipointConv2d(4, 2, [1, 1], 1, w_bits, [1, 1], [0, 0], [1, 1]),
        "mpq::fit_multipoint": lambda: ops.fit_multipoint(torch.randn(2, 4), w_bits, 1, False),
        "mpq::pack_points": lambda: ops.pack_points(codes, scales, counts, w_bits),
        "mpq::pack_multipoint": lambda: ops.pack_multipoint(codes, scales, counts, w_bits, 1),
    }
    for name, site in sites.items():
        assert _accepts(site) == expected, name


def _qp(scale=0.05, zp=0.0, qmin=0.0, qmax=255.0):
    return torch.tensor([scale, zp, qmin, qmax], dtype=torch.float32)


@pytest.mark.parametrize(
    "qp, levels_fit",
    [
        (_qp(), True),
        (_qp(zp=-128, qmin=-128, qmax=127), True),
        (_qp(qmax=256), False),  # 257 levels
        (_qp(zp=0.5), False),
        (_qp(qmax=254.5), False),
        (_qp(scale=0.0), False),
        (_qp(scale=float("nan")), False),
        (_qp(qmin=3, qmax=3), False),
        (_qp(zp=300.0), True),  # any integer zero point: the levels fit, the conv's zero padding does not
    ],
)
def test_int8_predicates(qp, levels_fit):
    from mpq.fuse import _int8_levels

    assert layout.int8_levels_fit(qp) == levels_fit
    assert _int8_levels(qp) == levels_fit  # mpq.fuse_activations asks the same rule
    assert not _int8_levels(None)
    zero_level = float(qp[2]) <= float(qp[1]) <= float(qp[2]) + layout.INT8_LEVELS - 1
    slab = layout.SLAB_K
    for code_shape, shape_fits, conv in (
        ([64], True, False),
        ([layout.INT8_MAX_K], True, False),
        ([layout.INT8_MAX_K + 1], False, False),  # Kp over the int32 accumulators' bound
        ([slab, 3, 3], True, True),
        ([slab + 1, 3, 3], False, True),  # not whole slabs of one pixel
        ([2 * slab, 1, 1], True, True),
    ):
        expected = levels_fit and shape_fits and (zero_level or not conv)
        assert layout.packed_int8_fits(qp, code_shape) == expected, code_shape


def test_modules_ask_the_ops_int8_rule():
    """The modules' packed-kernel choice is mpq::packed_int8_fits, in eager and TorchScript alike."""
    slab = layout.SLAB_K
    cases = [
        (MultipointConv2d(slab, 8, [3, 3], 2, 4, [1, 1], [1, 1], [1, 1]), True),
        (MultipointConv2d(slab + 2, 8, [3, 3], 2, 4, [1, 1], [1, 1], [1, 1]), False),
        (MultipointConv2d(4 * slab, 4 * layout.TILE_N, [1, 1], 2, 4, [1, 1], [0, 0], [1, 1], groups=4), True),
        (MultipointLinear(100, 8, 2, 4), True),
        (MultipointLinear(layout.INT8_MAX_K + 1, 2, 1, 4), False),
    ]
    for m, fits in cases:
        assert not m._int8_kernel_fits()  # no act_qparams: float activations
        m.set_act_qparams(0.05, 3, 0, 255)
        assert m._int8_kernel_fits() == fits == layout.packed_int8_fits(m.act_qparams, m.code_shape)
        m.set_act_qparams(0.05, 0, 0, 256)
        assert not m._int8_kernel_fits()
    scripted = torch.jit.script(cases[0][0])
    assert scripted._int8_kernel_fits() is False  # act_qparams 257 levels, as the eager module
    conv = MultipointConv2d(slab, layout.TILE_N, [1, 1], 1, 4, [1, 1], [0, 0], [1, 1], groups=2)
    assert not conv.packable()  # fewer than TILE_N channels per group
    assert MultipointConv2d(2 * slab, 2 * layout.TILE_N, [1, 1], 1, 4, [1, 1], [0, 0], [1, 1], groups=2).packable()


def test_point_bits_is_the_one_cost():
    """bits_per_weight, model_size_bytes and the companding layer count a point with point_bits;
    QuantConfig's avg_bits bound follows it and its scale_bits."""
    from mpq.summary import model_size_bytes

    torch.manual_seed(0)
    m = MultipointConv2d(3, 5, [3, 3], 3, 3, [1, 1], [1, 1], [1, 1], bias=False)
    D = 27
    codes = torch.randint(-3, 4, (5, 3, 3, 3, 3), dtype=torch.int8)
    counts = torch.tensor([1, 2, 3, 0, 1], dtype=torch.int32)
    m.set_weight(codes, torch.rand(5, 3), counts, None)
    T = int(counts.sum())
    assert layout.point_bits(D, 3) == D * 3 + layout.SCALE_BITS
    assert m.bits_per_weight() == pytest.approx(T * layout.point_bits(D, 3) / (5 * D))
    bias_free = torch.nn.Sequential(m)
    assert model_size_bytes(bias_free) == (T * layout.point_bits(D, 3) + 5 * 8) // 8
    # avg_bits may reach max_points points of the costliest channel (D = 1) at the budget's scale price.
    for scale_bits in (32, 16):
        most = 4 * layout.point_bits(1, 4, scale_bits)
        mpq.QuantConfig(max_points=4, scale_bits=scale_bits, avg_bits=most)
        with pytest.raises(ValueError, match="avg_bits"):
            mpq.QuantConfig(max_points=4, scale_bits=scale_bits, avg_bits=most + 0.5)
    with pytest.raises(ValueError, match="scale_bits"):
        mpq.QuantConfig(scale_bits=8)
    assert mpq.QuantConfig().scale_bits == layout.SCALE_BITS
