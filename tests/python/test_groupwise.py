"""Group-wise grids (mpq.methods.groupwise, mpq.nn.groupwise): the 4-bit format of GPTQ / AWQ
checkpoints and torchao's int4 weight-only, as a peer of multipoint at equal memory (issue 15).

Exact properties of the grids and the GPTQ sweep on small problems against float64 references,
then quantized models (every layer type) through mpq.quantize, the simulation check, save/load,
TorchScript and BatchNorm re-estimation, with the bits counted as stored."""

import copy
import math

import pytest
import torch

import mpq
from mpq.fold import fold_batchnorm
from mpq.layout import group_count, groupwise_bits
from mpq.methods.awq import awq_quantize
from mpq.methods.gptq import (
    gptq_block_factors,
    gptq_quantize_blocked,
    gptq_quantize_groups,
    gptq_quantize_on_grid,
)
from mpq.methods.groupwise import code_range, groupwise_codes, groupwise_grid
from mpq.methods.uniform import weighted_error
from mpq.nn import GroupwiseConv2d, GroupwiseLayer, GroupwiseLinear
from mpq.simulate import check_simulation
from small_models import randomize_batchnorm, small_cnn


def _random_h(D: int, n: int = 400, seed: int = 0) -> torch.Tensor:
    """A correlated second moment [1, D, D], like real layer inputs."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5 + torch.eye(D, dtype=torch.float64)
    x = torch.randn(n, D, generator=g, dtype=torch.float64) @ mix
    return (x.T @ x / n)[None]


def _weight(C: int = 24, D: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Heavy-tailed rows with per-group magnitude changes: what makes groups worth their scales.
    w = torch.randn(C, D, generator=g) * torch.rand(C, D // 8, generator=g).repeat_interleave(8, 1)
    return w.float()


# ---- the grid ----------------------------------------------------------------------------------


def test_bits_as_stored():
    assert groupwise_bits(384, 4, 128, True) == 4 + 16 / 128  # 4.125
    assert groupwise_bits(384, 4, 128, False) == 4 + 20 / 128  # 4.156
    assert groupwise_bits(384, 4, 32, True) == 4.5
    assert groupwise_bits(100, 3, 32, False) == (300 + 4 * 19) / 100  # the last group shorter
    assert group_count(9, 32) == 1 and group_count(9, 0) == 1 and group_count(65, 32) == 3


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("rule", ["minmax", "mse"])
@pytest.mark.parametrize("D, g", [(96, 32), (100, 32), (9, 32)])
def test_grid_values_are_scale_times_code_minus_zero(symmetric, rule, D, g):
    w = _weight(16, 104)[:, :D]
    grid = groupwise_grid(w, 4, g, symmetric, rule)
    G = group_count(D, min(g, D))
    assert grid.scales.shape == (16, G) and torch.equal(grid.scales, grid.scales.half().float())  # float16 values
    codes = groupwise_codes(w, grid, 4)
    lo, hi = code_range(4, symmetric)
    assert int(codes.min()) >= lo and int(codes.max()) <= hi
    # float64 reference, weight by weight
    ref = torch.empty(16, D, dtype=torch.float64)
    size = min(g, D)
    for j in range(16):
        for d in range(D):
            z = 0 if symmetric else int(grid.zeros[j, d // size])
            ref[j, d] = float(grid.scales[j, d // size]) * (int(codes[j, d]) - z)
    assert torch.equal(grid.values(codes), ref)
    # every weight is within half a step of its grid value unless clipped
    s = grid.per_weight(D)[0]
    inside = (codes > lo) & (codes < hi)
    assert bool(((w.double() - ref).abs()[inside] <= s[inside] / 2 + 1e-12).all())


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_grid_never_loses_to_minmax_and_groups_beat_channels(symmetric):
    w = _weight()
    err = {}
    for rule in ("minmax", "mse"):
        for g in (0, 32):
            grid = groupwise_grid(w, 4, g, symmetric, rule)
            err[rule, g] = float((grid.values(groupwise_codes(w, grid, 4)) - w.double()).square().sum())
    assert err["mse", 32] <= err["minmax", 32] * (1 + 1e-3)
    assert err["mse", 0] <= err["minmax", 0] * (1 + 1e-3)
    # measured: 32-weight groups cut the squared error to 0.64x of one grid per channel (symmetric)
    assert err["mse", 32] < 0.75 * err["mse", 0], err


def test_asymmetric_grid_fits_one_sided_groups_better():
    w = _weight().abs() + 0.05  # one-sided: a symmetric grid wastes its negative half
    e = {}
    for sym in (True, False):
        grid = groupwise_grid(w, 4, 32, sym, "mse")
        e[sym] = float((grid.values(groupwise_codes(w, grid, 4)) - w.double()).square().sum())
    assert e[False] < 0.5 * e[True], e


def test_config_checks_name_the_field():
    with pytest.raises(ValueError, match=r"mpq.RTNConfig: expected group_size to be 0 .* or an int >= 2"):
        mpq.RTNConfig(group_size=1)
    with pytest.raises(ValueError, match=r"mpq.GPTQConfig: expected group_size to be an int >= 0"):
        mpq.GPTQConfig(group_size=-32)
    with pytest.raises(ValueError, match=r"mpq.GPTQConfig: expected symmetric to be a bool"):
        mpq.GPTQConfig(symmetric="no")
    with pytest.raises(ValueError, match=r"GroupwiseLinear: expected group_size 0 or an int >= 2"):
        GroupwiseLinear(8, 4, 4, group_size=1)


# ---- GPTQ on group-wise grids --------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_groups_beat_round_to_nearest_in_output_error(symmetric, act_order):
    w = _weight(32, 96)
    H = _random_h(96)
    codes, grid = gptq_quantize_groups(w, H, 3, 32, symmetric, "mse", 0.01, act_order)
    lo, hi = code_range(3, symmetric)
    assert int(codes.min()) >= lo and int(codes.max()) <= hi
    e_gptq = weighted_error(w.double() - grid.values(codes), H).sum()
    rtn_grid = groupwise_grid(w, 3, 32, symmetric, "mse")
    e_rtn = weighted_error(w.double() - rtn_grid.values(groupwise_codes(w, rtn_grid, 3)), H).sum()
    # measured 0.59-0.64x (symmetric / asymmetric, with and without act-order)
    assert e_gptq < 0.75 * e_rtn, (float(e_gptq), float(e_rtn))


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest_on_a_fixed_grid():
    # With a diagonal H no column's error is spread: on a fixed grid GPTQ is RTN exactly.
    w = _weight(12, 64)
    H = torch.diag(torch.rand(64, dtype=torch.float64) + 0.1)[None]
    grid = groupwise_grid(w, 4, 16, False, "mse")
    assert torch.equal(gptq_quantize_on_grid(w, H, grid, 4, act_order=True), groupwise_codes(w, grid, 4))


def test_blockwise_gptq_with_one_block_is_the_full_sweep_on_the_grid():
    from mpq.calibrate import LayerStats

    w = _weight(16, 64)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 64, generator=g, dtype=torch.float64) @ (
        torch.randn(64, 64, generator=g, dtype=torch.float64) / 8 + torch.eye(64, dtype=torch.float64)
    )
    stats = LayerStats(
        gram=(x.T @ x / 300)[None], samples=None, act_values=torch.zeros(1), act_min=0.0, act_max=0.0, order=0
    )
    grid = groupwise_grid(w, 4, 16, True, "mse")
    blocks = gptq_block_factors(stats, 1, 0.01, False, 64)
    blocked = gptq_quantize_blocked(w, blocks, None, 4, stats, grid)
    full = gptq_quantize_on_grid(w, stats.gram.double(), grid, 4, damp=0.01)
    assert torch.equal(blocked, full)


# ---- layers and models ------------------------------------------------------------------------------


def _quantize(model, method, **cfg):
    torch.manual_seed(0)
    calib = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    return mpq.quantize(model, calib, mpq.QuantConfig(method=method, **cfg)), calib


@pytest.mark.parametrize(
    "method",
    [
        mpq.RTNConfig(group_size=8, symmetric=True),
        mpq.RTNConfig(group_size=16, symmetric=False),
        mpq.GPTQConfig(group_size=8, symmetric=False),
        mpq.GPTQConfig(group_size=32, symmetric=True, act_order=True),
    ],
    ids=["rtn-g8", "rtn-g16-asym", "gptq-g8-asym", "gptq-g32-ao"],
)
@pytest.mark.parametrize("a_bits", [8, None])
def test_every_layer_type_quantizes_to_groupwise_layers(method, a_bits):
    model = randomize_batchnorm(small_cnn())
    before = copy.deepcopy(model.state_dict())
    qmodel, calib = _quantize(model, method, w_bits=4, a_bits=a_bits)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model untouched
    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, GroupwiseLayer)}
    # conv (D = 27: a shorter last group), depthwise (D = 9: one group), grouped strided conv, Linear
    assert set(layers) == {"0", "3", "6", "10"}
    assert isinstance(layers["10"], GroupwiseLinear) and isinstance(layers["3"], GroupwiseConv2d)
    report = mpq.last_report(qmodel)
    weights = bits = 0
    for m in layers.values():
        D = math.prod(m.code_shape)
        assert m.group_size == min(method.group_size, D) and m.symmetric == method.symmetric
        assert m.point_scales.numel() == 0 and m.group_scales.dtype == torch.float16
        assert m.bits_per_weight() == groupwise_bits(D, 4, m.group_size, m.symmetric)
        C = m.num_points.numel()
        weights += C * D
        bits += m.bits_per_weight() * C * D
        # the dense weight against a float64 recomputation from the stored codes, scales and zeros
        codes = m.unpacked()[0].reshape(C, D).double()
        s = m.group_scales.double().repeat_interleave(m.group_size, 1)[:, :D]
        z = m.zero_points().double().repeat_interleave(m.group_size, 1)[:, :D]
        assert torch.equal(m.dequantized_weight().reshape(C, D).double(), s * (codes - z))
    assert report.avg_bits == pytest.approx(bits / weights, rel=1e-9)
    # mpq.quantize's own simulation check ran layer by layer against float64; repeat it here
    check = check_simulation(qmodel, calib[0])
    assert check.max_ratio <= 1.0


def test_groups_never_lose_to_channels_layer_by_layer():
    # A group's MSE-optimal scale is at least as good on the group as the channel's scale, so each
    # layer's weight error on 8-weight groups is at most the per-channel grid's (up to the float16
    # rounding of the group scales).
    torch.manual_seed(0)
    model = randomize_batchnorm(small_cnn())
    folded = copy.deepcopy(model)
    fold_batchnorm(folded, torch.randn(2, 3, 16, 16))
    floats = dict(folded.named_modules())
    dense = {}
    for name, method in (("channel", mpq.RTNConfig()), ("g8", mpq.RTNConfig(group_size=8))):
        qmodel, _ = _quantize(model, method, w_bits=4, a_bits=None, rtn_range="mse")
        layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, mpq.nn.MultipointLayer)}
        dense[name] = {n: m.dequantized_weight().double() for n, m in layers.items()}
    assert set(dense["g8"]) == {"0", "3", "6", "10"}
    for n in dense["g8"]:
        w = floats[n].weight.detach().double()
        e_c, e_g = (float((d[n] - w).square().sum()) for d in (dense["channel"], dense["g8"]))
        assert e_g <= e_c * (1 + 1e-3), (n, e_g, e_c)


def test_save_load_and_torchscript_keep_the_stored_form(tmp_path):
    qmodel, calib = _quantize(
        randomize_batchnorm(small_cnn()), mpq.GPTQConfig(group_size=8, symmetric=False), w_bits=3, a_bits=8
    )
    path = tmp_path / "g.mpq.safetensors"
    mpq.save(qmodel, path)
    loaded = mpq.load(path, randomize_batchnorm(small_cnn()))
    x = calib[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
    scripted = torch.jit.script(qmodel)
    with torch.no_grad():
        assert torch.equal(scripted(x), qmodel(x))
    sd = {k: v for k, v in qmodel.state_dict().items() if k.startswith("6.")}
    assert sd["6.group_scales"].dtype == torch.float16 and sd["6.group_zeros"].dtype == torch.uint8
    assert sd["6.point_codes"].shape == (32, math.ceil(4 * 9 * 3 / 8))  # 3-bit codes, packed


def test_batchnorm_reestimation_scales_the_group_scales():
    m = GroupwiseLinear(16, 4, 4, group_size=8, symmetric=False)
    codes = torch.randint(-8, 8, (4, 1, 16), dtype=torch.int8)
    m.set_weight(codes, torch.ones(4, 1), torch.ones(4, dtype=torch.int32), torch.zeros(4))
    m.set_grid(torch.rand(4, 2) * 0.1, torch.randint(-8, 8, (4, 2)))
    before = m.dequantized_weight().double()
    a = torch.tensor([0.5, 2.0, 1.3, 0.9])
    m.scale_channels_(a)
    after = m.dequantized_weight().double()
    # float16 rounding of the new scales: relative error at most 2^-11
    assert torch.allclose(after, before * a.double()[:, None], rtol=2**-11, atol=0)


def test_bad_grid_arguments_are_refused_before_any_change():
    m = GroupwiseLinear(16, 4, 4, group_size=8, symmetric=True)
    with pytest.raises(ValueError, match=r"GroupwiseLinear.set_grid: expected zeros None \(symmetric layer\)"):
        m.set_grid(torch.ones(4, 2), torch.zeros(4, 2, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"GroupwiseLinear.set_grid: expected finite scales >= 0"):
        m.set_grid(torch.full((4, 2), 1e6), None)  # beyond float16's range
    with pytest.raises(ValueError, match=r"GroupwiseLinear.set_weight: expected scales all 1"):
        m.set_weight(
            torch.zeros(4, 1, 16, dtype=torch.int8), torch.full((4, 1), 2.0), torch.ones(4, dtype=torch.int32), None
        )
    assert bool((m.group_scales == 0).all())


def test_integer_only_and_onnx_export_refuse_dequantized_layers():
    # Codes that stand for group-scaled values (or codebook levels) are no integer grid per point:
    # integer-only inference and the ONNX export say so instead of computing with the raw codes.
    pytest.importorskip("onnx", reason="the ONNX export needs onnx (the export extra)")
    qmodel, calib = _quantize(randomize_batchnorm(small_cnn()), mpq.RTNConfig(group_size=8), w_bits=4, a_bits=8)
    with pytest.raises(ValueError, match=r"mpq.integer_only: layer '0' is a GroupwiseConv2d"):
        mpq.integer_only(qmodel, calib[0])
    with pytest.raises(ValueError, match=r"mpq.export_onnx: .*not codebook or group-wise layers"):
        mpq.export_onnx(qmodel, calib[0][:1], "unused.onnx")


# ---- AWQ-style activation-aware scaling --------------------------------------------------------------


def _stats_with_outlier_channels(D: int, n: int = 512, seed: int = 0):
    from mpq.calibrate import LayerStats

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    x[:, :4] *= 20  # a few input channels carry large activations, as in transformers
    return LayerStats(
        gram=(x.T @ x / n)[None], samples=None, act_values=torch.zeros(1), act_min=0.0, act_max=0.0, order=0
    )


def test_awq_scaling_lowers_the_output_error_and_alpha_zero_is_rtn():
    w = _weight(32, 96)
    stats = _stats_with_outlier_channels(96)
    H = stats.gram
    cfg = mpq.AWQConfig(group_size=32, symmetric=False)
    codes, grid, alpha = awq_quantize(w, stats, 1, 3, cfg, "mse", 1, 1024.0)
    assert grid.input_scales.shape == (1, 96) and alpha > 0
    e_awq = float(weighted_error(w.double() - grid.values(codes), H).sum())
    rtn_grid = groupwise_grid(w, 3, 32, False, "mse")
    e_rtn = float(weighted_error(w.double() - rtn_grid.values(groupwise_codes(w, rtn_grid, 3)), H).sum())
    assert e_awq < 0.6 * e_rtn, (e_awq, e_rtn, alpha)  # measured 0.33x (alpha 0.4)
    # one exponent (alpha = 0): every input scale 1, the round-to-nearest grid exactly
    codes0, grid0, alpha0 = awq_quantize(w, stats, 1, 3, mpq.AWQConfig(32, False, grid=1), "mse", 1, 1024.0)
    assert alpha0 == 0 and bool((grid0.input_scales == 1).all())
    assert torch.equal(codes0, groupwise_codes(w, rtn_grid, 3)) and torch.equal(grid0.scales, rtn_grid.scales)


def test_awq_layers_divide_by_their_input_scales_and_round_trip(tmp_path):
    qmodel, calib = _quantize(randomize_batchnorm(small_cnn()), mpq.AWQConfig(group_size=8), w_bits=4, a_bits=None)
    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, GroupwiseLayer)}
    assert set(layers) == {"0", "3", "6", "10"}
    for m in layers.values():
        C, D = m.num_points.numel(), math.prod(m.code_shape)
        cin = m.code_shape[0]
        G = m.input_scales.numel() // cin
        assert m.input_scales.numel() == getattr(m, "in_channels", getattr(m, "in_features", None))
        # float64 reference: scale * (code - zero) / input scale of the weight's input channel
        codes = m.unpacked()[0].reshape(C, D).double()
        s = m.group_scales.double().repeat_interleave(m.group_size, 1)[:, :D]
        z = m.zero_points().double().repeat_interleave(m.group_size, 1)[:, :D]
        div = m.input_scales.double().view(G, cin).repeat_interleave(D // cin, 1).repeat_interleave(C // G, 0)
        torch.testing.assert_close(
            m.dequantized_weight().reshape(C, D).double(), s * (codes - z) / div, rtol=2e-7, atol=0
        )
        assert m.bits_per_weight() == pytest.approx(groupwise_bits(D, 4, m.group_size, False) + 16 * cin * G / (C * D))
    path = tmp_path / "awq.mpq.safetensors"
    mpq.save(qmodel, path)
    loaded = mpq.load(path, randomize_batchnorm(small_cnn()))
    with torch.no_grad():
        assert torch.equal(loaded(calib[0]), qmodel(calib[0]))
        assert torch.equal(torch.jit.script(qmodel)(calib[0]), qmodel(calib[0]))


# ---- the ops: mpq::groupwise_linear / groupwise_conv2d ----------------------------------------------


def _layer_inputs(qmodel, x):
    """Each group-wise layer's input on x (forward pre-hooks)."""
    seen, hooks = {}, []
    for n, m in qmodel.named_modules():
        if isinstance(m, GroupwiseLayer):
            hooks.append(m.register_forward_pre_hook(lambda mod, args, n=n: seen.__setitem__(n, args[0])))
    with torch.no_grad():
        qmodel(x)
    for h in hooks:
        h.remove()
    return seen


