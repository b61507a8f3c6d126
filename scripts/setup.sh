#!/usr/bin/env bash
# Sets up mpq on a fresh Debian machine with Python 3.11: system packages (Catch2, the bundled
# photos, Fashion-MNIST), a virtual environment with the pinned torch, and mpq built from source (CMake).
# Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MPQ_VENV:-.venv}
PYTHON=${PYTHON:-python3}

need_apt=()
[ -f /usr/include/catch2/catch.hpp ] || [ -f /usr/include/catch2/catch_test_macros.hpp ] || need_apt+=(catch2)
[ -d /usr/lib/python3/dist-packages/skimage/data ] || need_apt+=(python3-skimage)
[ -d /usr/lib/python3/dist-packages/sklearn/datasets/images ] || need_apt+=(python3-sklearn)
[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || need_apt+=(dataset-fashion-mnist)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "== apt-get install ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
echo "== pip install -r requirements.txt (torch==2.14.1, torchvision==0.29.1, ...)"
"$VENV/bin/pip" install -q --disable-pip-version-check -r requirements.txt
# The 20 labelled ImageNet photos ship inside the foolbox wheel; its code is never imported.
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps foolbox==3.3.4
echo "== building mpq (CMake: libmpq_ops.so + the Python stub)"
"$VENV/bin/pip" install -q --disable-pip-version-check --no-build-isolation -e .
"$VENV/bin/python" -m mpq info
