"""Dampening of H for multipoint's GPTQ point sequence: mpq's default multipoint at several
``point_damp`` values, on the three models of benchmarks/compare_methods.py.

    python benchmarks/point_damp.py                                   # all models, settings, damps
    python benchmarks/point_damp.py --models minilm --settings W4A16 --damps 0.01 0.1

The GPTQ sweeps of the point sequence (``point_rounding="gptq"``) use H + damp * mean(diag H) * I
from the calibration inputs of each layer, which are float inputs: downstream layers of the
quantized model see other inputs (the upstream layers' errors), and a small damp lets the sweeps
move weight error into directions the calibration rows barely cover. Measured here to choose the
default (``MultipointConfig.point_damp``); the one-point GPTQ method keeps the paper's
``GPTQConfig.damp = 0.01``. Writes benchmarks/results/point_damp.{json,md}.

``--holdout`` (issue 12, section 3): the same sweep measured on a selection set that the reported
evaluation (README, compare_methods tables) never uses, with calibration data disjoint from it:

- ``lite0``: the 17 bundled photos split by index, calibration = 64 seeded crops of photos[0::2],
  selection = 64 crops (seed + 1) of photos[1::2]; measures KL(FP32 || model), agreement, SQNR.
  No offline photo lies outside the reported evaluation (the 20 labelled photos and the center
  crops of all 17 bundled photos), so the selection views are random resized crops of 8 of those
  photos, never their center crops and never the labelled photos.
- ``fashion``: calibration = the tables' 512 seeded training images; selection = the next 10,000
  of the same seeded permutation of the 60,000 training images (the tables evaluate on the test set).
- ``minilm``: calibration = calibration_sentences()[0::2] (16), selection =
  calibration_sentences()[1::2] (16); the evaluation sentences (SENTENCES[1::2]) are never used.

Rule, fixed before any held-out number was seen: in each (model, setting) cell rank the damps by
the primary measure (KL, lower is better, for the classifiers; cos mean, higher is better, for
MiniLM), ties sharing the mean rank; choose the damp with the lowest mean rank over all cells;
a tie on that goes to the better mean rank by output SQNR. Writes
benchmarks/results/point_damp_holdout.{json,md}.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import mpq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_methods import MODELS, SETTINGS, Task, _batched, load_task, output_sqnr_db  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DAMPS = [0.01, 0.03, 0.1, 0.3]


def write(out_dir: Path, command: str, seed: int, results: list[dict]) -> None:
    (out_dir / "point_damp.json").write_text(
        json.dumps(
            {
                "benchmark": "point_damp",
                "command": command,
                "torch_version": torch.__version__,
                "torch_num_threads": torch.get_num_threads(),
                "seed": seed,
                "rows": results,
            },
            indent=2,
        )
        + "\n"
    )
    md = [
        "# Multipoint: dampening of the GPTQ point sequence (`point_damp`)",
        "",
        f"Written by `{command}` (CPU). mpq's default multipoint (greedy and GPTQ point sequences, avg_bits = "
        "w_bits + 0.5), tasks and measures of benchmarks/compare_methods.py: KL(FP32 || model) for the "
        "classifiers (lower is better), mean cosine to the FP32 embedding for MiniLM (higher is better).",
        "",
    ]
    md += _table(
        results,
        [
            ("avg_bits", "avg bits", ".3f"),
            ("top1", "top-1", ".1%"),
            ("agreement", "agree", ".1%"),
            ("kl", "KL", ".4f"),
            ("cos_mean", "cos mean", ".5f"),
            ("sqnr_db", "SQNR dB", ".2f"),
            ("seconds", "quant s", ".0f"),
        ],
    )
    (out_dir / "point_damp.md").write_text("\n".join(md) + "\n")


def _table(results: list[dict], columns: list[tuple[str, str, str]]) -> list[str]:
    """Markdown lines: model, setting and point_damp of each row, then its (key, header, format)
    columns ("–" where a row has no such key)."""
    md = [
        "| model | setting | point_damp | " + " | ".join(h for _, h, _ in columns) + " |",
        "|---|---|---:|" + "---:|" * len(columns),
    ]
    for r in results:
        md.append(
            f"| {r['model']} | {r['setting']} | {r['point_damp']} | "
            + " | ".join(format(r[k], f) if k in r else "–" for k, _, f in columns)
            + " |"
        )
    return md


def _agreement_kl(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """top-1 agreement with FP32 and mean KL(FP32 || model): the classifiers' measures without labels."""
    return {
        "agreement": float((out.argmax(1) == ref.argmax(1)).double().mean()),
        "kl": float(
            F.kl_div(
                F.log_softmax(out.double(), 1), F.log_softmax(ref.double(), 1), log_target=True, reduction="batchmean"
            )
        ),
    }