def _dequantize_then_float(m, x):
    """The layer computed the way it was before the ops: decode in Python, then the float op."""
    w = m.dequantized_weight()
    return m._linear(x, w) if isinstance(m, GroupwiseLinear) else m._conv2d(x, w)


@pytest.mark.parametrize(
    "method",
    [mpq.RTNConfig(group_size=8, symmetric=True), mpq.GPTQConfig(group_size=16, symmetric=False), mpq.AWQConfig(8)],
    ids=["rtn-g8", "gptq-g16-asym", "awq-g8"],
)
@pytest.mark.parametrize("a_bits", [8, None])
def test_the_ops_equal_the_python_decode_bit_for_bit_and_follow_changes(method, a_bits):
    qmodel, calib = _quantize(randomize_batchnorm(small_cnn()), method, w_bits=4, a_bits=a_bits)
    inputs = _layer_inputs(qmodel, calib[0])
    assert set(inputs) == {"0", "3", "6", "10"}  # conv, depthwise, grouped strided conv, Linear
    with torch.no_grad():
        for name, x in inputs.items():
            m = qmodel.get_submodule(name)
            for _ in range(2):  # the first call decodes and caches, the second reads the cache
                assert torch.equal(m(x), _dequantize_then_float(m, x)), name
            # an in-place change of a table is seen on the next call (the cache follows versions)
            m.group_scales.mul_(2)
            assert torch.equal(m(x), _dequantize_then_float(m, x)), name
            if m.input_scales.numel():
                m.input_scales.mul_(0.5)
                assert torch.equal(m(x), _dequantize_then_float(m, x)), name
            # float64 inputs decode per call, in float64 after the float32 decode
            assert torch.equal(m.double()(x.double()), _dequantize_then_float(m, x.double())), name
            m.float()


