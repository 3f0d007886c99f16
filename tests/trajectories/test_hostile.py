"""Hostile repository code is contained and recorded.

Each payload in ``fixtures/hostile/`` is planted in a small repository, in a test or in
``conftest.py``, and the environment prepares that repository (the sandboxed full-suite run
every repository goes through). The host must be untouched (files, network, this process, no
surviving processes), the run must end within its limits, and the environment must say what
happened: the limit or signal in ``baseline.reason``, the test's outcome, or a
``RepositoryError`` naming the exit.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from cwm_exec import sandbox
from cwm_forager.env import RepoEnvironment
from cwm_forager.repos import RepositoryError
from cwm_forager.tools import ToolRunner

PAYLOADS = Path(__file__).parent / "fixtures" / "hostile"
LIMITS = sandbox.Limits(wall_seconds=5, cpu_seconds=5, memory_mb=768, output_bytes=1_000_000,
                        processes=32)
HOSTILE = "tests/test_z_hostile.py::test_hostile"
needs_bwrap = pytest.mark.skipif(
    sandbox.isolation() != "bwrap",
    reason="file-system, network and PID isolation come from bubblewrap here (from the pod on "
           "Kubernetes)")


def plant(root: Path, case: str, **values) -> str:
    """Write the repository with the payload planted; return a marker unique to this run."""
    marker = uuid.uuid4().hex
    text = (PAYLOADS / f"{case}.txt").read_text()
    for key, value in values.items():
        text = text.replace("{" + key + "}", str(value))
    where = text.splitlines()[0].removeprefix("# where: ").strip()
    (root / "pkg").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "pkg" / "__init__.py").write_text("def double(x):\n    return 2 * x\n")
    (root / "tests" / "test_a_ok.py").write_text(
        "from pkg import double\n\n\ndef test_double():\n    assert double(2) == 4\n")
    body = f"# {marker}\n" + text
    if where == "conftest":
        (root / "conftest.py").write_text(body)
    else:
        indented = "".join(f"    {line}\n" for line in body.splitlines())
        (root / "tests" / "test_z_hostile.py").write_text(f"def test_hostile():\n{indented}")
    return marker


def prepare(root: Path, workroot: Path):
    """(environment or None, error or None, seconds)."""
    env = RepoEnvironment({"path": str(root)}, limits=LIMITS, workroot=workroot, suite_seconds=5)
    start = time.monotonic()
    try:
        env.prepare()
        return env, None, time.monotonic() - start
    except RepositoryError as err:
        return None, str(err), time.monotonic() - start


def survivors(marker: str) -> list[int]:
    """Processes still running code from this payload (none may outlive the sandbox)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.fixture()
def repo(tmp_path):
    return tmp_path / "repo", tmp_path / "work"


@pytest.mark.slow
def test_infinite_loop(repo):
    marker = plant(repo[0], "infinite_loop")
    env, error, seconds = prepare(*repo)
    assert error is None and env.suite == ["tests/test_a_ok.py::test_double"]
    assert env.baseline.reason.startswith(("wall-clock timeout", "cpu limit"))
    assert HOSTILE not in env.baseline.outcomes and seconds < 30
    assert survivors(marker) == []


@pytest.mark.slow
@pytest.mark.skipif(not sandbox._PidsCgroup.available() and os.geteuid() == 0,
                    reason="no pids cgroup, and RLIMIT_NPROC does not bind root")
def test_fork_bomb(repo):
    marker = plant(repo[0], "fork_bomb")
    env, error, seconds = prepare(*repo)
    assert error is None and env.baseline.reason.startswith("wall-clock timeout")
    assert seconds < 30
    time.sleep(0.5)
    assert survivors(marker) == []


def test_memory_bomb(repo):
    plant(repo[0], "memory_bomb")
    env, error, _ = prepare(*repo)
    assert error is None and env.baseline.outcomes[HOSTILE] == "failed"
    assert "MemoryError" in env.baseline.output


def test_deep_recursion(repo):
    plant(repo[0], "deep_recursion")
    env, error, _ = prepare(*repo)
    assert error is None and env.suite == ["tests/test_a_ok.py::test_double"]
    assert env.baseline.reason is not None and env.baseline.reason.startswith("killed by SIG")


@needs_bwrap
def test_writing_outside_the_sandbox(repo, tmp_path):
    pristine = repo[0] / "pkg" / "__init__.py"  # the host's copy of the repository
    plant(repo[0], "write_outside", OUTSIDE=pristine)
    before = pristine.read_text()
    env, error, _ = prepare(*repo)
    assert error is None and env.baseline.outcomes[HOSTILE] == "failed"
    assert pristine.read_text() == before


@needs_bwrap
def test_reading_outside_the_sandbox(repo, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the-secret-" + uuid.uuid4().hex)
    plant(repo[0], "read_outside", SECRET=secret)
    env, error, _ = prepare(*repo)
    assert error is None and env.baseline.outcomes[HOSTILE] == "failed"
    assert secret.read_text() not in env.baseline.output


@needs_bwrap
def test_network_connection(repo):
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    accepted = []
    done = threading.Event()

    def accept():
        while not done.is_set():
            try:
                accepted.append(listener.accept())
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    plant(repo[0], "network", PORT=listener.getsockname()[1])
    env, error, _ = prepare(*repo)
    time.sleep(0.5)
    done.set()
    thread.join()
    listener.close()
    assert error is None and env.baseline.outcomes[HOSTILE] == "failed"
    assert accepted == []


def test_100_mb_of_stdout(repo):
    plant(repo[0], "big_stdout")
    env, error, seconds = prepare(*repo)
    recorded = env.baseline.reason if env else error
    assert "output limit" in recorded and seconds < 30


@needs_bwrap
def test_killing_the_parent(repo):
    plant(repo[0], "kill_parent", HOST_PID=os.getpid())
    env, error, _ = prepare(*repo)
    # still here, and the suite ran (the PID namespace hides every process outside it)
    assert error is None and env.suite == ["tests/test_a_ok.py::test_double"]


def test_os_exit_in_a_test(repo):
    plant(repo[0], "os_exit")
    env, error, _ = prepare(*repo)
    # exit status 0, but the report shows the hostile test never finished
    assert error is None and env.baseline.returncode == 0
    assert HOSTILE not in env.baseline.outcomes and env.suite == ["tests/test_a_ok.py::test_double"]


def test_os_exit_in_conftest(repo):
    plant(repo[0], "os_exit_conftest")
    env, error, _ = prepare(*repo)
    assert env is None and "no test passes" in error and "exit 3" in error


def test_agent_bash_actions_are_bounded(calc_env):
    workdir = calc_env.fresh_task_copy()
    try:
        runner = ToolRunner(calc_env, workdir, max_observation_chars=4000, action_timeout=3)
        loop = runner.call("bash", {"command": "python -c 'while True: pass'"}).observation
        assert "[wall-clock timeout (3s)]" in loop or "[cpu limit" in loop
        flood = runner.call("bash", {"command": "head -c 100000000 /dev/zero | tr '\\0' x"}).observation
        assert "[output limit" in flood and len(flood) <= 4000
    finally:
        calc_env.discard(workdir)
