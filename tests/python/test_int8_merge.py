"""MultipointConfig(int8_merge=True): each channel's first two scales tied to a whole-number ratio,
so that the CPU int8 kernels run its first two points as one int8 row (the kernel side:
test_stored.py::test_points_with_whole_number_scale_ratios_merge_exactly)."""

import pytest
import torch
from torch import nn

import mpq
from small_models import randomize_batchnorm, small_cnn

pytestmark = pytest.mark.usefixtures("one_intraop_thread")


def _quantize(model, calib, merge: bool, **kw):
    cfg = mpq.QuantConfig.preset("W4A8", **{"avg_bits": 6.0, **kw}, method=mpq.MultipointConfig(int8_merge=merge))
    return mpq.quantize(model, calib, cfg)  # verify=True: every layer against its float64 recomputation


def _layers(q):
    return {n: m for n, m in q.named_modules() if isinstance(m, mpq.nn.MultipointLayer)}


# The largest merged code this CPU's int8 kernels compute exactly under 8-bit activations: 127 with
# VNNI, 64 without (oneDNN adds pairs of uint8 x int8 products into a saturating int16 there). The
# fit and its scales do not depend on the CPU; which channels the kernels run as one row does.
MERGED_CODE_LIMIT = 127 if mpq.ops.int8_kernels_exact(8) else 64


def _merged_rows_expected(m) -> torch.Tensor:
    """Per channel of multipoint layer ``m``: the rows int8_merge promises, its point count where
    the first two points' merged codes r * q1 + q2 (r = a1 / a2, whole) fit MERGED_CODE_LIMIT, else 1."""
    codes, scales = m.unpacked()
    C = codes.shape[0]
    out = m.num_points.clone().long()
    two = (m.num_points >= 2).nonzero().flatten()
    r = scales[two, 0].double() / scales[two, 1].double()
    merged = r[:, None] * codes[two, 0].reshape(two.numel(), -1) + codes[two, 1].reshape(two.numel(), -1)
    out[two[merged.abs().amax(1) > MERGED_CODE_LIMIT]] = 1
    return out[:C]


