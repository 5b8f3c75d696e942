#!/usr/bin/env bash
# One process on this machine, all of its devices (CPU, one or more GPUs, or a single TPU host).
#
#   launch/local.sh configs/base.py runs/base [--config.mesh.expert=2 ...]
#
# The mesh comes from config.mesh (data=-1 by default: plain data parallelism over every device).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [--config.section.key=value ...]" >&2
  exit 2
fi
CONFIG=$1 WORKDIR=$2
shift 2
exec python -m moejax.train --config="$CONFIG" --workdir="$WORKDIR" "$@"
