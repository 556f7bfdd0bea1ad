"""The AWS deployment, checked offline: nothing here calls AWS.

- deploy/aws/cluster.yaml passes Ray's own cluster-config validation, installs the project with
  the Makefile's commands, and starts the MPS daemon before Ray on every GPU node;
- the CloudFormation templates pass cfn-lint, and the wiring that matters holds: WAF on the API
  stage, the streaming REST integration through the VPC link to the ALB's HTTPS listener, the
  target group's /health checks, every hop's timeout above the app's, port 8000 open to the ALB
  alone;
- the AWS serve configs (configs/aws/) are deployable and their memory comments are the
  planner's arithmetic.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from serve_app.config import AppConfig
from serve_app.plan import GIB, GPU_PRESETS_MIB, MIB, load_model_shape, plan_split
from tests.cpu.conftest import ROOT

AWS = ROOT / "deploy" / "aws"
CLUSTER = AWS / "cluster.yaml"
BASE = AWS / "base.yaml"
FRONT_DOOR = AWS / "front-door.yaml"
AWS_PRESETS = sorted((ROOT / "configs" / "aws").glob("*.yaml"))
# Each GPU choice of render-cluster.sh, its node type, instance family and preset.
GPU_CHOICES = {
    "l40s": ("gpu.l40s", "g6e.", "g6e-l40s-llama3.1-8b-pd.yaml"),
    "h100": ("gpu.h100", "p5.", "p5-h100-llama3.1-8b-pd.yaml"),
}
DUMMY = {
    "REGION": "us-east-1",
    "AMI_ID": "ami-0123456789abcdef0",
    "SUBNET_ID": "subnet-0123456789abcdef0",
    "NODE_SECURITY_GROUP_ID": "sg-0123456789abcdef0",
    "HEAD_INSTANCE_PROFILE_ARN": "arn:aws:iam::123456789012:instance-profile/head",
    "WORKER_INSTANCE_PROFILE_ARN": "arn:aws:iam::123456789012:instance-profile/worker",
}
# API Gateway: a streamed response's idle timeout on a regional endpoint (fixed, not settable)
# and the longest integration timeout in STREAM mode (AWS docs, "Stream the integration response").
API_GATEWAY_STREAM_IDLE_S = 300
API_GATEWAY_STREAM_MAX_MS = 900_000


# --- the Ray cluster ---------------------------------------------------------------------------


def render_cluster(gpu: str) -> dict[str, Any]:
    """cluster.yaml with the values render-cluster.sh would fill in (dummy ids)."""
    workers = {"L40S_WORKERS": int(gpu == "l40s"), "H100_WORKERS": int(gpu == "h100")}
    values = {**DUMMY, **workers}
    text = re.sub(r"\$\{([A-Z0-9_]+)\}", lambda m: str(values[m.group(1)]), CLUSTER.read_text())
    return yaml.safe_load(text)


def makefile_install_commands(extras: str) -> list[str]:
    """The recipe of the Makefile's `$(VENV)/.installed`, variables expanded, as shell lines."""
    makefile = (ROOT / "Makefile").read_text()
    variables = dict(re.findall(r"^(\w+) \??:?= (.*)$", makefile, re.MULTILINE))
    variables["EXTRAS"] = extras
    recipe = re.search(r"^\$\(VENV\)/\.installed:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert recipe, "Makefile has no $(VENV)/.installed rule"
    lines = []
    for line in recipe.group(1).splitlines():
        line = line.strip()
        if line.startswith("#") or line == "touch $@":
            continue
        for _ in range(3):  # PY := $(VENV)/bin/python nests one level
            line = re.sub(r"\$\((\w+)\)", lambda m: variables[m.group(1)], line)
        lines.append(line)
    return lines


@pytest.mark.parametrize("gpu", sorted(GPU_CHOICES))
def test_cluster_config_passes_rays_validation(gpu: str) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = render_cluster(gpu)
    validate_config(prepare_config(copy.deepcopy(config)))
    node_type, family, _ = GPU_CHOICES[gpu]
    node_types = config["available_node_types"]
    assert node_types[node_type]["node_config"]["InstanceType"].startswith(family)
    assert node_types[node_type]["min_workers"] == node_types[node_type]["max_workers"] == 1
    others = [name for name in node_types if name.startswith("gpu.") and name != node_type]
    assert all(node_types[name]["max_workers"] == 0 for name in others)


def test_cluster_installs_the_project_with_the_makefiles_commands() -> None:
    config = render_cluster("l40s")
    prefix = "cd ~/pd-serve && "
    installs = [c.removeprefix(prefix) for c in config["setup_commands"] if c.startswith(prefix)]
    assert installs == makefile_install_commands("gpu")
    assert config["setup_commands"][: len(installs)] == [prefix + c for c in installs]
    assert any('-e ".[gpu]"' in c for c in installs)  # vllm==0.32.0 (CUDA), pinned in pyproject
    assert config["file_mounts"]["~/pd-serve"] == "."
    assert ".venv" in config["rsync_exclude"]


def test_mps_daemon_starts_before_ray_on_every_gpu_node() -> None:
    config = render_cluster("l40s")
    commands = config["worker_start_ray_commands"]
    mps = [i for i, c in enumerate(commands) if "deploy/mps/start.sh" in c]
    ray_start = [i for i, c in enumerate(commands) if "ray start" in c]
    assert mps and ray_start and mps[0] < ray_start[0]
    assert (ROOT / "deploy" / "mps" / "start.sh").is_file()
    assert all("worker_start_ray_commands" not in t for t in config["available_node_types"].values())
    # Every GPU node is a worker; the head has no GPU and runs no engine.
    assert not any("GPU" in t["resources"] for n, t in config["available_node_types"].items()
                   if n == config["head_node_type"])
    assert "PD_SERVE_MODEL_CACHE=/opt/dlami/nvme" in " ".join(commands)
    assert all("RAY_AUTH_MODE=token" in c for c in
               (*commands, *config["head_start_ray_commands"]) if "ray start" in c)
    # Every node's proxy (an ALB target) sheds at the door (serve_app/policy/proxy_door.py).
    callback = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve_app.policy.door:middlewares"
    assert all(callback in c for c in
               (*commands, *config["head_start_ray_commands"]) if "ray start" in c)


def test_nodes_get_their_profile_and_the_node_security_group() -> None:
    config = render_cluster("h100")
    for name, node_type in config["available_node_types"].items():
        node = node_type["node_config"]
        assert node["SecurityGroupIds"] == [DUMMY["NODE_SECURITY_GROUP_ID"]]
        assert node["MetadataOptions"]["HttpTokens"] == "required"
        profile = "HEAD" if name == config["head_node_type"] else "WORKER"
        assert node["IamInstanceProfile"]["Arn"] == DUMMY[f"{profile}_INSTANCE_PROFILE_ARN"]


def test_collector_runs_on_every_node_with_the_observability_config() -> None:
    config = render_cluster("l40s")
    assert "bash ~/pd-serve/deploy/aws/adot.sh" in config["setup_commands"]
    script = (AWS / "adot.sh").read_text()
    collector_config = ROOT / "deploy" / "observability" / "adot-collector.yaml"
    assert collector_config.is_file()
    assert '"$HERE/.." && pwd)/observability/adot-collector.yaml' in script
    # Every variable the collector config reads is set in the collector's unit.
    for name in set(re.findall(r"\$\{env:(\w+)", collector_config.read_text())):
        assert f"Environment={name}=" in script, name


@pytest.mark.parametrize("script", sorted(AWS.glob("*.sh")), ids=lambda p: p.name)
def test_deploy_scripts_parse(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert os.access(script, os.X_OK)


def test_render_script_fills_exactly_the_placeholders(tmp_path: Path) -> None:
    """render-cluster.sh with a stand-in `aws` CLI (no AWS here): every placeholder filled,
    Ray's own $RAY_HEAD_IP left alone."""
    outputs = {
        "ClusterSubnetId": DUMMY["SUBNET_ID"],
        "NodeSecurityGroupId": DUMMY["NODE_SECURITY_GROUP_ID"],
        "HeadInstanceProfileArn": DUMMY["HEAD_INSTANCE_PROFILE_ARN"],
        "WorkerInstanceProfileArn": DUMMY["WORKER_INSTANCE_PROFILE_ARN"],
    }
    cases = "\n".join(f'  *"{key}"*) echo {value} ;;' for key, value in outputs.items())
    stub = tmp_path / "aws"
    stub.write_text(f'#!/usr/bin/env bash\ncase "$*" in\n{cases}\n  *) exit 3 ;;\nesac\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "AWS_REGION": "us-east-1",
           "AMI_ID": DUMMY["AMI_ID"]}
    rendered = subprocess.run([str(AWS / "render-cluster.sh"), "h100"], env=env, check=True,
                              capture_output=True, text=True).stdout
    assert "${" not in rendered
    assert "$RAY_HEAD_IP" in rendered
    assert yaml.safe_load(rendered) == render_cluster("h100")


# --- CloudFormation ----------------------------------------------------------------------------


def load_template(path: Path) -> dict[str, Any]:
    from cfnlint.decode import decode

    template, matches = decode(str(path))
    assert not matches, matches
    return template


@pytest.mark.parametrize("path", [BASE, FRONT_DOOR], ids=lambda p: p.name)
def test_template_passes_cfn_lint(path: Path) -> None:
    from cfnlint.api import ManualArgs, lint_file

    matches = lint_file(path, config=ManualArgs(regions=["us-east-1", "us-west-2"]))
    assert not matches, "\n".join(str(m) for m in matches)


def resources(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {
        name: r.get("Properties", {})
        for name, r in template["Resources"].items()
        if r["Type"] == kind
    }


def test_waf_guards_the_api_stage() -> None:
    template = load_template(FRONT_DOOR)
    (acl_name, acl), = resources(template, "AWS::WAFv2::WebACL").items()
    assert acl["Scope"] == "REGIONAL"
    statements = [rule["Statement"] for rule in acl["Rules"]]
    managed = {s["ManagedRuleGroupStatement"]["Name"] for s in statements
               if "ManagedRuleGroupStatement" in s}
    assert {"AWSManagedRulesCommonRuleSet", "AWSManagedRulesKnownBadInputsRuleSet"} <= managed
    (rate,) = [s["RateBasedStatement"] for s in statements if "RateBasedStatement" in s]
    assert rate["AggregateKeyType"] == "IP"
    (association,) = resources(template, "AWS::WAFv2::WebACLAssociation").values()
    assert association["WebACLArn"] == {"Fn::GetAtt": [acl_name, "Arn"]}
    arn = association["ResourceArn"]["Fn::Sub"]
    (stage_name,) = resources(template, "AWS::ApiGateway::Stage")
    (api_name,) = resources(template, "AWS::ApiGateway::RestApi")
    assert arn.endswith(f"::/restapis/${{{api_name}}}/stages/${{{stage_name}}}")


def test_api_streams_through_the_vpc_link_to_the_alb_listener() -> None:
    template = load_template(FRONT_DOOR)
    (api,) = resources(template, "AWS::ApiGateway::RestApi").values()
    assert api["EndpointConfiguration"]["Types"] == ["REGIONAL"]
    assert "MinimumCompressionSize" not in api  # no content encoding while streaming
    (method,) = resources(template, "AWS::ApiGateway::Method").values()
    integration = method["Integration"]
    assert integration["Type"] == "HTTP_PROXY"
    assert integration["ResponseTransferMode"] == "STREAM"
    (link_name,) = resources(template, "AWS::ApiGatewayV2::VpcLink")
    assert integration["ConnectionType"] == "VPC_LINK"
    assert integration["ConnectionId"] == {"Ref": link_name}
    (alb_name, alb), = resources(template, "AWS::ElasticLoadBalancingV2::LoadBalancer").items()
    assert alb["Scheme"] == "internal"
    assert integration["IntegrationTarget"] == {"Ref": alb_name}
    (listener,) = resources(template, "AWS::ElasticLoadBalancingV2::Listener").values()
    assert listener["LoadBalancerArn"] == {"Ref": alb_name}
    scheme, port = re.match(r"(https?)://[^/:]+:(\d+)/", integration["Uri"]["Fn::Sub"]).groups()
    assert (scheme.upper(), int(port)) == (listener["Protocol"], listener["Port"])
    (tg_name,) = resources(template, "AWS::ElasticLoadBalancingV2::TargetGroup")
    assert listener["DefaultActions"] == [{"Type": "forward", "TargetGroupArn": {"Ref": tg_name}}]


def target_group() -> dict[str, Any]:
    (group,) = resources(load_template(FRONT_DOOR),
                         "AWS::ElasticLoadBalancingV2::TargetGroup").values()
    return group


def attribute(items: list[dict[str, str]], key: str) -> int:
    (value,) = [int(item["Value"]) for item in items if item["Key"] == key]
    return value


@pytest.mark.parametrize("preset", AWS_PRESETS, ids=lambda p: p.name)
def test_target_group_checks_the_serve_proxies_health(preset: Path) -> None:
    http, cfg = serve_config(preset)
    group = target_group()
    assert (group["Port"], group["Protocol"], group["TargetType"]) == (http["port"], "HTTP",
                                                                       "instance")
    assert group["HealthCheckPath"] == "/health"  # the Router's: 200 while an engine can serve
    assert group["Matcher"] == {"HttpCode": "200"}
    # The app answers its own health check (503 after router.health_timeout_s) before the ALB
    # gives up on it.
    assert cfg.router.health_timeout_s < group["HealthCheckTimeoutSeconds"]
    assert group["HealthCheckTimeoutSeconds"] < group["HealthCheckIntervalSeconds"]


@pytest.mark.parametrize("preset", AWS_PRESETS, ids=lambda p: p.name)
def test_every_hops_timeout_fits_the_apps(preset: Path) -> None:
    http, _ = serve_config(preset)
    request_timeout_s = http["request_timeout_s"]
    template = load_template(FRONT_DOOR)
    (method,) = resources(template, "AWS::ApiGateway::Method").values()
    timeout_ms = method["Integration"]["TimeoutInMillis"]
    assert request_timeout_s * 1000 < timeout_ms <= API_GATEWAY_STREAM_MAX_MS
    assert request_timeout_s < API_GATEWAY_STREAM_IDLE_S
    (alb,) = resources(template, "AWS::ElasticLoadBalancingV2::LoadBalancer").values()
    alb_idle_s = attribute(alb["LoadBalancerAttributes"], "idle_timeout.timeout_seconds")
    # A non-streamed answer is silent until it is done: the ALB must wait longer than the app.
    assert request_timeout_s < alb_idle_s < http["keep_alive_timeout_s"]
    draining_s = attribute(target_group()["TargetGroupAttributes"],
                           "deregistration_delay.timeout_seconds")
    assert draining_s >= request_timeout_s


def ingress_rules(template: dict[str, Any]) -> list[dict[str, Any]]:
    rules = list(resources(template, "AWS::EC2::SecurityGroupIngress").values())
    for name, group in resources(template, "AWS::EC2::SecurityGroup").items():
        rules += [{**rule, "GroupId": {"Ref": name}} for rule in group.get("SecurityGroupIngress", [])]
    return rules


def test_only_the_load_balancer_reaches_the_serve_port() -> None:
    base, front = load_template(BASE), load_template(FRONT_DOOR)
    (node_group,) = resources(base, "AWS::EC2::SecurityGroup")
    node_refs = [{"Ref": node_group}, {"Ref": "RayNodeSecurityGroupId"}]
    opening = [
        rule for rule in ingress_rules(base) + ingress_rules(front)
        if rule["GroupId"] in node_refs and rule["FromPort"] <= 8000 <= rule["ToPort"]
    ]
    (alb,) = resources(front, "AWS::ElasticLoadBalancingV2::LoadBalancer").values()
    (alb_group_ref,) = alb["SecurityGroups"]
    assert opening == [{**opening[0], "SourceSecurityGroupId": alb_group_ref}]
    assert "CidrIp" not in opening[0]
    # The only address-based rule on the nodes is SSH from the admin.
    cidr_rules = [r for r in ingress_rules(base) if "CidrIp" in r]
    assert [(r["FromPort"], r["ToPort"]) for r in cidr_rules] == [(22, 22)]


def test_instance_profiles_read_the_model_and_write_telemetry() -> None:
    base = load_template(BASE)
    (policy,) = resources(base, "AWS::IAM::ManagedPolicy").values()
    statements = {s["Sid"]: s for s in policy["PolicyDocument"]["Statement"]}
    assert statements["ReadModelObjects"]["Action"] == "s3:GetObject"
    assert statements["ReadModelObjects"]["Resource"] == {
        "Fn::Sub": "${ModelBucket.Arn}/${ModelPrefix}*"}
    assert statements["ListModelPrefix"]["Action"] == "s3:ListBucket"
    assert "xray:PutTraceSegments" in statements["XRayTraces"]["Action"]
    assert "logs:PutLogEvents" in statements["EmfLogs"]["Action"]  # the awsemf exporter's
    roles = resources(base, "AWS::IAM::Role")
    assert all(role["ManagedPolicyArns"] == [{"Ref": "NodePolicy"}] for role in roles.values())
    (head,) = [r for r in roles.values() if "Policies" in r]
    head_actions = {a for p in head["Policies"] for s in p["PolicyDocument"]["Statement"]
                    for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "iam:PassRole"} <= head_actions


# --- the AWS serve configs ---------------------------------------------------------------------


def serve_config(path: Path) -> tuple[dict[str, Any], AppConfig]:
    config = yaml.safe_load(path.read_text())
    (application,) = config["applications"]
    return config["http_options"], AppConfig.model_validate(application["args"])


def test_each_gpu_choice_has_its_preset() -> None:
    assert {GPU_CHOICES[gpu][2] for gpu in GPU_CHOICES} == {p.name for p in AWS_PRESETS}


@pytest.mark.parametrize("path", AWS_PRESETS, ids=lambda p: p.name)
def test_aws_preset_is_deployable_behind_the_alb(path: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    assert (schema.http_options.host, schema.http_options.port) == ("0.0.0.0", 8000)
    (application,) = schema.applications
    assert (application.name, application.import_path) == ("pd", "serve_app.app:build_app")
    _, cfg = serve_config(path)
    assert cfg.device == "cuda" and cfg.model.source.startswith("s3://")
    assert (cfg.prefill.sm_percentage, cfg.decode.sm_percentage) == (80, 20)
    assert cfg.start_order == "prefill_first"
    # Traces go to the node's collector, on the port its OTLP/HTTP receiver listens on.
    collector = yaml.safe_load((ROOT / "deploy/observability/adot-collector.yaml").read_text())
    receiver = collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert cfg.telemetry.tracing.enabled
    assert cfg.telemetry.tracing.endpoint == f"http://{receiver}"


@pytest.mark.parametrize("path", AWS_PRESETS, ids=lambda p: p.name)
def test_aws_preset_memory_comments_are_the_planners(path: Path) -> None:
    _, cfg = serve_config(path)
    assert cfg.gpu in GPU_PRESETS_MIB
    model = load_model_shape(cfg.model.name)  # the architecture of the served model's name
    gpu_memory_bytes = GPU_PRESETS_MIB[cfg.gpu] * MIB
    plan = plan_split(
        model, gpu_memory_bytes, cfg.prefill.gpu_memory_utilization,
        cfg.decode.gpu_memory_utilization, context_len=cfg.model.max_model_len,
        max_total_share=1 - cfg.memory_headroom,
    )
    text = path.read_text()
    assert f"{GPU_PRESETS_MIB[cfg.gpu]:,} MiB = {gpu_memory_bytes / GIB:.2f} GiB" in text
    assert f"{model.weight_bytes / GIB:.2f} GiB" in text
    assert f"{plan.kv_bytes_per_token:,} B" in text
    assert f"{plan.handoff_bytes_per_request / MIB:.1f} MiB" in text
    assert f"{plan.total_used_bytes / GIB:.2f} GiB, {plan.free_bytes / GIB:.2f} GiB free" in text
    command = re.search(r"python -m serve_app\.plan .*\n#.*", text).group(0)
    assert f"--gpu {cfg.gpu}" in command and f"--context-len {cfg.model.max_model_len}" in command
    for engine in (plan.prefill, plan.decode):
        assert f"{engine.kv_pool_bytes / GIB:.2f} GiB KV pool" in text
        assert f"{engine.num_kv_tokens:,} tokens = {engine.max_num_seqs} " in text
        assert f"--{engine.role}-memory-share {engine.memory_share:g}" in command
    assert plan.decode.max_num_seqs >= 8  # a batch of full-length answers, not one