def load_holdout_task(name: str, seed: int) -> Task:
    """``name``'s model with a calibration set and a selection set (``eval_inputs``), both disjoint
    from what benchmarks/compare_methods.py and the README evaluate on (module docstring)."""
    from mpq.examples import assets

    if name == "lite0":
        photos = assets.unlabelled_photos()
        calib_photos, select_photos = photos[0::2], photos[1::2]
        calib = assets.calibration_images(calib_photos, 64, seed=seed)
        select = assets.calibration_images(select_photos, 64, seed=seed + 1)
        return Task(
            "lite0",
            "EfficientNet-Lite0 (ImageNet weights)",
            f"calibration: 64 seeded crops (seed {seed}) of the {len(calib_photos)} bundled photos "
            f"{', '.join(p.stem for p in calib_photos)}; selection: 64 seeded crops (seed {seed + 1}) of the other "
            f"{len(select_photos)}, {', '.join(p.stem for p in select_photos)}; agreement and KL(FP32 || model)",
            assets.load_efficientnet_lite0(),
            list(calib.split(16)),
            select,
            _agreement_kl,
            True,
        )
    if name == "fashion":
        from mpq.examples.fashion import fashion_mnist, load_fashion_resnet

        xtr, _ = fashion_mnist("train")
        idx = torch.randperm(xtr.shape[0], generator=torch.Generator().manual_seed(seed))
        return Task(
            "fashion",
            "Fashion-MNIST ResNet-14 (trained by scripts/train_fashion_resnet.py)",
            "calibration: the tables' 512 seeded training images (8 batches of 64); selection: the next 10,000 "
            "training images of the same seeded permutation (the tables evaluate on the test set); agreement and KL",
            load_fashion_resnet(),
            list(xtr[idx[:512]].split(64)),
            xtr[idx[512:10512]],
            _agreement_kl,
            True,
        )
    if name == "minilm":
        from mpq.examples import text

        model, tokenizer = assets.load_minilm()
        sentences = text.calibration_sentences()
        calib_s, select_s = sentences[0::2], sentences[1::2]
        return Task(
            "minilm",
            "all-MiniLM-L6-v2 sentence embeddings (36 Linear layers)",
            f"calibration: calibration_sentences()[0::2] ({len(calib_s)} sentences); selection: "
            f"calibration_sentences()[1::2] ({len(select_s)}); the evaluation sentences are not used; cosine to FP32",
            model,
            text.calibration_batches(tokenizer, calib_s),
            text.tokenize(tokenizer, select_s),
            text.embedding_fidelity,
            False,
        )
    raise ValueError(f"unknown model {name!r}")


def _provenance() -> dict:
    """The commit, CPU model and torch version (``mpq.examples.demo``'s), and the tracked files under csrc/
    and python/ that differ from the commit at run time."""
    from mpq.examples.demo import _provenance as commit_and_cpu

    try:
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "csrc", "python"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        status = ""
    return {**commit_and_cpu(), "changed_files": [line[3:] for line in status.splitlines()]}


def _primary(r: dict) -> float:
    """The measure the rule ranks by, as "lower is better"."""
    return r["kl"] if "kl" in r else -r["cos_mean"]


