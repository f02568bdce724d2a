# The SLURM launch logic as small functions, sourced (after launch/env.sh) by
# launch/slurm.sbatch and launch/slurm_node.sh, and tested one by one in
# tests/launch/test_slurm.py. Each prints its answer or fails with one line.

# slurm_first_host NODELIST: the allocation's first node, where the rendezvous runs.
slurm_first_host() {
  command -v scontrol >/dev/null ||
    ltrain_die slurm "scontrol not found on this node (PATH=$PATH), it is needed to read the allocation; load the SLURM module or install the client tools"
  local first
  first=$(scontrol show hostnames "$1" | head -n 1)
  [ -n "$first" ] || ltrain_die slurm "cannot expand SLURM_JOB_NODELIST=$1, run inside an allocation"
  echo "$first"
}

# slurm_node_addr NODE: the address SLURM reaches NODE at (NodeAddr); node names
# need not resolve as host names.
slurm_node_addr() {
  local addr
  addr=$(scontrol show node "$1" 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n 1 || true)
  echo "${addr:-$1}"
}

# ltrain_rdzv_host FIRST_NODE NNODES: the rendezvous host, FIRST_NODE's address or
# LTRAIN_RDZV_HOST; refuses what the other nodes cannot reach (unresolvable,
# or loopback in a multi-node job: a known field failure).
ltrain_rdzv_host() {
  local host=${LTRAIN_RDZV_HOST:-} ip
  [ -n "$host" ] || host=$(slurm_node_addr "$1")
  ip=$(getent ahosts "$host" | awk 'NR == 1 {print $1}') || true
  [ -n "$ip" ] ||
    ltrain_die rendezvous "host $host (node $1) does not resolve, set LTRAIN_RDZV_HOST to an address of node $1 that every node reaches"
  if [ "$2" -gt 1 ] && [[ "$ip" == 127.* || "$ip" == ::1 ]]; then
    ltrain_die rendezvous "host $host (node $1) resolves to loopback $ip, which the other nodes cannot reach; set LTRAIN_RDZV_HOST to node $1's network address"
  fi
  echo "$host"
}

# ltrain_rdzv_port JOB_ID: LTRAIN_RDZV_PORT, else one derived from the job id, so
# that jobs sharing a node do not collide.
ltrain_rdzv_port() {
  echo "${LTRAIN_RDZV_PORT:-$((20000 + $1 % 20000))}"
}

# ltrain_procs_per_node: ranks per node, LTRAIN_PROCS_PER_NODE (CPU nodes, tests),
# else the GPUs the allocation has on this node.
ltrain_procs_per_node() {
  local n=${LTRAIN_PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
  if [ -z "$n" ] && [ -n "${SLURM_GPUS_PER_NODE:-}" ]; then
    n=${SLURM_GPUS_PER_NODE##*:}  # "4" or "a100:4"
  fi
  [[ "$n" =~ ^[1-9][0-9]*$ ]] ||
    ltrain_die slurm "no process count: the allocation has no GPUs (SLURM_GPUS_ON_NODE unset) and LTRAIN_PROCS_PER_NODE=${LTRAIN_PROCS_PER_NODE:-<unset>}; submit with --gpus-per-node=G, or export LTRAIN_PROCS_PER_NODE=P on CPU nodes"
  echo "$n"
}

# ltrain_train_args RESTART_COUNT OVERRIDES...: sets the array LTRAIN_ARGS to the
# overrides, plus trainer.resume=auto in a requeued job (the last value of a key
# wins in Hydra), so that a first run started with resume=none or a path does
# not start over or go back to that path on every requeue.
ltrain_train_args() {
  local restarts=$1
  shift
  LTRAIN_ARGS=("$@")
  if [ "$restarts" -gt 0 ]; then LTRAIN_ARGS+=(trainer.resume=auto); fi
}

# ltrain_torchrun_args: this node's torchrun arguments, one per line, from what
# slurm.sbatch exported (LTRAIN_NNODES, LTRAIN_PROCS_PER_NODE, LTRAIN_RDZV_HOST,
# LTRAIN_RDZV_PORT, LTRAIN_RDZV_TIMEOUT, LTRAIN_RUN_ID) and SLURM_NODEID. Node 0
# serves the c10d store; the node rank itself is what the rendezvous assigns.
ltrain_torchrun_args() {
  local node=${SLURM_NODEID:?} is_host=false timeout=${LTRAIN_RDZV_TIMEOUT:-300}
  [ "$node" != 0 ] || is_host=true
  printf '%s\n' "--nnodes=$LTRAIN_NNODES" "--nproc_per_node=$LTRAIN_PROCS_PER_NODE" "--node_rank=$node" \
    "--rdzv_backend=c10d" "--rdzv_endpoint=$LTRAIN_RDZV_HOST:$LTRAIN_RDZV_PORT" "--rdzv_id=$LTRAIN_RUN_ID" \
    "--rdzv_conf=is_host=$is_host,join_timeout=$timeout,read_timeout=$timeout" "--max_restarts=0"
}

# ltrain_is_local_address HOST: whether HOST is an address of this machine (the
# first node must be the rendezvous host: its torchrun serves the store there).
ltrain_is_local_address() {
  "$LTRAIN_PY" -c 'import socket, sys
try:
    socket.socket().bind((socket.gethostbyname(sys.argv[1]), 0))
except OSError:
    sys.exit(1)' "$1"
}

# ltrain_wait_for_endpoint HOST PORT SECONDS: until something accepts connections
# there (node 0's torchrun, starting up), or fail after SECONDS.
ltrain_wait_for_endpoint() {
  local deadline=$((SECONDS + $3))
  until timeout 2 bash -c ": >/dev/tcp/$1/$2" 2>/dev/null; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 1
  done
}
