"""Run a container the way the chart's pods run, with Docker: the pod security the chart and the
operator render, translated to `docker run` settings.

    Kubernetes (chart / operator)                 Docker here
    runAsUser/runAsGroup 65532, runAsNonRoot      user="65532:65532"
    readOnlyRootFilesystem, emptyDir at /tmp      read_only=True, tmpfs /tmp (exec, like emptyDir)
    capabilities drop ALL                         cap_drop=["ALL"]
    allowPrivilegeEscalation: false               security_opt no-new-privileges
    seccompProfile RuntimeDefault                 Docker's default seccomp profile
    no service-account token                      nothing mounted at /var/run/secrets
    no network unless the step needs it           network_mode="none" (the default here)

What Docker cannot say the same way: a pod's network is its own namespace on the cluster
network; where a container needs to reach a process on this machine's loopback (the operator and
the test API server) it gets the host's network instead, and the test says so.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import docker
import docker.errors
from docker.models.containers import Container
from docker.types import Mount

UID_GID = "65532:65532"
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


@dataclass(frozen=True)
class PodResult:
    exit_code: int
    logs: str
    seconds: float  # from start to exit


def bind(source: str, target: str, *, read_only: bool = True) -> Mount:
    """A host folder mounted into the container (a volume of the pod)."""
    return Mount(target=target, source=source, type="bind", read_only=read_only)


class PodRunner:
    """Starts containers with pod security settings; `cleanup()` removes every one it started."""

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client
        self.containers: list[Container] = []

    def start(self, image: str, command: Sequence[str] | None = None, *,
              args: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
              mounts: Sequence[Mount] = (), network: str = "none", tmp_size: str = "2g",
              limits: Mapping[str, object] | None = None) -> Container:
        """`command` and `args` mean what they mean in a pod's container: `command` replaces the
        image's ENTRYPOINT (the operator sets it for every step), `args` its CMD."""
        container = self.client.containers.run(
            image, list(args) if args is not None else None, detach=True,
            entrypoint=list(command) if command is not None else None,
            environment=dict(env or {}), mounts=list(mounts), network_mode=network,
            user=UID_GID, read_only=True, cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            tmpfs={"/tmp": f"rw,exec,nosuid,nodev,size={tmp_size},mode=1777"},
            **dict(limits or {}))
        self.containers.append(container)
        return container

    def run(self, image: str, command: Sequence[str] | None = None, *, timeout: float = 600,
            **kwargs: object) -> PodResult:
        """Start, wait for the exit (killing it after `timeout` s), return code and logs."""
        started = time.monotonic()
        container = self.start(image, command, **kwargs)  # type: ignore[arg-type]
        try:
            status = container.wait(timeout=timeout)
        except Exception:  # noqa: BLE001 - requests' ReadTimeout: the container ran too long
            container.kill()
            status = {"StatusCode": -1}
        seconds = time.monotonic() - started
        logs = container.logs().decode(errors="replace")
        return PodResult(int(status["StatusCode"]), logs, seconds)

    def cleanup(self) -> None:
        for container in self.containers:
            try:
                container.remove(force=True)
            except docker.errors.NotFound:  # already gone; any other refusal is reported
                pass
        self.containers.clear()
