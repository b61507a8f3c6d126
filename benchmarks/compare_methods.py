"""All weight quantizers side by side on three real models (docs/ALGORITHM.md section 5).

    python benchmarks/compare_methods.py                       # all models, all settings
    python benchmarks/compare_methods.py --models fashion --settings W4A16 --only rtn multipoint
    python benchmarks/compare_methods.py --only multipoint --merge    # re-run rows into the tables
    python benchmarks/compare_methods.py --suite matched --threads 1  # group-wise formats at matched memory

Models and data (all offline, docs/ASSETS.md):
- ``lite0``: EfficientNet-Lite0 (ImageNet weights); 64 seeded crops of the bundled photos for
  calibration (``mpq.examples.demo``); top-1 on the 20 labelled ImageNet photos, top-1 agreement and
  KL(FP32 || model) on those plus 17 bundled photos.
- ``fashion``: the project's Fashion-MNIST ResNet-14 (``mpq.examples.fashion``, checkpoint and training
  script in the repo); 512 seeded training images for calibration; top-1, agreement and KL on the
  10,000 test images.
- ``minilm``: all-MiniLM-L6-v2 sentence embeddings (``mpq.examples.text``), its 36 Linear layers;
  calibration and evaluation sentences of ``mpq.examples.text``; cosine similarity to the FP32 embeddings.
Every column: ``output SQNR`` = 20 log10(||y|| / ||y - y_q||) of the model output vs FP32 on the
evaluation inputs. All layers are quantized (first and last included, ``first_last="same"``),
per-channel symmetric grids.

Rows per setting (W4A8, W4A16, W3A16, W2A16; A16 = float activations):
- ``rtn (min-max)``, ``rtn``: round to nearest with the min-max / MSE-optimal channel scale;
  ``+bc`` bias correction, ``+bnre`` BatchNorm re-estimation (models with BatchNorm; the paper's,
  to the running statistics; ``(float)``: to the float layers' statistics on the calibration data);
- one point per channel on the MSE grid: ``gptq``, ``adaround``, ``adaquant``, ``ocs`` (expand
  ratio 0.05), ``companding`` (non-uniform, per-layer codebook);
- ``ilp``: a bit width per layer from {2, 3, 4, 8} under avg_bits = w_bits + 0.5 (``+gptq``:
  GPTQ rounding at the chosen widths; ``ILPConfig(rounding="adaquant")`` also works, left out for time);
- ``multipoint``: adaptive points under the same avg_bits = w_bits + 0.5, mpq's default (greedy
  and GPTQ point sequences, ``MultipointConfig(point_rounding="gptq")``); ``multipoint (paper)``: greedy
  points only (``point_rounding="nearest"``); ``+bc`` bias correction; ``@5.0``: at 5.0 bits, to set
  beside RTN at 5 bits;
- reference lines (W4 settings): RTN (MSE grid) at 5 and 6 bits, formats no fast kernel runs.

``--suite matched`` (``compare_matched_*``): weight-only formats at matched memory, A16 (W4A16:
about 4.25 and 4.5 bits; W3A16: about 3.5), docs/ALGORITHM.md "Group-wise grids": round to nearest,
GPTQ (``ao``: act-order with static groups) and AWQ-style scaling on group-wise grids (``g``: a
float16 scale per g input weights, ``asym``: plus a b-bit zero point), beside multipoint at 4.25,
4.5 and 3.5 bits and the per-channel RTN / GPTQ rows; rows above 4.5 bits are marked with their bits. Then the external libraries' rows
(``benchmarks/peers.py``: torchao's int4 / int3 / int8 weight-only, NNCF's int4 with AWQ and scale
estimation), run by those libraries on the same data, or the reason they cannot run here.
``avg bits`` counts codes and 32-bit scales of what the deployed layers store
(``QuantReport.avg_bits``); ``nominal`` is OCS's own widened layer (``mpq/methods/ocs.py``).
``quant s`` is the wall time of ``mpq.quantize`` (calibration included) on this machine's CPU.
"""

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peers import PEERS, Peer, PeerUnavailable  # benchmarks/ (this script's folder) is on sys.path
from provenance import git_commit, provenance

