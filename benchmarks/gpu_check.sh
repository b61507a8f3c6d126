#!/usr/bin/env bash
# The whole GPU check in one command, for the rare minutes when an H100 is at hand (issue 18):
#
#   bash benchmarks/gpu_check.sh OUTDIR            # build, test, sanitize, benchmark: at most 9 minutes
#   bash benchmarks/gpu_check.sh OUTDIR --dry-run  # everything that runs without a GPU (CI: a few seconds)
#
# Builds mpq against the torch it finds (python3, or $PYTHON; nothing is installed, nothing is
# downloaded): CMake + Ninja, all cores, sm_90 SASS only, the C++ tests on; installs libmpq_ops.so
# and the stub into python/mpq/ as setup.py does. Then, in this order, each step under `timeout`:
#   build      configure + build                                     box 180 s (2-core measurement: see below)
#   pytest     tests/python/test_cuda.py + test_packed.py on CUDA     box 100 s
#   ctest      the build tree's C++ tests, -j all cores (without the  box  60 s
#              CPU-only ASan emulation: 74 s alone, run by CPU CI)
#   memcheck   compute-sanitizer --tool memcheck benchmarks/gpu_sanitize.py    box 40 s
#   racecheck  compute-sanitizer --tool racecheck benchmarks/gpu_sanitize.py   box 40 s
#   kernels    benchmarks/kernels.py --quick (linear, conv, resnet50)  box: what is left but fit_speed's
#   fit_speed  benchmarks/fit_speed.py --device cuda                   box  45 s
# A step gets min(its box, the time left of the budget, 540 s by default: MPQ_GPU_CHECK_BUDGET) and
# is skipped, with the reason, when less than 15 s are left; a step whose prerequisite failed is
# skipped too. OUTDIR receives at most 8 files, each cut below 16 MB: summary.json (written first,
# rewritten after every step: it exists whatever happens later), build.log, pytest.log, ctest.log,
# sanitize.log (both tools), bench.log (both benchmarks' output), kernels.json, fit_speed.json.
#
# Build time, measured on the 2-core CPU machine with the same flags (build/python/.ninja_log): the
# three CUDA translation units take 62 s (multipoint_packed.cu), 28 s and 25 s, the torch C++ files
# 9-16 s each, the C++ tests up to 47 s (test_scripted_model.cpp); Catch2 v3 (the GPU machine's)
# needs no catch_main.cpp. With 16 cores every unit runs at once: the build takes about the longest
# unit plus configure and links, ~100-130 s; the 180 s box leaves a margin of ~1.5x.
#
# --dry-run: no build (the existing python/mpq/libmpq_ops.so and build/python are used), and every
# GPU step is marked "skipped" with its reason after what can run without a GPU: pytest collects the
# two files, ctest lists the tests of build/python (-N), gpu_sanitize.py runs its calls on the CPU,
# kernels.py --check-on-cpu runs its linear section and fit_speed.py --check-on-cpu its device code
# on the CPU (the full kernels.py --check-on-cpu is tests/python/test_benchmark_scripts.py's own test).
#
# Environment: PYTHON (the Python with torch; default python3, .venv/bin/python in a dry run),
# MPQ_GPU_BUILD_DIR (default build/gpu_check: a rerun rebuilds only what changed),
# MPQ_GPU_CHECK_BUDGET (seconds, default 540), MPQ_GPU_CHECK_BOX_<step> (a step's box, seconds),
# MPQ_GPU_CHECK_ONLY ("pytest kernels": a rerun of some steps; the build always runs).
# Exit status 0 when every step that ran passed (in a dry run: every stand-in), else 1.
set -uo pipefail

usage() { echo "usage: $0 OUTDIR [--dry-run]" >&2; exit 2; }
OUT="" DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -*) usage ;;
    *) [ -z "$OUT" ] || usage; OUT=$arg ;;
  esac
done
[ -n "$OUT" ] || usage
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2