def test_groupwise_model_exports_with_torch_export():
    qmodel, calib = _quantize(
        randomize_batchnorm(small_cnn()), mpq.GPTQConfig(group_size=8, symmetric=False), w_bits=4, a_bits=8
    )
    x = calib[0]
    ep = torch.export.export(qmodel, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"mpq.groupwise_linear.default", "mpq.groupwise_conv2d.default"} <= targets
    with torch.no_grad():
        assert torch.equal(ep.module()(x), qmodel(x))


def test_the_ops_refuse_bad_tables_naming_the_op_and_argument():
    m = GroupwiseLinear(20, 4, 4, group_size=8, symmetric=False)
    args = [m.point_codes, m.group_scales, m.group_zeros, m.input_scales, 4, 8, m.bias]
    x = torch.randn(2, 20)
    op = torch.ops.mpq.groupwise_linear
    with pytest.raises(RuntimeError, match=r"mpq::groupwise_linear: expected group_scales with 2 groups"):
        op(torch.randn(2, 16), *args)
    with pytest.raises(RuntimeError, match=r"mpq::groupwise_linear: expected point_codes uint8 \[4, 10\]"):
        op(x, m.point_codes[:, :5], *args[1:])
    with pytest.raises(RuntimeError, match=r"mpq::groupwise_linear: expected group_zeros uint8"):
        op(x, m.point_codes, m.group_scales, m.group_zeros[:, :0], *args[3:])
    with pytest.raises(RuntimeError, match=r"mpq::groupwise_linear: expected w_bits"):
        op(x, *args[:4], 1, 8, m.bias)
    with pytest.raises(RuntimeError, match=r"mpq::groupwise_linear: expected a floating input"):
        op(x.to(torch.int32), *args)
    with pytest.raises(RuntimeError, match=r"mpq::groupwise_linear: expected bias"):
        op(x, *args[:-1], torch.zeros(5))
    conv = GroupwiseConv2d(4, 8, [3, 3], 4, 8, True, [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match=r"mpq::groupwise_conv2d: expected input \[N, 4, H, W\]"):
        torch.ops.mpq.groupwise_conv2d(
            torch.randn(1, 3, 8, 8),
            conv.point_codes,
            conv.group_scales,
            conv.group_zeros,
            conv.input_scales,
            4,
            8,
            conv.code_shape,
            conv.bias,
            conv.stride,
            conv.padding,
            conv.dilation,
            1,
        )


# ---- AdaRound on a group-wise grid ------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
def test_groupwise_adaround_rounds_each_weight_down_or_up_and_beats_rtn_on_the_same_grid(symmetric):
    # The grid round to nearest would use (its float16 scales and zero points), the rounding learned:
    # each stored code is floor(w / s) + zero or one more (within the code range), and the output
    # error tr(dW H dW^T) falls below round to nearest's on that grid.
    from mpq.methods.adaround import adaround_quantize

    bits, g = 3, 8
    w = 0.05 * _weight(C=16, D=32).double()  # a trained layer's size (the regulariser's lambda)
    H = _random_h(32, seed=1)
    grid = groupwise_grid(w, bits, g, symmetric, "mse")
    s, z = grid.per_weight(32)
    lo, hi = code_range(bits, symmetric)
    codes = adaround_quantize(w, H, s, bits, iters=300, zero=z, limits=(lo, hi)).double()
    down = torch.floor(w / s) + z
    assert bool(((codes == down) | (codes == down + 1) | (codes == lo) | (codes == hi)).all())
    assert codes.min() >= lo and codes.max() <= hi
    e_ada = weighted_error(w - grid.values(codes), H).sum()
    e_rtn = weighted_error(w - grid.values(groupwise_codes(w, grid, bits)), H).sum()
    assert e_ada < 0.8 * e_rtn, (float(e_ada), float(e_rtn))  # measured 0.62 (symmetric), 0.70


def test_groupwise_adaround_quantizes_every_layer_type_to_groupwise_layers():
    qmodel, calib = _quantize(
        randomize_batchnorm(small_cnn()),
        mpq.AdaRoundConfig(iters=60, group_size=8, symmetric=False),
        w_bits=4,
        a_bits=8,
    )
    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, GroupwiseLayer)}
    assert set(layers) == {"0", "3", "6", "10"}
    for m in layers.values():
        assert not m.symmetric and m.group_size == min(8, math.prod(m.code_shape))
    assert check_simulation(qmodel, calib[0]).max_ratio <= 1.0
    with pytest.raises(ValueError, match=r"group_size"):
        mpq.AdaRoundConfig(group_size=1)
