#!/usr/bin/env bash
# Start the CUDA MPS control daemon that the prefill and decode engines on this node share.
# Idempotent: a daemon already answering on the pipe dir is success.
# Exit codes: 0 running, 1 failed to start, 2 nvidia-cuda-mps-control not found.
# Never touches GPU compute mode, clocks or MIG.
set -euo pipefail

PIPE_DIR="${CUDA_MPS_PIPE_DIRECTORY:-/tmp/pd-serve-mps/pipe}"
LOG_DIR="${CUDA_MPS_LOG_DIRECTORY:-/tmp/pd-serve-mps/log}"
START_TIMEOUT_S="${MPS_START_TIMEOUT_S:-10}"
QUERY_TIMEOUT_S="${MPS_QUERY_TIMEOUT_S:-5}"
export CUDA_MPS_PIPE_DIRECTORY="$PIPE_DIR" CUDA_MPS_LOG_DIRECTORY="$LOG_DIR"

require_control_binary() {
  if ! command -v nvidia-cuda-mps-control >/dev/null 2>&1; then
    echo "error: nvidia-cuda-mps-control not found on PATH; it ships with the NVIDIA driver" \
      "(nvidia-utils / nvidia-compute-utils): run this on a GPU node with the driver installed" >&2
    exit 2
  fi
}

daemon_answers() {
  [[ -p "$PIPE_DIR/control" ]] || return 1
  echo get_server_list | timeout "$QUERY_TIMEOUT_S" nvidia-cuda-mps-control >/dev/null 2>&1
}

show_log_tail() {
  if [[ -f "$LOG_DIR/control.log" ]]; then
    echo "last lines of $LOG_DIR/control.log:" >&2
    tail -n 20 "$LOG_DIR/control.log" >&2
  fi
}

main() {
  require_control_binary
  if daemon_answers; then
    echo "MPS control daemon already running (pipe dir $PIPE_DIR); nothing to do"
    return 0
  fi
  # Private to this user: MPS clients must share the daemon's UID and pipe dir anyway.
  mkdir -p "$PIPE_DIR" "$LOG_DIR"
  chmod 700 "$PIPE_DIR" "$LOG_DIR"
  if ! nvidia-cuda-mps-control -d; then
    echo "error: nvidia-cuda-mps-control -d failed (pipe dir $PIPE_DIR)" >&2
    show_log_tail
    return 1
  fi
  local deadline=$((SECONDS + START_TIMEOUT_S))
  until daemon_answers; do
    if ((SECONDS >= deadline)); then
      echo "error: MPS control daemon started but did not answer within ${START_TIMEOUT_S}s" \
        "(pipe dir $PIPE_DIR)" >&2
      show_log_tail
      return 1
    fi
    sleep 0.5
  done
  echo "MPS control daemon started (pipe dir $PIPE_DIR, log dir $LOG_DIR)"
  echo "clients must run with CUDA_MPS_PIPE_DIRECTORY=$PIPE_DIR"
}

main "$@"
