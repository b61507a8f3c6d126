"""Time and peak memory of each stage of ``mpq.quantize`` on real-size models (issue 12 section 4).

    python benchmarks/quantize_cost.py                          # resnet50, lite0, minilm; W4A8
    python benchmarks/quantize_cost.py --models resnet50 --resnet-batches 2 --threads 1

Models (all offline):
- ``resnet50``: torchvision ResNet-50 with random weights (``weights=None``: nothing downloaded),
  calibrated on ``--resnet-batches`` batches of 16 random-normal 224 x 224 images (default 4: 64
  images). Its 3 x 3 convolutions of layer3/layer4 have D = 2304 / 4608 > calib_samples, the
  layers that made the old scale refit ask for 38.6 GB.
- ``lite0``: EfficientNet-Lite0 (``mpq.examples.assets``), the 64 calibration crops of ``mpq.examples.demo``.
- ``minilm``: all-MiniLM-L6-v2 (``mpq.examples.text``), its calibration sentences.

Each model runs in a fresh child process (so that its peak RSS is its own), at ``--threads``
torch threads. Per stage of ``mpq.quantize`` (``QuantReport.seconds``: calibrate, sensitivity,
fit, allocate, then the rest of the call -- scale refit, bias correction, the layers' swap -- then
bn_reestimation and verify when present): its seconds, and the peak RSS sampled every 5 ms during
it (``peak_rss_mib``) and that peak minus the RSS when ``quantize`` was called
(``peak_over_start_mib``). The stages' windows are laid end to end from the call's start in that
order, from their measured durations. ``ru_maxrss_mib`` is the process's exact peak (loading the
model and data included); ``start_rss_mib`` the RSS when ``quantize`` was called. torch's CPU
tensors are not seen by tracemalloc, hence RSS.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from provenance import changed_files, cpu_model, git_commit  # benchmarks/ (this script's folder) is on sys.path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["resnet50", "lite0", "minilm"]
STAGES = ["calibrate", "sensitivity", "fit", "allocate"]
AFTER = ["bn_reestimation", "verify"]  # timed stages after the layers are built
OTHER = "refit+build"  # the untimed rest of the call: scale refit, bias correction, layer swap


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssSampler(threading.Thread):
    """(time, RSS MiB) every ``interval`` seconds until ``stop``."""

    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval = interval
        self.samples = []
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            self.samples.append((time.perf_counter(), _rss_mib()))
            time.sleep(self.interval)

    def stop(self):
        self._halt.set()
        self.join()
        self.samples.append((time.perf_counter(), _rss_mib()))


def load(name: str, resnet_batches: int, seed: int):
    """(model, calibration batches, description)."""
    if name == "resnet50":
        import torchvision

        torch.manual_seed(seed)
        model = torchvision.models.resnet50(weights=None).eval()
        g = torch.Generator().manual_seed(seed)
        calib = [torch.randn(16, 3, 224, 224, generator=g) for _ in range(resnet_batches)]
        return (
            model,
            calib,
            (
                f"torchvision ResNet-50, random weights (weights=None); {resnet_batches} batches of 16 "
                f"random-normal 224x224 images"
            ),
        )
    if name == "lite0":
        from mpq.examples import assets
        from mpq.examples.demo import load_demo_data

        data = load_demo_data(calib_images=64, batch_size=16, seed=seed)
        return (
            assets.load_efficientnet_lite0(),
            data.calib_batches,
            "EfficientNet-Lite0 (ImageNet weights, mpq.examples.assets); 64 calibration crops of the bundled photos (mpq.examples.demo), batches of 16",
        )
    if name == "minilm":
        from mpq.examples import assets, text

        model, tokenizer = assets.load_minilm()
        calib = text.calibration_batches(tokenizer, text.calibration_sentences())
        return (
            model,
            calib,
            (
                f"all-MiniLM-L6-v2 (mpq.examples.assets), its 36 Linear layers; {len(text.calibration_sentences())} "
                f"calibration sentences of mpq.examples.text in {len(calib)} batches by length"
            ),
        )
    raise ValueError(f"unknown model {name!r}")


def stage_costs(seconds, t_call, samples, start_rss):
    """[{stage, seconds, peak_rss_mib, peak_over_start_mib}] from the report's durations laid end to end."""
    order = [(s, seconds[s]) for s in STAGES if s in seconds]
    after = [(s, seconds[s]) for s in AFTER if s in seconds]
    rest = seconds["total"] - sum(v for _, v in order + after)
    order += [(OTHER, max(0.0, rest))] + after
    out, t = [], t_call
    for i, (stage, dur) in enumerate(order):
        end = t + dur if i < len(order) - 1 else float("inf")  # the last window runs to the sampler's end
        window = [m for ts, m in samples if t <= ts < end]
        # A stage shorter than the sampling interval: the nearest sample before it.
        peak = max(window) if window else max((m for ts, m in samples if ts <= t), default=start_rss)
        out.append(
            {
                "stage": stage,
                "seconds": round(dur, 3),
                "peak_rss_mib": round(peak, 1),
                "peak_over_start_mib": round(peak - start_rss, 1),
            }
        )
        t = end
    return out


