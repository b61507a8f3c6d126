"""Correctness and speed of mpq's packed multipoint kernels and their peers, on one GPU.

    python benchmarks/kernels.py                           # every section, table last, JSON
    python benchmarks/kernels.py --section conv --batch 32 # one section, one batch size
    python benchmarks/kernels.py --quick                   # one linear shape, batch 32, fewer repeats
    python benchmarks/kernels.py --json out.json --repeats 100
    python benchmarks/kernels.py --check-on-cpu --json /tmp/check.json   # this script's code paths, tiny, CPU

Weights: multipoint weights of 4-bit points, 1.25 points per channel on average (a random quarter
of the channels has 2 points, the rest 1), scales like a fitted weight's.

Section "linear": y = x @ W^T, x float16 [M, K], W [N, K]; shapes K x N in {4096 x 4096,
4096 x 11008, 11008 x 4096}, M in {1, 16, 128, 4096}. Variants (each checked, then timed):
  cublas_fp16   torch.matmul on the dense float16 weight (cuBLAS), the baseline of every ratio
  tinygemm_int4 aten._weight_int4pack_mm (bfloat16 activations, group 128, its own packing) on the
                one-point weight: torch's int4 weight-only peer (less precise: one point)
  expanded      the paper's "expanded" layer: one int4 GEMM (tinygemm) over all sum_j n_j point rows,
                then index_add_ of each row into its channel
                (both take the input cast to bfloat16 once, outside the timed call)
  int8_cublaslt the W8A8 peer of the int8 kernel, timed as mpq's int8 path runs: the input's int8
                levels (static per-tensor scale, eager torch ops), torch._int_mm (cuBLASLt int8 x int8
                -> int32, weight column-major, one int8 scale per channel), the int32 sums times
                activation scale x channel scale (precomputed), cast to float16 (M > 16 only)
  mpq_dense / mpq_gemv / mpq_mma / mpq_int8 / mpq_auto
                mpq::multipoint_linear_packed with kernel=... (gemv only for M <= 16; int8 is W4A8
                with per-tensor int8 activations)

Section "conv": the 23 distinct convolutions of torchvision's ResNet-50 at 224 x 224 (found by
running the model on the meta device: kernel, C_in -> C_out, input size, stride, and how often each
occurs), at batch 1, 32 and 256 (--batch). Input float16 channels_last [N, C_in, H, W], weight codes
[C_out, 2, C_in, kh, kw]. Variants:
  cudnn_fp16    F.conv2d on the dense float16 weight, input and weight channels_last (cuDNN): the
                baseline of every ratio
  mpq_dense / mpq_igemm / mpq_int8 / mpq_auto
                mpq::multipoint_conv2d_packed with kernel=...: dense = decode, then cuDNN; igemm =
                fused implicit GEMM, weight-only; int8 = W4A8 (per-tensor int8 activations, only
                where C_in % 16 == 0); auto = the module's W4A8 choice (act_qparams on the host:
                int8 where it fits, else igemm on the fake-quantized input)
  int8_cudnn    the W8A8 peer: cuDNN's int8 convolution through torch.ops.quantized.conv2d
                (QuantizedCUDA), timed with its input quantization (float16 -> float32 -> qint8, per
                tensor), per-tensor int8 weight, int8 output (scale from the reference), dequantized
                to float16; where this torch cannot run it, each row says why
  int8_cublaslt_1x1
                on the 1x1 convolutions only (GEMMs on a channels_last input): the linear section's
                int8_cublaslt peer (int8 levels, torch._int_mm, scaled to float16)
TFLOP/s counts 2 N OH OW C_out C_in kh kw; "network" rows sum each variant's time over the 53
convolutions of ResNet-50 (time x occurrences).

Section "resnet50": torchvision resnet50(weights=None) under a fixed seed (speed does not depend on
training), quantized by mpq.quantize at W4A8 with 4-bit multipoint points (RESNET50_CONFIG: the
paper's greedy points and no scale refit, for a fast quantization; kernel speed depends on the
shapes, bit widths, point counts and activation grids, not on the scales' values) on random
calibration images, on the GPU (the time it takes is reported on its own; should it fail there, the
failure is reported and the model quantized on the CPU). Timed at batch 1, 32, 256, eagerly and as
a CUDA graph (captured after warm-up on a side stream), one model each with the L2 flushed before
each call: fp16_cudnn_folded (model.half(), channels_last, BatchNorm folded into the convolutions
as the mpq model has it: the baseline of the ratios), fp16_cudnn (the same unfolded, for reference)
and mpq_w4a8 (the quantized model .half(), channels_last input); images/s and vs_fp16, the ratio
to fp16_cudnn_folded in the same mode. Checks: the mpq model's float16 output
against the same quantized model in float32 on the GPU (generic path, TF32 off): relative error and
top-1 agreement; every one of its 54 layers against float64 on the layer's own input in that
forward (first --ref-images images); the CUDA graph's output against the eager one.

Method (docs/PERF.md): fresh random inputs from fixed seeds, never zeros; every variant's
output against a float64 reference computed on the GPU, as ||out - ref|| / ||ref|| (for the int8
variants the reference of the int8-quantized input; for convolutions on the first --ref-images
images of the batch), outputs poisoned with NaN first; timing with CUDA events around each call
after warm-up, the median of the repeats, rotating among 3 copies of every weight and writing a
buffer twice the L2 size before each timed call (outside the events), so that no weight comes from
the 50 MB L2. The flush also keeps the GPU busy while the call is enqueued, so the launch gap stays
out of the time (except for the eager whole-network times, which include it as a user sees it).
GB/s counts the bytes the variant must read (weights, activations) and write (output); TFLOP/s
counts 2 M K N; "pred" is the floor max(bytes / HBM bandwidth, FLOPs / tensor-core peak).

--check-on-cpu runs every section's code path at tiny sizes on the CPU (linear 256 x 384; the
ResNet-50 convolutions at a 32 x 32 image; ResNet-50 quantized and run on 32 x 32 images, batch 2),
float16 where the CPU kernels take it (else float32), wall-clock timing instead of CUDA events,
CUDA graphs and the peers that need CUDA skipped with a note, and exits with status 1 when any
check fails. Its times mean nothing.

Exits with status 2 and a message when no GPU (or no mpq CUDA kernels) is present (without
--check-on-cpu); status 1 when an mpq variant fails its check or a section stops on an error (the
JSON, rewritten after each section, keeps the others).
"""

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (K, N)
MS = [1, 16, 128, 4096]
BATCHES = [1, 32, 256]  # conv and resnet50 sections
COPIES = 3
SEED = 0
# H100 SXM figures for the predictions (docs/PERF.md, benchmarks/NOTES.md).
HBM_BYTES_PER_S = 3.35e12
FP16_MMA_FLOPS = 989e12  # dense fp16 tensor-core peak (wgmma); mma.sync reaches about half
INT8_MMA_FLOPS = 1979e12
TOL = {"float": 5e-3, "int8": 5e-3, "one_point": 0.2}
# mpq.quantize settings of the resnet50 section, on top of the "W4A8" preset (4-bit points, up to 4
# per channel, 4.5 bits per weight on average, 8-bit activations; first and last layer 8-bit): the
# paper's greedy points (no GPTQ sweeps) and the greedy scales (no output least-squares refit, 90 s
# of the 105 s on the 2-core CPU), few calibration batches. verify (kernels vs float simulation,
# which raises) is run by the section itself and reported, not raised: the section checks the
# timed float16 path layer by layer.
RESNET50_CONFIG = {
    "options": {"point_rounding": "nearest", "scale_refit": "none"},  # MultipointConfig
    "calib_batches": 4,
    "sensitivity_batches": 2,
    "verify": False,
}
RESNET50_CALIB_IMAGES = 16  # per calibration batch
# mpq float16 model vs the same model in float32: the 8-bit activation grids turn float16 rounding
# into one-level flips, which 54 layers amplify (CPU kernels, float16: 6.4e-3 at 224 x 224 and 2e-2
# at 32 x 32, against 7e-4 and 1.2e-3 for the float16 baseline): a loose bound that catches a broken
# kernel; each layer is checked on its own input to TOL["int8"] (layer_errors). NB: the random-init
# model gives most images the same top-1 class, so top-1 agreement says little here.
RESNET50_TOL = 0.1
RESNET50_BASELINE = "fp16_cudnn_folded"  # vs_fp16 divides by it: BatchNorm folded, as in the mpq model
GRAPH_TOL = 1e-3  # a CUDA graph replays the eager kernels: only algorithm choices may differ


