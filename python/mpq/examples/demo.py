"""The offline demo (README command 1): EfficientNet-Lite0 in FP32, and RTN and multipoint at
W4A8 and weight-only W3 (multipoint at w_bits + 0.5 bits per weight), compared on real photos;
then the 36 Linear layers of the all-MiniLM-L6-v2 sentence embedder, compared by the cosine
similarity of its embeddings to FP32's (``run_text_demo``).

Calibration: seeded random crops and flips of the bundled photos. Evaluation: the 20 labelled
ImageNet photos (top-1) plus the center crops of the bundled photos (top-1 agreement and KL
divergence to FP32, no labels needed).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mpq.config import QuantConfig
from mpq.examples import assets
from mpq.quantize import last_report, quantize
from mpq.summary import model_size_bytes

__all__ = ["DemoData", "load_demo_data", "fidelity", "run_demo", "run_text_demo"]


@dataclass
class DemoData:
    eval_images: torch.Tensor  # labelled photos first, then the bundled photos
    labels: torch.Tensor  # labels of the first len(labels) eval images
    calib_batches: list[torch.Tensor]


def load_demo_data(calib_images: int = 64, batch_size: int = 16, seed: int = 0) -> DemoData:
    tf = assets.efficientnet_lite_transform()
    labelled = assets.labelled_imagenet_photos()
    photos = assets.unlabelled_photos()
    x = torch.cat([assets.load_images([p for p, _ in labelled], tf), assets.load_images(photos, tf)])
    y = torch.tensor([label for _, label in labelled])
    calib = assets.calibration_images(photos, calib_images, seed=seed)
    return DemoData(x, y, list(calib.split(batch_size)))


def fidelity(logits: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top-1 on the labelled images, top-1 agreement and mean KL(reference || model) on all."""
    n = labels.numel()
    return {
        "top1": float((logits[:n].argmax(1) == labels).double().mean()),
        "agreement": float((logits.argmax(1) == reference.argmax(1)).double().mean()),
        "kl": float(
            F.kl_div(
                F.log_softmax(logits.double(), 1),
                F.log_softmax(reference.double(), 1),
                log_target=True,
                reduction="batchmean",
            )
        ),
    }


def _rtn_and_multipoint(presets: tuple[str, ...], seed: int) -> dict[str, QuantConfig]:
    """Per preset, in order, the configs named "RTN <preset>" and "multipoint <preset>" (the
    latter at w_bits + 0.5 bits)."""
    return {
        f"{label} {p}": QuantConfig.preset(p, seed=seed, **({"method": "rtn"} if label == "RTN" else {}))
        for p in presets
        for label in ("RTN", "multipoint")
    }


def run_demo(configs: dict[str, QuantConfig] | None = None, json_path: str | None = None, seed: int = 0) -> list[dict]:
    """Quantize EfficientNet-Lite0 with each config and print one table row per model."""
    if configs is None:
        configs = _rtn_and_multipoint(("W4A8", "W3A16"), seed)
    started = time.perf_counter()
    model = assets.load_efficientnet_lite0()
    data = load_demo_data(seed=seed)
    with torch.no_grad():
        reference = model(data.eval_images)
    n_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))

    def evaluate(m: torch.nn.Module) -> dict:
        return {"size_mb": model_size_bytes(m) / 1e6, **fidelity(m(data.eval_images), reference, data.labels)}

    with torch.no_grad():
        rows = [{"model": "FP32", "avg_bits": 32.0, **evaluate(model), "seconds": 0.0}]
    rows += _quantize_each(model, data.calib_batches, configs, evaluate)
    n_lab, n_all = data.labels.numel(), data.eval_images.shape[0]
    print(
        f"EfficientNet-Lite0 ({n_weights / 1e6:.2f}M conv/linear weights), {len(data.calib_batches)} calibration batches "
        f"({sum(b.shape[0] for b in data.calib_batches)} crops of the bundled photos)"
    )
    print(
        f"top-1 on {n_lab} labelled ImageNet photos; agreement and KL vs FP32 on those plus {n_all - n_lab} bundled photos"
    )
    _print_table(
        rows,
        [
            ("size_mb", "size MB", 9, ".2f"),
            ("avg_bits", "avg bits", 10, ".2f"),
            ("top1", "top-1", 8, ".1%"),
            ("agreement", "agree", 8, ".1%"),
            ("kl", "KL", 9, ".4f"),
            ("seconds", "quant s", 9, ".1f"),
        ],
    )
    print()
    text_rows = run_text_demo(seed=seed)
    if json_path:
        import mpq

        with open(json_path, "w") as f:
            json.dump(
                {
                    "command": f"python -m mpq demo --seed {seed} --json {json_path}",
                    **_provenance(),
                    "torch_threads": torch.get_num_threads(),
                    "seconds_total": time.perf_counter() - started,
                    "rows": rows,
                    "minilm_rows": text_rows,
                    "build": mpq.build_info(),
                    "seed": seed,
                },
                f,
                indent=2,
            )
    return rows


