#!/usr/bin/env bash
# The one prepared device script (issue 12; the call sequence: docs/gpu-runs/plan.md). On the
# lent GPU machine: install the wheels carried in parts, generate an ImageNet-format folder,
# check it, run recipes/resnet50_imagenet.yaml through the Ray executor (1 worker, 1 GPU,
# DALI mixed decode, Triton, DeepSpeed nccl) with a SIGTERM and a resume, then the same on
# synthetic data, the `gpu` tests, `bench kernels` and the compiler report. Logs, tables and
# JSON go to $OUT (the device tool brings back at most 8 files; this script writes 8).
#
#   here, first:   .venv/bin/python scripts/wheels.py download
#                  .venv/bin/python scripts/wheels.py split .whl .whl-parts
#   device calls:  carry [".whl-parts/bundle-NN"], command
#                  "python3 scripts/wheels.py receive .whl-parts/bundle-NN $WHEEL_STORE"
#                  for all bundles but the last, then carry the last and run this script
#   CPU run:       PYTHON=.venv/bin/python OUT=/tmp/out scripts/gpu_check.sh
#
# Without a GPU every section runs at CPU size: a tiny dataset, a ResNet-20 at 8 px and batch 2
# through the same Ray + DALI (CPU decode) + Triton (interpreter) + DeepSpeed (gloo) launch, the
# kernel tests and `bench kernels --quick` under the interpreter, the compiler report (sm_90).
# GPU_CHECK_ONLY="fullstack data" runs only the named sections; each section has its own time
# limit, a failure never stops the next one, and no section starts after GPU_CHECK_TOTAL_S
# seconds (default 540).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check_out}
TOTAL_S=${GPU_CHECK_TOTAL_S:-540}
ONLY=${GPU_CHECK_ONLY:-}
WORK=${GPU_CHECK_WORK:-/tmp/addertrain-gpu-check}
STORE=${WHEEL_STORE:-/tmp/addertrain-wheel-parts}
SITE=/tmp/addertrain-site
DATA=$WORK/imagenet-fake
mkdir -p "$OUT" "$WORK"
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
    if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then
        return
    fi
    local left=$(( TOTAL_S - ($(date +%s) - START) ))
    if [ "$left" -lt 15 ]; then
        printf '%-18s skipped: the %ss budget is spent\n' "$name" "$TOTAL_S" | tee -a "$SUMMARY"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit}s): $command" >> "$LOG"
    local t0
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" bash -o pipefail -c "$command" >> "$LOG" 2>&1
    local rc=$?
    local note=""
    { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && note=" (time limit)"
    echo "=== $name: exit $rc after $(( $(date +%s) - t0 ))s$note" >> "$LOG"
    printf '%-18s exit %-3s %4ss%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$note" | tee -a "$SUMMARY"
}

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    GPU=1
else
    GPU=0
fi
CLI="$PY -m addertrain.cli"
# Every launch: one Ray worker, the Triton backend, an evaluation every epoch; only the sizes
# differ between the GPU and the CPU.
FULLSTACK="distributed.executor=ray distributed.workers=1 model.backend=triton train.eval_interval=1"

if [ "$GPU" = 1 ]; then
    # The checkout maps kernels/ and launch/ to addertrain.kernels / addertrain.launch at
    # install time; links in this throwaway copy give the same imports without building it.
    section setup 90 "
        for b in .whl-parts/bundle-*; do [ -d \$b ] && $PY scripts/wheels.py receive \$b $STORE; done
        $PY scripts/wheels.py install $STORE --target $SITE --complete-only
        ln -sfn ../kernels addertrain/kernels && ln -sfn ../launch addertrain/launch
        nvidia-smi; df -h /dev/shm $WORK
        PYTHONPATH=$SITE $PY -c 'import torch, triton, deepspeed, ray, nvidia.dali as d; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), triton.__version__, deepspeed.__version__, ray.__version__, d.__version__)'"
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    # Without DALI's bundles (docs/gpu-runs/plan.md, plan A) the launch reads synthetic data.
    if "$PY" -c "import nvidia.dali" 2>/dev/null; then SOURCE="--data $DATA"; else SOURCE=""; fi
    # 100 classes x 64 training JPEGs (8 validation) at ImageNet-like sizes, written by 8
    # processes with their own seeds, then merged into one folder.
    JOBS=8 CLASSES=100 PER_JOB=8 VAL_PER_JOB=1 MIN_SIDE=200 MAX_SIDE=500
    SIZES="--batch 64 --steps 300 --sigterm-at 150 --synthetic-steps 60 --timeout 200"
    OVERRIDES="$FULLSTACK distributed.gpus_per_worker=1 distributed.cpus_per_worker=8 \
        model.num_classes=$CLASSES train.micro_batch=64 checkpoint.interval_steps=100"
    FULLSTACK_S=330
else
    echo "no CUDA device: CPU-sized parts only" | tee -a "$SUMMARY"
    export TRITON_INTERPRET=1 DS_ACCELERATOR=cpu
    SOURCE="--data $DATA"
    JOBS=2 CLASSES=4 PER_JOB=2 VAL_PER_JOB=1 MIN_SIDE=12 MAX_SIDE=32
    SIZES="--batch 2 --steps 3 --sigterm-at 1 --warmup-steps 1"
    OVERRIDES="$FULLSTACK distributed.gpus_per_worker=0 distributed.cpus_per_worker=1 \
        model.num_classes=$CLASSES model.arch=resnet20 data.image_size=8 data.eval_resize=10 \
        data.threads=1 train.micro_batch=2 checkpoint.interval_steps=2"
    FULLSTACK_S=900
fi

[ -n "$SOURCE" ] && section data 120 "
    rm -rf $DATA $WORK/parts; mkdir -p $WORK/parts
    for k in \$(seq 1 $JOBS); do
        $CLI data fake $WORK/parts/\$k --classes $CLASSES --per-class $PER_JOB \
            --val-per-class $VAL_PER_JOB --min-size $MIN_SIDE --max-size $MAX_SIDE --seed \$k &
    done
    wait
    $PY scripts/fullstack.py merge $WORK/parts $DATA
    $CLI data check $DATA"
section fullstack "$FULLSTACK_S" "rm -rf $WORK/runs; $PY scripts/fullstack.py $SOURCE \
    --runs $WORK/runs --out $OUT $SIZES recipes/resnet50_imagenet.yaml $OVERRIDES"
if [ "$GPU" = 1 ]; then
    section gpu-tests 60 "$PY -m pytest -q -n 0 -p no:cacheprovider -m gpu \
        --continue-on-collection-errors tests 2>&1 | tee -a $TESTS"
    section bench-kernels 170 "$CLI bench kernels --batch 64 --network-batch 64 --network-budget 15 \
        --json $OUT/bench_kernels.json 2>&1 | tee $OUT/bench_kernels.txt"
else
    section kernel-tests 300 "$PY -m pytest -q -n 0 -p no:cacheprovider tests/test_kernels.py 2>&1 | tee -a $TESTS"
    section bench-kernels 200 "$CLI bench kernels --quick --json $OUT/bench_kernels.json 2>&1 | tee $OUT/bench_kernels.txt"
fi
section compiler-report 60 "env -u TRITON_INTERPRET $CLI bench kernels --compiler-report --json $OUT/compiler_report.json"
echo "total $(( $(date +%s) - START ))s" | tee -a "$SUMMARY"
