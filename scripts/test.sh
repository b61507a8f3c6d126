#!/usr/bin/env bash
# README command 2: set everything up, then run every test: pytest (Python, ops, end to end)
# and the Catch2 C++ tests through CTest. GPU tests skip with a reason where no GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MPQ_VENV:-.venv}
[ "${MPQ_SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh

echo "== pytest"
"$VENV/bin/python" -m pytest tests/python -q "$@"

# PyTorch picks AVX-512, AVX2 or scalar code at run time and float sums differ between them: the
# README's commands (quantize, the CLI) and the per-layer simulation check must pass on each path,
# whatever CPU CI runs on. (The main run above uses the machine's own path; oneDNN's ISA caps are
# covered inside tests/python/test_stored.py and test_simulation_check.py.)
for isa in avx2 default; do
  echo "== pytest on ATen's ${isa} code path (ATEN_CPU_CAPABILITY=${isa}): quantize, CLI, simulation check"
  ATEN_CPU_CAPABILITY=$isa "$VENV/bin/python" -m pytest -q "$@" tests/python/test_quantize.py tests/python/test_cli.py \
    tests/python/test_simulation_check.py::test_check_passes_and_reports_every_layer
done

echo "== Catch2 (C++)"
# The build tree setup.sh configured (build/python), with the tests switched on: nothing is compiled twice.
BUILD=build/python
"$VENV/bin/cmake" -S . -B "$BUILD" -DMPQ_BUILD_TESTS=ON >/dev/null
"$VENV/bin/cmake" --build "$BUILD" --parallel "$(nproc)"
"$VENV/bin/ctest" --test-dir "$BUILD" --output-on-failure