BUDGET=${MPQ_GPU_CHECK_BUDGET:-540}
START=$(date +%s)
DEADLINE=$((START + BUDGET))
MIN_STEP=15      # a step with less time left than this is skipped
RESERVE=5        # kept for the last summary
LOG_LIMIT=$((15 * 1024 * 1024))
JOBS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 4)  # nproc obeys OMP_NUM_THREADS
if [ -z "${PYTHON:-}" ]; then
  if [ "$DRY" = 1 ] && [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
# CMake >= 3.26: a pip-installed one beside the Python first (as setup.py does), else the system's.
PYBIN=$(dirname "$(command -v "$PYTHON" || echo /usr/bin/python3)")
CMAKE=cmake CTEST=ctest
[ -x "$PYBIN/cmake" ] && [ -x "$PYBIN/ctest" ] && CMAKE=$PYBIN/cmake CTEST=$PYBIN/ctest
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
if [ "$DRY" = 1 ]; then
  BUILD=$ROOT/build/python
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # CI machines are small and shared
else
  BUILD=${MPQ_GPU_BUILD_DIR:-$ROOT/build/gpu_check}
  command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"
fi

STEPS=(build pytest ctest memcheck racecheck kernels fit_speed)
declare -A BOX=([build]=180 [pytest]=100 [ctest]=60 [memcheck]=40 [racecheck]=40 [kernels]=0 [fit_speed]=45)
declare -A LOG=([build]=build.log [pytest]=pytest.log [ctest]=ctest.log [memcheck]=sanitize.log
                [racecheck]=sanitize.log [kernels]=bench.log [fit_speed]=bench.log)
declare -A STATUS DUR RC REASON LIMIT
for s in "${STEPS[@]}"; do
  STATUS[$s]=pending; DUR[$s]=""; RC[$s]=""; REASON[$s]=""; LIMIT[$s]=""
  box=MPQ_GPU_CHECK_BOX_$s; BOX[$s]=${!box:-${BOX[$s]}}  # e.g. MPQ_GPU_CHECK_BOX_kernels=200
done
ONLY=${MPQ_GPU_CHECK_ONLY:-}  # e.g. "pytest memcheck": a rerun of some steps (the build always runs)
ENV_INFO=$("$PYTHON" - 2>/dev/null <<'EOF'
import json, platform
try:
    import torch
    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if info["cuda_available"]:
        info["gpu"] = torch.cuda.get_device_name(0)
except Exception as e:  # reported, not fatal
    info = {"torch_error": f"{type(e).__name__}: {e}"}
info["python"] = platform.python_version()
print(json.dumps(info))
EOF
)
[ -n "$ENV_INFO" ] || ENV_INFO='{"python_error": "no Python with torch found"}'
NVCC_VERSION=$(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' | head -1)

# summary.json: the steps in order with status (pending, running, ok, failed, timeout, skipped),
# the limit each ran under, seconds, exit status, log file and reason; the files in OUTDIR.
write_summary() {
  local args=() s
  for s in "${STEPS[@]}"; do
    args+=("$s" "${STATUS[$s]}" "${BOX[$s]}" "${LIMIT[$s]}" "${DUR[$s]}" "${RC[$s]}" "${LOG[$s]}" "${REASON[$s]}")
  done
  "$PYTHON" - "$OUT" "$DRY" "$BUDGET" "$START" "$JOBS" "$ENV_INFO" "$NVCC_VERSION" "$BUILD" "${args[@]}" <<'EOF'
import json, os, sys, time
out, dry, budget, start, jobs, env, nvcc, build = sys.argv[1:9]
rest = sys.argv[9:]
steps = []
for i in range(0, len(rest), 8):
    name, status, box, limit, seconds, rc, log, reason = rest[i:i + 8]
    step = {"name": name, "status": status, "box_s": int(box) if box != "0" else "rest of the budget",
            "limit_s": int(limit) if limit else None, "seconds": float(seconds) if seconds else None,
            "rc": int(rc) if rc else None, "log": log}
    if reason:
        step["reason"] = reason
    steps.append(step)
doc = {
    "script": "benchmarks/gpu_check.sh", "dry_run": dry == "1", "budget_s": int(budget),
    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(start))),
    "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "elapsed_s": round(time.time() - int(start), 1), "jobs": int(jobs), "build_dir": build,
    "env": {**json.loads(env), "nvcc": nvcc or None}, "steps": steps,
    "files": sorted(f for f in os.listdir(out) if f != "summary.json.tmp"),
}
with open(os.path.join(out, "summary.json.tmp"), "w") as f:
    json.dump(doc, f, indent=1)
os.replace(os.path.join(out, "summary.json.tmp"), os.path.join(out, "summary.json"))
EOF
}

