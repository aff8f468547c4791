#!/bin/bash
# One node of the job's Ray cluster, run as an srun task by addertrain.sbatch.
#   ray-node.sh start RAY_TMP RAY_START_ARGS...  ray start --block with this node's share of the
#                                                allocation, until stopped
#   ray-node.sh stop RAY_TMP                     stop it gracefully, end any leftover Ray
#                                                process of the job here, remove RAY_TMP
set -uo pipefail

gpus_on_node() {
    if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [[ -n ${CUDA_VISIBLE_DEVICES:-} && $CUDA_VISIBLE_DEVICES != NoDevFiles ]]; then
        local ids
        IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
    else
        # Explicit 0: Ray would otherwise claim every GPU of a shared node.
        echo 0
    fi
}

# Processes carrying this job's marker; Ray passes its environment down to every
# process it starts, whatever their command line turns into (ray::RayTrainWorker...).
marked_pids() {
    local env pid
    for env in /proc/[0-9]*/environ; do
        pid=${env#/proc/}
        pid=${pid%/environ}
        if grep -qszx "ADDERTRAIN_RAY_JOB=$SLURM_JOB_ID" "$env"; then
            echo "$pid"
        fi
    done
}

start() {
    local ray_tmp=$1 ray_pid rc stopping=
    shift
    mkdir -p "$ray_tmp" || exit 1
    # No drain on SIGTERM: it waits up to 30 s for work to move elsewhere, and here the
    # whole cluster stops because the run has ended.
    ADDERTRAIN_RAY_JOB=$SLURM_JOB_ID RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 \
        ray start "$@" --temp-dir="$ray_tmp" \
        --num-cpus="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}" \
        --num-gpus="$(gpus_on_node)" --block &
    ray_pid=$!
    echo $$ >"$ray_tmp/node.pid"
    # ray start --block stops the node's processes on SIGTERM (then exits 1).
    trap 'stopping=1; kill -TERM "$ray_pid" 2>/dev/null' TERM
    while :; do
        wait "$ray_pid"
        rc=$?
        kill -0 "$ray_pid" 2>/dev/null || break
    done
    if [[ -n $stopping ]]; then
        rm -rf "$ray_tmp"
        exit 0
    fi
    exit "$rc"
}

stop() {
    local ray_tmp=$1 pid left
    pid=$(cat "$ray_tmp/node.pid" 2>/dev/null)
    if [[ -n $pid ]] && grep -qszx "SLURM_JOB_ID=$SLURM_JOB_ID" "/proc/$pid/environ"; then
        kill -TERM "$pid"
        for _ in $(seq 90); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
    fi
    mapfile -t left < <(marked_pids)
    if ((${#left[@]})); then
        echo "addertrain-slurm: $(hostname): ending ${#left[@]} leftover Ray processes" >&2
        kill -TERM "${left[@]}" 2>/dev/null
        for _ in $(seq 20); do
            mapfile -t left < <(marked_pids)
            ((${#left[@]})) || break
            sleep 0.5
        done
        ((${#left[@]} == 0)) || kill -KILL "${left[@]}" 2>/dev/null
    fi
    rm -rf "$ray_tmp"
}

case ${1:-} in
start | stop)
    [[ $# -ge 2 ]] || { echo "ray-node.sh $1 needs the Ray temp dir" >&2; exit 2; }
    "$@"
    ;;
*)
    echo "usage: ray-node.sh start RAY_TMP RAY_START_ARGS... | stop RAY_TMP" >&2
    exit 2
    ;;
esac
