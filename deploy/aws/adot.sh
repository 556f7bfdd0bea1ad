#!/usr/bin/env bash
# Install (once) and (re)start the AWS Distro for OpenTelemetry collector on this node with the
# project's collector config, deploy/observability/adot-collector.yaml (OTLP in on 127.0.0.1,
# the Router's /metrics scraped through the local Serve proxy, traces to X-Ray, metrics to
# CloudWatch as EMF). Run by every node's setup_commands in deploy/aws/cluster.yaml; the
# instance profile (deploy/aws/base.yaml) grants the X-Ray and CloudWatch writes.
# A systemd unit of its own, so the collector gets the variables its config reads (AWS_REGION,
# PD_SERVE_METRICS_TARGET) and survives the SSH session of `ray up`. ADOT_VERSION pins the
# collector package (default: latest).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONFIG="$(cd "$HERE/.." && pwd)/observability/adot-collector.yaml"
COLLECTOR=/opt/aws/aws-otel-collector/bin/aws-otel-collector
UNIT=/etc/systemd/system/pd-serve-adot.service
VERSION="${ADOT_VERSION:-latest}"
METRICS_TARGET="${PD_SERVE_METRICS_TARGET:-127.0.0.1:8000}"

install_collector() {
  local arch deb=/tmp/aws-otel-collector.deb
  arch="$(dpkg --print-architecture)"
  curl -fsSL --retry 5 -o "$deb" \
    "https://aws-otel-collector.s3.amazonaws.com/ubuntu/${arch}/${VERSION}/aws-otel-collector.deb"
  sudo dpkg -i "$deb"
}

# The node's region, from the instance metadata service (IMDSv2).
node_region() {
  local token
  token="$(curl -fsS -X PUT http://169.254.169.254/latest/api/token \
    -H 'X-aws-ec2-metadata-token-ttl-seconds: 60')"
  curl -fsS -H "X-aws-ec2-metadata-token: $token" \
    http://169.254.169.254/latest/meta-data/placement/region
}

main() {
  if [[ ! -f "$CONFIG" ]]; then
    echo "error: collector config $CONFIG not found (deploy/observability/adot-collector.yaml)" >&2
    exit 1
  fi
  [[ -x "$COLLECTOR" ]] || install_collector
  local region="${AWS_REGION:-$(node_region)}"
  sudo tee "$UNIT" >/dev/null <<EOF
[Unit]
Description=ADOT collector for pd-serve ($CONFIG)
After=network-online.target

[Service]
Environment=AWS_REGION=$region
Environment=PD_SERVE_METRICS_TARGET=$METRICS_TARGET
ExecStart=$COLLECTOR --config $CONFIG
Restart=always
RestartSec=5

[Install]
WantedBy=multi-user.target
EOF
  # The package's own service would run a second collector with its default config.
  sudo systemctl disable --now aws-otel-collector.service 2>/dev/null || true
  sudo systemctl daemon-reload
  sudo systemctl enable pd-serve-adot.service
  sudo systemctl restart pd-serve-adot.service
  systemctl is-active pd-serve-adot.service
}

main "$@"
