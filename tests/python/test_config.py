"""QuantConfig: common options plus one config dataclass per method (``QuantConfig.options``), and
the version-1 form (flat method fields) still read: saved dicts silently, keywords with a warning.

The quantized results of every method under the new form are guarded by test_golden_state.py."""

import dataclasses
import json
import warnings

import pytest

import mpq
from mpq.cli.configs import make_config
from mpq.methods import base as methods_base

# QuantConfig().to_dict() as mpq 0.1 (config version 1) wrote it into mpq.save files and JSON results.
V1_DEFAULTS = {
    "w_bits": 4,
    "a_bits": 8,
    "max_points": 4,
    "avg_bits": None,
    "scale_bits": 32,
    "scope": "model",
    "sensitivity": "fisher",
    "first_last": "same",
    "ignore": [],
    "act_range": "mse",
    "calib_batches": 32,
    "calib_samples": 2048,
    "sensitivity_batches": 8,
    "method": "multipoint",
    "rtn_range": "minmax",
    "exact_fit": False,
    "scale_refit": "output",
    "point_rounding": "gptq",
    "verify": True,
    "gptq_damp": 0.01,
    "point_damp": 0.1,
    "hessian_budget_mb": 1024.0,
    "gptq_act_order": False,
    "adaround_iters": 500,
    "adaround_lr": 0.05,
    "adaround_lambda": 0.01,
    "adaquant_iters": 300,
    "adaquant_lr": 0.003,
    "adaquant_scale_lr": 0.01,
    "companding_breakpoints": 16,
    "companding_iters": 150,
    "companding_lr": 0.02,
    "bn_reestimation": False,
    "bn_reference": "float",
    "ocs_expand_ratio": 0.05,
    "ocs_split_threshold": 0.5,
    "ocs_grid_aware": False,
    "bias_correction": False,
    "ilp_bits": [2, 3, 4, 8],
    "ilp_rounding": "rtn",
    "seed": 0,
    "version": 1,
}

METHOD_CONFIGS = {
    "multipoint": mpq.MultipointConfig,
    "rtn": mpq.RTNConfig,
    "gptq": mpq.GPTQConfig,
    "adaround": mpq.AdaRoundConfig,
    "adaquant": mpq.AdaQuantConfig,
    "ocs": mpq.OCSConfig,
    "ilp": mpq.ILPConfig,
    "companding": mpq.CompandingConfig,
    "awq": mpq.AWQConfig,
}


def test_each_method_owns_its_config_and_a_config_selects_its_method():
    assert {n: methods_base.get_method(n).config_type for n in mpq.methods.available()} == METHOD_CONFIGS
    common = {f.name for f in dataclasses.fields(mpq.QuantConfig)}
    assert common == {  # the common options; every method-specific one lives in the method's config
        *("w_bits", "a_bits", "max_points", "avg_bits", "scale_bits", "scope", "sensitivity", "first_last"),
        *("ignore", "act_range", "calib_batches", "calib_samples", "sensitivity_batches", "method", "options"),
        *("rtn_range", "verify", "hessian_budget_mb", "bn_reestimation", "bn_reference", "bias_correction"),
        *("seed", "version"),
    }
    for name, config_type in METHOD_CONFIGS.items():
        assert mpq.QuantConfig(method=name).options == config_type()  # a name: its defaults
        cfg = mpq.QuantConfig(method=config_type(), w_bits=3)
        assert cfg.method == name and isinstance(cfg.options, config_type) and cfg.w_bits == 3
    cfg = mpq.QuantConfig(method="gptq", options={"act_order": True})  # options as a dict (JSON files)
    assert cfg.options == mpq.GPTQConfig(act_order=True)
    assert mpq.QuantConfig.preset("W3A16", method=mpq.OCSConfig(grid_aware=True)).options.grid_aware


