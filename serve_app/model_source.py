"""Where the engines' weights come from: a local folder, a Hugging Face id, or `s3://bucket/prefix`.

An S3 source is copied once per node into a node-local cache, then both engines load it from
disk. `fetch_s3_model` does it in five steps:

  1. lock: an exclusive file lock per source, so a prefill and a decode engine that start
     together download once (the second waits, then finds the copy complete)
  2. list: every object under the prefix with its size and ETag (the manifest)
  3. check: free disk for what is not on disk yet
  4. fetch: parts of `part_size` bytes in parallel, each a ranged GET pinned to the listed ETag
     (`IfMatch`), so no part can come from another version of the object; each finished part is
     recorded beside its file, so an interrupted download resumes where it stopped
  5. verify: every file's size (and MD5 where the ETag is one), rename into place, write the
     marker that makes the next start on this node a cache hit without any S3 call

The cache lives in `$PD_SERVE_MODEL_CACHE` (default `~/.cache/pd-serve/models`): point it at
the node's NVMe instance store. A prefix is treated as immutable: publish a new model version
under a new prefix. Credentials come from boto3's standard chain only (environment, shared
config and credentials files, SSO, container or instance role); nothing here takes a key.
boto3 is imported here and nowhere else.

    python -m serve_app.model_source s3://bucket/models/Llama-3.1-8B-Instruct   # pre-fetch
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serve_app.config import AppConfig

logger = logging.getLogger("ray.serve")

S3_SCHEME = "s3://"
CACHE_ENV = "PD_SERVE_MODEL_CACHE"
DEFAULT_CACHE = Path("~/.cache/pd-serve/models")
MARKER = ".pd-serve-complete.json"
PARTIAL_SUFFIX = ".partial"
PARTS_SUFFIX = ".partial.parts"
DEFAULT_PART_SIZE = 64 << 20
DEFAULT_MAX_CONCURRENCY = 16
READ_CHUNK = 1 << 20
PART_ATTEMPTS = 4
FREE_SPACE_MARGIN = 1 << 30
GIB = 1 << 30


class ModelSourceError(RuntimeError):
    """The model cannot be fetched; the message names the source and what to do."""


def is_s3_source(source: str) -> bool:
    return source.startswith(S3_SCHEME)


@dataclass(frozen=True)
class S3Source:
    bucket: str
    prefix: str
    """The key prefix with a trailing `/` (empty for the whole bucket)."""

    @classmethod
    def parse(cls, source: str) -> S3Source:
        """`s3://bucket/prefix` -> S3Source; ValueError naming the source when it is not one."""
        if not is_s3_source(source):
            raise ValueError(f"{source!r} is not an s3:// source")
        bucket, _, prefix = source[len(S3_SCHEME):].partition("/")
        if not bucket or "/" in bucket or len(bucket) < 3:
            raise ValueError(f"{source!r}: expected s3://bucket/prefix, with a bucket name")
        prefix = prefix.strip("/")
        return cls(bucket, f"{prefix}/" if prefix else "")

    @property
    def url(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.prefix}"


@dataclass(frozen=True)
class RemoteFile:
    key: str
    relative_path: str
    size: int
    etag: str


@dataclass(frozen=True)
class ModelCopy:
    """What `fetch_s3_model` left on disk, and how much of it this call downloaded."""

    path: Path
    num_files: int
    num_bytes: int
    num_files_downloaded: int
    num_bytes_downloaded: int


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def local_copy_dir(source: S3Source, root: Path | None = None) -> Path:
    parts = [source.bucket, *PurePosixPath(source.prefix).parts]
    return (root or cache_root()).joinpath(*parts)


def with_local_model(cfg: AppConfig) -> AppConfig:
    """`cfg` with an s3:// `model.source` replaced by this node's copy (fetched if missing).

    Clients keep sending the name they knew: `served_model_name` defaults to the s3:// source.
    Any other source is returned unchanged (vLLM reads local folders and hub ids itself).
    """
    if not is_s3_source(cfg.model.source):
        return cfg
    copy = fetch_s3_model(cfg.model.source)
    model = cfg.model.model_copy(
        update={"source": str(copy.path), "served_model_name": cfg.model.name}
    )
    return cfg.model_copy(update={"model": model})


def fetch_s3_model(
    source: str,
    cache_dir: Path | None = None,
    *,
    part_size: int = DEFAULT_PART_SIZE,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    client: Any = None,
) -> ModelCopy:
    """Copy every object under `source` into the node-local cache once; see the module docstring.

    Raises ModelSourceError naming the source for a bad URL, a missing bucket or prefix, missing
    or refused credentials, too little disk, or an object that changed while being copied.
    """
    try:
        parsed = S3Source.parse(source)
    except ValueError as error:
        raise ModelSourceError(str(error)) from None
    target = local_copy_dir(parsed, cache_dir)
    if (target / MARKER).is_file():
        return _cached_copy(target)
    target.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{target.name}.lock", parsed.url):
        if (target / MARKER).is_file():  # another process finished it while we waited
            return _cached_copy(target)
        s3 = client or make_client()
        manifest = _list_objects(s3, parsed)
        _check_free_space(parsed.url, target, manifest, part_size)
        started = time.monotonic()
        downloaded = _fetch_all(s3, parsed, target, manifest, part_size, max_concurrency)
        _write_marker(target, parsed, manifest)
    num_bytes = sum(f.size for f in downloaded)
    logger.info(
        "model %s: %d files, %.2f GiB downloaded into %s in %.1f s",
        parsed.url, len(downloaded), num_bytes / GIB, target, time.monotonic() - started,
    )
    return ModelCopy(
        path=target,
        num_files=len(manifest),
        num_bytes=sum(f.size for f in manifest),
        num_files_downloaded=len(downloaded),
        num_bytes_downloaded=num_bytes,
    )


def make_client() -> Any:
    """An S3 client from the standard credential and region chain, with retries and a pool
    large enough for the parallel parts. `AWS_ENDPOINT_URL(_S3)` is honoured by botocore."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": "standard", "max_attempts": 10},
        max_pool_connections=DEFAULT_MAX_CONCURRENCY + 4,
        connect_timeout=10,
        read_timeout=60,
    )
    return boto3.session.Session().client("s3", config=config)


