# The launch environment, sourced by launch/torchrun.sh, launch/slurm.sbatch and
# launch/slurm_node.sh so that all of them run ltrain the same way. Values
# already in the environment win, so a site can override any of them.
#
# Defines LTRAIN_HOME (the checkout), LTRAIN_PY (its Python) and ltrain_die.

LTRAIN_HOME=${LTRAIN_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
LTRAIN_PY=${PYTHON:-$LTRAIN_HOME/.venv/bin/python}
[ -x "$LTRAIN_PY" ] || LTRAIN_PY=python3

# One line, the project's error format, exit 2: `ltrain: <kind> error: <what>, <fix>`.
ltrain_die() {
  echo "ltrain: $1 error: $2" >&2
  exit 2
}

# DeepSpeed picks its accelerator at import; a CPU node must say so before that.
if [ -z "${DS_ACCELERATOR:-}" ]; then
  if nvidia-smi -L >/dev/null 2>&1; then DS_ACCELERATOR=cuda; else DS_ACCELERATOR=cpu; fi
fi
export DS_ACCELERATOR
# DeepSpeed's JIT ops (the CPU comm op) build once into a cache ltrain controls.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/ltrain/torch_extensions}
# A failed NCCL rank aborts the collective instead of leaving the others waiting
# for the full process-group timeout (pre-empted nodes used to hang in barriers).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME are left to the site: interface names
# differ per cluster, and a wrong one fails where the default would work.
# torchrun forwards SIGTERM to its ranks, which then finish a step and write a
# checkpoint (ltrain.preempt): give them longer than torchrun's default 30 s.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}
# Log lines reach the job's output file as they happen, not at exit.
export PYTHONUNBUFFERED=1
