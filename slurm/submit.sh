#!/bin/bash
# Submit a recipe as one Slurm job: a Ray cluster over the nodes, one training run on it.
#
#   slurm/submit.sh RECIPE [--nodes N] [--gpus-per-node G] [--cpus-per-node C] [--time T]
#                   [--partition P] [--account A] [--job-name NAME] [--run-dir DIR]
#                   [--warn SECONDS] [--max-requeues K] [--sbatch ARG]... [--dry-run]
#                   [key.path=value ...]
#
# With GPUs and no distributed.workers override, the run gets one worker per GPU.
# The recipe and overrides are checked here first, so a typo fails before queueing.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
usage() {
    sed -n '4,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}
fail() {
    echo "submit.sh: error: $*" >&2
    exit 2
}
need_value() { [[ $# -ge 2 && -n $2 ]] || fail "$1 needs a value"; }
need_int() { [[ $2 =~ ^[0-9]+$ ]] || fail "$1 must be a whole number (got '$2')"; }

nodes=1 gpus=0 cpus='' warn=300 dry_run='' recipe=''
sbatch_args=() overrides=()
while (($#)); do
    case $1 in
    -h | --help) usage ;;
    --nodes | --gpus-per-node | --cpus-per-node | --warn | --max-requeues)
        need_value "$@"
        need_int "$1" "$2"
        case $1 in
        --nodes) nodes=$2 ;;
        --gpus-per-node) gpus=$2 ;;
        --cpus-per-node) cpus=$2 ;;
        --warn) warn=$2 ;;
        --max-requeues) export ADDERTRAIN_MAX_REQUEUES=$2 ;;
        esac
        shift 2
        ;;
    --time | --partition | --account | --job-name)
        need_value "$@"
        sbatch_args+=("$1=$2")
        shift 2
        ;;
    --run-dir)
        need_value "$@"
        mkdir -p "$2" || fail "cannot create the run directory $2"
        overrides+=("run.dir=$(cd "$2" && pwd)")
        shift 2
        ;;
    --sbatch)
        need_value "$@"
        sbatch_args+=("$2")
        shift 2
        ;;
    --dry-run)
        dry_run=1
        shift
        ;;
    -*) fail "unknown option $1 (see --help; pass other sbatch options as --sbatch --OPTION=VALUE)" ;;
    *=*)
        overrides+=("$1")
        shift
        ;;
    *)
        [[ -z $recipe ]] || fail "two recipes given ($recipe, $1); overrides look like key.path=value"
        recipe=$1
        shift
        ;;
    esac
done
[[ -n $recipe ]] || usage
[[ -f $recipe ]] || fail "recipe $recipe does not exist; pass a YAML file such as recipes/digits.yaml"
((nodes >= 1)) || fail "--nodes must be at least 1"

if ((gpus > 0)); then
    sbatch_args+=("--gpus-per-node=$gpus")
    if [[ " ${overrides[*]} " != *" distributed.workers="* ]]; then
        overrides+=("distributed.workers=$((nodes * gpus))" "distributed.gpus_per_worker=1")
    fi
fi
if [[ -n $cpus ]]; then
    sbatch_args+=("--cpus-per-task=$cpus")
else
    # The whole node: Ray gets every CPU of it.
    sbatch_args+=(--exclusive)
fi
export ADDERTRAIN_SLURM_DIR=$here
if [[ -z ${ADDERTRAIN_VENV:-} && -n ${VIRTUAL_ENV:-} ]]; then
    export ADDERTRAIN_VENV=$VIRTUAL_ENV
fi

# Check the recipe with the code the run uses, when this machine has the environment.
py=${ADDERTRAIN_VENV:+$ADDERTRAIN_VENV/bin/}python3
if "$py" -c "import addertrain.config" 2>/dev/null; then
    "$py" "$here/check_recipe.py" --gpus-per-node "$gpus" "$recipe" "${overrides[@]}" || exit 2
fi

cmd=(sbatch --parsable --nodes="$nodes" --signal="B:USR1@$warn" "${sbatch_args[@]}"
    "$here/addertrain.sbatch" "$recipe" "${overrides[@]}")
if [[ -n $dry_run ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
job=$("${cmd[@]}")
job=${job%%;*}
log=$(scontrol show job "$job" -o 2>/dev/null | grep -o ' StdOut=[^ ]*' | cut -d= -f2- || true)
cat <<EOF
submitted job $job
  log:     ${log:-see scontrol show job $job}
  watch:   squeue -j $job; tail -f ${log:-LOG}
  requeue with a checkpoint now: scancel --batch --signal=USR1 $job
  stop with a checkpoint:        scancel --batch --signal=TERM $job
  cancel at once:                scancel $job
EOF