def fail(message: str, status: int = 2) -> None:
    print(f"benchmarks/kernels.py: {message}", file=sys.stderr)
    sys.exit(status)


# ---- shared helpers ----------------------------------------------------------------------------


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


def poison(numel: int, dtype: torch.dtype, device: str) -> None:
    """A NaN block freed at once: the caching allocator hands it to the next output of that size,
    so that an element a kernel never writes shows up as NaN."""
    torch.full((numel + 1024,), float("nan"), dtype=dtype, device=device)


def fake_quant_levels(x: torch.Tensor, qp: torch.Tensor) -> torch.Tensor:
    """The float64 values of x's int8 levels, (clamp(round(x / s) + zp, qmin, qmax) - zp) * s with
    qp = (s, zp, qmin, qmax) float32, stepped as mpq's kernels do (csrc/cuda/act_quant.cuh): each
    step in float32 with IEEE division (qp is a tensor, so no reciprocal), rounded to x's dtype."""

    def step(v: torch.Tensor) -> torch.Tensor:
        return v.to(x.dtype).float()

    s, zp, qmin, qmax = (qp[i].to(x.device) for i in range(4))
    v = step(x.float() / s)
    v = step(torch.round(v))
    v = step(v + zp)
    v = torch.minimum(torch.maximum(v, qmin), qmax)
    return (v.double() - zp.double()) * s.double()


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


class WallTimer:
    """Timer's interface on the CPU (--check-on-cpu): wall clock, no cache flush."""

    def __init__(self, warmup: int, repeats: int):
        self.warmup, self.repeats = warmup, repeats

    def median_ms(self, fn: Callable[[int], object]) -> float:
        for i in range(self.warmup):
            fn(i % COPIES)
        times = []
        for r in range(self.repeats):
            t0 = time.perf_counter()
            fn(r % COPIES)
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


@dataclass
class Env:
    """Where the sections run: the GPU, or the CPU for --check-on-cpu."""

    device: str  # "cuda" or "cpu"
    name: str  # for the header and the JSON
    dtype: torch.dtype  # activations of the float16 variants (float32 on a CPU without float16 kernels)
    timer: object  # Timer or WallTimer
    check_on_cpu: bool
    info: dict
    notes: list[str] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def half_input(self) -> bool:
        return self.dtype in (torch.float16, torch.bfloat16)


def cpu_takes_float16() -> bool:
    """Whether this CPU build runs the float16 ops of the sections (conv, BN, pools, matmul)."""
    try:
        x = torch.randn(1, 4, 6, 6).half().contiguous(memory_format=torch.channels_last)
        y = F.conv2d(x, torch.randn(4, 4, 3, 3).half(), padding=1)
        y = F.batch_norm(y, torch.zeros(4).half(), torch.ones(4).half(), training=False).relu()
        y = F.adaptive_avg_pool2d(F.max_pool2d(y, 3, 2, 1), 1).flatten(1)
        F.linear(y, torch.randn(3, 4).half())
        return True
    except RuntimeError:
        return False


# ---- section "linear" ----------------------------------------------------------------------------


def int4pack_tinygemm(q_unsigned: torch.Tensor, inner_k_tiles: int = 8) -> torch.Tensor:
    """aten._convert_weight_to_int4pack of uint4 values q [N, K] (0..15): two per byte, even k high."""
    packed_u8 = ((q_unsigned[:, ::2] << 4) | q_unsigned[:, 1::2]).to(torch.uint8)
    return torch.ops.aten._convert_weight_to_int4pack(packed_u8, inner_k_tiles)


