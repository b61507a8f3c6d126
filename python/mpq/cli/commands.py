"""The commands of ``python -m mpq``: argument parsing and one ``cmd_*`` function per command.

A user's mistake (missing folder, unknown model, bad config, unreadable file) ends the command
with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from mpq.cli.configs import make_config, sweep_configs
from mpq.cli.errors import UserError
from mpq.cli.evaluate import evaluate, quantize_and_evaluate, versions
from mpq.cli.images import CLASS_MAP_HELP, EvalData, calibration_batches, image_files, labelled_images
from mpq.cli.models import MODEL_HELP, LoadedModel, load_model
from mpq.distributed import is_main

__all__ = ["build_parser", "main", "cmd_quantize", "cmd_eval", "cmd_sweep", "cmd_info", "cmd_demo", "format_table"]


# ---- commands ------------------------------------------------------------------------------------


def _eval_data(args, transform) -> EvalData:
    samples, found = labelled_images(args.data, args.class_map)
    return EvalData(samples, transform, found, args.batch_size, args.workers)


def _say(args, text: str) -> None:
    if not args.quiet:  # rank 0 alone speaks under torchrun (main() sets quiet elsewhere)
        print(text, file=sys.stderr)


def cmd_quantize(args) -> int:
    import mpq

    cfg = make_config(
        args.config,
        avg_bits=args.avg_bits,
        method=args.method,
        seed=args.seed,
        calib_batches=max(1, math.ceil(args.calib_images / args.batch_size)),
    )
    files = image_files(args.calib)
    out = Path(args.out)
    if not out.parent.is_dir():
        raise UserError(f"--out {args.out}: the folder {out.parent} does not exist")
    m = load_model(args.model, preprocess=args.preprocess)
    if m.kind != "float":
        raise UserError(
            f"--model {args.model} is a saved {m.kind} model; expected a float model "
            f"(torchvision:<name> or efficientnet_lite0)"
        )
    calib, chosen = calibration_batches(
        files, m.transform, args.calib_images, cfg.seed, args.batch_size, args.workers, args.quiet
    )
    _say(
        args,
        f"quantizing {m.label} ({cfg.method}, w_bits={cfg.w_bits}, a_bits={cfg.a_bits}, "
        f"{cfg.budget_bits:g} bits/weight budget) on {len(chosen)} calibration images ...",
    )
    qmodel, row = quantize_and_evaluate(m.module, calib, cfg, None, args.quiet)
    if not is_main():  # every rank holds the same model; rank 0 writes it
        return 0
    mpq.save(qmodel, out, config=cfg, architecture=m.architecture)
    if args.summary:
        print(mpq.summary(qmodel))
    if args.plot:
        mpq.plot_allocation(
            qmodel,
            args.plot,
            title=f"{m.label}, {cfg.method}: points per output channel, "
            f"{row['avg_bits']:.2f} bits per weight on average",
        )
    print(
        f"quantized {m.label}: {len(mpq.last_report(qmodel).layers)} layers, {row['avg_bits']:.3f} bits per weight "
        f"on average, {row['size_mb']:.2f} MB, {row['quantize_seconds']:.1f} s"
    )
    print(f"saved {out}")
    return 0


def _print_result(label: str, res: dict[str, Any]) -> None:
    print(
        f"{label}: top-1 {100 * res['top1']:.2f}% ({res['correct1']}/{res['images']})  "
        f"top-5 {100 * res['top5']:.2f}% ({res['correct5']}/{res['images']})"
    )


def cmd_eval(args) -> int:
    import mpq

    samples, found = labelled_images(args.data, args.class_map)  # fail before loading anything
    if args.quantized:
        if not Path(args.quantized).is_file():
            raise UserError(f"--quantized {args.quantized}: no such file")
        base = load_model(args.model, need_weights=False, preprocess=args.preprocess)
        if base.kind != "float":
            raise UserError(f"--model {args.model}: with --quantized, expected the float architecture")
        module = mpq.load(args.quantized, base.module)
        m = LoadedModel(module, base.transform, f"{base.label} + {Path(args.quantized).name}", base.architecture, "mpq")
    else:
        m = load_model(args.model, preprocess=args.preprocess)
    data = EvalData(samples, m.transform, found, args.batch_size, args.workers)
    res = evaluate(m.module, data, args.quiet, args.class_map)
    res.pop("predictions")
    if not is_main():
        return 0
    _print_result(m.label, res)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"model": m.label, "data": str(args.data), **res, **versions()}, indent=2)
        )
    return 0


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if not vals:
        raise UserError(f"{what}: expected at least one number")
    return vals


def format_table(rows: list[dict[str, Any]]) -> str:
    header = f"{'model':<24}{'avg bits':>9}{'size MB':>9}{'top-1':>9}{'top-5':>9}{'agree':>8}{'quant s':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        agree = f"{100 * r['agreement']:7.1f}%" if r.get("agreement") is not None else f"{'-':>8}"
        lines.append(
            f"{r['name']:<24}{r['avg_bits']:>9.3f}{r['size_mb']:>9.2f}{100 * r['top1']:>8.2f}%"
            f"{100 * r['top5']:>8.2f}%{agree}{r.get('quantize_seconds', 0.0):>9.1f}"
        )
    return "\n".join(lines)


def cmd_sweep(args) -> int:
    import mpq
    from mpq.methods import get_method
    from mpq.plots import plot_sweep

    bits = _floats(args.avg_bits, "--avg-bits")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    configs = sweep_configs(
        args.config, bits, methods, args.seed, max(1, math.ceil(args.calib_images / args.batch_size))
    )
    files = image_files(args.calib)
    labelled_images(args.data, args.class_map)  # check the folder before the long part
    m = load_model(args.model, preprocess=args.preprocess)
    if m.kind != "float":
        raise UserError(
            f"--model {args.model} is a saved {m.kind} model; expected a float model "
            f"(torchvision:<name> or efficientnet_lite0)"
        )
    calib, chosen = calibration_batches(
        files, m.transform, args.calib_images, args.seed, args.batch_size, args.workers, args.quiet
    )
    data = _eval_data(args, m.transform)
    data.cache(args.quiet)
    fp = evaluate(m.module, data, args.quiet, args.class_map, desc="evaluating FP32")
    reference = fp.pop("predictions")
    n_weights = sum(p.numel() for p in m.module.parameters())
    rows = [
        {
            "name": "FP32",
            "method": "fp32",
            "avg_bits": 32.0,
            "size_mb": mpq.model_size_bytes(m.module) / 1e6,
            "agreement": 1.0,
            "quantize_seconds": 0.0,
            "n_params": n_weights,
            **fp,
        }
    ]
    for i, cfg in enumerate(configs):
        what = (
            f"at {cfg.budget_bits:g} bits per weight"
            if get_method(cfg.method).multipoint
            else "(one point per channel)"
        )
        _say(args, f"[{i + 1}/{len(configs)}] {cfg.method} {what} ...")
        _, row = quantize_and_evaluate(m.module, calib, cfg, data, args.quiet, reference, class_map="-")
        row["name"] = f"{cfg.method} {cfg.budget_bits:g}" if get_method(cfg.method).multipoint else cfg.method
        rows.append(row)
    if not is_main():
        return 0
    print(
        f"{m.label}: {len(chosen)} calibration images, {len(data.samples)} evaluation images; "
        f"agree = top-1 agreement with FP32"
    )
    print(format_table(rows))
    plot = args.plot or "sweep.png"
    plot_sweep(
        [r for r in rows[1:]],
        plot,
        reference=rows[0],
        title=f"{m.label}: quality vs average bits per weight ({len(data.samples)} images)",
    )
    print(f"plot: {plot}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": m.label, "rows": rows, **versions()}, indent=2))
        print(f"json: {args.json}")
    return 0


def cmd_info(args) -> int:
    import mpq

    print(json.dumps(mpq.build_info(), indent=2))
    return 0


def cmd_demo(args) -> int:
    from mpq.examples.assets import AssetMissing
    from mpq.examples.demo import run_demo

    try:
        run_demo(json_path=args.json, seed=args.seed)
    except AssetMissing as e:
        print(f"mpq demo: {e}", file=sys.stderr)
        return 2
    return 0


# ---- argument parsing ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line (and exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _int_at_least(lo: int):
    """An argparse type: an integer >= lo, with a one-line message otherwise."""
    what = "a positive integer" if lo == 1 else f"an integer >= {lo}"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v

    return parse


_positive_int, _nonneg_int = _int_at_least(1), _int_at_least(0)


def _common(p: argparse.ArgumentParser, calib: bool, data: bool) -> None:
    p.add_argument("--model", required=True, metavar="MODEL", help=MODEL_HELP)
    if calib:
        p.add_argument(
            "--calib",
            required=True,
            metavar="DIR",
            help="folder of calibration images (any layout, searched recursively; e.g. ImageNet train/)",
        )
        p.add_argument(
            "--calib-images",
            type=_positive_int,
            default=1024,
            metavar="N",
            help="number of calibration images, a seeded random subset of DIR (default 1024)",
        )
    if data:
        p.add_argument(
            "--data",
            required=True,
            metavar="DIR",
            help="labelled images in the ImageFolder layout DIR/<class>/<image> (e.g. ImageNet val/)",
        )
        p.add_argument("--class-map", default="sorted", metavar="MAP", help=CLASS_MAP_HELP)
    p.add_argument(
        "--preprocess",
        default="auto",
        choices=("auto", "imagenet", "tflite"),
        help="input preprocessing: auto (the model's own: torchvision weights' transforms, the TF Lite "
        "scaling for efficientnet_lite0, imagenet for TorchScript files), imagenet (resize 256, "
        "center crop 224, ImageNet mean/std) or tflite (same crop, pixels (255x-127)/128)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=32, metavar="B", help="images per batch (default 32)")
    p.add_argument(
        "--workers",
        type=_nonneg_int,
        default=min(4, os.cpu_count() or 1),
        metavar="W",
        help="image decoding processes (default: min(4, CPUs); 0 decodes in the main process)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or status lines")


def cmd_export(args) -> int:
    import torch

    import mpq

    m = load_model(args.model, need_weights=False)
    if m.kind != "mpq":
        raise UserError(f"--model {args.model}: expected a file written by 'quantize' (mpq.save), got a {m.kind} model")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise UserError(f"--out {args.out}: the folder {out.parent} does not exist")
    example = torch.zeros(1, 3, args.image_size, args.image_size)
    options = {"max_int8_code": args.max_int8_code, "requantize_rows": args.requantize_rows}
    if args.format == "onnx":
        path = mpq.export_onnx(m.module, example, out, **options)
    else:
        if out.suffix != ".xml":
            raise UserError(f"--out {args.out}: an OpenVINO IR is a .xml file (its weights go beside it in .bin)")
        path = mpq.export_openvino(m.module, example, out, **options)
    size = path.stat().st_size + (path.with_suffix(".bin").stat().st_size if args.format == "openvino" else 0)
    print(f"exported {m.label} to {path} ({args.format}, {size / 1e6:.2f} MB)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m mpq",
        description="Multipoint post-training quantization for PyTorch: quantize a trained image classifier to "
        "low-bit weights without retraining, evaluate it, and compare methods.",
        epilog="Run 'python -m mpq COMMAND --help' for a command's options. Example: python -m mpq quantize "
        "--model efficientnet_lite0 --calib photos/ --config W4A8 --out effnet.mpq.safetensors",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every quantized layer")
    parser.add_argument(
        "--dist-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="under torchrun: seconds a rank waits for the others before it stops with an error (default 600)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    q = sub.add_parser(
        "quantize",
        help="quantize a model on calibration images and save it",
        description="Quantize a model's Conv2d and Linear layers (multipoint weights or a baseline method) using "
        "calibration images, and save the result with mpq.save (load it with mpq.load or "
        "'python -m mpq eval --model FILE').",
    )
    _common(q, calib=True, data=False)
    q.add_argument(
        "--config",
        default="W4A8",
        metavar="CONFIG",
        help="preset W4A8 (4-bit weights, 8-bit activations; default), W4A16, W3A16, W2A16, W8A8 "
        "(A16: float activations), W4A7, W8A7 (7-bit activations: the int8 kernels of CPUs without VNNI), "
        "or a JSON file of QuantConfig fields",
    )
    q.add_argument(
        "--avg-bits",
        type=float,
        metavar="BITS",
        help="average bits per weight for multipoint, codes and scales counted (default: w_bits + 0.5)",
    )
    q.add_argument(
        "--method",
        metavar="METHOD",
        help="weight quantizer: multipoint (default) or rtn (round to nearest, one point per channel), "
        "or another registered method",
    )
    q.add_argument("--seed", type=int, default=0, help="seed of the calibration subset and of quantization (default 0)")
    q.add_argument("--out", required=True, metavar="PATH", help="file to write, e.g. model.mpq.safetensors")
    q.add_argument("--summary", action="store_true", help="print the per-layer table (points, bits, SQNR)")
    q.add_argument("--plot", metavar="PNG", help="also write a PNG of the points per channel of every layer")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser(
        "eval",
        help="top-1 / top-5 accuracy of a model on labelled images",
        description="Evaluate a float model, a saved quantized model (--model FILE), or a float architecture with "
        "a quantized file loaded into it (--quantized FILE) on an ImageFolder of labelled images "
        "(e.g. ImageNet val/), and print top-1 and top-5.",
    )
    _common(e, calib=False, data=True)
    e.add_argument("--quantized", metavar="FILE", help="a file written by 'quantize' (mpq.save), loaded into --model")
    e.add_argument("--json", metavar="PATH", help="also write the result and versions as JSON")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser(
        "sweep",
        help="quality vs average bits for several methods: a table and a PNG plot",
        description="Quantize one model at several average bit widths with several methods (same calibration "
        "images), evaluate each, print a table and plot quality against average bits per weight.",
    )
    _common(s, calib=True, data=True)
    s.add_argument("--config", default="W4A8", metavar="CONFIG", help="the base preset or JSON config (default W4A8)")
    s.add_argument(
        "--avg-bits",
        default="4.0,4.25,4.5,5",
        metavar="LIST",
        help="average bits per weight to try, comma-separated (default 4.0,4.25,4.5,5); single-point "
        "methods such as rtn run once",
    )
    s.add_argument(
        "--methods", default="rtn,multipoint", metavar="LIST", help="methods, comma-separated (default rtn,multipoint)"
    )
    s.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    s.add_argument("--plot", metavar="PNG", help="where to write the plot (default sweep.png)")
    s.add_argument("--json", metavar="PATH", help="also write every row as JSON")
    s.set_defaults(func=cmd_sweep)

    x = sub.add_parser(
        "export",
        help="export a quantized model to ONNX (QDQ, standard operators) or an OpenVINO IR",
        description="Export a file written by 'quantize' to an ONNX file of standard operators (int8 weights, "
        "QuantizeLinear / DequantizeLinear activations) that ONNX Runtime and OpenVINO run without plugins, or to "
        "an OpenVINO IR (needs: pip install onnx onnxruntime openvino).",
    )
    x.add_argument("--model", required=True, metavar="FILE", help="a file written by 'quantize' (mpq.save)")
    x.add_argument("--format", choices=["onnx", "openvino"], default="onnx", help="onnx (default) or openvino")
    x.add_argument("--out", required=True, metavar="PATH", help="the .onnx file, or the OpenVINO .xml")
    x.add_argument(
        "--image-size", type=_int_at_least(1), default=224, help="input height and width it is traced at (224)"
    )
    x.add_argument(
        "--max-int8-code",
        type=_int_at_least(1),
        default=127,
        metavar="N",
        help="largest merged int8 code (127; 64 for runtimes on CPUs without VNNI, whose int8 kernels saturate "
        "pairs of products in int16 under 8-bit activations)",
    )
    x.add_argument(
        "--requantize-rows",
        action="store_true",
        help="round layers whose points do not merge into one int8 row per channel (per-channel int8, max|w|/N): "
        "they then run on the runtimes' int8 kernels, at a weight that is no longer mpq's exactly",
    )
    x.set_defaults(func=cmd_export)
    d = sub.add_parser("demo", help="quantize EfficientNet-Lite0 offline and compare FP32, RTN and multipoint")
    d.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    d.add_argument("--seed", type=int, default=0, help="calibration crops and sampling seed (default 0)")
    d.set_defaults(func=cmd_demo)
    i = sub.add_parser("info", help="print how the ops library was built")
    i.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.command in ("demo", "info"):
        return args.func(args)
    import torch.distributed as dist

    from mpq.distributed import DistributedError, init_from_env

    try:
        # under torchrun (WORLD_SIZE > 1): join the process group; rank 0 alone prints and writes
        if init_from_env(args.dist_timeout):
            args.quiet = args.quiet or not is_main()
        return args.func(args)
    except DistributedError as e:
        msg = str(e)
    except UserError as e:
        msg = str(e)
    except ValueError as e:  # mpq's own argument and file checks (mpq.load, QuantConfig, ...)
        if args.verbose:
            raise
        msg = str(e)
    except OSError as e:  # unreadable or unwritable files
        if args.verbose:
            raise
        msg = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
    except KeyboardInterrupt:
        print(f"mpq {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    first = " ".join(msg.split())  # one line
    where = f" (rank {os.environ.get('RANK', '?')})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    print(f"mpq {args.command}{where}: {first}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
