"""python -m mpq: quantize -> eval end to end on the offline photos, sweep, --help, and one-line
errors with exit status 2 for a user's mistakes; examples/imagenet/eval.py on the tiny set."""

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mpq
from mpq import cli
from mpq.examples import assets

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_intraop_thread")


def _env():
    env = dict(os.environ)
    # NB: one thread per child: on a busy 2-core machine OpenMP's spinning threads slow small ops ~10x.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_mpq(*args, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "mpq", *args], capture_output=True, text=True, env=_env(), timeout=timeout, cwd=ROOT
    )


@pytest.fixture(scope="module")
def folders(photo_folders):
    return photo_folders


@pytest.fixture(scope="module")
def quantized_file(folders):
    out = folders / "effnet.mpq.safetensors"
    plot = folders / "alloc.png"
    r = run_mpq(
        "quantize",
        "--model",
        "efficientnet_lite0",
        "--calib",
        str(folders / "calib"),
        "--calib-images",
        "8",
        "--config",
        "W4A8",
        "--avg-bits",
        "4.5",
        "--seed",
        "3",
        "--workers",
        "0",
        "--out",
        str(out),
        "--plot",
        str(plot),
    )
    assert r.returncode == 0, r.stderr
    return out, plot, r


def test_quantize_writes_a_loadable_model_and_plot(quantized_file):
    out, plot, r = quantized_file
    assert re.search(r"quantized efficientnet_lite0: 50 layers, 4\.\d+ bits per weight", r.stdout)
    meta = mpq.io.read_metadata(out)
    assert meta["architecture"] == "efficientnet_lite0"
    assert meta["seed"] == 3 and meta["config"]["avg_bits"] == 4.5 and meta["config"]["method"] == "multipoint"
    assert meta["config"]["calib_batches"] == 1  # 8 images in batches of 32
    assert abs(mpq.plots.plot_allocation(mpq.load(out), plot.with_name("again.png"))["avg_bits"] - 4.5) < 0.01
    assert plot.stat().st_size > 20_000
    assert "Traceback" not in r.stderr


def test_eval_prints_the_top1_python_computes(quantized_file, folders):
    out, _, _ = quantized_file
    r = run_mpq("eval", "--model", str(out), "--data", str(folders / "val"), "--class-map", "index", "--workers", "0")
    assert r.returncode == 0, r.stderr
    m = re.search(r"top-1 (\d+\.\d\d)% \((\d+)/(\d+)\)\s+top-5 (\d+\.\d\d)% \((\d+)/(\d+)\)", r.stdout)
    assert m, r.stdout
    # the same model and photos, computed here without the CLI
    photos = assets.labelled_imagenet_photos()
    x = assets.load_images([p for p, _ in photos], assets.efficientnet_lite_transform())
    y = torch.tensor([label for _, label in photos])
    with torch.no_grad():
        logits = mpq.load(out)(x)
    correct1 = int((logits.argmax(1) == y).sum())
    correct5 = int((logits.topk(5, 1).indices == y[:, None]).any(1).sum())
    assert (int(m.group(2)), int(m.group(3))) == (correct1, 20)
    assert m.group(1) == f"{100 * correct1 / 20:.2f}"
    assert (int(m.group(5)), m.group(4)) == (correct5, f"{100 * correct5 / 20:.2f}")
    assert correct1 >= 14  # the quantized EfficientNet-Lite0 still recognises most photos (FP32: 17/20)


def test_eval_with_quantized_into_an_architecture(quantized_file, folders, capsys):
    out, _, _ = quantized_file
    args = [
        "eval",
        "--model",
        "efficientnet_lite0",
        "--quantized",
        str(out),
        "--data",
        str(folders / "val"),
        "--class-map",
        "index",
        "--workers",
        "0",
        "--quiet",
        "--json",
        str(folders / "eval.json"),
    ]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    record = json.loads((folders / "eval.json").read_text())
    assert f"top-1 {100 * record['top1']:.2f}% ({record['correct1']}/20)" in printed
    assert record["versions"]["torch"] == torch.__version__


