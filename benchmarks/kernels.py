"""Correctness and speed of mpq's packed multipoint linear kernels and their peers, on one GPU.

    python benchmarks/kernels.py                       # every shape and M, table last, JSON
    python benchmarks/kernels.py --quick               # one shape, fewer repeats (a smoke run)
    python benchmarks/kernels.py --json out.json --repeats 100

Problem: y = x @ W^T with x float16 [M, K], W [N, K] a multipoint weight of 4-bit points, 1.25 points
per channel on average (a random quarter of the channels has 2 points, the rest 1); shapes K x N in
{4096 x 4096, 4096 x 11008, 11008 x 4096}, M in {1, 16, 128, 4096}.

Variants (each checked, then timed):
  cublas_fp16   torch.matmul on the dense float16 weight (cuBLAS), the baseline of every ratio
  tinygemm_int4 aten._weight_int4pack_mm (bfloat16 activations, group 128, its own packing) on the
                one-point weight: torch's int4 weight-only peer (less precise: one point)
  expanded      the paper's "expanded" layer: one int4 GEMM (tinygemm) over all sum_j n_j point rows,
                then index_add_ of each row into its channel
  int8_cublaslt torch._int_mm, int8 activations x int8 weight (column-major), then a float scale:
                the W8A8 peer of the int8 kernel
  mpq_dense / mpq_gemv / mpq_mma / mpq_int8 / mpq_auto
                mpq::multipoint_linear_packed with kernel=... (gemv only for M <= 16; int8 is W4A8
                with per-tensor int8 activations)

Method (shared/docs/PERF.md): fresh random inputs from fixed seeds, never zeros; every variant's
output against a float64 reference computed on the GPU, as ||out - ref|| / ||ref|| (for the int8
variants the reference of the int8-quantized input), outputs poisoned with NaN first; timing with
CUDA events around each call after warm-up, the median of the repeats, rotating among 3 copies of
every weight and writing a buffer twice the L2 size before each timed call (outside the events), so
that no weight comes from the 50 MB L2. The flush also keeps the GPU busy while the call is
enqueued, so the launch gap stays out of the time. GB/s counts the bytes the variant must read
(weights, activations) and write (output); TFLOP/s counts 2 M K N.

Exits with status 2 and a message when no GPU (or no mpq CUDA kernels) is present; status 1 when an
mpq variant fails its check.
"""
import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (K, N)
MS = [1, 16, 128, 4096]
COPIES = 3
SEED = 0
# H100 SXM figures for the predictions (shared/docs/PERF.md, benchmarks/NOTES.md).
HBM_BYTES_PER_S = 3.35e12
FP16_MMA_FLOPS = 989e12  # dense fp16 tensor-core peak (wgmma); mma.sync reaches about half
INT8_MMA_FLOPS = 1979e12


def fail(message: str, status: int = 2) -> None:
    print(f"benchmarks/kernels.py: {message}", file=sys.stderr)
    sys.exit(status)


