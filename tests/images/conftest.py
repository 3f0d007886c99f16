"""Fixtures of the image tests: the images (built or found up to date) and a pod-like runner."""

from __future__ import annotations

from collections.abc import Iterator

import docker
import pytest

from tests.images.build import build_all
from tests.images.engine import ensure_engine
from tests.images.podrun import PodRunner

# podrun.py is a helper module; the test files are test_*.py.


@pytest.fixture(scope="session")
def docker_client() -> docker.DockerClient:
    """The local engine (started when it is not running: `make images` normally did that)."""
    return ensure_engine()


@pytest.fixture(scope="session")
def images(docker_client: docker.DockerClient) -> dict[str, str]:
    """{name: ref} of the three images. Up to date after `make images` (seconds); otherwise this
    builds them (many minutes), which is why `make test` runs `make images` first."""
    try:
        return build_all()
    except Exception as err:  # noqa: BLE001 - fail with the builder's own words
        pytest.fail(f"the images did not build ({err}); run `make images` to see the full log",
                    pytrace=False)


@pytest.fixture
def pod(docker_client: docker.DockerClient) -> Iterator[PodRunner]:
    """Runs containers as the chart's pods run (see podrun.PodRunner); removes them afterwards."""
    runner = PodRunner(docker_client)
    try:
        yield runner
    finally:
        runner.cleanup()
