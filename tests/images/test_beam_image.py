"""The cwm-beam image, run as its pods run (tests/images/podrun.py): the traces step on CRUXEval
programs and the trajectories step on a fixture repository, with the commands and
$CWM_STEP_CONFIG the operator gives them, writing to a volume at /data; no network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cwm_beam.sources import cruxeval_records
from cwm_forager.records import check_record
from cwm_spec import artifacts
from tests.images.plans import cluster_plan, host_path, tiny_doc
from tests.images.podrun import TOKEN_DIR, PodRunner, bind

pytestmark = [pytest.mark.images, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CRUXEVAL_PROGRAMS = 200
POD_UID = 65532


def data_volume(tmp_path: Path) -> Path:
    """A host folder the pod's user may write: the PVC mounted at /data."""
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, POD_UID, POD_UID)
    return data


def test_the_pod_user_and_file_system(images: dict[str, str], pod: PodRunner) -> None:
    """uid/gid 65532, no token, the root file system read-only and /tmp writable."""
    script = (f"import os, tempfile; print(os.getuid(), os.getgid(), os.path.exists('{TOKEN_DIR}')); "
              "tempfile.NamedTemporaryFile(dir='/tmp'); open('/opt/venv/x', 'w')")
    result = pod.run(images["cwm-beam"], ["python", "-c", script], timeout=60)
    # (stdout and stderr are two streams: the traceback may come first in the logs)
    assert "65532 65532 False" in result.logs.splitlines(), result.logs
    assert result.exit_code == 1 and "Read-only file system: '/opt/venv/x'" in result.logs


def test_the_traces_step_traces_cruxeval_programs(images: dict[str, str], pod: PodRunner,
                                                  tmp_path: Path) -> None:
    doc = tiny_doc("beam-traces")
    doc["spec"]["data"]["traces"] = {"sources": [{"kind": "cruxeval", "count": CRUXEVAL_PROGRAMS}],
                                     "fuzzInputsPerFunction": 0, "shards": 2}
    step = cluster_plan(doc).step("traces")
    assert step.image == images["cwm-beam"]
    assert step.command[:3] == ("python", "-m", "cwm_beam.traces")
    data = data_volume(tmp_path)
    result = pod.run(step.image, step.command, env=step.env, mounts=[bind(str(data), "/data",
                     read_only=False)], timeout=900)
    assert result.exit_code == 0, result.logs[-4000:]
    out = str(host_path(data, step.outputs["dataset"]))
    artifacts.verify(out)
    records = {r["id"]: r for split in ("train", "validation")
               for r in artifacts.iter_records(out, split)}
    expected = {f"cruxeval/{r['id']}": r for r in cruxeval_records()}
    traced = [i for i in records if i in expected]
    assert len(traced) >= 100, f"only {len(traced)} CRUXEval programs traced"
    for rid in traced:
        assert eval(records[rid]["return"]) == eval(expected[rid]["output"]), rid
    print(f"\ntraced {len(traced)} CRUXEval programs in the beam pod in {result.seconds:.1f} s")


def test_the_trajectories_step_on_a_fixture_repository(images: dict[str, str], pod: PodRunner,
                                                       tmp_path: Path) -> None:
    doc = tiny_doc("beam-trajectories")
    doc["spec"]["data"]["trajectories"] = {
        "repositories": [{"path": "/repos/calc"}], "tasksPerRepository": 3, "heldOutTasks": 1,
        "policy": {"kind": "search", "maxTurns": 12}, "shards": 1}
    step = cluster_plan(doc).step("trajectories")
    data = data_volume(tmp_path)
    calc = REPO / "beam" / "cwm_forager" / "fixture_repos" / "calc"
    result = pod.run(step.image, step.command, env=step.env, timeout=900, mounts=[
        bind(str(data), "/data", read_only=False), bind(str(calc), "/repos/calc")])
    assert result.exit_code == 0, result.logs[-4000:]
    out = str(host_path(data, step.outputs["dataset"]))
    manifest = artifacts.verify(out)
    assert manifest.kind == "trajectories"
    records = list(artifacts.iter_records(out, "train"))
    assert records, f"no trajectories; stats {manifest.stats}"
    for record in records:
        check_record(record)
    print(f"\n{len(records)} trajectories from the calc fixture in the beam pod "
          f"in {result.seconds:.1f} s")
