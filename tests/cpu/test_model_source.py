"""Models from S3: real boto3 against a real S3 API (moto in server mode on 127.0.0.1).

Nothing here can reach AWS: every client's endpoint is the local server (`AWS_ENDPOINT_URL`),
the credentials are fake, shared config files are empty and the instance metadata service is
off, so the credential chain never leaves the machine either.
"""

from __future__ import annotations

import fcntl
import json
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serve_app import model_source
from serve_app.model_source import (
    MARKER,
    PARTS_SUFFIX,
    ModelSourceError,
    S3Source,
    fetch_s3_model,
    local_copy_dir,
    make_client,
)
from tests.cpu.conftest import MODEL_NAME, ROOT, TINY_MODEL, app_args, free_port

BUCKET = "pd-serve-models"
SOURCE = f"s3://{BUCKET}/tiny-llama"
SMALL_PART = 64 << 10  # several parts per file of the tiny model, to exercise resume
FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
CHAIN_VARS = ("AWS_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
              "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
              "AWS_ENDPOINT_URL_S3")


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A local S3 server holding the tiny model under `SOURCE`; the environment that points
    boto3 at it (applied to this process, inherited by subprocesses and passed to replicas)."""
    from moto.server import ThreadedMotoServer

    from serve_app.tiny_model import build

    build(TINY_MODEL)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    empty = tmp_path_factory.mktemp("aws") / "empty"
    empty.write_text("")
    env = {**FAKE_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "AWS_CONFIG_FILE": str(empty), "AWS_SHARED_CREDENTIALS_FILE": str(empty)}
    with pytest.MonkeyPatch.context() as patch:
        for name in CHAIN_VARS:
            patch.delenv(name, raising=False)
        for name, value in env.items():
            patch.setenv(name, value)
        client = make_client()
        assert client.meta.endpoint_url == env["AWS_ENDPOINT_URL"]
        client.create_bucket(Bucket=BUCKET)
        for path in model_files(TINY_MODEL):
            client.put_object(Bucket=BUCKET, Key=f"tiny-llama/{path.name}", Body=path.read_bytes())
        yield env
    server.stop()


def model_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def assert_same_files(copy: Path, original: Path = TINY_MODEL) -> None:
    names = [p.name for p in model_files(copy)]
    assert names == [p.name for p in model_files(original)]
    for name in names:
        assert (copy / name).read_bytes() == (original / name).read_bytes(), name
    assert not list(copy.glob("*.partial*"))


def num_parts(part_size: int) -> int:
    return sum(max(1, math.ceil(p.stat().st_size / part_size)) for p in model_files(TINY_MODEL))


def counting_client(calls: list[str]) -> Any:
    client = make_client()
    client.meta.events.register(
        "before-call.s3.GetObject", lambda params, **_: calls.append(params["url_path"])
    )
    return client


def test_two_starters_at_once_download_once(s3_env: dict[str, str], tmp_path: Path) -> None:
    """Prefill and decode on one node start together: one downloads, the other waits on the
    lock and then loads the same copy."""
    target = local_copy_dir(S3Source.parse(SOURCE), tmp_path)
    target.parent.mkdir(parents=True)
    command = [sys.executable, "-m", "serve_app.model_source", SOURCE, "--cache-dir", str(tmp_path)]
    # Hold the lock ourselves until both starters wait on it, so they truly start together.
    with open(target.parent / f".{target.name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        starters = [
            subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
            for _ in range(2)
        ]
        for starter in starters:
            assert starter.stderr is not None
            line = starter.stderr.readline()
            while line and "waiting" not in line:
                line = starter.stderr.readline()
            assert "another process on this node is fetching it" in line
        fcntl.flock(lock, fcntl.LOCK_UN)
    results = []
    for starter in starters:
        stdout, stderr = starter.communicate(timeout=120)
        assert starter.returncode == 0, stderr
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    downloads = sorted(r["num_files_downloaded"] for r in results)
    assert downloads == [0, len(model_files(TINY_MODEL))]
    assert {r["path"] for r in results} == {str(target)}
    assert_same_files(target)
    # A third start on this node is a cache hit that makes no S3 call at all.
    calls: list[str] = []
    again = fetch_s3_model(SOURCE, tmp_path, client=counting_client(calls))
    assert (again.num_files_downloaded, calls) == (0, [])


def test_interrupted_download_resumes(s3_env: dict[str, str], tmp_path: Path) -> None:
    """A starter killed mid-download (SIGKILL after its 8th part request) leaves finished parts
    recorded; the next start fetches only the rest, and the copy is exact."""
    killed_after = 8
    child = f"""
import os, signal
from pathlib import Path
from serve_app.model_source import fetch_s3_model, make_client
client = make_client()
seen = []
def die(**_):
    seen.append(1)
    if len(seen) == {killed_after}:
        os.kill(os.getpid(), signal.SIGKILL)
