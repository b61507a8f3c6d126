#!/usr/bin/env bash
# CI: mpq as users install it. Builds the wheel (reusing the CMake tree that scripts/setup.sh built,
# so little or nothing is compiled again), installs it with the dependencies it declares into a
# fresh virtual environment in a temporary folder (no editable install, no source tree on the
# path), then runs scripts/wheel_check.py there from a temporary working directory: quantize,
# save / load, a TorchScript forward, the bundled checkpoint inside the installed package.
#
# Environment: MPQ_VENV (default .venv) builds the wheel; MPQ_BUILD_DIR, MPQ_ENABLE_CUDA and
# MPQ_CUDA_ARCHITECTURES as for setup.py (they must match the tree's configuration, or it is
# reconfigured and rebuilt); MPQ_WHEEL_DIR keeps the wheel there (default: deleted at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${MPQ_VENV:-.venv}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/mpq-wheel-check.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
start=$(date +%s)
# Runs a command quietly; its output only on failure, less the local index's "is ignored" notes.
quiet() {
  if ! "$@" >"$TMP/log" 2>&1; then cat "$TMP/log"; return 1; fi
  grep -v "is ignored: it is neither" "$TMP/log" || true
}

echo "== pip wheel . --no-build-isolation --no-deps (CMake tree ${MPQ_BUILD_DIR:-build/python})"
# setuptools never empties its own staging folders: files removed from the package since the
# last build would still go into the wheel. Only the CMake tree is worth keeping.
rm -rf build/lib.* build/bdist.* build/temp.*
t0=$(date +%s)
quiet "$VENV/bin/pip" wheel . -q --no-build-isolation --no-deps -w "$TMP/dist"
WHEEL=$(ls "$TMP"/dist/mpq-*.whl)
echo "   $(basename "$WHEEL"): $(du -k "$WHEEL" | cut -f1) KB, built in $(( $(date +%s) - t0 )) s"
"$VENV/bin/python" - "$WHEEL" <<'EOF'
import sys, zipfile
from collections import Counter
names = zipfile.ZipFile(sys.argv[1]).infolist()
kinds = Counter()
for info in names:
    name = info.filename
    kind = ("metadata" if ".dist-info/" in name else ".so" if ".so" in name else name.rsplit(".", 1)[-1])
    kinds[kind] += info.file_size
    if not name.endswith(".py") and ".dist-info/" not in name:
        print(f"   {name}  {info.file_size / 1e6:.2f} MB")
print("   " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sorted(kinds.items())) + f"; {len(names)} files")
EOF
if [ -n "${MPQ_WHEEL_DIR:-}" ]; then mkdir -p "$MPQ_WHEEL_DIR" && cp "$WHEEL" "$MPQ_WHEEL_DIR/"; fi

echo "== fresh virtual environment: pip install the wheel and its declared dependencies"
t0=$(date +%s)
"$VENV/bin/python" -m venv "$TMP/venv"
quiet "$TMP/venv/bin/pip" install -q --no-compile "$WHEEL"  # no .pyc: torch has thousands of files
"$TMP/venv/bin/pip" check
echo "   installed in $(( $(date +%s) - t0 )) s"

echo "== the installed mpq, from a temporary directory, PYTHONPATH unset"
cp scripts/wheel_check.py "$TMP/"
mkdir "$TMP/cwd"
(
  cd "$TMP/cwd"
  unset PYTHONPATH
  "$TMP/venv/bin/mpq" info
  # -I: no PYTHON* variables, neither the script's folder nor the working directory on sys.path.
  "$TMP/venv/bin/python" -I "$TMP/wheel_check.py" "$ROOT"
)
echo "== wheel check done in $(( $(date +%s) - start )) s"
