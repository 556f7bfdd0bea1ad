"""Rehearse a GPU lease here, on the CPU machine, before one is lent (`gpu-campaign rehearse`).

A lease is 15 minutes of device time; the first one (2026-12-04) went into dependencies the
stage had missed, found one failed engine start at a time. What can fail before any GPU work
is checked here instead, with a stand-in for the box's Python (`make_box`: Python 3.12 and the
box's packages at the box's versions):

1. The staged parts are received and installed exactly as on the box (`gpu-campaign receive`
   and `install`), and `install` runs the box's import probe (`PROBE_MODULES`).
2. The engines' arguments: the campaign's own configs (`run --dry-run --steps model,configs`)
   give each engine's argv, which the staged vLLM parses with its own parser and builds into
   its `VllmConfig`, as each replica does at start (`check_engines`). This machine has no GPU,
   so vLLM's CUDA platform answers as an H100 (compute 9.0, 80 GiB) and a stub of the driver
   library (`build_driver_stub`, every entry point returning an error) lets vLLM's CUDA
   extensions load; nothing runs on them.

The box's folders (/tmp/pd-stage, /tmp/pd-site) are left empty afterwards.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from serve_app.gpu_campaign import (
    BOX_HAS,
    BOX_SITE,
    BOX_STAGE,
    PRESET_CONFIGS,
    ROOT,
    box_env,
    cmd_receive,
)

BOX_PYTHON = "python3.12"
# The box's versions where the device library read them (KINDS.md, 2026-11); PyPI's newest for
# the rest. Left out: GBs that no import touches.
BOX_VERSIONS = {
    "torch": "2.11.0", "torchvision": "0.26.0", "torchaudio": "2.11.0", "transformers": "5.17.0",
    "triton": "3.6.0", "numpy": "2.5.2", "tokenizers": "0.23.2", "grpcio": "1.84.0",
    "huggingface-hub": "1.33.0", "safetensors": "0.8.0", "tiktoken": "0.14.0",
    "sentencepiece": "0.2.2", "accelerate": "1.15.0",
}
NOT_IN_THE_STAND_IN = {"cupy", "cupy-cuda13x", "cuda-toolkit", "cmake", "pip", "setuptools"}
# What the stand-in's CUDA platform answers: the card the presets are written for.
CARD = {"name": "NVIDIA H100 80GB HBM3", "capability": (9, 0), "memory_bytes": 80 * 2**30}


def make_box(box: Path, python: str) -> None:
    """A venv at `box` with the box's packages (~6 GB; torch 2.11's CUDA build from PyPI)."""
    maker = shutil.which(python)
    if maker is None:
        raise SystemExit(f"{python} not found: the box runs Python 3.12 (--python)")
    subprocess.run([maker, "-m", "venv", str(box)], check=True)
    pins = [f"{name}=={BOX_VERSIONS[name]}" if name in BOX_VERSIONS else name
            for name in sorted(BOX_HAS - NOT_IN_THE_STAND_IN)]
    subprocess.run([str(box / "bin" / "python"), "-m", "pip", "install", "--quiet", *pins],
                   check=True)


def rehearse(opts: argparse.Namespace) -> int:
    box = Path(opts.box)
    if opts.make_box:
        make_box(box, opts.python)
    python = box / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"no stand-in box at {box}: `rehearse --make-box --box {box}` builds one")
    for folder in (BOX_STAGE, BOX_SITE):
        shutil.rmtree(folder, ignore_errors=True)
    try:
        cmd_receive(opts)
        returncode = _box_run(python, ["serve_app.gpu_campaign", "install"])
        if returncode:
            return returncode
        with tempfile.TemporaryDirectory() as scratch:
            return _check_engines_on_the_box(python, Path(scratch))
    finally:
        for folder in (BOX_STAGE, BOX_SITE):
            shutil.rmtree(folder, ignore_errors=True)


def _check_engines_on_the_box(python: Path, scratch: Path) -> int:
    """Step 2: the campaign's configs, built here, checked by the staged vLLM."""
    subprocess.run([sys.executable, "-m", "serve_app.gpu_campaign", "run", "--dry-run",
                    "--steps", "model,configs", "--work", str(scratch / "work"),
                    "--out", str(scratch / "out")], cwd=ROOT, check=True,
                   capture_output=True)
    stub = build_driver_stub(BOX_SITE / "vllm", scratch / "driver")
    return _box_run(python, ["serve_app.gpu_rehearsal", str(scratch / "out" / "configs")],
                    extra_env={"LD_LIBRARY_PATH": str(stub.parent)})


def _box_run(python: Path, args: list[str], extra_env: dict[str, str] | None = None) -> int:
    return subprocess.run([str(python), "-m", *args], cwd=ROOT, env=box_env(**(extra_env or {})),
                          check=False).returncode


def build_driver_stub(vllm_dir: Path, out: Path) -> Path:
    """`libcuda.so.1` defining every driver entry point vLLM's extensions link to, each
    returning an error (999, CUDA_ERROR_UNKNOWN): enough for them to load without a driver."""
    names: set[str] = set()
    for library in vllm_dir.glob("*.so"):
        listing = subprocess.run(["nm", "-D", "--undefined-only", str(library)],
                                 capture_output=True, text=True, check=True).stdout
        names.update(line.split()[-1].split("@")[0] for line in listing.splitlines()
                     if line.split() and line.split()[-1].startswith("cu"))
    out.mkdir(parents=True, exist_ok=True)
    source = out / "stub.c"
    source.write_text("".join(f"int {name}(void) {{ return 999; }}\n" for name in sorted(names)))
    library = out / "libcuda.so.1"
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(library),
                    str(source)], check=True)
    return library


def check_engines(configs: Path) -> int:
    """In the stand-in: each engine of each campaign config, argv parsed and built into its
    `VllmConfig` by this (the staged) vLLM, under a CUDA platform that answers as `CARD`."""
    import vllm.platforms
    from vllm.platforms.cuda import CudaPlatform
    from vllm.platforms.interface import DeviceCapability

    # Before anything of vLLM asks which platform it runs on (the engine arguments do).
    CudaPlatform.get_device_capability = classmethod(
        lambda cls, device_id=0: DeviceCapability(*CARD["capability"]))
    CudaPlatform.get_device_name = classmethod(lambda cls, device_id=0: CARD["name"])
    CudaPlatform.get_device_total_memory = classmethod(
        lambda cls, device_id=0: CARD["memory_bytes"])
    vllm.platforms.current_platform = CudaPlatform()

    import yaml
    from vllm.engine.arg_utils import AsyncEngineArgs

    from serve_app.config import AppConfig
    from serve_app.engine import engine_argv, parse_engine_args
    for preset in PRESET_CONFIGS.values():
        path = configs / preset.name
        cfg = AppConfig.model_validate(yaml.safe_load(path.read_text())["applications"][0]["args"])
        for role in ["decode"] if cfg.mode == "unified" else ["prefill", "decode"]:
            try:
                engine_args = AsyncEngineArgs.from_cli_args(
                    parse_engine_args(engine_argv(cfg, role)))
                engine_args.create_engine_config()
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - reported with the engine
                print(f"{path.name} {role}: {type(exc).__name__}: {exc}")
                return 1
            print(f"{path.name} {role}: engine arguments ok")
    print(f"engines ok, vllm {vllm.__version__}")
    return 0


if __name__ == "__main__":
    raise SystemExit(check_engines(Path(sys.argv[1])))
