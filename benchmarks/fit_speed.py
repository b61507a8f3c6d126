"""Speed of mpq::fit_multipoint over every Conv2d/Linear weight of ResNet-50, on the CPU or a GPU.

    python benchmarks/fit_speed.py [--out benchmarks/results/fit_speed_cpu.json]
    python benchmarks/fit_speed.py --device cuda [--out benchmarks/results/fit_speed_cuda.json]
    python benchmarks/fit_speed.py --runs 1 --skip-exact --layers 10 --out /tmp/fit.json   # a smoke run
    python benchmarks/fit_speed.py --check-on-cpu --out /tmp/fit_check.json   # the --device cuda code, on the CPU

Weights: torchvision resnet50(weights=None), random init under a fixed seed (the speed of the
fit does not depend on training; no download needed). Each layer's weight is one [C_out, D]
matrix, D = C_in/groups * kh * kw. Fast mode (the default solver) is timed after a warm-up
as the median of --runs passes; exact mode (breakpoint sweep) once, for comparison.
Target (docs/PERF.md): fast mode, 4 bits, 4 points, under 10 s for all of ResNet-50 on a 2-core CPU.

--device cuda: each pass starts from the float32 weights in host memory and ends with the codes,
scales and errors back in host memory (end to end, wall clock, synchronized); CUDA events split it
into the host-to-device copy, the fit loop, the sum of the per-layer fit_multipoint calls (the
kernel time) and the copy back. Then, on the host, mpq.allocate.allocate_points on the weight
errors (4.5 bits per weight, relative sensitivity) is timed once. The same run fits every weight
on this machine's CPU (the results compared code for code, then one timed pass) and reads the
2-core build machine's result (benchmarks/results/fit_speed_cpu.json) for the comparison.
Target (docs/PERF.md): under 1 s end to end on the H100 for ResNet-50 at 4 bits, 4 points.
--check-on-cpu runs that code on the CPU (wall clock for the events) for the first 10 layers.

Exits with status 2 and a message when --device cuda finds no GPU (or no mpq CUDA kernels),
status 1 when the GPU's fit disagrees with the CPU's.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))  # a source build (python/mpq) before an installed mpq

from provenance import cpu_model  # noqa: E402  (benchmarks/ is the script's directory)

import mpq  # noqa: E402
from mpq.allocate import LayerErrors, allocate_points  # noqa: E402
from mpq.layout import point_bits  # noqa: E402
from mpq.ops import fit_multipoint  # noqa: E402

CPU_REFERENCE = ROOT / "benchmarks" / "results" / "fit_speed_cpu.json"


def resnet50_weights(seed: int) -> list[tuple[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = torchvision.models.resnet50(weights=None)
    out = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            w = module.weight.detach()
            out.append((name, w.reshape(w.shape[0], -1).contiguous().to(torch.float32)))
    return out


def fit_all(weights: list[tuple[str, torch.Tensor]], bits: int, max_points: int, exact: bool) -> tuple[float, float]:
    """(wall seconds, process CPU seconds summed over threads) of one pass over all weights."""
    start, cpu_start = time.perf_counter(), time.process_time()
    for _, w in weights:
        fit_multipoint(w, bits, max_points, exact=exact)
    return time.perf_counter() - start, time.process_time() - cpu_start


class Stopwatch:
    """Marks on the device's timeline: CUDA events on a GPU (read after a synchronize), the wall
    clock on the CPU (--check-on-cpu)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_pass(weights: list[tuple[str, torch.Tensor]], device: torch.device, bits: int, max_points: int, exact: bool):
    """One end-to-end pass on ``device``: host float32 weights -> device -> fit every layer ->
    codes, scales, sq_errors on the host. Returns (times in seconds, per-layer fit seconds, host results)."""
    clock = Stopwatch(device)
    synchronize(device)
    start_wall = time.perf_counter()
    start = clock.mark()
    on_device = [w.to(device) for _, w in weights]
    copied = clock.mark()
    outputs, layer_marks = [], []
    for w in on_device:
        before = clock.mark()
        outputs.append(fit_multipoint(w, bits, max_points, exact=exact))
        layer_marks.append((before, clock.mark()))
    fitted = clock.mark()
    host = [tuple(t.cpu() for t in out) for out in outputs]
    done = clock.mark()
    synchronize(device)
    wall = time.perf_counter() - start_wall
    per_layer = [clock.seconds(a, b) for a, b in layer_marks]
    times = {
        "end_to_end_s": wall,
        "h2d_s": clock.seconds(start, copied),
        "fit_loop_s": clock.seconds(copied, fitted),
        "kernel_s": sum(per_layer),
        "d2h_s": clock.seconds(fitted, done),
    }
    return times, per_layer, host


