"""The traces step on a dask.distributed cluster (a scheduler and two workers, each its own
process, started here) through cwm_beam.dask.DaskRunner writes the same data set, byte for byte,
as Beam's in-process runner: train, validation and dead-letter shards and the manifest (whose
excluded-for-evaluation counts come from a tagged side output, the path Beam's own DaskRunner
gets wrong)."""

from __future__ import annotations

import filecmp
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cwm_beam import traces

pytestmark = pytest.mark.slow  # a Dask cluster and two runs of the traces step: ~1-2 min

BAD_PROGRAMS = [  # dead letters, each from another stage: read, set-up, trace limits
    "this line is not JSON",
    json.dumps({"id": "no-code", "input": "1"}),
    json.dumps({"id": "syntax", "code": "def f(x):\n    return x +", "input": "1"}),
    json.dumps({"id": "forever", "code": "def f(x):\n    while True:\n        x += 1",
                "input": "1"}),
]


def sources(tmp_path: Path) -> list[str]:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(BAD_PROGRAMS) + "\n")
    return ["--source", "cruxeval:60", "--cruxeval-held-out", "400", "--source", "synthetic:60",
            "--source", f"jsonl:{bad}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dask_cluster():
    """``dask scheduler`` and ``dask worker --nworkers 2`` (two worker processes); the address."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler",
                                  "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker",
                                f"tcp://{address}", "--nworkers", "2", "--nthreads", "1",
                                "--no-dashboard"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from distributed import Client  # the client only once the scheduler may be up
        deadline = time.monotonic() + 120
        while True:
            try:
                with Client(address, timeout=5) as client:
                    client.wait_for_workers(2, timeout=60)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield address
    finally:
        for proc in (workers, scheduler):
            proc.terminate()
            proc.wait(timeout=60)


def test_dask_runner_writes_the_same_dataset(tmp_path, dask_cluster):
    given = sources(tmp_path)
    traces.run([*given, "--output", str(tmp_path / "local")])
    traces.run([*given, "--output", str(tmp_path / "dask"),
                "--runner", "cwm_beam.dask.DaskRunner", f"--dask_client_address={dask_cluster}"])
    names = sorted(p.name for p in (tmp_path / "local").iterdir() if p.is_file())
    assert names == sorted(p.name for p in (tmp_path / "dask").iterdir() if p.is_file())
    for name in names:
        assert filecmp.cmp(tmp_path / "local" / name, tmp_path / "dask" / name, shallow=False), name
    manifest = json.loads((tmp_path / "dask" / "manifest.json").read_text())
    stats = manifest["stats"]
    assert stats["excluded_for_evaluation"] == {"cruxeval": 400}, stats
    assert stats["deadletter_records"] == len(BAD_PROGRAMS), stats
