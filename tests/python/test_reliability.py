"""Reliability of mpq.quantize: the user's model is never modified (unless inplace=True), not
even by a quantization that fails; calibration memory is bounded by the config, not by the
number of batches; the same seed gives the same bits from a list or a one-shot loader."""

import copy
import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

import mpq

ROOT = Path(__file__).resolve().parents[2]


class _Net(nn.Module):
    """Conv + BN (foldable), a frozen depthwise conv, a Linear, a non-persistent buffer, a
    submodule left in train mode: every kind of state quantize could disturb."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, groups=8)
        self.fc = nn.Linear(8, 5)
        self.register_buffer("scale", torch.tensor(1.5), persistent=False)
        self.dw.weight.requires_grad_(False)
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            self.bn.running_mean.copy_(torch.randn(8, generator=g) * 0.1)
            self.bn.running_var.copy_(torch.rand(8, generator=g) + 0.5)
            self.bn.weight.copy_(torch.rand(8, generator=g) + 0.5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))) * self.scale
        return self.fc(self.dw(x).mean((2, 3)))


def _calib(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 10, 10, generator=g) for _ in range(n)]


def _fingerprint(model: nn.Module):
    """Everything about the model's state that quantize must leave as it was."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return {
        "state": h.hexdigest(),
        "parameters": [(n, id(p), p.data_ptr(), p.requires_grad, p.grad is None) for n, p in model.named_parameters()],
        "buffers": [(n, id(b), b.data_ptr(), b.clone()) for n, b in model.named_buffers()],
        "modules": [(n, type(m), m.training) for n, m in model.named_modules()],
        "hooks": [
            (n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for n, m in model.named_modules()
        ],
    }


def _assert_same(before, after):
    assert after["state"] == before["state"]
    assert after["parameters"] == before["parameters"]
    assert after["modules"] == before["modules"]
    assert after["hooks"] == before["hooks"]
    assert [(n, i, p) for n, i, p, _ in after["buffers"]] == [(n, i, p) for n, i, p, _ in before["buffers"]]
    for (n, _, _, a), (_, _, _, b) in zip(after["buffers"], before["buffers"]):
        assert torch.equal(a, b), n


def _train_mode_net() -> _Net:
    model = _Net()
    model.train()
    model.fc.eval()  # mixed training flags must come back exactly
    return model


CFG = mpq.QuantConfig(calib_batches=8, sensitivity_batches=2)


# ---- the input model is untouched ---------------------------------------------------------------


def test_quantize_leaves_parameters_buffers_flags_and_hooks_alone():
    model = _train_mode_net()
    before = _fingerprint(model)
    qmodel = mpq.quantize(model, _calib(3), CFG)
    _assert_same(before, _fingerprint(model))
    assert qmodel is not model and not qmodel.training
    assert isinstance(qmodel.conv, mpq.nn.MultipointConv2d) and isinstance(qmodel.bn, nn.Identity)
    # nothing of the copy is shared with the user's model
    user = {p.data_ptr() for p in model.parameters()} | {b.data_ptr() for b in model.buffers()}
    assert not user & {t.data_ptr() for t in list(qmodel.parameters()) + list(qmodel.buffers())}


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("bad", ["nan", "type", "shape"])
def test_a_failing_quantize_leaves_the_model_as_it_was(inplace: bool, bad: str):
    """A bad batch deep in the stream (after calibration has started) fails the call and leaves
    the weights, modules and hooks as they were, even with inplace=True (the batches are all
    read and checked before BatchNorm folding, the first change to the model)."""
    model = _Net().eval()
    before = _fingerprint(model)
    wrong = {"nan": torch.full((4, 3, 10, 10), float("nan")), "type": "image.png", "shape": torch.randn(4, 5, 10, 10)}

    def loader():
        yield from _calib(3)
        yield wrong[bad]

    with pytest.raises((ValueError, TypeError), match=r"mpq\.quantize: .*calib_loader .*batch 3"):
        mpq.quantize(model, loader(), CFG, inplace=inplace)
    _assert_same(before, _fingerprint(model))


