#!/usr/bin/env bash
# Check that the CUDA MPS control daemon answers on the pipe dir.
# Exit codes: 0 answering, 1 not answering, 2 nvidia-cuda-mps-control not found.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"


not_running() {
  echo "MPS control daemon is not running: $1." >&2
  echo "Start it with: bash $HERE/start.sh (with the same CUDA_MPS_PIPE_DIRECTORY=$PIPE_DIR)" >&2
  exit 1
}

main() {
  require_control_binary
  [[ -p "$PIPE_DIR/control" ]] || not_running "no control pipe at $PIPE_DIR/control"
  local servers
  if ! servers="$(server_list)"; then
    not_running "get_server_list failed or timed out after ${QUERY_TIMEOUT_S}s on $PIPE_DIR: $servers"
  fi
  echo "MPS control daemon is running (pipe dir $PIPE_DIR); server pids: ${servers:-none yet}"
}

main "$@"
