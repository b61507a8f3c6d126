"""The stages of ``mpq.quantize`` (``mpq.pipeline``) run one at a time, each checked on what it
hands to the next; together they give exactly what ``mpq.quantize`` gives."""

import pytest
import torch
from torch import nn

import mpq
from mpq import pipeline
from mpq.methods import get_method
from small_models import randomize_batchnorm, small_cnn

pytestmark = pytest.mark.usefixtures("one_intraop_thread")


def _setup():
    torch.manual_seed(0)
    model = randomize_batchnorm(small_cnn())
    calib = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    return model, calib


def test_stages_one_by_one_equal_quantize():
    model, calib = _setup()
    cfg = mpq.QuantConfig.preset("W4A8", avg_bits=6.0)  # room for further points beyond one each
    method = get_method(cfg.method)

    prep = pipeline.prepare(model, calib, cfg, inplace=False, device=None)
    assert prep.model is not model and prep.device == torch.device("cpu")
    assert [t.name for t in prep.targets] == [
        n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]

    cal = pipeline.calibrate_layers(prep, cfg)
    assert cal.folded_batchnorms == ["1", "4"]  # the BatchNorms after the first two convs
    assert [cal.stats[t.name].order for t in cal.targets] == sorted(cal.stats[t.name].order for t in cal.targets)
    assert isinstance(model[1], nn.BatchNorm2d)  # the user's model untouched

    sensitivity = pipeline.layer_sensitivity(prep, cal, cfg, method)
    assert set(sensitivity) == {t.name for t in cal.targets}
    fits = pipeline.fit_layers(cal, cfg, method, sensitivity)
    for f in fits:
        C, D = f.weight.shape
        assert f.points == cfg.max_points and f.errors.errors.shape == (C, cfg.max_points)
        # nested points: each further point lowers (or keeps) every channel's output error
        assert bool((f.errors.errors.diff(dim=1) <= 1e-12 * f.errors.errors[:, :1].clamp_min(1e-30)).all())
        assert f.errors.point_bits == D * cfg.w_bits + cfg.scale_bits

    counts = pipeline.allocate_layers(fits, cfg, method)
    used = sum(int(counts[f.target.name].sum()) * f.errors.point_bits for f in fits)
    weights = sum(f.weight.numel() for f in fits)
    one_point = sum(f.weight.shape[0] * f.errors.point_bits for f in fits)  # the floor: one point everywhere
    budget = cfg.budget_bits * weights
    assert bool(all((c >= 1).all() for c in counts.values()))
    assert one_point + max(f.errors.point_bits for f in fits) <= budget  # room for further points ...
    assert one_point < used <= budget  # ... which the allocation spends, within the budget

    for f in fits:
        layer = pipeline.refit_layer(f, counts[f.target.name], cal.stats[f.target.name], cfg, method)
        assert torch.equal(layer.counts, counts[f.target.name]) and layer.output_sqnr_db > 0
        pipeline.swap_layer(prep.model, layer, pipeline.build_layer(layer, cal, cfg, method), f.seconds)
    checks = pipeline.verify(prep)
    assert len(checks[0].layers) == len(fits)

    reference = mpq.quantize(model, calib, cfg)
    staged, whole = prep.model.state_dict(), reference.state_dict()
    assert list(staged) == list(whole) and all(torch.equal(staged[k], whole[k]) for k in whole)


def test_a_method_hook_builds_the_layer_type():
    """``build_module`` is the method's: companding builds codebook layers, the others multipoint ones."""
    model, calib = _setup()
    for name, kinds in (
        ("companding", {mpq.nn.CodebookConv2d, mpq.nn.CodebookLinear}),
        ("rtn", {mpq.nn.MultipointConv2d, mpq.nn.MultipointLinear}),
    ):
        q = mpq.quantize(
            model, calib, mpq.QuantConfig(method=name, options=dict(iters=5) if name == "companding" else None)
        )
        assert {type(m) for m in q.modules() if isinstance(m, mpq.nn.MultipointLayer)} == kinds
    assert not get_method("rtn").uses_sensitivity and get_method("multipoint").uses_sensitivity
    assert get_method("ilp").uses_sensitivity and get_method("rtn").choose_bits([], {}, mpq.QuantConfig()) == {}
