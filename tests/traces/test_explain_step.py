"""Explained traces in the traces step (``data.traces.explain``): the step asks a real HTTP
server scripted with known right and wrong explanations, writes the kept ones as the
``explained`` split and the others as ``explain_rejected``, and counts every verdict in the
manifest; the endpoint is checked before tracing; the API key stays out of sandboxed programs;
the operator renders the key from the named Secret."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from cwm_beam import traces
from cwm_beam.explain import EndpointError, part_share
from cwm_operator.render import render_child
from cwm_operator.settings import Settings as OperatorSettings
from cwm_spec import artifacts, storage
from cwm_spec.plan import Target, build_plan
from cwm_spec.validation import parse_pipeline
from tests.operator.helpers import REPO
from tests.scripted_endpoint import JSONHandler, base_url, chat_reply, serving
from tests.traces.test_explain import ANSWERS, PROGRAMS

# Two more programs: the endpoint refuses one (a 400, as for a prompt past the model's context)
# and fails on the other (a 500: counted as an endpoint error once the client's retries are spent).
FAILING = {"refused": ("def f(x):\n    return x - 1", "5", 400),
           "broken": ("def f(x):\n    return -x", "5", 500)}
# Programs that look for the API key: in their own environment, and in every process's.
SNOOP_ENV = "def f(name):\n    import os\n    return name in os.environ"
SNOOP_PROC = ("def f(name):\n    import os\n    found = []\n"
              "    for pid in filter(str.isdigit, os.listdir('/proc')):\n        try:\n"
              "            with open('/proc/' + pid + '/environ', 'rb') as env:\n"
              "                if name.encode() + b'=' in env.read():\n"
              "                    found.append(pid)\n        except OSError:\n            pass\n"
              "    return found")
KEY_ENV, KEY = "CWM_TEST_EXPLAIN_KEY", "sk-test-explain-0123456789"


class Scripted(JSONHandler):
    """An OpenAI-compatible model scripted by program: :data:`ANSWERS`, the failing programs,
    ``GET /v1/models`` (the step's endpoint check); it records the key each request carried."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.keys.append(self.headers.get("Authorization"))  # type: ignore[attr-defined]
        self.send_json(200, {"object": "list", "data": [{"id": "scripted", "object": "model",
                                                      "created": 0, "owned_by": "test"}]})

    def do_POST(self) -> None:  # noqa: N802
        self.server.keys.append(self.headers.get("Authorization"))  # type: ignore[attr-defined]
        user = self.read_json()["messages"][-1]["content"]
        if self.server.fail_all:  # type: ignore[attr-defined]
            return self.send_json(self.server.fail_all,  # type: ignore[attr-defined]
                              {"error": {"message": "scripted failure", "type": "error"}})
        for code, _, status in FAILING.values():
            if code in user:
                return self.send_json(status, {"error": {"message": f"scripted {status}",
                                                     "type": "server_error"}})
        if "import os" in user:   # the snooping programs: their explanations do not matter
            return self.send_json(200, chat_reply("Output: False"))
        name = next(n for n, (code, _) in PROGRAMS.items() if code in user)
        return self.send_json(200, chat_reply(ANSWERS[name]))



@pytest.fixture()
def server():
    with serving(Scripted, keys=[], fail_all=0) as httpd:
        yield httpd


def programs_file(tmp_path, snoop: bool = False, failing: bool = True) -> str:
    rows = [{"id": name, "code": code, "input": call} for name, (code, call) in PROGRAMS.items()]
    rows += [{"id": name, "code": code, "input": call}
             for name, (code, call, _) in FAILING.items() if failing]
    if snoop:
        rows += [{"id": "snoop_env", "code": SNOOP_ENV, "input": repr(KEY_ENV)},
                 {"id": "snoop_proc", "code": SNOOP_PROC, "input": repr(KEY_ENV)}]
    path = tmp_path / "programs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def config(tmp_path, url: str, failing: bool = True, **explain) -> str:
    """A step configuration as the plan writes it: every program in train, explain on."""
    path = tmp_path / "step.json"
    path.write_text(json.dumps({
        "pipeline": "test", "step": "traces", "kind": "beam", "inputs": {},
        "spec": {"sources": [{"kind": "jsonl", "uri": programs_file(tmp_path, "snoop" in explain, failing)}],
                 "validationFraction": 0.0, "shards": 2,
                 "explain": {"endpoint": url, "model": "scripted", "concurrency": 2,
                             **{k: v for k, v in explain.items() if k != "snoop"}}},
        "sandbox": {"wallSeconds": 10}, "outputs": {"dataset": str(tmp_path / "out")}}))
    return str(path)


def url_of(server) -> str:
    return base_url(server)


def test_the_step_keeps_the_right_explanations_and_counts_every_verdict(tmp_path, server):
    stats = traces.run(["--config", config(tmp_path, url_of(server)), "--workers", "1"])
    manifest = artifacts.verify(str(tmp_path / "out"))
    assert manifest.stats["explain"] == {
        "model": "scripted", "asked": 6, "rejected": 5, "kept": 1, "wrong_output": 2,
        "no_output_line": 1, "endpoint_error": 1, "request_refused": 1, "skipped": 1}
    assert stats["explain"] == manifest.stats["explain"]
    explained = list(artifacts.iter_records(str(tmp_path / "out"), "explained"))
    assert [(r["id"], r["explanation"]) for r in explained] == [("jsonl/right",
                                                                 ANSWERS["right"])]
    assert explained[0]["messages"][1] == {"role": "assistant", "content": ANSWERS["right"]}
    assert manifest.programs["explained"] == [explained[0]["program_hash"]]
    rejected = {r["id"]: r for r in artifacts.iter_records(str(tmp_path / "out"),
                                                           "explain_rejected")}
    assert {i: r["verdict"] for i, r in rejected.items()} == {
        "jsonl/wrong": "wrong_output", "jsonl/typed": "wrong_output",
        "jsonl/silent": "no_output_line", "jsonl/raises": "skipped",
        "jsonl/refused": "request_refused", "jsonl/broken": "endpoint_error"}
    assert (rejected["jsonl/wrong"]["stated"], rejected["jsonl/wrong"]["return"]) == \
        ("'HI?'", "'HI!'")
    assert "scripted 400" in rejected["jsonl/refused"]["detail"]
    assert manifest.records("train") == 7 and manifest.stats["explained_records"] == 1


@pytest.mark.slow  # two part processes (forked)
def test_max_records_is_shared_among_the_parts(tmp_path, server):
    assert [part_share(3, i, 2) for i in range(2)] == [2, 1]
    assert [part_share(1, i, 3) for i in range(3)] == [1, 0, 0]
    out = str(tmp_path / "out")
    traces.run(["--config", config(tmp_path, url_of(server), failing=False, maxRecords=3),
                "--workers", "2"])
    asked = []
    for index, share in enumerate([2, 1]):   # each part: its share, or all it has if fewer
        part = artifacts.part_dir(out, index)
        returned = [r for r in artifacts.iter_records(part, "train") if r["exception"] is None]
        asked.append(artifacts.verify(part).stats["explain"]["asked"])
        assert asked[-1] == min(share, len(returned)), index
    explain = artifacts.verify(out).stats["explain"]
    assert explain["asked"] == sum(asked) <= 3 and explain["skipped"] == 1   # "raises"


def test_an_unreachable_endpoint_fails_the_step_before_tracing(tmp_path):
    with pytest.raises(EndpointError, match=r"explain.endpoint http://127.0.0.1:9/v1: no answer"):
        traces.run(["--config", config(tmp_path, "http://127.0.0.1:9/v1", timeoutSeconds=5),
                    "--workers", "1"])
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path / "out").glob("train-*"))   # nothing was traced


