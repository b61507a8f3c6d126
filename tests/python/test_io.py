"""mpq.save / mpq.load: bit-exact round trips (a small CNN, EfficientNet-Lite0), the TorchScript
path, and clear errors for damaged, newer or mismatched files; mpq.plot_allocation."""

import json
import struct

import pytest
import torch
from torch import nn

import mpq
from mpq.examples import assets
from small_models import randomize_batchnorm, small_cnn

pytestmark = pytest.mark.usefixtures("one_intraop_thread")


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k
    types_a = [(n, type(m)) for n, m in a.named_modules()]
    types_b = [(n, type(m)) for n, m in b.named_modules()]
    assert types_a == types_b


# ignore=("0",) keeps the first conv in float: it gains a bias from BatchNorm folding, which load
# must recreate. W4A16 has no activation quantizers; the bias-free Linear has no bias buffer.
CASES = {
    "W4A8-float-first": (dict(w_bits=4, a_bits=8, avg_bits=5.5, ignore=("0",)), True),
    "W3A16-no-linear-bias": (dict(w_bits=3, a_bits=None, avg_bits=4.0), False),
    # codebook layers (non-uniform levels): their own spec kinds and the codebook buffer
    "companding-W3A8": (dict(method=mpq.CompandingConfig(iters=10), w_bits=3, a_bits=8), True),
    # group-wise layers: float16 group scales, packed zero points, their own spec kinds
    "groupwise-gptq-W4A8": (dict(method=mpq.GPTQConfig(group_size=8, symmetric=False), w_bits=4, a_bits=8), True),
}


@pytest.fixture(scope="module")
def small_quantized():
    out = {}
    for key, (cfg, linear_bias) in CASES.items():
        torch.manual_seed(0)
        model = randomize_batchnorm(small_cnn(linear_bias=linear_bias))
        calib = [torch.randn(8, 3, 16, 16) for _ in range(2)]
        out[key] = (mpq.quantize(model, calib, mpq.QuantConfig(**cfg)), linear_bias)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_small_cnn_round_trip_is_bit_exact(small_quantized, tmp_path, case):
    qmodel, linear_bias = small_quantized[case]
    path = tmp_path / "small.mpq.safetensors"
    mpq.save(qmodel, path)
    torch.manual_seed(123)  # a fresh float model with other weights: every tensor must come from the file
    fresh = small_cnn(linear_bias=linear_bias)
    loaded = mpq.load(path, fresh)
    # the user's float model is left alone
    assert isinstance(fresh[1], nn.BatchNorm2d) and type(fresh[3]) is nn.Conv2d
    _assert_same_state(qmodel, loaded)
    assert not loaded.training
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(qmodel(x), loaded(x))
    # Output SQNR and points restored too (the simulation check belongs to the quantize call's report).
    layers_only = [line for line in mpq.summary(qmodel).splitlines() if not line.startswith("simulation check")]
    assert mpq.summary(loaded).splitlines() == layers_only
    meta = mpq.io.read_metadata(path)
    assert meta["format_version"] == mpq.io.FORMAT_VERSION and meta["mpq_version"] == mpq.__version__
    assert meta["torch_version"] == torch.__version__
    cfg = mpq.QuantConfig(**CASES[case][0])
    assert meta["config"] == cfg.to_dict() and meta["seed"] == cfg.seed
    assert set(meta["layers"]) == {n for n, m in qmodel.named_modules() if isinstance(m, mpq.nn.MultipointLayer)}
    prefix = {"companding": "codebook_", "groupwise": "groupwise_"}.get(case.split("-")[0], "")
    assert {spec["kind"] for spec in meta["layers"].values()} == {prefix + "conv", prefix + "linear"}
    assert mpq.io.loaded_metadata(loaded)["folded_batchnorms"] == ["1", "4"]
    # saving the loaded model again keeps the config and gives the same tensors
    mpq.save(loaded, tmp_path / "again.mpq.safetensors")
    again = mpq.io.read_metadata(tmp_path / "again.mpq.safetensors")
    assert again["config"] == meta["config"] and again["tensors_sha256"] == meta["tensors_sha256"]


