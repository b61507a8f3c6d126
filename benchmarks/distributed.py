"""Calibration + fit + evaluation of EfficientNet-Lite0 on 1 process against N gloo processes
(``mpq.distributed``), on one machine, with the same cores: 1 process x N threads against N
processes x 1 thread.

    python benchmarks/distributed.py                       # 1 vs 2 processes (2 cores here)
    python benchmarks/distributed.py --procs 2 --calib-images 64 --eval-repeat 4

Data: the demo's calibration crops (``--calib-images`` of the bundled unlabelled photos, batches
of 16) and, for the evaluation, the 40 bundled photos (the 20 labelled ImageNet photos and the 20
unlabelled ones) repeated ``--eval-repeat`` times in batches of 16, split by batch over the ranks.
Timed per rank (the wall time of the slowest rank counts): ``mpq.quantize``'s stages
(``QuantReport.seconds``: calibrate, sensitivity, fit, allocate, the rest: refit and swap, then
verify) and the evaluation. Both runs must give the same quantized state: the script checks the
digests and reports whether they are equal. Writes ``benchmarks/results/distributed_lite0.json``.
"""

import argparse
import datetime
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from provenance import provenance  # benchmarks/ (this script's folder) is on sys.path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["calibrate", "sensitivity", "fit", "allocate", "refit_swap", "verify", "quantize_total", "eval"]


def worker(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    import torch.distributed as dist

    import mpq
    from mpq.examples import assets
    from mpq.examples.demo import load_demo_data

    if args.world > 1:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{args.port}",
            rank=args.rank,
            world_size=args.world,
            timeout=datetime.timedelta(seconds=600),
        )
    model = assets.load_efficientnet_lite0()
    data = load_demo_data(calib_images=args.calib_images, batch_size=16, seed=args.seed)
    calib = list(mpq.distributed.shard(data.calib_batches))
    evaluation = list(mpq.distributed.shard(list(data.eval_images.repeat(args.eval_repeat, 1, 1, 1).split(16))))
    if args.world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    q = mpq.quantize(model, calib, mpq.QuantConfig.preset("W4A8", seed=args.seed))
    total = time.perf_counter() - t0
    s = mpq.last_report(q).seconds
    t1 = time.perf_counter()
    with torch.no_grad():
        preds = [q(x).argmax(1) for x in evaluation]
    seconds = {k: s.get(k, 0.0) for k in ("calibrate", "sensitivity", "fit", "allocate", "verify")}
    seconds["refit_swap"] = s["total"] - sum(s.get(k, 0.0) for k in s if k != "total")
    seconds["quantize_total"] = total
    seconds["eval"] = time.perf_counter() - t1
    digest = hashlib.sha256()
    for name, t in sorted(q.state_dict().items()):
        digest.update(name.encode() + t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    images = sum(int(p.numel()) for p in preds)
    out = {"rank": args.rank, "seconds": seconds, "digest": digest.hexdigest()[:16], "eval_images": images}
    Path(args.out).with_suffix(f".rank{args.rank}.json").write_text(json.dumps(out))
    if args.world > 1:
        dist.destroy_process_group()
    return 0


def run(world: int, threads: int, args) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    stem = ROOT / "benchmarks" / "results" / f".distributed_w{world}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", "--rank", str(r), "--world", str(world), "--port", str(port)]
            + ["--threads", str(threads), "--out", str(stem), "--calib-images", str(args.calib_images)]
            + ["--eval-repeat", str(args.eval_repeat), "--seed", str(args.seed)],
            env=env,
        )
        for r in range(world)
    ]
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - t0
    if any(codes):
        raise SystemExit(f"benchmarks/distributed.py: a worker of the {world}-process run failed: {codes}")
    ranks = []
    for r in range(world):
        f = stem.with_suffix(f".rank{r}.json")
        ranks.append(json.loads(f.read_text()))
        f.unlink()
    slowest = {k: max(x["seconds"][k] for x in ranks) for k in STAGES}
    return {
        "processes": world,
        "threads_per_process": threads,
        "seconds": slowest,
        "per_rank": ranks,
        "wall_seconds_with_startup": wall,
        "eval_images": sum(x["eval_images"] for x in ranks),
        "digest": ranks[0]["digest"],
        "same_state_on_every_rank": len({x["digest"] for x in ranks}) == 1,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, default=2, help="processes of the distributed run (default 2)")
    p.add_argument("--calib-images", type=int, default=64)
    p.add_argument("--eval-repeat", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "distributed_lite0.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--rank", "--world", "--port", "--threads"):
        p.add_argument(name, type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    one = run(1, args.procs, args)
    many = run(args.procs, 1, args)
    print(
        f"{'stage':<16}{'1 x ' + str(args.procs) + ' threads':>18}{str(args.procs) + ' x 1 thread':>18}{'speed-up':>10}"
    )
    for k in STAGES:
        a, b = one["seconds"][k], many["seconds"][k]
        print(f"{k:<16}{a:>17.2f}s{b:>17.2f}s{a / max(b, 1e-9):>9.2f}x")
    end_to_end = (one["seconds"]["quantize_total"] + one["seconds"]["eval"]) / (
        many["seconds"]["quantize_total"] + many["seconds"]["eval"]
    )
    same = one["digest"] == many["digest"] and many["same_state_on_every_rank"]
    print(f"quantize + eval: {end_to_end:.2f}x; same quantized state as one process: {same}")
    result = {
        "command": "python benchmarks/distributed.py " + " ".join(sys.argv[1:]),
        "model": "EfficientNet-Lite0, W4A8 preset",
        "calib_images": args.calib_images,
        "eval_images": one["eval_images"],
        "seed": args.seed,
        "runs": [one, many],
        "speedup_quantize_plus_eval": end_to_end,
        "same_quantized_state": same,
        **provenance(),
    }
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
