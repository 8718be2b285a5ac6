#!/usr/bin/env bash
# The GPU check of vdvae_fast in one call of at most 8 minutes on one H100/H200 (no network needed).
#
#   bash benchmarks/run_gpu.sh              # the check
#   bash benchmarks/run_gpu.sh --dry-run    # the same stages on the CPU with tiny shapes, in under 3 minutes
#   bash benchmarks/run_gpu.sh --full       # the check, then the full op, train and sample suites (long)
#
# Stages, each writing its results the moment it ends (a run cut short keeps everything finished before):
#   build  in the background from the start: the CUDA extension for this GPU's architecture only
#          (TORCH_CUDA_ARCH_LIST from torch.cuda.get_device_capability()), into a scratch folder, installed into
#          vdvae_fast/ only when stage (a) is over; skipped when the CUDA kernels are already built.
#   (a)    Triton, no build needed: the quick parity tests (tests/test_gpu_quick.py: every op, float32 and
#          bfloat16, both layouts, M = 10) in parallel processes under a time limit (benchmarks/parity.py), then
#          the op suite at the roofline shapes for triton, the eager original and torch.compile of it.
#   (b)    cuda, once built: the same parity tests and op rows; the results table then says which backend is
#          fastest per (op, layout, dtype) next to what `auto` picks.
#   (c)    the imagenet64 training step, baseline and best at batch 4, and the largest batch each fits, with
#          peak memory, under a time budget.
# --dry-run runs it all on the CPU: interpreted Triton, the C++ `cpu` backend in place of `cuda`, the tiny
# preset, and in place of the build only setup.py's own checks (no compiler runs).
#
# Files, all directly under $OUT (default benchmarks/results), 7 at most: run_gpu.log (this script's summary),
# build.log, tests.log, bench.log, and the results <device>.json, .md and .png.
# Time bounds in seconds, GPU / dry run, each overridden by the environment variable named: BUDGET_S=470/170 for
# the whole check (+1500 with --full); BUILD_S=300/60 for the build, from the start; PARITY_S=150/60 for each
# parity run; the Triton op rows OPS_BUDGET_S=100/20 (no torch.compile row but the first starts after it) + 60;
# the cuda op rows 90; the train suite TRAIN_BUDGET_S=90/15 (no batch sweep starts after it) + TRAIN_RESERVE_S=
# 60/45. Every stage gets at most what is left of BUDGET_S.

set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DRY_RUN=0
FULL=0
for arg in "$@"; do
    case $arg in
        --dry-run) DRY_RUN=1 ;;
        --full) FULL=1 ;;
        -h | --help)
            sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "run_gpu.sh: unknown argument $arg (valid: --dry-run, --full, --help)" >&2
            exit 2
            ;;
    esac
done

OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/run_gpu.log
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
export PYTHONUNBUFFERED=1
STARTED=$SECONDS
FAILED=() # stages that failed or were cut short: the exit status is 1 if any

if ((DRY_RUN)); then
    export TRITON_INTERPRET=1 # Triton's interpreter runs the kernels on CPU tensors
    DEVICE=cpu
    BUILT_BACKEND=cpu # the compiled backend of a CPU machine stands in for cuda
    SIZE=--tiny
    JOBS=2
    BUDGET_S=${BUDGET_S:-170}
    BUILD_S=${BUILD_S:-60}
    PARITY_S=${PARITY_S:-60}
    OPS_BUDGET_S=${OPS_BUDGET_S:-20}
    TRAIN_BUDGET_S=${TRAIN_BUDGET_S:-15}
    TRAIN_RESERVE_S=${TRAIN_RESERVE_S:-45} # more than the train suite's 30 s grace (train_suite.GRACE_S)
else
    DEVICE=cuda
    BUILT_BACKEND=cuda
    SIZE=--quick
    JOBS=$(($(nproc) / 2 > 1 ? $(nproc) / 2 : 1)) # the other half of the cores builds the extension
    BUDGET_S=${BUDGET_S:-470}
    BUILD_S=${BUILD_S:-300} # from the start; stage (a) takes about as long
    PARITY_S=${PARITY_S:-150}
    OPS_BUDGET_S=${OPS_BUDGET_S:-100}
    TRAIN_BUDGET_S=${TRAIN_BUDGET_S:-90}
    TRAIN_RESERVE_S=${TRAIN_RESERVE_S:-60} # more than the train suite's 30 s grace (train_suite.GRACE_S)
fi
((FULL)) && BUDGET_S=$((BUDGET_S + 1500))

