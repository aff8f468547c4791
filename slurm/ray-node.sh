#!/bin/bash
# One node of the job's Ray cluster, run as an srun task by addertrain.sbatch.
#   ray-node.sh start RAY_TMP RAY_START_ARGS...  ray start --block with this node's share of the
#                                                allocation, until stopped
#   ray-node.sh stop RAY_TMP                     stop it gracefully, end any leftover Ray
#                                                process of the job here, remove RAY_TMP
# RAY_TMP is a name anyone on the node can guess, so it is used only as a folder of this user
# that nobody else can enter; Ray's own temp dir (which Ray makes world-writable) lies inside.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

fail() {
    echo "addertrain-slurm: error: $(hostname): $*" >&2
    exit 1
}

# True for a real folder (not a link) owned by this user with mode 700.
private_dir() {
    [[ $(stat -c '%F %u %a' -- "$1" 2>/dev/null) == "directory $(id -u) 700" ]]
}

# Create RAY_TMP with mode 700, or accept it only if it already is this user's private folder
# (a requeued job finds its own after a node crash).
make_private_dir() {
    (umask 077 && mkdir -- "$1" 2>/dev/null)
    private_dir "$1" && return
    if [[ -e $1 || -L $1 ]]; then
        local found
        found=$(stat -c '%F, owner uid %u, mode %a' -- "$1")
        fail "Ray temp dir $1 already exists and is not private to uid $(id -u) ($found);" \
            "another user may have made it to reach this job's Ray sockets, so Ray is not" \
            "started and the job is not requeued: remove it if it is yours, or set" \
            "ADDERTRAIN_RAY_TMP to a folder only you can write"
    fi
    fail "cannot create the Ray temp dir $1; set ADDERTRAIN_RAY_TMP to an existing node-local folder"
}

# A worker node runs ray start only once the head's GCS port answers: ray start gives up
# after about 20 s, and a head node can be slower than that to start.
wait_for_head() {
    local arg address=
    for arg; do
        [[ $arg != --address=* ]] || address=${arg#--address=}
    done
    [[ -n $address ]] || return 0
    python3 "$here/wait_for_nodes.py" --address "$address" \
        --timeout "${ADDERTRAIN_JOIN_TIMEOUT:-300}" || exit 1
}

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
    make_private_dir "$ray_tmp"
    wait_for_head "$@"
    # No drain on SIGTERM: it waits up to 30 s for work to move elsewhere, and here the
    # whole cluster stops because the run has ended.
    ADDERTRAIN_RAY_JOB=$SLURM_JOB_ID RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 \
        ray start "$@" --temp-dir="$ray_tmp/ray" \
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
    local ray_tmp=$1 pid= left
    # Someone else's folder under this name: read nothing from it, remove nothing.
    private_dir "$ray_tmp" || ray_tmp=
    [[ -z $ray_tmp ]] || pid=$(cat "$ray_tmp/node.pid" 2>/dev/null)
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
    [[ -z $ray_tmp ]] || rm -rf "$ray_tmp"
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
