#!/usr/bin/env bash
# Multi-node CUDA launcher: start it once on every node (by hand, pdsh, or `srun` under Slurm).
# Each process drives all GPUs of its node; jax.distributed.initialize() connects the processes
# (see tapo_jax/train/distributed.py), then the same SPMD program runs everywhere.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/gpu.sh COMMAND [ARGS...]

Runs `python -m tapo_jax.cli COMMAND ARGS...` with the distributed coordinates and XLA settings
for multi-node CUDA. Example, two nodes (run on each, PROCESS_ID 0 on the first):

  TAPO_COORDINATOR_ADDRESS=10.0.0.1:12345 TAPO_NUM_PROCESSES=2 TAPO_PROCESS_ID=0 \
      launch/gpu.sh train --config configs/qwen3_8b_tapo.yaml model.hf_path=/data/Qwen3-8B ...

Under Slurm (one task per node), the three values come from the job when unset:
  srun --nodes=2 --ntasks-per-node=1 launch/gpu.sh train --config configs/qwen3_8b_tapo.yaml ...

Environment:
  TAPO_COORDINATOR_ADDRESS  host:port of process 0 (Slurm: first node of the job, port
                            TAPO_COORDINATOR_PORT, default derived from the job id)
  TAPO_NUM_PROCESSES        number of processes (Slurm: SLURM_NTASKS)
  TAPO_PROCESS_ID           this process, 0..N-1 (Slurm: SLURM_PROCID)
  TAPO_LOCAL_DEVICE_IDS     optional comma list of the GPUs this process drives
                            (one process per GPU: TAPO_LOCAL_DEVICE_IDS=$SLURM_LOCALID)
  XLA_PYTHON_CLIENT_MEM_FRACTION  share of GPU memory JAX preallocates (default 0.90)
  XLA_FLAGS                 appended after the defaults below, so yours win
  PYTHON                    Python interpreter (default: python3)
  DRY_RUN=1                 print the environment and command instead of running them

Default XLA flags: latency-hiding scheduler, highest-priority async stream, pipelined
all-gather (overlap FSDP collectives with compute).
USAGE
}

case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  "") usage >&2; exit 2 ;;
esac

if [[ -z "${TAPO_NUM_PROCESSES:-}" && -n "${SLURM_JOB_ID:-}" && -n "${SLURM_NTASKS:-}" ]]; then
  export TAPO_NUM_PROCESSES="$SLURM_NTASKS"
  export TAPO_PROCESS_ID="${TAPO_PROCESS_ID:-$SLURM_PROCID}"
  if [[ -z "${TAPO_COORDINATOR_ADDRESS:-}" ]]; then
    if ! command -v scontrol >/dev/null; then
      echo "gpu.sh: scontrol not found; set TAPO_COORDINATOR_ADDRESS" >&2
      exit 2
    fi
    # awk reads the whole list (head would close the pipe early: SIGPIPE under pipefail)
    nodes="${SLURM_STEP_NODELIST:-$SLURM_JOB_NODELIST}"
    head_node=$(scontrol show hostnames "$nodes" | awk "NR == 1")
    port="${TAPO_COORDINATOR_PORT:-$((61440 + SLURM_JOB_ID % 4096))}"
    export TAPO_COORDINATOR_ADDRESS="$head_node:$port"
  fi
fi
if [[ -n "${TAPO_NUM_PROCESSES:-}" ]]; then
  : "${TAPO_COORDINATOR_ADDRESS:?set TAPO_COORDINATOR_ADDRESS=host:port of process 0}"
  : "${TAPO_PROCESS_ID:?set TAPO_PROCESS_ID (0..TAPO_NUM_PROCESSES-1)}"
fi

export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
default_flags="--xla_gpu_enable_latency_hiding_scheduler=true"
default_flags+=" --xla_gpu_enable_highest_priority_async_stream=true"
default_flags+=" --xla_gpu_enable_pipelined_all_gather=true"
export XLA_FLAGS="$default_flags${XLA_FLAGS:+ $XLA_FLAGS}"
PYTHON="${PYTHON:-python3}"

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  for v in TAPO_COORDINATOR_ADDRESS TAPO_NUM_PROCESSES TAPO_PROCESS_ID TAPO_LOCAL_DEVICE_IDS \
           XLA_PYTHON_CLIENT_MEM_FRACTION XLA_FLAGS; do
    echo "$v=${!v:-}"
  done
  printf '%q ' "$PYTHON" -m tapo_jax.cli "$@"; echo
  exit 0
fi
exec "$PYTHON" -m tapo_jax.cli "$@"