def child(name: str, config: str, resnet_batches: int, seed: int, threads: int) -> dict:
    import logging

    import mpq

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(threads)
    model, calib, description = load(name, resnet_batches, seed)
    cfg = mpq.QuantConfig.preset(config, seed=seed)
    sampler = RssSampler()
    start_rss = _rss_mib()
    sampler.start()
    t_call = time.perf_counter()
    qmodel = mpq.quantize(model, calib, cfg)
    wall = time.perf_counter() - t_call
    sampler.stop()
    report = mpq.last_report(qmodel)
    slowest = sorted(report.layers, key=lambda l: -l.fit_seconds)[:3]
    return {
        "model": name,
        "description": description,
        "config": config,
        "weights": sum(l.shape[0] * l.shape[1] for l in report.layers),
        "layers": len(report.layers),
        "largest_D": max(l.shape[1] for l in report.layers),
        "avg_bits": round(report.avg_bits, 4),
        "wall_seconds": round(wall, 2),
        "start_rss_mib": round(start_rss, 1),
        "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "stages": stage_costs(report.seconds, t_call, sampler.samples, start_rss),
        "slowest_layer_fits": [
            {"layer": l.name, "shape": list(l.shape), "seconds": round(l.fit_seconds, 2)} for l in slowest
        ],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    p.add_argument("--config", default="W4A8")
    p.add_argument(
        "--resnet-batches",
        type=int,
        default=4,
        help="ResNet-50 calibration batches of 16 images (default 4: 64 images)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "quantize_cost.json"))
    p.add_argument("--note", default="", help="conditions of the run, recorded in the JSON (e.g. the machine's load)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.config, args.resnet_batches, args.seed, args.threads)))
        return
    command = "python benchmarks/quantize_cost.py " + " ".join(sys.argv[1:])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    results = []
    for name in args.models:
        r = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                name,
                "--config",
                args.config,
                "--resnet-batches",
                str(args.resnet_batches),
                "--threads",
                str(args.threads),
                "--seed",
                str(args.seed),
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
        )
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            results.append({"model": name, "error": (r.stderr.strip().splitlines() or ["?"])[-1]})
            continue
        row = json.loads(r.stdout.strip().splitlines()[-1])
        results.append(row)
        print(
            f"{name}: {row['layers']} layers, {row['weights'] / 1e6:.1f}M weights, quantize {row['wall_seconds']:.1f} s, "
            f"RSS at the call {row['start_rss_mib']:.0f} MiB, process peak {row['ru_maxrss_mib']:.0f} MiB"
        )
        for s in row["stages"]:
            print(
                f"  {s['stage']:<16} {s['seconds']:8.2f} s   peak RSS {s['peak_rss_mib']:7.0f} MiB "
                f"({s['peak_over_start_mib']:+.0f} over the call's start)"
            )
    doc = {
        "benchmark": "quantize_cost",
        "command": command,
        "git_commit": git_commit(),
        "uncommitted_changes": changed_files(),
        "note": args.note,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "seed": args.seed,
        "config": args.config,
        "resnet_calibration": f"{args.resnet_batches} batches of 16 images (64 asked by the issue)",
        "how_measured": __doc__.split("\n\n", 1)[1].strip(),
        "results": results,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
