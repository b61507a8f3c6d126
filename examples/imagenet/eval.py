"""ImageNet validation of FP32 and quantized models, recorded in one JSON file.

    python examples/imagenet/eval.py --model torchvision:resnet50 --data ~/imagenet/val \
        --calib ~/imagenet/train --configs W4A8,W4A16 --methods rtn,multipoint --json resnet50.json

For every (config, method) pair it quantizes the model on the same seeded calibration subset
(default 1024 images drawn from --calib, which may be a train or val ImageFolder; it defaults to
--data, which then calibrates on validation images: say so when you report numbers) and reports
top-1 / top-5 on --data next to FP32, plus the top-1 agreement with FP32.

Preprocessing is the model's own (``python -m mpq ... --help`` explains the choices): the
torchvision weights' ``transforms()`` (resize 256 / center crop 224 / ImageNet mean and std for
most), ``mpq.examples.assets.efficientnet_lite_transform`` for ``efficientnet_lite0``.

Class folders map to class indices by ``--class-map``: ``sorted`` (default; the standard ImageNet
val folder with its 1000 wnid folders), ``index`` (folder names end with the class index, e.g.
``n00000243``: for a subset of classes such as the offline test set), or a JSON file
``{"folder": index}``.

The JSON holds the command line, every config, the seeds, the calibration files, the versions
(mpq, torch, torchvision, Python, the ops library build) and the times.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

from mpq.cli.configs import make_config
from mpq.cli.errors import UserError
from mpq.cli.evaluate import evaluate, quantize_and_evaluate, versions
from mpq.cli.images import CLASS_MAP_HELP, EvalData, calibration_batches, image_files, labelled_images
from mpq.cli.models import MODEL_HELP, load_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Top-1/top-5 on an ImageNet-style validation folder for FP32 and each quantized config.",
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument(
        "--data", required=True, metavar="DIR", help="validation images, ImageFolder layout DIR/<class>/<image>"
    )
    p.add_argument("--calib", metavar="DIR", help="calibration images (any layout; default: --data)")
    p.add_argument(
        "--calib-images", type=int, default=1024, metavar="N", help="seeded calibration subset size (default 1024)"
    )
    p.add_argument("--configs", default="W4A8", help="comma-separated presets or JSON config files (default W4A8)")
    p.add_argument("--methods", default="rtn,multipoint", help="comma-separated methods (default rtn,multipoint)")
    p.add_argument(
        "--avg-bits", type=float, help="average bits per weight of the multipoint methods (default: w_bits + 0.5)"
    )
    p.add_argument("--class-map", default="sorted", help=CLASS_MAP_HELP)
    p.add_argument("--preprocess", default="auto", choices=("auto", "imagenet", "tflite"))
    p.add_argument("--seed", type=int, default=0, help="calibration subset and quantization seed (default 0)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument(
        "--json", metavar="PATH", default="imagenet_eval.json", help="results file (default imagenet_eval.json)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    calib_dir = args.calib or args.data
    cal_batches = max(1, math.ceil(args.calib_images / args.batch_size))
    configs = []
    for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            avg = args.avg_bits if _is_multipoint(method) else None  # single-point methods have no budget
            configs.append(
                (name, make_config(name, avg_bits=avg, method=method, seed=args.seed, calib_batches=cal_batches))
            )
    files = image_files(calib_dir)
    samples, found = labelled_images(args.data, args.class_map)

    t0 = time.perf_counter()
    m = load_model(args.model, preprocess=args.preprocess)
    if m.kind != "float":
        raise UserError(f"--model {args.model} is already quantized; expected a float model")
    load_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    calib, chosen = calibration_batches(
        files, m.transform, args.calib_images, args.seed, args.batch_size, args.workers, args.quiet
    )
    calib_seconds = time.perf_counter() - t0
    data = EvalData(samples, m.transform, found, args.batch_size, args.workers)
    data.cache(args.quiet)  # small sets are decoded once for all models

    fp = evaluate(m.module, data, args.quiet, args.class_map, desc="evaluating FP32")
    reference = fp.pop("predictions")
    results = [{"name": "FP32", "method": "fp32", **fp}]
    print(f"{'FP32':<24} top-1 {100 * fp['top1']:6.2f}%  top-5 {100 * fp['top5']:6.2f}%", flush=True)
    for name, cfg in configs:
        _, row = quantize_and_evaluate(m.module, calib, cfg, data, args.quiet, reference, class_map="-")
        row["name"] = f"{cfg.method} {name}"
        results.append(row)
        print(
            f"{row['name']:<24} top-1 {100 * row['top1']:6.2f}%  top-5 {100 * row['top5']:6.2f}%  "
            f"agreement {100 * row['agreement']:5.1f}%  {row['avg_bits']:.3f} bits/weight  "
            f"quantize {row['quantize_seconds']:.1f}s",
            flush=True,
        )
    record = {
        "argv": args.argv,
        "model": m.label,
        "architecture": m.architecture,
        "data": str(args.data),
        "images": len(samples),
        "class_folders": found,
        "class_map": args.class_map,
        "preprocess": args.preprocess,
        "transform": repr(m.transform),
        "calibration": {
            "folder": str(calib_dir),
            "images": len(chosen),
            "seed": args.seed,
            "from_eval_folder": calib_dir == args.data,
            "files": [str(p) for p in chosen],
        },
        "seed": args.seed,
        "results": results,
        "seconds": {
            "load_model": load_seconds,
            "calibration_images": calib_seconds,
            "total": time.perf_counter() - t_start,
        },
        **versions(),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
        print(f"wrote {args.json}")
    return record


def _is_multipoint(method: str) -> bool:
    from mpq.methods import available, get_method

    if method not in available():
        raise UserError(f"--methods: unknown method {method!r}; expected some of {', '.join(available())}")
    return get_method(method).multipoint


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv if argv is None else ["examples/imagenet/eval.py", *argv])
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        run(args)
    except (UserError, ValueError, OSError) as e:
        print(f"eval.py: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
