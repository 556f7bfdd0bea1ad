#!/usr/bin/env bash
# Check that the CUDA MPS control daemon answers on the pipe dir.
# Exit codes: 0 answering, 1 not answering, 2 nvidia-cuda-mps-control not found.
set -euo pipefail

PIPE_DIR="${CUDA_MPS_PIPE_DIRECTORY:-/tmp/pd-serve-mps/pipe}"
QUERY_TIMEOUT_S="${MPS_QUERY_TIMEOUT_S:-5}"
export CUDA_MPS_PIPE_DIRECTORY="$PIPE_DIR"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

require_control_binary() {
  if ! command -v nvidia-cuda-mps-control >/dev/null 2>&1; then
    echo "error: nvidia-cuda-mps-control not found on PATH; it ships with the NVIDIA driver" \
      "(nvidia-utils / nvidia-compute-utils): run this on a GPU node with the driver installed" >&2
    exit 2
  fi
}

not_running() {
  echo "MPS control daemon is not running: $1." >&2
  echo "Start it with: bash $HERE/start.sh (with the same CUDA_MPS_PIPE_DIRECTORY=$PIPE_DIR)" >&2
  exit 1
}

main() {
  require_control_binary
  [[ -p "$PIPE_DIR/control" ]] || not_running "no control pipe at $PIPE_DIR/control"
  local servers
  if ! servers="$(echo get_server_list | timeout "$QUERY_TIMEOUT_S" nvidia-cuda-mps-control 2>&1)"; then
    not_running "get_server_list failed or timed out after ${QUERY_TIMEOUT_S}s on $PIPE_DIR: $servers"
  fi
  echo "MPS control daemon is running (pipe dir $PIPE_DIR); server pids: ${servers:-none yet}"
}

main "$@"
