"""Build the three images (cwm-operator, cwm-beam, cwm-trainer) from the Dockerfiles users build.

    python -m tests.images.build            # what `make images` runs
    python -m tests.images.build --no-cache # a cold build: stand-in bases and every layer again

From Python (the test cluster's node loads the results into its containerd):

    from tests.images.build import ensure_engine, build_all
    refs = build_all()   # {"cwm-operator": "ghcr.io/cwm-pipeline/cwm-operator:0.1.0", ...}

The images are tagged with the references the Helm chart uses by default
(`<images.registry>/<repository>:<appVersion>`), so pods find them without a pull.

How, on a machine with no container registry (see tests/images/README.md):
- the engine is the local Docker daemon, started (and installed) by `engine.ensure_engine()`;
- base images are local stand-ins (`bases.py`) passed through the Dockerfiles' build ARGs;
- the `docker` SDK drives the classic builder; RUN steps reach PyPI and Debian through Docker's
  default bridge (see BUILD_NETWORK);
- each image carries a label with the hash of everything its build reads (Dockerfile, build
  arguments, the base images' ids, every file of the context the Dockerfile may copy); when the
  tagged image already has that label the build is skipped, so a warm `make images` takes seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import docker
import docker.errors
import yaml
from docker.utils.build import exclude_paths

from tests.images.bases import Bases, ensure_bases
from tests.images.engine import ensure_engine

log = logging.getLogger("cwm.images")

REPO = Path(__file__).resolve().parents[2]
CONTENT_LABEL = "dev.cwm.content-hash"
# RUN steps install from PyPI and Debian over Docker's default bridge (checked here: it reaches
# them; HTTPS needs this host's local CAs, which the Python stand-in trusts, see bases.py).
# CWM_BUILD_NETWORK=host builds with the host's network where a bridge has no way out.
BUILD_NETWORK = os.environ.get("CWM_BUILD_NETWORK") or None
TORCH_VERSION = "2.9.1"  # the Dockerfiles' default (pytorch/pytorch:2.9.1-...); PyPI has it
PYPI = "https://pypi.org/simple"

__all__ = ["ensure_engine", "build_all", "image_refs", "ImageSpec"]


class BuildError(RuntimeError):
    """A Dockerfile did not build; the message has the image and the last lines of its log."""


@dataclass(frozen=True)
class ImageSpec:
    name: str                 # cwm-operator, cwm-beam, cwm-trainer
    dockerfile: str           # relative to the repository root (the build context)
    ref: str                  # the tag, as the chart names the image
    buildargs: Mapping[str, str] = field(default_factory=dict)


def chart_defaults() -> tuple[str, dict[str, str], str]:
    """(registry, {key: repository}, appVersion) from the chart: the images' default names."""
    chart = REPO / "charts" / "cwm-operator"
    values = yaml.safe_load((chart / "values.yaml").read_text())["images"]
    version = str(yaml.safe_load((chart / "Chart.yaml").read_text())["appVersion"])
    repos = {key: values[key]["repository"] for key in ("operator", "beam", "trainer")}
    return values["registry"], repos, version


def image_refs() -> dict[str, str]:
    """{"cwm-operator": "ghcr.io/cwm-pipeline/cwm-operator:0.1.0", ...}: what the chart pulls."""
    registry, repos, version = chart_defaults()
    return {repo.rsplit("/", 1)[-1]: f"{registry}/{repo}:{version}" for repo in repos.values()}


def image_specs(bases: Bases) -> list[ImageSpec]:
    """The three builds as made here: local stand-in bases; the CPU trainer with PyPI's torch."""
    refs = image_refs()
    return [
        ImageSpec("cwm-operator", "operator/Dockerfile", refs["cwm-operator"],
                  {"PYTHON_IMAGE": bases.python}),
        ImageSpec("cwm-beam", "beam/Dockerfile", refs["cwm-beam"],
                  {"PYTHON_IMAGE": bases.python, "BEAM_SDK_IMAGE": bases.beam_sdk}),
        ImageSpec("cwm-trainer", "jobs/Dockerfile", refs["cwm-trainer"],
                  {"PYTORCH_DEVEL_IMAGE": bases.python, "PYTORCH_RUNTIME_IMAGE": bases.python,
                   "TORCH_INSTALL": f"torch=={TORCH_VERSION}", "TORCH_INDEX": PYPI,
                   "DEEPSPEED_FUSED_ADAM": "0", "BUILD_SYSTEM_PACKAGES": "gcc libc6-dev",
                   "SYSTEM_PACKAGES": "gcc g++ libc6-dev"}),
    ]


def context_files(dockerfile: str) -> list[str]:
    """Files of the build context the builder receives (.dockerignore applied, as the SDK does)."""
    ignore = REPO / ".dockerignore"
    patterns = [line.strip() for line in ignore.read_text().splitlines()
                if line.strip() and not line.startswith("#")] if ignore.exists() else []
    return sorted(p for p in exclude_paths(str(REPO), patterns, dockerfile=dockerfile)
                  if (REPO / p).is_file())


