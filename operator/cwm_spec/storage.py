"""Artifact storage: the one layer through which every step reads and writes, local or remote.

Every input and output of a step is a URI: a local path (or ``file://``), or an object-store URI
(``s3://`` through s3fs, a dependency; ``gs://`` and ``az://``/``abfs://`` through the extras
``cwm-pipeline[gcs]`` and ``[azure]``). Three kinds of artifact, each committed by one last
write, so a reader never sees half of one:

* **JSON documents** (``eval.json``, ``latest.json``, data set manifests, the runner's state):
  :func:`write_json_atomic`. Locally a temporary file, ``fsync`` and ``os.replace`` (then the
  folder is fsynced, so the rename survives a crash); on an object store one PUT, which the store
  makes visible whole or not at all.
* **Data sets** (``cwm_spec.artifacts``): shards first, ``manifest.json`` last; readers open
  the manifest first and find nothing without it.
* **Folders** (checkpoints, tokenizers, DeepSpeed states, metrics): :func:`upload_tree` removes
  the old commit marker, uploads every file, then writes ``_COMMITTED.json`` (each file's size)
  last; :func:`download_tree` and :func:`committed` refuse a folder without it. A
  writer killed mid-upload leaves an uncommitted folder that the rerun overwrites (redo, not
  resume: the same files are uploaded again).

Libraries that insist on local files (DeepSpeed, ``tokenizers``, safetensors) get a staged copy:
:func:`local_copy` downloads a committed folder into the cache, keyed by the URI and the marker,
so a second reader on the same node reuses it.

Credentials come from the backend's standard environment (s3fs/botocore: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` for
S3-compatible stores; adlfs: ``AZURE_STORAGE_CONNECTION_STRING`` or ``AZURE_STORAGE_ACCOUNT_NAME``
with ``AZURE_STORAGE_ACCOUNT_KEY``/``AZURE_STORAGE_SAS_TOKEN``; gcsfs: google-auth's defaults,
``GOOGLE_APPLICATION_CREDENTIALS`` naming a key file, or the metadata server), which the operator
fills from ``spec.storage.secret`` and the local runner inherits. :func:`scrub_env` is what
keeps them out of sandboxed programs. Failures become one
:class:`StorageError` naming the step, the URI and the cause (bad credentials, missing bucket,
unreachable endpoint).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import fsspec

COMMIT = "_COMMITTED.json"
COMMIT_FORMAT = "cwm-commit/v1"
# Environment variables that carry object-store credentials or endpoints, by backend.
CREDENTIAL_PREFIXES = ("AWS_", "GOOGLE_", "GCLOUD_", "CLOUDSDK_", "GCS_", "AZURE_", "AZURE")
# Extra names to treat as credentials (comma-separated): keys of spec.storage.secret that follow
# no backend's naming; the operator and the runner may set it.
CREDENTIAL_NAMES_VAR = "CWM_STORAGE_CREDENTIAL_NAMES"
_BLOCK = 8 << 20
_PR_SET_DUMPABLE = 4
try:  # prctl (glibc Linux); elsewhere credentials simply are not hidden from same-user processes
    _LIBC: Any = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:
    _LIBC = None


class StorageError(RuntimeError):
    """A storage operation failed: the message names the step, the URI and the cause."""


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def step_name() -> str | None:
    """The running step's name, from its configuration in the environment (if any)."""
    try:
        return json.loads(os.environ.get("CWM_STEP_CONFIG", "")).get("step")
    except (ValueError, AttributeError):
        return None


def describe(exc: BaseException) -> str:
    """The cause of a storage failure in words: credentials, bucket, endpoint, or as raised."""
    text = f"{type(exc).__name__}: {exc}"
    lowered = text.lower()
    if isinstance(exc, PermissionError) or any(k in lowered for k in (
            "invalidaccesskeyid", "signaturedoesnotmatch", "signature we calculated",
            "accessdenied", "access denied", "forbidden", "invalidtoken",
            "authenticationfailed", "failed to authenticate")):
        return (f"access denied: check the credentials (for s3: AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY; az: AZURE_STORAGE_CONNECTION_STRING or the account "
                f"name and key; from spec.storage.secret in a pod) [{text}]")
    if missing_bucket(exc):
        return f"the bucket does not exist [{text}]"
    if any(k in lowered for k in ("connect", "endpoint", "timeout", "timed out", "name or service")):
        return (f"the endpoint is unreachable (the network, or the store's endpoint setting: "
                f"AWS_ENDPOINT_URL, the connection string's BlobEndpoint...) [{text}]")
    if isinstance(exc, ImportError):
        return (f"no fsspec backend for this scheme ({exc}); s3fs is a dependency, gs:// needs "
                "`pip install 'cwm-pipeline[gcs]'`, az:// `[azure]`")
    return text


