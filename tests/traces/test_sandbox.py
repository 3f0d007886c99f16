import sys
import threading
from concurrent import futures

import grpc
import pytest

from cwm_beam.sources import cruxeval_records
from cwm_exec.sandbox import Failure, Limits, describe_isolation, isolation, run_command

from .hostile import HOSTILE, hostile_input

FAST = Limits(wall_seconds=2, cpu_seconds=1, memory_mb=256, output_bytes=4096)


def test_isolation_is_named():
    assert isolation() in ("bwrap", "rlimits")
    assert describe_isolation().startswith(isolation())


def test_run_command_captures_output_and_exit(tmp_path):
    r = run_command([sys.executable, "-c", "import sys; print('hi'); sys.exit(3)"], cwd=tmp_path,
                    limits=FAST)
    assert (r.returncode, r.stdout, r.reason, r.timed_out) == (3, b"hi\n", None, False)


def test_run_command_caps_output(tmp_path):
    r = run_command([sys.executable, "-c", "print('x' * 10**7)"], cwd=tmp_path, limits=FAST)
    assert r.truncated_output and len(r.stdout) <= 4096 and "output limit" in r.reason


def test_run_command_wall_clock_timeout(tmp_path):
    r = run_command([sys.executable, "-c", "import time; time.sleep(30)"], cwd=tmp_path,
                    limits=Limits(wall_seconds=0.5, cpu_seconds=5))
    assert r.timed_out and r.reason.startswith("wall-clock timeout")


@pytest.mark.slow
def test_spawning_is_safe_beside_grpc_threads(tmp_path):
    """Every Beam SDK worker has gRPC threads, and a fork there runs gRPC's fork handlers, which
    crashed 68 of 300 children while the sandbox set its limits in a ``preexec_fn`` (Python
    between fork and exec, so ``subprocess`` could not use ``vfork``). None may die now."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    port = server.add_insecure_port("localhost:0")
    server.start()
    stop = threading.Event()

    def connect() -> None:   # keeps other threads calling into gRPC while this one spawns
        while not stop.is_set():
            channel = grpc.insecure_channel(f"localhost:{port}")
            try:
                grpc.channel_ready_future(channel).result(timeout=1)
            except grpc.FutureTimeoutError:
                pass   # a slow connection is fine: only the calls into gRPC matter here
            finally:
                channel.close()

    callers = [threading.Thread(target=connect, daemon=True) for _ in range(2)]
    for caller in callers:
        caller.start()
    try:
        results = [run_command(["/bin/true"], cwd=tmp_path, limits=FAST) for _ in range(100)]
    finally:
        stop.set()
        for caller in callers:
            caller.join()
        server.stop(0)
    died = [r for r in results if r.returncode != 0]
    assert not died, f"{len(died)} of {len(results)} spawns died, e.g. {died[0]}"


@pytest.mark.skipif(isolation() != "bwrap", reason="file-system isolation needs bubblewrap")
def test_run_command_hides_host_files_and_network(tmp_path):
    secret = tmp_path.parent / "secret-for-sandbox-test.txt"
    secret.write_text("s3cret")
    try:
        code = (f"import socket\ntry:\n    print(open({str(secret)!r}).read())\n"
                "except OSError as e:\n    print('nofile')\ns = socket.socket()\ntry:\n"
                "    s.connect(('1.1.1.1', 80))\nexcept OSError:\n    print('nonet')\n"
                "open('mine.txt', 'w').write('ok')")
        r = run_command([sys.executable, "-c", code], cwd=tmp_path, limits=FAST)
        assert r.stdout.split() == [b"nofile", b"nonet"]
        assert (tmp_path / "mine.txt").read_text() == "ok"   # the working directory is shared
    finally:
        secret.unlink()


def test_pool_traces_and_reports_program_errors(pool):
    ok = pool.trace("def f(x):\n    return x + 1", "f", "1")
    assert ok.return_repr == "2"
    bad = pool.trace("def f(x:\n", "f", "1")
    assert (bad.stage, bad.reason) == ("setup", "program error")
    assert bad.detail.startswith("source does not parse")
    missing = pool.trace("def g(x):\n    return x", "f", "1")
    assert missing == Failure("setup", "program error",
                              "entry function 'f' is not defined at the top level")
    # Sources the parser itself gives up on (MemoryError, RecursionError here): still one job's
    # failure each, and the pool goes on.
    for expression in ("-" * 100_000 + "x", "+".join(["x"] * 50_000)):
        failed = pool.trace(f"def f(x):\n    return {expression}", "f", "1")
        assert isinstance(failed, Failure), failed
    assert pool.trace("def f(x):\n    return -x", "f", "1").return_repr == "-1"


@pytest.mark.slow
def test_pool_contains_hostile_programs(pool, tmp_path):
    (tmp_path / "secret.txt").write_text("s3cret")
    for name, code in HOSTILE.items():
        result = pool.trace(code, "f", hostile_input(name, str(tmp_path)))
        reason = result.reason if isinstance(result, Failure) else result.truncated_reason
        assert reason, f"{name}: not contained ({result})"
    assert not (tmp_path / "pwned.txt").exists()
    assert pool.trace("def f(x):\n    return x * 2", "f", "21").return_repr == "42"


@pytest.mark.slow
def test_all_cruxeval_functions_trace_to_the_expected_output(pool):
    wrong = []
    for record in cruxeval_records():
        result = pool.trace(record["code"], "f", record["input"])
        if isinstance(result, Failure) or result.return_repr is None or \
                eval(result.return_repr) != eval(record["output"]) or \
                result.frames[-1].value != result.return_repr:
            wrong.append(record["id"])
    assert wrong == []
