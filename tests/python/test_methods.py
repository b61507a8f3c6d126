"""The baseline weight quantizers (docs/ALGORITHM.md section 5): GPTQ, AdaRound, OCS, bias correction,
ILP bit allocation, AdaQuant, the companding (post-training LCQ) quantizer and BatchNorm
re-estimation. Exact properties on small problems, then each method against RTN on the real
EfficientNet-Lite0 where its paper says it should win, with measured margins.

Real-model measurements (16 calibration crops, 37 evaluation photos, weights substituted into the
BN-folded float model, activations in float) are quoted beside each assertion.
"""

import copy
import itertools

import numpy as np
import pytest
import torch
from torch import nn

import mpq
from mpq.bn_reestimate import reestimate_batchnorm
from mpq.calibrate import calibrate, find_targets
from mpq.examples import assets
from mpq.examples.demo import fidelity, load_demo_data
from mpq.fold import fold_batchnorm
from mpq.methods import LayerContext, get_method
from mpq.methods.adaquant import adaquant_quantize, centred_moment
from mpq.methods.adaround import adaround_quantize
from mpq.methods.bias_correction import corrected_bias
from mpq.methods.companding import compand, compand_inverse, companding_quantize
from mpq.methods.gptq import gptq_quantize
from mpq.methods.ilp import solve_bit_allocation
from mpq.methods.ocs import ocs_fold_codes, ocs_nominal_bits, ocs_split
from mpq.methods.uniform import channel_scales, layer_hessian, round_to_grid, weighted_error
from mpq.nn import CodebookConv2d, CodebookLinear


def _dequantize(fit) -> torch.Tensor:
    """[C, D] float64 weight of a FittedWeight (its own point counts, else one point)."""
    C, P, _ = fit.codes.shape
    n = fit.num_points if fit.num_points is not None else torch.ones(C, dtype=torch.int32)
    keep = (torch.arange(P)[None, :] < n[:, None]).double() * fit.scales.double()
    return (keep[:, :, None] * fit.levels()).sum(1)


