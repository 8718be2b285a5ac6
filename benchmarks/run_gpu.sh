#!/usr/bin/env bash
# Build, test and benchmark vdvae_fast on a GPU machine with no network, in one go, bounded to 25 minutes (BUDGET_S).
#
#   bash benchmarks/run_gpu.sh                      # every stage: build test train sample ops
#   OUT=/tmp/out bash benchmarks/run_gpu.sh build test   # some stages, in the order given
#
# Stages: build  the extension against the installed torch (pip editable install, else setup.py build_ext
#                --inplace; skipped when the CUDA kernels are already built), then prints which kernels exist;
#         test   python -m pytest tests -x -q (a failure is logged and the script goes on);
#         train, sample, ops   python -m benchmarks --suite NAME --out "$OUT", one suite per process, so that a
#                suite stopped at its time limit loses only its own rows (the results file merges suites).
# Everything is written under $OUT (default benchmarks/results): run_gpu.log (this script's summary), build.log,
# tests.log, bench.log and the results <device>.json, .md and .png.
#
# Time bounds (seconds, environment overrides): BUDGET_S=1500 for the whole run; BUILD_S=480; TESTS_S=420;
# TRAIN_BUDGET_S=360 passed as --budget-s (no batch sweep or compile starts after it; a measurement still running
# 90 s later is cut short), with a hard stop at TRAIN_BUDGET_S + 180; SAMPLE_S=240; the ops suite gets what is
# left: in full when at least OPS_FULL_S=540 remain, else --quick (its first two shapes), else --quick
# --no-compile. Each command also stays under 10 minutes, so single stages fit a runner with that call limit.

set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/run_gpu.log
BUDGET_S=${BUDGET_S:-1500}
BUILD_S=${BUILD_S:-480}
TESTS_S=${TESTS_S:-420}
TRAIN_BUDGET_S=${TRAIN_BUDGET_S:-360}
SAMPLE_S=${SAMPLE_S:-240}
OPS_FULL_S=${OPS_FULL_S:-540}
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}  # parallel nvcc/ninja jobs for the build
STARTED=$SECONDS
FAILED=()  # stages that failed or were cut short: the exit status is 1 if any

say() { echo "[run_gpu +$((SECONDS - STARTED))s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET_S - (SECONDS - STARTED))); }

# bounded SECONDS CMD...: CMD under a wall-clock limit of SECONDS or the time left, whichever is less.
# Exit status 124 means it was stopped at the limit; 125 that no time was left to start it.
bounded() {
    local limit=$1 remaining
    shift
    remaining=$(left)
    ((remaining < limit)) && limit=$remaining
    if ((limit < 30)); then
        say "no time left for: $*"
        return 125
    fi
    timeout --signal=INT --kill-after=30 "$limit" "$@"
}

# The Python that has torch: python3 on the GPU image, python elsewhere; PYTHON=... overrides.
if [[ -z ${PYTHON:-} ]]; then
    for candidate in python3 python; do
        if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then
            PYTHON=$candidate
            break
        fi
    done
fi
if [[ -z ${PYTHON:-} ]]; then
    say "no Python with torch found (set PYTHON=...)"
    exit 1
fi
has() { "$PYTHON" -c "import $1" 2>/dev/null; }

kernels() {
    "$PYTHON" - <<'EOF'
import torch
from vdvae_fast import ops
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), GPU: {torch.cuda.get_device_name() if cuda else 'none'}")
print(f"C++ CPU kernels built: {ops.extension_built()}; CUDA kernels built: {ops.cuda_kernels_built()}; "
      f"Triton importable: {ops.triton_available()}")
print(f"backends for cuda tensors: {ops.available_backends('cuda') if cuda else 'no GPU'}; "
      f"for cpu tensors: {ops.available_backends('cpu')}")
EOF
}