say() { echo "[run_gpu +$((SECONDS - STARTED))s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET_S - (SECONDS - STARTED))); }

# bounded SECONDS CMD...: CMD under a wall-clock limit of SECONDS or the time left, whichever is less.
# Exit status 124 means it was stopped at the limit; 125 that too little time was left to start it.
bounded() {
    local limit=$1 remaining
    shift
    remaining=$(left)
    ((remaining < limit)) && limit=$remaining
    if ((limit < 10)); then
        say "no time left for: $*"
        return 125
    fi
    timeout --signal=INT --kill-after=15 "$limit" "$@"
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

# The build runs in the background; build_wait collects it. In a dry run setup.py only checks its arguments
# (--name): the extension is declared, nothing compiled, and the CPU build already in place is used.
BUILD_PID=
build_start() {
    if ((!DRY_RUN)) && "$PYTHON" -c "from vdvae_fast import ops; raise SystemExit(not ops.cuda_kernels_built())" 2>/dev/null; then
        say "build: the CUDA kernels are already built; not rebuilding"
        return
    fi
    local arch
    if ((DRY_RUN)); then
        arch=9.0 # no GPU to ask: the H100/H200 architecture
    else
        arch=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || arch=
    fi
    if [[ -z $arch ]]; then
        say "build: torch sees no GPU: not building"
        FAILED+=(build)
        return
    fi
    local command=("$PYTHON" setup.py build_ext --build-lib "$SCRATCH/lib" --build-temp "$SCRATCH/tmp")
    ((DRY_RUN)) && command=("$PYTHON" setup.py --name)
    local ninja
    ninja=$("$PYTHON" -c "from torch.utils import cpp_extension as c; print('yes' if c.is_ninja_available() else 'no: one source after another')")
    say "build: in the background, at most ${BUILD_S}s: TORCH_CUDA_ARCH_LIST=$arch ${command[*]}; nvcc: $(nvcc --version 2>/dev/null | tail -n 1 || echo 'not found'); ninja: $ninja"
    (
        export TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(($(nproc) - JOBS > 1 ? $(nproc) - JOBS : 1))
        bounded "$BUILD_S" "${command[@]}" >"$OUT/build.log" 2>&1
        echo $? >"$SCRATCH/build.rc"
    ) &
    BUILD_PID=$!
}

build_wait() {
    if [[ -z $BUILD_PID ]]; then # nothing started: already built, or no GPU to build for
        [[ " ${FAILED[*]} " != *" build "* ]]
        return
    fi
    say "build: waiting for the background build"
    wait "$BUILD_PID"
    BUILD_PID=
    local rc
    rc=$(cat "$SCRATCH/build.rc" 2>/dev/null || echo 1)
    if ((rc != 0)); then
        say "build: exit $rc (see build.log): stage (b) runs without the CUDA kernels"
        FAILED+=(build)
        return 1
    fi
    if ((DRY_RUN)); then
        say "build: dry run: setup.py checked; the extension already in vdvae_fast/ stands in"
    else
        local library
        library=$(find "$SCRATCH/lib" -name '_C*.so' | head -n 1)
        if [[ -z $library ]]; then
            say "build: no _C*.so was produced (see build.log)"
            FAILED+=(build)
            return 1
        fi
        cp "$library" "vdvae_fast/$(basename "$library").tmp" && mv "vdvae_fast/$(basename "$library").tmp" "vdvae_fast/$(basename "$library")"
        say "build: installed vdvae_fast/$(basename "$library")"
    fi
    kernels 2>&1 | tee -a "$LOG" "$OUT/build.log"
}

parity() {
    local backend=$1 rc
    say "tests: quick parity of $backend, $JOBS processes (benchmarks/parity.py)"
    bounded $((PARITY_S + 30)) "$PYTHON" -m benchmarks.parity --backends "$backend" --jobs "$JOBS" \
        --timeout-s "$PARITY_S" --log "$OUT/tests.log" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    say "tests: $backend exit $rc$( ((rc == 0)) && echo ': all passed' || echo ': see tests.log')"
    ((rc == 0)) || FAILED+=("tests-$backend")
}

bench() {
    local label=$1 limit=$2 rc
    shift 2
    say "bench: python -m benchmarks --out $OUT --device $DEVICE $*"
    echo "=== python -m benchmarks --device $DEVICE $* ===" >>"$OUT/bench.log"
    bounded "$limit" "$PYTHON" -m benchmarks --out "$OUT" --device "$DEVICE" "$@" >>"$OUT/bench.log" 2>&1
    rc=$?
    case $rc in
        0) say "bench: $label done: results in $OUT" ;;
        124) say "bench: $label stopped at its time limit: its rows were not written" ;;
        *) say "bench: $label failed with exit $rc (see bench.log)" ;;
    esac
    ((rc == 0)) || FAILED+=("$label")
}

winners() {
    local table
    for table in "$OUT"/*.md; do
        [[ -e $table ]] && sed -n '/^### fastest kernel backend/,$p' "$table" | tee -a "$LOG"
    done
}

say "run_gpu.sh$( ((DRY_RUN)) && echo ' --dry-run')$( ((FULL)) && echo ' --full'): python $(command -v "$PYTHON"), out $OUT, budget ${BUDGET_S}s"
"$PYTHON" -c "import matplotlib" 2>/dev/null || say "matplotlib is not installed: no PNG plot (the JSON and table are written)"
if ((!DRY_RUN)) && ! "$PYTHON" -c "import torch; raise SystemExit(not torch.cuda.is_available())"; then
    say "torch sees no GPU: use --dry-run on a machine without one"
    exit 1
fi
kernels 2>&1 | tee -a "$LOG"
build_start

# (a) Triton, while the extension builds.
parity triton
bench ops-triton $((OPS_BUDGET_S + 60)) --suite ops "$SIZE" --backends triton,original,compile --budget-s "$OPS_BUDGET_S"

# (b) the built backend.
if build_wait; then
    parity "$BUILT_BACKEND"
    bench "ops-$BUILT_BACKEND" 90 --suite ops "$SIZE" --backends "$BUILT_BACKEND"
    winners
fi

# (c) the training step; its own budget leaves TRAIN_RESERVE_S for the measurement in flight and the report.
train_budget=$(($(left) - TRAIN_RESERVE_S < TRAIN_BUDGET_S ? $(left) - TRAIN_RESERVE_S : TRAIN_BUDGET_S))
((train_budget < 0)) && train_budget=0
bench train $((train_budget + TRAIN_RESERVE_S)) --suite train "$SIZE" --budget-s "$train_budget"

if ((FULL)); then
    say "full suites: ops, train, sample"
    bench ops-full 590 --suite ops --budget-s 400
    bench train-full 590 --suite train --budget-s 400
    bench sample-full 300 --suite sample
fi

say "finished in $((SECONDS - STARTED)) s; results in $OUT; ${#FAILED[@]} stage(s) failed or cut short: ${FAILED[*]:-none}"
((${#FAILED[@]} == 0))
