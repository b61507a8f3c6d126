"""The project's own Fashion-MNIST ResNet: a real network trained by mpq (docs/ASSETS.md), with its data.

- Data: Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/*-ubyte.gz``,
  60k train + 10k test); the ``foolbox`` wheel's 20 ``fashionmnist_XX_LABEL.png`` as a fallback.
- Model: a CIFAR-style ResNet-14 (stem 3x3 conv, three stages of two torchvision ``BasicBlock`` with
  16/32/64 channels, BatchNorm, global average pool, Linear), 28x28 grey input.
- Checkpoint: ``python/mpq/examples/data/fashion_resnet14.pt``, made by
  ``python scripts/train_fashion_resnet.py`` (seed, schedule and test accuracy recorded beside it in
  ``fashion_resnet14.json``).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

__all__ = ["FashionResNet", "load_fashion_resnet", "fashion_mnist", "FASHION_MEAN", "FASHION_STD", "CHECKPOINT"]

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
CHECKPOINT = Path(__file__).resolve().parent / "data" / "fashion_resnet14.pt"
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


class FashionResNet(nn.Module):
    """ResNet-14 for 1x28x28 inputs (normalised with FASHION_MEAN / FASHION_STD), 10 classes."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), blocks: int = 2, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                stride = 2 if (i > 0 and b == 0) else 1
                down = None
                if stride != 1 or cin != w:
                    down = nn.Sequential(nn.Conv2d(cin, w, 1, stride=stride, bias=False), nn.BatchNorm2d(w))
                layers.append(BasicBlock(cin, w, stride=stride, downsample=down))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def _read_idx(path: Path) -> torch.Tensor:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8).reshape(dims)


def fashion_mnist(split: str = "test", normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 [N, 1, 28, 28], labels int64 [N]) of Fashion-MNIST ``split`` ('train' or 'test')."""
    if split not in ("train", "test"):
        raise ValueError(f"mpq.examples.fashion.fashion_mnist: split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    images, labels = FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz", FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.exists():
        from mpq.examples.assets import AssetMissing

        raise AssetMissing(f"Fashion-MNIST not found at {FASHION_DIR}: `apt-get install dataset-fashion-mnist`")
    x = _read_idx(images).float().div_(255).unsqueeze(1)
    if normalize:
        x = (x - FASHION_MEAN) / FASHION_STD
    return x, _read_idx(labels).long()


def load_fashion_resnet(checkpoint: Path = CHECKPOINT) -> FashionResNet:
    """The trained FashionResNet (eval mode) from the committed checkpoint."""
    model = FashionResNet()
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return model.eval()


def checkpoint_info(checkpoint: Path = CHECKPOINT) -> dict:
    """How the checkpoint was made (seed, schedule, accuracy), recorded by the training script."""
    return json.loads(checkpoint.with_suffix(".json").read_text())
