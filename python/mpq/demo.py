"""The offline demo (README command 1): EfficientNet-Lite0 in FP32, and RTN and multipoint at
W4A8 and weight-only W3 (multipoint at w_bits + 0.5 bits per weight), compared on real photos.

Calibration: seeded random crops and flips of the bundled photos. Evaluation: the 20 labelled
ImageNet photos (top-1) plus the center crops of the bundled photos (top-1 agreement and KL
divergence to FP32, no labels needed).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from mpq import assets
from mpq.config import QuantConfig
from mpq.quantize import last_report, quantize
from mpq.summary import model_size_bytes

__all__ = ["DemoData", "load_demo_data", "fidelity", "run_demo"]


@dataclass
class DemoData:
    eval_images: torch.Tensor  # labelled photos first, then the bundled photos
    labels: torch.Tensor  # labels of the first len(labels) eval images
    calib_batches: List[torch.Tensor]


def load_demo_data(calib_images: int = 64, batch_size: int = 16, seed: int = 0) -> DemoData:
    tf = assets.efficientnet_lite_transform()
    labelled = assets.labelled_imagenet_photos()
    photos = assets.unlabelled_photos()
    x = torch.cat([assets.load_images([p for p, _ in labelled], tf), assets.load_images(photos, tf)])
    y = torch.tensor([label for _, label in labelled])
    calib = assets.calibration_images(photos, calib_images, seed=seed)
    return DemoData(x, y, list(calib.split(batch_size)))


def fidelity(logits: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """top-1 on the labelled images, top-1 agreement and mean KL(reference || model) on all."""
    n = labels.numel()
    return {
        "top1": float((logits[:n].argmax(1) == labels).double().mean()),
        "agreement": float((logits.argmax(1) == reference.argmax(1)).double().mean()),
        "kl": float(
            F.kl_div(F.log_softmax(logits.double(), 1), F.log_softmax(reference.double(), 1), log_target=True, reduction="batchmean")
        ),
    }


def run_demo(configs: Optional[Dict[str, QuantConfig]] = None, json_path: Optional[str] = None, seed: int = 0) -> List[dict]:
    """Quantize EfficientNet-Lite0 with each config and print one table row per model."""
    if configs is None:
        configs = {
            "RTN W4A8": QuantConfig.preset("W4A8", method="rtn", seed=seed),
            "multipoint W4A8": QuantConfig.preset("W4A8", seed=seed),
            "RTN W3A16": QuantConfig.preset("W3A16", method="rtn", seed=seed),
            "multipoint W3A16": QuantConfig.preset("W3A16", seed=seed),
        }
    model = assets.load_efficientnet_lite0()
    data = load_demo_data(seed=seed)
    with torch.no_grad():
        reference = model(data.eval_images)
    n_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    rows = [
        {"model": "FP32", "size_mb": model_size_bytes(model) / 1e6, "avg_bits": 32.0, **fidelity(reference, reference, data.labels),
         "seconds": 0.0}
    ]
    for name, cfg in configs.items():
        t0 = time.perf_counter()
        qmodel = quantize(model, data.calib_batches, cfg)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            out = qmodel(data.eval_images)
        report = last_report(qmodel)
        rows.append({"model": name, "size_mb": model_size_bytes(qmodel) / 1e6, "avg_bits": report.avg_bits,
                     **fidelity(out, reference, data.labels), "seconds": seconds, "config": cfg.to_dict()})
    n_lab, n_all = data.labels.numel(), data.eval_images.shape[0]
    print(f"EfficientNet-Lite0 ({n_weights / 1e6:.2f}M conv/linear weights), {len(data.calib_batches)} calibration batches "
          f"({sum(b.shape[0] for b in data.calib_batches)} crops of the bundled photos)")
    print(f"top-1 on {n_lab} labelled ImageNet photos; agreement and KL vs FP32 on those plus {n_all - n_lab} bundled photos")
    header = f"{'model':<18}{'size MB':>9}{'avg bits':>10}{'top-1':>8}{'agree':>8}{'KL':>9}{'quant s':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<18}{r['size_mb']:>9.2f}{r['avg_bits']:>10.2f}{r['top1']:>8.1%}{r['agreement']:>8.1%}"
              f"{r['kl']:>9.4f}{r['seconds']:>9.1f}")
    if json_path:
        import mpq

        with open(json_path, "w") as f:
            json.dump({"rows": rows, "build": mpq.build_info(), "seed": seed}, f, indent=2)
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    run_demo()