stage_build() {
    if "$PYTHON" -c "from vdvae_fast import ops; raise SystemExit(not ops.cuda_kernels_built())" 2>/dev/null; then
        say "build: the CUDA kernels are already built; not rebuilding"
    else
        say "build: $("$PYTHON" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'); nvcc: $(nvcc --version 2>/dev/null | tail -n 1 || echo 'not found')"
        bounded "$BUILD_S" "$PYTHON" -m pip install --no-index --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1
        local rc=$?
        if ((rc != 0)) || ! "$PYTHON" -c "from vdvae_fast import ops; raise SystemExit(not ops.extension_built())" 2>/dev/null; then
            say "build: pip install -e . gave exit $rc or no importable extension; falling back to setup.py build_ext --inplace"
            if ! bounded "$BUILD_S" "$PYTHON" setup.py build_ext --inplace >>"$OUT/build.log" 2>&1; then
                say "build: setup.py build_ext failed (see build.log): the suites run what is importable"
                FAILED+=(build)
            fi
        fi
    fi
    kernels 2>&1 | tee -a "$LOG" "$OUT/build.log"
}

stage_test() {
    if ! has pytest; then
        say "test: skipped: pytest is not installed"
        return
    fi
    # Test files that import an optional package at module level cannot be collected without it.
    local ignore=() module file
    for module in hypothesis PIL; do
        has "$module" && continue
        for file in $(grep -l -E "^(from|import) $module" tests/*.py); do
            ignore+=("--ignore=$file")
            say "test: $module is not installed: ignoring $file"
        done
    done
    has skimage || say "test: scikit-image is not installed: tests that load the built-in photographs will fail"
    say "test: python -m pytest tests -x -q ${ignore[*]}"
    bounded "$TESTS_S" "$PYTHON" -m pytest tests -x -q -p no:cacheprovider "${ignore[@]}" >"$OUT/tests.log" 2>&1
    local rc=$?
    say "test: exit $rc ($( ((rc == 124)) && echo 'stopped at the time limit' || tail -n 1 "$OUT/tests.log"))"
    ((rc == 0)) || FAILED+=(test)
}

bench() {
    local suite=$1 limit=$2
    shift 2
    say "bench: python -m benchmarks --suite $suite --out $OUT $*"
    echo "=== python -m benchmarks --suite $suite $* ===" >>"$OUT/bench.log"
    bounded "$limit" "$PYTHON" -m benchmarks --suite "$suite" --out "$OUT" "$@" >>"$OUT/bench.log" 2>&1
    local rc=$?
    case $rc in
        0) say "bench: $suite done" ;;
        124) say "bench: $suite stopped at its time limit: its rows were not written" ;;
        *) say "bench: $suite failed with exit $rc (see bench.log)" ;;
    esac
    ((rc == 0)) || FAILED+=("$suite")
}

# The train suite's own budget leaves 180 s for its start, the measurement cut short 90 s after the budget,
# and the report, so that the hard limit outside is never what ends it.
stage_train() {
    local budget=$(($(left) - 180))
    ((budget > TRAIN_BUDGET_S)) && budget=$TRAIN_BUDGET_S
    ((budget < 0)) && budget=0
    bench train $((budget + 180)) --budget-s "$budget"
}

stage_ops() {
    local remaining
    remaining=$(left)
    if ((remaining >= OPS_FULL_S)); then
        bench ops $((remaining < 590 ? remaining : 590))
    elif ((remaining >= 240)); then
        say "ops: $remaining s left: the quick subset (first two shapes of each op) with torch.compile"
        bench ops "$remaining" --quick
    else
        say "ops: $remaining s left: the quick subset without torch.compile"
        bench ops "$remaining" --quick --no-compile
    fi
}

stages=("$@")
((${#stages[@]})) || stages=(build test train sample ops)
say "stages: ${stages[*]}; python: $(command -v "$PYTHON"); out: $OUT; budget ${BUDGET_S}s"
has matplotlib || say "matplotlib is not installed: the results get no PNG plot (the JSON and tables are written)"
has torch && "$PYTHON" -c "import torch; raise SystemExit(not torch.cuda.is_available())" ||
    say "warning: torch sees no GPU: the suites will measure the CPU"
for stage in "${stages[@]}"; do
    case $stage in
        build) stage_build ;;
        test) stage_test ;;
        train) stage_train ;;
        sample) bench sample "$SAMPLE_S" ;;
        ops) stage_ops ;;
        *)
            say "unknown stage $stage (build, test, train, sample, ops)"
            FAILED+=("$stage")
            ;;
    esac
done
for table in "$OUT"/*.md; do
    if [[ -e $table ]]; then cat "$table"; fi
done
say "finished in $((SECONDS - STARTED)) s; results in $OUT; ${#FAILED[@]} stage(s) failed or cut short: ${FAILED[*]:-none}"
((${#FAILED[@]} == 0))