def test_mismatched_or_doubled_options_are_refused():
    with pytest.raises(ValueError, match=r"expected options to be None or a RTNConfig \(the options of method 'rtn'\)"):
        mpq.QuantConfig(method="rtn", options=mpq.GPTQConfig())
    with pytest.raises(ValueError, match="expected options to be None when method is a method config"):
        mpq.QuantConfig(method=mpq.GPTQConfig(), options=mpq.GPTQConfig(damp=0.5))
    with pytest.raises(ValueError, match="unknown options"):
        mpq.QuantConfig(method="gptq", options={"dampening": 0.1})
    with pytest.raises(ValueError, match="expected either options or the flat fields"):
        mpq.QuantConfig(method="gptq", options=mpq.GPTQConfig(), gptq_damp=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        mpq.GPTQConfig().damp = 0.5  # shared defaults stay what they say


def test_replace_keeps_or_resets_the_options():
    cfg = mpq.QuantConfig(method=mpq.GPTQConfig(damp=0.05))
    assert cfg.replace(w_bits=3).options == mpq.GPTQConfig(damp=0.05)  # same method: kept
    assert cfg.replace(method="adaround").options == mpq.AdaRoundConfig()  # a new method: its defaults
    assert cfg.replace(method="gptq").options == mpq.GPTQConfig(damp=0.05)  # the same name: kept
    assert cfg.replace(method=mpq.AdaRoundConfig(iters=9)).options.iters == 9
    assert cfg.replace(options=mpq.GPTQConfig(act_order=True)).options == mpq.GPTQConfig(act_order=True)


@pytest.mark.parametrize("name", sorted(METHOD_CONFIGS))
def test_to_dict_is_json_and_round_trips(name):
    nested = {"ilp": mpq.ILPConfig(bits=(3, 8), rounding=mpq.AdaRoundConfig(iters=7))}
    cfg = mpq.QuantConfig(method=nested.get(name, name), ignore=("fc",), seed=3)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["method"] == name and d["version"] == 2 and "options" in d
    assert mpq.QuantConfig.from_dict(d) == cfg
    if name == "ilp":
        assert d["options"]["rounding"] == {
            "method": "adaround",
            "options": {"iters": 7, "lr": 0.05, "reg_lambda": 0.01, "group_size": 0, "symmetric": True},
        }


def test_version_1_dicts_load_silently_with_their_method_options():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an mpq 0.1 file is a supported format: no warning
        cfg = mpq.QuantConfig.from_dict({**V1_DEFAULTS, "point_damp": 0.2, "gptq_act_order": True})
        assert cfg == mpq.QuantConfig(method=mpq.MultipointConfig(point_damp=0.2, act_order=True))
        assert cfg.version == 2
        ilp = mpq.QuantConfig.from_dict(
            {**V1_DEFAULTS, "method": "ilp", "ilp_bits": [2, 4], "ilp_rounding": "gptq", "gptq_damp": 0.03}
        )
        assert ilp.options == mpq.ILPConfig(bits=(2, 4), rounding=mpq.GPTQConfig(damp=0.03))
        ada = mpq.QuantConfig.from_dict({**V1_DEFAULTS, "method": "adaround", "adaround_lambda": 0.1})
        assert ada.options == mpq.AdaRoundConfig(reg_lambda=0.1)
    with pytest.raises(ValueError, match="expected version <= 2"):
        mpq.QuantConfig.from_dict({**mpq.QuantConfig().to_dict(), "version": 3, "a_new_field": 1})


def test_flat_keywords_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match=r"pass the method's config, e.g. method=AdaRoundConfig\(...\)"):
        cfg = mpq.QuantConfig(method="adaround", adaround_iters=7, w_bits=3)
    assert cfg.options == mpq.AdaRoundConfig(iters=7) and cfg.w_bits == 3
    with pytest.warns(DeprecationWarning, match=r"\['adaquant_iters'\] do not apply to method 'gptq' and are ignored"):
        cfg = mpq.QuantConfig(method="gptq", gptq_act_order=True, adaquant_iters=5)
    assert cfg.options == mpq.GPTQConfig(act_order=True)
    with pytest.warns(DeprecationWarning):
        assert mpq.QuantConfig.preset("W4A16", point_rounding="nearest").options.point_rounding == "nearest"
    with pytest.warns(DeprecationWarning):
        assert mpq.QuantConfig().replace(point_damp=0.05).options == mpq.MultipointConfig(point_damp=0.05)
    with pytest.warns(DeprecationWarning, match=r"read config.options.damp \(GPTQConfig"):
        assert mpq.QuantConfig(method=mpq.GPTQConfig(damp=0.2)).gptq_damp == 0.2
    with pytest.raises(ValueError, match="mpq.GPTQConfig: expected damp"), pytest.warns(DeprecationWarning):
        mpq.QuantConfig(method="gptq", gptq_damp=0.0)  # validated like the new form
    with pytest.raises(AttributeError):
        mpq.QuantConfig().no_such_field  # noqa: B018


def test_cli_config_files_take_both_forms(tmp_path):
    new = tmp_path / "new.json"
    new.write_text(json.dumps({"w_bits": 3, "method": "gptq", "options": {"act_order": True}}))
    assert make_config(str(new)).options == mpq.GPTQConfig(act_order=True)
    old = tmp_path / "old.json"  # a hand-written flat file of mpq 0.1 (no version key)
    old.write_text(json.dumps({"w_bits": 3, "method": "gptq", "gptq_act_order": True}))
    with pytest.warns(DeprecationWarning):
        assert make_config(str(old)) == make_config(str(new))
    assert make_config(str(new), method="adaround").options == mpq.AdaRoundConfig()


def test_a_plugin_method_without_options_gets_an_empty_config():
    @methods_base.register
    class EchoQuantizer(methods_base.WeightQuantizer):
        name = "test_echo_plugin"

    try:
        cfg = mpq.QuantConfig(method="test_echo_plugin")
        assert cfg.options == EchoQuantizer.config_type() and cfg.options.to_dict() == {}
        assert mpq.QuantConfig.from_dict(cfg.to_dict()) == cfg
        with pytest.raises(ValueError, match="config_type to be a MethodConfig subclass of its own"):

            @methods_base.register
            class Shared(methods_base.WeightQuantizer):
                name = "test_shared_plugin"
                config_type = mpq.GPTQConfig
    finally:
        methods_base._REGISTRY.pop("test_echo_plugin", None)
