"""How the sandbox decides between bubblewrap and rlimits, and that the choice is never silent:
required bubblewrap fails loudly, a fallback is logged, and data sets record the mode."""

from __future__ import annotations

import logging
import marshal
import os
import sys
from collections.abc import Iterator

import pytest

from cwm_beam import traces
from cwm_exec import sandbox
from cwm_spec import artifacts


@pytest.fixture(autouse=True)
def fresh_decision() -> Iterator[None]:
    """The decision is cached per process: forget it before and after each test."""
    sandbox._decide.cache_clear()
    yield
    sandbox._decide.cache_clear()


@pytest.fixture
def broken_bwrap(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bubblewrap that cannot create namespaces (what RuntimeDefault seccomp does in a pod)."""
    monkeypatch.setattr(sandbox, "bwrap_binary", lambda: "/bin/false")


def test_required_bubblewrap_that_cannot_work_fails_with_its_reason(monkeypatch, broken_bwrap) -> None:
    monkeypatch.setenv("CWM_SANDBOX", "bwrap")
    with pytest.raises(sandbox.SandboxError, match=r"CWM_SANDBOX=bwrap .*/bin/false: exit status 1.*seccomp"):
        sandbox.isolation()


def test_fallback_is_logged_and_recorded(monkeypatch, broken_bwrap, caplog) -> None:
    monkeypatch.delenv("CWM_SANDBOX", raising=False)
    with caplog.at_level(logging.WARNING, logger="cwm_exec.sandbox"):
        assert sandbox.isolation() == "rlimits"
    assert "bubblewrap unavailable (/bin/false: exit status 1)" in caplog.text
    assert sandbox.isolation_record() == {"mode": "rlimits", "requested": "auto", "proc": "shared",
                                          "reason": "fallback: /bin/false: exit status 1"}
    assert "NO file-system, network or credential isolation" in sandbox.describe_isolation()


def test_missing_binary_is_named(monkeypatch) -> None:
    monkeypatch.setattr(sandbox, "bwrap_binary", lambda: None)
    monkeypatch.delenv("CWM_SANDBOX", raising=False)
    assert sandbox.isolation_record()["reason"].startswith("fallback: no bubblewrap binary")


def test_chosen_rlimits_is_not_a_fallback(monkeypatch) -> None:
    monkeypatch.setenv("CWM_SANDBOX", "rlimits")
    assert sandbox.isolation_record() == {"mode": "rlimits", "requested": "rlimits", "proc": "shared",
                                          "reason": "CWM_SANDBOX=rlimits: chosen, not a fallback"}


@pytest.mark.skipif(sandbox._probe_bwrap()[0] is not None, reason="needs a working bubblewrap")
def test_where_a_private_proc_is_refused_programs_get_none(monkeypatch, tmp_path) -> None:
    """In containers and pods (masked /proc) the kernel refuses a new procfs: the probe, run with
    sandbox_argv's own options, says so, and programs then run with no /proc at all."""
    real = sandbox._run_probe
    monkeypatch.setattr(sandbox, "_run_probe", lambda binary, extra: (
        "bwrap: Can't mount proc on /newroot/proc: Operation not permitted" if extra else real(binary, extra)))
    monkeypatch.setenv("CWM_SANDBOX", "bwrap")
    record = sandbox.isolation_record()
    assert (record["mode"], record["proc"]) == ("bwrap", "none") and "Can't mount proc" in record["reason"]
    code = "import os; print(os.path.exists('/proc/1'), os.getpid())"
    done = sandbox.run_command([sys.executable, "-c", code], cwd=tmp_path, limits=sandbox.Limits(),
                               env=sandbox.default_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == b"False"  # no process of the pod is visible, not even pid 1


def test_unknown_mode_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("CWM_SANDBOX", "none")
    with pytest.raises(sandbox.SandboxError, match="CWM_SANDBOX='none'"):
        sandbox.isolation()


def test_trace_data_set_records_the_isolation_and_required_bwrap_fails_the_step(
        tmp_path, monkeypatch, broken_bwrap) -> None:
    monkeypatch.setenv("CWM_SANDBOX", "rlimits")
    flags = ["--source", "synthetic:10", "--shards", "1"]
    traces.run([*flags, "--output", str(tmp_path / "ok")])
    recorded = artifacts.read_manifest(str(tmp_path / "ok")).stats["sandbox"]
    assert recorded["mode"] == "rlimits" and recorded["requested"] == "rlimits"
    sandbox._decide.cache_clear()
    monkeypatch.setenv("CWM_SANDBOX", "bwrap")
    with pytest.raises(sandbox.SandboxError, match="cannot isolate programs"):
        traces.run([*flags, "--output", str(tmp_path / "refused")])
    assert not os.path.exists(tmp_path / "refused" / "manifest.json")


def test_process_cap_is_set_inside_the_sandbox_for_a_non_root_user(monkeypatch) -> None:
    """RLIMIT_NPROC counts a uid machine-wide: set before bubblewrap, other pods of uid 65532 made
    its clone fail (EAGAIN, measured in the cwm-beam container with 100 such processes: 11 of 11
    hostile cases); set inside the sandbox's user namespace it counts only the sandbox's own."""
    monkeypatch.setattr(sandbox, "_decide", lambda: ("bwrap", "bwrap", "test", False))
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 65532)
    monkeypatch.setattr(sandbox._PidsCgroup, "available", classmethod(lambda cls: False))
    limits = sandbox.Limits(processes=7)
    inner = sandbox.sandbox_argv(["prog", "arg"], cwd="/tmp", limits=limits, env={"A": "1"})
    after = inner[inner.index("--") + 1:]
    assert after[-2:] == ["prog", "arg"] and "_exec_limited" in after[4]
    assert marshal.loads(bytes.fromhex(after[5]))["processes"] == 7
    outer = sandbox.limited_argv(inner, limits, None, {"A": "1"})
    assert marshal.loads(bytes.fromhex(outer[5]))["processes"] is None