def _ranks(values: dict[float, float]) -> dict[float, float]:
    """Rank 1 = lowest value; tied values share the mean of their ranks."""
    order = sorted(values, key=lambda d: values[d])
    ranks: dict[float, float] = {}
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for d in order[i : j + 1]:
            ranks[d] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def mean_ranks(rows: list[dict], models: list[str] | None = None) -> tuple[dict[str, dict[float, float]], int]:
    """Mean rank of each damp over the complete (model, setting) cells of ``rows`` (those that
    measured every damp): by the primary measure ("primary") and by output SQNR ("sqnr"), overall
    and per model ("primary:<model>"); and the number of cells."""
    cells: dict[tuple, dict[float, dict]] = {}
    for r in rows:
        if models is None or r["model"] in models:
            cells.setdefault((r["model"], r["setting"]), {})[r["point_damp"]] = r
    damps = sorted({d for c in cells.values() for d in c})
    cells = {k: c for k, c in cells.items() if sorted(c) == damps}
    out: dict[str, dict[float, float]] = {}
    for key, keyed in (("primary", _primary), ("sqnr", lambda r: -r["sqnr_db"])):
        per_cell = [(m, _ranks({d: keyed(c[d]) for d in damps})) for (m, _), c in cells.items()]
        for label, chosen in [(key, per_cell)] + (
            [(f"{key}:{m}", [x for x in per_cell if x[0] == m]) for m in dict.fromkeys(m for m, _ in per_cell)]
            if key == "primary"
            else []
        ):
            if chosen:
                out[label] = {d: sum(rk[d] for _, rk in chosen) / len(chosen) for d in damps}
    return out, len(cells)


def choose(ranks: dict[str, dict[float, float]]) -> float | None:
    if "primary" not in ranks:
        return None
    return min(ranks["primary"], key=lambda d: (ranks["primary"][d], ranks["sqnr"][d]))


def write_holdout(out_dir: Path, meta: dict, results: list[dict]) -> None:
    ranks, n_cells = mean_ranks(results)
    chosen = choose(ranks)
    default = mpq.MultipointConfig().point_damp
    in_sample: dict[str, dict[float, float]] = {}
    old = ROOT / "benchmarks" / "results" / "point_damp.json"  # the sweep on the evaluation data
    if old.exists():
        old_rows = json.loads(old.read_text())["rows"]
        in_sample, _ = mean_ranks(old_rows, sorted({r["model"] for r in results}))
    result = {
        "benchmark": "point_damp_holdout",
        **meta,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rule": RULE,
        "default_point_damp": default,
        "chosen_point_damp": chosen,
        "complete_cells": n_cells,
        "mean_ranks": {k: {str(d): v for d, v in m.items()} for k, m in ranks.items()},
        "in_sample_mean_ranks": {k: {str(d): v for d, v in m.items()} for k, m in in_sample.items()},
        "in_sample_chosen_point_damp": choose(in_sample),
        "rows": results,
    }
    (out_dir / "point_damp_holdout.json").write_text(json.dumps(result, indent=2) + "\n")

    damps = sorted({r["point_damp"] for r in results})
    md = [
        "# Multipoint `point_damp` chosen on held-out data",
        "",
        f"Written by `{meta['command']}` at commit `{meta['commit']}`"
        + (f" (with uncommitted changes to {', '.join(meta['changed_files'])})" if meta["changed_files"] else "")
        + f", CPU {meta['cpu']}, torch threads {meta['torch_num_threads']}, seed {meta['seed']}, torch "
        f"{meta['torch_version']}. mpq's default multipoint (greedy and GPTQ point sequences, avg_bits = w_bits + 0.5) "
        "at each `point_damp`, calibrated and measured on data that the README's and benchmarks/compare_methods.py's "
        "tables never evaluate on:",
        "",
    ] + ([meta["note"], ""] if meta.get("note") else [])
    for name in dict.fromkeys(r["model"] for r in results):
        md.append(f"- `{name}`: {meta['data'][name]}.")
    md += ["", f"Rule (fixed before the run): {RULE}", ""]
    if chosen is not None:
        line = (
            f"**Held-out choice: point_damp = {chosen}** (mean rank {ranks['primary'][chosen]:.2f} of {len(damps)} "
            f"over {n_cells} model x setting cells; the current default {default} has mean rank "
            f"{ranks['primary'][default]:.2f}"
            if default in ranks["primary"]
            else f"**Held-out choice: point_damp = {chosen}** (over {n_cells} cells"
        )
        line += (
            "). Per model, the damp with the best mean rank: "
            + ", ".join(
                f"{k.split(':', 1)[1]} {min(v, key=v.get)}" for k, v in ranks.items() if k.startswith("primary:")
            )
            + "."
        )
        if in_sample:
            line += (
                f" The same rule on the evaluation data of benchmarks/results/point_damp.json picks "
                f"{choose(in_sample)}."
            )
        line += " " + (
            "The held-out data confirm the default."
            if chosen == default
            else f"The held-out data pick another damp than the default {default}; the default is left "
            "unchanged here (the tables and tests use it)."
        )
        md += [line, ""]
        md += [
            "Mean rank of each damp (1 = best; primary measure, then output SQNR, then per model by the primary "
            "measure; `in-sample`: the same rule on point_damp.json, which measured on the evaluation data):",
            "",
            "| ranks | " + " | ".join(str(d) for d in damps) + " |",
            "|---|" + "---:|" * len(damps),
        ]
        for label, m in list(ranks.items()) + [
            (f"in-sample {k}", v) for k, v in in_sample.items() if k in ("primary", "sqnr")
        ]:
            md.append(f"| {label} | " + " | ".join(f"{m[d]:.2f}" if d in m else "–" for d in damps) + " |")
        md.append("")
    md += _table(
        results,
        [
            ("avg_bits", "avg bits", ".3f"),
            ("agreement", "agree", ".1%"),
            ("kl", "KL", ".4f"),
            ("cos_mean", "cos mean", ".5f"),
            ("cos_min", "cos min", ".5f"),
            ("sqnr_db", "SQNR dB", ".2f"),
            ("seconds", "quant s", ".0f"),
        ],
    )
    (out_dir / "point_damp_holdout.md").write_text("\n".join(md) + "\n")


