#!/usr/bin/env bash
# One node's part of a launch/slurm.sbatch job: srun starts this once per node,
# and it starts torchrun for the node's ranks. Not meant to be run by hand.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
source "$LTRAIN_HOME/launch/slurm_lib.sh"
[ -n "${LTRAIN_NNODES:-}" ] && [ -n "${SLURM_NODEID:-}" ] ||
  ltrain_die slurm "launch/slurm_node.sh runs inside launch/slurm.sbatch's srun step, submit: sbatch --nodes=N launch/slurm.sbatch [overrides...]"
torchrun_args=$(ltrain_torchrun_args)
mapfile -t torchrun_args <<<"$torchrun_args"

# Fail with the reason, at once or within the time-out, instead of torchrun's
# traceback after its own time-out.
timeout=${LTRAIN_RDZV_TIMEOUT:-300}
if [ "$SLURM_NODEID" = 0 ]; then
  ltrain_is_local_address "$LTRAIN_RDZV_HOST" ||
    ltrain_die rendezvous "the rendezvous host $LTRAIN_RDZV_HOST is not an address of the first node $SLURMD_NODENAME ($(uname -n)), which serves it; set LTRAIN_RDZV_HOST to one of that node's addresses, or unset it"
else
  # Node 0's store is up once its torchrun has started.
  ltrain_wait_for_endpoint "$LTRAIN_RDZV_HOST" "$LTRAIN_RDZV_PORT" "$timeout" ||
    ltrain_die rendezvous "node $SLURMD_NODENAME ($(uname -n)) cannot reach the rendezvous $LTRAIN_RDZV_HOST:$LTRAIN_RDZV_PORT on the first node within ${timeout}s; check that the nodes reach each other there (LTRAIN_RDZV_HOST picks another address) and that the port is open"
fi

# SLURM signals every process of the step: the ranks handle SIGUSR1 and SIGTERM
# themselves (ltrain.preempt: finish the step, save, exit). torchrun must stay
# out of it: USR1 would kill it, and on TERM it would SIGKILL ranks still
# saving once its shutdown time-out ran out. SIG_IGN survives exec, torchrun
# leaves signals it is not told to handle alone, and the ranks install their own.
trap '' USR1 TERM
export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT  # torchrun --signals_to_handle
exec "$LTRAIN_PY" -m torch.distributed.run "${torchrun_args[@]}" -m ltrain.train "$@"