def test_a_model_the_endpoint_does_not_serve_fails_the_step(tmp_path, server):
    path = config(tmp_path, url_of(server))
    with pytest.raises(EndpointError, match=r"explain.model 'other' is not served"):
        traces.run(["--config", path, "--explain-model", "other", "--workers", "1"])


def test_no_answer_to_any_request_fails_the_step_instead_of_an_empty_split(tmp_path, server):
    server.fail_all = 500   # the endpoint went away after the check
    with pytest.raises(EndpointError, match=r"the endpoint answered none of 6 requests"):
        traces.run(["--config", config(tmp_path, url_of(server)), "--workers", "1"])
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_refused_requests_are_counted_rejections(tmp_path, server):
    """A 4xx is the endpoint's answer for that trace (a prompt past the model's context, say):
    the data set is committed, and its manifest says that nothing was kept and why."""
    server.fail_all = 400
    traces.run(["--config", config(tmp_path, url_of(server)), "--workers", "1"])
    explain = artifacts.verify(str(tmp_path / "out")).stats["explain"]
    assert (explain["asked"], explain["kept"], explain["request_refused"]) == (6, 0, 6)


@pytest.mark.slow  # the step as its own process, twice
@pytest.mark.parametrize("mode", ["auto", "rlimits"])
def test_the_api_key_is_sent_but_never_reaches_sandboxed_programs(tmp_path, server, mode):
    """The step (its own process, as the runner starts it) reads the key from apiKeyEnv and sends
    it; a traced program finds it neither in its environment nor in any process's it can read
    (bubblewrap: its own PID namespace; rlimits: the step process is made non-dumpable)."""
    env = {**os.environ, KEY_ENV: KEY, "CWM_SANDBOX": "" if mode == "auto" else mode}
    path = config(tmp_path, url_of(server), apiKeyEnv=KEY_ENV, snoop=True)
    done = subprocess.run([sys.executable, "-m", "cwm_beam.traces", "--config", path,
                           "--workers", "1"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert set(server.keys) == {f"Bearer {KEY}"}
    out = str(tmp_path / "out")
    traced = {r["id"]: r for r in artifacts.iter_records(out, "train")}
    assert traced["jsonl/snoop_env"]["return"] == "False"
    # /proc: the tracer's own guard refuses the read (a dead letter), and were it to pass, the
    # kernel would (bubblewrap's PID namespace, or the non-dumpable step process).
    dead = {r["id"]: r for r in artifacts.iter_records(out, "deadletter")}
    assert ("sandbox violation" in dead["jsonl/snoop_proc"]["reason"]
            if "jsonl/snoop_proc" in dead else traced["jsonl/snoop_proc"]["return"] == "[]")
    for file in (tmp_path / "out").rglob("*"):
        assert not file.is_file() or KEY not in file.read_text(errors="replace"), file


def test_the_api_key_variable_must_be_set_when_named(tmp_path, server, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.setenv(storage.CREDENTIAL_NAMES_VAR, "AWS_LIKE_NAME")
    with pytest.raises(EndpointError, match=rf"explain.apiKeyEnv: \${KEY_ENV} is not set"):
        traces.run(["--config", config(tmp_path, url_of(server), apiKeyEnv=KEY_ENV),
                    "--workers", "1"])
    # Named a credential before anything else: sandbox_env scrubs it and makes the step
    # process non-dumpable (cwm_spec.storage).
    assert os.environ[storage.CREDENTIAL_NAMES_VAR] == f"AWS_LIKE_NAME,{KEY_ENV}"


def test_the_spec_names_the_bad_explain_field():
    def errors(explain):
        doc = {"apiVersion": "cwm.dev/v1alpha1", "kind": "CWMPipeline",
               "metadata": {"name": "x"}, "spec": {"data": {"traces": {"explain": explain}},
                                                   "stages": [{"name": "pretrain"}]}}
        with pytest.raises(Exception) as err:
            parse_pipeline(doc, target="local")
        return str(err.value)

    assert "data.traces.explain.endpoint" in errors({"endpoint": "vllm:8000", "model": "m"})
    assert "data.traces.explain.fraction" in errors({"endpoint": "http://h/v1", "model": "m",
                                                     "fraction": 0})
    assert "apiKeySecret needs apiKeyEnv" in errors({"endpoint": "http://h/v1", "model": "m",
                                                     "apiKeySecret": "key"})


def test_the_operator_renders_the_key_from_the_named_secret():
    doc = yaml.safe_load((REPO / "examples" / "cluster.yaml").read_text())
    doc["spec"]["data"].setdefault("traces", {})["explain"] = {
        "endpoint": "http://vllm:8000/v1", "model": "m", "apiKeyEnv": "EXPLAIN_KEY",
        "apiKeySecret": "explain-key"}
    pipeline = parse_pipeline(doc, target="cluster")
    plan = build_plan(pipeline, Target.cluster(pipeline, "research"))
    for name in ("traces", "trajectories"):
        job = render_child(pipeline, "research", plan.step(name), 1, OperatorSettings())
        env = job["spec"]["template"]["spec"]["containers"][0]["env"]
        keys = [e for e in env if e["name"] == "EXPLAIN_KEY"]
        assert keys == ([{"name": "EXPLAIN_KEY", "valueFrom": {"secretKeyRef": {
            "name": "explain-key", "key": "apiKey"}}}] if name == "traces" else []), name