RULE = (
    "in each (model, setting) cell rank the damps by the primary measure on the selection set (KL(FP32 || model), "
    "lower is better, for the classifiers; mean cosine to FP32, higher is better, for MiniLM), tied values sharing "
    "their mean rank; choose the damp with the lowest mean rank over all cells, a tie on that going to the better "
    "mean rank by output SQNR."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--settings", nargs="+", default=SETTINGS, choices=SETTINGS)
    parser.add_argument("--damps", nargs="+", type=float, default=DAMPS)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--note", default="", help="--holdout: a line about this run, written into the JSON and markdown"
    )
    parser.add_argument(
        "--holdout",
        action="store_true",
        help="calibrate and select on data the reported evaluation never uses; writes point_damp_holdout.*",
    )
    args = parser.parse_args()
    command = "python benchmarks/point_damp.py " + " ".join(sys.argv[1:])
    results: list[dict] = []
    omp = os.environ.get("OMP_NUM_THREADS")
    meta = {
        "command": (f"OMP_NUM_THREADS={omp} " if omp else "") + command.strip(),
        "note": args.note,
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "mpq_build": mpq.build_info(),
        "seed": args.seed,
        **_provenance(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": {},
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        task = load_holdout_task(name, args.seed) if args.holdout else load_task(name, args.seed)
        meta["data"][name] = task.data_note
        reference = _batched(task.model, task.eval_inputs)
        print(f"{task.title}: {task.data_note}", flush=True)
        for setting in args.settings:
            w_bits, a_bits = mpq.PRESETS[setting]
            for damp in args.damps:
                cfg = mpq.QuantConfig(
                    w_bits=w_bits, a_bits=a_bits, method=mpq.MultipointConfig(point_damp=damp), seed=args.seed
                )
                t0 = time.perf_counter()
                qmodel = mpq.quantize(task.model, task.calib, cfg)
                seconds = time.perf_counter() - t0
                out = _batched(qmodel, task.eval_inputs)
                r = {
                    "model": name,
                    "setting": setting,
                    "point_damp": damp,
                    "avg_bits": mpq.last_report(qmodel).avg_bits,
                    **task.quality(out, reference),
                    "sqnr_db": output_sqnr_db(out, reference),
                    "seconds": seconds,
                }
                results.append(r)
                quality = "  ".join(f"{k} {r[k]:.5f}" for k in ("top1", "agreement", "kl", "cos_mean") if k in r)
                print(
                    f"  {setting:<6} point_damp {damp:<5} {quality}  SQNR {r['sqnr_db']:.2f} dB  {seconds:.0f} s",
                    flush=True,
                )
                if args.holdout:
                    write_holdout(args.out_dir, meta, results)
                else:
                    write(args.out_dir, command, args.seed, results)
    if args.holdout:
        ranks, _ = mean_ranks(results)
        print(
            f"mean rank by the primary measure: {ranks.get('primary')}; chosen point_damp {choose(ranks)}", flush=True
        )


if __name__ == "__main__":
    main()
