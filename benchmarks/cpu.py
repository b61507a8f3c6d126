"""CPU deployment, side by side in one run: latency and file size of FP32, mpq and PyTorch's own int8.

    python benchmarks/cpu.py                                  # ResNet-50 and EfficientNet-Lite0, batch 1 and 16
    python benchmarks/cpu.py --models lite0 --batches 1 --repeats 5 --json build/cpu.json

Rows per model and batch (``torch.set_num_threads(--threads)``, median of ``--repeats`` timed calls
after two warm-up calls, the same input tensor for every row):
- ``fp32``: the float model, eager, default layout (NCHW); ``fp32 channels_last``: the same with
  model and input in channels_last (oneDNN's own layout: the fair FP32 baseline; ``speedup`` columns
  divide by the faster of the two);
- ``mpq W4A8`` / ``mpq W4A16`` / ``mpq W8A8``: ``mpq.quantize`` with the preset (defaults, seed 0;
  ``W8A8-1pt``: W8A8 with ``max_points=1``, per-channel int8 as PyTorch's own, no further points;
  ``W4A8-merge``: W4A8 with ``MultipointConfig(int8_merge=True)``, each channel's first two points
  one int8 row; the A7 presets (``W4A7-merge``, ``W8A7-1pt``) for CPUs without VNNI, whose int8
  kernels compute 8-bit codes exactly only against 7-bit activations),
  ``mpq.fuse_activations`` (uint8 activations between layers), then ``torch.jit.script`` + save +
  load: the artifact a user deploys, timed as loaded; ``mpq W4A8 unfused``: the same without
  ``fuse_activations`` (float32 between layers); ``mpq W4A8 q-residual``: with
  ``fuse_activations(quantize_residuals=True)`` (uint8 skip connections: a changed function, its
  fidelity recorded), for the first preset, the ``-1pt`` W8 presets and the ``-merge`` presets;
- ``torch int8 (FX, x86)``: PyTorch's own static int8 (``prepare_fx`` / ``convert_fx``, x86 engine,
  W8A8 per-channel weights), calibrated on the same batches; for MiniLM ``torch int8 (dynamic)``,
  ``quantize_dynamic`` of its Linear layers (how PyTorch users run such encoders in int8).
Sizes: the FP32 ``state_dict`` file, mpq's TorchScript file and ``mpq.save`` file, PyTorch int8's
TorchScript file, and what ``mpq.summary.model_size_bytes`` reports.
Models: ``lite0`` (EfficientNet-Lite0, its ImageNet weights, calibration on the bundled photos;
fidelity to FP32 on the demo's evaluation photos), ``resnet50`` (torchvision's architecture with
random weights: no pretrained weights offline; its speed does not depend on them; calibration on
2 x 8 seeded random images), ``minilm`` (all-MiniLM-L6-v2's 36 Linear layers, calibrated on the
demo's calibration sentences; timed on its 32 evaluation sentences at once and on the first alone;
every variant traced: ``run_minilm``).
The JSON records the command, commit, CPU model, ATen's and oneDNN's ISA, threads, versions and seed.
"""

import argparse
import copy
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from provenance import cpu_model  # noqa: E402  (benchmarks/ is the script's directory)

import mpq
from mpq.summary import model_size_bytes