@contextlib.contextmanager
def failures(action: str, uri: str) -> Iterator[None]:
    """Turn any error of the storage backend into one :class:`StorageError`. A missing file
    stays a ``FileNotFoundError`` (callers decide what absence means), except when writing
    bytes from memory: then only the bucket can be missing (gcsfs says no more than "not
    found")."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as err:
        if missing_bucket(err) or action == "write":
            cause = describe(err) if missing_bucket(err) else f"the bucket does not exist [{err}]"
            raise StorageError(message(action, uri, cause)) from err
        raise
    except Exception as err:  # every backend raises its own types; all end here, described
        raise StorageError(message(action, uri, describe(err))) from err


def missing_bucket(err: BaseException) -> bool:
    """Whether a "not found" is the bucket's (s3fs raises FileNotFoundError for both; an Azure
    container is the bucket of az://)."""
    text = f"{err} {err.__cause__ or ''}".lower()
    return any(k in text for k in ("nosuchbucket", "bucket does not exist", "containernotfound",
                                   "container does not exist"))


def message(action: str, uri: str, cause: str) -> str:
    step = step_name()
    return f"{'step ' + repr(step) + ': ' if step else ''}cannot {action} {uri}: {cause}"


def filesystem(uri: str) -> tuple[Any, str]:
    with failures("open", uri):
        return fsspec.core.url_to_fs(uri)


# ------------------------------------------------------------------------------ JSON documents


def write_json_atomic(uri: str | Path, data: Any) -> None:
    """Replace the JSON document at ``uri`` all at once (see the module docstring)."""
    payload = json.dumps(data, indent=1, sort_keys=True).encode()
    write_bytes_atomic(str(uri), payload)


def write_bytes_atomic(uri: str, payload: bytes) -> None:
    if not is_remote(uri):
        path = local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)
        return
    fs, key = filesystem(uri)
    with failures("write", uri):
        fs.pipe_file(key, payload)  # one PUT: the object appears whole or not at all


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_bytes(uri: str) -> bytes:
    """The bytes at ``uri``; ``FileNotFoundError`` when there is nothing there."""
    if not is_remote(uri):
        return local_path(uri).read_bytes()
    fs, path = filesystem(uri)
    with failures("read", uri):
        return fs.cat_file(path)


def read_json(uri: str) -> Any | None:
    """The JSON document at ``uri``, or None when it is missing or not JSON."""
    try:
        return json.loads(read_bytes(uri))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def exists(uri: str) -> bool:
    if not is_remote(uri):
        return local_path(uri).exists()
    fs, path = filesystem(uri)
    with failures("check", uri):
        return fs.exists(path)


def remove(uri: str) -> None:
    """Delete a file or folder; nothing there is fine."""
    if not is_remote(uri):
        path = local_path(uri)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        return
    fs, key = filesystem(uri)
    with failures("delete", uri), contextlib.suppress(FileNotFoundError):
        fs.rm(key, recursive=True)


def check_access(uri: str) -> None:
    """Fail early, with the cause, when ``uri``'s store cannot be written (bad credentials,
    missing bucket, unreachable endpoint): a probe object is written and deleted."""
    if not is_remote(uri):
        return
    probe = join(uri, f".cwm-probe-{uuid.uuid4().hex[:8]}")
    fs, path = filesystem(probe)
    with failures("write", uri):
        fs.pipe_file(path, b"")
        fs.rm_file(path)


# ------------------------------------------------------------------------------ folders


