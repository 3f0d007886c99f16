"""Stand-ins for the base images no registry serves here, made locally and named as local images.

The Dockerfiles start from `python:3.11.14-slim-bookworm`, `apache/beam_python3.11_sdk:2.77.0`
and `pytorch/pytorch:...` through build ARGs. None can be pulled on this machine, so:

- Python: Debian bookworm's root filesystem from `debootstrap` (minbase, plus python3 3.11,
  its headers, venv, pip and `python` -> python3), imported with `docker import`. Same Debian
  release and Python minor version as the official image; Debian's patch release (3.11.2) instead of
  3.11.14, and Python lives in /usr instead of /usr/local. Like the official image, pip may
  install into the system Python (Debian's EXTERNALLY-MANAGED marker is removed). It trusts the
  certificate authorities this host added locally (/usr/local/share/ca-certificates, installed
  with Debian's update-ca-certificates): on these machines HTTPS to PyPI passes a TLS-inspecting
  proxy whose CA is one of them, so without it pip fails inside `docker build`. Images built
  from the official bases carry no such addition.
- Beam SDK: only what the beam Dockerfile copies from it, /opt/apache/beam/boot: the SDK
  harness's boot program, built here with `go install` from Beam's own Go module
  (github.com/apache/beam/sdks/v2/python/container at the apache-beam version of
  pyproject.toml), the same source the official image's boot is built from.

Each stand-in carries a label with the hash of its recipe; an image whose label matches is
reused, so this costs nothing after the first time (debootstrap ~3-5 min, the Go build ~2-4 min).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
from packaging.requirements import Requirement

from tests.images.engine import cache_dir

log = logging.getLogger("cwm.images")

REPO = Path(__file__).resolve().parents[2]
RECIPE_LABEL = "dev.cwm.recipe"
DEBIAN_RELEASE = "bookworm"
DEBIAN_MIRROR = os.environ.get("CWM_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# python3-dev: the official image ships Python's headers, and the beam image's C tracer
# (an optional extension: built only where Python.h exists) needs them.
PYTHON_PACKAGES = ("python3", "python3-dev", "python3-venv", "python3-pip", "python-is-python3",
                   "ca-certificates")
SOURCES_LIST = (f"deb {DEBIAN_MIRROR} {DEBIAN_RELEASE} main\n"
                f"deb {DEBIAN_MIRROR} {DEBIAN_RELEASE}-updates main\n"
                f"deb http://deb.debian.org/debian-security {DEBIAN_RELEASE}-security main\n")
LOCAL_CAS = Path("/usr/local/share/ca-certificates")
BEAM_BOOT_PACKAGE = "github.com/apache/beam/sdks/v2/python/container"


class BaseImageError(RuntimeError):
    """A stand-in base image could not be made; the message names the command and its output."""


@dataclass(frozen=True)
class Bases:
    python: str    # stands in for python:3.11.x-slim-bookworm
    beam_sdk: str  # stands in for apache/beam_python3.11_sdk:<beam version>


def beam_version() -> str:
    """The apache-beam pin of pyproject.toml (the SDK image must match the installed SDK)."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    beam = next((Requirement(d) for d in deps if Requirement(d).name == "apache-beam"), None)
    pins = [s.version for s in beam.specifier if s.operator == "=="] if beam else []
    if len(pins) != 1:
        raise BaseImageError("pyproject.toml: apache-beam is not pinned with == (the SDK boot "
                             "program is built for an exact version)")
    return pins[0]