import mpq
from mpq.examples import assets
from mpq.examples.demo import fidelity, load_demo_data
from mpq.methods.ocs import ocs_nominal_bits
from mpq.summary import model_size_bytes

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ["W4A8", "W4A16", "W3A16", "W2A16"]
MODELS = ["lite0", "fashion", "minilm"]


@dataclass
class Task:
    """One model with its calibration batches, evaluation inputs and quality measures."""

    name: str
    title: str
    data_note: str
    model: torch.nn.Module
    calib: list[torch.Tensor]
    eval_inputs: torch.Tensor
    quality: Callable[[torch.Tensor, torch.Tensor], dict[str, float]]  # (output, FP32 output) -> columns
    has_batchnorm: bool


def _classifier_quality(labels: torch.Tensor):
    def quality(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
        return fidelity(out, ref, labels)

    return quality


def _batched(model: torch.nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch]) for i in range(0, x.shape[0], batch)])


def load_task(name: str, seed: int) -> Task:
    if name == "lite0":
        data = load_demo_data(seed=seed)
        n_lab, n_all = data.labels.numel(), data.eval_images.shape[0]
        return Task(
            "lite0",
            "EfficientNet-Lite0 (ImageNet weights)",
            f"{sum(b.shape[0] for b in data.calib_batches)} calibration crops of the bundled photos; top-1 on {n_lab} "
            f"labelled ImageNet photos; agreement and KL(FP32 || model) on {n_all} photos",
            assets.load_efficientnet_lite0(),
            data.calib_batches,
            data.eval_images,
            _classifier_quality(data.labels),
            True,
        )
    if name == "fashion":
        from mpq.examples.fashion import fashion_mnist, load_fashion_resnet

        xtr, _ = fashion_mnist("train")
        xte, yte = fashion_mnist("test")
        idx = torch.randperm(xtr.shape[0], generator=torch.Generator().manual_seed(seed))[:512]
        return Task(
            "fashion",
            "Fashion-MNIST ResNet-14 (trained by scripts/train_fashion_resnet.py)",
            "512 seeded training images for calibration (8 batches of 64); top-1, agreement and KL on the 10,000 test images",
            load_fashion_resnet(),
            list(xtr[idx].split(64)),
            xte,
            _classifier_quality(yte),
            True,
        )
    if name == "minilm":
        from mpq.examples import text

        model, tokenizer = assets.load_minilm()
        calib = text.calibration_batches(tokenizer, text.calibration_sentences())
        ev = text.tokenize(tokenizer, text.evaluation_sentences())
        return Task(
            "minilm",
            "all-MiniLM-L6-v2 sentence embeddings (36 Linear layers)",
            f"{sum(b.shape[0] for b in calib)} calibration sentences; cosine similarity to the FP32 embedding on "
            f"{ev.shape[0]} other sentences",
            model,
            calib,
            ev,
            text.embedding_fidelity,
            False,
        )
    raise ValueError(f"unknown model {name!r}")