def tinygemm_scales(row_scales: torch.Tensor, K: int, group: int) -> torch.Tensor:
    """[K / group, N, 2] bfloat16 (scale, zero): w = (u - 8) * scale + zero, zero = 0."""
    s = row_scales.to(torch.bfloat16)[None, :].expand(K // group, -1)
    return torch.stack([s, torch.zeros_like(s)], dim=-1).contiguous()


def int8_levels(x: torch.Tensor, scale: float) -> torch.Tensor:
    """clamp(round(x / scale), -128, 127) as int8, in eager torch ops (the quotient rounded to x's
    dtype, as mpq's kernels step it): the activation quantization of the int8 peers."""
    return torch.round(x / scale).clamp_(-128, 127).to(torch.int8)


def int8_weight(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] float as (int8 [K, N] column-major, scale [N] float32): one symmetric scale per row."""
    s = W.abs().amax(1).clamp_min(1e-12) / 127
    return (W / s[:, None]).round().clamp(-127, 127).to(torch.int8).t(), s.float()


def build_variants(K: int, N: int, seed: int, env: Env):
    """Per variant: a call(x, copy) -> output on the weight copies, and optionally an "input"
    hook run once per input outside the timed calls (a cast, precomputed scales): call gets what
    it returns; plus the weights."""
    device = env.device
    copies = [multipoint_weight(N, K, seed + c, device) for c in range(COPIES)]
    variants: dict[str, dict] = {}

    dense16 = [dense_weight(*w, env.dtype) for w in copies]
    variants["cublas_fp16"] = {
        "call": lambda x, c: torch.matmul(x, dense16[c].t()),
        "bytes": lambda M: K * N * 2 + M * K * 2 + M * N * 2,
        "ref": "float",
    }

    packed = [torch.ops.mpq.pack_multipoint(*w, 4) for w in copies]
    packed_bytes = sum(t.numel() * t.element_size() for t in packed[0])
    for kernel in ["dense", "gemv", "mma", "int8", "auto"]:
        if kernel in ("gemv", "mma") and not env.half_input():
            variants[f"mpq_{kernel}"] = {"skipped": f"kernel '{kernel}' needs float16/bfloat16 input"}
            continue

        def call(x, c, kernel=kernel):
            qp = act_qparams[0] if kernel == "int8" else None
            return torch.ops.mpq.multipoint_linear_packed(x, *packed[c], N, None, qp, kernel)

        variants[f"mpq_{kernel}"] = {
            "call": call,
            "bytes": (lambda M: packed_bytes + K * N * 2 * 2 + M * K * 2 + M * N * 2)
            if kernel == "dense"
            else (lambda M: packed_bytes + M * K * 2 + M * N * 2),
            "ref": "int8" if kernel == "int8" else "float",
            "only_m": (lambda M: M <= 16) if kernel == "gemv" else None,
        }

    if not env.cuda:
        for name in ("tinygemm_int4", "expanded", "int8_cublaslt"):
            variants[name] = {"skipped": "a CUDA peer (skipped by --check-on-cpu)"}
        return copies, variants

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
        to_bf16 = lambda x: x.to(torch.bfloat16)  # noqa: E731 - once per input, outside the timed calls
        variants["tinygemm_int4"] = {
            "call": lambda x, c: torch.ops.aten._weight_int4pack_mm(x, tg[c], group, tg_scales[c]),
            "input": to_bf16,
            "bytes": lambda M: K * N // 2 + N * (K // group) * 4 + M * K * 2 + M * N * 2,
            "ref": "one_point",
        }

        def expanded(x, c):
            y = torch.ops.aten._weight_int4pack_mm(x, ex[c], group, ex_scales[c])
            out = torch.zeros(x.shape[0], N, dtype=y.dtype, device=y.device)
            return out.index_add_(1, ex_index[c], y)

        R = int(copies[0][2].sum())
        variants["expanded"] = {
            "call": expanded,
            "input": to_bf16,
            "bytes": lambda M: K * R // 2 + R * (K // group) * 4 + M * K * 2 + M * R * 2 * 2 + M * N * 2,
            "ref": "float",
        }
    except Exception as e:  # noqa: BLE001 - the peer's API differs between torch versions
        variants["tinygemm_int4"] = {"error": f"{type(e).__name__}: {e}"}
        variants["expanded"] = {"error": f"{type(e).__name__}: {e}"}

    # cuBLASLt int8 x int8 -> int32 (torch._int_mm), one int8 weight per channel, timed with the
    # activation quantization and the output scaling around it (mpq's int8 kernel does both inside).
    w8 = [int8_weight(dense_weight(*w, torch.float32)) for w in copies]
    out_scales: list[torch.Tensor] = []

    def int8_input(x):
        out_scales[:] = [s * act_scale[0] for _, s in w8]  # activation scale x channel scale, per copy
        return x

    def int8_mm(x, c):
        xq = int8_levels(x, act_scale[0])
        return (torch._int_mm(xq, w8[c][0]) * out_scales[c]).to(x.dtype)

    variants["int8_cublaslt"] = {
        "call": int8_mm,
        "input": int8_input,
        # weight, float16 input and output, the int8 levels and the int32 sums written and read again
        "bytes": lambda M: K * N + M * K * 2 + M * N * 2 + 2 * M * K + 2 * M * N * 4,
        "ref": "int8",
        "tol": 3e-2,  # its weight is the multipoint weight rounded again to one int8 per channel
        "only_m": lambda M: M > 16,  # torch._int_mm needs M > 16
    }
    return copies, variants


act_qparams: list[torch.Tensor] = []  # the current input's (s, zp, qmin, qmax), on the device
act_scale: list[float] = []  # its s, on the host (the int8 peer's quantization)


def run_linear(args, env: Env) -> tuple[dict, list[str]]:
    """The linear section: (its JSON keys, failures)."""
    if env.check_on_cpu:
        shapes, ms = [(256, 384)], args.m or [1, 16, 40]
    else:
        shapes, ms = (SHAPES[1:2] if args.quick else SHAPES), args.m or MS
    device, timer = env.device, env.timer
    results, failed = [], []
    for K, N in shapes:
        copies, variants = build_variants(K, N, SEED, env)
        W64 = dense_weight(*copies[0], torch.float64)
        W64_one = copies[0][1][:, 0:1].double() * copies[0][0][:, 0].double()
        for M in ms:
            g = torch.Generator(device=device).manual_seed(SEED + M)
            x = torch.randn(M, K, generator=g, device=device).to(env.dtype)
            scale = float(x.abs().max()) / 127
            act_qparams[:] = [torch.tensor([scale, 0.0, -128.0, 127.0], device=device)]
            act_scale[:] = [scale]
            levels = torch.clamp(torch.round(x.float() / scale), -128, 127)
            refs = {
                "float": x.double() @ W64.t(),
                "int8": (levels.double() * scale) @ W64.t(),
                "one_point": x.double() @ W64_one.t(),
            }
            flops = 2 * M * K * N
            base_ms = None
            for name, v in variants.items():
                row = {"K": K, "N": N, "M": M, "variant": name}
                if "error" in v or "skipped" in v:
                    row.update({k: v[k] for k in ("error", "skipped") if k in v})
                    results.append(row)
                    continue
                if v.get("only_m") is not None and not v["only_m"](M):
                    continue
                try:
                    xin = v["input"](x) if "input" in v else x
                    poison(M * N, torch.float16, device)
                    out = v["call"](xin, 0)
                    env.sync()
                    err = rel_err(out.view(M, N), refs[v["ref"]])
                    ms_ = timer.median_ms(lambda c: v["call"](xin, c))
                except Exception as e:  # noqa: BLE001 - report and go on with the other variants
                    row["error"] = f"{type(e).__name__}: {e}"
                    results.append(row)
                    if name.startswith("mpq") or env.check_on_cpu:
                        failed.append(f"linear {name} K={K} N={N} M={M}: {row['error']}")
                    continue
                tol = v.get("tol", TOL[v["ref"]])
                row.update(
                    ms=ms_,
                    rel_err=err,
                    check="ok" if err <= tol else "FAIL",
                    gb_s=v["bytes"](M) / (ms_ * 1e-3) / 1e9,
                    tflop_s=flops / (ms_ * 1e-3) / 1e12,
                    predicted_ms=1e3
                    * max(
                        v["bytes"](M) / HBM_BYTES_PER_S,
                        flops / (INT8_MMA_FLOPS if v["ref"] == "int8" else FP16_MMA_FLOPS),
                    ),
                )
                if name == "cublas_fp16":
                    base_ms = ms_
                row["vs_cublas"] = base_ms / ms_ if base_ms else None
                if row["check"] != "ok" and (name.startswith("mpq") or env.check_on_cpu):
                    failed.append(f"linear {name} K={K} N={N} M={M}: rel_err {err:.3g} > {tol}")
                results.append(row)
                print(f"  {K}x{N} M={M:<5} {name:<14} {ms_ * 1e3:9.1f} us  err {err:.2e}", flush=True)
        del copies, variants, W64, W64_one
        if env.cuda:
            torch.cuda.empty_cache()
    doc = {"shapes_KxN": shapes, "ms": ms, "results": results}
    return doc, failed


def print_linear_table(results: list[dict]) -> None:
    print()
    print(
        f"{'K x N':<12} {'M':>5} {'variant':<14} {'time us':>9} {'GB/s':>7} {'TFLOP/s':>8} {'vs cuBLAS':>9} "
        f"{'pred us':>8} {'rel err':>9} check"
    )
    for r in results:
        if "skipped" in r:
            print(f"{r['K']}x{r['N']:<7} {r['M']:>5} {r['variant']:<14} skipped: {r['skipped'][:70]}")
            continue
        if "error" in r:
            print(f"{r['K']}x{r['N']:<7} {r['M']:>5} {r['variant']:<14} error: {r['error'][:70]}")
            continue
        ratio = f"{r['vs_cublas']:.2f}x" if r.get("vs_cublas") else "-"
        print(
            f"{r['K']}x{r['N']:<7} {r['M']:>5} {r['variant']:<14} {r['ms'] * 1e3:9.1f} {r['gb_s']:7.0f} "
            f"{r['tflop_s']:8.1f} {ratio:>9} {r['predicted_ms'] * 1e3:8.1f} {r['rel_err']:9.2e} {r['check']}"
        )


# ---- section "conv" --------------------------------------------------------------------------------


@dataclass
class ConvShape:
    """One distinct convolution of ResNet-50 (square kernel, no dilation, no groups, no bias)."""

    c_in: int
    c_out: int
    k: int
    stride: int
    padding: int
    h: int
    w: int
    count: int = 1  # occurrences in the network
    first: str = ""  # the first layer with this shape

    @property
    def name(self) -> str:
        return f"{self.k}x{self.k} {self.c_in}->{self.c_out} {self.h}x{self.w} s{self.stride}"

    def out_hw(self) -> tuple[int, int]:
        return (
            (self.h + 2 * self.padding - self.k) // self.stride + 1,
            (self.w + 2 * self.padding - self.k) // self.stride + 1,
        )

    def flops(self, n: int) -> int:
        oh, ow = self.out_hw()
        return 2 * n * oh * ow * self.c_out * self.c_in * self.k * self.k


def resnet50_conv_shapes(image: int) -> list[ConvShape]:
    """The distinct Conv2d calls of torchvision's resnet50 on an image x image input, in order of
    first use, with their counts: the model runs on the meta device (no weights, no FLOPs)."""
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.resnet50(weights=None).eval()
    found: dict[tuple, ConvShape] = {}

    def record(name: str):
        def hook(m: torch.nn.Conv2d, args) -> None:
            x = args[0]
            assert m.kernel_size[0] == m.kernel_size[1] and m.stride[0] == m.stride[1] and m.groups == 1
            key = (x.shape[1], m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0], x.shape[2], x.shape[3])
            if key in found:
                found[key].count += 1
            else:
                found[key] = ConvShape(*key, first=name)

        return hook

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_pre_hook(record(name))
    with torch.no_grad():
        model(torch.empty(1, 3, image, image, device="meta"))
    return list(found.values())


def conv_multipoint_weight(s: ConvShape, seed: int, device: str):
    """multipoint_weight with codes [C_out, 2, C_in, kh, kw]."""
    codes, scales, num_points = multipoint_weight(s.c_out, s.c_in * s.k * s.k, seed, device)
    return codes.view(s.c_out, 2, s.c_in, s.k, s.k), scales, num_points


def build_conv_variants(s: ConvShape, env: Env, act: dict[str, object]):
    """Per variant: call(x, copy) -> output, the bytes it must move for a batch n, and its reference.
    ``act`` holds the current input's act_qparams ("device" and "host" copies, "scale" its s as a
    float) and "out_scale", int8_cudnn's output scale."""
    import mpq
    from mpq.layout import SLAB_K

    copies = [conv_multipoint_weight(s, SEED + c, env.device) for c in range(COPIES)]
    D = s.c_in * s.k * s.k
    oh, ow = s.out_hw()
    geometry = ([s.k, s.k], None, [s.stride] * 2, [s.padding] * 2, [1, 1], 1)

    packed = [
        torch.ops.mpq.pack_multipoint(mpq.ops.conv_codes_nhwc(codes), scales, num_points, 4, 1)
        for codes, scales, num_points in copies
    ]
    packed_bytes = sum(t.numel() * t.element_size() for t in packed[0])
    int8_fits = s.c_in % SLAB_K == 0  # whole slabs of input channels (mpq::packed_int8_fits)

    def moved_bytes(kind: str):
        """bytes(n) a variant must move: its weight, the float16 input and output, and its own
        traffic: "dense" decodes the weight (written, read again), "int8" writes and reads the int8
        levels of the input, "fq" (igemm with act_qparams) a fake-quantized float16 copy of it."""
        weight = s.c_out * D * 2 if kind == "cudnn" else packed_bytes
        extra = {
            "dense": lambda n: 2 * s.c_out * D * 2,
            "int8": lambda n: 2 * n * s.c_in * s.h * s.w,
            "fq": lambda n: 2 * n * s.c_in * s.h * s.w * 2,
        }.get(kind, lambda n: 0)
        return lambda n: weight + n * s.c_in * s.h * s.w * 2 + n * s.c_out * oh * ow * 2 + extra(n)

    variants: dict[str, dict] = {}
    dense16 = [dense_weight(*w, env.dtype).contiguous(memory_format=torch.channels_last) for w in copies]
    variants["cudnn_fp16"] = {
        "call": lambda x, c: F.conv2d(x, dense16[c], None, s.stride, s.padding),
        "bytes": moved_bytes("cudnn"),
        "ref": "float",
    }
    for kernel in ["dense", "igemm", "int8", "auto"]:
        name = f"mpq_{kernel}"
        if kernel == "int8" and not int8_fits:
            variants[name] = {"skipped": f"C_in = {s.c_in}: the int8 kernel needs C_in % {SLAB_K} == 0"}
            continue
        if kernel == "igemm" and not env.half_input():
            variants[name] = {"skipped": "kernel 'igemm' needs float16/bfloat16 input"}
            continue
        qp_key = {"int8": "device", "auto": "host"}.get(kernel)

        def call(x, c, kernel=kernel, qp_key=qp_key):
            qp = act[qp_key] if qp_key else None
            kernel_size, bias, stride, padding, dilation, groups = geometry
            return torch.ops.mpq.multipoint_conv2d_packed(
                x, *packed[c], s.c_out, kernel_size, bias, qp, stride, padding, dilation, groups, kernel
            )

        # what "auto" runs with host act_qparams (csrc/cuda/multipoint_packed.cu, resolve_conv_kernel)
        runs = ("int8" if int8_fits else "fq") if kernel == "auto" else kernel
        variants[name] = {
            "call": call,
            "bytes": moved_bytes(runs),
            "ref": "int8" if qp_key else "float",
            "peak": INT8_MMA_FLOPS if runs == "int8" else FP16_MMA_FLOPS,
        }
    if env.cuda:
        variants.update(int8_conv_peers(s, copies, act))
    else:
        variants["int8_cudnn"] = {"skipped": "a CUDA peer (skipped by --check-on-cpu)"}
    return copies, variants