def test_sweep_prints_a_table_and_plots(folders, tmp_path, capsys):
    plot, js = tmp_path / "sweep.png", tmp_path / "sweep.json"
    args = [
        "sweep",
        "--model",
        "efficientnet_lite0",
        "--calib",
        str(folders / "calib"),
        "--calib-images",
        "4",
        "--data",
        str(folders / "val"),
        "--class-map",
        "index",
        "--avg-bits",
        "5",
        "--methods",
        "rtn,multipoint",
        "--workers",
        "0",
        "--quiet",
        "--plot",
        str(plot),
        "--json",
        str(js),
    ]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    rows = json.loads(js.read_text())["rows"]
    assert [r["name"] for r in rows] == ["FP32", "rtn", "multipoint 5"]
    for r in rows:
        assert re.search(rf"^{re.escape(r['name'])}\s+{r['avg_bits']:.3f}\s", printed, re.M)
    assert rows[0]["correct1"] == 17  # FP32 EfficientNet-Lite0 on the 20 labelled photos
    assert abs(rows[2]["avg_bits"] - 5) < 0.01
    assert rows[2]["agreement"] > rows[1]["agreement"]  # multipoint at 5 bits is closer to FP32 than RTN
    w, h = struct.unpack(">II", plot.read_bytes()[16:24])
    assert 800 <= w <= 3000 and 300 <= h <= 1500 and plot.stat().st_size > 20_000