def allocation_seconds(weights: list[tuple[str, torch.Tensor]], host, bits: int) -> tuple[float, float]:
    """(seconds, average bits) of mpq.allocate.allocate_points over all layers at bits + 0.5 bits
    per weight, on the weight errors of the fit (relative sensitivity: 1 / the layer's energy)."""
    layers = {}
    for (name, w), (_, _, sq_errors) in zip(weights, host):
        C, D = w.shape
        energy = float(w.double().pow(2).sum())
        layers[name] = LayerErrors(
            sq_errors.double(), D, point_bits(D, bits), torch.full((C,), 1.0 / max(energy, 1e-30), dtype=torch.float64)
        )
    t0 = time.perf_counter()
    counts = allocate_points(layers, bits + 0.5, "model")
    seconds = time.perf_counter() - t0
    total = sum(w.numel() for _, w in weights)
    used = sum(float(counts[name].sum()) * point_bits(w.shape[1], bits) for name, w in weights)
    return seconds, used / total


def agreement(weights: list[tuple[str, torch.Tensor]], host, reference) -> dict:
    """The device's fit against the CPU kernel's, as tests/python/test_cuda.py compares them: codes
    identical except at exact ties (>= 99.9%), errors within 1e-5 relative (floor 1e-10 ||w_j||^2)."""
    equal = codes = within = errors = 0
    for (_, w), (c, _, e), (c_ref, _, e_ref) in zip(weights, host, reference):
        equal += int((c == c_ref).sum())
        codes += c.numel()
        tol = 1e-5 * e_ref.double().abs() + 1e-10 * w.double().pow(2).sum(1, keepdim=True)
        within += int(((e.double() - e_ref.double()).abs() <= tol).sum())
        errors += e.numel()
    out = {"codes_equal_fraction": equal / max(codes, 1), "sq_errors_within_tol_fraction": within / max(errors, 1)}
    ok = out["codes_equal_fraction"] >= 0.999 and out["sq_errors_within_tol_fraction"] >= 0.999
    out["check"] = "ok" if ok else "FAIL"
    return out


def cpu_reference() -> dict | None:
    """The 2-core CPU result in benchmarks/results/fit_speed_cpu.json, when present and complete."""
    try:
        ref = json.loads(CPU_REFERENCE.read_text())
        if ref.get("layers_subset"):
            return None
        return {
            "file": str(CPU_REFERENCE.relative_to(ROOT)),
            "cpu_model": ref.get("cpu_model"),
            "cpu_count": ref.get("cpu_count"),
            "torch_num_threads": ref.get("torch_num_threads"),
            "fast_median_s": ref["fast"]["median_s"],
            "total_weights": ref.get("total_weights"),
        }
    except (OSError, ValueError, KeyError, TypeError):
        return None