# Keeps a log under 16 MB: its first and last 7 MB.
cap_log() {
  local f=$OUT/$1 size
  [ -f "$f" ] || return 0
  size=$(stat -c %s "$f")
  if [ "$size" -gt "$LOG_LIMIT" ]; then
    { head -c $((7 * 1024 * 1024)) "$f"; printf '\n... [cut by gpu_check.sh: %s bytes in all] ...\n' "$size"
      tail -c $((7 * 1024 * 1024)) "$f"; } > "$f.cut" && mv "$f.cut" "$f"
  fi
}

skip() {  # skip STEP REASON
  STATUS[$1]=skipped; REASON[$1]=$2
  echo "== $1: skipped: $2" >> "$OUT/${LOG[$1]}"
  write_summary
}

# gate STEP: skips STEP and returns 1 when it is not selected (MPQ_GPU_CHECK_ONLY) or too little of
# the budget is left; checked before a step's own prerequisites, so its reason is always these.
gate() {
  local step=$1 left
  if [ -n "$ONLY" ] && [ "$step" != build ] && [[ " $ONLY " != *" $step "* ]]; then
    skip "$step" "not selected (MPQ_GPU_CHECK_ONLY=$ONLY)"
    return 1
  fi
  left=$((DEADLINE - $(date +%s) - RESERVE))
  if [ "$left" -lt "$MIN_STEP" ]; then
    skip "$step" "not enough time: ${left} s left of the ${BUDGET} s budget (a step needs ${MIN_STEP} s)"
    return 1
  fi
}

# run_step STEP COMMAND...: runs COMMAND under timeout, its output appended to the step's log.
# Returns 0 when it ran and passed. In a dry run the caller marks the GPU step skipped afterwards.
run_step() {
  local step=$1; shift
  local left limit t0 t1 rc
  gate "$step" || return 1
  left=$((DEADLINE - $(date +%s) - RESERVE))
  limit=${BOX[$step]}
  [ "$limit" -gt 0 ] && [ "$limit" -lt "$left" ] || limit=$left
  STATUS[$step]=running; LIMIT[$step]=$limit; write_summary
  { echo "== $step ($(date -u +%H:%M:%S), limit ${limit} s): $*"; } >> "$OUT/${LOG[$step]}"
  t0=$(date +%s.%N)
  timeout --kill-after=5 "$limit" "$@" >> "$OUT/${LOG[$step]}" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  DUR[$step]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  RC[$step]=$rc
  if [ "$rc" = 0 ]; then STATUS[$step]=ok
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then STATUS[$step]=timeout; REASON[$step]="killed after ${limit} s"
  else STATUS[$step]=failed; REASON[$step]="exit $rc (see ${LOG[$step]})"; fi
  echo "== $step: ${STATUS[$step]} (exit $rc, ${DUR[$step]} s)" >> "$OUT/${LOG[$step]}"
  cap_log "${LOG[$step]}"
  write_summary
  [ "$rc" = 0 ]
}

