import json
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from cwm_beam import traces
from cwm_beam.sources import cruxeval_records
from cwm_exec.sandbox import Limits
from cwm_spec import artifacts

from .hostile import HOSTILE, hostile_input


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_trace_dataset_transform(tmp_path):
    fns = write_jsonl(tmp_path / "fns.jsonl", [
        {"id": "a", "code": "def f(x):\n    return x + 1", "input": "1"},
        {"id": "a-again", "code": "def f(x):\n    return x + 1", "input": "1"},   # duplicate
        {"id": "boom", "code": "def f(x):\n    return 1 // x", "input": "0"},
        {"id": "loop", "code": "def f(x):\n    while True:\n        x += 1", "input": "0"},
        "{broken",
    ])
    settings = traces.Settings.from_spec(
        {"sources": [{"kind": "jsonl", "uri": fns}, {"kind": "synthetic", "count": 5}],
         "validationFraction": 0.0}, Limits())
    with BeamTestPipeline(runner=FnApiRunner()) as p:
        out = p | beam.Create(list(settings.sources)) | traces.TraceDataset(settings)
        assert_that(out["train"] | "Ids" >> beam.Map(lambda r: r["id"]), equal_to(
            ["jsonl/a", "jsonl/boom"] + [f"synthetic/0-{i}" for i in range(5)]), label="Train")
        assert_that(out["validation"], equal_to([]), label="Validation")
        assert_that(out["deadletter"] | "Reasons" >> beam.Map(lambda d: (d["stage"], d["reason"])),
                    equal_to([("read", "line is not JSON"),
                              ("limits", "trace limit: max_events (10000)")]), label="Dead")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """One end-to-end run: all of CRUXEval, the hostile programs and fuzzed functions."""
    root = tmp_path_factory.mktemp("traces")
    host = root / "host"
    host.mkdir()
    (host / "secret.txt").write_text("s3cret")
    hostile = write_jsonl(root / "hostile.jsonl", [
        {"id": name, "code": code, "input": hostile_input(name, str(host))}
        for name, code in HOSTILE.items()])
    functions = write_jsonl(root / "functions.jsonl", [
        {"id": "vowels", "code": "def count(text):\n    n = 0\n    for ch in text:\n"
                                 "        if ch in 'aeiou':\n            n += 1\n    return n"},
        {"id": "first", "code": "def first(xs):\n    return xs[0]"}])
    out = root / "out"
    # Every bundled CRUXEval function (none held out): the tracer's correctness, not training.
    stats = traces.run(["--source", "cruxeval", "--cruxeval-held-out", "0",
                        "--source", f"jsonl:{hostile}",
                        "--source", f"functions:{functions}", "--output", str(out),
                        "--wall-seconds", "3"])
    return out, host, stats


@pytest.mark.slow
def test_every_cruxeval_function_traced_to_its_output(dataset):
    out, _, _ = dataset
    artifacts.verify(str(out))
    records = {r["id"]: r for split in ("train", "validation")
               for r in artifacts.iter_records(str(out), split)}
    for expected in cruxeval_records():
        record = records[f"cruxeval/{expected['id']}"]
        assert eval(record["return"]) == eval(expected["output"]), expected["id"]
        assert record["frames"][-1]["value"] == record["return"]


@pytest.mark.slow
def test_hostile_programs_are_dead_letters_with_reasons(dataset):
    out, host, stats = dataset
    dead = {d["id"]: d for d in artifacts.iter_records(str(out), "deadletter")}
    for name in HOSTILE:
        assert dead[f"jsonl/{name}"]["reason"], name
    assert not (host / "pwned.txt").exists()
    assert stats["deadletter_records"] == len(HOSTILE)


