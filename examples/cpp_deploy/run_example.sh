#!/usr/bin/env bash
# The whole C++ deployment flow (README.md beside this file), for CI and for trying it out:
#   1. build mpq's ops library with CMake and install it (with its CMake package) into build/deploy-install;
#   2. quantize EfficientNet-Lite0 and ResNet-50 in Python and save them as TorchScript and as
#      AOTInductor packages (export_model.py);
#   3. build this example against the installed package (find_package(mpq));
#   4. run it on the exported input (checking C++ against Python's output, TorchScript and package)
#      and, for the latency of FP32, mpq TorchScript and mpq AOTInductor side by side, on seeded
#      noise with both models.
# Environment: MPQ_VENV (default .venv; its Python must import mpq, e.g. after scripts/setup.sh),
# MPQ_ENABLE_CUDA=1 to compile the CUDA kernels (off by default: slower, and the CPU run needs
# none), MPQ_DEVICE=cuda to run on a GPU, MPQ_RUNS (default 20), MPQ_TOLERANCE (default 1e-5),
# MPQ_CALIB_IMAGES (calibration crops, default 32: half the demo's, to keep CI under 3 minutes).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
VENV=${MPQ_VENV:-.venv}
[ -x "$VENV/bin/python" ] || { echo "run_example: no $VENV/bin/python (set MPQ_VENV, or run scripts/setup.sh)" >&2; exit 1; }
VENV=$(cd "$VENV" && pwd)
PY="$VENV/bin/python"
CMAKE="$VENV/bin/cmake"; [ -x "$CMAKE" ] || CMAKE=cmake
JOBS=$(nproc 2>/dev/null || echo 2)
BUILD=build/deploy-build
PREFIX=$ROOT/build/deploy-install
OUT=build/deploy-example
t_start=$(date +%s)
step() { echo "== [$(( $(date +%s) - t_start ))s] $*"; }
mkdir -p build "$OUT"

TORCH_PREFIX=$("$PY" -c "import torch; print(torch.utils.cmake_prefix_path)")
# Ninja when the venv has it, for a build tree that does not exist yet (CMake keeps the first one).
generator() { [ -x "$VENV/bin/ninja" ] && [ ! -f "$1/CMakeCache.txt" ] && echo "-GNinja -DCMAKE_MAKE_PROGRAM=$VENV/bin/ninja"; true; }