def _recipe(**parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _current(client: docker.DockerClient, ref: str, recipe: str) -> bool:
    try:
        return client.images.get(ref).labels.get(RECIPE_LABEL) == recipe
    except docker.errors.ImageNotFound:
        return False


def _run(cmd: list[str], what: str, **kwargs: object) -> None:
    log.warning("%s: %s", what, " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True,  # type: ignore[call-overload]
                          **kwargs)
    if done.returncode != 0:
        raise BaseImageError(f"{what}: `{' '.join(cmd)}` exited {done.returncode}:\n"
                             f"{(done.stdout + done.stderr)[-3000:]}")


def _import(client: docker.DockerClient, tar_path: Path, ref: str, changes: list[str]) -> str:
    repository, _, tag = ref.rpartition(":")
    with open(tar_path, "rb") as data:
        client.api.import_image_from_data(data, repository=repository, tag=tag, changes=changes)
    return client.images.get(ref).id


def python_base(client: docker.DockerClient, *, rebuild: bool = False) -> str:
    """The Python stand-in, e.g. cwm-local/python:3.11-bookworm (made with debootstrap)."""
    ref = f"cwm-local/python:3.11-{DEBIAN_RELEASE}"
    local_cas = sorted(LOCAL_CAS.glob("*.crt"))
    recipe = _recipe(release=DEBIAN_RELEASE, packages=PYTHON_PACKAGES, sources=SOURCES_LIST,
                     cas=[hashlib.sha256(c.read_bytes()).hexdigest() for c in local_cas],
                     version=3)
    if not rebuild and _current(client, ref, recipe):
        return ref
    if shutil.which("debootstrap") is None:  # a fresh machine's package lists may be empty
        _run(["apt-get", "update", "-qq"], "apt-get update")
        _run(["apt-get", "install", "-y", "-qq", "debootstrap"], "installing debootstrap")
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        root = Path(tmp) / "rootfs"
        _run(["debootstrap", "--variant=minbase", f"--include={','.join(PYTHON_PACKAGES)}",
              DEBIAN_RELEASE, str(root), DEBIAN_MIRROR], "debootstrap (Python stand-in)")
        marker = root / "usr/lib/python3.11/EXTERNALLY-MANAGED"
        marker.unlink(missing_ok=True)
        (root / "etc/apt/sources.list").write_text(SOURCES_LIST)
        if local_cas:
            for ca in local_cas:
                shutil.copy(ca, root / "usr/local/share/ca-certificates" / ca.name)
            _run(["chroot", str(root), "update-ca-certificates"], "trusting this host's local CAs")
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "var/log"):
            for child in (root / junk).glob("*"):
                if child.is_file():
                    child.unlink()
        tar_path = Path(tmp) / "rootfs.tar"
        _run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(tar_path), "."], "tar rootfs")
        _import(client, tar_path, ref, [
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8", 'CMD ["python3"]', f"LABEL {RECIPE_LABEL}={recipe}"])
    return ref


def _boot_binary(version: str) -> Path:
    """Beam's boot program, built from its Go module into $CWM_CACHE/images/beam-boot-<v>/."""
    out = cache_dir() / f"beam-boot-{version}"
    binary = out / "container"
    if binary.exists():
        return binary
    if shutil.which("go") is None:
        raise BaseImageError("go is not installed: the Beam SDK boot program is built with "
                             f"`go install {BEAM_BOOT_PACKAGE}@v{version}`")
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CGO_ENABLED": "0", "GOBIN": str(out), "GOFLAGS": "-buildvcs=false"}
    _run(["go", "install", "-p", "2", "-trimpath", "-ldflags=-s -w",
          f"{BEAM_BOOT_PACKAGE}@v{version}"], "building Beam's SDK boot program", env=env)
    return binary


def beam_sdk_base(client: docker.DockerClient, *, rebuild: bool = False) -> str:
    """The Beam SDK stand-in: an image holding /opt/apache/beam/boot and nothing else."""
    version = beam_version()
    ref = f"cwm-local/beam_python3.11_sdk:{version}"
    recipe = _recipe(package=BEAM_BOOT_PACKAGE, version=version, layout=1)
    if not rebuild and _current(client, ref, recipe):
        return ref
    binary = _boot_binary(version)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        tar_path = Path(tmp) / "sdk.tar"
        with tarfile.open(tar_path, "w") as tar:
            for folder in ("opt", "opt/apache", "opt/apache/beam"):
                info = tarfile.TarInfo(folder)
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            tar.add(binary, "opt/apache/beam/boot")
        _import(client, tar_path, ref, [f"LABEL {RECIPE_LABEL}={recipe}",
                                        'ENTRYPOINT ["/opt/apache/beam/boot"]'])
    return ref


def ensure_bases(client: docker.DockerClient, *, rebuild: bool = False) -> Bases:
    return Bases(python=python_base(client, rebuild=rebuild),
                 beam_sdk=beam_sdk_base(client, rebuild=rebuild))