def configs(setting: str, task: Task) -> list[tuple[str, mpq.QuantConfig]]:
    """(row name, config) for one setting."""
    w_bits, a_bits = mpq.PRESETS[setting]
    base = dict(w_bits=w_bits, a_bits=a_bits)
    mse = dict(base, rtn_range="mse")
    paper = mpq.MultipointConfig(point_rounding="nearest")  # the paper's greedy points only
    rows = [
        ("rtn (min-max)", mpq.QuantConfig(method="rtn", **base)),
        ("rtn", mpq.QuantConfig(method="rtn", **mse)),
        ("rtn+bc", mpq.QuantConfig(method="rtn", bias_correction=True, **mse)),
    ]
    if task.has_batchnorm:
        rows.append(
            ("rtn+bnre(paper)", mpq.QuantConfig(method="rtn", bn_reestimation=True, bn_reference="running", **mse))
        )
        rows.append(
            ("rtn+bnre(float)", mpq.QuantConfig(method="rtn", bn_reestimation=True, bn_reference="float", **mse))
        )
    rows += [
        ("gptq", mpq.QuantConfig(method="gptq", **mse)),
        ("gptq+bc", mpq.QuantConfig(method="gptq", bias_correction=True, **mse)),
        ("adaround", mpq.QuantConfig(method="adaround", **mse)),
        ("adaquant", mpq.QuantConfig(method="adaquant", **mse)),
    ]
    if task.has_batchnorm:
        rows.append(
            (
                "adaquant+bnre(paper)+bc",
                mpq.QuantConfig(
                    method="adaquant", bn_reestimation=True, bn_reference="running", bias_correction=True, **mse
                ),
            )
        )
        rows.append(
            (
                "adaquant+bnre(float)+bc",
                mpq.QuantConfig(
                    method="adaquant", bn_reestimation=True, bn_reference="float", bias_correction=True, **mse
                ),
            )
        )
    rows += [
        ("ocs", mpq.QuantConfig(method="ocs", **mse)),
        ("companding", mpq.QuantConfig(method="companding", **mse)),
        ("ilp", mpq.QuantConfig(method="ilp", **mse)),
        ("ilp+gptq", mpq.QuantConfig(method=mpq.ILPConfig(rounding="gptq"), **mse)),
        ("multipoint (paper)", mpq.QuantConfig(method=paper, **base)),
        ("multipoint (paper)+bc", mpq.QuantConfig(method=paper, bias_correction=True, **base)),
        ("multipoint", mpq.QuantConfig(**base)),
        ("multipoint+bc", mpq.QuantConfig(bias_correction=True, **base)),
    ]
    if task.has_batchnorm:
        rows.append(("multipoint+bnre(float)+bc", mpq.QuantConfig(bn_reestimation=True, bias_correction=True, **base)))
    if w_bits == 4:
        rows.append(("multipoint @5.0", mpq.QuantConfig(avg_bits=5.0, **base)))
        for b in (5, 6):
            rows.append((f"rtn {b}-bit (ref)", mpq.QuantConfig(method="rtn", w_bits=b, a_bits=a_bits, rtn_range="mse")))
    return rows


