#!/usr/bin/env bash
# README command 2: set everything up, then run every test: pytest (Python, ops, end to end)
# and the Catch2 C++ tests through CTest. GPU tests skip with a reason where no GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MPQ_VENV:-.venv}
[ "${MPQ_SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh

echo "== pytest"
"$VENV/bin/python" -m pytest tests/python -q "$@"

echo "== Catch2 (C++)"
# The build tree setup.sh configured (build/python), with the tests switched on: nothing is compiled twice.
BUILD=build/python
"$VENV/bin/cmake" -S . -B "$BUILD" -DMPQ_BUILD_TESTS=ON >/dev/null
"$VENV/bin/cmake" --build "$BUILD" --parallel "$(nproc)"
"$VENV/bin/ctest" --test-dir "$BUILD" --output-on-failure