def _cached_copy(target: Path) -> ModelCopy:
    files = json.loads((target / MARKER).read_text())["files"]
    return ModelCopy(target, len(files), sum(f["size"] for f in files), 0, 0)


@contextlib.contextmanager
def _exclusive_lock(path: Path, url: str) -> Iterator[None]:
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("model %s: another process on this node is fetching it; waiting", url)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# 2. list ---------------------------------------------------------------------------------------


def _list_objects(s3: Any, source: S3Source) -> list[RemoteFile]:
    manifest: list[RemoteFile] = []
    with _explained(source):
        pages = s3.get_paginator("list_objects_v2").paginate(
            Bucket=source.bucket, Prefix=source.prefix
        )
        for page in pages:
            for item in page.get("Contents", []):
                key = item["Key"]
                if key.endswith("/"):
                    continue  # a console "folder" marker
                relative = key[len(source.prefix):]
                if PurePosixPath(relative).is_absolute() or ".." in PurePosixPath(relative).parts:
                    raise ModelSourceError(f"{source.url}: object key {key!r} escapes the prefix")
                manifest.append(RemoteFile(key, relative, int(item["Size"]), item["ETag"]))
    if not manifest:
        raise ModelSourceError(
            f"model source {source.url}: no objects under prefix {source.prefix!r} in bucket "
            f"{source.bucket!r} (missing key); check the path with: aws s3 ls {source.url}"
        )
    return manifest


@contextlib.contextmanager
def _explained(source: S3Source) -> Iterator[None]:
    """botocore's errors, turned into ones that name the source and say what to do."""
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    try:
        yield
    except (NoCredentialsError, PartialCredentialsError) as error:
        raise ModelSourceError(
            f"model source {source.url}: no AWS credentials ({error}); the standard chain was "
            "searched (AWS_* environment, ~/.aws/config and credentials, SSO, container and "
            "instance role): give this node an instance profile that can read the bucket"
        ) from None
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            raise ModelSourceError(
                f"model source {source.url}: bucket {source.bucket!r} does not exist (NoSuchBucket)"
            ) from None
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                    "ExpiredToken", "InvalidToken"):
            raise ModelSourceError(
                f"model source {source.url}: access refused ({code}): the credentials found by "
                "the standard chain cannot list and read this prefix (s3:ListBucket, "
                "s3:GetObject)"
            ) from None
        raise ModelSourceError(f"model source {source.url}: {error}") from None


