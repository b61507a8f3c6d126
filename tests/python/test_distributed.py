"""mpq across processes (``mpq.distributed``): 2 and 3 gloo ranks on localhost against one
process, bit for bit; a rank that dies or runs another job stops the others with a clear error;
``torchrun -m mpq`` quantizes and evaluates with every image counted once; and the pieces
(exact sums, merged samples, the work split) against their definitions."""

import json
import math
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mpq
from mpq.calibrate import Reservoir
from mpq.distributed import ExactSum, batch_generator, shard, split_work

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("distributed_worker.py")
sys.path.insert(0, str(Path(__file__).with_name("golden")))
from quantized_state import FASHION_CASES  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # 2 cores, up to 3 ranks
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), env.get("PYTHONPATH", "")])
    return env


def _ranks(world: int, out: Path, cases: str, extra: dict[int, list[str]] | None = None, timeout: float = 60):
    """Start ``world`` worker processes (one without a process group for world 1); returns
    (return codes, stderr texts, seconds)."""
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "--rank", str(r), "--world", str(world), "--port", str(port)]
            + ["--out", str(out), "--cases", cases, "--timeout", str(timeout)]
            + (extra or {}).get(r, []),
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=ROOT,
        )
        for r in range(world)
    ]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    return [p.returncode for p in procs], errs, time.perf_counter() - t0


def test_quantized_state_does_not_depend_on_the_number_of_ranks(tmp_path):
    """Every golden Fashion-MNIST case (each method, bias correction, BatchNorm re-estimation, ILP
    bits, codebooks, float or 8-bit ends), plus the sampled-rows path and the Gaussian Fisher: the
    state quantized by 2 and by 3 ranks (4 calibration batches: 2 + 2 and 2 + 1 + 1) equals the
    single process's bit for bit, on every rank. Statistics are exact sums and key-ordered
    samples of the same per-batch draws, so no bound is needed (measured: 0 tensors differ)."""
    cases = ";".join(list(FASHION_CASES) + ['extra:{"calib_samples": 256, "sensitivity": "fisher_gaussian"}'])
    digests = {}
    for world in (1, 2, 3):
        codes, errs, _ = _ranks(world, tmp_path / f"w{world}", cases)
        assert codes == [0] * world, errs
        digests[world] = [json.loads((tmp_path / f"w{world}" / f"rank{r}.json").read_text()) for r in range(world)]
    reference = digests[1][0]
    assert len(reference) == len(FASHION_CASES) + 1
    for world in (2, 3):
        for r in range(world):
            for case, tensors in reference.items():
                changed = sorted(k for k in tensors if digests[world][r][case].get(k) != tensors[k])
                assert not changed, (world, r, case, changed[:5])


def test_a_rank_that_dies_stops_the_others_with_a_clear_error(tmp_path):
    codes, errs, seconds = _ranks(2, tmp_path, "rtn_w4a8_mse_float_ends", extra={1: ["--die"]}, timeout=30)
    assert codes[1] == 3
    assert codes[0] != 0
    assert "mpq.distributed:" in errs[0] and "failed on rank 0 of 2" in errs[0], errs[0][-2000:]
    assert seconds < 200  # the process group's timeout is 30 s: no hang
    assert not (tmp_path / "rank0.json").exists()


def test_a_rank_with_another_config_is_named(tmp_path):
    codes, errs, _ = _ranks(2, tmp_path, "rtn_w4a8_mse_float_ends", extra={1: ["--other-seed"]})
    assert codes == [1, 1]
    for e in errs:
        assert "ranks [1] of 2 hold a different model or config than rank 0" in e, e[-2000:]