@pytest.mark.parametrize("w_bits", [2, 3, 4])
def test_merged_scales_are_exact_whole_number_ratios_at_little_cost(w_bits):
    torch.manual_seed(0)
    model = randomize_batchnorm(small_cnn())
    calib = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    # max_points=2 for both: int8_merge fits its layers with two points at most (see the next test),
    # so that the plain fit has the same points and allocation to compare with.
    kw = {"w_bits": w_bits, "avg_bits": w_bits + 3.0, "max_points": 2}
    plain, merged = _quantize(model, calib, False, **kw), _quantize(model, calib, True, **kw)
    K = 2 ** (w_bits - 1) - 1
    tied = 0
    for name, m in _layers(merged).items():
        p = _layers(plain)[name]
        codes, scales = m.unpacked()
        assert torch.equal(m.num_points, p.num_points) and torch.equal(codes, p.unpacked()[0])  # codes, counts kept
        if mpq.nn.is_depthwise(m):  # depthwise: its own kernel, left alone
            assert torch.equal(scales, p.unpacked()[1]), name
            continue
        two = (m.num_points >= 2).nonzero().flatten()
        a0, a1 = scales[two, 0].double(), scales[two, 1].double()
        r = a0 / a1
        assert torch.equal(r, r.round()) and bool((r >= 1).all()) and bool((r <= (127 - K) // K).all()), name
        merged_codes = r[:, None] * codes[two, 0].flatten(1) + codes[two, 1].flatten(1)
        assert bool((merged_codes.abs() <= 127).all())
        tied += two.numel()
        merged_points = mpq.ops.int8_merged_points(
            m.point_codes, m.point_scales, m.num_points, w_bits, codes[0, 0].numel()
        )
        # the kernels run them as one int8 row where this CPU's int8 kernels take the merged codes
        assert torch.equal(merged_points.long(), _merged_rows_expected(m)), name
        # The tie costs a little of each layer's output SQNR (calibration H). Measured on this model:
        # at most 0.069 dB (layer 0 at 2 bits; 0.026 at 3, 0.015 at 4); allowed 0.1 dB.
        assert m.output_sqnr_db >= p.output_sqnr_db - 0.1, (name, m.output_sqnr_db, p.output_sqnr_db)
        one = m.num_points == 1
        assert torch.equal(scales[one, 0], p.unpacked()[1][one, 0])  # one-point channels untouched
    assert tied >= 15  # measured 19-23 of the 58 channels outside the depthwise conv


def test_int8_row_layers_get_two_points_each_one_int8_row():
    """int8_merge fits the layers that run on the int8 rows with at most two points per channel
    (a third would be a further int8 column, keeping the layer off the fused uint8 output); the
    depthwise conv keeps max_points. Every channel of those layers is then exactly one int8 row."""
    torch.manual_seed(0)
    model = randomize_batchnorm(small_cnn())
    calib = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    plain, merged = _quantize(model, calib, False, avg_bits=11.0), _quantize(model, calib, True, avg_bits=11.0)
    three = fitting = channels = 0
    for name, m in _layers(merged).items():
        if m.act_qparams is None or m.max_points == 1:  # first / last layer: one 8-bit point
            continue
        depthwise = mpq.nn.is_depthwise(m)
        assert m.max_points == (4 if depthwise else 2), name
        three += int((_layers(plain)[name].num_points > 2).sum())
        if depthwise:
            continue
        assert int(m.num_points.max()) == 2, name
        D = int(torch.Size(m.code_shape).numel())
        rows = mpq.ops.int8_merged_points(m.point_codes, m.point_scales, m.num_points, m.w_bits, D)
        # all of a channel's points in one row (with VNNI: every channel; without: those whose merged
        # codes fit 7 bits)
        assert torch.equal(rows.long(), _merged_rows_expected(m)), name
        fitting += int((rows.long() == m.num_points.long()).sum())
        channels += rows.numel()
    assert three > 0  # the plain fit does give channels more than two points here (13 in the inner layers)
    if MERGED_CODE_LIMIT == 127:
        assert fitting == channels


def test_float_activation_layers_are_left_alone():
    """W4A16 layers never run on the int8 rows: int8_merge changes nothing there."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 8))
    calib = [torch.randn(16, 24, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    kw = {"a_bits": None, "w_bits": 4, "avg_bits": 6.0}
    plain, merged = _quantize(model, calib, False, **kw), _quantize(model, calib, True, **kw)
    for name, m in _layers(merged).items():
        assert torch.equal(m.unpacked()[1], _layers(plain)[name].unpacked()[1])


def test_seven_bit_activations_make_every_merged_row_exact_on_every_cpu():
    """The W4A7 preset (for CPUs without VNNI): against 7-bit activations the int8 kernels compute
    every int8 code exactly (2 * 127 * 128 <= 32767), so with int8_merge every channel of the layers
    on the int8 rows is one row on every CPU, and the fused model (uint8 levels of 7-bit grids that
    oneDNN writes itself, clamped by its hardtanh) stays within the float64 bounds."""
    torch.manual_seed(0)
    model = randomize_batchnorm(small_cnn())
    calib = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    cfg = mpq.QuantConfig.preset("W4A7", avg_bits=6.0, method=mpq.MultipointConfig(int8_merge=True))
    q = mpq.quantize(model, calib, cfg)  # verify=True: every layer against its float64 recomputation
    rows = channels = 0
    for name, m in _layers(q).items():
        if m.act_qparams is None or m.max_points == 1 or mpq.nn.is_depthwise(m):
            continue
        levels = int(m.act_qparams[3] - m.act_qparams[2]) + 1
        assert levels == 128, name
        D = int(torch.Size(m.code_shape).numel())
        merged = mpq.ops.int8_merged_points(m.point_codes, m.point_scales, m.num_points, m.w_bits, D, levels)
        assert torch.equal(merged.long(), m.num_points.long()), name
        rows += int((m.num_points == 2).sum())
        channels += m.num_points.numel()
    assert rows > 0 and channels > 0
    # fuse_activations checks every fused layer against its float64 recomputation (raises if off)
    fused = mpq.fuse_activations(q, calib[0][:2])
    assert sum(type(m).__name__ == "FusedMultipointConv2d" for m in fused.modules()) >= 2