client.meta.events.register("before-call.s3.GetObject", die)
fetch_s3_model({SOURCE!r}, Path({str(tmp_path)!r}), part_size={SMALL_PART},
               max_concurrency=1, client=client)
"""
    run = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == -9, run.stderr
    target = local_copy_dir(S3Source.parse(SOURCE), tmp_path)
    assert not (target / MARKER).exists()
    assert list(target.glob(f"*{PARTS_SUFFIX}"))

    calls: list[str] = []
    copy = fetch_s3_model(SOURCE, tmp_path, part_size=SMALL_PART, client=counting_client(calls))
    # One request per part, minus the parts that finished before the kill.
    assert len(calls) == num_parts(SMALL_PART) - (killed_after - 1)
    assert copy.num_files == len(model_files(TINY_MODEL))
    assert (target / MARKER).is_file()
    assert_same_files(target)


def test_missing_bucket_names_the_source(s3_env: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"s3://no-such-bucket-here/m/: bucket "
                       r"'no-such-bucket-here' does not exist \(NoSuchBucket\)"):
        fetch_s3_model("s3://no-such-bucket-here/m", tmp_path)


def test_missing_key_names_the_source(s3_env: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match=rf"s3://{BUCKET}/tiny-lama/: no objects under "
                       r"prefix 'tiny-lama/'.*\(missing key\)"):
        fetch_s3_model(f"s3://{BUCKET}/tiny-lama", tmp_path)


@pytest.mark.parametrize("key", ["escape//tmp/evil", "escape/../evil"])
def test_a_key_outside_the_prefix_is_refused(
    s3_env: dict[str, str], tmp_path: Path, key: str
) -> None:
    client = make_client()
    client.put_object(Bucket=BUCKET, Key=key, Body=b"x")
    try:
        with pytest.raises(ModelSourceError, match=r"escapes the prefix"):
            fetch_s3_model(f"s3://{BUCKET}/escape", tmp_path / "cache")
        assert not list(tmp_path.rglob("evil"))
    finally:
        client.delete_object(Bucket=BUCKET, Key=key)


def test_no_credentials_names_the_source(
    s3_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)
    with pytest.raises(ModelSourceError, match=rf"{SOURCE}/: no AWS credentials.*standard chain"):
        fetch_s3_model(SOURCE, tmp_path)


def test_no_space_names_the_source(
    s3_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full disk cannot be made here without root: only the free-space figure is faked.
    real = model_source.shutil.disk_usage
    monkeypatch.setattr(
        model_source.shutil, "disk_usage", lambda path: real(path)._replace(free=10 << 20)
    )
    with pytest.raises(ModelSourceError, match=rf"{SOURCE}/: no space: .* GiB free in "):
        fetch_s3_model(SOURCE, tmp_path)
    assert not list(tmp_path.rglob("*.partial"))


def test_bad_s3_source_is_a_config_error() -> None:
    from pydantic import ValidationError

    from serve_app.config import AppConfig

    with pytest.raises(ValidationError, match=r"model.source 's3://'.*s3://bucket/prefix"):
        AppConfig.model_validate({"model": {"source": "s3://"}})
    AppConfig.model_validate({"model": {"source": SOURCE, "served_model_name": MODEL_NAME}})


def test_app_serves_the_s3_model_like_the_local_copy(
    s3_env: dict[str, str], http_port: int, tmp_path: Path
) -> None:
    """One app start: both engines load the S3 model from the node cache, and greedy output
    equals one engine alone on the local copy."""
    import openai
    from ray import serve

    from serve_app.app import build_app

    prompt, max_tokens = "The quick brown fox jumps over the lazy dog.", 16
    out = tmp_path / "reference.json"
    reference = subprocess.Popen(
        ["nice", "-n", "19", sys.executable, str(Path(__file__).with_name("reference_engine.py")),
         str(TINY_MODEL), str(max_tokens), str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    _, reference_err = reference.communicate(json.dumps([prompt]), timeout=600)
    assert reference.returncode == 0, reference_err[-2000:]
    (expected,) = json.loads(out.read_text())

    cache = tmp_path / "node-cache"
    replica_env = {**s3_env, model_source.CACHE_ENV: str(cache)}
    args = app_args(
        model={"source": SOURCE, "served_model_name": MODEL_NAME},
        prefill={"env": replica_env},
        decode={"env": replica_env},
    )
    started = time.monotonic()
    serve.run(build_app(args), name="pd-s3", route_prefix="/")
    try:
        print(f"app from S3 started in {time.monotonic() - started:.0f} s")
        assert_same_files(local_copy_dir(S3Source.parse(SOURCE), cache))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused",
                               max_retries=0)
        assert [m.id for m in client.models.list().data] == [MODEL_NAME]
        response = client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        assert response.choices[0].token_ids == expected["token_ids"]
        assert response.choices[0].text == expected["text"]
    finally:
        serve.delete("pd-s3")