def _random_h(G: int, D: int, n: int = 400, seed: int = 0) -> torch.Tensor:
    """A correlated second moment per group, like real layer inputs."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(G, D, D, generator=g, dtype=torch.float64) / D**0.5 + torch.eye(D, dtype=torch.float64)
    x = torch.einsum("ngd,gde->nge", torch.randn(n, G, D, generator=g, dtype=torch.float64), mix)
    return torch.einsum("ngd,nge->gde", x, x) / n


# ---- exact properties on small problems ------------------------------------------------------


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_uncorrelated_inputs_is_round_to_nearest(act_order):
    # With a diagonal H no column's error is spread to another: GPTQ reduces to RTN exactly.
    w = torch.randn(12, 30, dtype=torch.float64)
    H = torch.diag(torch.rand(30, dtype=torch.float64) + 0.1)[None]
    scale = channel_scales(w, 3, "minmax")
    codes = gptq_quantize(w, H, scale, 3, damp=0.01, act_order=act_order)
    assert torch.equal(codes, round_to_grid(w, scale, 3).to(torch.int8))


def test_gptq_groups_are_independent_and_beat_rtn():
    G, R, D, bits = 3, 5, 24, 3
    w = torch.randn(G * R, D, dtype=torch.float64)
    H = _random_h(G, D)
    scale = channel_scales(w, bits, "mse")
    together = gptq_quantize(w, H, scale, bits)
    for g in range(G):
        rows = slice(g * R, (g + 1) * R)
        assert torch.equal(together[rows], gptq_quantize(w[rows], H[g : g + 1], scale[rows], bits))
    rtn = round_to_grid(w, scale, bits)
    e_gptq = weighted_error(w - scale[:, None] * together.double(), H).sum()
    e_rtn = weighted_error(w - scale[:, None] * rtn, H).sum()
    assert e_gptq < 0.8 * e_rtn, (float(e_gptq), float(e_rtn))


def test_gptq_survives_a_singular_second_moment():
    x = torch.randn(5, 1, 40, dtype=torch.float64)  # 5 rows, D = 40: rank 5
    H = torch.einsum("ngd,nge->gde", x, x) / 5
    H[0, 7, :] = H[0, :, 7] = 0  # a dead input
    w = torch.randn(6, 40, dtype=torch.float64)
    codes = gptq_quantize(w, H, channel_scales(w, 4, "minmax"), 4)
    assert codes.abs().max() <= 7


def test_adaround_codes_round_up_or_down_and_beat_rtn():
    # NB: lambda weighs the regulariser against the output error's absolute size; weights of a
    # trained CNN's size (std 0.05, like Lite0's) keep the paper's lambda = 0.01 meaningful. With
    # std-1 weights the error term is 400x larger and h(V) does not settle at 0 or 1 in time.
    G, R, D, bits = 2, 8, 32, 3
    w = 0.05 * torch.randn(G * R, D, dtype=torch.float64)
    H = _random_h(G, D, seed=1)
    scale = channel_scales(w, bits, "minmax")
    codes = adaround_quantize(w, H, scale, bits, iters=300)
    low = torch.floor(w / scale[:, None])
    assert bool(((codes.double() == low) | (codes.double() == low + 1) | (codes.abs() == 3)).all())
    e_ada = weighted_error(w - scale[:, None] * codes.double(), H).sum()
    e_rtn = weighted_error(w - scale[:, None] * round_to_grid(w, scale, bits), H).sum()
    assert e_ada < 0.75 * e_rtn, (float(e_ada), float(e_rtn))  # measured 0.53


def test_ocs_split_keeps_the_layer_and_folds_honestly():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 10, 9, generator=g, dtype=torch.float64)
    w[3, 4, 0] = 9.0  # an outlier: its input channel is split first, then again
    wide, origin, splits = ocs_split(w, expand_ratio=0.2, split_threshold=0.5)
    assert wide.shape == (16, 12, 9) and len(splits) == 2 and origin[10] == 4
    folded = torch.zeros_like(w).index_add_(1, torch.tensor(origin), wide)
    torch.testing.assert_close(folded, w, rtol=0, atol=1e-12)  # OCS does not change the function
    bits, K = 4, 7
    scale = channel_scales(wide.reshape(16, -1), bits, "minmax")
    q = round_to_grid(wide, scale, bits)
    codes, points = ocs_fold_codes(q, origin, 10, bits)
    assert codes.abs().max() <= K
    total = torch.zeros(16, 10, 9, dtype=torch.float64).index_add_(1, torch.tensor(origin), q).reshape(16, -1)
    torch.testing.assert_close(codes.double().sum(1), total, rtol=0, atol=0)
    # A second point only where the folded codes leave the grid, and every such point is used.
    assert torch.equal(points, torch.ceil(total.abs().amax(1) / K).clamp_min(1).int())
    # The widened layer of OCS itself: 12 instead of 10 channels of 9 codes, plus one scale.
    assert ocs_nominal_bits(16, 10, 9, 4, 0.2) == pytest.approx((12 * 9 * 4 + 32) / 90)


def test_bias_correction_restores_the_mean_output():
    g = torch.Generator().manual_seed(3)
    G, R, D = 2, 4, 6
    x = torch.randn(500, G, D, generator=g, dtype=torch.float64) + 0.7
    w = torch.randn(G * R, D, generator=g, dtype=torch.float64)
    wq = torch.round(w * 2) / 2
    b = torch.randn(G * R, dtype=torch.float64)
    new = corrected_bias(w, wq, b, x.mean(0)).double()
    y = torch.einsum("ngd,grd->ngr", x, w.reshape(G, R, D)).reshape(500, -1) + b
    yq = torch.einsum("ngd,grd->ngr", x, wq.reshape(G, R, D)).reshape(500, -1) + new
    torch.testing.assert_close(yq.mean(0), y.mean(0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_ilp_matches_brute_force_and_respects_its_budget(seed):
    rng = np.random.default_rng(seed)
    L, widths = 6, [2, 3, 4, 8]
    weights = rng.integers(20, 400, size=L)
    sizes = np.array([[n * b + 32 for b in widths] for n in weights])
    costs = np.array([sorted(rng.lognormal(0, 2, size=4), reverse=True) for _ in range(L)])
    budget = int(3.4 * weights.sum())
    choice = solve_bit_allocation(costs, sizes, budget)
    used = sizes[np.arange(L), choice].sum()
    assert used <= budget
    best = min(
        (costs[np.arange(L), c].sum(), c)
        for c in itertools.product(range(4), repeat=L)
        if sizes[np.arange(L), list(c)].sum() <= budget
    )
    assert costs[np.arange(L), choice].sum() == pytest.approx(best[0], rel=1e-9)


def test_ilp_infeasible_budget_takes_the_smallest_widths(caplog):
    with caplog.at_level("WARNING", logger="mpq"):
        assert solve_bit_allocation(np.ones((2, 2)), np.array([[10, 20], [10, 20]]), 15) == [0, 0]
    assert "above the budget" in caplog.text


def test_config_validates_the_method_options():
    cfg = mpq.QuantConfig(method=mpq.ILPConfig(bits=[2, 4, 8], rounding="gptq"), bias_correction=True)
    assert cfg.options.bits == (2, 4, 8) and cfg.options.rounding == mpq.GPTQConfig()
    assert mpq.QuantConfig.from_dict(cfg.to_dict()) == cfg
    for config_type, bad in (
        (mpq.GPTQConfig, {"damp": 0.0}),
        (mpq.AdaRoundConfig, {"iters": 0}),
        (mpq.AdaRoundConfig, {"lr": -1.0}),
        (mpq.AdaRoundConfig, {"reg_lambda": -0.1}),
        (mpq.OCSConfig, {"expand_ratio": 0.0}),
        (mpq.OCSConfig, {"split_threshold": 1.0}),
        (mpq.ILPConfig, {"bits": (1, 4)}),
        (mpq.ILPConfig, {"bits": (4, 4)}),
        (mpq.ILPConfig, {"rounding": "ocs"}),
        (mpq.ILPConfig, {"rounding": "companding"}),
        (mpq.ILPConfig, {"rounding": mpq.OCSConfig()}),
        (mpq.AdaQuantConfig, {"iters": 0}),
        (mpq.AdaQuantConfig, {"lr": 0.0}),
        (mpq.AdaQuantConfig, {"scale_lr": -1e-3}),
        (mpq.CompandingConfig, {"breakpoints": 0}),
        (mpq.CompandingConfig, {"iters": 1.5}),
        (mpq.CompandingConfig, {"lr": 0}),
        (mpq.MultipointConfig, {"point_damp": 0.0}),
        (mpq.MultipointConfig, {"point_rounding": "up"}),
        (mpq.MultipointConfig, {"scale_refit": "both"}),
        (mpq.MultipointConfig, {"exact_fit": 1}),
    ):
        with pytest.raises(ValueError, match=f"mpq.{config_type.__name__}: expected {next(iter(bad))}"):
            config_type(**bad)
    for bad in ({"bias_correction": 1}, {"bn_reestimation": 1}, {"bn_reference": "training"}):
        with pytest.raises(ValueError, match=f"mpq.QuantConfig: expected {next(iter(bad))}"):
            mpq.QuantConfig(**bad)


def test_adaquant_starts_at_rtn_and_never_ends_above_it():
    g = torch.Generator().manual_seed(4)
    G, R, D, bits = 2, 6, 24, 3
    w = 0.05 * torch.randn(G * R, D, generator=g, dtype=torch.float64)
    mix = torch.randn(G, D, D, generator=g, dtype=torch.float64) / D**0.5 + torch.eye(D, dtype=torch.float64)
    x = (
        torch.einsum("ngd,gde->nge", torch.randn(600, G, D, generator=g, dtype=torch.float64), mix) + 0.5
    )  # correlated, mean 0.5
    H, mu = torch.einsum("ngd,nge->gde", x, x) / 600, x.mean(0)
    scale = channel_scales(w, bits, "mse")
    rtn = round_to_grid(w, scale, bits)
    codes, s, db = adaquant_quantize(w, H, mu, scale, bits, iters=0)
    assert torch.equal(codes.double(), rtn)
    torch.testing.assert_close(s, scale, rtol=1e-6, atol=0)
    codes, s, db = adaquant_quantize(w, H, mu, scale, bits, iters=200)
    wq = s[:, None] * codes.double()
    assert codes.abs().max() <= 3 and not torch.equal(codes.double(), rtn)
    # The objective is the exact output error on the calibration rows, bias change included.
    y = torch.einsum("ngd,grd->ngr", x, w.reshape(G, R, D)).reshape(600, -1)
    yq = torch.einsum("ngd,grd->ngr", x, wq.reshape(G, R, D)).reshape(600, -1) + db
    e = weighted_error(w - wq, centred_moment(H, mu))
    torch.testing.assert_close((y - yq).pow(2).mean(0), e, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(
        db, corrected_bias(w, wq, None, mu).double(), rtol=1e-5, atol=1e-7
    )  # bias tuning (float32)
    e_rtn_bc = weighted_error(w - scale[:, None] * rtn, centred_moment(H, mu))
    assert bool((e <= e_rtn_bc * (1 + 1e-6)).all())  # every channel keeps its best iterate, RTN the first
    assert e.sum() < 0.8 * e_rtn_bc.sum(), (float(e.sum()), float(e_rtn_bc.sum()))  # measured 0.57


def test_companding_function_is_monotone_and_inverts():
    theta = torch.randn(16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = torch.linspace(0, 1, 1001, dtype=torch.float64)
    y = compand(x, theta)
    assert float(y[0]) == 0 and float(y[-1]) == pytest.approx(1, abs=1e-12) and bool((y.diff() > 0).all())
    torch.testing.assert_close(compand_inverse(y, theta), x, rtol=0, atol=1e-12)


def test_companding_starts_at_uniform_rtn_and_lowers_the_error():
    g = torch.Generator().manual_seed(6)
    w = 0.05 * torch.randn(16, 64, generator=g, dtype=torch.float64)  # bell-shaped, like trained weights
    H = _random_h(1, 64, seed=6)
    scale = channel_scales(w, 3, "mse")
    rtn = scale[:, None] * round_to_grid(w, scale, 3)
    codes, s, codebook = companding_quantize(w, H, scale, 3, iters=0)
    torch.testing.assert_close(codebook, torch.arange(-3, 4, dtype=torch.float64) / 3)  # c = identity
    torch.testing.assert_close(s[:, None] * codebook[codes.long() + 3], rtn, rtol=1e-5, atol=1e-8)
    codes, s, codebook = companding_quantize(w, H, scale, 3)
    assert codebook.numel() == 7 and torch.equal(codebook, -codebook.flip(0)) and bool((codebook.diff() > 0).all())
    assert float(codebook[-1]) == pytest.approx(1.0) and codes.abs().max() <= 3
    e = weighted_error(w - s[:, None] * codebook[codes.long() + 3], H).sum()
    e_rtn = weighted_error(w - rtn, H).sum()
    assert e < 0.92 * e_rtn, (float(e), float(e_rtn))  # measured 0.85 (0.85-0.93 over seeds 4-8)


def _bn_model() -> nn.Module:
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 1),
        nn.BatchNorm2d(6),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    )
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.weight.data[0] = -0.8  # a negative gamma
            m.bias.data.uniform_(-0.3, 0.3)
    return model.eval()


def _perturbed_fold(model, x, seed):
    """(folded model with perturbed conv weights and biases, its BNs, the folded float convs)."""
    folded, originals = copy.deepcopy(model), {}
    assert len(fold_batchnorm(folded, x[:2], originals=originals)) == 3
    float_convs = {n: copy.deepcopy(folded.get_submodule(n)) for n in originals}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in originals:
            conv = folded.get_submodule(n)
            conv.weight.mul_(1 + 0.3 * torch.randn(conv.weight.shape, generator=g))
            conv.bias.add_(0.2 * torch.randn(conv.bias.shape, generator=g))
    return folded, originals, float_convs


def test_bn_reestimation_is_batchnorm_in_train_mode_on_the_quantized_convs():
    # Re-estimating on one batch = unfolding the perturbed ("quantized") convs and running every
    # BatchNorm on that batch's statistics (train mode), in network order.
    model = _bn_model()
    x = torch.randn(16, 3, 10, 10)
    folded, originals, _ = _perturbed_fold(model, x, seed=8)
    unfolded = copy.deepcopy(model)
    with torch.no_grad():
        for n, bn in originals.items():
            conv, q = unfolded.get_submodule(n), folded.get_submodule(n)
            sigma = torch.sqrt(bn.running_var + bn.eps)
            conv.weight.copy_(q.weight * (sigma / bn.weight).view(-1, 1, 1, 1))
            conv.bias = nn.Parameter((q.bias - bn.bias) * sigma / bn.weight + bn.running_mean)
        changes = reestimate_batchnorm(folded, originals, [x])
        ref, out = unfolded.train()(x), folded(x)
    assert set(changes) == set(originals) and all(bool((a > 0).all()) for a, _ in changes.values())
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_bn_reestimation_to_the_float_statistics():
    # bn_reference="float": every folded conv's output gets the float model's per-channel mean
    # and variance on the calibration batch (upstream layers already corrected).
    model = _bn_model()
    x = torch.randn(16, 3, 10, 10)
    folded, originals, float_convs = _perturbed_fold(model, x, seed=9)
    reference = copy.deepcopy(folded)
    for n, conv in float_convs.items():
        reference.get_submodule(n).load_state_dict(conv.state_dict())
    from mpq.bn_reestimate import output_moments

    reestimate_batchnorm(folded, originals, [x], float_convs)
    got, want = output_moments(folded, list(originals), [x]), output_moments(reference, list(originals), [x])
    for n in originals:
        torch.testing.assert_close(got[n][0], want[n][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[n][1], want[n][1], rtol=1e-3, atol=1e-5)


# ---- through mpq.quantize on a small model ---------------------------------------------------


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, groups=4),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, groups=32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10, bias=False),
    ).eval()


@pytest.mark.parametrize("method", ["gptq", "adaround", "ocs", "ilp", "adaquant", "companding"])
def test_every_method_runs_through_quantize(method):
    model = _small_model()
    calib = [torch.randn(8, 3, 12, 12) for _ in range(2)]
    short = {"adaround": dict(iters=50), "adaquant": dict(iters=50), "companding": dict(iters=30)}
    cfg = mpq.QuantConfig(
        method=method,
        options=short.get(method),
        w_bits=3,
        a_bits=None,
        bias_correction=True,
        avg_bits=3.5,
    )
    q = mpq.quantize(model, calib, cfg)
    report = mpq.last_report(q)
    kinds = (
        (CodebookConv2d, CodebookLinear)
        if method == "companding"
        else (mpq.nn.MultipointConv2d, mpq.nn.MultipointLinear)
    )
    layers = [m for m in q.modules() if isinstance(m, kinds)]
    assert len(layers) == 4 and layers[-1].bias is not None  # bias correction gave the Linear a bias
    if method == "ilp":
        assert report.avg_bits <= 3.5 + 1e-12  # codes and scales of every layer, as in the program
        assert {m.w_bits for m in layers} <= {2, 3, 4, 8}
    else:
        assert all(m.w_bits == 3 for m in layers)
    if method == "ocs":  # the report counts every point stored, second points included
        stored = sum(int(m.num_points.sum()) * (m.codes[0, 0].numel() * 3 + 32) for m in layers)
        assert report.avg_bits == pytest.approx(stored / sum(m.codes[:, 0].numel() for m in layers), rel=1e-12)
    elif method == "companding":  # codes, scales and the 7-level codebook of every layer
        stored = sum(m.codes.numel() * 3 + m.codes.shape[0] * 32 + 7 * 32 for m in layers)
        assert report.avg_bits == pytest.approx(stored / sum(m.codes.numel() for m in layers), rel=1e-12)
    else:
        assert all(int(m.num_points.max()) == 1 for m in layers)
    with torch.no_grad():
        x = torch.randn(4, 3, 12, 12)
        ref, out = model(x), q(x)
    assert float((out - ref).norm() / ref.norm()) < 0.5


def test_companded_layers_store_codes_scales_and_a_codebook(tmp_path):
    model = _small_model()
    calib = [torch.randn(8, 3, 12, 12) for _ in range(2)]
    q = mpq.quantize(model, calib, mpq.QuantConfig(method=mpq.CompandingConfig(iters=30), w_bits=3, a_bits=8))
    layers = [m for m in q.modules() if isinstance(m, (CodebookConv2d, CodebookLinear))]
    assert len(layers) == 4
    for m in layers:
        C, D = m.codes.shape[0], m.codes[0, 0].numel()
        assert m.codebook.numel() == 7 and bool((m.codebook.diff() > 0).all()) and m.codes.abs().max() <= 3
        levels = m.codebook[m.codes[:, 0].long() + 3] * m.scales[:, 0].view([-1] + [1] * (m.codes.dim() - 2))
        torch.testing.assert_close(m.dequantized_weight(), levels, rtol=0, atol=0)
        assert m.bits_per_weight() == pytest.approx((C * (D * 3 + 32) + 7 * 32) / (C * D))
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        out = q(x)
        torch.testing.assert_close(torch.jit.script(q)(x), out)
    assert "companding" not in mpq.summary(q) and "4 multipoint layers" in mpq.summary(q)
    # saved and loaded like the multipoint layers (their own spec kinds), bit for bit
    mpq.save(q, tmp_path / "companding.mpq.safetensors")
    loaded = mpq.load(tmp_path / "companding.mpq.safetensors", _small_model())
    assert [type(m) for m in loaded.modules()] == [type(m) for m in q.modules()]
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


def test_adaquant_bias_tuning_is_bias_correction():
    # AdaQuant's bias change is the mean output shift of its weight: with bias_correction on,
    # mpq's correction supplies the same bias (not twice).
    model = _small_model()
    calib = [torch.randn(8, 3, 12, 12) for _ in range(2)]
    cfg = mpq.QuantConfig(method=mpq.AdaQuantConfig(iters=30), w_bits=3, a_bits=None)
    q1, q2 = mpq.quantize(model, calib, cfg), mpq.quantize(model, calib, cfg.replace(bias_correction=True))
    l1, l2 = ([m for m in q.modules() if isinstance(m, mpq.nn.modules.MultipointLayer)] for q in (q1, q2))
    for a, b in zip(l1, l2):
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
        torch.testing.assert_close(a.bias, b.bias, rtol=1e-5, atol=1e-6)


def test_ilp_composes_with_adaquant_and_keeps_its_budget():
    model = _small_model()
    calib = [torch.randn(8, 3, 12, 12) for _ in range(2)]
    cfg = mpq.QuantConfig(
        method=mpq.ILPConfig(rounding=mpq.AdaQuantConfig(iters=30)),
        w_bits=3,
        a_bits=None,
        avg_bits=4.5,
        sensitivity="relative",
    )
    targets, _ = find_targets(model, cfg)
    stats = calibrate(model, targets, calib, cfg)
    ilp = get_method("ilp")
    chosen = ilp.choose_bits(targets, stats, cfg, None)
    shapes = {t.name: t.weight_matrix().shape for t in targets}
    used = sum(C * (D * chosen[n] + 32) for n, (C, D) in shapes.items())
    assert used <= 4.5 * sum(C * D for C, D in shapes.values()) and len(set(chosen.values())) > 1
    ada = get_method("adaquant")
    for t in targets:  # each layer holds AdaQuant's fit (weights and bias) at its chosen width
        ctx = LayerContext(t, t.weight_matrix().float(), stats[t.name], chosen[t.name], 1, cfg)
        ada_ctx = LayerContext(
            t, t.weight_matrix().float(), stats[t.name], chosen[t.name], 1, cfg.replace(method=cfg.options.rounding)
        )
        a, b = ilp.fit(ctx), ada.fit(ada_ctx)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and torch.equal(a.bias, b.bias)
    q = mpq.quantize(model, calib, cfg)
    assert mpq.last_report(q).avg_bits <= 4.5 + 1e-12  # the program's accounting is the report's


def test_adaquant_bias_correction_and_bn_reestimation_compose():
    model = _bn_model()
    x = torch.randn(16, 3, 10, 10)
    cfg = mpq.QuantConfig(
        method=mpq.AdaQuantConfig(iters=30),
        w_bits=3,
        a_bits=None,
        bias_correction=True,
        bn_reestimation=True,
        bn_reference="float",
    )
    q = mpq.quantize(model, [x], cfg)
    # After re-estimation every conv's output has the float model's statistics on the batch.
    fp, originals = copy.deepcopy(model), {}
    fold_batchnorm(fp, x[:2], originals=originals)
    from mpq.bn_reestimate import output_moments

    got, want = output_moments(q, list(originals), [x]), output_moments(fp, list(originals), [x])
    for n in originals:
        torch.testing.assert_close(got[n][0], want[n][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[n][1], want[n][1], rtol=1e-3, atol=1e-5)
    assert "bn_reestimation" in mpq.last_report(q).seconds


# ---- the real model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0():
    try:
        model = assets.load_efficientnet_lite0()
        data = load_demo_data(calib_images=16)
    except assets.AssetMissing as e:  # pragma: no cover
        pytest.skip(f"offline assets missing: {e}")
    with torch.no_grad():
        ref = model(data.eval_images)
    folded = copy.deepcopy(model)
    fold_batchnorm(folded, data.calib_batches[0][:2])
    cfg = mpq.QuantConfig()
    targets, _ = find_targets(folded, cfg)
    stats = calibrate(folded, targets, data.calib_batches, cfg)
    return model, folded, targets, stats, data, ref


def _fit_all(lite, method, bits, **cfg):
    _, _, targets, stats, _, _ = lite
    c = mpq.QuantConfig(method=method, **cfg)
    q = get_method(method)
    return {
        t.name: _dequantize(q.fit(LayerContext(t, t.weight_matrix().float(), stats[t.name], bits, 1, c)))
        for t in targets
    }


def _relative_errors(lite, wq):
    _, _, targets, stats, _, _ = lite
    out = []
    for t in targets:
        w, H = t.weight_matrix().double(), layer_hessian(stats[t.name], t.groups)
        out.append(float(weighted_error(w - wq[t.name], H).sum() / weighted_error(w, H).sum()))
    return float(np.mean(out))


def _fidelity(lite, wq, bias=None):
    """The folded model with the quantized weights substituted (float activations) vs FP32."""
    _, folded, _, _, data, ref = lite
    m = copy.deepcopy(folded)
    mods = dict(m.named_modules())
    for name, w in wq.items():
        mods[name].weight.data.copy_(w.reshape(mods[name].weight.shape))
        if bias is not None:
            mods[name].bias.data.copy_(bias[name])
    with torch.no_grad():
        return fidelity(m(data.eval_images), ref, data.labels)


def test_gptq_beats_rtn_on_efficientnet_lite0(lite0):
    rtn = _fit_all(lite0, "rtn", 4, rtn_range="mse")
    gptq = _fit_all(lite0, "gptq", 4, rtn_range="mse")
    e_rtn, e_gptq = _relative_errors(lite0, rtn), _relative_errors(lite0, gptq)
    f_rtn, f_gptq = _fidelity(lite0, rtn), _fidelity(lite0, gptq)
    # Measured W4 (MSE grid): mean relative layer-output error RTN 0.0158, GPTQ 0.0037; model KL
    # RTN 2.97, GPTQ 0.47; agreement 16% vs 73%.
    assert e_gptq < 0.4 * e_rtn, (e_rtn, e_gptq)
    assert f_gptq["kl"] * 3 < f_rtn["kl"], (f_rtn, f_gptq)
    assert f_gptq["agreement"] >= f_rtn["agreement"] + 0.3, (f_rtn, f_gptq)


def test_bias_correction_repairs_rtn_on_efficientnet_lite0(lite0):
    _, folded, targets, stats, _, _ = lite0
    rtn = _fit_all(lite0, "rtn", 4, rtn_range="minmax")
    mods = dict(folded.named_modules())
    bias = {
        t.name: corrected_bias(t.weight_matrix(), rtn[t.name], mods[t.name].bias, stats[t.name].mean) for t in targets
    }
    plain, corrected = _fidelity(lite0, rtn), _fidelity(lite0, rtn, bias)
    # Measured W4 min-max RTN: KL 3.57 -> 0.67 with bias correction, agreement 8% -> 59% (the
    # depthwise layers' biased rounding error is what breaks this network, as Nagel et al. found
    # for MobileNetV2).
    assert corrected["kl"] * 2.5 < plain["kl"], (plain, corrected)
    assert corrected["agreement"] >= plain["agreement"] + 0.3, (plain, corrected)


def test_ocs_lowers_the_output_error_of_minmax_rtn(lite0):
    rtn = _fit_all(lite0, "rtn", 4, rtn_range="minmax")
    ocs = _fit_all(lite0, "ocs", 4, rtn_range="minmax")
    # Measured (expand ratio 0.05, 4 bits, min-max grid: the setting OCS replaces clipping in):
    # mean relative layer-output error RTN 0.0203, OCS 0.0141. With an MSE (clipping) grid OCS
    # gains less (0.0158 -> 0.0124) and the model KL does not improve.
    assert _relative_errors(lite0, ocs) < 0.8 * _relative_errors(lite0, rtn)


@pytest.mark.parametrize("name", ["_blocks.1._project_conv", "_blocks.3._project_conv"])
def test_adaround_beats_rtn_on_lite0_layers(lite0, name):
    _, _, targets, stats, _, _ = lite0
    t = next(t for t in targets if t.name == name)
    w, H = t.weight_matrix().float(), layer_hessian(stats[t.name], t.groups)
    scale = channel_scales(w, 4, "mse")
    codes = adaround_quantize(w, H, scale, 4)  # the defaults: 500 steps at 5e-2
    e_rtn = weighted_error(w.double() - scale[:, None] * round_to_grid(w.double(), scale, 4), H).sum()
    e_ada = weighted_error(w.double() - scale[:, None] * codes.double(), H).sum()
    # Measured: 0.0142 -> 0.0082 and 0.0095 -> 0.0055 (relative output error).
    assert e_ada < 0.75 * e_rtn, (float(e_rtn), float(e_ada))


def test_ilp_beats_uniform_bits_at_equal_size_on_lite0(lite0):
    _, _, targets, stats, _, _ = lite0
    n_weights = sum(t.weight_matrix().numel() for t in targets)
    n_channels = sum(t.weight_matrix().shape[0] for t in targets)
    size4 = (4 * n_weights + 32 * n_channels) / n_weights  # uniform 4 bits with its scales
    cfg = mpq.QuantConfig(method="ilp", w_bits=4, avg_bits=size4, sensitivity="relative")
    ilp = get_method("ilp")
    inner = [copy.copy(t) for t in targets]
    chosen = ilp.choose_bits(inner, stats, cfg, None)
    used = sum(t.weight_matrix().shape[0] * (t.weight_matrix().shape[1] * chosen[t.name] + 32) for t in inner)
    assert used <= size4 * n_weights
    assert sum(ilp.program[n][b] for n, b in chosen.items()) <= sum(ilp.program[n][4] for n in chosen)
    wq = {
        t.name: _dequantize(ilp.fit(LayerContext(t, t.weight_matrix().float(), stats[t.name], chosen[t.name], 1, cfg)))
        for t in inner
    }
    f_ilp, f_rtn = _fidelity(lite0, wq), _fidelity(lite0, _fit_all(lite0, "rtn", 4))
    # Measured: the program puts 28 layers at 8 bits, 21 at 4, 1 at 3 (8 bits costs little on the
    # weighted error 0.37 vs 1.02 for uniform 4 bits; model KL 0.56 vs 3.57 at the same size.
    assert f_ilp["kl"] * 3 < f_rtn["kl"], (f_rtn, f_ilp)


def test_gptq_with_bias_correction_through_quantize_on_lite0(lite0):
    model, _, _, _, data, ref = lite0
    cfg = mpq.QuantConfig.preset("W4A8", method="gptq", rtn_range="mse", bias_correction=True)
    q = mpq.quantize(model, data.calib_batches, cfg)
    with torch.no_grad():
        f = fidelity(q(data.eval_images), ref, data.labels)
    # Measured: KL 0.22, agreement 73% (0.46 / 73% without bias correction; RTN W4A8 with the
    # min-max grid, test_quantize.py: KL 3.57, agreement 8%).
    assert f["kl"] < 0.5 and f["agreement"] >= 0.6, f
    assert mpq.last_report(q).avg_bits < 4.2


# ---- AdaQuant, companding and BN re-estimation on the real model ------------------------------


def test_adaquant_beats_rtn_on_lite0_layers(lite0):
    _, _, targets, stats, _, _ = lite0
    # Measured (4 bits, MSE grid start, output error relative to the layer's output energy):
    # RTN / RTN + bias correction / AdaQuant (with its bias) 0.0142 / 0.0037 / 0.0020,
    # 0.0095 / 0.0026 / 0.0012 and 0.0017 / 0.0007 / 0.0005 (the depthwise layer).
    for name, bound in (
        ("_blocks.1._project_conv", 0.7),
        ("_blocks.3._project_conv", 0.7),
        ("_blocks.5._depthwise_conv", 0.9),
    ):
        t = next(t for t in targets if t.name == name)
        w, H, mu = t.weight_matrix().double(), layer_hessian(stats[name], t.groups), stats[name].mean
        scale = channel_scales(w, 4, "mse")
        codes, s, _ = adaquant_quantize(w, H, mu, scale, 4)  # the defaults: 300 steps
        cov = centred_moment(H, mu)
        rtn = w - scale[:, None] * round_to_grid(w, scale, 4)
        e_rtn, e_rtn_bc = weighted_error(rtn, H).sum(), weighted_error(rtn, cov).sum()
        e_ada = weighted_error(w - s[:, None] * codes.double(), cov).sum()
        assert e_ada < 0.4 * e_rtn and e_ada < bound * e_rtn_bc, (name, float(e_rtn), float(e_rtn_bc), float(e_ada))


def test_adaquant_improves_rtn_on_lite0_w4a16(lite0):
    _, folded, targets, stats, _, _ = lite0
    cfg = mpq.QuantConfig(method=mpq.AdaQuantConfig(iters=100), rtn_range="mse")
    ada = get_method("adaquant")
    fits = {t.name: ada.fit(LayerContext(t, t.weight_matrix().float(), stats[t.name], 4, 1, cfg)) for t in targets}
    f_ada = _fidelity(lite0, {n: _dequantize(f) for n, f in fits.items()}, {n: f.bias for n, f in fits.items()})
    rtn = _fit_all(lite0, "rtn", 4, rtn_range="mse")
    mods = dict(folded.named_modules())
    bc = {
        t.name: corrected_bias(t.weight_matrix(), rtn[t.name], mods[t.name].bias, stats[t.name].mean) for t in targets
    }
    f_rtn, f_rtn_bc = _fidelity(lite0, rtn), _fidelity(lite0, rtn, bc)
    # Measured (100 steps): KL 0.235, agreement 76% (300 steps: 0.219); RTN 2.97 / 16%, RTN with
    # bias correction 0.37 / 68%.
    assert f_ada["kl"] * 5 < f_rtn["kl"] and f_ada["agreement"] >= f_rtn["agreement"] + 0.4, (f_rtn, f_ada)
    assert f_ada["kl"] < 0.8 * f_rtn_bc["kl"], (f_rtn_bc, f_ada)


def test_companding_beats_uniform_rtn_at_3_bits_on_lite0_layers(lite0):
    _, _, targets, stats, _, _ = lite0
    # Measured (output error relative to uniform RTN on the MSE grid): 0.42, 0.70, 0.51.
    for name, bound in (
        ("_blocks.1._project_conv", 0.55),
        ("_blocks.3._project_conv", 0.85),
        ("_blocks.5._depthwise_conv", 0.65),
    ):
        t = next(t for t in targets if t.name == name)
        w, H = t.weight_matrix().double(), layer_hessian(stats[name], t.groups)
        scale = channel_scales(w, 3, "mse")
        codes, s, codebook = companding_quantize(w, H, scale, 3)
        e = weighted_error(w - s[:, None] * codebook[codes.long() + 3], H).sum()
        e_rtn = weighted_error(w - scale[:, None] * round_to_grid(w, scale, 3), H).sum()
        assert e < bound * e_rtn, (name, float(e), float(e_rtn))


def test_bn_reestimation_on_lite0_rtn(lite0):
    model, _, targets, _, data, ref = lite0
    base, originals = copy.deepcopy(model), {}
    fold_batchnorm(base, data.calib_batches[0][:2], originals=originals)
    float_convs = {n: copy.deepcopy(base.get_submodule(n)) for n in originals}

    def run(bits, reference):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for t in targets:
                conv = m.get_submodule(t.name)
                w = t.weight_matrix().double()
                scale = channel_scales(w, bits, "minmax")
                conv.weight.copy_((scale[:, None] * round_to_grid(w, scale, bits)).reshape(conv.weight.shape))
            if reference is not None:
                reestimate_batchnorm(m, originals, data.calib_batches, float_convs if reference == "float" else None)
            return fidelity(m(data.eval_images), ref, data.labels)

    w4, w4_running, w4_float = run(4, None), run(4, "running"), run(4, "float")
    w8, w8_running, w8_float = run(8, None), run(8, "running"), run(8, "float")
    # Measured (16 calibration crops, min-max RTN, float activations): W4 KL 3.57 / agreement 8%;
    # re-estimated as in the paper (reference: running statistics) 1.38 / 43%; to the float
    # layers' statistics on the calibration data 0.26 / 70%. W8: 0.013 / 92%; paper 1.16 / 41%
    # (the 16 crops' statistics replace the training set's: that alone costs accuracy); float
    # 0.0013 / 89%.
    assert w4_running["kl"] * 2 < w4["kl"] and w4_running["agreement"] >= w4["agreement"] + 0.2, (w4, w4_running)
    assert w4_float["kl"] * 8 < w4["kl"] and w4_float["agreement"] >= w4["agreement"] + 0.5, (w4, w4_float)
    assert w8_float["kl"] < w8["kl"], (w8, w8_float)
    assert w8_running["kl"] > 10 * w8["kl"], (w8, w8_running)