def test_inplace_quantizes_the_model_itself():
    model = _Net().eval()
    q = mpq.quantize(model, _calib(2), CFG, inplace=True)
    assert q is model and isinstance(model.fc, mpq.nn.MultipointLinear)


# ---- determinism -------------------------------------------------------------------------------


def _state_bytes(model: nn.Module) -> bytes:
    return b"".join(k.encode() + v.cpu().contiguous().numpy().tobytes() for k, v in sorted(model.state_dict().items()))


def test_same_seed_same_bits_from_a_list_or_a_one_shot_loader_and_global_rngs_untouched():
    np = pytest.importorskip("numpy")
    calib = _calib(5)
    base = _Net().eval()  # built first: its initialisation draws from the global RNG
    models = [copy.deepcopy(base) for _ in range(3)]
    torch_rng, py_rng, np_rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
    a = mpq.quantize(models[0], calib, CFG.replace(seed=7))
    b = mpq.quantize(models[1], iter(calib), CFG.replace(seed=7))
    c = mpq.quantize(models[2], (x for x in calib), CFG.replace(seed=8))
    assert torch.equal(torch.get_rng_state(), torch_rng)
    assert random.getstate() == py_rng
    assert all(np.array_equal(x, y) if hasattr(x, "shape") else x == y for x, y in zip(np.random.get_state(), np_rng))
    assert _state_bytes(a) == _state_bytes(b)
    assert _state_bytes(a) != _state_bytes(c)  # the seed matters (row and value samples)


# ---- calibration memory is bounded by the config -------------------------------------------------


def test_calibration_holds_at_most_sensitivity_batches_inputs_and_reads_calib_batches():
    """Batches the loader made and that are still alive when it makes the next one: at most the
    ``max(1, sensitivity_batches)`` that quantize keeps, plus the one being run."""
    alive = []  # weak references to every batch the loader made
    most_alive = [0]
    read = [0]

    def loader():
        g = torch.Generator().manual_seed(0)
        for _ in range(1000):
            most_alive[0] = max(most_alive[0], sum(r() is not None for r in alive))
            x = torch.randn(4, 3, 10, 10, generator=g)
            alive.append(weakref.ref(x))
            read[0] += 1
            yield x

    cfg = CFG.replace(calib_batches=40, sensitivity_batches=3)
    mpq.quantize(_Net().eval(), loader(), cfg)
    assert read[0] == 40  # exactly calib_batches are read: not one more
    assert most_alive[0] <= 3 + 1, most_alive[0]


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import torch, mpq
    torch.set_num_threads(1)
    n = int(sys.argv[1])
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=2), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()

    def loader():  # fresh batches of 16 x 3 x 128 x 128 float32 (3 MiB): only quantize can hold them
        g = torch.Generator().manual_seed(0)
        for _ in range(n):
            yield torch.randn(16, 3, 128, 128, generator=g)

    cfg = mpq.QuantConfig(calib_batches=n, sensitivity_batches=2, calib_samples=512)
    mpq.quantize(model, [torch.randn(16, 3, 128, 128)], cfg.replace(calib_batches=1))  # warm up allocator and ops
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mpq.quantize(model, loader(), cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"base_kib": base, "peak_kib": peak}))
    """
)

BATCH_MIB = 16 * 3 * 128 * 128 * 4 / 2**20  # 3 MiB
MEMORY_MARGIN_MIB = 8.0


def _peak_growth_mib(batches: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(batches)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    return (m["peak_kib"] - m["base_kib"]) / 1024


def test_calibration_peak_memory_does_not_grow_with_calib_batches():
    """Peak RSS growth of a quantize call (a fresh process each) with 100 calibration batches is
    within MEMORY_MARGIN_MIB of that with 10: holding every batch would add 90 x 3 MiB = 270 MiB.
    Measured on the 2-core CPU: growth 10 batches ~2 MiB, 100 batches ~2 MiB (see the report)."""
    small = _peak_growth_mib(10)
    large = _peak_growth_mib(100)
    print(f"peak RSS growth: 10 batches {small:.1f} MiB, 100 batches {large:.1f} MiB (one batch {BATCH_MIB:.0f} MiB)")
    assert large <= small + MEMORY_MARGIN_MIB, (small, large)
