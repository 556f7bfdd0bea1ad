#!/usr/bin/env bash
# Print the front-door stack's node parameters for the running Ray cluster (the instances the
# Ray launcher tagged ray-cluster-name=CLUSTER), e.g.
#   aws cloudformation deploy ... --parameter-overrides $(deploy/aws/ray-node-ids.sh) ...
# Run it again (and redeploy the stack) after the autoscaler replaced a node.
set -euo pipefail

CLUSTER="${1:-pd-serve}"

ids() {
  aws ec2 describe-instances \
    --filters "Name=tag:ray-cluster-name,Values=$CLUSTER" "Name=tag:ray-node-type,Values=$1" \
    "Name=instance-state-name,Values=running" \
    --query 'Reservations[].Instances[].InstanceId' --output text
}

main() {
  local head workers
  head="$(ids head)"
  read -r -a workers <<<"$(ids worker)"
  if [[ -z "$head" || ${#workers[@]} -eq 0 ]]; then
    echo "error: cluster $CLUSTER needs a running head and GPU worker (ray up first)" >&2
    exit 1
  fi
  echo "RayHeadInstanceId=$head RayGpuInstanceId=${workers[0]} RayExtraInstanceId=${workers[1]:-}"
}

main "$@"