def int8_conv_peers(s: ConvShape, copies, act: dict[str, object]) -> dict[str, dict]:
    """The W8A8 peers of mpq_int8 on CUDA, timed with their quantization and dequantization:
    int8_cudnn: cuDNN's int8 convolution as torch exposes it (torch.ops.quantized.conv2d on
    QuantizedCUDA): the input quantized per tensor (quantize_per_tensor takes float32 only, so
    the float16 input is cast first), one int8 scale for the whole weight (all cuDNN accepts), an
    int8 output requantized by cuDNN with a scale from the reference (calibrated), dequantized to
    float16. Where this torch cannot run it, its rows say why. int8_cublaslt_1x1: on the 1x1
    convolutions, which are GEMMs on the channels_last input, the int8_cublaslt linear peer
    (per-channel int8 weight, int32 sums scaled to float16)."""
    peers: dict[str, dict] = {}
    oh, ow = s.out_hw()
    io = lambda n: n * s.c_in * s.h * s.w * 2 + n * s.c_out * oh * ow * 2  # noqa: E731 - float16 in and out
    dense32 = [dense_weight(*w, torch.float32) for w in copies]
    try:
        packed = []
        for W in dense32:
            qw = torch.quantize_per_tensor(W, float(W.abs().max()) / 127, 0, torch.qint8)
            packed.append(torch.ops.quantized.conv2d_prepack(qw, None, [s.stride] * 2, [s.padding] * 2, [1, 1], 1))

        def int8_cudnn(x, c):
            qx = torch.quantize_per_tensor(x.float(), act["scale"], 0, torch.qint8)
            return torch.ops.quantized.conv2d(qx, packed[c], act["out_scale"], 0).dequantize().to(x.dtype)

        # float32 copy of the input, its int8 levels, the int8 output and its float32 dequantization
        extra = lambda n: n * s.c_in * s.h * s.w * (4 * 2 + 2) + n * s.c_out * oh * ow * (2 + 4 * 2)  # noqa: E731
        peers["int8_cudnn"] = {
            "call": int8_cudnn,
            "ref": "int8",
            "tol": 3e-2,
            "peak": INT8_MMA_FLOPS,
            "bytes": lambda n: s.c_out * s.c_in * s.k * s.k + io(n) + extra(n),
        }
    except Exception as e:  # noqa: BLE001 - torch built without it, or a version that dropped it
        peers["int8_cudnn"] = {
            "skipped": f"torch has no usable int8 convolution on CUDA here "
            f"(torch.ops.quantized.conv2d_prepack: {type(e).__name__}: {e})"[:300]
        }
    if s.k == 1 and s.padding == 0:
        w8 = [int8_weight(W.view(s.c_out, s.c_in)) for W in dense32]
        out_scales: list[torch.Tensor] = []

        def gemm_input(x):
            out_scales[:] = [sw * act["scale"] for _, sw in w8]  # outside the timed calls
            return x

        def int8_gemm_1x1(x, c):
            xs = x[:, :, :: s.stride, :: s.stride] if s.stride > 1 else x
            n, _, h, w = xs.shape
            xq = int8_levels(xs, act["scale"])  # channels_last in, channels_last out: [n*h*w, C_in] rows
            y = torch._int_mm(xq.permute(0, 2, 3, 1).reshape(n * h * w, s.c_in), w8[c][0]) * out_scales[c]
            return y.to(x.dtype).view(n, h, w, s.c_out).permute(0, 3, 1, 2)

        peers["int8_cublaslt_1x1"] = {
            "call": int8_gemm_1x1,
            "input": gemm_input,
            "ref": "int8",
            "tol": 3e-2,
            "peak": INT8_MMA_FLOPS,
            "bytes": lambda n: s.c_out * s.c_in + io(n) + 2 * n * s.c_in * oh * ow + 2 * n * s.c_out * oh * ow * 4,
        }
    return peers


