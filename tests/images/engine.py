"""The local Docker engine the images are built with and run on: found, or installed and started.

`ensure_engine()` returns a `docker.DockerClient` whose daemon answers. When the socket does not
answer it starts `dockerd` (installing Debian's `docker.io` first when `dockerd` is missing: the
only way to get an engine on a fresh machine of this kind), detached, logging to
`$CWM_CACHE/images/dockerd.log`, and waits for it. The daemon is left running on purpose: the
node of the test cluster and later `make images` use the same one; `stop_engine()` stops a daemon
this module started (its pid is in `$CWM_CACHE/images/dockerd.pid`).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import docker
import docker.errors

log = logging.getLogger("cwm.images")

SOCKET = "unix:///var/run/docker.sock"
START_TIMEOUT_S = 60


class EngineError(RuntimeError):
    """No Docker engine could be reached or started; the message says what was tried."""


def cache_dir() -> Path:
    """$CWM_CACHE/images (the Makefile's default $CWM_CACHE is .cache in the repository)."""
    root = Path(os.environ.get("CWM_CACHE") or Path(__file__).resolve().parents[2] / ".cache")
    path = root / "images"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _client() -> docker.DockerClient | None:
    """A client whose daemon answers a ping, or None."""
    try:
        client = docker.DockerClient(base_url=os.environ.get("DOCKER_HOST", SOCKET), timeout=600)
        client.ping()
        return client
    except (docker.errors.DockerException, OSError):
        return None


def _install_docker() -> None:
    """apt-get install docker.io (Docker Engine with containerd and runc, from Debian)."""
    if shutil.which("apt-get") is None:
        raise EngineError("dockerd is not installed and apt-get is not available: install Docker")
    log.warning("dockerd not found: installing Debian's docker.io (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "docker.io"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise EngineError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")


def _start_dockerd() -> int:
    """Start dockerd detached (its own session, so it outlives this process); return its pid."""
    logfile = cache_dir() / "dockerd.log"
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(["dockerd"], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    (cache_dir() / "dockerd.pid").write_text(str(proc.pid))
    log.warning("started dockerd (pid %d, log %s)", proc.pid, logfile)
    return proc.pid


def ensure_engine() -> docker.DockerClient:
    """A client of a running Docker engine, starting (and if needed installing) one."""
    client = _client()
    if client is not None:
        return client
    if shutil.which("dockerd") is None:
        _install_docker()
    pid = _start_dockerd()
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        client = _client()
        if client is not None:
            return client
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    tail = (cache_dir() / "dockerd.log").read_text(errors="replace")[-2000:]
    raise EngineError(f"dockerd did not answer on {SOCKET} within {START_TIMEOUT_S} s; "
                      f"log tail ({cache_dir() / 'dockerd.log'}):\n{tail}")


def stop_engine() -> bool:
    """Stop the dockerd this module started (SIGTERM, then wait); False when none was recorded."""
    pidfile = cache_dir() / "dockerd.pid"
    if not pidfile.exists():
        return False
    pid = int(pidfile.read_text())
    pidfile.unlink()
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    for _ in range(60):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.5)
    raise EngineError(f"dockerd (pid {pid}) did not stop within 30 s")