def main_device(args) -> int:
    """--device cuda (or --check-on-cpu): end-to-end and kernel times of the fit on a device."""
    device = torch.device("cpu" if args.check_on_cpu else args.device)
    info = mpq.build_info()
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print(
                "benchmarks/fit_speed.py: no GPU: torch.cuda.is_available() is False (--device cuda)", file=sys.stderr
            )
            return 2
        if not info.get("cuda_kernels"):
            print(
                f"benchmarks/fit_speed.py: mpq was built without its CUDA kernels ({info.get('library_path')})",
                file=sys.stderr,
            )
            return 2
    weights = resnet50_weights(args.seed)
    if args.layers > 0:
        weights = weights[: args.layers]
    total = sum(w.numel() for _, w in weights)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (--check-on-cpu)"

    device_pass(weights, device, args.bits, args.max_points, exact=False)  # warm-up: context, allocator, kernels
    runs = [device_pass(weights, device, args.bits, args.max_points, exact=False) for _ in range(args.runs)]
    fast = {key: statistics.median(r[0][key] for r in runs) for key in runs[0][0]}
    fast_host = runs[-1][2]
    per_layer = [statistics.median(r[1][i] for r in runs) for i in range(len(weights))]
    exact = None
    if not args.skip_exact:
        exact, _, _ = device_pass(weights, device, args.bits, args.max_points, exact=True)
    alloc_s, alloc_bits = allocation_seconds(weights, fast_host, args.bits)

    # The CPU on this machine: its fit (compared code for code), then one timed pass.
    cpu_host = [fit_multipoint(w, args.bits, args.max_points, exact=False) for _, w in weights]
    cpu_s, cpu_cpu_s = fit_all(weights, args.bits, args.max_points, exact=False)
    agree = agreement(weights, fast_host, cpu_host)
    reference = cpu_reference()
    e2e = fast["end_to_end_s"]
    speedup_ref = reference["fast_median_s"] / e2e if reference and reference.get("total_weights") == total else None
    comparison = (
        f"fit of {len(weights)} weights ({total / 1e6:.2f} M), {args.bits} bits, {args.max_points} points: "
        f"{name} {e2e:.3f} s end to end ({fast['kernel_s']:.3f} s in fit_multipoint), this machine's CPU "
        f"({torch.get_num_threads()} threads) {cpu_s:.3f} s: {cpu_s / e2e:.1f}x"
    )
    if speedup_ref is not None:
        comparison += (
            f"; the {reference['cpu_count']}-core build machine ({reference['file']}) "
            f"{reference['fast_median_s']:.3f} s: {speedup_ref:.1f}x"
        )

    slowest = sorted(zip((n for n, _ in weights), per_layer), key=lambda kv: -kv[1])[:5]
    print(
        f"mpq.fit_multipoint on {name}, resnet50 (weights=None, seed {args.seed}): {len(weights)} Conv2d/Linear "
        f"weights, {total / 1e6:.2f} M weights, {args.bits} bits, max_points {args.max_points}"
    )
    print(
        f"{'mode':<6} {'end to end s':>12} {'kernel s':>9} {'fit loop s':>10} {'H2D s':>7} {'D2H s':>7}  "
        "end-to-end runs"
    )
    modes = [("fast", fast, [r[0]["end_to_end_s"] for r in runs])]
    if exact:
        modes.append(("exact", exact, [exact["end_to_end_s"]]))
    for mode, t, rs in modes:
        print(
            f"{mode:<6} {t['end_to_end_s']:>12.3f} {t['kernel_s']:>9.3f} {t['fit_loop_s']:>10.3f} {t['h2d_s']:>7.3f} "
            f"{t['d2h_s']:>7.3f}  " + ", ".join(f"{r:.3f}" for r in rs)
        )
    print(f"allocation (host, {alloc_bits:.2f} bits/weight): {alloc_s:.3f} s; fit + allocation {e2e + alloc_s:.3f} s")
    print(comparison)
    print(
        f"agreement with the CPU kernel: codes {agree['codes_equal_fraction']:.6f}, errors "
        f"{agree['sq_errors_within_tol_fraction']:.6f}  {agree['check']}"
    )

    result = {
        "benchmark": "fit_speed",
        "device": device.type if not args.check_on_cpu else "cpu (--check-on-cpu)",
        "device_name": name,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "torchvision_version": torchvision.__version__,
        "mpq_version": getattr(mpq, "__version__", info.get("mpq_version")),
        "mpq_build": info,
        "model": "torchvision resnet50(weights=None)",
        "seed": args.seed,
        "layers": len(weights),
        "layers_subset": args.layers > 0,
        "total_weights": total,
        "bits": args.bits,
        "max_points": args.max_points,
        "fast": {
            "median_s": e2e,
            "runs_s": [r[0]["end_to_end_s"] for r in runs],
            "kernel_s": fast["kernel_s"],
            "fit_loop_s": fast["fit_loop_s"],
            "h2d_s": fast["h2d_s"],
            "d2h_s": fast["d2h_s"],
            "mweights_per_s": total / e2e / 1e6,
        },
        "exact": None
        if exact is None
        else {
            "s": exact["end_to_end_s"],
            "kernel_s": exact["kernel_s"],
            "mweights_per_s": total / exact["end_to_end_s"] / 1e6,
        },
        "timing": "end to end: wall clock from host float32 weights to host codes/scales/errors, synchronized; "
        "kernel: sum of per-layer fit_multipoint intervals (CUDA events; wall clock on the CPU)",
        "allocation": {
            "s": alloc_s,
            "avg_bits": alloc_bits,
            "how": "mpq.allocate.allocate_points on the fit's weight errors, relative sensitivity, host",
        },
        "fit_plus_allocation_s": e2e + alloc_s,
        "slowest_layers_fast_kernel_s": dict(slowest),
        "cpu_same_machine": {"fast_s": cpu_s, "cpu_s": cpu_cpu_s, "torch_num_threads": torch.get_num_threads()},
        "cpu_reference": reference,
        "speedup_vs_cpu_same_machine": cpu_s / e2e,
        "speedup_vs_cpu_reference": speedup_ref,
        "comparison": comparison,
        "agreement": agree,
        "target_s": 1.0,
        "meets_target": None if args.layers > 0 else e2e < 1.0,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0 if agree["check"] == "ok" else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out",
        default=None,
        help="the JSON (default: benchmarks/results/fit_speed_cpu.json, fit_speed_cuda.json with "
        "--device cuda, none with --check-on-cpu; '' for none)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--check-on-cpu",
        action="store_true",
        help="run the --device cuda code on the CPU (first 10 layers unless --layers), to check it",
    )
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--max-points", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3, help="timed passes of fast mode (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    parser.add_argument("--skip-exact", action="store_true", help="do not time exact mode")
    parser.add_argument("--layers", type=int, default=0, help="only the first N weights (0: all), for a smoke run")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.check_on_cpu and args.layers == 0:
        args.layers = 10
    if args.out is None:
        default = {"cpu": "fit_speed_cpu.json", "cuda": "fit_speed_cuda.json"}[args.device]
        args.out = None if args.check_on_cpu else ROOT / "benchmarks" / "results" / default
    else:
        args.out = Path(args.out) if args.out else None
    if args.device == "cuda" or args.check_on_cpu:
        return main_device(args)

    weights = resnet50_weights(args.seed)
    if args.layers > 0:
        weights = weights[: args.layers]
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
    per_layer: dict[str, float] = {}
    for name, w in weights:
        t0 = time.perf_counter()
        fit_multipoint(w, args.bits, args.max_points, exact=False)
        per_layer[name] = time.perf_counter() - t0
    slowest = sorted(per_layer.items(), key=lambda kv: -kv[1])[:5]

    rows = [("fast", fast, fast_cpu, fast_runs)]
    if exact is not None:
        rows.append(("exact", exact, exact_cpu, [exact]))
    print(
        f"mpq.fit_multipoint on resnet50 (weights=None, seed {args.seed}): {len(weights)} Conv2d/Linear "
        f"weights, {total / 1e6:.2f} M weights, {args.bits} bits, max_points {args.max_points}, "
        f"CPU '{cpu_model()}' ({os.cpu_count()} cores), torch.get_num_threads() = {threads}, "
        f"load average {load_before[0]:.2f} before / {load_after[0]:.2f} after"
    )
    print(f"{'mode':<6} {'seconds':>9} {'Mweights/s':>11} {'CPU s':>8}  wall-clock runs")
    for mode, seconds, cpu, runs in rows:
        print(
            f"{mode:<6} {seconds:>9.3f} {total / seconds / 1e6:>11.2f} {cpu:>8.2f}  "
            + ", ".join(f"{r:.3f}" for r in runs)
        )
    print(
        "slowest layers (fast): "
        + ", ".join(f"{n} {dict(weights)[n].shape[0]}x{dict(weights)[n].shape[1]} {t:.3f}s" for n, t in slowest)
    )

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
        "fast": {"median_s": fast, "runs_s": fast_runs, "median_cpu_s": fast_cpu, "mweights_per_s": total / fast / 1e6},
        "exact": None if exact is None else {"s": exact, "cpu_s": exact_cpu, "mweights_per_s": total / exact / 1e6},
        "slowest_layers_fast_s": dict(slowest),
        "target_s": 10.0,
        "meets_target": fast < 10.0,
    }
    if args.layers > 0:  # a smoke run over part of the model: no verdict on the target
        result.update(layers_subset=True, meets_target=None)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
