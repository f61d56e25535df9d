#!/usr/bin/env bash
# Train jaxgen on all GPUs of one machine.
#
# Usage:
#   launch/gpu_single_host.sh [--procs=N] -- --config=FILE[:preset] --workdir=DIR [overrides...]
#
#   launch/gpu_single_host.sh -- --config=configs/dit_xl2_256.py --workdir=workdirs/dit \
#       --config.training.compute_dtype=bfloat16 --config.mesh.fsdp=-1 --config.mesh.data=1
#
# Default (--procs=1): one process drives every visible GPU (CUDA_VISIBLE_DEVICES picks them);
# this is the simplest and fastest setup on one host.
# --procs=N: N processes, one GPU each (N = GPU count), started here with
# JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID / JAX_LOCAL_DEVICE_IDS, which
# jaxgen/distributed.py passes to jax.distributed.initialize; the same layout as a multi-node
# run, handy to test one before paying for it. Process 0's output is shown; the others log to
# $WORKDIR_LOGS/proc_K.log.
#
# Environment: PORT [29500] coordinator port; PYTHON [python3]; WORKDIR_LOGS [launch_logs];
# HEARTBEAT_TIMEOUT_S (when set: --config.mesh.heartbeat_timeout_s for every process);
# DRY_RUN [0]: 1 = print each process's environment and command instead of starting it.
# Ctrl-C / SIGTERM is forwarded: the trainer saves a checkpoint and exits; rerun to resume.
set -euo pipefail

PROCS=1
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    --procs=*) PROCS="${1#--procs=}" ;;
    -h|--help) sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown option $1 (options go before --)" >&2; exit 2 ;;
  esac
  shift
done
if [[ $# -gt 0 ]]; then shift; fi
if [[ $# -eq 0 ]]; then
  echo "error: pass the jaxgen.main arguments after --" >&2
  exit 2
fi
PYTHON="${PYTHON:-python3}"
DRY_RUN="${DRY_RUN:-0}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ARGS=("$@")
if [[ -n "${HEARTBEAT_TIMEOUT_S:-}" ]]; then
  ARGS+=(--config.mesh.heartbeat_timeout_s="$HEARTBEAT_TIMEOUT_S")
fi

if [[ "$PROCS" == "1" ]]; then
  if [[ "$DRY_RUN" == "1" ]]; then printf '%q ' "$PYTHON" -m jaxgen.main "${ARGS[@]}"; echo; exit 0; fi
  exec "$PYTHON" -m jaxgen.main "${ARGS[@]}"
fi

PORT="${PORT:-29500}"
LOGS="${WORKDIR_LOGS:-launch_logs}"
mkdir -p "$LOGS"
PIDS=()
forward() { kill -TERM "${PIDS[@]}" 2>/dev/null || true; }
trap forward INT TERM
for ((i = 0; i < PROCS; i++)); do
  if [[ $i -eq 0 ]]; then out=/dev/stdout; else out="$LOGS/proc_$i.log"; fi
  env=(JAX_COORDINATOR_ADDRESS="localhost:$PORT" JAX_NUM_PROCESSES="$PROCS"
       JAX_PROCESS_ID="$i" JAX_LOCAL_DEVICE_IDS="$i")
  if [[ "$DRY_RUN" == "1" ]]; then
    printf '%q ' env "${env[@]}" "$PYTHON" -m jaxgen.main "${ARGS[@]}"; echo "> $out"
    continue
  fi
  env "${env[@]}" "$PYTHON" -m jaxgen.main "${ARGS[@]}" >"$out" 2>&1 &
  PIDS+=($!)
done
status=0
for pid in "${PIDS[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
