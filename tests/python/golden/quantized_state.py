"""The quantized state of the three bundled models, hashed tensor by tensor, for fixed seeds: the
guard that a refactor leaves what ``mpq.quantize`` computes bit for bit unchanged.

    python tests/python/golden/quantized_state.py --write   # remake quantized_state.json
    python tests/python/golden/quantized_state.py           # compare with it (exit 1 on a change)

Run with fixed code paths so that any x86 CPU with AVX2 gives the same bits (the test does this
in a subprocess): ATen's AVX2 kernels, MKL's COMPATIBLE branch (MKL_CBWR), oneDNN capped at AVX2
and two intra-op threads (float sums split by thread count). MKL runs its AVX2 branch on Intel
CPUs only: on an AMD EPYC every MKL_CBWR value but COMPATIBLE gave the same bits as AUTO (a
float64 matmul and a Cholesky factor hashed under AVX2, AUTO, SSE4_2: one result; COMPATIBLE:
another), which differ from a Xeon's AVX2 branch, so the file made on a Xeon with MKL_CBWR=AVX2
failed there on 6 of 12 cases. COMPATIBLE is MKL's one branch with the same code on every vendor.

Cases: EfficientNet-Lite0 W4A8 (the demo's calibration crops), all-MiniLM-L6-v2 W4A16 (its 32
calibration sentences), and the Fashion-MNIST ResNet under every branch of ``quantize``: each
method (ILP's per-layer bits, companding's codebook layers, the one-point baselines), bias
correction, BatchNorm re-estimation, 8-bit and float first/last layers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

GOLDEN = Path(__file__).with_name("quantized_state.json")
ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OMP_NUM_THREADS": "2",
    "MKL_NUM_THREADS": "2",
}

# Fashion-MNIST ResNet cases: QuantConfig fields, the method's options as a dict (short iterations
# keep the run at about a minute).
FASHION_CASES = {
    "multipoint_w3a8_bias_bn": dict(w_bits=3, a_bits=8, bias_correction=True, bn_reestimation=True),
    "multipoint_w4a16_layer_scope_nearest": dict(
        w_bits=4,
        a_bits=None,
        scope="layer",
        options=dict(point_rounding="nearest", scale_refit="weight"),
        first_last="8bit",
    ),
    "rtn_w4a8_mse_float_ends": dict(method="rtn", rtn_range="mse", first_last="float"),
    "gptq_w3a16_act_order": dict(method="gptq", w_bits=3, a_bits=None, options=dict(act_order=True)),
    "adaround_w4a8": dict(method="adaround", options=dict(iters=20)),
    "adaquant_w4a8": dict(method="adaquant", options=dict(iters=20)),
    "ocs_w4a8_grid_aware": dict(method="ocs", options=dict(grid_aware=True)),
    "ilp_w4a8_gptq": dict(method="ilp", options=dict(rounding="gptq"), avg_bits=4.0),
    "companding_w3a16": dict(method="companding", w_bits=3, a_bits=None, options=dict(iters=20)),
}


def _digest(model) -> dict[str, str]:
    import torch

    out = {}
    for name, t in model.state_dict().items():
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().contiguous()
            h = hashlib.sha256(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            out[name] = h.hexdigest()[:16]
    return out


def compute() -> dict[str, dict[str, str]]:
    import time

    import torch

    import mpq
    from mpq.examples import assets, text
    from mpq.examples.demo import load_demo_data
    from mpq.examples.fashion import fashion_mnist, load_fashion_resnet

    torch.set_num_threads(2)
    results = {}
    t0 = time.perf_counter()

    def done(case: str, model) -> None:
        nonlocal t0
        results[case] = _digest(model)
        print(f"{case}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        t0 = time.perf_counter()

    lite0 = assets.load_efficientnet_lite0()
    done("efficientnet_lite0/W4A8", mpq.quantize(lite0, load_demo_data(calib_images=32).calib_batches, "W4A8"))
    minilm, tokenizer = assets.load_minilm()
    calib = text.calibration_batches(tokenizer, text.calibration_sentences())
    done("minilm/W4A16", mpq.quantize(minilm, calib, "W4A16"))
    fashion = load_fashion_resnet()
    xtr, _ = fashion_mnist("train")
    calib = list(xtr[torch.randperm(xtr.shape[0], generator=torch.Generator().manual_seed(0))[:256]].split(64))
    for case, fields in FASHION_CASES.items():
        done(f"fashion_resnet/{case}", mpq.quantize(fashion, calib, mpq.QuantConfig(**fields)))
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help="remake quantized_state.json")
    args = p.parse_args()
    if any(os.environ.get(k) != v for k, v in ENV.items()):  # the fixed code paths, set before torch loads
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ENV})
    results = compute()
    if args.write:
        GOLDEN.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        print(f"wrote {GOLDEN}: {len(results)} cases")
        return 0
    golden = json.loads(GOLDEN.read_text())
    changed = []
    for case in sorted(set(golden) | set(results)):
        a, b = golden.get(case, {}), results.get(case, {})
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            changed.append(f"{case}: {len(diff)} of {len(a)} tensors changed, e.g. {diff[:4]}")
    print("\n".join(changed) if changed else f"all {len(results)} cases bit-identical")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
