#!/usr/bin/env bash
# Run one tapo-jax command on every worker of a Cloud TPU pod slice at once (SPMD: each worker
# runs the same program; jax.distributed.initialize() connects them, see
# tapo_jax/train/distributed.py).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: TPU_NAME=NAME ZONE=ZONE launch/tpu.sh [--setup] COMMAND [ARGS...]

Runs `python -m tapo_jax.cli COMMAND ARGS...` on all workers of the TPU VM slice NAME through
`gcloud compute tpus tpu-vm ssh --worker=all`. Example:

  TPU_NAME=my-v5p-32 ZONE=us-east5-a launch/tpu.sh --setup train \
      --config configs/qwen3_8b_tapo.yaml model.hf_path=/mnt/ckpt/Qwen3-8B \
      data.path=/mnt/data/train.jsonl data.eval_path=/mnt/data/aime.jsonl

Options:
  --setup     first, on every worker: clone REPO_URL into REPO_DIR (when absent) and
              pip install -e "REPO_DIR[tpu]"
  -h, --help  show this text

Environment:
  TPU_NAME    name of the TPU VM (required)
  ZONE        its zone (required)
  PROJECT     gcloud project (default: gcloud's configured project)
  REPO_DIR    checkout on the workers (default: tapo-jax, relative to the home directory)
  REPO_URL    git URL cloned by --setup when REPO_DIR is absent
  PYTHON      Python on the workers (default: python3)
  DRY_RUN=1   print the gcloud command instead of running it

Paths in ARGS (checkpoints, data, output_dir) must exist on every worker: use a shared
filesystem or GCS-fuse mount. The ssh session must stay open for the run (use tmux or nohup).
USAGE
}

setup=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --setup) setup=1; shift ;;
    *) break ;;
  esac
done
if [[ $# -eq 0 ]]; then usage >&2; exit 2; fi
: "${TPU_NAME:?set TPU_NAME (see launch/tpu.sh --help)}"
: "${ZONE:?set ZONE (see launch/tpu.sh --help)}"
REPO_DIR="${REPO_DIR:-tapo-jax}"
PYTHON="${PYTHON:-python3}"

q_dir=$(printf '%q' "$REPO_DIR")
remote=""
if [[ $setup -eq 1 ]]; then
  if [[ -n "${REPO_URL:-}" ]]; then
    clone="{ test -d $q_dir || git clone $(printf '%q' "$REPO_URL") $q_dir; }"
  else
    missing="echo \"tpu.sh: $q_dir missing on \$(hostname); set REPO_URL\" >&2; false"
    clone="{ test -d $q_dir || { $missing; }; }"
  fi
  remote="$clone && $PYTHON -m pip install -q -e \"$q_dir[tpu]\" && "
fi
remote+="cd $q_dir && TAPO_DISTRIBUTED=1 $PYTHON -m tapo_jax.cli$(printf ' %q' "$@")"

cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command="$remote")
if [[ -n "${PROJECT:-}" ]]; then cmd+=(--project "$PROJECT"); fi

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
if ! command -v gcloud >/dev/null; then
  echo "tpu.sh: gcloud not found (install the Google Cloud CLI)" >&2
  exit 127
fi
exec "${cmd[@]}"
