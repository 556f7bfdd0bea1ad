#!/usr/bin/env bash
# Stop the CUDA MPS control daemon on the pipe dir. Idempotent: not running is success.
# The daemon exits once its MPS servers' clients (the engines) have exited; stop them first.
# Exit codes: 0 stopped or not running, 1 still running after the timeout,
# 2 nvidia-cuda-mps-control not found.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"
STOP_TIMEOUT_S="${MPS_STOP_TIMEOUT_S:-30}"


# The daemon writes its pid next to the control pipe; /proc works whoever owns the process.
daemon_alive() {
  local pid_file="$PIPE_DIR/nvidia-cuda-mps-control.pid" pid
  if [[ -f "$pid_file" ]]; then
    pid="$(<"$pid_file")"
    [[ -n "$pid" && -d "/proc/$pid" ]]
  else
    server_list >/dev/null
  fi
}

main() {
  require_control_binary
  local servers
  if ! servers="$(server_list)"; then
    echo "MPS control daemon not running (pipe dir $PIPE_DIR); nothing to stop"
    return 0
  fi
  if [[ -n "${servers//[[:space:]]/}" ]]; then
    echo "MPS servers still up (pids: ${servers//$'\n'/ }); the daemon waits" \
      "for their clients to exit"
  fi
  echo quit | timeout "$QUERY_TIMEOUT_S" nvidia-cuda-mps-control
  local deadline=$((SECONDS + STOP_TIMEOUT_S))
  while daemon_alive; do
    if ((SECONDS >= deadline)); then
      echo "error: MPS control daemon still running ${STOP_TIMEOUT_S}s after quit" \
        "(pipe dir $PIPE_DIR); stop the engines using it (e.g. serve shutdown), then rerun" >&2
      return 1
    fi
    sleep 0.5
  done
  echo "MPS control daemon stopped (pipe dir $PIPE_DIR)"
}

main "$@"