def _provenance() -> dict:
    """The git commit of the source tree (when run from a checkout) and the CPU model."""
    import platform
    import subprocess
    from pathlib import Path

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {"commit": commit or None, "cpu": cpu, "torch": torch.__version__}


def _quantize_each(
    model: torch.nn.Module, calib: list[torch.Tensor], configs: dict[str, QuantConfig], evaluate
) -> list[dict]:
    """One row per config: quantize ``model``, time it, and add ``evaluate(qmodel)``'s measures."""
    rows = []
    for name, cfg in configs.items():
        t0 = time.perf_counter()
        qmodel = quantize(model, calib, cfg)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            measures = evaluate(qmodel)
        rows.append(
            {
                "model": name,
                "avg_bits": last_report(qmodel).avg_bits,
                **measures,
                "seconds": seconds,
                "config": cfg.to_dict(),
            }
        )
    return rows


def _print_table(rows: list[dict], columns: list[tuple[str, str, int, str]]) -> None:
    """The rows' model name, then per column (key, title, width, format)."""
    header = f"{'model':<18}" + "".join(f"{title:>{width}}" for _, title, width, _ in columns)
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<18}" + "".join(f"{r[key]:>{width}{fmt}}" for key, _, width, fmt in columns))


class _DropFloatLayerWarning(logging.Filter):
    """The embedding tables stay float in every config: say so once, in the table's header."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "stay in float" not in str(record.msg)


def run_text_demo(configs: dict[str, QuantConfig] | None = None, seed: int = 0) -> list[dict]:
    """Quantize the Linear layers of all-MiniLM-L6-v2 with each config, calibrated on
    ``mpq.examples.text.calibration_sentences()``, and print the cosine similarity of the embeddings of
    ``mpq.examples.text.evaluation_sentences()`` to FP32's (mean and minimum), one row per model."""
    from mpq.examples import text

    if configs is None:
        configs = _rtn_and_multipoint(("W4A16", "W3A16", "W4A8"), seed)
    model, tokenizer = assets.load_minilm()
    calib = text.calibration_batches(tokenizer, text.calibration_sentences())
    evaluation = text.tokenize(tokenizer, text.evaluation_sentences())
    with torch.no_grad():
        reference = model(evaluation)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    rows = [{"model": "FP32", "avg_bits": 32.0, **text.embedding_fidelity(reference, reference), "seconds": 0.0}]
    log, drop = logging.getLogger("mpq"), _DropFloatLayerWarning()
    log.addFilter(drop)
    try:
        rows += _quantize_each(model, calib, configs, lambda m: text.embedding_fidelity(m(evaluation), reference))
    finally:
        log.removeFilter(drop)
    print(
        f"all-MiniLM-L6-v2: {len(linear)} Linear layers ({sum(m.weight.numel() for m in linear) / 1e6:.2f}M weights) "
        f"quantized, the embedding tables stay float; calibrated on {len(text.calibration_sentences())} sentences"
    )
    print(f"cosine similarity of the sentence embeddings to FP32 on {evaluation.shape[0]} other sentences")
    _print_table(
        rows,
        [
            ("avg_bits", "avg bits", 10, ".2f"),
            ("cos_mean", "cos mean", 10, ".4f"),
            ("cos_min", "cos min", 10, ".4f"),
            ("seconds", "quant s", 9, ".1f"),
        ],
    )
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    run_demo()
