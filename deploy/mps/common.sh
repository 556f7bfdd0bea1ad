# shellcheck shell=bash
# Shared by start.sh, check.sh and stop.sh (sourced, not run).
PIPE_DIR="${CUDA_MPS_PIPE_DIRECTORY:-/tmp/pd-serve-mps/pipe}"
# shellcheck disable=SC2034  # used by start.sh
LOG_DIR="${CUDA_MPS_LOG_DIRECTORY:-/tmp/pd-serve-mps/log}"
QUERY_TIMEOUT_S="${MPS_QUERY_TIMEOUT_S:-5}"
export CUDA_MPS_PIPE_DIRECTORY="$PIPE_DIR"

require_control_binary() {
  if ! command -v nvidia-cuda-mps-control >/dev/null 2>&1; then
    echo "error: nvidia-cuda-mps-control not found on PATH; it ships with the NVIDIA driver" \
      "(nvidia-utils / nvidia-compute-utils): run this on a GPU node with the driver installed" >&2
    exit 2
  fi
}

# Prints the MPS server pids; fails when the daemon does not answer on PIPE_DIR.
server_list() {
  [[ -p "$PIPE_DIR/control" ]] || return 1
  echo get_server_list | timeout "$QUERY_TIMEOUT_S" nvidia-cuda-mps-control 2>&1
}