def multipoint_weight(N: int, K: int, seed: int, device: str):
    """4-bit codes in -7..7 (what a 4-bit fit produces), 2 points for a random quarter of the
    channels, scales like a fitted weight's (the second point about 8x smaller)."""
    g = torch.Generator().manual_seed(seed)
    P = 2
    codes = torch.randint(-7, 8, (N, P, K), generator=g, dtype=torch.int8)
    first = (torch.rand(N, generator=g) * 0.5 + 0.75) * 0.02
    scales = torch.stack([first, first / 8], dim=1).float()
    num_points = torch.ones(N, dtype=torch.int32)
    num_points[torch.randperm(N, generator=g)[: N // 4]] = 2
    return codes.to(device), scales.to(device), num_points.to(device)


def dense_weight(codes, scales, num_points, dtype) -> torch.Tensor:
    return torch.ops.mpq.dequantize_multipoint(codes, scales, num_points, dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if bool(out.isnan().any()):
        return math.inf
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-300))


class Timer:
    def __init__(self, warmup: int, repeats: int):
        self.warmup, self.repeats = warmup, repeats
        props = torch.cuda.get_device_properties(0)
        l2 = getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20
        self.flush_buf = torch.empty(2 * l2 // 4 + 1024, dtype=torch.float32, device="cuda")

    def flush(self) -> None:
        self.flush_buf.fill_(1.0)

    def median_ms(self, fn: Callable[[int], object]) -> float:
        for i in range(self.warmup):
            fn(i % COPIES)
        torch.cuda.synchronize()
        start = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        end = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        for r in range(self.repeats):
            self.flush()
            start[r].record()
            fn(r % COPIES)
            end[r].record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(start, end))


def int4pack_tinygemm(q_unsigned: torch.Tensor, inner_k_tiles: int = 8) -> torch.Tensor:
    """aten._convert_weight_to_int4pack of uint4 values q [N, K] (0..15): two per byte, even k high."""
    packed_u8 = ((q_unsigned[:, ::2] << 4) | q_unsigned[:, 1::2]).to(torch.uint8)
    return torch.ops.aten._convert_weight_to_int4pack(packed_u8, inner_k_tiles)


def tinygemm_scales(row_scales: torch.Tensor, K: int, group: int) -> torch.Tensor:
    """[K / group, N, 2] bfloat16 (scale, zero): w = (u - 8) * scale + zero, zero = 0."""
    s = row_scales.to(torch.bfloat16)[None, :].expand(K // group, -1)
    return torch.stack([s, torch.zeros_like(s)], dim=-1).contiguous()


def build_variants(K: int, N: int, seed: int):
    """Per variant: a setup on the weight copies and a call(x, copy) -> output; plus the weights."""
    copies = [multipoint_weight(N, K, seed + c, "cuda") for c in range(COPIES)]
    variants: Dict[str, dict] = {}

    dense16 = [dense_weight(*w, torch.float16) for w in copies]
    variants["cublas_fp16"] = {
        "call": lambda x, c: torch.matmul(x, dense16[c].t()),
        "bytes": lambda M: K * N * 2 + M * K * 2 + M * N * 2,
        "ref": "float",
    }

    packed = [torch.ops.mpq.pack_multipoint(*w, 4) for w in copies]
    packed_bytes = sum(t.numel() * t.element_size() for t in packed[0])
    for kernel in ["dense", "gemv", "mma", "int8", "auto"]:
        def call(x, c, kernel=kernel):
            qp = act_qparams[0] if kernel == "int8" else None
            return torch.ops.mpq.multipoint_linear_packed(x, *packed[c], N, None, qp, kernel)

        variants[f"mpq_{kernel}"] = {
            "call": call,
            "bytes": (lambda M: packed_bytes + K * N * 2 * 2 + M * K * 2 + M * N * 2) if kernel == "dense"
            else (lambda M: packed_bytes + M * K * 2 + M * N * 2),
            "ref": "int8" if kernel == "int8" else "float",
            "only_m": (lambda M: M <= 16) if kernel == "gemv" else None,
        }

    # torch's int4 weight-only (tinygemm): the one-point weight, and the expanded multipoint layer.
    try:
        group = 128
        tg, tg_scales, ex, ex_scales, ex_index = [], [], [], [], []
        for codes, scales, num_points in copies:
            tg.append(int4pack_tinygemm(codes[:, 0].int() + 8))
            tg_scales.append(tinygemm_scales(scales[:, 0], K, group))
            rows = (torch.arange(2, device="cuda")[None, :] < num_points[:, None]).nonzero()  # (channel, point)
            ex.append(int4pack_tinygemm(codes[rows[:, 0], rows[:, 1]].int() + 8))
            ex_scales.append(tinygemm_scales(scales[rows[:, 0], rows[:, 1]], K, group))
            ex_index.append(rows[:, 0].contiguous())
        variants["tinygemm_int4"] = {
            "call": lambda x, c: torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), tg[c], group, tg_scales[c]),
            "bytes": lambda M: K * N // 2 + N * (K // group) * 4 + M * K * 2 + M * N * 2,
            "ref": "one_point",
        }

        def expanded(x, c):
            y = torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), ex[c], group, ex_scales[c])
            out = torch.zeros(x.shape[0], N, dtype=y.dtype, device=y.device)
            return out.index_add_(1, ex_index[c], y)

        R = int(copies[0][2].sum())
        variants["expanded"] = {
            "call": expanded,
            "bytes": lambda M: K * R // 2 + R * (K // group) * 4 + M * K * 2 + M * R * 2 * 2 + M * N * 2,
            "ref": "float",
        }
    except Exception as e:  # noqa: BLE001 - the peer's API differs between torch versions
        variants["tinygemm_int4"] = {"error": f"{type(e).__name__}: {e}"}
        variants["expanded"] = {"error": f"{type(e).__name__}: {e}"}

    # cuBLASLt int8 x int8 -> int32 (torch._int_mm), one int8 weight per channel.
    w8 = []
    for codes, scales, num_points in copies:
        W = dense_weight(codes, scales, num_points, torch.float32)
        s = W.abs().amax(1).clamp_min(1e-12) / 127
        w8.append(((W / s[:, None]).round().clamp(-127, 127).to(torch.int8).t(), s))  # column-major [K, N]

    def int8_mm(x, c):
        xq = act_levels[0]
        wq, s = w8[c]
        return torch._int_mm(xq, wq).float() * (act_qparams[0][0] * s)[None, :]

    variants["int8_cublaslt"] = {
        "call": int8_mm,
        "bytes": lambda M: K * N + M * K + M * N * 4,
        "ref": "int8",
        "tol": 3e-2,  # its weight is the multipoint weight rounded again to one int8 per channel
        "only_m": lambda M: M > 16,  # torch._int_mm needs M > 16
    }
    return copies, variants


