#!/usr/bin/env bash
# One short accelerator check (CUDA GPU or TPU), a few minutes: a random-weight
# Qwen3-0.6B-shaped RL step (MFU, peak memory), decode throughput (HBM-bandwidth fraction) and
# the attention implementation `auto` picks (cudnn / splash) against the xla reference.
# Usage, from the repository root on the accelerator host (JAX for the backend installed,
# e.g. pip install -e '.[cuda]' or '.[tpu]'):
#   benchmarks/device_check.sh [--rows 8 --length 2048 --slots 64 --new-tokens 256]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
backend=$($PY -c "import jax; print(jax.default_backend())")
if [ "$backend" = "cpu" ]; then
  echo "device_check: JAX sees no accelerator (backend cpu); install jax[cuda12] or jax[tpu]" >&2
  exit 2
fi
exec timeout 280 $PY benchmarks/device_check.py "$@"
