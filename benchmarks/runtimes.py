"""mpq's exported models in ONNX Runtime and OpenVINO, beside those runtimes' FP32 and their own int8.

    python benchmarks/runtimes.py                        # EfficientNet-Lite0 and ResNet-50, batch 1 and 16
    python benchmarks/runtimes.py --models lite0 --batches 1 --json build/runtimes.json

Rows per model, runtime and batch (2 threads, median of ``--repeats`` timed calls after two warm-up
calls, one row after the other; one random input per batch size for every row):
- ``fp32``: the float model exported by PyTorch's ONNX exporter (OpenVINO: precision hint f32, and
  ``fp32 (default precision)``: OpenVINO's default, bfloat16 where the CPU has AMX);
- ``ORT int8 (quantize_static)``: ONNX Runtime's own static int8 of that file (QDQ, uint8
  activations, int8 per-channel weights), calibrated on the same images as mpq; OpenVINO runs
  the same QDQ file; ``NNCF int8 (OpenVINO's own)``: ``nncf.quantize`` of the FP32 model in
  OpenVINO (defaults: W8A8), calibrated on the same images, when nncf is installed
  (``pip install .[bench]``); its fidelity is measured in OpenVINO;
- ``mpq PRESET``: ``mpq.quantize`` (seed 0) then ``mpq.export_onnx`` (``W4A8-merge``: with
  ``MultipointConfig(int8_merge=True)``; uint8 levels between layers), run in both runtimes;
  ``mpq PRESET requantize_rows``: the same with ``requantize_rows=True`` (layers whose points do not
  merge rounded to one int8 row per channel); ``mpq PRESET float between layers``: with
  ``int8_activations=False`` (every layer float in, float out: the export's earlier form).
Fidelity to FP32 (Lite0: KL / top-1 agreement on the demo's evaluation photos, in ONNX Runtime)
and file sizes. The JSON records the command, commit, CPU and versions (``provenance.py``).
"""

import argparse
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from cpu import load_task, median_ms, preset_config  # noqa: E402  (benchmarks/ is the script's directory)
from provenance import provenance  # noqa: E402

import mpq

ROOT = Path(__file__).resolve().parent.parent
warnings.filterwarnings("ignore")


