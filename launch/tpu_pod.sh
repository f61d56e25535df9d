#!/usr/bin/env bash
# Train jaxgen on a Cloud TPU VM or pod slice: create the VM, copy and install the code on every
# worker, run the same command on all workers, fetch the workdir back.
#
# Usage:
#   launch/tpu_pod.sh [create|setup|run|fetch|delete|all] -- [jaxgen.main arguments]
#
#   TPU_NAME=jaxgen-v4 ZONE=us-central2-b ACCELERATOR=v4-32 \
#     launch/tpu_pod.sh all -- --config=configs/dit_xl2_256.py \
#       --config.mesh.data=1 --config.mesh.fsdp=-1
#
# Steps (default: all of create, setup, run, fetch; `delete` is never implied):
#   create  gcloud compute tpus tpu-vm create $TPU_NAME (skipped when it already exists)
#   setup   scp this checkout to every worker and `pip install jax[tpu]` + requirements.txt
#   run     run `python -m jaxgen.main --workdir=$WORKDIR <args>` on all workers at once
#           (--worker=all). JAX finds the other workers itself (TPU metadata); the script also
#           passes --config.mesh.distributed=on so a slice never trains as independent copies.
#           Only process 0 writes logs and samples; checkpoints are written by all processes.
#   fetch   copy $WORKDIR from worker 0 back to ./$WORKDIR (use a gs:// WORKDIR for big runs:
#           orbax writes to GCS directly and nothing needs fetching).
#   delete  delete the TPU VM.
#
# Environment (defaults in brackets):
#   TPU_NAME [jaxgen-tpu]  ZONE [us-central2-b]  ACCELERATOR [v4-8]
#   RUNTIME [tpu-ubuntu2204-base]  PROJECT [gcloud's default]  SPOT [0]: 1 = --spot
#   WORKDIR [workdirs/tpu]  REMOTE_DIR [~/jaxgen]
#   HEARTBEAT_TIMEOUT_S [100] / INIT_TIMEOUT_S [900]: passed to every worker as
#   --config.mesh.heartbeat_timeout_s / init_timeout_s (a worker silent this long ends the job;
#   how long workers wait for each other at start-up).
#   DRY_RUN [0]: 1 = print the gcloud commands (and the command every worker runs) instead of
#   running them.
# On the workers JAX reads the slice's layout from the TPU metadata server: this script sets no
# JAX_* variables; each worker runs the same command and learns its process id there.
# Preemption (spot / maintenance): the trainer saves a checkpoint on SIGTERM and exits 0;
# rerun `launch/tpu_pod.sh run -- <same args>` after recreating the VM to resume. A lost worker
# ends the job after the heartbeat timeout (launch/README.md, "A lost host"); rerun the same.
set -euo pipefail

TPU_NAME="${TPU_NAME:-jaxgen-tpu}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR="${ACCELERATOR:-v4-8}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
WORKDIR="${WORKDIR:-workdirs/tpu}"
REMOTE_DIR="${REMOTE_DIR:-~/jaxgen}"
SPOT="${SPOT:-0}"
DRY_RUN="${DRY_RUN:-0}"
HEARTBEAT_TIMEOUT_S="${HEARTBEAT_TIMEOUT_S:-100}"
INIT_TIMEOUT_S="${INIT_TIMEOUT_S:-900}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() { sed -n '2,36p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

STEP="all"
if [[ $# -gt 0 && "$1" != "--" ]]; then STEP="$1"; shift; fi
if [[ $# -gt 0 && "$1" == "--" ]]; then shift; fi
ARGS=("$@")

GCLOUD=(gcloud compute tpus tpu-vm)
# x CMD...: run CMD, or print it (shell-quoted) when DRY_RUN=1.
x() {
  if [[ "$DRY_RUN" == "1" ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}
COMMON=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then COMMON+=(--project="$PROJECT"); fi

create() {
  if [[ "$DRY_RUN" != "1" ]] && "${GCLOUD[@]}" describe "$TPU_NAME" "${COMMON[@]}" >/dev/null 2>&1; then
    echo "TPU VM $TPU_NAME exists"
    return
  fi
  local extra=()
  if [[ "$SPOT" == "1" ]]; then extra+=(--spot); fi
  x "${GCLOUD[@]}" create "$TPU_NAME" "${COMMON[@]}" --accelerator-type="$ACCELERATOR" \
    --version="$RUNTIME" "${extra[@]}"
}

setup() {
  local tarball
  tarball="$(mktemp -t jaxgen.XXXXXX.tar.gz)"
  x tar -C "$ROOT" --exclude=./workdirs --exclude=./.git -czf "$tarball" .
  x "${GCLOUD[@]}" scp "$tarball" "$TPU_NAME":/tmp/jaxgen.tar.gz "${COMMON[@]}" --worker=all
  rm -f "$tarball"
  x "${GCLOUD[@]}" ssh "$TPU_NAME" "${COMMON[@]}" --worker=all --command="
    set -e; mkdir -p $REMOTE_DIR && tar -C $REMOTE_DIR -xzf /tmp/jaxgen.tar.gz
    cd $REMOTE_DIR && python3 -m pip install -q -U 'jax[tpu]' && python3 -m pip install -q -r requirements.txt"
}

run() {
  if [[ ${#ARGS[@]} -eq 0 ]]; then
    echo "error: pass the jaxgen.main arguments after --, e.g. -- --config=configs/dit_xl2_256.py" >&2
    exit 2
  fi
  local quoted
  quoted="$(printf ' %q' --config.mesh.heartbeat_timeout_s="$HEARTBEAT_TIMEOUT_S" \
    --config.mesh.init_timeout_s="$INIT_TIMEOUT_S" "${ARGS[@]}")"
  x "${GCLOUD[@]}" ssh "$TPU_NAME" "${COMMON[@]}" --worker=all --command="
    cd $REMOTE_DIR && python3 -m jaxgen.main --workdir=$WORKDIR --config.mesh.distributed=on$quoted"
}

fetch() {
  if [[ "$WORKDIR" == gs://* ]]; then echo "workdir is on GCS: nothing to fetch"; return; fi
  x mkdir -p "$(dirname "$WORKDIR")"
  x "${GCLOUD[@]}" scp --recurse "$TPU_NAME":"$REMOTE_DIR/$WORKDIR" "$(dirname "$WORKDIR")/" \
    "${COMMON[@]}" --worker=0
}

delete() { x "${GCLOUD[@]}" delete "$TPU_NAME" "${COMMON[@]}" --quiet; }

case "$STEP" in
  create) create ;;
  setup) setup ;;
  run) run ;;
  fetch) fetch ;;
  delete) delete ;;
  all) create; setup; run; fetch ;;
  -h|--help|help) usage ;;
  *) echo "error: unknown step '$STEP'" >&2; usage >&2; exit 2 ;;
esac
