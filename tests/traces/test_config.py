import json

import pytest

from cwm_beam import traces
from cwm_exec import sandbox


def test_step_config_is_read_with_sandbox_and_beam_sections(tmp_path, monkeypatch):
    config = {"apiVersion": "cwm.dev/v1alpha1", "pipeline": "t", "step": "traces",
              "kind": "beam", "seed": 0,
              "spec": {"sources": [{"kind": "synthetic", "count": 5}], "maxEvents": 500,
                       "shards": 2, "validationFraction": 0.1},
              "sandbox": {"wallSeconds": 3, "memoryMB": 256},
              "runtime": {"beam": {"runner": "DirectRunner", "workers": 2,
                                   "options": ["--direct_running_mode=multi_processing"]}},
              "inputs": {}, "outputs": {"dataset": str(tmp_path / "ds")}}
    monkeypatch.setenv("CWM_STEP_CONFIG", json.dumps(config))
    job = traces.load_job(["--extra_beam_flag=1"])
    settings = job.settings
    assert job.output == str(tmp_path / "ds")
    assert settings.trace_limits.max_events == 500 and settings.spec.shards == 2
    assert settings.trace_limits.max_bytes == 1_000_000   # the API's default
    assert settings.sandbox.wall_seconds == 3 and settings.sandbox.memory_mb == 256
    assert settings.sandbox.cpu_seconds == 10             # the API's default
    assert job.beam["workers"] == 2
    assert job.beam_flags == ["--extra_beam_flag=1", "--direct_running_mode=multi_processing"]


def test_bad_fields_are_named():
    limits = sandbox.Limits()
    with pytest.raises(ValueError, match=r"spec\.sources\[0\]\.kind"):
        traces.Settings.from_spec({"sources": [{"kind": "nope"}]}, limits)
    with pytest.raises(ValueError, match=r"spec\.sources\[0\]: uri is required"):
        traces.Settings.from_spec({"sources": [{"kind": "jsonl"}]}, limits)
    with pytest.raises(ValueError, match=r"spec\.validationFraction"):
        traces.Settings.from_spec({"validationFraction": 1}, limits)
    with pytest.raises(ValueError, match=r"sandbox\.memoryMB"):
        sandbox.Limits.from_spec({"memoryMB": 1})
    with pytest.raises(ValueError, match=r"sandbox\.wallSecs: unknown field"):
        sandbox.Limits.from_spec({"wallSecs": 1})
    with pytest.raises(ValueError, match="--source 'bogus:1'"):
        traces.source_from_flag("bogus:1")
