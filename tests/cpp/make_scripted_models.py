"""Fixture of the C++ test test_scripted_model.cpp: quantizes models with mpq, saves them as
TorchScript, with an input and the output Python computes from the saved file.

    python tests/cpp/make_scripted_models.py --out DIR

Writes, per model NAME: DIR/NAME.pt (the scripted quantized model) and DIR/NAME_io.pt, a
scripted container module with buffers ``input`` and ``output`` and the int attribute
``multipoint_layers`` (what LibTorch's torch::jit::load reads without Python). Models:

- ``small_resnet_w3a8`` / ``small_resnet_w4a16``: a small ResNet-style CNN with BatchNorm
  (folded by mpq), residual adds, a grouped and a depthwise convolution, a strided 1x1
  shortcut and a Linear head; 8-bit and float activations, up to 4 points per channel.
- ``efficientnet_lite0_w4a8``: EfficientNet-Lite0 with its ImageNet weights (mpq.examples.assets) on
  two real photos, traced (torch.jit.trace; the package's model is not scriptable). When the offline assets are missing, ``efficientnet_lite0_w4a8.skip`` holds
  the reason instead and the C++ test reports the skip.

Run by CTest (FIXTURES_SETUP in tests/cpp/CMakeLists.txt) with the Python CMake found; that
Python must import mpq.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

import mpq
from mpq.examples import assets

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
from small_models import randomize_batchnorm  # noqa: E402  (tests/python/small_models.py)


class _Block(nn.Module):
    """conv-BN-ReLU, grouped conv-BN, plus a shortcut (identity, or strided 1x1 conv-BN)."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = _Block(16, 16, 1, groups=4)
        self.layer2 = _Block(16, 32, 2, groups=32)  # depthwise second conv
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.head(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


def small_resnet() -> nn.Module:
    """SmallResNet with seeded weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    model = SmallResNet()
    randomize_batchnorm(model)
    return model.eval()


class _TensorFile(nn.Module):
    """Buffers and ints in a module, so that C++ reads them with torch::jit::load."""

    def __init__(self, tensors: dict, ints: dict):
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name, t.detach().cpu().contiguous())
        for name, v in ints.items():
            setattr(self, name, int(v))


def save_case(out: Path, name: str, qmodel: nn.Module, x: torch.Tensor, trace: bool = False) -> None:
    path = out / f"{name}.pt"
    if trace:
        with torch.no_grad():
            torch.jit.trace(qmodel, x, check_trace=False).save(str(path))
    else:
        torch.jit.script(qmodel).save(str(path))
    # Python's output from the saved file, the same thing the C++ test loads.
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        y = loaded(x)
    kinds = (mpq.nn.MultipointConv2d, mpq.nn.MultipointLinear, mpq.nn.GroupwiseConv2d, mpq.nn.GroupwiseLinear)
    layers = [m for m in qmodel.modules() if isinstance(m, kinds)]
    points = torch.bincount(torch.cat([m.num_points.long().cpu() for m in layers])).tolist()
    # NB: clone: a slice of a batch would save the whole batch's storage.
    tensors = {"input": x.clone(), "output": y}
    torch.jit.script(_TensorFile(tensors, {"multipoint_layers": len(layers)})).save(str(out / f"{name}_io.pt"))
    print(
        f"{name}: {len(layers)} multipoint layers, channels with 0, 1, 2, ... points: {points}, "
        f"input {tuple(x.shape)} -> output {tuple(y.shape)}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="directory to write the models into")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    model = small_resnet()
    g = torch.Generator().manual_seed(2)
    calib = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(4)]
    x = torch.randn(2, 3, 16, 16, generator=g)
    # A budget of 8 bits per weight: small layers (D = 9 for the depthwise one) need it for
    # channels with 2 and more points, so that the multipoint sums are exercised.
    configs = {
        "small_resnet_w3a8": mpq.QuantConfig(w_bits=3, a_bits=8, avg_bits=8.0),
        "small_resnet_w4a16": mpq.QuantConfig(w_bits=4, a_bits=None, avg_bits=8.0),
        # group-wise layers (mpq::groupwise_conv2d / groupwise_linear), asymmetric, 8-weight groups
        "small_resnet_gptq_g8_w4a8": mpq.QuantConfig(
            w_bits=4, a_bits=8, method=mpq.GPTQConfig(group_size=8, symmetric=False)
        ),
    }
    for name, config in configs.items():
        save_case(args.out, name, mpq.quantize(model, calib, config), x)

    skip = args.out / "efficientnet_lite0_w4a8.skip"
    skip.unlink(missing_ok=True)
    try:
        lite0 = assets.load_efficientnet_lite0()
        from mpq.examples.demo import load_demo_data

        # A small calibration set: the test checks C++ against Python, not accuracy.
        data = load_demo_data(calib_images=16, batch_size=8)
    except assets.AssetMissing as e:
        skip.write_text(f"EfficientNet-Lite0 assets missing: {e}\n")
        print(f"efficientnet_lite0_w4a8: skipped ({e})")
    else:
        qlite0 = mpq.quantize(lite0, data.calib_batches, "W4A8")
        # NB: traced, not scripted: the efficientnet_lite_pytorch model keeps its block arguments
        # in a namedtuple that TorchScript cannot compile (in FP32 as well). The mpq ops record
        # into the trace like aten ops; the trace holds the 224x224 'same' padding as constants.
        save_case(args.out, "efficientnet_lite0_w4a8", qlite0, data.eval_images[:2].clone(), trace=True)
    print(
        f"scripted models written to {args.out} in {time.perf_counter() - t0:.1f}s (mpq {mpq.build_info()['library_path']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
