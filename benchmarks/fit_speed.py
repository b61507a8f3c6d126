"""Speed of mpq::fit_multipoint on the CPU over every Conv2d/Linear weight of ResNet-50.

    python benchmarks/fit_speed.py [--out benchmarks/results/fit_speed_cpu.json]

Weights: torchvision resnet50(weights=None), random init under a fixed seed (the speed of the
fit does not depend on training; no download needed). Each layer's weight is one [C_out, D]
matrix, D = C_in/groups * kh * kw. Fast mode (the default solver) is timed after a warm-up
as the median of --runs passes; exact mode (breakpoint sweep) once, for comparison.
Target (PERF): fast mode, 4 bits, 4 points, under 10 s for all of ResNet-50 on a 2-core CPU.
"""
import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torchvision

import mpq
from mpq.ops import fit_multipoint

ROOT = Path(__file__).resolve().parent.parent


def resnet50_weights(seed: int) -> List[Tuple[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = torchvision.models.resnet50(weights=None)
    out = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            w = module.weight.detach()
            out.append((name, w.reshape(w.shape[0], -1).contiguous().to(torch.float32)))
    return out


def fit_all(weights: List[Tuple[str, torch.Tensor]], bits: int, max_points: int, exact: bool) -> Tuple[float, float]:
    """(wall seconds, process CPU seconds summed over threads) of one pass over all weights."""
    start, cpu_start = time.perf_counter(), time.process_time()
    for _, w in weights:
        fit_multipoint(w, bits, max_points, exact=exact)
    return time.perf_counter() - start, time.process_time() - cpu_start


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fit_speed_cpu.json")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--max-points", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3, help="timed passes of fast mode (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    parser.add_argument("--skip-exact", action="store_true", help="do not time exact mode")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    weights = resnet50_weights(args.seed)
    total = sum(w.numel() for _, w in weights)
    threads = torch.get_num_threads()

    load_before = os.getloadavg()
    fit_all(weights, args.bits, args.max_points, exact=False)  # warm-up: allocator, thread pool, caches
    fast_pairs = [fit_all(weights, args.bits, args.max_points, exact=False) for _ in range(args.runs)]
    fast_runs = [wall for wall, _ in fast_pairs]
    fast = statistics.median(fast_runs)
    fast_cpu = statistics.median(cpu for _, cpu in fast_pairs)
    exact, exact_cpu = (None, None) if args.skip_exact else fit_all(weights, args.bits, args.max_points, exact=True)
    load_after = os.getloadavg()

    # The slowest layers in fast mode, to see where time goes.
    per_layer: Dict[str, float] = {}
    for name, w in weights:
        t0 = time.perf_counter()
        fit_multipoint(w, args.bits, args.max_points, exact=False)
        per_layer[name] = time.perf_counter() - t0
    slowest = sorted(per_layer.items(), key=lambda kv: -kv[1])[:5]

    rows = [("fast", fast, fast_cpu, fast_runs)]
    if exact is not None:
        rows.append(("exact", exact, exact_cpu, [exact]))
    print(f"mpq.fit_multipoint on resnet50 (weights=None, seed {args.seed}): {len(weights)} Conv2d/Linear "
          f"weights, {total / 1e6:.2f} M weights, {args.bits} bits, max_points {args.max_points}, "
          f"CPU '{cpu_model()}' ({os.cpu_count()} cores), torch.get_num_threads() = {threads}, "
          f"load average {load_before[0]:.2f} before / {load_after[0]:.2f} after")
    print(f"{'mode':<6} {'seconds':>9} {'Mweights/s':>11} {'CPU s':>8}  wall-clock runs")
    for mode, seconds, cpu, runs in rows:
        print(f"{mode:<6} {seconds:>9.3f} {total / seconds / 1e6:>11.2f} {cpu:>8.2f}  "
              + ", ".join(f"{r:.3f}" for r in runs))
    print("slowest layers (fast): " + ", ".join(f"{n} {dict(weights)[n].shape[0]}x{dict(weights)[n].shape[1]} "
                                                f"{t:.3f}s" for n, t in slowest))

    info = mpq.build_info()
    result = {
        "benchmark": "fit_speed",
        "device": "cpu",
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": {"before": load_before[0], "after": load_after[0]},
        "torch_num_threads": threads,
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "mpq_version": getattr(mpq, "__version__", info.get("mpq_version")),
        "mpq_build": info,
        "model": "torchvision resnet50(weights=None)",
        "seed": args.seed,
        "layers": len(weights),
        "total_weights": total,
        "bits": args.bits,
        "max_points": args.max_points,
        "fast": {"median_s": fast, "runs_s": fast_runs, "median_cpu_s": fast_cpu,
                 "mweights_per_s": total / fast / 1e6},
        "exact": None if exact is None else {"s": exact, "cpu_s": exact_cpu, "mweights_per_s": total / exact / 1e6},
        "slowest_layers_fast_s": dict(slowest),
        "target_s": 10.0,
        "meets_target": fast < 10.0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