def content_hash(spec: ImageSpec, base_ids: Iterable[str]) -> str:
    """Hash of everything a build reads: the Dockerfile, its arguments, its bases, its context."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"dockerfile": spec.dockerfile, "args": dict(spec.buildargs),
                              "bases": sorted(base_ids)}, sort_keys=True).encode())
    digest.update((REPO / spec.dockerfile).read_bytes())
    for rel in context_files(spec.dockerfile):
        digest.update(rel.encode() + b"\0")
        digest.update(hashlib.sha256((REPO / rel).read_bytes()).digest())
    return digest.hexdigest()[:24]


def _base_ids(client: docker.DockerClient, bases: Bases) -> list[str]:
    return [client.images.get(ref).id for ref in (bases.python, bases.beam_sdk)]


def _stream_build(client: docker.DockerClient, spec: ImageSpec, labels: dict[str, str],
                  nocache: bool) -> None:
    """Run one build, printing its log lines as they come (a cold build takes minutes)."""
    tail: list[str] = []
    for chunk in client.api.build(path=str(REPO), dockerfile=spec.dockerfile, tag=spec.ref,
                                  buildargs=dict(spec.buildargs), labels=labels, rm=True,
                                  forcerm=True, pull=False, nocache=nocache, decode=True,
                                  network_mode=BUILD_NETWORK, timeout=3600):
        text = chunk.get("stream", "")
        for line in text.splitlines():
            if line.strip():
                print(f"[{spec.name}] {line}", flush=True)
                tail = (tail + [line])[-40:]
        if "error" in chunk:
            detail = "\n".join(tail)
            raise BuildError(f"{spec.name} ({spec.dockerfile}) failed: {chunk['error']}\n{detail}")


def build_one(client: docker.DockerClient, spec: ImageSpec, bases: Bases,
              *, nocache: bool = False) -> str:
    """Build `spec` unless an image with the same content hash is already tagged; return its ref."""
    wanted = content_hash(spec, _base_ids(client, bases))
    try:
        previous = client.images.get(spec.ref)
    except docker.errors.ImageNotFound:
        previous = None
    if previous is not None and not nocache and previous.labels.get(CONTENT_LABEL) == wanted:
        print(f"[{spec.name}] up to date: {spec.ref} ({CONTENT_LABEL}={wanted})")
        return spec.ref
    started = time.monotonic()
    print(f"[{spec.name}] building {spec.ref} from {spec.dockerfile} "
          f"(args: {' '.join(f'{k}={v}' for k, v in spec.buildargs.items())})", flush=True)
    _stream_build(client, spec, {CONTENT_LABEL: wanted}, nocache)
    built = client.images.get(spec.ref)
    print(f"[{spec.name}] built {spec.ref} in {time.monotonic() - started:.0f} s, "
          f"{built.attrs['Size'] / 1e6:.0f} MB")
    if previous is not None and previous.id != built.id:
        _remove_replaced(client, spec, previous.id)
    return spec.ref


def _remove_replaced(client: docker.DockerClient, spec: ImageSpec, image_id: str) -> None:
    """Delete the image this build replaced (now untagged: several GB for beam and trainer), so
    that rebuilds do not fill the disk; one still used by a container or a tag stays."""
    try:
        client.images.remove(image_id)
        print(f"[{spec.name}] removed the image it replaced ({image_id[:19]})")
    except docker.errors.APIError as err:
        log.warning("%s: the replaced image %s stays: %s", spec.name, image_id[:19], err)


def build_all(names: Iterable[str] | None = None, *, nocache: bool = False) -> dict[str, str]:
    """Build (or find up to date) the images; {name: image reference}."""
    client = ensure_engine()
    bases = ensure_bases(client, rebuild=nocache)
    specs = image_specs(bases)
    chosen = set(names) if names else {s.name for s in specs}
    unknown = chosen - {s.name for s in specs}
    if unknown:
        raise BuildError(f"unknown image(s) {sorted(unknown)}; known: {[s.name for s in specs]}")
    return {s.name: build_one(client, s, bases, nocache=nocache) for s in specs if s.name in chosen}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.images.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="images to build (default: all three)")
    parser.add_argument("--no-cache", action="store_true",
                        help="cold build: remake the stand-in bases and every layer")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    started = time.monotonic()
    try:
        refs = build_all(args.names or None, nocache=args.no_cache)
    except Exception as err:  # noqa: BLE001 - the CLI prints the reason and exits non-zero
        print(f"make images: {err}", file=sys.stderr)
        return 1
    for name, ref in refs.items():
        print(f"{name}: {ref}")
    print(f"images ready in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