def export_fp32(model: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    with torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    return path


def ort_int8(fp32: Path, calib: list[torch.Tensor], path: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"input": x.numpy()} for x in calib])

        def get_next(self):
            return next(self.items, None)

    pre = path.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    quantize_static(
        str(pre),
        str(path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )
    return path


NNCF_INT8 = "NNCF int8 (OpenVINO's own)"


def nncf_int8(fp32: Path, calib: list[torch.Tensor], path: Path) -> Path | None:
    """OpenVINO's own post-training int8 of the FP32 file (``nncf.quantize``, defaults: W8A8, per
    channel weights), calibrated on the same images as mpq; an IR at ``path`` (.xml), or None
    where nncf or openvino is not installed."""
    try:
        import nncf
        import openvino as ov
    except ImportError:
        return None
    images = [x[i : i + 1].numpy() for x in calib for i in range(x.shape[0])]
    q = nncf.quantize(ov.convert_model(str(fp32)), nncf.Dataset(images), subset_size=len(images))
    ov.save_model(q, str(path), compress_to_fp16=False)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["lite0", "resnet50"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--presets", nargs="+", default=["W4A8", "W4A8-merge"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-int8-code",
        type=int,
        default=None,
        help="mpq.export_onnx's max_int8_code (default: 127 where this CPU has VNNI, else 64: exact int8 kernels here)",
    )
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "runtimes.json"))
    args = p.parse_args(argv)
    import onnxruntime as ort

    try:
        import openvino as ov
    except ImportError:
        ov = None
    torch.set_num_threads(args.threads)
    max_code = args.max_int8_code or (127 if mpq.ops.int8_kernels_exact(8) else 64)

    def ort_run(path: Path):
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return lambda x: s.run(None, {"input": x})[0]

    def ov_run(path: Path, precision: str | None = "f32"):
        cfg = {"INFERENCE_NUM_THREADS": args.threads, "PERFORMANCE_HINT": "LATENCY"}
        if precision:
            cfg["INFERENCE_PRECISION_HINT"] = precision
        model = ov.Core().read_model(str(path)) if path.suffix == ".xml" else ov.convert_model(str(path))
        c = ov.Core().compile_model(model, "CPU", cfg)
        return lambda x: np.asarray(c(x)[0])

    import onnx

    versions = {"onnx": onnx.__version__, "onnxruntime": ort.__version__, "openvino": ov.__version__ if ov else None}
    out = {"command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])), **provenance(), **versions}
    out.update(
        {
            "seed": args.seed,
            "repeats": args.repeats,
            "max_int8_code": max_code,
            "rows": [],
            "sizes_bytes": {},
            "fidelity": {},
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model, calib, eval_images, quality = load_task(name, args.seed)
            files = {"fp32": export_fp32(model, calib[0][:1], Path(tmp) / f"{name}_fp32.onnx")}
            files["ORT int8 (quantize_static)"] = ort_int8(files["fp32"], calib, Path(tmp) / f"{name}_ort_int8.onnx")
            for preset in args.presets:
                q = mpq.quantize(model, calib, preset_config(preset, args.seed))
                variants = {
                    "": {},
                    " requantize_rows": {"requantize_rows": True},
                    " float between layers": {"int8_activations": False},
                }
                for suffix, options in variants.items():
                    label = f"mpq {preset}{suffix}"
                    files[label] = mpq.export_onnx(
                        q,
                        calib[0][:1],
                        Path(tmp) / f"{name}_{label}.onnx".replace(" ", "_"),
                        max_int8_code=max_code,
                        **options,
                    )
            ir = nncf_int8(files["fp32"], calib, Path(tmp) / f"{name}_nncf_int8.xml")
            out["sizes_bytes"][name] = {k: os.path.getsize(v) for k, v in files.items()}
            if ir is not None:
                out["sizes_bytes"][name][NNCF_INT8] = os.path.getsize(ir) + os.path.getsize(ir.with_suffix(".bin"))
            if eval_images is not None:
                with torch.no_grad():
                    ref = model(eval_images)
                out["fidelity"][name] = {
                    k: quality(torch.from_numpy(ort_run(v)(eval_images.numpy())), ref) for k, v in files.items()
                }
                if ir is not None:  # in OpenVINO (the other rows: in ONNX Runtime)
                    out["fidelity"][name][NNCF_INT8] = quality(torch.from_numpy(ov_run(ir)(eval_images.numpy())), ref)
            runners = {}
            if ir is not None:
                runners[("openvino", NNCF_INT8)] = ov_run(ir)
            for k, v in files.items():
                runners[("onnxruntime", k)] = ort_run(v)
                if ov is not None:
                    runners[("openvino", k)] = ov_run(v)
                    if k == "fp32":
                        runners[("openvino", "fp32 (default precision)")] = ov_run(v, None)
            g = torch.Generator().manual_seed(args.seed + 1)
            for b in args.batches:
                x = torch.randn(b, 3, 224, 224, generator=g).numpy()
                times = {key: median_ms(lambda f=f: f(x), args.repeats) for key, f in runners.items()}
                for (runtime, variant), ms in times.items():
                    row = {"model": name, "runtime": runtime, "batch": b, "variant": variant, "ms": ms}
                    row["speedup_vs_fp32"] = times[(runtime, "fp32")] / ms
                    row["speed_vs_runtime_int8"] = times[(runtime, "ORT int8 (quantize_static)")] / ms
                    if (runtime, NNCF_INT8) in times:
                        row["speed_vs_nncf_int8"] = times[(runtime, NNCF_INT8)] / ms
                    out["rows"].append(row)
                    print(
                        f"{name:9s} {runtime:12s} b{b:<3d} {variant:30s} {ms:9.2f} ms  {row['speedup_vs_fp32']:.2f}x FP32"
                    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(json.dumps({"sizes_bytes": out["sizes_bytes"], "fidelity": out["fidelity"]}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
