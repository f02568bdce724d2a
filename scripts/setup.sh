#!/usr/bin/env bash
# Create (or reuse) the project-local virtual environment .venv and install
# ltrain into it. Idempotent: a second call with unchanged pyproject.toml
# installs nothing.
#
# torch is pinned (LTRAIN_TORCH, default torch==2.13.0) and installed first:
# an unpinned torch, asked for by a dependency, pulls gigabytes of CUDA wheels
# onto a CPU machine. deepspeed is installed without build isolation so its
# build uses this torch instead of fetching another.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${LTRAIN_TORCH:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PY=.venv/bin/python

stamp=.venv/.ltrain-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi

echo "ltrain setup: installing into .venv (first run takes a few minutes)" >&2
"$PY" -m pip install -q --upgrade pip setuptools wheel
"$PY" -m pip install -q "$TORCH_SPEC"
"$PY" -m pip install -q triton ninja packaging psutil py-cpuinfo pydantic hjson msgpack tqdm numpy
"$PY" -m pip install -q --no-build-isolation "deepspeed>=0.16"
# setuptools' notice that an editable install exists is the point of it, not a problem.
PYTHONWARNINGS="ignore::UserWarning" "$PY" -m pip install -q --no-build-isolation -e ".[test]"
"$PY" -c "import torch, triton, deepspeed, megatron.core, hydra, wandb" >/dev/null 2>&1 \
  || { echo "ltrain setup: an import failed after install; rerun with pip output visible" >&2; exit 1; }
# DeepSpeed's CPU accelerator JIT-builds its shared-memory comm op on first
# use (~40 s); build it now, into the cache ltrain.engine points at.
# Its log lines (accelerator detection) are shown only if the build fails.
ds_log=$(mktemp)
DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/ltrain/torch_extensions} \
  "$PY" -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >"$ds_log" 2>&1 \
  || { cat "$ds_log" >&2; echo "ltrain setup: building DeepSpeed's CPU comm op failed (log above)" >&2; exit 1; }
rm -f "$ds_log"
echo "$want" > "$stamp"
echo "ltrain setup: done ($("$PY" -c 'import torch; print("torch", torch.__version__)'))" >&2