def run_conv(args, env: Env) -> tuple[dict, list[str]]:
    """The conv section: (its JSON, failures)."""
    image = 32 if env.check_on_cpu else 224
    shapes = resnet50_conv_shapes(image)
    batches = conv_batches(args, env)
    device, timer = env.device, env.timer
    results, failed = [], []
    act: dict[str, object] = {}
    print(f"conv: {len(shapes)} distinct convolutions of ResNet-50 at {image}x{image}, batches {batches}", flush=True)
    for s in shapes:
        copies, variants = build_conv_variants(s, env, act)
        W64 = dense_weight(*copies[0], torch.float64)
        oh, ow = s.out_hw()
        for n in batches:
            g = torch.Generator(device=device).manual_seed(SEED + n)
            x = torch.randn(n, s.c_in, s.h, s.w, generator=g, device=device).to(env.dtype)
            x = x.contiguous(memory_format=torch.channels_last)
            qp = torch.tensor([float(x.abs().max()) / 127, 0.0, -128.0, 127.0])
            act["host"], act["device"], act["scale"] = qp, qp.to(device), float(qp[0])
            r = min(n, args.ref_images)
            refs = {
                "float": F.conv2d(x[:r].double().contiguous(), W64, None, s.stride, s.padding),
                "int8": F.conv2d(fake_quant_levels(x[:r], qp).contiguous(), W64, None, s.stride, s.padding),
            }
            act["out_scale"] = float(refs["int8"].abs().max()) / 127  # int8_cudnn's output scale, calibrated
            base_ms = None
            for name, v in variants.items():
                row = {"shape": s.name, "first_layer": s.first, "count": s.count, "N": n, "variant": name}
                if "skipped" in v:
                    results.append({**row, "skipped": v["skipped"]})
                    continue
                try:
                    xin = v["input"](x) if "input" in v else x
                    poison(n * s.c_out * oh * ow, env.dtype, device)
                    out = v["call"](xin, 0)
                    env.sync()
                    if tuple(out.shape) != (n, s.c_out, oh, ow):
                        raise RuntimeError(f"output shape {tuple(out.shape)}, expected {(n, s.c_out, oh, ow)}")
                    err = rel_err(out[:r], refs[v["ref"]])
                    channels_last = out.is_contiguous(memory_format=torch.channels_last)
                    del out
                    ms_ = timer.median_ms(lambda c: v["call"](xin, c))
                except Exception as e:  # noqa: BLE001 - report and go on with the other variants
                    row["error"] = f"{type(e).__name__}: {e}"
                    results.append(row)
                    if name.startswith("mpq") or env.check_on_cpu:
                        failed.append(f"conv {name} {s.name} N={n}: {row['error']}")
                    continue
                tol = v.get("tol", TOL[v["ref"]])
                flops = s.flops(n)
                row.update(
                    ms=ms_,
                    rel_err=err,
                    check="ok" if err <= tol else "FAIL",
                    channels_last_out=channels_last,
                    gb_s=v["bytes"](n) / (ms_ * 1e-3) / 1e9,
                    tflop_s=flops / (ms_ * 1e-3) / 1e12,
                    predicted_ms=1e3 * max(v["bytes"](n) / HBM_BYTES_PER_S, flops / v.get("peak", FP16_MMA_FLOPS)),
                )
                if name == "cudnn_fp16":
                    base_ms = ms_
                row["vs_cudnn"] = base_ms / ms_ if base_ms else None
                if row["check"] != "ok" and (name.startswith("mpq") or env.check_on_cpu):
                    failed.append(f"conv {name} {s.name} N={n}: rel_err {err:.3g} > {tol}")
                results.append(row)
                print(f"  {s.name:<24} N={n:<4} {name:<11} {ms_ * 1e3:10.1f} us  err {err:.2e}", flush=True)
            del x, refs
        del copies, variants, W64
        if env.cuda:
            torch.cuda.empty_cache()
    doc = {
        "image": image,
        "batches": batches,
        "ref_images": args.ref_images,
        "shapes": [
            {
                "name": s.name,
                "C_in": s.c_in,
                "C_out": s.c_out,
                "kernel": s.k,
                "stride": s.stride,
                "padding": s.padding,
                "H": s.h,
                "W": s.w,
                "count": s.count,
                "first_layer": s.first,
            }
            for s in shapes
        ],
        "results": results,
        "network": network_sums(results, batches),
    }
    return doc, failed


