#!/usr/bin/env bash
# The one device call: on the lent GPU machine, install the carried wheels, run the kernel
# tests and every `gpu` test on CUDA, benchmark the kernels, and leave logs, tables and JSON
# in $OUT (the device tool brings back at most 8 files; this script writes 7).
#
#   here, first:   scripts/fetch_gpu_wheels.sh                 (fills .whl/, git-ignored)
#   device call:   carry [".whl"], command "scripts/gpu_check.sh", timeout_s 540
#   CPU dry run:   PYTHON=.venv/bin/python OUT=/tmp/out scripts/gpu_check.sh
#
# Without a GPU it runs only what the CPU can: the kernel tests and `bench kernels --quick`
# under the Triton interpreter, and the compiler report (ahead-of-time compile for sm_90).
# Every section has its own time limit and a failure never stops the next one; the whole
# run stops starting sections at GPU_CHECK_TOTAL_S seconds (default 480). Run 1 took 239 s
# (kernel tests 93 s); run 2 compiles 5 forward configs instead of 3 and times each for
# 30 ms instead of 125 ms, so about 270 s is expected.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check_out}
TOTAL_S=${GPU_CHECK_TOTAL_S:-480}
SITE=/tmp/addertrain-site
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/summary.txt
TESTS=$OUT/tests.txt
: > "$LOG"; : > "$SUMMARY"; : > "$TESTS"
export PYTHONUNBUFFERED=1
START=$(date +%s)

# section NAME LIMIT_S SHELL_COMMAND: run under a time limit clipped to what is left of
# TOTAL_S; output goes to the log; the exit status goes to the summary.
section() {
    local name=$1 limit=$2 command=$3
    local left=$(( TOTAL_S - ($(date +%s) - START) ))
    if [ "$left" -lt 15 ]; then
        printf '%-18s skipped: the %ss budget is spent\n' "$name" "$TOTAL_S" | tee -a "$SUMMARY"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit}s): $command" >> "$LOG"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" bash -o pipefail -c "$command" >> "$LOG" 2>&1
    local rc=$?
    local note=""
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note=" (time limit)"
    echo "=== $name: exit $rc after $(( $(date +%s) - t0 ))s$note" >> "$LOG"
    printf '%-18s exit %-3s %4ss%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$note" | tee -a "$SUMMARY"
}

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    GPU=1
else
    GPU=0
fi
CLI="$PY -m addertrain.cli"

if [ "$GPU" = 1 ]; then
    # The checkout maps kernels/ and launch/ to addertrain.kernels / addertrain.launch at
    # install time; links in this throwaway copy give the same imports without building it.
    section setup 45 "
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whl/*.whl
        ln -sfn ../kernels addertrain/kernels && ln -sfn ../launch addertrain/launch
        nvidia-smi -L; $PY -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'
        PYTHONPATH=$SITE $PY -c 'import addertrain.kernels, addertrain.launch, deepspeed, pydantic; print(\"deepspeed\", deepspeed.__version__)'"
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    section kernel-tests 150 "$PY -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee -a $TESTS"
    section bench-kernels 170 "$CLI bench kernels --batch 64 --network-batch 64 --network-budget 15 \
        --json $OUT/bench_kernels.json 2>&1 | tee $OUT/bench_kernels.txt"
    # Training smoke: ResNet-50 AdderNet, batch 32 at 224, 8 steps through DeepSpeed on one GPU.
    section smoke 90 "$CLI launch recipes/resnet50_imagenet.yaml --smoke run.dir=/tmp/runs 2>&1 | tail -40 | tee $OUT/smoke.txt"
    section gpu-tests 30 "$PY -m pytest -q -p no:cacheprovider -m gpu --continue-on-collection-errors \
        --ignore=tests/test_kernels.py tests 2>&1 | tee -a $TESTS"
else
    echo "no CUDA device: interpreter-sized parts only" | tee -a "$SUMMARY"
    section wheels 10 "ls .whl/*.whl && for w in deepspeed pydantic pydantic_core annotated_types typing_inspection hjson; do ls .whl/\$w-*.whl > /dev/null || exit 1; done"
    section kernel-tests 300 "TRITON_INTERPRET=1 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee -a $TESTS"
    section bench-kernels 200 "TRITON_INTERPRET=1 $CLI bench kernels --quick --json $OUT/bench_kernels.json 2>&1 | tee $OUT/bench_kernels.txt"
fi
section compiler-report 60 "env -u TRITON_INTERPRET $CLI bench kernels --compiler-report --json $OUT/compiler_report.json"
echo "total $(( $(date +%s) - START ))s" | tee -a "$SUMMARY"
