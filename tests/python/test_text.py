"""A real transformer: the Linear layers of all-MiniLM-L6-v2 (integer token-id inputs, Linear
layers on [N, L, 384]), multipoint against RTN by the embeddings' cosine similarity to FP32, the
traced quantized embedder, and the Gaussian-output Fisher sensitivity used for its output."""

import io

import pytest
import torch
from torch import nn

import mpq
from mpq.calibrate import find_targets, fisher_sensitivity
from mpq.examples import assets, text

pytestmark = pytest.mark.usefixtures("one_intraop_thread")


@pytest.fixture(scope="module")
def minilm():
    try:
        model, tokenizer = assets.load_minilm()
    except assets.AssetMissing as e:  # pragma: no cover
        pytest.skip(f"offline assets missing: {e}")
    calib = text.calibration_batches(tokenizer, text.calibration_sentences())
    evaluation = text.tokenize(tokenizer, text.evaluation_sentences())
    with torch.no_grad():
        reference = model(evaluation)
    return model, calib, evaluation, reference


@pytest.fixture(scope="module")
def quantized(minilm):
    model, calib, evaluation, reference = minilm
    out = {}
    for name, cfg in {
        "rtn": mpq.QuantConfig.preset("W4A16", method="rtn"),
        "multipoint": mpq.QuantConfig.preset("W4A16"),
    }.items():
        q = mpq.quantize(model, calib, cfg)
        with torch.no_grad():
            out[name] = (q, text.embedding_fidelity(q(evaluation), reference), mpq.last_report(q))
    return out


def test_embedder_matches_its_definition_and_batches_have_no_padding(minilm):
    model, calib, evaluation, reference = minilm
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 36
    assert len(text.SENTENCES) == 64 and not set(text.calibration_sentences()) & set(text.evaluation_sentences())
    assert all((b != model.pad_token_id).all() for b in calib)  # one length per batch: no padding
    assert sum(b.shape[0] for b in calib) == 32
    assert torch.allclose(reference.norm(dim=1), torch.ones(32), atol=1e-5)
    # the padding of a batch does not change a sentence's embedding
    with torch.no_grad():
        alone = model(evaluation[:1, : int((evaluation[0] != model.pad_token_id).sum())])
    assert text.embedding_fidelity(alone, reference[:1])["cos_min"] > 1 - 1e-6


def test_multipoint_w4a16_beats_rtn_on_minilm(quantized):
    (_, mp, mp_report), (_, rtn, rtn_report) = quantized["multipoint"], quantized["rtn"]
    print(f"measured: multipoint {mp}, rtn {rtn}")  # the source of the margins below (pytest -s)
    assert len(mp_report.layers) == 36 and mp_report.avg_bits <= 4.5 + 1e-9
    assert rtn_report.avg_bits <= 4.0 + 32 / 384 + 1e-9
    # Measured with `ATEN_CPU_CAPABILITY=<isa> python -m pytest -s tests/python/test_text.py::
    # test_multipoint_w4a16_beats_rtn_on_minilm` (seed 0, 32 calibration / 32 evaluation sentences;
    # Xeon with AVX-512 and AMX, torch 2.14.1, 1 thread), ISA unset (AVX-512) / avx2 / default:
    #   multipoint W4A16 (4.5 bits) 1 - mean cos 0.020383 / 0.020387 / 0.020384,
    #                               1 - min cos 0.038969 / 0.038954 / 0.038961;
    #   RTN W4A16 (4.06 bits) 1 - mean cos 0.082333 (all three), 1 - min cos 0.137105;
    #   multipoint's 1 - mean cos / RTN's: 0.2476 / 0.2476 / 0.2476.
    # Bounds: 1.5x the worst measured value of each.
    assert 1 - mp["cos_mean"] <= 1.5 * 0.0204, mp
    assert 1 - mp["cos_min"] <= 1.5 * 0.0390, mp
    assert 1 - mp["cos_mean"] <= 1.5 * 0.248 * (1 - rtn["cos_mean"]), (mp, rtn)


def test_traced_quantized_embedder_gives_identical_outputs(minilm, quantized):
    _, _, evaluation, _ = minilm
    qmodel = quantized["multipoint"][0]
    traced = torch.jit.trace(qmodel, evaluation[:4], check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    with torch.no_grad():
        ref = qmodel(evaluation)
        assert torch.equal(traced(evaluation), ref)  # another batch size and length than traced with
        assert torch.equal(loaded(evaluation), ref)


def test_quantized_embedder_exports_to_onnx_runtime(minilm, quantized, tmp_path):
    """mpq.export_onnx through BERT's code (attention masks, 3-D Linear inputs, integer token ids):
    ONNX Runtime's embeddings equal mpq's to float32 rounding (W4A16: float activations)."""
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is optional (pip install -e .[export])")
    _, _, evaluation, _ = minilm
    qmodel = quantized["multipoint"][0]
    path = mpq.export_onnx(qmodel, evaluation[:2], tmp_path / "minilm.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = torch.from_numpy(session.run(None, {"input": evaluation.numpy()})[0])
    with torch.no_grad():
        ref = qmodel(evaluation)
    assert text.embedding_fidelity(y, ref)["cos_min"] > 1 - 1e-5
    assert float((y - ref).abs().max()) < 1e-4


# ---- the Gaussian-output Fisher ------------------------------------------------------------------


def test_gaussian_fisher_estimates_the_jacobian_diagonal():
    """y = W2 relu(W1 x): for layer 1's output the Gaussian Fisher is E[sum_k (W2_kj 1[h_j > 0])^2],
    for the last layer it is 1 per channel."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    x = torch.randn(20000, 6)
    targets, _ = find_targets(model, mpq.QuantConfig())
    est = fisher_sensitivity(model, targets, list(x.split(5000)), "gaussian", 0)
    active = (model[0](x) > 0).double().mean(0)
    exact = model[2].weight.detach().double().pow(2).sum(0) * active
    # Seeded Monte Carlo estimates: each is a mean over 20000 draws of a squared Gaussian (relative
    # standard deviation sqrt(2 / 20000) = 0.01, less for layer 0's sums); bound: 4 standard
    # deviations. Measured with the per-batch generators: 0.0160 (layer 0) and 0.0259 (layer 2),
    # the same with ATEN_CPU_CAPABILITY=avx2 and =default.
    torch.testing.assert_close(est["0"].double(), exact, rtol=0.04, atol=0)
    torch.testing.assert_close(est["2"].double(), torch.ones(3, dtype=torch.float64), rtol=0.04, atol=0)
    # "auto": [N, classes] logits take the cross-entropy Fisher, unit-norm rows the Gaussian one
    auto = fisher_sensitivity(model, targets, [x[:64]], "auto", 0)
    logits = fisher_sensitivity(model, targets, [x[:64]], "logits")
    torch.testing.assert_close(auto["0"], logits["0"])
    normed = _Normalized(model)
    auto = fisher_sensitivity(normed, targets, [x[:64]], "auto", 0)
    gaussian = fisher_sensitivity(normed, targets, [x[:64]], "gaussian", 0)
    torch.testing.assert_close(auto["0"], gaussian["0"])


class _Normalized(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.inner(x), dim=1)
