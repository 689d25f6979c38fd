"""fsspec paths (local or s3://) and atomic writes.

Every write that matters goes through `atomic_write_bytes`: locally a temp file in the same folder, fsync,
`os.replace`, fsync of the folder; on S3 a single PUT, which is atomic (an object is visible whole or not at
all). So a crash mid-write never leaves a half-written index, manifest or part visible under its final name.

S3 endpoint and region come from `configure(storage_cfg)`, which also exports them as environment variables
so that Ray workers started afterwards (and subprocesses) see the same storage.
"""
from __future__ import annotations

import json
import os
import uuid
from typing import Any, Optional, Tuple

import fsspec
from fsspec.core import url_to_fs

ENV_ENDPOINT = "VMEM_S3_ENDPOINT_URL"
ENV_REGION = "VMEM_S3_REGION"


def configure(storage_cfg: Any) -> None:
    """Make the config's S3 settings the process-wide default (and visible to child processes)."""
    if getattr(storage_cfg, "s3_endpoint_url", None):
        os.environ[ENV_ENDPOINT] = storage_cfg.s3_endpoint_url
    if getattr(storage_cfg, "s3_region", None):
        os.environ[ENV_REGION] = storage_cfg.s3_region


def worker_env() -> dict:
    """The environment variables that carry storage settings and credentials (VMEM_*, AWS_*) to Ray workers."""
    return {k: v for k, v in os.environ.items() if k.startswith(("VMEM_", "AWS_"))}


def storage_options(url: str) -> dict:
    """fsspec keyword arguments for `url` (S3 endpoint/region from the environment set by `configure`)."""
    if not is_remote(url):
        return {}
    client_kwargs = {"region_name": os.environ.get(ENV_REGION, "us-east-1")}
    if os.environ.get(ENV_ENDPOINT):
        client_kwargs["endpoint_url"] = os.environ[ENV_ENDPOINT]
    # Listings are cached by s3fs; our readers must see objects written a moment ago by other processes.
    return {"client_kwargs": client_kwargs, "use_listings_cache": False}


_LOCAL = fsspec.filesystem("file")


def is_remote(url: str) -> bool:
    return "://" in str(url) and not str(url).startswith("file://")


def filesystem(url: str) -> Tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path-within-it) for a local path or URL."""
    url = str(url)
    if "://" not in url and "::" not in url:  # a plain local path: skip URL parsing (every query checks files)
        return _LOCAL, _LOCAL._strip_protocol(url)
    return url_to_fs(url, **storage_options(url))


def pyarrow_filesystem(url: str):
    """(pyarrow filesystem, path) for Ray Data / pyarrow readers, routed through our fsspec settings.

    Ray Data would otherwise resolve s3:// with pyarrow's own S3 client, ignoring the configured endpoint.
    """
    from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem

    if not is_remote(url):
        return LocalFileSystem(), os.path.abspath(url)
    fs, path = filesystem(url)
    return PyFileSystem(FSSpecHandler(fs)), path


def join(base: str, *parts: str) -> str:
    out = str(base).rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    if not is_remote(url):
        fs.makedirs(path, exist_ok=True)
    # S3 has no folders: nothing to create.


def listdir(url: str) -> list:
    """Names (not paths) directly under `url`; empty if it does not exist."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def read_bytes(url: str, attempts: int = 5) -> bytes:
    """The whole object. An object replaced while it is read (s3fs raises `FileExpired`: its ETag changed
    between the listing and the GET, e.g. a `CURRENT` hint another writer just rewrote) is read again."""
    fs, path = filesystem(url)
    for attempt in range(attempts):
        try:
            with fs.open(path, "rb") as f:
                return f.read()
        except OSError as e:
            if type(e).__name__ != "FileExpired" or attempt == attempts - 1:
                raise
            fs.invalidate_cache(path)


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish_local(url: str, data: bytes, publish) -> None:
    """Write `data` to a fsync'd temp file beside `url`, then `publish(tmp, path)` it and fsync the folder."""
    path = os.path.abspath(url)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
        _fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(url: str, data: bytes) -> None:
    """Write `data` to `url` so that readers see either the old object or the complete new one."""
    if is_remote(url):
        fs, path = filesystem(url)
        fs.pipe_file(path, data)  # one PUT: atomic on S3
        return
    _publish_local(url, data, os.replace)


def write_hint(url: str, data: bytes) -> None:
    """Replace a small hint object atomically but without fsync (readers see the old or the new bytes; after a
    power cut, possibly the old): for values that only save readers work, never for a record."""
    if is_remote(url):
        atomic_write_bytes(url, data)
        return
    path = os.path.abspath(url)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_hint(url: str) -> Optional[bytes]:
    """The bytes of a hint object, None when there is none (local files read directly: on a query's path)."""
    if not is_remote(url):
        try:
            with open(url, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
    try:
        return read_bytes(url)
    except FileNotFoundError:
        return None


class AlreadyExists(Exception):
    """`create_exclusive` lost the race: another writer created the object first."""


def create_exclusive(url: str, data: bytes) -> None:
    """Create `url` with `data` only if it does not exist (compare-and-swap on a name); else AlreadyExists.

    Locally: write a temp file, then `os.link` it to the final name (fails if the name exists, atomic). On S3:
    one PUT with `If-None-Match: *` (a conditional write, refused with 412 if the key exists).
    """
    if is_remote(url):
        fs, path = filesystem(url)
        bucket, _, key = path.partition("/")
        try:
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except Exception as e:  # botocore wraps the 412 in a ClientError / OSError depending on the version
            if "PreconditionFailed" in repr(e) or "412" in repr(e) or isinstance(e, FileExistsError):
                raise AlreadyExists(url) from e
            raise
        return

    def link(tmp: str, path: str) -> None:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise AlreadyExists(url) from None

    _publish_local(url, data, link)


def atomic_write_json(url: str, obj: Any) -> None:
    atomic_write_bytes(url, json.dumps(obj, indent=2, sort_keys=True).encode())


def upload_file(local_path: str, url: str) -> None:
    """Copy a finished local file to `url` atomically (temp + rename locally, one PUT on S3)."""
    if is_remote(url):
        fs, path = filesystem(url)
        fs.put_file(local_path, path)
        return
    with open(local_path, "rb") as f:
        atomic_write_bytes(url, f.read())


def cache_path(url: str, cache_dir: Optional[str] = None) -> str:
    """Where `local_copy` keeps its copy of a remote `url`."""
    import tempfile

    _, path = filesystem(url)
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "vmem-cache")
    return os.path.join(cache_dir, path.replace("/", "__"))


def evict(url: str) -> bool:
    """Remove the local cached copy of a remote `url` (erasure, or a rewritten object); True if there was one."""
    if not is_remote(url):
        return False
    p = cache_path(url)
    if os.path.exists(p):
        os.remove(p)
        return True
    return False


def local_copy(url: str, cache_dir: Optional[str] = None) -> str:
    """A local path holding the bytes of `url` (the path itself when it is already local)."""
    if not is_remote(url):
        return os.path.abspath(url)
    fs, path = filesystem(url)
    dest = cache_path(url, cache_dir)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if not os.path.exists(dest):
        tmp = f"{dest}.tmp-{uuid.uuid4().hex}"
        fs.get_file(path, tmp)
        os.replace(tmp, dest)
    return dest


def remove(url: str) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)
