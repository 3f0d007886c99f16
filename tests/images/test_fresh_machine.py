"""The node's install step on a machine that has none of its packages: tests/controlplane/
node-deps.sh run as root in a fresh Debian bookworm root (the Python stand-in base, made by
debootstrap, which has no containerd, runc, CNI plugins, iptables or gcc) installs them from
Debian and builds the pause binary. A missing package name or a broken apt step fails here, not
on a user's first `make node`."""

from __future__ import annotations

from pathlib import Path

import docker
import pytest

from tests.images.bases import python_base

pytestmark = [pytest.mark.images, pytest.mark.slow]  # apt-get from Debian's mirror: ~35 s

REPO = Path(__file__).resolve().parents[2]


def test_node_deps_install_on_a_fresh_debian_root(docker_client: docker.DockerClient):
    base = python_base(docker_client)
    script = ("! command -v containerd && bash /repo/tests/controlplane/node-deps.sh "
              "&& test -x /tmp/cache/node/pause/pause && containerd --version && runc --version "
              "&& test -x /usr/lib/cni/bridge && iptables --version")
    output = docker_client.containers.run(
        base, ["bash", "-c", script], remove=True, network_mode="host",
        environment={"CWM_CACHE": "/tmp/cache"},
        volumes={str(REPO / "tests"): {"bind": "/repo/tests", "mode": "ro"}},
        stdout=True, stderr=True).decode()  # fails if any step does
    assert "node dependencies present: containerd 1.6" in output, output
    assert "runc version 1.1" in output and "iptables v1.8" in output, output
