"""gs:// (gcsfs, extra ``[gcs]``) and az:// (adlfs, extra ``[azure]``) through cwm_spec.storage,
against real servers of each API built by `make emulators` (tests/storage/emulators.py):
fake-gcs-server and Azurite. The same checks as for s3 where the server can make them: atomic
documents, committed folders (refused without their marker), a data set a real data step writes
there equal to a local one byte for byte, `cwm run` of a small pipeline keeping every artifact
there (stages chained through it), and the errors a user meets: a missing bucket
(container), an unreachable endpoint and, on Azure, a wrong account key (fake-gcs-server accepts
any caller, so gs:// bad credentials are not tested here)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cwm_spec import artifacts, storage
from cwm_spec.storage import COMMIT, StorageError
from tests.e2e.small import cwm, small_data, small_pipeline
from tests.storage.conftest import clear_clients
from tests.storage.emulators import free_port


def make_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "model.safetensors").write_bytes(os.urandom(300_000))
    (root / "sub").mkdir()
    (root / "sub" / "config.json").write_text('{"n": 1}')
    return root


def test_documents_and_committed_folders_round_trip(store, tmp_path):
    uri = f"{store}/roundtrip"
    storage.check_access(uri)
    storage.write_json_atomic(f"{uri}/eval.json", {"loss": 1.5})
    assert storage.read_json(f"{uri}/eval.json") == {"loss": 1.5}
    assert storage.read_json(f"{uri}/absent.json") is None and storage.exists(f"{uri}/eval.json")
    folder = make_folder(tmp_path / "ckpt")
    marker = storage.upload_tree(folder, f"{uri}/ckpt")
    assert set(marker["files"]) == {"model.safetensors", "sub/config.json"}
    digest = storage.tree_digest(f"{uri}/ckpt")
    copy = storage.local_copy(f"{uri}/ckpt")
    assert all((copy / n).read_bytes() == (folder / n).read_bytes() for n in marker["files"])
    (folder / "model.safetensors").write_bytes(os.urandom(300_000))  # same size, new bytes
    storage.upload_tree(folder, f"{uri}/ckpt")
    assert storage.tree_digest(f"{uri}/ckpt") != digest
    assert (storage.local_copy(f"{uri}/ckpt") / "model.safetensors").read_bytes() == \
        (folder / "model.safetensors").read_bytes()
    storage.remove(f"{uri}/ckpt/{COMMIT}")  # as a writer killed mid-upload leaves it
    with pytest.raises(StorageError, match=rf"{uri}/ckpt: no {COMMIT}"):
        storage.local_copy(f"{uri}/ckpt")
    storage.remove(uri)
    assert not storage.exists(f"{uri}/eval.json")


def test_a_data_step_writes_there_the_data_set_it_writes_locally(store, tmp_path):
    """The traces step (a subprocess, the store's environment inherited) into the bucket and
    into a folder: the same manifest, byte for byte, and every shard checks out."""
    remote = f"{store}/traces-{os.urandom(4).hex()}"
    for output in (remote, str(tmp_path / "local")):
        done = subprocess.run([sys.executable, "-m", "cwm_beam.traces", "--source",
                               "synthetic:30", "--shards", "2", "--output", output],
                              capture_output=True, text=True, timeout=600, env=os.environ)
        assert done.returncode == 0, done.stderr[-4000:]
    local = (tmp_path / "local" / artifacts.MANIFEST).read_bytes()
    assert storage.read_bytes(f"{remote}/{artifacts.MANIFEST}") == local
    manifest = artifacts.verify(remote)
    assert manifest.records("train") == sum(
        shard["records"] for shard in json.loads(local)["splits"]["train"]) > 0


def break_store(scheme: str, case: str, monkeypatch) -> str:
    """Point this process's client at a broken store; returns the URI to try."""
    uri = f"{scheme}://cwm/errors"
    if case == "missing":
        uri = f"{scheme}://no-such-bucket/errors"
    elif case == "unreachable" and scheme == "gs":
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")
    elif case == "unreachable":
        conn = os.environ["AZURE_STORAGE_CONNECTION_STRING"]
        endpoint = conn.split("BlobEndpoint=")[1].split("/")[2]
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", conn.replace(
            endpoint, f"127.0.0.1:{free_port()}"))
    elif case == "credentials":
        conn = os.environ["AZURE_STORAGE_CONNECTION_STRING"]
        key = conn.split("AccountKey=")[1].split(";")[0]
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING",
                           conn.replace(key, "d3Jvbmc" + key[7:]))
    clear_clients()
    return uri


ERRORS = [
    pytest.param("gs", "missing", "bucket does not exist", marks=pytest.mark.gcs),
    pytest.param("gs", "unreachable", "endpoint is unreachable", marks=pytest.mark.gcs),
    pytest.param("az", "missing", "bucket does not exist", marks=pytest.mark.azure),
    pytest.param("az", "unreachable", "endpoint is unreachable", marks=pytest.mark.azure),
    pytest.param("az", "credentials", "access denied", marks=pytest.mark.azure),
]


@pytest.mark.parametrize("store,case,cause", ERRORS, indirect=["store"])
def test_errors_name_the_uri_and_the_cause(store, case, cause, monkeypatch):
    """Before anything is written (the runner's probe, :func:`storage.check_access`): one
    StorageError naming the URI and the cause."""
    uri = break_store(store.split("://")[0], case, monkeypatch)
    with pytest.raises(StorageError) as failed:
        storage.check_access(uri)
    assert f"cannot write {uri}" in str(failed.value) and cause in str(failed.value)


PIPELINE = small_pipeline(
    "stores", data=small_data(20, max_turns=6),
    stages=[{"name": name, "steps": 2, "microBatchSize": 2, "sequenceLength": 64,
             "warmupSteps": 1, "checkpointEvery": 1} for name in ("pretrain", "midtrain")],
    evaluation={"heldOutTraces": 2, "cruxeval": False, "mutateFix": False, "maxNewTokens": 4})


@pytest.mark.slow
def test_cwm_run_keeps_every_artifact_in_the_store(store, tmp_path):
    """`cwm run` with ``storage.uri`` on the store: every step succeeds, nothing is kept under
    the work directory's artifacts, midtrain starts from pretrain's committed checkpoint there."""
    doc = copy.deepcopy(PIPELINE)
    doc["spec"]["storage"] = {"uri": f"{store}/run-{os.urandom(4).hex()}"}
    spec = tmp_path / "pipeline.yaml"
    spec.write_text(yaml.safe_dump(doc))
    workdir = tmp_path / "work"
    result = cwm("run", str(spec), "--workdir", str(workdir), "--plain", env=dict(os.environ),
                 timeout=1500)
    assert result.returncode == 0, result.stderr[-6000:]
    assert not (workdir / "artifacts").exists()
    base = f"{doc['spec']['storage']['uri']}/stores"
    for step in ("traces", "trajectories", "corpus", "tokenizer", "pretrain", "midtrain"):
        state = json.loads((workdir / "steps" / step / "state.json").read_text())
        assert state["state"] == "Succeeded", state
    midtrain = json.loads((workdir / "steps" / "midtrain" / "state.json").read_text())
    assert set(midtrain["inputs"]) >= {"init", "tokenizer"}
    for folder in ("tokenizer/tokenizer", "pretrain/checkpoint", "midtrain/checkpoint"):
        assert storage.committed(f"{base}/{folder}") is not None, folder
    artifacts.verify(f"{base}/trajectories/dataset")