# A CUDA build of torch (pip's default) makes find_package(Torch) ask for a CUDA toolkit and
# libnvrtc even for CPU-only code; pip ships libnvrtc in site-packages/nvidia/*/lib, outside the
# toolkit, where torch's CMake does not look. mpq's build records them for its package.
cuda_hints=()
if [ -n "$("$PY" -c "import torch; print(torch.version.cuda or '')")" ]; then
  for root in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
    if [ -n "$root" ] && [ -e "$root/include/cuda_runtime.h" ]; then
      cuda_hints+=("-DCUDA_TOOLKIT_ROOT_DIR=$root"); break
    fi
  done
  nvrtc=$("$PY" - <<'EOF'
import glob, os, torch
site = os.path.dirname(os.path.dirname(torch.__file__))
hits = sorted(p for p in glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so*")) if "builtins" not in p and ".alt." not in p)
print(hits[0] if hits else "")
EOF
)
  [ -n "$nvrtc" ] && cuda_hints+=("-DCUDA_nvrtc_LIBRARY=$nvrtc")
fi

step "1. build and install mpq (libmpq_ops.so + CMake package) into $PREFIX"
cuda=OFF; [ "${MPQ_ENABLE_CUDA:-0}" = 1 ] && cuda=ON
"$CMAKE" -S . -B "$BUILD" $(generator "$BUILD") -DCMAKE_BUILD_TYPE=Release "-DCMAKE_PREFIX_PATH=$TORCH_PREFIX" \
  -DMPQ_BUILD_PYTHON=OFF -DMPQ_BUILD_TESTS=OFF -DMPQ_ENABLE_CUDA=$cuda "${cuda_hints[@]}" >"$BUILD.log" 2>&1 \
  || { cat "$BUILD.log"; exit 1; }
"$CMAKE" --build "$BUILD" --parallel "$JOBS"
"$CMAKE" --install "$BUILD" --prefix "$PREFIX" | grep -v "^-- Up-to-date" || true

step "2. quantize EfficientNet-Lite0 and ResNet-50 in Python and save them as TorchScript and AOTInductor packages"
"$PY" examples/cpp_deploy/export_model.py --out "$OUT" --calib-images "${MPQ_CALIB_IMAGES:-32}"
"$PY" examples/cpp_deploy/export_model.py --model resnet50 --out "$OUT" | grep -E "^mpq|^wrote|^saved"

step "3. build the example against the installed package"
# Only mpq's prefix: its package finds the Torch (and CUDA hints) mpq was built with.
"$CMAKE" -S examples/cpp_deploy -B "$OUT/build" $(generator "$OUT/build") -DCMAKE_BUILD_TYPE=Release \
  "-DCMAKE_PREFIX_PATH=$PREFIX" >"$OUT/cmake.log" 2>&1 \
  || { cat "$OUT/cmake.log"; exit 1; }
grep "^-- mpq " "$OUT/cmake.log" || true
"$CMAKE" --build "$OUT/build" --parallel "$JOBS"

step "4. run it"
"$OUT/build/mpq_deploy" "$OUT/efficientnet_lite0_mpq.pt" --input "$OUT/input.pt" \
  --device "${MPQ_DEVICE:-cpu}" --runs "${MPQ_RUNS:-20}" | tee "$OUT/run.log"
# FP32 in the same program on the same input, for the latency side by side; then ResNet-50.
ms() { sed -n 's/^latency: median \([0-9.]*\) ms.*/\1/p' "$1" | head -1; }
# The AOTInductor packages are CPU builds (compiled for this machine's CPU): CPU runs only.
kinds="fp32.pt mpq.pt"; [ "${MPQ_DEVICE:-cpu}" = cpu ] && kinds="$kinds mpq.pt2"
for model in efficientnet_lite0 resnet50; do
  for kind in $kinds; do
    "$OUT/build/mpq_deploy" "$OUT/${model}_${kind}" --shape 1,3,224,224 --seed 0 \
      --device "${MPQ_DEVICE:-cpu}" --runs "${MPQ_RUNS:-20}" >"$OUT/run_${model}_${kind}_noise.log"
  done
  aoti_ms=""; [ -f "$OUT/run_${model}_mpq.pt2_noise.log" ] && aoti_ms=$(ms "$OUT/run_${model}_mpq.pt2_noise.log")
  "$PY" -c "
import sys
model, f, q, a = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
line = f'C++ latency, {model}, batch 1, median of {sys.argv[5]}: FP32 {f:.2f} ms, mpq TorchScript {q:.2f} ms ({f / q:.2f}x)'
print(line + (f', mpq AOTInductor {float(a):.2f} ms ({f / float(a):.2f}x)' if a else ''))" \
    "$model" "$(ms "$OUT/run_${model}_fp32.pt_noise.log")" "$(ms "$OUT/run_${model}_mpq.pt_noise.log")" "$aoti_ms" \
    "${MPQ_RUNS:-20}"
done
"$OUT/build/mpq_deploy" "$OUT/resnet50_mpq.pt" --input "$OUT/input_resnet50.pt" \
  --device "${MPQ_DEVICE:-cpu}" --runs 3 >"$OUT/run_resnet50.log"
logs="run.log run_resnet50.log"
if [ "${MPQ_DEVICE:-cpu}" = cpu ]; then  # the packages against Python's run of the same package
  "$OUT/build/mpq_deploy" "$OUT/efficientnet_lite0_mpq.pt2" --input "$OUT/input.pt" --runs 3 >"$OUT/run_aoti.log"
  "$OUT/build/mpq_deploy" "$OUT/resnet50_mpq.pt2" --input "$OUT/input_resnet50.pt" --runs 3 >"$OUT/run_resnet50_aoti.log"
  logs="$logs run_aoti.log run_resnet50_aoti.log"
fi
grep -q "$PREFIX/lib/libmpq_ops.so" "$OUT/run.log" \
  || { echo "run_example: mpq_deploy did not load $PREFIX/lib/libmpq_ops.so" >&2; exit 1; }
# On the CPU the same kernels run in both: C++ must reproduce Python's output.
tol=${MPQ_TOLERANCE:-1e-5}
[ "${MPQ_DEVICE:-cpu}" = cpu ] || tol=${MPQ_TOLERANCE:-1e-3}
for log in $logs; do
  rel=$(sed -n 's/.*max |C++ - Python| \/ max |Python| = //p' "$OUT/$log")
  "$PY" -c "import sys; r, t = float('$rel'), float('$tol'); print(f'C++ vs Python ($log): {r:.2e} (tolerance {t:.0e})'); sys.exit(r > t)" \
    || { echo "run_example: C++ and Python outputs differ ($log)" >&2; exit 1; }
done
step "done"