# In a dry run a GPU step runs its CPU stand-in, then is marked skipped; the stand-in's result
# is kept in the reason ("dry run: ... (stand-in ok)").
DRY_FAILED=0
dry_done() {  # dry_done STEP REASON
  [ "${STATUS[$1]}" != skipped ] || return 0  # not run (no time left): its reason stays
  local ran=${STATUS[$1]}
  [ "$ran" = ok ] || DRY_FAILED=1
  STATUS[$1]=skipped; REASON[$1]="dry run: $2 (stand-in $ran, exit ${RC[$1]})"
  write_summary
}

write_summary

# ---- build ----------------------------------------------------------------------------------------
BUILT=0
if [ "$DRY" = 1 ]; then
  if [ -f "$ROOT/python/mpq/libmpq_ops.so" ]; then BUILT=1; fi
  {
    echo "== build: not run (dry run). The GPU run configures and builds with:"
    echo "TORCH_CUDA_ARCH_LIST=9.0 cmake -S $ROOT -B ${MPQ_GPU_BUILD_DIR:-$ROOT/build/gpu_check} -G Ninja" \
         "-DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH=<torch.utils.cmake_prefix_path> -DPython3_EXECUTABLE=python3" \
         "-DMPQ_ENABLE_CUDA=ON -DMPQ_CUDA_ARCHITECTURES=90-real -DMPQ_BUILD_TESTS=ON -DMPQ_BUILD_PYTHON=ON"
    echo "cmake --build <build dir> --parallel <nproc>; cp <build dir>/lib/{libmpq_ops.so,_C.*.so} python/mpq/"
  } >> "$OUT/build.log"
  skip build "dry run: no build; the existing python/mpq/libmpq_ops.so and build/python are used"
else
  # TORCH_CUDA_ARCH_LIST=9.0: torch's CMake emits -gencode for sm_90 only (CMakeLists.txt would add
  # +PTX); MPQ_CUDA_ARCHITECTURES=90-real says the same to CMake: SASS only, no compute_90 PTX.
  if run_step build env TORCH_CUDA_ARCH_LIST=9.0 bash -c '
      set -e
      prefix=$("$0" -c "import torch; print(torch.utils.cmake_prefix_path)")
      "$3" -S . -B "$1" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" \
        -DPython3_EXECUTABLE="$(command -v "$0")" -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$1/lib" \
        -DCMAKE_CUDA_COMPILER="$(command -v nvcc)" -DMPQ_ENABLE_CUDA=ON -DMPQ_CUDA_ARCHITECTURES=90-real \
        -DMPQ_BUILD_TESTS=ON -DMPQ_BUILD_PYTHON=ON
      "$3" --build "$1" --parallel "$2"
      cp "$1/lib/libmpq_ops.so" python/mpq/
      cp "$1"/lib/_C.*.so python/mpq/
      "$0" -c "import mpq, json; info = mpq.build_info(); print(json.dumps(info)); assert info[\"cuda_kernels\"], \"no CUDA kernels\""
    ' "$PYTHON" "$BUILD" "$JOBS" "$CMAKE"; then
    BUILT=1
  fi
fi
NOBUILD="the build failed or was not run (see build.log)"

# ---- pytest ---------------------------------------------------------------------------------------
PYTEST=("$PYTHON" -m pytest tests/python/test_cuda.py tests/python/test_packed.py -p no:cacheprovider)
if [ "$BUILT" = 0 ]; then skip pytest "$NOBUILD"
elif [ "$DRY" = 1 ]; then
  run_step pytest "${PYTEST[@]}" --collect-only -q
  dry_done pytest "the CUDA tests need a GPU; the two files were collected only"
else
  run_step pytest "${PYTEST[@]}" -q -rs --tb=short --durations=15
fi

# ---- ctest ----------------------------------------------------------------------------------------
if [ "$BUILT" = 0 ]; then skip ctest "$NOBUILD"
elif ! gate ctest; then :
elif [ ! -f "$BUILD/CTestTestfile.cmake" ]; then skip ctest "no build tree with tests at $BUILD"
elif [ "$DRY" = 1 ]; then
  run_step ctest "$CTEST" --test-dir "$BUILD" -N
  dry_done ctest "needs this run's build (the [cuda] cases need a GPU); the tests of build/python were listed (-N)"
