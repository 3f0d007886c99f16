"""`cwm run` with ``spec.storage.uri: s3://cwm/run`` against the real S3 server: every step
reads its inputs from and writes its outputs to the bucket (nothing under the work directory's
artifacts), the stages chain through it (midtrain starts from pretrain's checkpoint in the
bucket), and the data sets' manifests are byte-equal to those of a local-disk run of the same
spec. A run killed with -9 mid-stage resumes from the bucket. Then the errors a user meets
before anything is written: bad credentials, a missing bucket, an unreachable endpoint, each
naming the step, the URI and the cause."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.e2e.small import CWM, small_data, small_pipeline
from tests.e2e.small import cwm as run_cwm

pytestmark = [pytest.mark.slow, pytest.mark.s3]

STAGE = {"microBatchSize": 2, "sequenceLength": 64, "warmupSteps": 1, "checkpointEvery": 1,
         "learningRate": 1e-3}
MANIFEST = small_pipeline(
    "s3e2e", data=small_data(30, trace_shards=2, max_turns=6),
    stages=[{"name": name, "steps": 2, **STAGE} for name in ("pretrain", "midtrain", "sft")],
    evaluation={"heldOutTraces": 2, "cruxeval": False, "mutateFix": False, "maxNewTokens": 4})
DATA = ("traces", "trajectories", "corpus")
BASE = "s3://cwm/run/s3e2e"


def cwm(*args: str, env: dict[str, str], timeout: float = 1500) -> subprocess.CompletedProcess:
    return run_cwm(*args, env=env, timeout=timeout)


def write_spec(path: Path, storage: dict | None) -> Path:
    doc = copy.deepcopy(MANIFEST)
    if storage:
        doc["spec"]["storage"] = storage
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def s3_run(s3_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("s3run")
    spec = write_spec(root / "pipeline.yaml", {"uri": "s3://cwm/run"})
    workdir = root / "work"
    result = cwm("run", str(spec), "--workdir", str(workdir), "--plain", env=s3_server.env())
    assert result.returncode == 0, result.stderr[-6000:]
    return workdir


def test_every_step_reads_and_writes_the_bucket(s3_run, bucket_fs):
    base = BASE
    assert not (s3_run / "artifacts").exists()  # nothing local but the runner's own records
    for step in ("traces", "trajectories", "corpus", "tokenizer", "pretrain", "midtrain", "sft"):
        state = json.loads((s3_run / "steps" / step / "state.json").read_text())
        assert state["state"] == "Succeeded", state
        assert all(v is not None for v in state["outputs"].values()), state
    for name in DATA:
        assert bucket_fs.exists(f"cwm/run/s3e2e/{name}/dataset/manifest.json")
    for committed in ("tokenizer/tokenizer", "pretrain/checkpoint", "midtrain/checkpoint",
                      "sft/checkpoint"):
        assert bucket_fs.exists(f"cwm/run/s3e2e/{committed}/_COMMITTED.json"), committed
    midtrain = json.loads((s3_run / "steps" / "midtrain" / "state.json").read_text())
    assert set(midtrain["inputs"]) >= {"init", "tokenizer", "traces", "corpus"}
    plan = json.loads(subprocess.run(
        [*CWM, "plan", str(s3_run.parent / "pipeline.yaml"), "--target", "local", "--json",
         "--workdir", str(s3_run)], capture_output=True, text=True, check=True).stdout)
    inputs = {s["name"]: s["inputs"] for s in plan["steps"]}
    assert inputs["midtrain"]["init"] == f"{base}/pretrain/checkpoint"
    assert all(v.startswith(base) for step in ("pretrain", "midtrain", "sft")
               for v in inputs[step].values())
    evaluation = json.loads(bucket_fs.cat_file("cwm/run/s3e2e/midtrain/metrics/eval.json"))
    assert midtrain["metrics"] == pytest.approx(evaluation)  # the runner read it from the bucket


def test_data_sets_equal_a_local_disk_run(s3_run, s3_env, bucket_fs, tmp_path):
    """Byte for byte: the same manifests (each shard's name, records, bytes and digest, and the
    stats), so the same records; a data step's output does not depend on where it is kept."""
    spec = write_spec(tmp_path / "pipeline.yaml", None)
    doc = yaml.safe_load(spec.read_text())
    doc["spec"]["stages"] = doc["spec"]["stages"][:1]  # the data steps are what is compared
    spec.write_text(yaml.safe_dump(doc))
    result = cwm("run", str(spec), "--workdir", str(tmp_path / "work"), "--plain", env={})
    assert result.returncode == 0, result.stderr[-6000:]
    for name in DATA:
        local = tmp_path / "work" / "artifacts" / name / "dataset" / "manifest.json"
        remote = bucket_fs.cat_file(f"cwm/run/s3e2e/{name}/dataset/manifest.json")
        assert sum(s["records"] for s in json.loads(local.read_bytes())["splits"]["train"]) > 0
        assert remote == local.read_bytes(), name


