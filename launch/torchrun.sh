#!/usr/bin/env bash
# torchrun wrapper for one node or many.
#
#   launch/torchrun.sh NPROC [hydra overrides...]                 # one node
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 launch/torchrun.sh 8 ...  # each node
#
# All ranks share one rendezvous id, so they also share one run directory
# (ltrain.config.run_id) instead of one per rank. On SLURM use launch/slurm.sbatch.
set -euo pipefail
usage="usage: launch/torchrun.sh NPROC [hydra overrides...]"
NPROC=${1:-}
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || { echo "$usage" >&2; exit 2; }
shift
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_PORT=${MASTER_PORT:-29500}
if [ "$NNODES" = 1 ]; then
  RUN_ID=${LTRAIN_RUN_ID:-$(date +%Y%m%d-%H%M%S)}
else
  [ -n "${LTRAIN_RUN_ID:-}" ] || ltrain_die launch "multi-node runs need one run id on every node, export LTRAIN_RUN_ID with the same value on each"
  # The other nodes cannot reach a loopback endpoint (a known field failure).
  [[ "${MASTER_ADDR:-127.}" != 127.* && "${MASTER_ADDR:-}" != localhost ]] ||
    ltrain_die launch "multi-node runs need MASTER_ADDR=${MASTER_ADDR:-<unset>} to be node 0's address that the other nodes reach, export it on every node"
  RUN_ID=$LTRAIN_RUN_ID
fi
export LTRAIN_RUN_ID=$RUN_ID

# Validate once here: otherwise every rank prints the same config error,
# followed by torchrun's ChildFailedError report.
"$LTRAIN_PY" -m ltrain.check_config --world-size "$((NNODES * NPROC))" \
  --launch "$NNODES node(s) x $NPROC process(es) per node" "$@" || exit $?

if [ "$NNODES" = 1 ]; then
  torchrun_args=(--standalone --nproc_per_node="$NPROC")
else
  torchrun_args=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC" --rdzv_backend=c10d
    --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$RUN_ID")
fi

# torchrun starts each rank in a session of its own, so a terminal's Ctrl-C or a
# `kill` of this script reaches only torchrun, which would stop the ranks on its
# own terms (SIGKILL after a time-out, then a traceback). Instead torchrun ignores
# SIGINT and SIGTERM and this script hands them to the ranks, which stop after
# the step (ltrain.preempt: SIGTERM saves first; a second Ctrl-C ends them at once).
trap '' INT TERM
export PET_SIGNALS_TO_HANDLE=SIGHUP,SIGQUIT  # torchrun --signals_to_handle
"$LTRAIN_PY" -m torch.distributed.run "${torchrun_args[@]}" -m ltrain.train "$@" &
agent=$!
forward() {
  local ranks
  ranks=$(ps -o pid= --ppid "$agent" || true)
  [ -z "$ranks" ] || kill -s "$1" $ranks 2>/dev/null || true
}
trap 'forward INT' INT
trap 'forward TERM' TERM
while true; do
  rc=0
  wait "$agent" || rc=$?
  kill -0 "$agent" 2>/dev/null || exit "$rc"  # else a trapped signal interrupted the wait
done