def matched_configs(setting: str, task: Task) -> list[tuple[str, mpq.QuantConfig]]:
    """(row name, config) for one setting of the matched-memory suite: weight-only (A16) formats at
    about the memory of multipoint's W4 at 4.25 / 4.5 bits and W3 at 3.5 bits; the group-wise
    grids (float16 scale per group of ``g`` input weights, ``asym``: plus a b-bit zero point) of
    round to nearest, GPTQ (``ao``: act-order with static groups), AdaRound (the rounding learned on
    round to nearest's grid) and AWQ-style scaling, and the
    per-channel rows of the methods tables for reference. All scales MSE-searched
    (``rtn_range="mse"``)."""
    w_bits, a_bits = mpq.PRESETS[setting]
    if a_bits is not None:
        raise ValueError(f"the matched suite compares weight-only formats (A16 settings), got {setting}")
    mse = dict(w_bits=w_bits, a_bits=None, rtn_range="mse")

    def rtn(g: int, sym: bool) -> mpq.QuantConfig:
        return mpq.QuantConfig(method=mpq.RTNConfig(group_size=g, symmetric=sym), **mse)

    def gptq(g: int, sym: bool, ao: bool) -> mpq.QuantConfig:
        return mpq.QuantConfig(method=mpq.GPTQConfig(group_size=g, symmetric=sym, act_order=ao), **mse)

    def awq(g: int, sym: bool) -> mpq.QuantConfig:
        return mpq.QuantConfig(method=mpq.AWQConfig(group_size=g, symmetric=sym), **mse)

    def adaround(g: int, sym: bool) -> mpq.QuantConfig:
        return mpq.QuantConfig(method=mpq.AdaRoundConfig(group_size=g, symmetric=sym), **mse)

    rows = [("rtn (per channel)", rtn(0, True)), ("gptq (per channel)", gptq(0, True, False))]
    if w_bits == 4:
        rows += [
            ("rtn g128", rtn(128, True)),
            ("rtn g128 asym", rtn(128, False)),
            ("rtn g64 asym", rtn(64, False)),
            ("rtn g32", rtn(32, True)),
            ("gptq g128 asym", gptq(128, False, False)),
            ("gptq g128 asym ao", gptq(128, False, True)),
            ("gptq g64 asym", gptq(64, False, False)),
            ("gptq g32", gptq(32, True, False)),
            ("gptq g32 ao", gptq(32, True, True)),
            ("awq g128 asym", awq(128, False)),
            ("awq g64 asym", awq(64, False)),
            ("awq g32", awq(32, True)),
            ("adaround g128 asym", adaround(128, False)),
            ("adaround g64 asym", adaround(64, False)),
            ("adaround g32", adaround(32, True)),
            ("multipoint @4.25", mpq.QuantConfig(w_bits=4, a_bits=None, avg_bits=4.25)),
            ("multipoint @4.5", mpq.QuantConfig(w_bits=4, a_bits=None)),
            ("rtn g32 asym (4.62)", rtn(32, False)),
            ("gptq g32 asym (4.62)", gptq(32, False, False)),
        ]
    else:
        rows += [
            ("rtn g64 asym", rtn(64, False)),
            ("rtn g32", rtn(32, True)),
            ("gptq g64 asym", gptq(64, False, False)),
            ("gptq g32", gptq(32, True, False)),
            ("gptq g32 ao", gptq(32, True, True)),
            ("awq g64 asym", awq(64, False)),
            ("awq g32", awq(32, True)),
            ("adaround g64 asym", adaround(64, False)),
            ("adaround g32", adaround(32, True)),
            ("multipoint @3.5", mpq.QuantConfig(w_bits=3, a_bits=None)),
        ]
    return rows + list(PEERS[w_bits].items())  # the external libraries (benchmarks/peers.py)


SUITES = {"methods": (configs, SETTINGS), "matched": (matched_configs, ["W4A16", "W3A16"])}


