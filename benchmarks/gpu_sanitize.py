"""A small, fixed set of calls of mpq's CUDA kernels, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck python benchmarks/gpu_sanitize.py
    python benchmarks/gpu_sanitize.py --device cpu     # the same calls on the CPU (checks this script)

benchmarks/gpu_check.sh runs it under both tools. Each call is tiny (the sanitizers slow kernels
down 10-100x) but reaches a distinct code path: the fit (fast and exact, a row long enough for
several blocks), the generic dequantize, the packed linear with every kernel (gemv at M = 1, mma at
M = 17 with a long K that splits across CTAs, dense, int8 with host and device act_qparams), the
packed conv2d (implicit GEMM and int8, NCHW and channels_last, stride 2) and the depthwise direct
kernel. Every output is compared with the CPU op, so a kernel that the sanitizer lets through but
that computes garbage still fails; exits 1 on any mismatch or exception.
"""

import argparse
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ACT_QP = (0.05, 0.0, -128.0, 127.0)  # symmetric int8 act_qparams (s, zp, qmin, qmax)


def packed_weight(C: int, P: int, D: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (C, P, D), generator=g, dtype=torch.int8)
    scales = ((torch.rand(C, P, generator=g) * 4 - 2).exp() * 0.05).float()
    num_points = torch.randint(0, P + 1, (C,), generator=g, dtype=torch.int32)
    num_points[0], num_points[-1] = 0, P
    return codes, scales, num_points


def on(device: str, *tensors):
    return tuple(t.to(device) for t in tensors)


def close(got: torch.Tensor, want: torch.Tensor, rtol: float = 2e-2) -> None:
    got, want = got.double().cpu(), want.double().cpu()
    err = float((got - want).norm() / want.norm().clamp_min(1e-30))
    if not err <= rtol:  # also catches NaN
        raise AssertionError(f"relative error {err:.3g} > {rtol} against the CPU op")


def calls(device: str):
    """(name, fn) pairs; fn runs the op on ``device`` and compares with the CPU op."""
    import mpq

    ops = torch.ops.mpq
    out = []

    def fit(rows, cols, exact):
        def run():
            w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows + cols))
            _, _, e_ref = ops.fit_multipoint(w, 4, 3, exact)
            _, _, e = ops.fit_multipoint(w.to(device), 4, 3, exact)
            close(e, e_ref, 1e-4)

        return run

    for rows, cols in [(7, 33), (32, 576)]:
        for exact in (False, True):
            out.append((f"fit_multipoint {rows}x{cols} {'exact' if exact else 'fast'}", fit(rows, cols, exact)))

    def dequantize():
        w = packed_weight(9, 3, 130, 1)
        close(
            ops.dequantize_multipoint(*on(device, *w), torch.float16),
            ops.dequantize_multipoint(*w, torch.float32),
            1e-3,
        )

    out.append(("dequantize_multipoint 9x3x130", dequantize))

    def linear(M, C, P, D, kernel, qp_where=None):
        def run():
            codes, scales, num_points = packed_weight(C, P, D, M + C + D)
            g = torch.Generator().manual_seed(2)
            x = torch.randn(M, D, generator=g).half()
            bias = torch.randn(C, generator=g)
            qp = None if qp_where is None else torch.tensor(ACT_QP)
            packed = ops.pack_multipoint(codes, scales, num_points, 4)
            want = ops.multipoint_linear_packed(x.float(), *packed, C, bias, qp, "auto")
            qpd = None if qp is None else qp.to(device if qp_where == "device" else "cpu")
            got = ops.multipoint_linear_packed(x.to(device), *on(device, *packed), C, bias.to(device), qpd, kernel)
            close(got, want)

        return run

    for case, kernel, qp_where in [
        ((1, 70, 3, 37), "gemv", None),
        ((17, 65, 4, 1029), "mma", None),
        ((5, 40, 2, 64), "dense", None),
        ((17, 65, 4, 1029), "int8", "host"),
        ((3, 33, 2, 96), "int8", "device"),
        ((2, 48, 2, 80), "auto", "host"),
    ]:
        name = f"multipoint_linear_packed M{case[0]} C{case[1]} P{case[2]} D{case[3]} {kernel}"
        out.append((name + (f" act_qparams on {qp_where}" if qp_where else ""), linear(*case, kernel, qp_where)))

    def conv(N, C, H, W, O, k, stride, kernel, channels_last):
        def run():
            codes, scales, num_points = packed_weight(O, 2, C * k * k, C + O + k)
            codes = codes.view(O, 2, C, k, k)
            g = torch.Generator().manual_seed(3)
            x = torch.randn(N, C, H, W, generator=g).half()
            bias = torch.randn(O, generator=g)
            qp = torch.tensor(ACT_QP) if kernel == "int8" else None
            packed = ops.pack_multipoint(mpq.ops.conv_codes_nhwc(codes), scales, num_points, 4, 1)
            geometry = ([stride, stride], [k // 2, k // 2], [1, 1], 1)
            want = ops.multipoint_conv2d_packed(x.float(), *packed, O, [k, k], bias, qp, *geometry, "auto")
            xd = x.to(device)
            if channels_last:
                xd = xd.contiguous(memory_format=torch.channels_last)
            got = ops.multipoint_conv2d_packed(
                xd,
                *on(device, *packed),
                O,
                [k, k],
                bias.to(device),
                None if qp is None else qp.to(device),
                *geometry,
                kernel,
            )
            close(got, want)

        return run

    for case in [
        (2, 16, 9, 7, 24, 3, 1, "igemm", False),
        (1, 16, 8, 8, 32, 3, 2, "igemm", True),
        (2, 32, 6, 6, 16, 1, 1, "int8", True),
        (1, 16, 7, 9, 40, 3, 2, "int8", False),
    ]:
        N, C, H, W, O, k, stride, kernel, cl = case
        out.append(
            (
                f"multipoint_conv2d_packed N{N} C{C} {H}x{W} O{O} k{k} s{stride} {kernel} {'nhwc' if cl else 'nchw'}",
                conv(*case),
            )
        )

    def depthwise():
        C = 24
        codes, scales, num_points = packed_weight(C, 3, 9, 4)
        codes = codes.view(C, 3, 1, 3, 3)
        x = torch.randn(1, C, 10, 10, generator=torch.Generator().manual_seed(5)).half()
        geometry = ([1, 1], [1, 1], [1, 1], C)
        want = ops.multipoint_conv2d(x.float(), codes, scales, num_points, None, None, *geometry)
        xd = x.to(device).contiguous(memory_format=torch.channels_last)
        close(ops.multipoint_conv2d(xd, *on(device, codes, scales, num_points), None, None, *geometry), want)

    out.append(("multipoint_conv2d depthwise 24ch 3x3 nhwc", depthwise))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "python"))
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_sanitize.py: no GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    failed, todo = 0, calls(args.device)
    for name, fn in todo:
        try:
            fn()
            if args.device == "cuda":
                torch.cuda.synchronize()
            print(f"ok    {name}", flush=True)
        except Exception:  # noqa: BLE001 - report every call
            failed += 1
            print(f"FAIL  {name}", flush=True)
            traceback.print_exc()
    print(f"gpu_sanitize.py: {failed} of {len(todo)} calls failed on {args.device}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
