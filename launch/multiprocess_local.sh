#!/usr/bin/env bash
# A real multi-process (multi-controller) run on one machine: NPROC processes with DEVICES CPU
# devices each, joined by jax.distributed on 127.0.0.1, cross-process collectives over gloo.
# It exercises exactly the code paths of a multi-host GPU/TPU job.
#
#   NPROC=2 DEVICES=2 launch/multiprocess_local.sh configs/base.py:smoke /tmp/mp \
#       --config.mesh.expert=2
#
# Logs: WORKDIR/process_<i>.log. Every process is killed if one fails or on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 2 ]]; then
  echo "usage: [NPROC=2] [DEVICES=2] [PORT=...] $0 CONFIG WORKDIR [--config.section.key=value ...]" >&2
  exit 2
fi
CONFIG=$1 WORKDIR=$2
shift 2
NPROC=${NPROC:-2}
DEVICES=${DEVICES:-2}
PORT=${PORT:-$(python -c 'import portpicker; print(portpicker.pick_unused_port())')}
mkdir -p "$WORKDIR"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM
for ((i = 0; i < NPROC; i++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES" \
  MOEJAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" MOEJAX_NUM_PROCESSES="$NPROC" MOEJAX_PROCESS_ID="$i" \
    python -m moejax.train --config="$CONFIG" --workdir="$WORKDIR" "$@" \
    >"$WORKDIR/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for ((n = 0; n < NPROC; n++)); do   # the first failure stops every process (no barrier timeouts).
  if ! wait -n; then
    echo "a process failed; see $WORKDIR/process_*.log" >&2
    status=1
    cleanup
  fi
done
tail -n 3 "$WORKDIR/process_0.log"
exit $status
