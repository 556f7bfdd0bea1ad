#!/usr/bin/env bash
# Print deploy/aws/cluster.yaml with this account's values filled in, for `ray up`.
#   deploy/aws/render-cluster.sh l40s|h100 [BASE_STACK] > /tmp/pd-serve-cluster.yaml
# l40s runs one g6e.2xlarge GPU worker (configs/aws/g6e-l40s-llama3.1-8b-pd.yaml), h100 one
# p5.4xlarge (configs/aws/p5-h100-llama3.1-8b-pd.yaml). Values come from the outputs of the
# base stack (default pd-serve-base, deploy/aws/base.yaml) and the region's current AWS Deep
# Learning Base GPU AMI (AMI_ID overrides it). Needs the AWS CLI and envsubst (gettext-base).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Exactly the ${...} placeholders of cluster.yaml (tests/cpu/test_aws_deploy.py checks it);
# nothing else in the file is substituted ($RAY_HEAD_IP stays for Ray).
PLACEHOLDERS='${REGION} ${AMI_ID} ${SUBNET_ID} ${NODE_SECURITY_GROUP_ID} ${HEAD_INSTANCE_PROFILE_ARN} ${WORKER_INSTANCE_PROFILE_ARN} ${L40S_WORKERS} ${H100_WORKERS}'
AMI_PARAMETER=/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id

usage() {
  echo "usage: $0 l40s|h100 [base stack name]" >&2
  exit 2
}

stack_output() {
  aws cloudformation describe-stacks --region "$REGION" --stack-name "$STACK" \
    --query "Stacks[0].Outputs[?OutputKey=='$1'].OutputValue" --output text
}

main() {
  case "${1:-}" in
    l40s) export L40S_WORKERS=1 H100_WORKERS=0 ;;
    h100) export L40S_WORKERS=0 H100_WORKERS=1 ;;
    *) usage ;;
  esac
  STACK="${2:-pd-serve-base}"
  REGION="${AWS_REGION:-${AWS_DEFAULT_REGION:-$(aws configure get region)}}"
  export REGION
  SUBNET_ID="$(stack_output ClusterSubnetId)"
  NODE_SECURITY_GROUP_ID="$(stack_output NodeSecurityGroupId)"
  HEAD_INSTANCE_PROFILE_ARN="$(stack_output HeadInstanceProfileArn)"
  WORKER_INSTANCE_PROFILE_ARN="$(stack_output WorkerInstanceProfileArn)"
  AMI_ID="${AMI_ID:-$(aws ssm get-parameter --region "$REGION" --name "$AMI_PARAMETER" \
    --query Parameter.Value --output text)}"
  export SUBNET_ID NODE_SECURITY_GROUP_ID HEAD_INSTANCE_PROFILE_ARN WORKER_INSTANCE_PROFILE_ARN AMI_ID
  for name in SUBNET_ID NODE_SECURITY_GROUP_ID HEAD_INSTANCE_PROFILE_ARN WORKER_INSTANCE_PROFILE_ARN AMI_ID; do
    if [[ -z "${!name}" || "${!name}" == None ]]; then
      echo "error: no $name (is stack $STACK deployed in $REGION?)" >&2
      exit 1
    fi
  done
  envsubst "$PLACEHOLDERS" <"$HERE/cluster.yaml"
}

main "$@"
