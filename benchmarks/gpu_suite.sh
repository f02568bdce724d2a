#!/usr/bin/env bash
# One-shot GPU suite for a machine with one H100/H200: compiled Triton kernels against their fp32
# references, kernel timings against SDPA (8K..128K tokens), and 30-step bf16 training runs of the
# small model per attention kind; under 8 minutes. Needs only torch and triton (no install of
# ltrain: the suite maps ltrain.kernels etc. to this checkout's folders itself).
#
#   bash benchmarks/gpu_suite.sh                                 # everything
#   bash benchmarks/gpu_suite.sh --sections kernels,bench        # sections: kernels, bench, train
#   bash benchmarks/gpu_suite.sh --max-seq-len 32768             # cap every sequence length
#   bash benchmarks/gpu_suite.sh --dry-run --out /tmp/suite      # CPU rehearsal: tiny shapes
#   PYTHON=/path/to/python bash benchmarks/gpu_suite.sh ...      # pick the interpreter
#
# Writes benchmarks/results/gpu_suite-<gpu>.{json,md} (or --out DIR), rewritten after each
# section. Exit status: 0 all passed, 1 some check failed or errored, 2 bad arguments or no
# usable GPU. Sections, budgets and checks: benchmarks/gpu_suite.py's docstring.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=$(command -v python3 || command -v python); fi
fi
exec "$PYTHON" benchmarks/gpu_suite.py "$@"
