import json

import pytest

from cwm_beam import traces


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
    settings, output, beam_section, flags, _ = traces.load_job(["--extra_beam_flag=1"])
    assert output == str(tmp_path / "ds")
    assert settings.trace_limits.max_events == 500 and settings.shards == 2
    assert settings.sandbox.wall_seconds == 3 and settings.sandbox.memory_mb == 256
    assert beam_section["workers"] == 2
    assert flags == ["--extra_beam_flag=1", "--direct_running_mode=multi_processing"]


def test_bad_source_kind_names_the_field():
    with pytest.raises(ValueError, match=r"sources\[0\]\.kind"):
        traces.Settings(sources=({"kind": "nope"},))
    with pytest.raises(ValueError, match="--source 'bogus:1'"):
        traces.source_from_flag("bogus:1")