def listing(folder: Path, files: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Files under ``folder`` (the marker excepted): relative path -> size. Sizes make the
    marker a completeness check; the bytes are checked in transit (botocore sends a checksum
    with each upload by default, ``request_checksum_calculation=when_supported``), so hashing
    them again here would only cost time on the upload path."""
    names = files if files is not None else file_names(folder)
    return {n: {"bytes": (folder / n).stat().st_size} for n in names}


def file_names(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.name != COMMIT)


def upload_tree(folder: str | Path, uri: str) -> dict[str, Any]:
    """Publish the local ``folder`` at ``uri`` and commit it (marker last); returns the marker.

    Locally (``uri`` a path) the folder is copied beside the target and renamed into place, or
    only committed when it already is the target."""
    folder = Path(folder)
    if not is_remote(uri):
        marker = new_marker(listing(folder))
        target = local_path(uri)
        if target.resolve() != folder.resolve():
            tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
            shutil.copytree(folder, tmp)
            _swap_in(tmp, target)
        write_json_atomic(target / COMMIT, marker)
        return marker
    fs, path = filesystem(uri)
    names = file_names(folder)
    remove(join(uri, COMMIT))  # from here until the new marker the folder reads as incomplete
    marker = new_marker(listing(folder, names))
    with failures("upload to", uri):
        if names:  # one call: the backend uploads the files concurrently
            fs.put([str(folder / n) for n in names], [f"{path}/{n}" for n in names])
    write_json_atomic(join(uri, COMMIT), marker)
    return marker


def new_marker(files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A commit marker; its ``commit`` id is new each time, so a reader's cached copy of an
    earlier commit with the same file sizes is never mistaken for this one."""
    return {"format": COMMIT_FORMAT, "commit": uuid.uuid4().hex, "files": files}


def _swap_in(new: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    old = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.old"
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def committed(uri: str) -> dict[str, Any] | None:
    """The commit marker of the folder at ``uri``, or None when it is absent (never written,
    or a writer is or was interrupted)."""
    marker = read_json(join(uri, COMMIT))
    if not isinstance(marker, dict) or marker.get("format") != COMMIT_FORMAT:
        return None
    return marker


def require_committed(uri: str) -> dict[str, Any]:
    marker = committed(uri)
    if marker is None:
        raise StorageError(message("read", uri, f"no {COMMIT}: the folder is missing or its "
                                   "writer did not finish (rerun the step that writes it)"))
    return marker


def download_tree(uri: str, folder: str | Path) -> Path:
    """Fetch the committed folder at ``uri`` into ``folder`` (replaced), checking each file's
    size against the marker."""
    marker = require_committed(uri)
    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True)
    try:
        fs, path = filesystem(uri)
        names = sorted(marker["files"])
        for name in names:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        with failures("download", uri):
            if names:  # one call: the backend downloads the files concurrently
                fs.get([f"{path}/{n}" for n in names], [str(tmp / n) for n in names])
        for name in names:
            if (tmp / name).stat().st_size != marker["files"][name]["bytes"]:
                raise StorageError(message("download", join(uri, name),
                                           "size differs from its commit marker"))
        (tmp / COMMIT).write_text(json.dumps(marker, indent=1, sort_keys=True))
        _swap_in(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def cache_root() -> Path:
    if os.environ.get("CWM_CACHE"):
        return Path(os.environ["CWM_CACHE"])
    return Path.home() / ".cache" / "cwm"


def staging_dir(uri: str, what: str) -> Path:
    """A local folder standing in for ``uri``: the path itself when local, else a folder in the
    cache named by the URI (the same for every process on a node)."""
    if not is_remote(uri):
        return local_path(uri)
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return cache_root() / "staging" / f"{what}-{digest}"


def local_copy(uri: str) -> Path:
    """A local folder holding the committed folder at ``uri`` (for libraries that read only
    local files): the path itself when local, else a cached download, refreshed when the
    remote marker differs."""
    if not is_remote(uri):
        return local_path(uri)
    marker = require_committed(uri)
    folder = staging_dir(uri, "input")
    if read_json(str(folder / COMMIT)) == marker:
        return folder
    return download_tree(uri, folder)


def tree_digest(uri: str) -> str | None:
    """Content hash of a file or folder (names and contents; for an object store the names,
    sizes and the store's checksums); None when nothing is there."""
    if not is_remote(uri):
        return _local_digest(local_path(uri))
    fs, path = filesystem(uri)
    with failures("list", uri):
        found = fs.find(path, detail=True, withdirs=False)
    if not found:
        return None
    digest = hashlib.sha256()
    for name in sorted(found):
        info = found[name]
        tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("mtime")
        digest.update(f"{name[len(path):]}\0{info.get('size')}\0{tag}\n".encode())
    return digest.hexdigest()


def _local_digest(root: Path) -> str | None:
    if not root.exists():
        return None
    digest = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(root) if file != root else "").encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(_BLOCK), b""):
                digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------ credentials


def credential_names(environ: Mapping[str, str]) -> set[str]:
    """The names in ``environ`` that carry storage credentials or endpoints."""
    extra = {n.strip() for n in environ.get(CREDENTIAL_NAMES_VAR, "").split(",") if n.strip()}
    return {k for k in environ if k.startswith(CREDENTIAL_PREFIXES) or k in extra} | extra


def scrub_env(env: Mapping[str, str], parent: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` without storage credentials: no variable named like one, and no variable whose
    value is one of the ``parent`` environment's credential values (under another name)."""
    parent = os.environ if parent is None else parent
    names = credential_names(env) | credential_names(parent)
    secrets = {parent[n] for n in credential_names(parent) if n in parent and len(parent[n]) >= 8}
    return {k: v for k, v in env.items()
            if k not in names and k != CREDENTIAL_NAMES_VAR and v not in secrets}


def sandbox_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment for an untrusted program, built by the sandbox from ``env``: storage
    credentials removed (:func:`scrub_env`), and, when this process holds any, this process made
    non-dumpable, so a same-user program it starts cannot read them from ``/proc/<pid>/environ``
    or ``/proc/<pid>/mem``, nor ptrace it (those files then belong to root; this protects
    wherever steps run as non-root, as pods do). bubblewrap's PID namespace hides every other
    process as well; without it, other same-user processes holding credentials (a launcher, the
    runner) stay visible: see README's storage section."""
    if credential_names(os.environ):
        _set_non_dumpable()
    return scrub_env(env)


def _set_non_dumpable() -> None:
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
