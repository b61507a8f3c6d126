"""``python -m mpq``: the command line.

    python -m mpq demo          # EfficientNet-Lite0: FP32 vs RTN W4A8 vs multipoint W4A8 on real photos
    python -m mpq info          # build facts: versions, CUDA kernels and architectures
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpq", description="Multipoint post-training quantization for PyTorch.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every quantized layer")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize EfficientNet-Lite0 offline and compare FP32, RTN and multipoint")
    demo.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    demo.add_argument("--seed", type=int, default=0, help="calibration crops and sampling seed (default 0)")
    sub.add_parser("info", help="print how the ops library was built")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    import mpq

    if args.command == "info":
        print(json.dumps(mpq.build_info(), indent=2))
        return 0
    if args.command == "demo":
        from mpq.demo import run_demo

        try:
            run_demo(json_path=args.json, seed=args.seed)
        except mpq.assets.AssetMissing as e:
            print(f"mpq demo: {e}", file=sys.stderr)
            return 2
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
