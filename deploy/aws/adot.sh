#!/usr/bin/env bash
# Install (once) and (re)start the AWS Distro for OpenTelemetry collector on this node with the
# project's collector config, deploy/observability/adot-collector.yaml (OTLP in on the node,
# /metrics scraped, traces to X-Ray, metrics to CloudWatch as EMF). Run by every node's
# setup_commands in deploy/aws/cluster.yaml; the instance profile (deploy/aws/base.yaml) grants
# the X-Ray and CloudWatch writes. ADOT_VERSION pins the collector (default: latest).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONFIG="$(cd "$HERE/../observability" 2>/dev/null && pwd)/adot-collector.yaml"
CTL=/opt/aws/aws-otel-collector/bin/aws-otel-collector-ctl
VERSION="${ADOT_VERSION:-latest}"

main() {
  if [[ ! -f "$CONFIG" ]]; then
    echo "error: collector config $CONFIG not found (deploy/observability/adot-collector.yaml)" >&2
    exit 1
  fi
  if [[ ! -x "$CTL" ]]; then
    local arch deb=/tmp/aws-otel-collector.deb
    arch="$(dpkg --print-architecture)"
    curl -fsSL --retry 5 -o "$deb" \
      "https://aws-otel-collector.s3.amazonaws.com/ubuntu/${arch}/${VERSION}/aws-otel-collector.deb"
    sudo dpkg -i "$deb"
  fi
  sudo "$CTL" -c "$CONFIG" -a start
  sudo "$CTL" -a status
}

main "$@"