@pytest.mark.parametrize("case,cause", [
    ("bad-credentials", "access denied"),
    ("missing-bucket", "bucket does not exist"),
    ("unreachable", "endpoint is unreachable"),
])
def test_cwm_run_stops_with_one_clear_error(s3_server, bucket_fs, tmp_path, case, cause):
    env, uri = s3_server.env(), "s3://cwm/errors"
    if case == "bad-credentials":
        env["AWS_SECRET_ACCESS_KEY"] = "wrong" + env["AWS_SECRET_ACCESS_KEY"][5:]
    elif case == "missing-bucket":
        uri = "s3://no-such-bucket/errors"
    else:
        env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # discard port: nothing listens
    spec = write_spec(tmp_path / "pipeline.yaml", {"uri": uri})
    result = cwm("run", str(spec), "--workdir", str(tmp_path / "work"), "--plain", env=env,
                 timeout=300)
    assert result.returncode == 1
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, result.stderr[-3000:]
    assert "step 'traces'" in error[0] and f"{uri}/s3e2e" in error[0] and cause in error[0]
    assert not bucket_fs.find("cwm/errors", refresh=True)  # nothing half-written


def test_run_killed_mid_stage_resumes_from_the_bucket(s3_run, s3_server, bucket_fs):
    """kill -9 `cwm run` (its step dies with it) while SFT trains and uploads its state: what
    the bucket holds stays consistent (``latest.json`` names a committed state; the checkpoint
    is committed or has no marker), and the same command then finishes, resuming SFT. The
    earlier 4-step SFT's state in the bucket is not this 6-step SFT's (another fingerprint): the
    killed run deleted it and started at step 0; the rerun resumes the killed run's own state."""
    spec = s3_run.parent / "pipeline.yaml"
    doc = yaml.safe_load(spec.read_text())
    doc["spec"]["stages"][2]["steps"] = 6  # SFT changes: only SFT runs again
    spec.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "OMP_NUM_THREADS": "1", **s3_server.env()}
    output = open(s3_run.parent / "killed-run.txt", "wb")
    runner = subprocess.Popen([*CWM, "run", str(spec), "--workdir", str(s3_run), "--plain"],
                              env=env, stdout=output, stderr=subprocess.STDOUT)
    latest = "cwm/run/s3e2e/sft/state/latest.json"
    earlier = json.loads(bucket_fs.cat_file(latest))["fingerprint"]
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and runner.poll() is None:
        try:
            state = json.loads(bucket_fs.cat_file(latest))  # one PUT: never half a document
        except FileNotFoundError:  # deleted: the earlier SFT's, not this one's
            state = {}
        if state.get("fingerprint") not in (None, earlier) and state["step"] >= 2:
            break
        time.sleep(0.2)
    runner.kill()
    runner.wait()
    output.close()
    assert runner.returncode == -9, (s3_run.parent / "killed-run.txt").read_text()[-4000:]
    tag = json.loads(bucket_fs.cat_file(latest))["tag"]
    assert bucket_fs.exists(f"cwm/run/s3e2e/sft/state/{tag}/_COMMITTED.json")
    result = cwm("run", str(spec), "--workdir", str(s3_run), "--plain", env=s3_server.env())
    assert result.returncode == 0, result.stderr[-4000:]
    states = {n: json.loads((s3_run / "steps" / n / "state.json").read_text())
              for n in ("pretrain", "midtrain", "sft")}
    assert states["sft"]["state"] == "Succeeded" and states["midtrain"]["state"] == "Cached"
    metrics = bucket_fs.cat_file("cwm/run/s3e2e/sft/metrics/metrics.jsonl").decode()
    steps = [json.loads(line)["step"] for line in metrics.splitlines() if line.strip()]
    assert steps == list(range(1, 7))  # the earlier SFT's lines gone, none logged twice
    log = (s3_run / "steps" / "sft" / "log.txt").read_text()
    assert "saved by another configuration" in log and "resuming at step" in log, log[-4000:]
    assert json.loads(bucket_fs.cat_file(latest))["step"] == 6
    assert bucket_fs.exists("cwm/run/s3e2e/sft/checkpoint/_COMMITTED.json")