def network_sums(results: list[dict], batches: list[int]) -> list[dict]:
    """Per batch and variant: the sum of time x occurrences over ResNet-50's convolutions, against
    cudnn_fp16 on the same convolutions (a variant skipped on some, e.g. int8 on the 3-channel stem,
    is summed over the others and names them as missing)."""
    out = []
    variants = list(dict.fromkeys(r["variant"] for r in results))
    for n in batches:
        rows = [r for r in results if r["N"] == n]
        base = {r["shape"]: r["ms"] * r["count"] for r in rows if r["variant"] == "cudnn_fp16" and "ms" in r}
        all_shapes = list(dict.fromkeys(r["shape"] for r in rows))
        for name in variants:
            timed = {r["shape"]: r["ms"] * r["count"] for r in rows if r["variant"] == name and "ms" in r}
            if not timed:
                continue
            common = [k for k in timed if k in base]
            total, base_total = sum(timed[k] for k in common), sum(base[k] for k in common)
            out.append(
                {
                    "N": n,
                    "variant": name,
                    "ms": total,
                    "cudnn_fp16_ms": base_total,
                    "vs_cudnn": base_total / total if total > 0 else None,
                    "missing": [k for k in all_shapes if k not in common],
                }
            )
    return out


def print_conv_table(doc: dict) -> None:
    print()
    print(
        f"{'convolution':<24} {'x':>2} {'N':>4} {'variant':<11} {'time us':>10} {'TFLOP/s':>8} {'vs cuDNN':>8} "
        f"{'pred us':>9} {'rel err':>9} check"
    )
    for r in doc["results"]:
        head = f"{r['shape']:<24} {r['count']:>2} {r['N']:>4} {r['variant']:<11}"
        if "skipped" in r:
            print(f"{head} skipped: {r['skipped'][:60]}")
        elif "error" in r:
            print(f"{head} error: {r['error'][:70]}")
        else:
            ratio = f"{r['vs_cudnn']:.2f}x" if r.get("vs_cudnn") else "-"
            print(
                f"{head} {r['ms'] * 1e3:10.1f} {r['tflop_s']:8.1f} {ratio:>8} {r['predicted_ms'] * 1e3:9.1f} "
                f"{r['rel_err']:9.2e} {r['check']}"
            )
    print(
        f"\n{'ResNet-50 convolutions, sum':<30} {'N':>4} {'variant':<11} {'time ms':>9} {'cuDNN ms':>9} {'vs cuDNN':>8}"
    )
    for r in doc["network"]:
        missing = f"  (without {len(r['missing'])}: {', '.join(r['missing'])})" if r["missing"] else ""
        ratio = f"{r['vs_cudnn']:.2f}x" if r.get("vs_cudnn") else "-"
        print(f"{'':<30} {r['N']:>4} {r['variant']:<11} {r['ms']:9.3f} {r['cudnn_fp16_ms']:9.3f} {ratio:>8}{missing}")


def conv_batches(args, env: Env) -> list[int]:
    if args.batch:
        return args.batch
    if env.check_on_cpu:
        return [2]
    return [32] if args.quick else BATCHES


# ---- section "resnet50" ---------------------------------------------------------------------------


def quantize_resnet50(env: Env, image: int, calib_batches: int, calib_images: int):
    """(float model, mpq model, JSON about the quantization): torchvision resnet50(weights=None)
    under SEED, quantized by mpq.quantize on ``env.device`` with RESNET50_CONFIG."""
    import torchvision

    import mpq
    from mpq.nn.modules import MultipointLayer
    from mpq.simulate import check_simulation

    torch.manual_seed(SEED)
    model = torchvision.models.resnet50(weights=None).eval()
    g = torch.Generator().manual_seed(SEED + 1)
    calib = [torch.randn(calib_images, 3, image, image, generator=g) for _ in range(calib_batches)]
    config = mpq.QuantConfig.preset("W4A8", **{**RESNET50_CONFIG, "calib_batches": calib_batches})
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False  # cuDNN's default algorithms while quantizing, as a user has them
    where, gpu_error = env.device, None
    try:
        env.sync()
        t0 = time.perf_counter()
        try:
            qmodel = mpq.quantize(model, calib, config, device=env.device)
        except Exception as e:  # noqa: BLE001 - a failure to report; the CPU still gives a model to time
            if not env.cuda:
                raise
            traceback.print_exc()
            gpu_error, where = f"{type(e).__name__}: {e}", "cpu (mpq.quantize failed on the GPU), then .to(cuda)"
            t0 = time.perf_counter()
            qmodel = mpq.quantize(model, calib, config, device="cpu").to(env.device)  # .to packs the weights
        env.sync()
        wall = time.perf_counter() - t0
        try:
            check = check_simulation(qmodel, calib[0].to(env.device))
            simulation = {"end_to_end": check.end_to_end, "max_layer_ratio": check.max_ratio}
        except RuntimeError as e:  # reported; the section's own checks decide
            simulation = f"{type(e).__name__}: {e}"
    finally:
        torch.backends.cudnn.benchmark = benchmark
    report = mpq.last_report(qmodel)
    layers = [m for m in qmodel.modules() if isinstance(m, MultipointLayer)]
    points = Counter()
    for m in layers:
        points.update(m.num_points.cpu().tolist())
    channels = sum(points.values())
    info = {
        "model": "torchvision resnet50(weights=None), torch.manual_seed(0)",
        "config": config.to_dict(),
        "calibration": f"{calib_batches} batches of {calib_images} random normal images {image}x{image}",
        "device": where,
        "gpu_error": gpu_error,
        "seconds_wall": wall,
        "report_seconds": dict(report.seconds) if report is not None else None,
        "simulation_check": simulation,  # mpq.simulate.check_simulation on a calibration batch, float32
        "avg_bits": report.avg_bits if report is not None else None,
        "layers": len(layers),
        "float_layers": [list(x) for x in report.float_layers] if report is not None else None,
        "points_per_channel": {str(k): v for k, v in sorted(points.items())},
        "avg_points_per_channel": sum(k * v for k, v in points.items()) / max(channels, 1),
    }
    return model, qmodel, info


