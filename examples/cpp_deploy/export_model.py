"""Quantizes EfficientNet-Lite0 (or ResNet-50) with mpq, saves it as TorchScript and as an
AOTInductor package for mpq_deploy (C++), with an input and Python's outputs on it, and prints
Python's top-5 for comparison.

    python examples/cpp_deploy/export_model.py --out build/deploy-example
    # -> build/deploy-example/efficientnet_lite0_mpq.pt   the quantized model (TorchScript)
    #    build/deploy-example/efficientnet_lite0_mpq.pt2  the same model (torch.export + AOTInductor)
    #    build/deploy-example/efficientnet_lite0_fp32.pt  the float model (TorchScript)
    #    build/deploy-example/input.pt                    buffers `input` [1, 3, 224, 224], `output` and
    #                                                     `output_aoti` [1, 1000] (Python's, from each file)
    python examples/cpp_deploy/export_model.py --model resnet50 --out build/deploy-example
    # -> resnet50_mpq.pt, resnet50_mpq.pt2, resnet50_fp32.pt, input_resnet50.pt

EfficientNet-Lite0: its ImageNet weights, calibration on seeded random crops of the bundled photos
(mpq.examples.demo.load_demo_data); the input is the first labelled ImageNet photo, preprocessed like
ImageNet evaluation. ResNet-50: torchvision's architecture with seeded random weights (no
pretrained weights offline; its speed does not depend on them), calibration on 2 x 8 seeded
random images, a seeded random input. Works offline with the assets of docs/ASSETS.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import mpq
from mpq.examples import assets
from mpq.examples.demo import load_demo_data


class TensorFile(nn.Module):
    """Named buffers in a TorchScript module: what C++ reads with torch::jit::load, no Python."""

    def __init__(self, **tensors: torch.Tensor):
        super().__init__()
        for name, t in tensors.items():
            # NB: clone: a slice of a batch would save the whole batch's storage.
            self.register_buffer(name, t.detach().cpu().clone())


def to_torchscript(qmodel: nn.Module, example: torch.Tensor, how: str) -> torch.jit.ScriptModule:
    """torch.jit.script where the model allows it; else torch.jit.trace on ``example``.

    NB: the efficientnet_lite_pytorch model is not scriptable (its blocks keep their arguments
    in a namedtuple that TorchScript cannot compile, in FP32 too), so it is traced: the mpq ops
    record into the trace like aten ops, and the 'same' padding of its convolutions is fixed
    for the input size traced (224 x 224).
    """
    if how in ("auto", "script"):
        try:
            return torch.jit.script(qmodel)
        except Exception as e:  # TorchScript raises several types for unsupported Python
            if how == "script":
                raise
            first = str(e).strip().splitlines()
            print(f"torch.jit.script failed ({first[0].rstrip(':.') if first else type(e).__name__}); tracing instead")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(qmodel, example, check_trace=False)


def print_top5(title: str, logits: torch.Tensor) -> None:
    p, i = torch.softmax(logits.float(), 1).topk(5, 1)
    print(f"{title}:")
    for j in range(5):
        print(f"  {j + 1}. class {int(i[0, j]):4d}  p = {float(p[0, j]):.4f}")


def deployment_config(args: argparse.Namespace) -> mpq.QuantConfig:
    """The preset ``args.config``; ``auto`` picks the fastest deployment on this CPU (benchmarks/cpu.py:
    two points as one int8 row, 7-bit activations where 8-bit ones would saturate int8 kernels
    without VNNI) and writes its name back into ``args.config``."""
    if args.config != "auto":
        return mpq.QuantConfig.preset(args.config, seed=args.seed)
    base = "W4A8" if mpq.ops.int8_kernels_exact(8) else "W4A7"
    args.config = f"{base}-merge"
    return mpq.QuantConfig.preset(base, seed=args.seed, method=mpq.MultipointConfig(int8_merge=True))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/deploy-example"), help="output directory")
    parser.add_argument("--model", choices=("efficientnet_lite0", "resnet50"), default="efficientnet_lite0")
    parser.add_argument(
        "--config",
        default="auto",
        help="mpq preset (W4A8, W4A7, W4A16, W3A16, W2A16, W8A8, W8A7), or auto (default): W4A8 with int8_merge "
        "where this CPU's int8 kernels are exact with 8-bit activations (VNNI, AMX), else W4A7 with int8_merge",
    )
    parser.add_argument("--calib-images", type=int, default=64, help="calibration crops (default 64)")
    parser.add_argument("--torchscript", choices=("auto", "script", "trace"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-fuse", action="store_true", help="save the quantized model unfused (float32 between layers)"
    )
    parser.add_argument("--no-aoti", action="store_true", help="skip the AOTInductor package (TorchScript only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # torch 2.14 marks TorchScript deprecated on every call; it is still what LibTorch loads.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    if args.model == "resnet50":
        import torchvision

        torch.manual_seed(args.seed)
        model = torchvision.models.resnet50(weights=None).eval()
        g = torch.Generator().manual_seed(args.seed)
        calib = [torch.randn(8, 3, 224, 224, generator=g) for _ in range(2)]
        x, label = torch.randn(1, 3, 224, 224, generator=g), None
    else:
        model = assets.load_efficientnet_lite0()
        data = load_demo_data(calib_images=args.calib_images, seed=args.seed)
        calib = data.calib_batches
        x = data.eval_images[:1].clone()  # the first labelled ImageNet photo
        label = int(data.labels[0])
    qmodel = mpq.quantize(model, calib, deployment_config(args))
    report = mpq.last_report(qmodel)
    t_quant = time.perf_counter() - t0

    # The deployed form: int8 activations between layers (mpq.fuse_activations checks it layer by
    # layer on x). The torch.fx GraphModule it returns is scriptable, unlike the model's own code.
    deployed = qmodel if args.no_fuse else mpq.fuse_activations(qmodel, x)
    scripted = to_torchscript(deployed, x, args.torchscript)
    model_path = args.out / f"{args.model}_mpq.pt"
    scripted.save(str(model_path))
    # Python's output from the saved file: what the C++ program loads.
    loaded = torch.jit.load(str(model_path))
    with torch.no_grad():
        y = loaded(x)
        y_fp32 = model(x)
        y_eager = deployed(x)
    # The float model as TorchScript too (Lite0 traced: the package's code does not script), so that
    # the C++ example times FP32 and mpq side by side in one run.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.jit.trace(model, x, check_trace=False).save(str(args.out / f"{args.model}_fp32.pt"))
    # torch.export + AOTInductor: the path forward from TorchScript (deprecated in torch 2.14). The
    # package calls the mpq ops through its proxy executor (the dispatcher), so C++ links mpq::ops.
    outputs = {"output": y}
    if not args.no_aoti:
        t1 = time.perf_counter()
        package = torch._inductor.aoti_compile_and_package(
            torch.export.export(deployed, (x,)), package_path=str(args.out / f"{args.model}_mpq.pt2")
        )
        with torch.no_grad():
            outputs["output_aoti"] = torch._inductor.aoti_load_package(package)(x)
        rel_aoti = float((outputs["output_aoti"] - y_eager).abs().max() / y_eager.abs().max())
        print(
            f"wrote {package} ({Path(package).stat().st_size / 1e6:.1f} MB, compiled in {time.perf_counter() - t1:.0f}s); "
            f"vs the eager model: max relative difference {rel_aoti:.2e}"
        )
    input_path = args.out / ("input.pt" if args.model == "efficientnet_lite0" else f"input_{args.model}.pt")
    torch.jit.script(TensorFile(input=x, **outputs)).save(str(input_path))

    print(
        f"mpq {args.config}: {len(report.layers)} layers, {report.avg_bits:.2f} bits per weight, quantized in {t_quant:.1f}s"
    )
    print(f"wrote {model_path} ({model_path.stat().st_size / 1e6:.1f} MB) and {input_path} (input {tuple(x.shape)})")
    print(f"ops library: {mpq.library_path()}")
    print(f"input: the first labelled ImageNet photo, label {label}" if label is not None else "input: seeded noise")
    print_top5(f"Python top-5 (mpq {args.config}, saved TorchScript)", y)
    print_top5("Python top-5 (FP32)", y_fp32)
    rel = float((y - y_eager).abs().max() / y_eager.abs().max())
    print(
        f"saved TorchScript vs the eager {'quantized' if args.no_fuse else 'fused'} model: max relative difference {rel:.2e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
