"""Top-1 / top-5 of a model on ``EvalData``, quantize-then-evaluate rows, and the versions a
result records."""

from __future__ import annotations

import sys
import time
from typing import Any

from mpq.cli.errors import UserError
from mpq.cli.images import EvalData

__all__ = ["evaluate", "quantize_and_evaluate", "versions"]


def evaluate(
    model, data: EvalData, quiet: bool = True, class_map: str = "sorted", desc: str = "evaluating"
) -> dict[str, Any]:
    """Top-1 / top-5 of ``model`` on ``data``: {"top1", "top5", "correct1", "correct5", "images",
    "seconds", "predictions" (top-1 class per image, a tensor)}. Under a process group each rank
    evaluates its batches (``EvalData.batches``) and every rank returns the counts of all images,
    each counted once."""
    import torch

    from mpq.distributed import agree, gather_objects, is_main

    t0 = time.perf_counter()

    def run() -> tuple[int, int, int, list, int | None]:
        c1 = c5 = n = 0
        preds, classes = [], None
        with torch.no_grad():
            for x, y in data.batches(quiet, desc):
                out = model(x)
                if not isinstance(out, torch.Tensor) or out.dim() != 2:
                    raise UserError("the model's output is not [N, classes] logits")
                if int(y.max()) >= out.shape[1]:
                    raise UserError(
                        f"class index {int(y.max())} is out of range for a model with {out.shape[1]} outputs "
                        f"(see --class-map)"
                    )
                top = out.topk(min(5, out.shape[1]), dim=1).indices
                c1 += int((top[:, 0] == y).sum())
                c5 += int((top == y[:, None]).any(dim=1).sum())
                n += y.numel()
                preds.append(top[:, 0])
                classes = out.shape[1]
        return c1, c5, n, preds, classes

    part = agree("evaluation", run)
    parts = gather_objects(part, "gathering the evaluation counts")
    c1, c5, n = (sum(p[k] for p in parts) for k in range(3))
    classes = next((p[4] for p in parts if p[4] is not None), None)
    # rank r's j-th batch is the global batch j * size + r
    ordered = [p[3][j] for j in range(max(len(p[3]) for p in parts)) for p in parts if j < len(p[3])]
    if class_map == "sorted" and data.num_classes_found != classes and is_main():
        print(
            f"mpq: note: {data.num_classes_found} class folders for a model with {classes} outputs; with --class-map "
            f"sorted the k-th folder counts as class k (use --class-map index or a JSON map for a subset of classes)",
            file=sys.stderr,
        )
    return {
        "top1": c1 / n,
        "top5": c5 / n,
        "correct1": c1,
        "correct5": c5,
        "images": n,
        "seconds": time.perf_counter() - t0,
        "predictions": torch.cat(ordered),
    }


def quantize_and_evaluate(
    model,
    calib: list[Any],
    cfg,
    data: EvalData | None,
    quiet: bool = True,
    reference: Any | None = None,
    class_map: str = "sorted",
) -> tuple[Any, dict[str, Any]]:
    """Quantize ``model`` with ``cfg`` on ``calib`` and evaluate it on ``data``: (qmodel, row)."""
    import mpq

    t0 = time.perf_counter()
    qmodel = mpq.quantize(model, calib, cfg)
    seconds = time.perf_counter() - t0
    report = mpq.last_report(qmodel)
    row: dict[str, Any] = {
        "method": cfg.method,
        "config": cfg.to_dict(),
        "target_bits": cfg.budget_bits,
        "avg_bits": report.avg_bits,
        "size_mb": mpq.model_size_bytes(qmodel) / 1e6,
        "quantize_seconds": seconds,
        "float_layers": [n for n, _ in report.float_layers],
    }
    if data is not None:
        res = evaluate(qmodel, data, quiet, class_map, desc=f"evaluating {cfg.method}")
        preds = res.pop("predictions")
        row.update(res)
        row["eval_seconds"] = row.pop("seconds")
        if reference is not None:
            row["agreement"] = float((preds == reference).double().mean())
    return qmodel, row


def versions() -> dict[str, Any]:
    """{"versions": mpq, torch, torchvision, Python and platform; "build": ``mpq.build_info()``}: what a
    result file records beside its numbers."""
    import platform

    import torch
    import torchvision

    import mpq

    return {
        "versions": {
            "mpq": mpq.__version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "build": mpq.build_info(),
    }