@pytest.mark.slow
def test_fuzzed_functions_get_inputs(dataset):
    out, _, _ = dataset
    fuzzed = [r for split in ("train", "validation") for r in artifacts.iter_records(str(out), split)
              if r["source"] == "functions"]
    assert {r["id"].split("#")[0] for r in fuzzed} == {"functions/vowels", "functions/first"}
    assert all(r["input"] for r in fuzzed) and len(fuzzed) <= 6


@pytest.mark.slow
def test_local_workers_are_part_processes_and_nest_inside_indexed_job_pods(tmp_path, monkeypatch):
    """--workers 2: two processes, each tracing its part; inside pods of an Indexed Job, pod i's
    process j is part 2i+j of 4. Either way the data set holds exactly an unsplit run's records."""
    flags = ["--source", "synthetic:40", "--shards", "2", "--validation-fraction", "0.2"]
    whole = tmp_path / "whole"
    traces.run([*flags, "--output", str(whole)])
    local = tmp_path / "local"
    stats = traces.run([*flags, "--output", str(local), "--workers", "2"])
    pods = tmp_path / "pods"
    monkeypatch.setenv("CWM_PARTS", "2")
    for index in ("0", "1"):
        monkeypatch.setenv("JOB_COMPLETION_INDEX", index)
        traces.run([*flags, "--output", str(pods), "--workers", "2"])
    monkeypatch.delenv("CWM_PARTS")

    def texts(root, split_name):
        return sorted(r["text"] for r in artifacts.iter_records(str(root), split_name))

    assert artifacts.verify(str(local)).stats["parts"] == 2
    assert artifacts.verify(str(pods)).stats["parts"] == 4
    for name in ("train", "validation"):
        assert texts(local, name) == texts(whole, name) == texts(pods, name)
    assert stats["train_records"] + stats["validation_records"] == 40
    assert stats["traces_per_second"] > 0


def test_a_failing_part_process_fails_the_step_and_merges_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="exited with code"):
        traces.run(["--source", f"jsonl:{tmp_path / 'missing.jsonl'}", "--output", str(out),
                    "--workers", "2"])
    assert not (out / "manifest.json").exists()


def test_a_step_split_over_indexed_job_pods_equals_one_run(tmp_path, monkeypatch):
    """Each pod of an Indexed Job (JOB_COMPLETION_INDEX, CWM_PARTS) traces its part; the last one
    merges the manifests, and the data set holds exactly the records of an unsplit run."""
    fns = write_jsonl(tmp_path / "fns.jsonl", ["{broken"] + [
        {"id": str(i), "code": f"def f(x):\n    return x * {i}", "input": str(i)}
        for i in range(12)])
    flags = ["--source", "synthetic:30", "--source", f"jsonl:{fns}", "--shards", "2",
             "--validation-fraction", "0.2"]
    whole = tmp_path / "whole"
    traces.run([*flags, "--output", str(whole)])
    split = tmp_path / "split"
    monkeypatch.setenv("CWM_PARTS", "2")
    for index in ("1", "0"):
        assert not (split / "manifest.json").exists()  # incomplete until both parts are done
        monkeypatch.setenv("JOB_COMPLETION_INDEX", index)
        traces.run([*flags, "--output", str(split)])
    merged = artifacts.verify(str(split))
    assert merged.stats["parts"] == 2 and len(merged.splits["train"]) == 4

    def texts(root, split_name):
        return sorted(r["text"] for r in artifacts.iter_records(str(root), split_name))

    for name in ("train", "validation"):
        assert texts(split, name) == texts(whole, name)
    parts = [artifacts.read_manifest(artifacts.part_dir(str(split), i)).records("train")
             for i in range(2)]
    assert all(parts), parts  # both pods did real work
    # the source's dead letter once, not once per pod
    assert [d["reason"] for d in artifacts.iter_records(str(split), "deadletter")] == \
        [d["reason"] for d in artifacts.iter_records(str(whole), "deadletter")]
    assert merged.stats["train_records"] == artifacts.read_manifest(str(whole)).stats["train_records"]
