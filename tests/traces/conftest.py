"""Shared, expensive fixtures for the trace tests: one sandboxed pool per session."""

import pytest

from cwm_exec.sandbox import Limits, TracePool


@pytest.fixture(scope="session")
def pool():
    with TracePool(Limits(wall_seconds=5, cpu_seconds=3, memory_mb=512), workers=1) as p:
        yield p


# fixtures/ holds small repositories whose own test suites run inside the sandbox (see
# test_repository.py), not as part of this suite.
collect_ignore = ["fixtures"]