def _layer_of_kind(kind: str) -> mpq.nn.MultipointLayer:
    conv = dict(
        in_channels=8,
        out_channels=12,
        kernel_size=[3, 1],
        stride=[2, 1],
        padding=[1, 0],
        dilation=[1, 2],
        groups=4,
        bias=False,
        pre_padding=[0, 1, 1, 0],
        same_padding=False,
    )
    return {
        "linear": lambda: mpq.nn.MultipointLinear(10, 6, 3, 4),
        "conv": lambda: mpq.nn.MultipointConv2d(max_points=2, w_bits=5, **conv),
        "codebook_linear": lambda: mpq.nn.CodebookLinear(10, 6, 3, bias=False),
        "codebook_conv": lambda: mpq.nn.CodebookConv2d(w_bits=4, **conv),
        "groupwise_linear": lambda: mpq.nn.GroupwiseLinear(10, 6, 4, group_size=4, symmetric=False),
        "groupwise_conv": lambda: mpq.nn.GroupwiseConv2d(w_bits=3, group_size=8, symmetric=True, **conv),
    }[kind]()


@pytest.mark.parametrize("kind", sorted(mpq.nn.LAYER_KINDS))
def test_every_layer_kind_owns_its_spec(kind):
    """to_spec -> JSON -> MultipointLayer.from_spec gives the same layer type, arguments and state
    shapes, for every registered layer kind."""
    m = _layer_of_kind(kind)
    m.set_act_qparams(0.1, 0, 0, 255)
    m.output_sqnr_db = 21.5
    spec = json.loads(json.dumps(m.to_spec()))
    assert spec["kind"] == kind
    rebuilt = mpq.nn.MultipointLayer.from_spec(spec, "layer")
    assert type(rebuilt) is type(m) and rebuilt.to_spec() == spec
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    assert rebuilt.bits_per_weight() == m.bits_per_weight()
    with pytest.raises(ValueError, match=r"mpq.load: layer 'layer': the metadata lacks 'w_bits'"):
        mpq.nn.MultipointLayer.from_spec({k: v for k, v in spec.items() if k != "w_bits"}, "layer")
    with pytest.raises(ValueError, match=r"mpq.load: layer 'layer': unknown kind 'lstm'"):
        mpq.nn.MultipointLayer.from_spec({**spec, "kind": "lstm"}, "layer")


def test_torchscript_is_the_architecture_free_format(small_quantized, tmp_path):
    qmodel, _ = small_quantized["W4A8-float-first"]
    path = tmp_path / "small_mpq.pt"
    torch.jit.script(qmodel).save(str(path))
    scripted = mpq.load(path)  # no model needed
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(scripted(x), qmodel(x))
    with pytest.raises(ValueError, match="mpq.load: .*TorchScript archive.*without model"):
        mpq.load(path, small_cnn())


def test_efficientnet_lite0_round_trip_is_bit_exact(tmp_path):
    model = assets.load_efficientnet_lite0()
    tf = assets.efficientnet_lite_transform()
    calib = assets.load_images(assets.unlabelled_photos()[:4], tf)
    qmodel = mpq.quantize(model, [calib], mpq.QuantConfig(calib_samples=256, sensitivity_batches=1))
    path = tmp_path / "effnet.mpq.safetensors"
    mpq.save(qmodel, path, architecture="efficientnet_lite0")
    x = assets.load_images([p for p, _ in assets.labelled_imagenet_photos()[:3]], tf)
    with torch.no_grad():
        ref = qmodel(x)
    # into a given float architecture (its static-'same'-padding convs are swapped like quantize does) ...
    loaded = mpq.load(path, model)
    _assert_same_state(qmodel, loaded)
    # ... and rebuilt from the recorded architecture, without a model
    rebuilt = mpq.load(path)
    _assert_same_state(qmodel, rebuilt)
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
        assert torch.equal(rebuilt(x), ref)
    meta = mpq.io.loaded_metadata(rebuilt)
    assert len(meta["layers"]) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    assert len(meta["folded_batchnorms"]) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(spec["pre_padding"] for spec in meta["layers"].values() if spec["kind"] == "conv")
    assert isinstance(model._bn0, nn.BatchNorm2d)  # the float model given to load is untouched


