#!/usr/bin/env bash
# A Cloud TPU pod slice: the same command on every host via `gcloud ... ssh --worker=all`.
# jax.distributed.initialize() auto-detects the TPU hosts (MOEJAX_DISTRIBUTED=auto). The repo and
# its .venv must already exist at REPO_DIR on every worker; WORKDIR should be a gs:// bucket or a
# shared filesystem (orbax writes checkpoints collectively from all hosts).
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh configs/base.py gs://bucket/runs/base \
#       --config.mesh.expert=8 --config.model.compute_dtype=bfloat16
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: TPU_NAME=... ZONE=... [PROJECT=...] [REPO_DIR=~/moejax] $0 CONFIG WORKDIR [overrides]" >&2
  exit 2
fi
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO_DIR=${REPO_DIR:-'~/moejax'}
CONFIG=$1 WORKDIR=$2
shift 2
EXTRA=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} \
  --worker=all \
  --command="cd $REPO_DIR && MOEJAX_DISTRIBUTED=auto .venv/bin/python -m moejax.train \
--config=$CONFIG --workdir=$WORKDIR$EXTRA"
