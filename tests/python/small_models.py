"""Small seeded models shared by the tests (and tests/cpp/make_scripted_models.py)."""

import torch
from torch import nn


def small_cnn(out_features: int = 10, linear_bias: bool = True, first_kernel: int = 3) -> nn.Module:
    """Conv+BN+ReLU, a dilated depthwise conv+BN+ReLU6, a grouped strided conv with bias, pool, Linear."""
    return nn.Sequential(
        nn.Conv2d(3, 16, first_kernel, padding=first_kernel // 2, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=16, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU6(),
        nn.Conv2d(16, 32, 3, stride=2, groups=4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, out_features, bias=linear_bias),
    ).eval()


def randomize_batchnorm(model: nn.Module, seed: int = 1) -> nn.Module:
    """Seeded non-trivial BatchNorm statistics and affine parameters (so that folding matters)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model
