"""cwm_spec.storage against a real S3 server (SeaweedFS): atomic documents, committed folders, a
writer killed with -9 mid-upload, the errors a user meets (bad credentials, missing bucket,
unreachable endpoint), and credentials kept from sandboxed programs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import s3fs

from cwm_exec.sandbox import Limits, isolation, run_command
from cwm_spec import artifacts, storage
from cwm_spec.storage import COMMIT, StorageError

pytestmark = pytest.mark.s3
BUCKET = "s3://cwm"


def make_folder(root: Path, files: int, size: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (root / f"part-{i:03d}.bin").write_bytes(os.urandom(size))
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "config.json").write_text('{"n": 1}')
    return root


def test_local_json_is_replaced_whole_with_no_temporary_left(tmp_path):
    target = tmp_path / "a" / "state.json"
    storage.write_json_atomic(target, {"x": 1})
    storage.write_json_atomic(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": 2}
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]


def test_documents_and_folders_round_trip_through_the_bucket(s3_env, tmp_path, bucket_fs):
    uri = f"{BUCKET}/roundtrip"
    storage.write_json_atomic(f"{uri}/eval.json", {"loss": 1.5})
    assert storage.read_json(f"{uri}/eval.json") == {"loss": 1.5}
    assert storage.read_json(f"{uri}/absent.json") is None
    folder = make_folder(tmp_path / "ckpt", files=3, size=1000)
    marker = storage.upload_tree(folder, f"{uri}/ckpt")
    assert set(marker["files"]) == {"part-000.bin", "part-001.bin", "part-002.bin",
                                    "sub/config.json"}
    before = storage.tree_digest(f"{uri}/ckpt")
    copy = storage.local_copy(f"{uri}/ckpt")
    for name in marker["files"]:
        assert (copy / name).read_bytes() == (folder / name).read_bytes()
    changed = os.urandom(1000)  # same size: only the new commit id tells the copies apart
    (folder / "part-000.bin").write_bytes(changed)
    storage.upload_tree(folder, f"{uri}/ckpt")
    assert storage.tree_digest(f"{uri}/ckpt") != before
    assert (storage.local_copy(f"{uri}/ckpt") / "part-000.bin").read_bytes() == changed
    assert bucket_fs.exists(f"cwm/roundtrip/ckpt/{COMMIT}")


def test_a_folder_without_its_marker_is_refused(s3_env, bucket_fs, tmp_path):
    uri = f"{BUCKET}/uncommitted"
    bucket_fs.pipe_file("cwm/uncommitted/model.safetensors", b"half")
    assert storage.committed(uri) is None
    with pytest.raises(StorageError, match=rf"{uri}: no {COMMIT}"):
        storage.local_copy(uri)


UPLOADER = """
import sys
from cwm_spec import storage
storage.upload_tree(sys.argv[1], sys.argv[2])
"""


def test_upload_killed_mid_way_leaves_nothing_readable_and_a_rerun_completes(
        s3_env, bucket_fs, tmp_path):
    """kill -9 once some files are in the bucket: no commit marker, readers refuse the folder;
    the same upload run again commits it whole."""
    uri = f"{BUCKET}/killed/checkpoint"
    folder = make_folder(tmp_path / "big", files=24, size=4 << 20)
    storage.upload_tree(make_folder(tmp_path / "old", 1, 10), uri)  # an earlier attempt's commit
    proc = subprocess.Popen([sys.executable, "-c", UPLOADER, str(folder), uri])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if any("part-0" in p and "part-000" not in p for p in bucket_fs.find("cwm/killed",
                                                                            refresh=True)):
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the upload finished before it could be killed"
    uploaded = bucket_fs.find("cwm/killed/checkpoint", refresh=True)
    assert any("part-0" in p for p in uploaded)  # killed mid-way: some files are there
    assert storage.committed(uri) is None  # the old marker went first, the new one never came
    with pytest.raises(StorageError, match="did not finish"):
        storage.download_tree(uri, tmp_path / "reader")
    subprocess.run([sys.executable, "-c", UPLOADER, str(folder), uri], check=True, timeout=300)
    copy = storage.download_tree(uri, tmp_path / "reader")
    assert storage.listing(copy) == storage.listing(folder)
    assert all((copy / n).read_bytes() == (folder / n).read_bytes() for n in storage.listing(folder))


def test_a_data_set_without_its_manifest_is_refused(s3_env):
    uri = f"{BUCKET}/dataset-killed"
    artifacts.write_shard(uri, "train-00000-of-00001.jsonl", [{"text": "x"}])
    with pytest.raises(artifacts.ArtifactError, match="no manifest"):
        artifacts.read_manifest(uri)


@pytest.mark.parametrize("case,cause", [
    ("bad-credentials", "access denied"),
    ("missing-bucket", "bucket does not exist"),
    ("unreachable", "endpoint is unreachable"),
])
def test_storage_errors_name_the_uri_and_the_cause(s3_env, monkeypatch, case, cause):
    uri = f"{BUCKET}/errors"
    if case == "bad-credentials":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-" + "x" * 20)
    elif case == "missing-bucket":
        uri = "s3://no-such-bucket/errors"
    else:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    s3fs.S3FileSystem.clear_instance_cache()  # a client made with the good settings
    with pytest.raises(StorageError) as err:
        storage.check_access(uri)
    assert uri in str(err.value) and cause in str(err.value)


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROBE = """
import os, sys
names = [k for k in os.environ if k.startswith("AWS_")]
leaked = [k for k, v in os.environ.items() if v == sys.argv[1]]
try:
    seen = sys.argv[1].encode() in open(f"/proc/{sys.argv[2]}/environ", "rb").read()
except OSError:
    seen = False
print(names, leaked, seen)
"""


def test_sandboxed_programs_never_see_storage_credentials(s3_env, tmp_path):
    """Not in their environment (by name, or copied under another name), and not through
    /proc/<pid>/environ of the step that started them: bubblewrap's PID namespace hides it;
    without bubblewrap the step makes itself non-dumpable, which hides it from non-root users."""
    secret = s3_env["AWS_SECRET_ACCESS_KEY"]
    result = run_command([sys.executable, "-c", PROBE, secret, str(os.getpid())], cwd=tmp_path,
                         limits=Limits(wall_seconds=30, cpu_seconds=30),
                         env={"PATH": os.environ["PATH"], "COPY": secret,
                              "AWS_SECRET_ACCESS_KEY": secret})
    names, leaked, seen = result.stdout.decode().split()
    assert (names, leaked) == ("[]", "[]"), result
    if isolation() == "bwrap" or os.geteuid() != 0:
        assert seen == "False", result
    assert _dumpable() == 0  # this process holds credentials and has started a sandboxed one


def _dumpable() -> int:
    import ctypes

    return ctypes.CDLL("libc.so.6").prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