ROOT = Path(__file__).resolve().parent.parent
warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.* deprecation notices
warnings.filterwarnings("ignore", category=UserWarning, module="torch.ao")


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f.startswith(("avx512_vnni", "avx_vnni", "amx", "avx512f", "avx2")))
    except OSError:
        pass
    return []


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    with torch.no_grad():
        fn()
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    times.sort()
    return 1e3 * times[len(times) // 2]


def file_bytes(save: Callable[[str], None]) -> int:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model")
        save(path)
        return os.path.getsize(path)


def to_torchscript(model: torch.nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """torch.jit.script, or torch.jit.trace where the model's own code is not scriptable
    (efficientnet_lite_pytorch keeps block arguments in a namedtuple TorchScript cannot compile)."""
    try:
        return torch.jit.script(model)
    except RuntimeError:
        with torch.no_grad():
            return torch.jit.trace(model, example, check_trace=False)


def scripted(model: torch.nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """The deployed artifact: TorchScript, saved, loaded back."""
    buf = io.BytesIO()
    torch.jit.save(to_torchscript(model, example), buf)
    buf.seek(0)
    return torch.jit.load(buf)


def load_task(name: str, seed: int):
    """(model, calibration batches, evaluation images or None, quality(out, ref) or None)."""
    if name == "lite0":
        from mpq.examples import assets
        from mpq.examples.demo import fidelity, load_demo_data

        data = load_demo_data(calib_images=64, batch_size=16, seed=seed)
        return (
            assets.load_efficientnet_lite0().eval(),
            data.calib_batches,
            data.eval_images,
            lambda out, ref: fidelity(out, ref, data.labels),
        )
    if name == "resnet50":
        import torchvision

        torch.manual_seed(seed)
        model = torchvision.models.resnet50(weights=None).eval()
        g = torch.Generator().manual_seed(seed)
        calib = [torch.randn(8, 3, 224, 224, generator=g) for _ in range(2)]  # speed does not depend on it
        return model, calib, None, None
    raise ValueError(f"unknown model {name!r}")


def torch_int8_fx(model: torch.nn.Module, calib: list[torch.Tensor]) -> torch.nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (calib[0][:1],))
    with torch.no_grad():
        for x in calib:
            prepared(x)
    return convert_fx(prepared)


# Preset suffixes: "W8A8-1pt" is the preset with one point per channel; "W4A8-merge" ties each
# channel's first two scales to a whole-number ratio (MultipointConfig(int8_merge=True)).
# "W4A16-g32" / "-g128asym": group-wise round to nearest (a float16 scale per 32 input weights; per
# 128 with a zero point), the format of int4 checkpoints (mpq.nn.GroupwiseLinear / Conv2d); these
# also get a "decode per call" row, the layers as they ran before mpq::groupwise_* cached the weight.
PRESET_SUFFIXES = {
    "1pt": {"max_points": 1},
    "merge": {"method": mpq.MultipointConfig(int8_merge=True)},
    "g32": {"method": mpq.RTNConfig(group_size=32)},
    "g128asym": {"method": mpq.RTNConfig(group_size=128, symmetric=False)},
}


def decode_per_call(q: torch.nn.Module) -> torch.nn.Module | None:
    """A copy of q whose group-wise layers decode their weight in Python on every call (None if q
    has none): the comparison for the cached decode of mpq::groupwise_linear / groupwise_conv2d."""
    if not any(isinstance(m, mpq.nn.GroupwiseLayer) for m in q.modules()):
        return None
    q = copy.deepcopy(q)
    for m in q.modules():
        if isinstance(m, mpq.nn.GroupwiseLinear):
            m.forward = lambda x, m=m: m._linear(x, m.dequantized_weight())
        elif isinstance(m, mpq.nn.GroupwiseConv2d):
            m.forward = lambda x, m=m: m._conv2d(x, m.dequantized_weight())
    return q


def preset_config(preset: str, seed: int) -> mpq.QuantConfig:
    base, *suffixes = preset.split("-")
    unknown = [x for x in suffixes if x not in PRESET_SUFFIXES]
    if unknown:
        raise SystemExit(
            f"benchmarks/cpu.py: unknown preset suffix {unknown} in {preset!r}; known: {list(PRESET_SUFFIXES)}"
        )
    changes = {k: v for x in suffixes for k, v in PRESET_SUFFIXES[x].items()}
    return mpq.QuantConfig.preset(base, seed=seed, **changes)


def int8_columns_per_channel(q: torch.nn.Module) -> float:
    """Output columns the CPU int8 kernels compute per output channel, over the layers with 8-bit
    activations outside depthwise convolutions: 1 for a channel's first row (its leading points
    that merge, ``mpq.ops.int8_merged_points``) plus one per further point."""
    columns = channels = 0
    for m in q.modules():
        if not isinstance(m, mpq.nn.MultipointLayer) or m.act_qparams is None:
            continue
        if mpq.nn.is_depthwise(m):
            continue
        D = int(torch.Size(m.code_shape).numel())
        levels = int(m.act_qparams[3] - m.act_qparams[2]) + 1
        merged = mpq.ops.int8_merged_points(m.point_codes, m.point_scales, m.num_points, m.w_bits, D, levels)
        n = m.num_points.long()
        columns += int(((n > 0).long() + (n - merged.long()).clamp_min(0)).sum())
        channels += n.numel()
    return columns / max(channels, 1)


def run_model(name: str, batches: list[int], repeats: int, presets: list[str], seed: int, fx: bool) -> dict[str, Any]:
    model, calib, eval_images, quality = load_task(name, seed)
    g = torch.Generator().manual_seed(seed + 1)
    inputs = {b: torch.randn(b, 3, 224, 224, generator=g) for b in batches}
    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    sizes: dict[str, int] = {"fp32 state_dict": file_bytes(lambda p: torch.save(model.state_dict(), p))}
    fidelity: dict[str, Any] = {}
    quant_seconds: dict[str, float] = {}
    int8_columns: dict[str, float] = {}
    variants["fp32"] = model
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    variants["fp32 channels_last"] = lambda x: model_cl(x.contiguous(memory_format=torch.channels_last))
    ref = None
    if eval_images is not None:
        with torch.no_grad():
            ref = model(eval_images)
    for preset in presets:
        t = time.perf_counter()
        q = mpq.quantize(model, calib, preset_config(preset, seed))
        quant_seconds[preset] = time.perf_counter() - t
        int8_columns[preset] = int8_columns_per_channel(q)
        fused = mpq.fuse_activations(q, calib[0][:1])
        s = scripted(fused, calib[0][:1])
        variants[f"mpq {preset}"] = s
        per_call = decode_per_call(q)
        if per_call is not None:  # traced: TorchScript's script would not see the replaced forwards
            variants[f"mpq {preset} (decode per call)"] = traced(per_call, calib[0][:1])
        if preset == presets[0]:  # the same model with float32 between layers: what the fusion gains
            variants[f"mpq {preset} unfused"] = scripted(q, calib[0][:1])
        if preset in (presets[0], "W8A8-1pt", "W8A7-1pt") or preset.endswith("-merge"):
            # uint8 skip connections too (fuse_activations(quantize_residuals=True): a changed
            # function; W8A8-1pt's is PyTorch int8's: its weight format, its rounded skip path)
            qres = scripted(mpq.fuse_activations(q, calib[0][:1], quantize_residuals=True), calib[0][:1])
            variants[f"mpq {preset} q-residual"] = qres
            if ref is not None:
                with torch.no_grad():
                    fidelity[f"mpq {preset} q-residual"] = quality(qres(eval_images), ref)
        sizes[f"mpq {preset} TorchScript"] = file_bytes(
            lambda p: torch.jit.save(to_torchscript(fused, calib[0][:1]), p)
        )
        sizes[f"mpq {preset} mpq.save"] = file_bytes(
            lambda p: mpq.save(q, p + ".mpq.safetensors") or os.replace(p + ".mpq.safetensors", p)
        )
        sizes[f"mpq {preset} reported (model_size_bytes)"] = model_size_bytes(q)
        if ref is not None:
            with torch.no_grad():
                fidelity[f"mpq {preset}"] = quality(s(eval_images), ref)
    if fx:
        try:
            qfx = torch_int8_fx(model, calib)
            sfx = torch.jit.freeze(to_torchscript(qfx, calib[0][:1]).eval())
            variants["torch int8 (FX, x86)"] = sfx
            sizes["torch int8 (FX, x86) TorchScript"] = file_bytes(
                lambda p: torch.jit.save(to_torchscript(qfx, calib[0][:1]), p)
            )
            if ref is not None:
                with torch.no_grad():
                    fidelity["torch int8 (FX, x86)"] = quality(sfx(eval_images), ref)
        except Exception as e:  # noqa: BLE001 - recorded in the JSON, the other rows still run
            fidelity["torch int8 (FX, x86) error"] = f"{type(e).__name__}: {e}"
    rows = []
    for b in batches:
        x = inputs[b]
        times = {label: median_ms(lambda: fn(x), repeats) for label, fn in variants.items()}
        fp32_best = min(times["fp32"], times["fp32 channels_last"])
        fx_ms = times.get("torch int8 (FX, x86)")
        for label, ms in times.items():
            rows.append(
                {
                    "model": name,
                    "batch": b,
                    "variant": label,
                    "ms": ms,
                    "speedup_vs_fp32": fp32_best / ms,
                    "speed_vs_torch_int8": (fx_ms / ms) if fx_ms else None,
                }
            )
    return {
        "rows": rows,
        "sizes_bytes": sizes,
        "fidelity": fidelity,
        "quantize_seconds": quant_seconds,
        "int8_columns_per_channel": int8_columns,
    }


def traced(model: torch.nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """torch.jit.trace (the Hugging Face encoder does not script), saved and loaded back."""
    buf = io.BytesIO()
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(model, example, check_trace=False, strict=False), buf)
    buf.seek(0)
    return torch.jit.load(buf)


def run_minilm(repeats: int, presets: list[str], seed: int, int8_peer: bool) -> dict[str, Any]:
    """all-MiniLM-L6-v2 (its 36 Linear layers quantized; the embedding tables stay float): the
    README's 32 evaluation sentences at once (21 tokens) and the first alone, every variant traced
    with TorchScript, saved and loaded back. PyTorch's own int8 path for such models is dynamic
    quantization (``quantize_dynamic``, int8 weights, activations quantized per call)."""
    from mpq.examples import assets, text

    model, tokenizer = assets.load_minilm()
    model.eval()
    calib = text.calibration_batches(tokenizer, text.calibration_sentences())
    sentences = text.tokenize(tokenizer, text.evaluation_sentences())
    with torch.no_grad():
        ref = model(sentences)
    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"fp32": traced(model, sentences)}
    sizes: dict[str, int] = {"fp32 state_dict": file_bytes(lambda p: torch.save(model.state_dict(), p))}
    fidelity: dict[str, Any] = {}
    quant_seconds: dict[str, float] = {}
    for preset in presets:
        t = time.perf_counter()
        q = mpq.quantize(model, calib, preset_config(preset, seed))
        quant_seconds[preset] = time.perf_counter() - t
        variants[f"mpq {preset}"] = traced(q, sentences)
        per_call = decode_per_call(q)
        if per_call is not None:
            variants[f"mpq {preset} (decode per call)"] = traced(per_call, sentences)
        with torch.no_grad():
            sizes[f"mpq {preset} TorchScript"] = file_bytes(
                lambda p: torch.jit.save(torch.jit.trace(q, sentences, check_trace=False, strict=False), p)
            )
            fidelity[f"mpq {preset}"] = text.embedding_fidelity(variants[f"mpq {preset}"](sentences), ref)
        sizes[f"mpq {preset} mpq.save"] = file_bytes(
            lambda p: mpq.save(q, p + ".mpq.safetensors") or os.replace(p + ".mpq.safetensors", p)
        )
        sizes[f"mpq {preset} reported (model_size_bytes)"] = model_size_bytes(q)
    peer = "torch int8 (dynamic)"
    if int8_peer:
        dq = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
        variants[peer] = traced(dq, sentences)
        with torch.no_grad():
            fidelity[peer] = text.embedding_fidelity(variants[peer](sentences), ref)
            sizes[f"{peer} TorchScript"] = file_bytes(
                lambda p: torch.jit.save(torch.jit.trace(dq, sentences, check_trace=False, strict=False), p)
            )
    rows = []
    for b in (1, sentences.shape[0]):
        x = sentences[:b]
        times = {label: median_ms(lambda: fn(x), repeats) for label, fn in variants.items()}
        peer_ms = times.get(peer)
        for label, ms in times.items():
            rows.append(
                {
                    "model": "minilm",
                    "batch": b,
                    "variant": label,
                    "ms": ms,
                    "speedup_vs_fp32": times["fp32"] / ms,
                    "speed_vs_torch_int8": (peer_ms / ms) if peer_ms else None,
                }
            )
    return {"rows": rows, "sizes_bytes": sizes, "fidelity": fidelity, "quantize_seconds": quant_seconds}


# Layer shapes of ResNet-50, EfficientNet-Lite0 and MiniLM: (kind, batch or rows, C_in, C_out, H, kernel, stride, groups).
LAYER_SHAPES = [
    ("conv", 16, 64, 64, 56, 3, 1, 1),
    ("conv", 1, 64, 64, 56, 3, 1, 1),
    ("conv", 16, 256, 256, 14, 3, 1, 1),
    ("conv", 16, 64, 256, 56, 1, 1, 1),
    ("conv", 16, 256, 64, 56, 1, 1, 1),
    ("conv", 16, 112, 672, 14, 1, 1, 1),
    ("conv", 16, 672, 112, 14, 1, 1, 1),
    ("conv", 16, 96, 96, 112, 3, 2, 96),
    ("conv", 16, 3, 32, 224, 3, 2, 1),
    ("linear", 1, 384, 1536, None, None, None, None),
    ("linear", 16, 384, 1536, None, None, None, None),
    ("linear", 16, 384, 384, None, None, None, None),
    ("linear", 512, 1536, 384, None, None, None, None),
]


def run_layers(repeats: int, seed: int) -> list[dict[str, Any]]:
    """Each stored-form kernel ("int8", "dense", and what "auto" picks) against the float32 layer
    with the same decoded weight, on the shapes above: 4-bit points, a quarter of the channels with
    a second point, an unsigned 8-bit input grid. The evidence for "auto"'s rule."""
    rows = []
    g = torch.Generator().manual_seed(seed)
    for kind, n, cin, cout, h, k, s, groups in LAYER_SHAPES:
        if kind == "conv":
            m = mpq.nn.MultipointConv2d(cin, cout, [k, k], 2, 4, [s, s], [k // 2] * 2, [1, 1], groups)
            shape = [cin // groups, k, k]
            x = torch.randn(n, cin, h, h, generator=g).relu().contiguous(memory_format=torch.channels_last)
        else:
            m = mpq.nn.MultipointLinear(cin, cout, 2, 4)
            shape = [cin]
            x = torch.randn(n, cin, generator=g).relu()
        counts = torch.ones(cout, dtype=torch.int32)
        counts[: cout // 4] = 2
        codes = torch.randint(-7, 8, (cout, 2, *shape), generator=g).to(torch.int8)
        m.set_weight(codes, torch.rand(cout, 2, generator=g) * 0.01, counts, torch.randn(cout, generator=g))
        m.set_act_qparams(0.02, 0, 0, 255)
        w = m.dequantized_weight()
        if kind == "conv":

            def run(kernel, m=m, x=x):
                return mpq.ops.multipoint_conv2d_stored(
                    x,
                    m.point_codes,
                    m.point_scales,
                    m.num_points,
                    4,
                    m.code_shape,
                    m.bias,
                    m.act_qparams,
                    m.stride,
                    m.padding,
                    m.dilation,
                    m.groups,
                    kernel,
                )

            def fp32(m=m, x=x, w=w):
                return torch.nn.functional.conv2d(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups)
        else:

            def run(kernel, m=m, x=x):
                return mpq.ops.multipoint_linear_stored(
                    x, m.point_codes, m.point_scales, m.num_points, 4, cin, m.bias, m.act_qparams, kernel
                )

            fp32 = lambda m=m, x=x, w=w: torch.nn.functional.linear(x, w, m.bias)  # noqa: E731
        row = {
            "kind": kind,
            "batch_or_rows": n,
            "c_in": cin,
            "c_out": cout,
            "size": h,
            "kernel": k,
            "stride": s,
            "groups": groups,
            "fp32_ms": median_ms(fp32, repeats),
        }
        for kernel in ("int8", "dense", "auto"):
            row[f"{kernel}_ms"] = median_ms(lambda kernel=kernel: run(kernel), repeats)
        rows.append(row)
    return rows


# all-MiniLM-L6-v2's Linear shapes (in_features, out_features) and the decode-like row counts of the
# W·A16 rows.
MINILM_LINEAR_SHAPES = [(384, 384), (384, 1536), (1536, 384)]
W4A16_ROWS = [1, 4, 16]
# "weights out of cache": enough copies of a layer that their float32 weights fill this many bytes
# (4x this machine's L2), run in turn, so each call reads its weight from L3 or memory as a model's
# layers do, rather than from the L2 that a repeated call of one layer keeps it in.
COLD_BYTES = 16 << 20


def run_weight_only_layers(repeats: int, seed: int, row_counts: list[int] = W4A16_ROWS) -> list[dict[str, Any]]:
    """W·A16 (float activations, no act_qparams) Linear at few rows: float32 at::linear on the decoded
    weight vs the stored-form paths "dense" (that weight decoded once, then at::linear) and
    "weight_only" (the 4-bit codes decoded in registers) and what "auto" picks. 4-bit points, a
    quarter of the channels with a second point. "hot": one layer called again and again (its weight
    stays in L2); "cold": COLD_BYTES of copies of the layer called in turn (ms per call)."""
    rows = []
    g = torch.Generator().manual_seed(seed)
    for cin, cout in MINILM_LINEAR_SHAPES:
        copies = max(1, -(-COLD_BYTES // (4 * cin * cout)))
        layers = []
        for _ in range(copies):
            m = mpq.nn.MultipointLinear(cin, cout, 2, 4)
            counts = torch.ones(cout, dtype=torch.int32)
            counts[: cout // 4] = 2
            codes = torch.randint(-8, 8, (cout, 2, cin), generator=g).to(torch.int8)
            m.set_weight(codes, torch.rand(cout, 2, generator=g) * 0.01, counts, torch.randn(cout, generator=g))
            layers.append((m, m.dequantized_weight()))
        for n in row_counts:
            x = torch.randn(n, cin, generator=g)

            def fns(m, w, x=x):
                out = {"fp32": lambda: torch.nn.functional.linear(x, w, m.bias)}
                for path in ("dense", "weight_only", "auto"):
                    out[path] = lambda path=path: mpq.ops.multipoint_linear_stored(
                        x, m.point_codes, m.point_scales, m.num_points, 4, cin, m.bias, None, path
                    )
                return out

            row = {"c_in": cin, "c_out": cout, "rows": n, "cold_copies": copies}
            for name in ("fp32", "dense", "weight_only", "auto"):
                row[f"{name}_ms"] = median_ms(fns(*layers[0])[name], repeats)
                passes = [fns(m, w)[name] for m, w in layers]
                row[f"{name}_cold_ms"] = (
                    median_ms(lambda passes=passes: [f() for f in passes], max(5, repeats // copies)) / copies
                )
            rows.append(row)
    return rows


def format_table(results: dict[str, Any]) -> str:
    lines = ["| model | batch | variant | ms | x FP32 (best layout) | x torch int8 |", "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        vs = f"{r['speed_vs_torch_int8']:.2f}" if r["speed_vs_torch_int8"] else "-"
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['variant']} | {r['ms']:.1f} | {r['speedup_vs_fp32']:.2f} | {vs} |"
        )
    if results.get("layers"):
        lines += ["", "| layer | fp32 ms | int8 ms | dense ms | auto ms |", "|---|---|---|---|---|"]
        for r in results["layers"]:
            name = (
                f"conv {r['c_in']}->{r['c_out']} {r['kernel']}x{r['kernel']}/{r['stride']} g{r['groups']} "
                f"{r['size']}px, batch {r['batch_or_rows']}"
                if r["kind"] == "conv"
                else f"linear {r['c_in']}->{r['c_out']}, {r['batch_or_rows']} rows"
            )
            lines.append(
                f"| {name} | {r['fp32_ms']:.2f} | {r['int8_ms']:.2f} | {r['dense_ms']:.2f} | {r['auto_ms']:.2f} |"
            )
    if results.get("w4a16_layers"):
        lines += [
            "",
            "| W·A16 linear | rows | fp32 ms | dense ms | weight_only ms | x FP32 | x dense | auto ms "
            "| cold: fp32 ms | dense ms | weight_only ms | x FP32 | x dense |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["w4a16_layers"]:
            lines.append(
                f"| {r['c_in']}->{r['c_out']} | {r['rows']} | {r['fp32_ms']:.4f} | {r['dense_ms']:.4f} | "
                f"{r['weight_only_ms']:.4f} | {r['fp32_ms'] / r['weight_only_ms']:.2f} | "
                f"{r['dense_ms'] / r['weight_only_ms']:.2f} | {r['auto_ms']:.4f} | {r['fp32_cold_ms']:.4f} | "
                f"{r['dense_cold_ms']:.4f} | {r['weight_only_cold_ms']:.4f} | "
                f"{r['fp32_cold_ms'] / r['weight_only_cold_ms']:.2f} | {r['dense_cold_ms'] / r['weight_only_cold_ms']:.2f} |"
            )
    lines += ["", "| model | file | MB |", "|---|---|---|"]
    for model, sizes in results["sizes_bytes"].items():
        for k, v in sizes.items():
            lines.append(f"| {model} | {k} | {v / 1e6:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--models",
        nargs="*",
        default=["resnet50", "lite0", "minilm"],
        choices=["resnet50", "lite0", "minilm"],
        help="models to time end to end (none: only --layers)",
    )
    p.add_argument(
        "--batches", nargs="+", type=int, default=[1, 16], help="CNN batch sizes (minilm: 1 and 32 sentences)"
    )
    p.add_argument(
        "--presets",
        nargs="+",
        default=["W4A8", "W4A8-merge", "W4A16", "W8A8", "W8A8-1pt"],
        help="mpq presets; NAME-1pt: the preset with max_points=1 (one point per channel, no further points); "
        "NAME-merge: with MultipointConfig(int8_merge=True)",
    )
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-fx", action="store_true", help="skip PyTorch's own int8 path")
    p.add_argument(
        "--layers",
        action="store_true",
        help="also time the stored-form kernels per layer shape (with the --w4a16-layers rows)",
    )
    p.add_argument(
        "--w4a16-layers",
        action="store_true",
        help="also time W·A16 Linear at 1, 4, 16 rows on MiniLM's shapes: fp32 vs dense vs weight_only",
    )
    p.add_argument("--w4a16-rows", nargs="+", type=int, default=W4A16_ROWS, help="row counts of the W·A16 rows")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "cpu.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    out: dict[str, Any] = {
        "command": " ".join(
            [Path(sys.executable).name, "benchmarks/cpu.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "commit": commit,
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "(default: all the CPU has)"),
        "threads": args.threads,
        "repeats": args.repeats,
        "seed": args.seed,
        "versions": {"torch": torch.__version__, "mpq": mpq.__version__, "python": platform.python_version()},
        "rows": [],
        "sizes_bytes": {},
        "fidelity": {},
        "quantize_seconds": {},
        "int8_columns_per_channel": {},
    }
    if args.layers:
        out["layers"] = run_layers(args.repeats, args.seed)
    if args.layers or args.w4a16_layers:
        out["w4a16_layers"] = run_weight_only_layers(args.repeats, args.seed, args.w4a16_rows)
    for name in args.models:
        if name == "minilm":
            r = run_minilm(args.repeats, args.presets, args.seed, not args.no_fx)
        else:
            r = run_model(name, args.batches, args.repeats, args.presets, args.seed, not args.no_fx)
        out["rows"] += r["rows"]
        for key in ("sizes_bytes", "fidelity", "quantize_seconds", "int8_columns_per_channel"):
            out[key][name] = r.get(key, {})
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(format_table(out))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