# 3. check --------------------------------------------------------------------------------------


def _check_free_space(url: str, target: Path, manifest: list[RemoteFile], part_size: int) -> None:
    missing = 0
    for remote in manifest:
        if _is_complete(target / remote.relative_path, remote):
            continue
        done = _done_parts(target / remote.relative_path, remote.etag, part_size)
        missing += max(remote.size - len(done) * part_size, 0)
    free = shutil.disk_usage(target).free
    if missing + FREE_SPACE_MARGIN > free:
        raise ModelSourceError(
            f"model source {url}: no space: {missing / GIB:.2f} GiB still to download (+1 GiB "
            f"margin) but {free / GIB:.2f} GiB free in {target}; point {CACHE_ENV} at a larger "
            "disk (the node's NVMe instance store)"
        )


# 4. fetch --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Part:
    remote: RemoteFile
    index: int
    start: int
    end: int  # inclusive


class _FileProgress:
    """One file being fetched: its `.partial` data and the `.partial.parts` record of done parts
    (first line the ETag and part size, then one part index a line)."""

    def __init__(self, path: Path, remote: RemoteFile, part_size: int) -> None:
        self.path, self.remote = path, remote
        self.partial = path.with_name(path.name + PARTIAL_SUFFIX)
        self.record = path.with_name(path.name + PARTS_SUFFIX)
        self.num_parts = max(1, -(-remote.size // part_size))
        self.done = _done_parts(path, remote.etag, part_size)
        self.lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        if not self.done:  # a fresh start (or the object or part size changed): start over
            self.record.write_text(_record_header(remote.etag, part_size))
            with open(self.partial, "wb") as data:
                data.truncate(remote.size)

    def mark_done(self, index: int) -> bool:
        """Record a finished part; True when it was the file's last."""
        with self.lock:
            with open(self.record, "a") as record:
                record.write(f"{index}\n")
            self.done.add(index)
            return len(self.done) == self.num_parts


def _fetch_all(
    s3: Any,
    source: S3Source,
    target: Path,
    manifest: list[RemoteFile],
    part_size: int,
    max_concurrency: int,
) -> list[RemoteFile]:
    todo = [r for r in manifest if not _is_complete(target / r.relative_path, r)]
    progress = {r.key: _FileProgress(target / r.relative_path, r, part_size) for r in todo}
    parts = [
        _Part(r, i, i * part_size, min((i + 1) * part_size, r.size) - 1)
        for r in todo
        if r.size > 0
        for i in range(progress[r.key].num_parts)
        if i not in progress[r.key].done
    ]
    for remote in todo:  # empty files, and files whose last part landed before a stop
        if remote.size == 0 or len(progress[remote.key].done) == progress[remote.key].num_parts:
            _finish_file(s3, source, progress[remote.key])

    def fetch(part: _Part) -> None:
        file = progress[part.remote.key]
        _fetch_part(s3, source, file, part)
        if file.mark_done(part.index):
            _finish_file(s3, source, file)

    with ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="s3-part") as pool:
        # list() re-raises the first part's error; the others finish or fail on their own.
        list(pool.map(fetch, parts))
    return todo


def _fetch_part(s3: Any, source: S3Source, file: _FileProgress, part: _Part) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    for attempt in range(1, PART_ATTEMPTS + 1):
        try:
            with _explained(source):
                try:
                    response = s3.get_object(
                        Bucket=source.bucket,
                        Key=part.remote.key,
                        Range=f"bytes={part.start}-{part.end}",
                        IfMatch=part.remote.etag,
                    )
                except ClientError as error:
                    if error.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                        raise _changed(source, part.remote) from None
                    raise
                _write_body(response["Body"], file.partial, part)
            return
        except (BotoCoreError, OSError) as error:  # a stream cut mid-body: botocore won't retry
            if attempt == PART_ATTEMPTS:
                raise ModelSourceError(
                    f"model source {source.url}: {part.remote.key} bytes {part.start}-{part.end} "
                    f"failed {PART_ATTEMPTS} times: {error}"
                ) from error
            time.sleep(0.5 * 2**attempt)


def _write_body(body: Any, partial: Path, part: _Part) -> None:
    offset, expected = part.start, part.end - part.start + 1
    fd = os.open(partial, os.O_WRONLY)
    try:
        with contextlib.closing(body):
            for chunk in body.iter_chunks(READ_CHUNK):
                os.pwrite(fd, chunk, offset)
                offset += len(chunk)
    finally:
        os.close(fd)
    if offset - part.start != expected:
        raise OSError(f"short read: {offset - part.start} of {expected} bytes")


# 5. verify -------------------------------------------------------------------------------------


def _finish_file(s3: Any, source: S3Source, file: _FileProgress) -> None:
    remote = file.remote
    if not file.partial.exists():
        file.partial.touch()
    size = file.partial.stat().st_size
    if size != remote.size:
        raise ModelSourceError(
            f"model source {source.url}: {remote.key} is {size} bytes on disk, {remote.size} listed"
        )
    if not _etag_matches(s3, source, file.partial, remote):
        file.record.unlink(missing_ok=True)
        raise _changed(source, remote)
    file.partial.replace(file.path)
    file.record.unlink(missing_ok=True)


def _etag_matches(s3: Any, source: S3Source, path: Path, remote: RemoteFile) -> bool:
    """A single-part upload's ETag is the content's MD5 (unless KMS-encrypted); a multipart
    ETag (`md5-of-part-md5s-N`) needs the upload's part size, so there size and IfMatch rule."""
    etag = remote.etag.strip('"')
    if "-" in etag or len(etag) != 32:
        return True
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as data:
        for chunk in iter(lambda: data.read(8 * READ_CHUNK), b""):
            digest.update(chunk)
    if digest.hexdigest() == etag:
        return True
    with _explained(source):
        head = s3.head_object(Bucket=source.bucket, Key=remote.key)
    return head.get("ServerSideEncryption") == "aws:kms"  # ETag is not the MD5 then


def _changed(source: S3Source, remote: RemoteFile) -> ModelSourceError:
    return ModelSourceError(
        f"model source {source.url}: {remote.key} changed while it was being copied (ETag "
        f"{remote.etag} no longer matches); publish models under a new prefix, then restart"
    )


def _is_complete(path: Path, remote: RemoteFile) -> bool:
    return path.is_file() and path.stat().st_size == remote.size and not path.with_name(
        path.name + PARTS_SUFFIX
    ).exists()


def _record_header(etag: str, part_size: int) -> str:
    return f"{etag} {part_size}\n"


def _done_parts(path: Path, etag: str, part_size: int) -> set[int]:
    record = path.with_name(path.name + PARTS_SUFFIX)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    if not record.is_file() or not partial.is_file():
        return set()
    lines = record.read_text().splitlines()
    if not lines or f"{lines[0]}\n" != _record_header(etag, part_size):
        return set()
    return {int(line) for line in lines[1:] if line.strip().isdigit()}


def _write_marker(target: Path, source: S3Source, manifest: list[RemoteFile]) -> None:
    files = [{"key": f.key, "size": f.size, "etag": f.etag} for f in manifest]
    marker = target / MARKER
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"source": source.url, "files": files}, indent=1))
    tmp.replace(marker)


def main(argv: Sequence[str] | None = None) -> int:
    """Pre-fetch a model into this node's cache; prints what was done as one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m serve_app.model_source")
    parser.add_argument("source", help="s3://bucket/prefix")
    parser.add_argument("--cache-dir", type=Path, help=f"default ${CACHE_ENV} or {DEFAULT_CACHE}")
    parser.add_argument("--part-size-mib", type=int, default=DEFAULT_PART_SIZE >> 20)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        copy = fetch_s3_model(args.source, args.cache_dir, part_size=args.part_size_mib << 20)
    except ModelSourceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps({**copy.__dict__, "path": str(copy.path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
