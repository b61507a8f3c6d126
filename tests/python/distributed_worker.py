"""One rank of the multi-process tests (tests/python/test_distributed.py): joins a gloo process
group on localhost, quantizes the Fashion-MNIST ResNet with the golden file's cases on its shard
of the calibration batches, and writes the quantized state's digests (one JSON per rank).

    python tests/python/distributed_worker.py --rank R --world N --port P --out DIR --cases "a;b"

``--world 1`` runs alone, without a process group: the single-process reference.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "golden"))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--cases", required=True, help="semicolon-separated FASHION_CASES names, or 'extra:<json>'")
    p.add_argument("--die", action="store_true", help="exit at once after joining (a rank that dies)")
    p.add_argument("--other-seed", action="store_true", help="quantize with another seed (a mismatched job)")
    p.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    import torch.distributed as dist
    from quantized_state import FASHION_CASES, _digest

    import mpq
    from mpq.examples.fashion import fashion_mnist, load_fashion_resnet

    if args.world > 1:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{args.port}",
            rank=args.rank,
            world_size=args.world,
            timeout=datetime.timedelta(seconds=args.timeout),
        )
        if args.die:
            os._exit(3)
    model = load_fashion_resnet()
    xtr, _ = fashion_mnist("train")
    calib = list(xtr[torch.randperm(xtr.shape[0], generator=torch.Generator().manual_seed(0))[:256]].split(64))
    mine = list(mpq.distributed.shard(calib))
    digests = {}
    for i, case in enumerate(args.cases.split(";")):
        fields = dict(FASHION_CASES[case]) if case in FASHION_CASES else json.loads(case.split(":", 1)[1])
        if args.other_seed:
            fields["seed"] = 1
        q = mpq.quantize(model, mine, mpq.QuantConfig(**fields))
        digests[case] = _digest(q)
        torch.save(q.state_dict(), Path(args.out) / f"case{i}_rank{args.rank}.pt")
    (Path(args.out) / f"rank{args.rank}.json").write_text(json.dumps(digests, indent=1, sort_keys=True))
    if args.world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except Exception:  # e.g. mpq.distributed.DistributedError: the tests read stderr and the code
        traceback.print_exc()
        code = 1
    sys.stderr.flush()
    sys.stdout.flush()
    # Skip interpreter teardown: gloo's process group, left undestroyed after an error while the
    # other rank has already gone, can abort the process there (SIGABRT seen once in ~30 runs of
    # test_a_rank_with_another_config_is_named under a full pytest run).
    os._exit(code)