else
  run_step ctest "$CTEST" --test-dir "$BUILD" --output-on-failure -j "$JOBS" --timeout $((BOX[ctest] - 5)) \
    -E '^kernel_emulation_asan$'
fi

# ---- compute-sanitizer ----------------------------------------------------------------------------
SANITIZER=$(command -v compute-sanitizer || true)
for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer \
         "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x)")/compute-sanitizer"; do
  [ -n "$SANITIZER" ] || { [ -x "$c" ] && SANITIZER=$c; }
done
# Options this compute-sanitizer lists in its --help: only mpq's kernels are checked (all are in
# namespace mpq; torch's are not ours, and slow under racecheck), at most 50 reports printed.
SAN_OPTS=()
SAN_HELP=$([ -z "$SANITIZER" ] || "$SANITIZER" --help 2>&1)
[[ "$SAN_HELP" != *--kernel-name* ]] || SAN_OPTS+=(--kernel-name kns=mpq)
[[ "$SAN_HELP" != *--print-limit* ]] || SAN_OPTS+=(--print-limit 50)
for tool in memcheck racecheck; do
  if [ "$BUILT" = 0 ]; then skip $tool "$NOBUILD"
  elif [ "$DRY" = 1 ]; then
    run_step $tool "$PYTHON" benchmarks/gpu_sanitize.py --device cpu
    dry_done $tool "compute-sanitizer needs a GPU; benchmarks/gpu_sanitize.py ran its calls on the CPU"
  elif [ -z "$SANITIZER" ]; then skip $tool "compute-sanitizer not found (PATH, /usr/local/cuda)"
  else
    # No caching allocator: an access past a tensor's end must leave its allocation to be seen.
    run_step $tool env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool $tool "${SAN_OPTS[@]}" \
      --error-exitcode 3 "$PYTHON" benchmarks/gpu_sanitize.py
  fi
done

# ---- benchmarks -----------------------------------------------------------------------------------
if [ "$BUILT" = 0 ]; then skip kernels "$NOBUILD"; skip fit_speed "$NOBUILD"
elif [ "$DRY" = 1 ]; then
  run_step kernels "$PYTHON" benchmarks/kernels.py --check-on-cpu --section linear --json "$OUT/kernels.json"
  dry_done kernels "its GPU timings need a GPU; kernels.py --check-on-cpu --section linear ran"
  run_step fit_speed "$PYTHON" benchmarks/fit_speed.py --check-on-cpu --runs 1 --out "$OUT/fit_speed.json"
  dry_done fit_speed "its GPU timings need a GPU; fit_speed.py --check-on-cpu ran the device code on the CPU"
else
  # kernels.py gets what is left after fit_speed's box: time the build did not use goes to it.
  left=$((DEADLINE - $(date +%s) - RESERVE - BOX[fit_speed]))
  if [ "$left" -lt "$MIN_STEP" ]; then
    skip kernels "not enough time: ${left} s left once fit_speed's ${BOX[fit_speed]} s are kept"
  else
    BOX[kernels]=$(( left > 300 ? 300 : left ))
    run_step kernels "$PYTHON" benchmarks/kernels.py --quick --warmup 3 --json "$OUT/kernels.json"
  fi
  run_step fit_speed "$PYTHON" benchmarks/fit_speed.py --device cuda --runs 3 --out "$OUT/fit_speed.json"
fi
write_summary
echo "gpu_check.sh: $(date -u +%H:%M:%S), $(( $(date +%s) - START )) s; summary: $OUT/summary.json"
status=$DRY_FAILED
for s in "${STEPS[@]}"; do
  printf '  %-10s %-8s %s\n' "$s" "${STATUS[$s]}" "${REASON[$s]}"
  case "${STATUS[$s]}" in failed|timeout) status=1 ;; esac
done
exit "$status"  # 0: every step that ran passed (in a dry run: every stand-in)