def layer_errors(model: torch.nn.Module, x: torch.Tensor, images: int) -> dict[str, float]:
    """Every multipoint layer of ``model`` against float64 on its own input in a forward of x: the
    layer's output on the first ``images`` images vs conv2d/linear of the dequantized weight on
    the fake-quantized input (fake_quant_levels), ||out - ref|| / ||ref|| per layer."""
    from mpq.nn.modules import MultipointConv2d, MultipointLinear, same_padding

    errors: dict[str, float] = {}

    def hook(name: str):
        def check(m, args, out) -> None:
            inp = args[0][:images]
            if isinstance(m, MultipointConv2d):
                if m.same_padding:
                    inp = F.pad(inp, same_padding(inp, m.kernel_size, m.stride, m.dilation))
                elif len(m.pre_padding) > 0:
                    inp = F.pad(inp, m.pre_padding)
            inp = fake_quant_levels(inp, m.act_qparams) if m.act_qparams is not None else inp.double()
            w = torch.ops.mpq.dequantize_multipoint(m.codes, m.scales, m.num_points, torch.float64)
            b = m.bias.double() if m.bias is not None else None
            if isinstance(m, MultipointLinear):
                ref = F.linear(inp, w, b)
            else:
                ref = F.conv2d(inp.contiguous(), w, b, m.stride, m.padding, m.dilation, m.groups)
            errors[name] = rel_err(out[:images], ref)  # before an in-place ReLU changes out

        return check

    handles = [
        m.register_forward_hook(hook(name))
        for name, m in model.named_modules()
        if isinstance(m, (MultipointConv2d, MultipointLinear))
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return errors


def capture_graph(model: torch.nn.Module, x: torch.Tensor):
    """(graph, its static output): warm-up on a side stream, then capture (PyTorch's CUDA graphs
    recipe); x must stay the graph's input."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            model(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model(x)
    return graph, out


def run_resnet50(args, env: Env) -> tuple[dict, list[str]]:
    """The resnet50 section: (its JSON, failures)."""
    from mpq.fold import fold_batchnorm
    from mpq.nn.modules import MultipointLayer

    image = 32 if env.check_on_cpu else 224
    calib_batches = 2 if env.check_on_cpu else RESNET50_CONFIG["calib_batches"]
    calib_images = 2 if env.check_on_cpu else RESNET50_CALIB_IMAGES
    batches = conv_batches(args, env)
    device, timer, dtype = env.device, env.timer, env.dtype
    print(f"resnet50: quantizing on {device} ...", flush=True)
    model, q32, quant = quantize_resnet50(env, image, calib_batches, calib_images)
    print(f"resnet50: quantized in {quant['seconds_wall']:.1f} s (report: {quant['report_seconds']})", flush=True)

    with torch.no_grad():
        base32 = copy.deepcopy(model).to(device)
        folded = copy.deepcopy(model).to(device)
        fold_batchnorm(folded, torch.randn(2, 3, image, image, device=device))
        models = {  # the baseline first: every ratio divides by it
            "fp16_cudnn_folded": float_model_in(folded, dtype),
            "fp16_cudnn": float_model_in(base32, dtype),
            "mpq_w4a8": copy.deepcopy(q32).to(dtype),  # float32 buffers stay (module docstring); repacks on CUDA
        }
    del folded
    quant["kernels"] = dict(
        Counter(
            m.packed_kernel
            for m in models["mpq_w4a8"].modules()
            if isinstance(m, MultipointLayer) and m.tile_offsets.numel() > 0
        )
    )
    for m in [base32, q32, *models.values()]:
        m.requires_grad_(False)

    rows, checks, failed = [], [], []
    if quant["gpu_error"]:
        failed.append(f"resnet50: mpq.quantize failed on the GPU (quantized on the CPU instead): {quant['gpu_error']}")
    for n in batches:
        g = torch.Generator(device=device).manual_seed(SEED + 100 + n)
        x = torch.randn(n, 3, image, image, generator=g, device=device).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        try:
            check = check_resnet50(models, q32, base32, x, min(n, args.ref_images), quant["layers"])
        except Exception as e:  # noqa: BLE001 - report and go on to the timings
            traceback.print_exc()
            check = {"N": n, "error": f"{type(e).__name__}: {e}", "check": "FAIL"}
        checks.append(check)
        if "error" not in check:
            print(
                f"  N={n:<4} mpq_w4a8 float16 vs float32: rel err {check['rel_err']:.2e}, top-1 agreement "
                f"{check['top1_agreement']:.3f} (fp16 baseline: {check['fp16_baseline_rel_err']:.2e}); "
                f"layers vs float64: worst {check['layer_rel_err_max']:.2e} ({check['layer_rel_err_worst']})",
                flush=True,
            )
        if check["check"] != "ok":
            failed.append(
                f"resnet50 mpq_w4a8 N={n}: "
                + check.get(
                    "error",
                    (
                        f"rel_err {check['rel_err']:.3g} (tol {RESNET50_TOL}) vs the float32 mpq model; worst layer "
                        f"{check['layer_rel_err_worst']} {check['layer_rel_err_max']:.3g} (tol {TOL['int8']}), "
                        f"{len(check['layer_rel_err'])} of {quant['layers']} layers checked"
                    ),
                )
            )

        base_ms: dict[str, float] = {}
        for mode in ("eager", "cuda_graph"):
            for name, m in models.items():
                row = {"N": n, "model": name, "mode": mode}
                if mode == "cuda_graph" and not env.cuda:
                    rows.append({**row, "skipped": "CUDA graphs need CUDA"})
                    continue
                try:
                    ms_ = time_model(m, x, mode, timer, row)
                except Exception as e:  # noqa: BLE001 - report and go on
                    row["error"] = f"{type(e).__name__}: {e}"
                    rows.append(row)
                    if name.startswith("mpq") or env.check_on_cpu:
                        failed.append(f"resnet50 {name} {mode} N={n}: {row['error']}")
                    continue
                if name == RESNET50_BASELINE:
                    base_ms[mode] = ms_
                row.update(
                    ms=ms_, images_per_s=n / (ms_ * 1e-3), vs_fp16=base_ms[mode] / ms_ if mode in base_ms else None
                )
                rows.append(row)
                print(f"  N={n:<4} {name:<18} {mode:<10} {ms_:9.3f} ms {n / (ms_ * 1e-3):9.0f} img/s", flush=True)
        del x
        if env.cuda:
            torch.cuda.empty_cache()
    doc = {
        "image": image,
        "batches": batches,
        "quantization": quant,
        "checks": checks,
        "results": rows,
        "baseline": RESNET50_BASELINE,
        "target": "mpq_w4a8 >= 1.2x fp16_cudnn_folded images/s at batch 32 and 256, >= 1.0x at batch 1 "
        "(CUDA graphs allowed for both; docs/PERF.md)",
    }
    return doc, failed


def time_model(model: torch.nn.Module, x: torch.Tensor, mode: str, timer, row: dict) -> float:
    """Median ms of model(x), eager or replayed as a CUDA graph (whose output is first compared with
    the eager one, into row["graph_vs_eager_rel_err"])."""
    with torch.no_grad():
        if mode == "eager":
            return timer.median_ms(lambda c: model(x))
        graph, static_out = capture_graph(model, x)
        graph.replay()
        eager = model(x)
        torch.cuda.synchronize()
        row["graph_vs_eager_rel_err"] = err = rel_err(static_out, eager.double())
        if not err <= GRAPH_TOL:
            raise RuntimeError(f"CUDA graph output differs from the eager one by {err:.3g} > {GRAPH_TOL}")
        return timer.median_ms(lambda c: graph.replay())


def check_resnet50(
    models: dict[str, torch.nn.Module],
    q32: torch.nn.Module,
    base32: torch.nn.Module,
    x: torch.Tensor,
    images: int,
    num_layers: int,
) -> dict:
    """The float16 mpq model on x against the float32 one (and the float16 baseline against its
    float32 model, for scale), and each mpq layer against float64 on its own input."""
    x32 = x.float()  # the same values
    with torch.no_grad():
        y_q = models["mpq_w4a8"](x).double()
        y_q32 = q32(x32).double()
        y_b = models["fp16_cudnn"](x).double()
        y_b32 = base32(x32).double()
    err = rel_err(y_q, y_q32)
    layers = layer_errors(models["mpq_w4a8"], x, images)
    worst = max(layers, key=layers.get)
    ok = err <= RESNET50_TOL and layers[worst] <= TOL["int8"] and len(layers) == num_layers
    return {
        "N": x.shape[0],
        "rel_err": err,
        "top1_agreement": float((y_q.argmax(1) == y_q32.argmax(1)).double().mean()),
        "fp16_baseline_rel_err": rel_err(y_b, y_b32),
        "fp16_baseline_top1_agreement": float((y_b.argmax(1) == y_b32.argmax(1)).double().mean()),
        "tol": RESNET50_TOL,
        "layer_rel_err_max": layers[worst],
        "layer_rel_err_worst": worst,
        "layer_tol": TOL["int8"],
        "layer_rel_err": layers,
        "check": "ok" if ok else "FAIL",
    }


def float_model_in(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of a float model in ``dtype`` with channels_last weights (cuDNN's fast NHWC path)."""
    return copy.deepcopy(model).to(dtype).to(memory_format=torch.channels_last)


def print_resnet50_table(doc: dict) -> None:
    q = doc["quantization"]
    print(
        f"\nResNet-50 W4A8 quantization: {q['seconds_wall']:.1f} s wall on {q['device']} "
        f"(report: {', '.join(f'{k} {v:.1f}s' for k, v in (q['report_seconds'] or {}).items())}); "
        f"{q['avg_bits']:.2f} bits/weight, {q['avg_points_per_channel']:.2f} points/channel, "
        f"kernels {q.get('kernels')}"
    )
    for c in doc["checks"]:
        if "error" in c:
            print(f"  N={c['N']:<4} check error: {c['error'][:100]}")
            continue
        print(
            f"  N={c['N']:<4} mpq float16 vs float32: rel err {c['rel_err']:.2e}, top-1 agreement "
            f"{c['top1_agreement']:.3f}; each layer vs float64: worst {c['layer_rel_err_max']:.2e} "
            f"({c['layer_rel_err_worst']})  {c['check']}"
        )
    print(f"{'N':>4} {'model':<18} {'mode':<10} {'time ms':>9} {'img/s':>9} {'vs folded fp16':>14}")
    for r in doc["results"]:
        head = f"{r['N']:>4} {r['model']:<18} {r['mode']:<10}"
        if "skipped" in r:
            print(f"{head} skipped: {r['skipped']}")
        elif "error" in r:
            print(f"{head} error: {r['error'][:80]}")
        else:
            ratio = f"{r['vs_fp16']:.2f}x" if r.get("vs_fp16") else "-"
            print(f"{head} {r['ms']:9.3f} {r['images_per_s']:9.0f} {ratio:>14}")


# ---- driver ------------------------------------------------------------------------------------


def setup(args) -> Env:
    sys.path.insert(0, str(ROOT / "python"))
    if args.check_on_cpu:
        import mpq

        dtype = torch.float16 if cpu_takes_float16() else torch.float32
        env = Env(
            "cpu",
            f"cpu (--check-on-cpu, {platform.machine()})",
            dtype,
            WallTimer(args.warmup, args.repeats),
            True,
            mpq.build_info(),
        )
        env.notes.append(
            f"--check-on-cpu: CPU reference kernels for every variant, {dtype} activations, "
            "wall-clock times (meaningless), CUDA graphs and CUDA-only peers skipped"
        )
        return env
    if not torch.cuda.is_available():
        fail("no GPU: torch.cuda.is_available() is False (these are GPU kernel benchmarks; nothing to measure here)")
    import mpq

    info = mpq.build_info()
    if not info.get("cuda_kernels"):
        fail(f"mpq was built without its CUDA kernels ({info.get('library_path')}); build it with nvcc present")
    with warnings.catch_warnings():  # newer torch deprecates allow_tf32 in favour of fp32_precision
        warnings.simplefilter("ignore")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False  # float32 references (resnet50 section) in IEEE float32
    torch.backends.cudnn.benchmark = True  # cuDNN's fastest algorithm per shape, for the baselines
    return Env("cuda", torch.cuda.get_device_name(0), torch.float16, Timer(args.warmup, args.repeats), False, info)


def run_section(name: str, fn, args, env: Env) -> tuple[dict, list[str]]:
    """fn(args, env), or, when it raises, {"error": ...} and a failure: a crash in one section still
    leaves the others' results and the JSON."""
    try:
        return fn(args, env)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        message = f"{type(e).__name__}: {e}"
        return {"error": message}, [f"{name}: the section stopped: {message}"]


def run(args) -> int:
    env = setup(args)
    sections = ["linear", "conv", "resnet50"] if args.section == "all" else [args.section]
    print(f"{env.name}, torch {torch.__version__}, CUDA {torch.version.cuda}, mpq {env.info}", flush=True)
    failed: list[str] = []
    docs: dict[str, dict | None] = {"linear": None, "conv": None, "resnet50": None}
    functions = {"linear": run_linear, "conv": run_conv, "resnet50": run_resnet50}
    for name in sections:
        docs[name], f = run_section(name, functions[name], args, env)
        failed += f
        if args.json:  # after every section, so that a run stopped later keeps what it measured
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(json_doc(args, env, sections, docs, failed), indent=1))

    linear = docs["linear"]
    if linear is not None:
        if "error" in linear:
            print(f"\nlinear: error: {linear['error']}")
        else:
            print_linear_table(linear["results"])
    for name, printer in (("conv", print_conv_table), ("resnet50", print_resnet50_table)):
        if docs[name] is not None:
            if "error" in docs[name]:
                print(f"\n{name}: error: {docs[name]['error']}")
            else:
                printer(docs[name])
    if failed:
        print("\nchecks that failed:\n  " + "\n  ".join(failed))
        return 1
    if env.check_on_cpu:
        print("\n--check-on-cpu: every check passed")
    return 0