def _mpq(*args: str, nproc: int = 1, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m mpq ARGS``, under ``torchrun --nproc-per-node NPROC`` when nproc > 1."""
    launcher = ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-port", str(_free_port())]
    return subprocess.run(
        [sys.executable, *(launcher if nproc > 1 else []), "-m", "mpq", *args],
        capture_output=True,
        text=True,
        env=env or _env(),
        cwd=ROOT,
        timeout=600,
    )


def test_torchrun_quantize_and_eval_match_one_process(photo_folders, tmp_path):
    """``torchrun --nproc-per-node 2 -m mpq quantize`` writes the file one process writes (the
    same bytes), once; ``eval`` on 2 ranks counts every one of the 20 images once (7 batches of
    3: 4 + 3), with the single process's top-1 / top-5."""
    common = ["--model", "efficientnet_lite0", "--calib", str(photo_folders / "calib"), "--calib-images", "8"]
    common += ["--batch-size", "2", "--config", "W4A8", "--workers", "0", "-q"]
    one = _mpq("quantize", *common, "--out", str(tmp_path / "one.mpq"))
    assert one.returncode == 0, one.stderr
    two = _mpq("quantize", *common, "--out", str(tmp_path / "two.mpq"), nproc=2)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("saved ") == 1  # rank 0 alone prints and writes
    assert (tmp_path / "one.mpq").read_bytes() == (tmp_path / "two.mpq").read_bytes()

    ev = ["eval", "--model", "efficientnet_lite0", "--data", str(photo_folders / "val"), "--class-map", "index"]
    ev += ["--quantized", str(tmp_path / "two.mpq"), "--batch-size", "3", "--workers", "0", "-q"]
    alone = _mpq(*ev, "--json", str(tmp_path / "one.json"))
    assert alone.returncode == 0, alone.stderr
    pair = _mpq(*ev, "--json", str(tmp_path / "two.json"), nproc=2)
    assert pair.returncode == 0, pair.stderr
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert b["images"] == 20
    assert (a["correct1"], a["correct5"], a["images"]) == (b["correct1"], b["correct5"], b["images"])
    assert pair.stdout.count("top-1") == 1


# ---- the pieces ----------------------------------------------------------------------------------


def test_exact_sum_does_not_depend_on_order_or_split():
    """Terms of mixed magnitudes (where plain float64 sums depend on the order): the sum of every
    permutation and every split into ranks equals math.fsum, the correctly rounded exact sum."""
    g = torch.Generator().manual_seed(0)
    terms = [
        (torch.randn(50, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-8, 9, (50,), generator=g)).float()
        for _ in range(40)
    ]
    exact = torch.tensor([math.fsum(float(t[i]) for t in terms) for i in range(50)], dtype=torch.float64)
    plain_differs = False
    rng = random.Random(0)
    for trial in range(6):
        order = list(range(len(terms)))
        rng.shuffle(order)
        parts = [ExactSum() for _ in range(1 + trial % 3)]
        plain = torch.zeros(50, dtype=torch.float64)
        for k, i in enumerate(order):
            parts[k % len(parts)].add(terms[i])
            plain += terms[i].double()
        plain_differs |= not torch.equal(plain, exact)
        total = ExactSum.combine(p.state() for p in parts).value()
        assert torch.equal(total, exact), trial
    assert plain_differs  # the test's terms do expose order-dependent float64 sums


def test_merged_reservoirs_are_the_single_streams_sample():
    rows = torch.randn(300, 4, generator=torch.Generator().manual_seed(1))
    single = Reservoir(64, torch.Generator())
    for i, chunk in enumerate(rows.split(25)):
        single.generator = batch_generator(0, i)
        single.add(chunk)
    for world in (2, 3, 5):
        parts = []
        for r in range(world):
            res = Reservoir(64, torch.Generator())
            for i, chunk in enumerate(rows.split(25)):
                if i % world == r:
                    res.generator = batch_generator(0, i)
                    res.add(chunk)
            parts.append(res.state())
        merged = Reservoir(64, torch.Generator())
        merged.merge(parts)
        assert torch.equal(merged.sample(), single.sample()), world


def test_shard_and_split_work():
    items = list(range(10))
    assert [list(shard(items, r, 3)) for r in range(3)] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    with pytest.raises(ValueError, match=r"mpq.distributed.shard: expected 0 <= rank < size"):
        list(shard(items, 3, 3))
    costs = [5.0, 1.0, 4.0, 3.0, 3.0]
    owners = split_work(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert sorted(loads) == [8.0, 8.0]  # largest first to the least loaded: 5+3 / 4+3+1
    assert split_work(costs, 1) == [0] * 5


def test_one_process_without_a_group_is_rank_0_of_1():
    assert mpq.distributed.world() == (0, 1) and mpq.distributed.is_main()
    assert not torch.equal(
        torch.rand(3, generator=batch_generator(0, 1)), torch.rand(3, generator=batch_generator(0, 2))
    )
    assert not torch.equal(
        torch.rand(3, generator=batch_generator(0, 1, 0)), torch.rand(3, generator=batch_generator(0, 1, 1))
    )


def test_a_rank_left_alone_stops_within_the_timeout(tmp_path):
    """A world of 2 where the second rank never comes: the first gives up after --dist-timeout
    with one line naming the group, exit status 2, not a hang."""
    env = {**_env(), "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(_free_port())
    t0 = time.perf_counter()
    r = _mpq("--dist-timeout", "5", "eval", "--model", "efficientnet_lite0", "--data", str(tmp_path), "-q", env=env)
    assert r.returncode == 2, r.stderr
    assert re.search(
        r"^mpq eval \(rank 0\): mpq.distributed: could not join the process group of 2 ranks .* within 5 s",
        r.stderr,
        re.M,
    ), r.stderr
    assert time.perf_counter() - t0 < 120
