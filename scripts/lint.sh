#!/usr/bin/env bash
# Formatting and lint, checked without changing a file: ruff (Python: pyproject.toml's [tool.ruff])
# and clang-format (C++/CUDA of csrc/, tests/cpp/, examples/cpp_deploy/: .clang-format). Both are
# pinned in requirements.txt. To apply what it asks for:
#     .venv/bin/ruff check --fix . && .venv/bin/ruff format .
#     git ls-files 'csrc/*' 'tests/cpp/*' 'examples/cpp_deploy/*' | grep -E '\.(cpp|h|cu|cuh)$' | xargs .venv/bin/clang-format -i
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${MPQ_VENV:-.venv}
status=0

echo "== ruff check"
"$VENV/bin/ruff" check . || status=1
echo "== ruff format --check"
"$VENV/bin/ruff" format --check . || status=1
echo "== clang-format --dry-run -Werror"
mapfile -t cxx < <(git ls-files 'csrc/*' 'tests/cpp/*' 'examples/cpp_deploy/*' | grep -E '\.(cpp|h|cu|cuh)$')
"$VENV/bin/clang-format" --dry-run -Werror "${cxx[@]}" || status=1

[ "$status" = 0 ] && echo "== lint clean" || echo "== lint: see above"
exit "$status"