act_qparams: List[torch.Tensor] = []
act_levels: List[torch.Tensor] = []


def run(args) -> int:
    if not torch.cuda.is_available():
        fail("no GPU: torch.cuda.is_available() is False (these are GPU kernel benchmarks; nothing to measure here)")
    sys.path.insert(0, str(ROOT / "python"))
    import mpq

    info = mpq.build_info()
    if not info.get("cuda_kernels"):
        fail(f"mpq was built without its CUDA kernels ({info.get('library_path')}); build it with nvcc present")
    torch.backends.cuda.matmul.allow_tf32 = False
    shapes = SHAPES[1:2] if args.quick else SHAPES
    ms = args.m or MS
    timer = Timer(args.warmup, args.repeats)
    results = []
    failed = []
    device = torch.cuda.get_device_name(0)
    print(f"{device}, torch {torch.__version__}, CUDA {torch.version.cuda}, mpq {info}", flush=True)
    for K, N in shapes:
        copies, variants = build_variants(K, N, SEED)
        W64 = dense_weight(*copies[0], torch.float64)
        W64_one = (copies[0][1][:, 0:1].double() * copies[0][0][:, 0].double())
        for M in ms:
            g = torch.Generator(device="cuda").manual_seed(SEED + M)
            x = torch.randn(M, K, generator=g, device="cuda").half()
            scale = float(x.abs().max()) / 127
            act_qparams[:] = [torch.tensor([scale, 0.0, -128.0, 127.0], device="cuda")]
            levels = torch.clamp(torch.round(x.float() / scale), -128, 127)
            act_levels[:] = [levels.to(torch.int8)]
            refs = {
                "float": x.double() @ W64.t(),
                "int8": (levels.double() * scale) @ W64.t(),
                "one_point": x.double() @ W64_one.t(),
            }
            flops = 2 * M * K * N
            base_ms = None
            for name, v in variants.items():
                row = {"K": K, "N": N, "M": M, "variant": name}
                if "error" in v:
                    row["error"] = v["error"]
                    results.append(row)
                    continue
                if v.get("only_m") is not None and not v["only_m"](M):
                    continue
                try:
                    torch.full((M * N + 1024,), float("nan"), dtype=torch.float16, device="cuda")  # poison, freed
                    out = v["call"](x, 0)
                    torch.cuda.synchronize()
                    err = rel_err(out.view(M, N), refs[v["ref"]])
                    ms_ = timer.median_ms(lambda c: v["call"](x, c))
                except Exception as e:  # noqa: BLE001 - report and go on with the other variants
                    row["error"] = f"{type(e).__name__}: {e}"
                    results.append(row)
                    if name.startswith("mpq"):
                        failed.append(f"{name} K={K} N={N} M={M}: {row['error']}")
                    continue
                tol = v.get("tol", {"float": 5e-3, "int8": 5e-3, "one_point": 0.2}[v["ref"]])
                row.update(
                    ms=ms_,
                    rel_err=err,
                    check="ok" if err <= tol else "FAIL",
                    gb_s=v["bytes"](M) / (ms_ * 1e-3) / 1e9,
                    tflop_s=flops / (ms_ * 1e-3) / 1e12,
                    predicted_ms=1e3 * max(v["bytes"](M) / HBM_BYTES_PER_S,
                                           flops / (INT8_MMA_FLOPS if v["ref"] == "int8" else FP16_MMA_FLOPS)),
                )
                if name == "cublas_fp16":
                    base_ms = ms_
                row["vs_cublas"] = base_ms / ms_ if base_ms else None
                if row["check"] != "ok" and name.startswith("mpq"):
                    failed.append(f"{name} K={K} N={N} M={M}: rel_err {err:.3g} > {tol}")
                results.append(row)
                print(f"  {K}x{N} M={M:<5} {name:<14} {ms_ * 1e3:9.1f} us  err {err:.2e}", flush=True)
        del copies, variants, W64, W64_one
        torch.cuda.empty_cache()

    doc = {
        "benchmark": "benchmarks/kernels.py",
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "mpq": info,
        "python": platform.python_version(),
        "seed": SEED,
        "copies": COPIES,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "shapes_KxN": shapes,
        "ms": ms,
        "points": "4-bit codes, 1 point for 3/4 of the channels and 2 for 1/4 (1.25 on average)",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "results": results,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))

    print()
    print(f"{'K x N':<12} {'M':>5} {'variant':<14} {'time us':>9} {'GB/s':>7} {'TFLOP/s':>8} {'vs cuBLAS':>9} "
          f"{'pred us':>8} {'rel err':>9} check")
    for r in results:
        if "error" in r:
            print(f"{r['K']}x{r['N']:<7} {r['M']:>5} {r['variant']:<14} error: {r['error'][:70]}")
            continue
        ratio = f"{r['vs_cublas']:.2f}x" if r.get("vs_cublas") else "-"
        print(f"{r['K']}x{r['N']:<7} {r['M']:>5} {r['variant']:<14} {r['ms'] * 1e3:9.1f} {r['gb_s']:7.0f} "
              f"{r['tflop_s']:8.1f} {ratio:>9} {r['predicted_ms'] * 1e3:8.1f} {r['rel_err']:9.2e} {r['check']}")
    if failed:
        print("\nmpq variants that failed their check:\n  " + "\n  ".join(failed))
        return 1
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "kernels_h100.json"),
                   help="where to write the JSON (default: benchmarks/results/kernels_h100.json; '' for none)")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--m", type=int, action="append", help="an M to run (repeatable; default 1, 16, 128, 4096)")
    p.add_argument("--quick", action="store_true", help="only 4096 x 11008, for a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 10)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
