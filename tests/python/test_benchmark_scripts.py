"""benchmarks/kernels.py and benchmarks/fit_speed.py, run as a user runs them, on the CPU.

Their GPU runs are rare (one session with an H100 runs them once), so the Python of every section
is exercised here: ``kernels.py --check-on-cpu`` runs the linear, conv and resnet50 sections at tiny
sizes with the CPU kernels and checks every output; ``fit_speed.py --check-on-cpu`` runs the
``--device cuda`` code on the CPU; ``fit_speed.py --layers 10`` is the CPU benchmark's smoke run.
``gpu_check.sh --dry-run`` (the one command of a GPU session) runs its steps' CPU stand-ins and
writes its summary; its time boxes kill a step that outlives its box and skip steps once the
budget is spent.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def run_script(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # NB: one thread per child: on a busy 2-core machine OpenMP's spinning threads slow small ops ~10x.
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )


def output_of(r: subprocess.CompletedProcess) -> str:
    return f"exit {r.returncode}\nstdout (end):\n{r.stdout[-4000:]}\nstderr (end):\n{r.stderr[-4000:]}"


def test_kernels_check_on_cpu_runs_every_section(tmp_path):
    out = tmp_path / "kernels.json"
    r = run_script("kernels.py", "--check-on-cpu", "--json", str(out))
    assert r.returncode == 0, output_of(r)
    assert "--check-on-cpu: every check passed" in r.stdout
    doc = json.loads(out.read_text())
    assert doc["check_on_cpu"] is True
    assert doc["sections"] == ["linear", "conv", "resnet50"]
    assert doc["failed"] == [] and doc["linear_error"] is None
    half = doc["dtype"] == "float16"

    # linear: the format of the GPU run (top-level results), every variant that ran checked ok
    ran = [row for row in doc["results"] if "skipped" not in row]
    assert ran and all(row.get("check") == "ok" for row in ran), ran
    assert all(row["rel_err"] <= 5e-3 and row["ms"] > 0 for row in ran)
    expected = {"cublas_fp16", "mpq_dense", "mpq_int8", "mpq_auto"} | ({"mpq_gemv", "mpq_mma"} if half else set())
    assert {row["variant"] for row in ran} == expected
    skipped = {row["variant"] for row in doc["results"] if "skipped" in row}
    assert skipped >= {"tinygemm_int4", "expanded", "int8_cublaslt"}

    # conv: ResNet-50's 23 distinct convolutions (53 in all), every variant checked ok
    conv = doc["conv"]
    assert "error" not in conv, conv.get("error")
    assert len(conv["shapes"]) == 23 and sum(s["count"] for s in conv["shapes"]) == 53
    ran = [row for row in conv["results"] if "skipped" not in row]
    assert all(row.get("check") == "ok" for row in ran), [row for row in ran if row.get("check") != "ok"]
    expected = {"cudnn_fp16", "mpq_dense", "mpq_int8", "mpq_auto"} | ({"mpq_igemm"} if half else set())
    assert {row["variant"] for row in ran} == expected
    assert len(ran) == 23 * len(expected) - 1  # no int8 on the 3-channel stem
    assert {row["variant"] for row in conv["results"] if "skipped" in row} == {"mpq_int8", "int8_cudnn"}
    assert [row["shape"] for row in conv["results"] if row["variant"] == "mpq_int8" and "skipped" in row] == [
        "7x7 3->64 32x32 s2"
    ]
    sums = {row["variant"]: row for row in conv["network"]}
    assert set(sums) == expected and sums["mpq_int8"]["missing"] == ["7x7 3->64 32x32 s2"]
    assert all(row["ms"] > 0 and row["vs_cudnn"] > 0 for row in sums.values())

    # resnet50: a real mpq model (54 layers at 4.5 bits per weight), checked whole and layer by layer
    res = doc["resnet50"]
    assert "error" not in res, res.get("error")
    q = res["quantization"]
    assert q["layers"] == 54 and q["float_layers"] == [] and abs(q["avg_bits"] - 4.5) < 0.05
    assert (
        q["seconds_wall"] > 0 and q["report_seconds"]["total"] > 0 and q["simulation_check"]["max_layer_ratio"] <= 1.0
    )
    assert q["avg_points_per_channel"] > 1.0
    for check in res["checks"]:
        assert check["check"] == "ok" and len(check["layer_rel_err"]) == 54, check
        assert check["layer_rel_err_max"] <= 5e-3 and check["rel_err"] <= 0.1 and check["top1_agreement"] >= 0
    eager = [row for row in res["results"] if row["mode"] == "eager"]
    assert {row["model"] for row in eager} == {"fp16_cudnn", "fp16_cudnn_folded", "mpq_w4a8"}
    assert all(row["ms"] > 0 and row["images_per_s"] > 0 and row["vs_fp16"] > 0 for row in eager)
    # ratios against the baseline with BatchNorm folded, as the mpq model has it
    assert res["baseline"] == "fp16_cudnn_folded"
    assert all(row["vs_fp16"] == 1.0 for row in eager if row["model"] == "fp16_cudnn_folded")
    assert all("skipped" in row for row in res["results"] if row["mode"] == "cuda_graph")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit; a GPU is present")
def test_kernels_without_a_gpu_exits_2():
    r = run_script("kernels.py", "--section", "linear", "--json", "")
    assert r.returncode == 2, output_of(r)
    assert "no GPU" in r.stderr


def test_fit_speed_smoke_run(tmp_path):
    out = tmp_path / "fit.json"
    r = run_script("fit_speed.py", "--runs", "1", "--skip-exact", "--layers", "10", "--out", str(out))
    assert r.returncode == 0, output_of(r)
    doc = json.loads(out.read_text())
    assert doc["device"] == "cpu" and doc["layers"] == 10 and doc["layers_subset"] is True
    assert doc["fast"]["median_s"] > 0 and doc["exact"] is None and doc["meets_target"] is None


def test_fit_speed_device_code_on_cpu(tmp_path):
    out = tmp_path / "fit_device.json"
    r = run_script("fit_speed.py", "--check-on-cpu", "--runs", "1", "--out", str(out))
    assert r.returncode == 0, output_of(r)
    doc = json.loads(out.read_text())
    assert doc["device"] == "cpu (--check-on-cpu)" and doc["layers"] == 10
    assert doc["agreement"]["check"] == "ok" and doc["agreement"]["codes_equal_fraction"] == 1.0
    fast = doc["fast"]
    assert fast["median_s"] > 0 and 0 < fast["kernel_s"] <= fast["median_s"] * 1.01
    assert doc["exact"]["s"] > 0 and doc["allocation"]["s"] >= 0 and abs(doc["allocation"]["avg_bits"] - 4.5) < 0.05
    assert doc["speedup_vs_cpu_same_machine"] > 0 and doc["comparison"]
    assert doc["meets_target"] is None  # part of the model: no verdict


# ---- benchmarks/gpu_check.sh: the one command of a GPU session, dry run ----------------------------

GPU_CHECK_STEPS = ["build", "pytest", "ctest", "memcheck", "racecheck", "kernels", "fit_speed"]


def run_gpu_check(out: Path, **env_extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env_extra}
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=ROOT,
    )


def gpu_check_summary(out: Path) -> dict:
    """summary.json, after checking OUTDIR's limits: at most 8 plain files with flat, plain names,
    each under 16 MB, all listed in the summary."""
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    for name in files:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", name) and (out / name).is_file(), name
        assert (out / name).stat().st_size < 16 * 2**20, name
    doc = json.loads((out / "summary.json").read_text())
    assert doc["files"] == files
    assert [s["name"] for s in doc["steps"]] == GPU_CHECK_STEPS
    return doc


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu"
    r = run_gpu_check(out)
    assert r.returncode == 0, output_of(r)
    doc = gpu_check_summary(out)
    assert doc["dry_run"] is True and doc["budget_s"] == 540 and doc["elapsed_s"] < 120
    steps = {s["name"]: s for s in doc["steps"]}
    # no GPU step ran for real: each is skipped with its reason, after its CPU stand-in passed
    assert all(s["status"] == "skipped" and s["reason"] for s in steps.values()), steps
    assert steps["build"]["reason"].startswith("dry run: no build")
    for name in GPU_CHECK_STEPS[1:]:
        if name == "ctest" and "no build tree" in steps[name]["reason"]:
            continue  # no C++ build tree on this machine: nothing to list
        assert steps[name]["reason"].startswith("dry run: ") and "(stand-in ok, exit 0)" in steps[name]["reason"]
        assert 0 < steps[name]["limit_s"] <= 540 and steps[name]["seconds"] <= steps[name]["limit_s"]
    assert [steps[n]["box_s"] for n in GPU_CHECK_STEPS] == [180, 100, 60, 40, 40, "rest of the budget", 45]
    assert {
        "build.log",
        "pytest.log",
        "ctest.log",
        "sanitize.log",
        "bench.log",
        "kernels.json",
        "fit_speed.json",
    } <= set(doc["files"])
    assert "0 of 16 calls failed on cpu" in (out / "sanitize.log").read_text()
    assert json.loads((out / "kernels.json").read_text())["check_on_cpu"] is True
    assert json.loads((out / "fit_speed.json").read_text())["agreement"]["check"] == "ok"


def test_gpu_check_time_boxes(tmp_path):
    # a step that outlives its box is killed and reported, and the script fails
    r = run_gpu_check(tmp_path / "box", MPQ_GPU_CHECK_ONLY="pytest", MPQ_GPU_CHECK_BOX_pytest="1")
    assert r.returncode == 1, output_of(r)
    steps = {s["name"]: s for s in gpu_check_summary(tmp_path / "box")["steps"]}
    assert "(stand-in timeout, exit 124)" in steps["pytest"]["reason"] and steps["pytest"]["limit_s"] == 1
    assert all(steps[n]["reason"].startswith("not selected") for n in GPU_CHECK_STEPS[2:])
    # with the budget spent, every later step is skipped and says why; the summary is still written
    r = run_gpu_check(tmp_path / "late", MPQ_GPU_CHECK_BUDGET="1")
    assert r.returncode == 0, output_of(r)
    steps = gpu_check_summary(tmp_path / "late")["steps"]
    assert all(s["status"] == "skipped" and s["reason"].startswith("not enough time") for s in steps[1:]), steps


def test_point_damp_holdout_smoke_run(tmp_path):
    # issue 12, section 3: the held-out sweep (Fashion-MNIST only: its calibration and selection images
    # come from the training set, the tables evaluate on the test set) writes its tables and its choice
    r = run_script(
        "point_damp.py",
        "--holdout",
        "--models",
        "fashion",
        "--settings",
        "W4A16",
        "--damps",
        "0.03",
        "0.1",
        "--out-dir",
        str(tmp_path),
    )
    assert r.returncode == 0, output_of(r)
    doc = json.loads((tmp_path / "point_damp_holdout.json").read_text())
    assert [(x["model"], x["setting"], x["point_damp"]) for x in doc["rows"]] == [
        ("fashion", "W4A16", 0.03),
        ("fashion", "W4A16", 0.1),
    ]
    assert doc["complete_cells"] == 1 and doc["chosen_point_damp"] in (0.03, 0.1) and doc["default_point_damp"] == 0.1
    assert doc["commit"] and doc["cpu"] and doc["seed"] == 0 and "next 10,000 training images" in doc["data"]["fashion"]
    ranks = doc["mean_ranks"]["primary"]
    assert sorted(ranks.values()) == [1.0, 2.0] or sorted(ranks.values()) == [1.5, 1.5]
    md = (tmp_path / "point_damp_holdout.md").read_text()
    assert f"Held-out choice: point_damp = {doc['chosen_point_damp']}" in md and "Rule (fixed before the run)" in md


def test_peers_count_bits_as_mpq_does_and_refuse_convolutions():
    """benchmarks/peers.py (the external libraries' rows): bits over every Conv2d / Linear weight,
    codes plus each group's scale (and zero point), a last shorter group counted whole; a model
    with convolutions gets the reason instead of a Linear-only row."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import peers

    lin = torch.nn.Sequential(torch.nn.Linear(256, 8), torch.nn.ReLU(), torch.nn.Linear(8, 100))
    # weights [8, 256]: two groups of 128 per row; [100, 8]: one (short) group per row
    expected = (8 * (256 * 4 + 2 * 24) + 100 * (8 * 4 + 24)) / (8 * 256 + 100 * 8)
    assert peers._group_bits(lin, 128, 16 + 8) == pytest.approx(expected, rel=1e-15)
    assert peers._group_bits(lin, 128, 16, code_bits=3) == pytest.approx(
        (8 * (256 * 3 + 2 * 16) + 100 * (8 * 3 + 16)) / (8 * 256 + 100 * 8), rel=1e-15
    )
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10))
    for name, peer in peers.PEERS[4].items():
        if "W8A8" in name:  # nncf.quantize takes convolutions
            continue
        with pytest.raises(
            peers.PeerUnavailable, match=r"Linear layers only: the convolutions \(\d+% of the weights\)"
        ):
            peer.run(cnn, [torch.randn(2, 3, 6, 6)])