def json_doc(args, env: Env, sections: list[str], docs: dict[str, dict | None], failed: list[str]) -> dict:
    """The JSON: the linear section's keys at the top level (as before the other sections), then
    one key per further section (None when not run)."""
    linear = docs["linear"] or {}
    return {
        "benchmark": "benchmarks/kernels.py",
        "device": env.name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "mpq": env.info,
        "python": platform.python_version(),
        "seed": SEED,
        "copies": COPIES,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "shapes_KxN": linear.get("shapes_KxN", []),
        "ms": linear.get("ms", []),
        "points": "4-bit codes, 1 point for 3/4 of the channels and 2 for 1/4 (1.25 on average)",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "results": linear.get("results", []),
        "linear_error": linear.get("error"),
        "sections": sections,
        "check_on_cpu": env.check_on_cpu,
        "dtype": str(env.dtype).replace("torch.", ""),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "notes": env.notes,
        "conv": docs["conv"],
        "resnet50": docs["resnet50"],
        "failed": failed,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--json",
        default=None,
        help="where to write the JSON (default: benchmarks/results/kernels_h100.json on a GPU, none "
        "with --check-on-cpu; '' for none)",
    )
    p.add_argument("--section", choices=["linear", "conv", "resnet50", "all"], default="all")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per variant (default 50; 3 on the CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 10; 1 on the CPU)")
    p.add_argument("--m", type=int, action="append", help="an M to run (repeatable; default 1, 16, 128, 4096)")
    p.add_argument(
        "--batch",
        type=int,
        action="append",
        help="a batch size of the conv and resnet50 sections (repeatable; default 1, 32, 256)",
    )
    p.add_argument(
        "--ref-images",
        type=int,
        default=4,
        help="images of each conv batch checked against the float64 reference (default 4)",
    )
    p.add_argument(
        "--quick", action="store_true", help="only 4096 x 11008 and batch 32, at most 10 repeats: a smoke run"
    )
    p.add_argument(
        "--check-on-cpu",
        action="store_true",
        help="run every section's code path at tiny sizes on the CPU and check the results",
    )
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.check_on_cpu else 50
    if args.warmup is None:
        args.warmup = 1 if args.check_on_cpu else 10
    if args.quick:
        args.repeats = min(args.repeats, 10)
    if args.json is None:
        args.json = "" if args.check_on_cpu else str(ROOT / "benchmarks" / "results" / "kernels_h100.json")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