def _with_identity() -> nn.Module:
    """A genuine nn.Identity (index 3) beside a BatchNorm that quantize folds (1) and one it cannot
    fold (7, after a Linear)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Identity(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 16),
        nn.BatchNorm1d(16),
        nn.Linear(16, 4),
    ).eval()


def test_round_trip_keeps_a_genuine_identity_and_records_only_folded_batchnorms(tmp_path):
    torch.manual_seed(0)
    model = _with_identity()
    for bn in (model[1], model[7]):
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    qmodel = mpq.quantize(model, [torch.randn(8, 3, 12, 12)], mpq.QuantConfig(w_bits=4, a_bits=8))
    report = mpq.last_report(qmodel)
    assert report.folded_batchnorm_names == ["1"] and report.folded_batchnorms == 1
    path = tmp_path / "identity.mpq.safetensors"
    mpq.save(qmodel, path)
    assert mpq.io.read_metadata(path)["folded_batchnorms"] == ["1"]
    loaded = mpq.load(path, _with_identity())
    _assert_same_state(qmodel, loaded)  # module types included: 1 and 3 Identity, 7 BatchNorm1d
    assert type(loaded[3]) is nn.Identity and type(loaded[1]) is nn.Identity and isinstance(loaded[7], nn.BatchNorm1d)
    x = torch.randn(5, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(qmodel(x), loaded(x))
    assert mpq.io.loaded_metadata(loaded)["folded_batchnorms"] == ["1"]
    # saving the loaded model again records the same list (from the file, not from the Identities)
    mpq.save(loaded, tmp_path / "again.mpq.safetensors")
    assert mpq.io.read_metadata(tmp_path / "again.mpq.safetensors")["folded_batchnorms"] == ["1"]


# ---- damaged, newer and mismatched files -------------------------------------------------------


@pytest.fixture()
def saved(small_quantized, tmp_path):
    qmodel, _ = small_quantized["W4A8-float-first"]
    path = tmp_path / "m.mpq.safetensors"
    mpq.save(qmodel, path)
    return path


def _rewrite_metadata(path, edit) -> None:
    """Rewrite the mpq metadata of a saved file, keeping the tensors."""
    from safetensors.torch import load_file, save_file

    meta = mpq.io.read_metadata(path)
    edit(meta)
    save_file(load_file(str(path)), str(path), metadata={"mpq": json.dumps(meta)})


def test_format_version_1_files_load(small_quantized, saved):
    """Files written before the stored form hold codes [C, P, ...] and scales [C, P]: still read."""
    from safetensors.torch import load_file, save_file

    qmodel, _ = small_quantized["W4A8-float-first"]
    x = torch.randn(4, 3, 16, 16)
    tensors = load_file(str(saved))
    for name, m in qmodel.named_modules():
        if isinstance(m, (mpq.nn.MultipointConv2d, mpq.nn.MultipointLinear)):
            codes, scales = m.unpacked()
            del tensors[f"{name}.point_codes"], tensors[f"{name}.point_scales"]
            tensors[f"{name}.codes"], tensors[f"{name}.scales"] = codes.contiguous(), scales.contiguous()
    meta = mpq.io.read_metadata(saved)
    meta.update(format_version=1, tensors_sha256=mpq.io._checksum(tensors))
    save_file(tensors, str(saved), metadata={"mpq": json.dumps(meta)})
    old = mpq.load(saved, small_cnn())
    with torch.no_grad():
        assert torch.equal(old(x), qmodel(x))
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), qmodel.state_dict().values()))


def _untouched(model: nn.Module) -> bool:
    return isinstance(model[1], nn.BatchNorm2d) and type(model[3]) is nn.Conv2d and type(model[10]) is nn.Linear


def test_newer_format_version_is_refused(saved):
    _rewrite_metadata(saved, lambda m: m.update(format_version=mpq.io.FORMAT_VERSION + 1, mpq_version="9.0"))
    with pytest.raises(ValueError, match=r"mpq.load: .*written by a newer mpq \(9.0, file format version 3\).*upgrade"):
        mpq.load(saved, small_cnn())


@pytest.mark.parametrize("keep", [0, 5, 8, 40, -1, -100])
def test_truncated_file_is_refused(saved, keep):
    data = saved.read_bytes()
    saved.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    model = small_cnn()
    with pytest.raises(ValueError, match=r"mpq.load: .*(truncated|not an mpq file)"):
        mpq.load(saved, model)
    assert _untouched(model)


def test_corrupted_json_header_is_refused(saved):
    data = bytearray(saved.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    start = data.index(b'"__metadata__"')
    data[start : start + 4] = b"#\x00}["  # same length, no longer JSON
    saved.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"mpq.load: .*JSON header is corrupted"):
        mpq.load(saved, small_cnn())


def test_corrupted_metadata_and_tensor_data_are_refused(saved, tmp_path):
    _rewrite_metadata(saved, lambda m: m["layers"]["3"].update(kernel_size="3x3"))
    with pytest.raises(ValueError, match=r"mpq.load: layer '3': expected kernel_size to be list"):
        mpq.load(saved, small_cnn())
    # one flipped bit in the tensor data
    good = tmp_path / "good.mpq.safetensors"
    mpq.save(_quantized_tiny(), good)
    data = bytearray(good.read_bytes())
    data[-3] ^= 0x10
    good.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"mpq.load: .*tensor data is corrupted \(checksum"):
        mpq.load(good, small_cnn())


def _quantized_tiny() -> nn.Module:
    torch.manual_seed(0)
    return mpq.quantize(small_cnn(), [torch.randn(4, 3, 12, 12)], mpq.QuantConfig(method="rtn"))


def test_not_an_mpq_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, str(plain))
    with pytest.raises(ValueError, match=r"mpq.load: .*not an mpq file \(a safetensors file without mpq metadata\)"):
        mpq.load(plain, small_cnn())
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a model at all")
    with pytest.raises(ValueError, match=r"mpq.load: .*not an mpq file"):
        mpq.load(text, small_cnn())
    with pytest.raises(ValueError, match=r"mpq.load: .*no such file"):
        mpq.load(tmp_path / "missing.mpq.safetensors", small_cnn())
    with pytest.raises(ValueError, match=r"mpq.load: .*saved without an architecture; pass the float model"):
        mpq.save(_quantized_tiny(), tmp_path / "q.mpq.safetensors")
        mpq.load(tmp_path / "q.mpq.safetensors")


def test_mismatched_model_is_refused_and_left_untouched(saved):
    # a multipoint layer of another shape
    other = small_cnn(out_features=12)
    with pytest.raises(
        ValueError, match=r"mpq.load: layer '10' is Linear\(32, 12\) in the model but the file has a linear 32 -> 10"
    ):
        mpq.load(saved, other)
    assert _untouched(other)
    # a float layer (the ignored first conv) of another shape
    other = small_cnn(first_kernel=5)
    with pytest.raises(
        ValueError, match=r"mpq.load: .*does not fit the model \(other shapes or dtypes: 0.weight: file \(16, 3, 3, 3\)"
    ):
        mpq.load(saved, other)
    assert _untouched(other)
    # tensors missing from the file
    other = small_cnn()
    other.register_buffer("extra", torch.zeros(3))
    with pytest.raises(ValueError, match=r"mpq.load: .*tensors missing from the file: 'extra'"):
        mpq.load(saved, other)
    # a model without the file's layer
    with pytest.raises(ValueError, match=r"mpq.load: the file has a multipoint layer '10' that the model lacks"):
        mpq.load(saved, small_cnn()[:9])
    # a float model of a different dtype
    with pytest.raises(ValueError, match=r"mpq.load: .*other shapes or dtypes: 0.weight: .*torch.float64"):
        mpq.load(saved, small_cnn().double())


def test_save_refuses_a_float_model(tmp_path):
    with pytest.raises(ValueError, match="mpq.save: qmodel has no multipoint layer"):
        mpq.save(small_cnn(), tmp_path / "x.mpq.safetensors")
    with pytest.raises(ValueError, match="mpq.save: expected architecture"):
        mpq.save(_quantized_tiny(), tmp_path / "x.mpq.safetensors", architecture="my_model")
    assert not (tmp_path / "x.mpq.safetensors").exists()


# ---- allocation plot ------------------------------------------------------------------------------


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_plot_allocation_writes_a_sane_png(small_quantized, tmp_path):
    qmodel, _ = small_quantized["W4A8-float-first"]
    path = tmp_path / "alloc.png"
    data = mpq.plot_allocation(qmodel, path)
    w, h = _png_size(path)
    assert 600 <= w <= 5000 and 300 <= h <= 2000
    assert path.stat().st_size > 10_000
    assert data["layers"] == ["3", "6", "10"]
    for fractions in data["fractions"]:
        assert abs(sum(fractions) - 1) < 1e-9
    assert abs(data["avg_bits"] - mpq.last_report(qmodel).avg_bits) < 1e-6
    with pytest.raises(ValueError, match="mpq.plot_allocation: qmodel has no multipoint layer"):
        mpq.plot_allocation(small_cnn(), tmp_path / "none.png")
