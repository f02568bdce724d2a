#!/usr/bin/env bash
# torchrun wrapper for one node or many.
#
#   launch/torchrun.sh NPROC [hydra overrides...]                 # one node
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 launch/torchrun.sh 8 ...  # each node
#
# All ranks share one rendezvous id, so they also share one run directory
# (ltrain.config.run_id) instead of one per rank.
set -euo pipefail
NPROC=${1:?usage: launch/torchrun.sh NPROC [overrides...]}
shift
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [ "$NNODES" = 1 ]; then
  RUN_ID=${LTRAIN_RUN_ID:-$(date +%Y%m%d-%H%M%S)}
else
  RUN_ID=${LTRAIN_RUN_ID:?multi-node: export LTRAIN_RUN_ID with the same value on every node}
fi
export LTRAIN_RUN_ID=$RUN_ID
PY=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
[ -x "$PY" ] || PY=python3

if [ "$NNODES" = 1 ]; then
  exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m ltrain.train "$@"
fi
exec "$PY" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" \
  --nproc_per_node="$NPROC" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
  --rdzv_id="$RUN_ID" -m ltrain.train "$@"
