#!/usr/bin/env bash
# Start the CUDA MPS control daemon that the prefill and decode engines on this node share.
# Idempotent: a daemon already answering on the pipe dir is success.
# Exit codes: 0 running, 1 failed to start, 2 nvidia-cuda-mps-control not found.
# Never touches GPU compute mode, clocks or MIG.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"
START_TIMEOUT_S="${MPS_START_TIMEOUT_S:-10}"
export CUDA_MPS_LOG_DIRECTORY="$LOG_DIR"


daemon_answers() {
  server_list >/dev/null
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
