"""External quantization libraries as rows of ``benchmarks/compare_methods.py --suite matched``:
the formats people deploy from torchao and NNCF, run by those libraries on the task's own model,
calibration data and evaluation. Optional benchmark dependencies (``pip install torchao==0.18.0
nncf==3.4.0``), never needed by mpq; a peer that cannot run gives its reason as the row.

Bits are counted as the mpq rows count them: over the weights of every Conv2d and Linear layer
(what ``QuantReport.avg_bits`` averages), codes plus every stored scale and zero point, a layer
the peer leaves in float counting 32 bits per weight.

- ``torchao int4 g<g> [asym]``: ``IntxWeightOnlyConfig(torch.int4, PerGroup(g))`` (``int3``: torch.int3), torchao's int4
  weight-only format that runs on the CPU (its ``Int4WeightOnlyConfig`` needs the GPU-only mslk or
  tinygemm kernels here): a float16 scale per group, with ``asym`` an int8 zero point per group
  (stored as int8 by torchao: 8 bits counted), min-max ranges (torchao's AFFINE choice).
- ``torchao int8``: ``Int8WeightOnlyConfig()``, per-channel symmetric int8 with a float32 scale.
- ``nncf int4 g<g> asym awq+se``: ``nncf.compress_weights(mode=INT4_ASYM, group_size=g,
  ratio=1, all_layers=True, awq=True, scale_estimation=True)`` on the calibration batches, the
  embeddings left in float as in the mpq rows; a float16 scale and a 4-bit zero point per group.
- ``nncf W8A8``: ``nncf.quantize`` (post-training, int8 weights per channel and int8 activations,
  ``model_type=TRANSFORMER`` for MiniLM) on the calibration batches: OpenVINO's int8 path, a row
  at 8 bits for context (its activations are quantized too, unlike the A16 rows).
- torchao and NNCF compress only Linear layers (and embeddings): on the CNNs their int4 rows would
  leave the convolutions in float, so those rows say so instead of a number.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class PeerUnavailable(RuntimeError):
    """The peer cannot run this task here; the message says why."""


@dataclass
class Peer:
    """An external library's format: ``run(model, calib)`` returns the quantized model and its
    bits per weight over the Conv2d / Linear weights."""

    library: str
    run: Callable[[nn.Module, list[torch.Tensor]], tuple[nn.Module, float]]


def _weights(model: nn.Module) -> dict[str, int]:
    return {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _linear_only(model: nn.Module, library: str) -> None:
    w = _weights(model)
    conv = sum(v for n, v in w.items() if isinstance(model.get_submodule(n), nn.Conv2d))
    if conv:
        raise PeerUnavailable(
            f"{library} compresses Linear layers only: the convolutions ({100 * conv / sum(w.values()):.0f}% of the "
            f"weights) would stay float"
        )


def _group_bits(model: nn.Module, g: int, per_group_bits: float, code_bits: int = 4) -> float:
    """Bits per weight of ``code_bits`` codes plus ``per_group_bits`` per group of ``g`` input weights
    in every Linear (a last shorter group counts whole)."""
    bits = total = 0.0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            C, D = m.weight.shape
            bits += C * (D * code_bits + -(-D // g) * per_group_bits)
            total += C * D
    return bits / total


def _torchao(model: nn.Module, make_config: Callable[[], Any]) -> nn.Module:
    """A copy of ``model`` quantized by torchao's ``quantize_`` with ``make_config()`` (which
    imports what it names from torchao)."""
    _linear_only(model, "torchao's weight-only quantization")
    try:
        from torchao.quantization import quantize_
    except ImportError as e:
        raise PeerUnavailable(f"torchao is not installed ({e})") from None
    q = copy.deepcopy(model)
    quantize_(q, make_config())
    return q


def torchao_intx(g: int, asym: bool, bits: int = 4) -> Peer:
    def config():
        from torchao.quantization import IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup
        from torchao.quantization.quant_primitives import MappingType

        return IntxWeightOnlyConfig(
            weight_dtype=getattr(torch, f"int{bits}"),
            granularity=PerGroup(g),
            mapping_type=MappingType.ASYMMETRIC if asym else MappingType.SYMMETRIC,
            scale_dtype=torch.float16,
        )

    def run(model: nn.Module, calib: list[torch.Tensor]) -> tuple[nn.Module, float]:
        return _torchao(model, config), _group_bits(model, g, 16 + (8 if asym else 0), bits)

    return Peer("torchao", run)


def torchao_int8() -> Peer:
    def config():
        from torchao.quantization import Int8WeightOnlyConfig

        return Int8WeightOnlyConfig()

    def run(model: nn.Module, calib: list[torch.Tensor]) -> tuple[nn.Module, float]:
        q = _torchao(model, config)
        bits = sum(
            m.weight.shape[0] * (m.weight.shape[1] * 8 + 32) for m in model.modules() if isinstance(m, nn.Linear)
        )
        return q, bits / sum(_weights(model).values())

    return Peer("torchao", run)


def nncf_int4(g: int) -> Peer:
    def run(model: nn.Module, calib: list[torch.Tensor]) -> tuple[nn.Module, float]:
        _linear_only(model, "nncf.compress_weights")
        try:
            import nncf
        except ImportError as e:
            raise PeerUnavailable(f"nncf is not installed ({e})") from None
        q = nncf.compress_weights(
            copy.deepcopy(model),
            mode=nncf.CompressWeightsMode.INT4_ASYM,
            group_size=g,
            ratio=1.0,
            all_layers=True,
            dataset=nncf.Dataset(calib),
            awq=True,
            scale_estimation=True,
            ignored_scope=nncf.IgnoredScope(types=["embedding"], validate=False),  # embeddings stay float
        )
        return q, _group_bits(model, g, 16 + 4)

    return Peer("nncf", run)


def nncf_w8a8() -> Peer:
    def run(model: nn.Module, calib: list[torch.Tensor]) -> tuple[nn.Module, float]:
        try:
            import nncf
        except ImportError as e:
            raise PeerUnavailable(f"nncf is not installed ({e})") from None
        transformer = not any(isinstance(m, nn.Conv2d) for m in model.modules())
        q = nncf.quantize(
            copy.deepcopy(model),
            nncf.Dataset(calib),
            subset_size=len(calib),  # items of the dataset: the calibration batches
            model_type=nncf.ModelType.TRANSFORMER if transformer else None,
            ignored_scope=nncf.IgnoredScope(types=["embedding"], validate=False),
        )
        bits = sum(
            m.weight.shape[0] * (m.weight[0].numel() * 8 + 32) for n, m in model.named_modules() if n in _weights(model)
        )
        return q, bits / sum(_weights(model).values())

    return Peer("nncf", run)


# row name -> peer, per bit width of the matched suite
PEERS = {
    4: {
        "torchao int4 g128": torchao_intx(128, False),
        "torchao int4 g128 asym": torchao_intx(128, True),
        "torchao int4 g64 asym": torchao_intx(64, True),
        "torchao int4 g32": torchao_intx(32, False),
        "nncf int4 g128 asym awq+se": nncf_int4(128),
        "nncf int4 g64 asym awq+se": nncf_int4(64),
        "torchao int4 g32 asym (4.75)": torchao_intx(32, True),
        "nncf int4 g32 asym awq+se (4.62)": nncf_int4(32),
        "torchao int8 (8.08)": torchao_int8(),
        "nncf W8A8 (8.x, int8 activations)": nncf_w8a8(),
    },
    3: {
        "torchao int3 g64 asym": torchao_intx(64, True, bits=3),
        "torchao int3 g32": torchao_intx(32, False, bits=3),
    },
}