def test_help_texts(capsys):
    r = run_mpq("--help")
    assert r.returncode == 0
    for command in ("quantize", "eval", "sweep", "export", "demo", "info"):
        assert command in r.stdout
    for command, words in (
        ("quantize", ["--calib", "--calib-images", "W4A8", "--avg-bits", "--out"]),
        ("eval", ["--data", "--quantized", "top-1", "--class-map"]),
        ("sweep", ["--avg-bits", "--methods", "--plot"]),
        ("export", ["--format", "onnx", "openvino", "--out", "--image-size"]),
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            cli.main([command, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        for word in words:
            assert word in text, (command, word)


def test_info_and_demo_subcommands_are_kept():
    r = run_mpq("info")
    assert r.returncode == 0 and json.loads(r.stdout)["mpq_version"] == mpq.__version__
    parser = cli.build_parser()
    args = parser.parse_args(["demo", "--json", "x.json", "--seed", "2"])
    assert (args.command, args.json, args.seed) == ("demo", "x.json", 2)


def _one_line_error(r, pattern):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert re.search(pattern, lines[0]), lines[0]


def test_user_mistakes_subprocess(folders, tmp_path):
    _one_line_error(
        run_mpq(
            "quantize",
            "--model",
            "efficientnet_lite0",
            "--calib",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "q.mpq"),
        ),
        r"^mpq quantize: calibration folder .*nope does not exist$",
    )
    _one_line_error(
        run_mpq("eval", "--model", "resnet_9000", "--data", str(folders / "val")),
        r"^mpq eval: unknown model 'resnet_9000': expected torchvision:<name>",
    )
    _one_line_error(
        run_mpq("quantize", "--model", "efficientnet_lite0"), r"^python -m mpq quantize: .*required.*--help"
    )


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (
            ["quantize", "--model", "efficientnet_lite0", "--calib", "{calib}", "--config", "W5A3", "--out", "{tmp}/q"],
            r"unknown config 'W5A3': expected a preset",
        ),
        (
            ["quantize", "--model", "efficientnet_lite0", "--calib", "{calib}", "--avg-bits", "2", "--out", "{tmp}/q"],
            r"mpq.QuantConfig: expected avg_bits to lie between",
        ),
        (
            [
                "quantize",
                "--model",
                "efficientnet_lite0",
                "--calib",
                "{calib}",
                "--method",
                "magic",
                "--out",
                "{tmp}/q",
            ],
            r"expected method to be one of",
        ),
        (
            ["quantize", "--model", "torchvision:not_a_net", "--calib", "{calib}", "--out", "{tmp}/q"],
            r"unknown torchvision model 'not_a_net'",
        ),
        (
            ["quantize", "--model", "efficientnet_lite0", "--calib", "{tmp}/empty", "--out", "{tmp}/q"],
            r"calibration folder .*empty holds no images",
        ),
        (
            ["quantize", "--model", "efficientnet_lite0", "--calib", "{calib}", "--out", "{tmp}/missing/q"],
            r"--out .*the folder .*missing does not exist",
        ),
        (
            ["quantize", "--model", "efficientnet_lite0", "--calib", "{tmp}/bad_images", "--out", "{tmp}/q"],
            r"cannot read image .*broken\.jpg",
        ),
        (
            [
                "quantize",
                "--model",
                "efficientnet_lite0",
                "--calib",
                "{calib}",
                "--config",
                "{tmp}/bad.json",
                "--out",
                "{tmp}/q",
            ],
            r"config file .*bad.json is not valid JSON",
        ),
        (
            ["eval", "--model", "{tmp}/garbage.mpq.safetensors", "--data", "{val}"],
            r"mpq eval: mpq.load: .*garbage.mpq.safetensors: .*(not an mpq file|truncated)",
        ),
        (
            [
                "eval",
                "--model",
                "efficientnet_lite0",
                "--quantized",
                "{tmp}/garbage.mpq.safetensors",
                "--data",
                "{val}",
            ],
            r"mpq.load: .*garbage",
        ),
        (["eval", "--model", "efficientnet_lite0", "--data", "{calib}"], r"data folder .*has no class folders"),
        (
            ["eval", "--model", "efficientnet_lite0", "--data", "{val}", "--class-map", "{tmp}/nomap.json"],
            r"--class-map: cannot read .*nomap.json",
        ),
        (
            ["sweep", "--model", "efficientnet_lite0", "--calib", "{calib}", "--data", "{val}", "--avg-bits", "4,x"],
            r"--avg-bits: expected comma-separated numbers",
        ),
        (
            [
                "sweep",
                "--model",
                "efficientnet_lite0",
                "--calib",
                "{calib}",
                "--data",
                "{val}",
                "--methods",
                "rtn,nope",
            ],
            r"--methods: unknown method 'nope'",
        ),
    ],
)
def test_user_mistakes_one_line_exit_2(folders, tmp_path, capsys, argv, pattern):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad_images").mkdir()
    (tmp_path / "bad_images" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "bad.json").write_text("{w_bits: 4")
    (tmp_path / "garbage.mpq.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    subst = {"calib": str(folders / "calib"), "val": str(folders / "val"), "tmp": str(tmp_path)}
    argv = [a.format(**subst) for a in argv] + ["--workers", "0", "--quiet"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"mpq {argv[0]}: ") and re.search(pattern, err[0]), err[0]


def test_imagenet_example_on_the_tiny_set(folders, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("imagenet_eval", ROOT / "examples" / "imagenet" / "eval.py")
    imagenet_eval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(imagenet_eval)
    out = tmp_path / "imagenet.json"
    argv = [
        "--model",
        "efficientnet_lite0",
        "--data",
        str(folders / "val"),
        "--calib",
        str(folders / "calib"),
        "--calib-images",
        "4",
        "--configs",
        "W4A8",
        "--methods",
        "rtn,multipoint",
        "--class-map",
        "index",
        "--workers",
        "0",
        "--quiet",
        "--json",
        str(out),
    ]
    assert imagenet_eval.main(argv) == 0
    record = json.loads(out.read_text())
    names = [r["name"] for r in record["results"]]
    assert names == ["FP32", "rtn W4A8", "multipoint W4A8"]
    fp32, rtn, mp = record["results"]
    assert fp32["correct1"] == 17 and fp32["images"] == 20
    assert mp["top1"] > rtn["top1"]  # on these photos RTN W4A8 collapses, multipoint does not
    assert record["calibration"]["images"] == 4 and record["seed"] == 0
    assert record["versions"]["mpq"] == mpq.__version__ and record["seconds"]["total"] > 0
    assert record["results"][2]["config"]["method"] == "multipoint"
    assert "FP32" in capsys.readouterr().out
