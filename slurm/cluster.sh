# shellcheck shell=bash disable=SC2034  # sets variables for the script that sources it
# How a Slurm allocation becomes a Ray cluster; sourced by addertrain.sbatch (and the tests,
# which run plan_cluster with the node lists Slurm would give a multi-node job).
#
# plan_cluster reads SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURM_CPUS_PER_TASK (or
# SLURM_CPUS_ON_NODE) and sets:
#   nodes[] head workers[]     the allocation's nodes, the Ray head (first node), the others
#   head_ip gcs_address        where the Ray head listens
#   ray_tmp job_dir token_file node-local Ray temp dir; job-private shared dir with the token
#   head_step[] worker_step[]  the srun commands that start Ray on the head and on the workers
#   stop_step[]                the srun command that stops Ray on every node
# Settings (environment): ADDERTRAIN_HEAD_IP, ADDERTRAIN_PORT_MIN/_MAX/_BLOCK,
# ADDERTRAIN_RAY_TMP, ADDERTRAIN_JOB_STATE, ADDERTRAIN_RAY_DASHBOARD (README: Running on a Slurm cluster).

slurm_dir=${slurm_dir:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}

die() {
    echo "addertrain-slurm: error: $*" >&2
    exit 2
}

# First IPv4 address of a host name; loopback only for a one-node job.
resolve_ip() {
    getent ahostsv4 "$1" 2>/dev/null | awk 'NR == 1 { print $1 }'
}

# Ports: one block per job, chosen by job ID, so jobs sharing a node do not collide.
# The range stays below Linux's ephemeral ports (32768+), which outgoing connections take.
plan_ports() {
    local lo=${ADDERTRAIN_PORT_MIN:-10000} hi=${ADDERTRAIN_PORT_MAX:-32767}
    local block=${ADDERTRAIN_PORT_BLOCK:-256}
    ((block >= 32)) || die "ADDERTRAIN_PORT_BLOCK=$block is too small: Ray needs at least 32 ports"
    local slots=$(((hi - lo + 1) / block))
    ((slots >= 1)) || die "ADDERTRAIN_PORT_MIN..MAX ($lo..$hi) holds no block of $block ports"
    local base=$((lo + (SLURM_JOB_ID % slots) * block))
    gcs_port=$base
    ray_ports=(
        --node-manager-port=$((base + 1))
        --object-manager-port=$((base + 2))
        --dashboard-agent-grpc-port=$((base + 3))
        --dashboard-agent-listen-port=$((base + 4))
        --runtime-env-agent-port=$((base + 5))
        --metrics-export-port=$((base + 6))
        --min-worker-port=$((base + 16))
        --max-worker-port=$((base + block - 1))
    )
    dashboard_port=$((base + 7))
    head_ports=(--port="$gcs_port" --dashboard-port="$dashboard_port")
    # Ray Client's server exists only with ray[client] (grpc), and then defaults to port 10001.
    if python3 -c "import grpc" 2>/dev/null; then
        head_ports+=(--ray-client-server-port=$((base + 8)))
    fi
}

plan_cluster() {
    [[ -n ${SLURM_JOB_ID:-} && -n ${SLURM_JOB_NODELIST:-} ]] ||
        die "not inside a Slurm job (SLURM_JOB_ID/SLURM_JOB_NODELIST unset): submit with sbatch or slurm/submit.sh"
    mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    ((${#nodes[@]} >= 1)) || die "cannot expand SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST with scontrol show hostnames"
    head=${nodes[0]}
    workers=("${nodes[@]:1}")

    head_ip=${ADDERTRAIN_HEAD_IP:-$(resolve_ip "$head")}
    [[ -n $head_ip ]] || die "cannot resolve the head node $head to an IPv4 address; set ADDERTRAIN_HEAD_IP"
    if [[ $head_ip == 127.* && ${#workers[@]} -gt 0 ]]; then
        die "head node $head resolves to loopback $head_ip, which the other nodes cannot reach; set ADDERTRAIN_HEAD_IP to its cluster address"
    fi
    plan_ports
    gcs_address=$head_ip:$gcs_port

    # Node-local and short: Ray puts Unix sockets in it (108-byte path limit), never on NFS.
    ray_tmp=${ADDERTRAIN_RAY_TMP:-/tmp}/ray-$(id -u)-$SLURM_JOB_ID
    # Job-private folder on shared storage: every node reads the token from it.
    job_dir=${ADDERTRAIN_JOB_STATE:-${SLURM_SUBMIT_DIR:-$PWD}/.addertrain-slurm}/job-$SLURM_JOB_ID
    token_file=$job_dir/ray_token

    local cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
    local common=("${ray_ports[@]}" --disable-usage-stats)
    # Unset: Ray's default (the dashboard and its State API run when ray[default] is installed).
    case ${ADDERTRAIN_RAY_DASHBOARD:-} in
    1) head_ports+=(--include-dashboard=true) ;;
    0) head_ports+=(--include-dashboard=false) ;;
    esac
    head_step=(srun --nodes=1 --ntasks=1 --nodelist="$head" --cpus-per-task="$cpus"
        --kill-on-bad-exit=0 bash "$slurm_dir/ray-node.sh" start "$ray_tmp" --head
        --node-ip-address="$head_ip" "${head_ports[@]}" "${common[@]}")
    worker_step=()
    if ((${#workers[@]})); then
        worker_step=(srun --nodes=${#workers[@]} --ntasks=${#workers[@]} --ntasks-per-node=1
            --exclude="$head" --cpus-per-task="$cpus" --kill-on-bad-exit=0
            bash "$slurm_dir/ray-node.sh" start "$ray_tmp" --address="$gcs_address" "${common[@]}")
    fi
    stop_step=(srun --overlap --nodes=${#nodes[@]} --ntasks=${#nodes[@]} --ntasks-per-node=1
        --cpus-per-task=1 bash "$slurm_dir/ray-node.sh" stop "$ray_tmp")
}