def ocs_nominal(qmodel: torch.nn.Module, report: mpq.QuantReport, cfg: mpq.QuantConfig) -> float:
    """Average bits per weight of OCS's own widened layers (codes + one 32-bit scale per channel)."""
    mods = dict(qmodel.named_modules())
    bits = weights = 0.0
    for layer in report.layers:
        m = mods[layer.name]
        C, D = layer.shape
        cin = m.in_features if isinstance(m, mpq.nn.MultipointLinear) else m.in_channels // m.groups
        bits += ocs_nominal_bits(C, cin, D // cin, layer.w_bits, cfg.options.expand_ratio) * C * D
        weights += C * D
    return bits / weights


def output_sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float(20 * torch.log10(ref.double().norm() / (out.double() - ref.double()).norm().clamp_min(1e-30)))


def _fmt(r: dict, key: str, spec: str) -> str:
    v = r.get(key)
    return "–" if v is None else format(v, spec)


COLUMNS = [  # (key, header, format)
    ("avg_bits", "avg bits", ".3f"),
    ("nominal_bits", "nominal", ".3f"),
    ("size_mb", "size MB", ".2f"),
    ("top1", "top-1", ".1%"),
    ("agreement", "agree", ".1%"),
    ("kl", "KL", ".4f"),
    ("cos_mean", "cos mean", ".5f"),
    ("cos_min", "cos min", ".5f"),
    ("sqnr_db", "SQNR dB", ".1f"),
    ("seconds", "quant s", ".1f"),
]


def run_task(
    task: Task,
    settings: list[str],
    only: list[str] | None,
    seed: int,
    on_row: Callable[[list[dict]], None] = lambda rows: None,
    suite: str = "methods",
) -> list[dict]:
    """Every configured row of ``task``; ``on_row(rows so far)`` after each (the tables are
    rewritten as rows arrive, so an interrupted run keeps what it measured)."""
    reference = _batched(task.model, task.eval_inputs)
    commit = git_commit()
    rows: list[dict] = [
        {
            "setting": "FP32",
            "method": "fp32",
            "avg_bits": 32.0,
            "nominal_bits": 32.0,
            "size_mb": model_size_bytes(task.model) / 1e6,
            **task.quality(reference, reference),
            "sqnr_db": float("inf"),
            "seconds": 0.0,
            "commit": commit,
        }
    ]
    cols = [c for c in COLUMNS if c[0] in rows[0] or c[0] in ("sqnr_db", "seconds")]
    print(
        f"\n{task.title}: {task.data_note}; CPU, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    print(f"{'setting':<7} {'method':<26}" + "".join(f"{h:>10}" for _, h, _ in cols), flush=True)

    def show(r: dict) -> None:
        if "unavailable" in r:
            print(f"{r['setting']:<7} {r['method']:<26} not run: {r['unavailable']}", flush=True)
            return
        print(f"{r['setting']:<7} {r['method']:<26}" + "".join(f"{_fmt(r, k, f):>10}" for k, _, f in cols), flush=True)

    show(rows[0])
    for setting in settings:
        for name, cfg in SUITES[suite][0](setting, task):
            if only and name not in only:
                continue
            if isinstance(cfg, Peer):
                r = run_peer(task, setting, name, cfg, reference, commit)
                rows.append(r)
                show(r)
                on_row(rows)
                continue
            cfg = cfg.replace(seed=seed)
            t0 = time.perf_counter()
            qmodel = mpq.quantize(task.model, task.calib, cfg)
            seconds = time.perf_counter() - t0
            out = _batched(qmodel, task.eval_inputs)
            report = mpq.last_report(qmodel)
            bits_hist: dict[int, int] = {}
            for layer in report.layers:
                bits_hist[layer.w_bits] = bits_hist.get(layer.w_bits, 0) + 1
            r = {
                "setting": setting,
                "method": name,
                "avg_bits": report.avg_bits,
                "nominal_bits": ocs_nominal(qmodel, report, cfg) if cfg.method == "ocs" else report.avg_bits,
                "size_mb": model_size_bytes(qmodel) / 1e6,
                **task.quality(out, reference),
                "sqnr_db": output_sqnr_db(out, reference),
                "seconds": seconds,
                "layers_per_bit_width": {str(k): v for k, v in sorted(bits_hist.items())},
                "config": cfg.to_dict(),
                "commit": commit,
            }
            rows.append(r)
            show(r)
            on_row(rows)
    return rows


def run_peer(task: Task, setting: str, name: str, peer: Peer, reference: torch.Tensor, commit: str | None) -> dict:
    """A row of an external library (``benchmarks/peers.py``), or its reason for not running."""
    r = {"setting": setting, "method": name, "library": peer.library, "commit": commit}
    t0 = time.perf_counter()
    try:
        qmodel, bits = peer.run(task.model, task.calib)
    except PeerUnavailable as e:
        return {**r, "unavailable": str(e)}
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        out = _batched(qmodel, task.eval_inputs)
    return {
        **r,
        "avg_bits": bits,
        **task.quality(out, reference),
        "sqnr_db": output_sqnr_db(out, reference),
        "seconds": seconds,
        "versions": _peer_versions(),
    }


def _peer_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torchao", "nncf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def write_results(task: Task, rows: list[dict], args: argparse.Namespace, command: str) -> None:
    result = {
        "benchmark": "compare_methods",
        "model": task.title,
        "data": task.data_note,
        "command": command,
        "provenance": provenance(),
        "row_commits": sorted({str(r.get("commit")) for r in rows}),
        "mpq_build": mpq.build_info(),
        "seed": args.seed,
        "load_average_1min_end": os.getloadavg()[0],
        "note": args.note,
        "rows": rows,
    }
    out = args.out_dir / f"compare_{args.suite}_{task.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    where = result["provenance"]
    commits = ", ".join(c[:10] for c in result["row_commits"])
    if args.suite == "matched":
        title = "weight-only formats at matched memory"
        grids = (
            "per-channel grids (float32 scale) or group-wise grids (`g`: a float16 scale per group of g input weights; "
            "`asym`: plus a b-bit zero point; `ao`: GPTQ act-order, static groups; a layer with fewer than g weights "
            "per channel has one group). `avg bits`: codes + scales + zero points as stored"
        )
    else:
        title = "weight quantizers side by side"
        grids = (
            "per-channel symmetric grids. A16 = float activations. `avg bits`: codes + 32-bit scales stored by the mpq "
            "layers; `nominal`: OCS's own widened layer"
        )
    md = (
        [
            f"# {task.title}: {title}",
            "",
            f"{task.data_note}. All layers quantized (first and last included), {grids}; "
            "`SQNR`: of the model output vs FP32. Written by `" + command + "`; every row measured at commit "
            f"{commits} on {where['cpu']}, {where['torch_num_threads']} threads (`quant s`: wall time there).",
            "",
        ]
        + ([args.note, ""] if args.note else [])
        + [
            "| setting | method | " + " | ".join(h for _, h, _ in cols) + " |",
            "|---|---|" + "---:|" * len(cols),
        ]
    )
    for r in rows:
        if "unavailable" in r:
            md.append(f"| {r['setting']} | {r['method']} | not run: {r['unavailable']} |" + " |" * (len(cols) - 1))
            continue
        md.append(f"| {r['setting']} | {r['method']} | " + " | ".join(_fmt(r, k, f) for k, _, f in cols) + " |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument(
        "--suite",
        default="methods",
        choices=sorted(SUITES),
        help="methods: every method per channel (compare_methods_*); matched: weight-only formats at matched "
        "memory, group-wise included (compare_matched_*)",
    )
    parser.add_argument("--settings", nargs="+", default=None, choices=SETTINGS, help="default: the suite's")
    parser.add_argument("--only", nargs="*", default=None, help="row names to run (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--note", default="", help="a line about this run, written into the JSON and markdown")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of the existing tables, replacing those this run measures again",
    )
    args = parser.parse_args()
    args.settings = args.settings or SUITES[args.suite][1]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/compare_methods.py " + " ".join(
        ([f"--suite {args.suite}"] if args.suite != "methods" else [])
        + [f"--models {' '.join(args.models)}", f"--settings {' '.join(args.settings)}"]
        + ([f"--only {' '.join(repr(o) for o in args.only)}"] if args.only else [])
        + [f"--seed {args.seed}"]
        + ([f"--threads {args.threads}"] if args.threads is not None else [])
        + (["--merge"] if args.merge else [])
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        task = load_task(name, args.seed)
        old_rows, old_command = [], ""
        previous = args.out_dir / f"compare_{args.suite}_{task.name}.json"
        if args.merge and previous.exists():
            old = json.loads(previous.read_text())
            old_rows, old_command = old["rows"], old["command"]
        run_command = f"{old_command}; then {command}" if old_command else command

        def write(
            rows: list[dict], task: Task = task, old_rows: list[dict] = old_rows, run_command: str = run_command
        ) -> None:
            write_results(task, merge_rows(old_rows, rows), args, run_command)

        run_task(task, args.settings, args.only, args.seed, write, args.suite)


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with each row that ``new`` measured again (same setting and method) replaced in place;
    rows only ``new`` has are appended."""
    fresh = {(r["setting"], r["method"]): r for r in new}
    merged = [fresh.pop((r["setting"], r["method"]), r) for r in old]
    return merged + [r for r in new if (r["setting"], r["method"]) in fresh]


if __name__ == "__main__":
    main()
