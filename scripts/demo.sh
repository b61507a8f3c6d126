#!/usr/bin/env bash
# README command 1: set everything up, then quantize EfficientNet-Lite0 (W4A8, RTN vs multipoint)
# on real photos and print the comparison table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
"${MPQ_VENV:-.venv}/bin/python" -m mpq demo "$@"
