"""Small container images for the test node, made locally from files on this machine.

No container registry can be reached here, so the node's own images are assembled from binaries
that are already on disk: the pause binary (node/pause.c, `gcc -static`), Debian's static busybox
(the test pods' shell, wget, httpd, nc) and CoreDNS (built by build.sh). Each is one layer in a
Docker-archive tarball (`manifest.json` + config + layer, the format `docker save` writes), which
`ctr images import` loads into the node's containerd. Tarballs are deterministic (fixed mtimes,
sorted entries, uid/gid 0), so an unchanged image keeps its digest and is not imported again.

Building is pure (`image_archive` returns bytes from a list of entries); only `write_archive`
touches the disk.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

#: The non-root user every test image runs as by default (Pod Security "restricted" wants one).
NONROOT_UID = 65532


@dataclass(frozen=True)
class Entry:
    """One path in an image: a regular file copied from `source`, a symlink, or a directory."""

    path: str
    source: Path | None = None
    symlink: str | None = None
    mode: int = 0o755


@dataclass(frozen=True)
class ImageSpec:
    """What to put in an image and how it starts (the config's Entrypoint/Cmd/User)."""

    name: str
    entries: tuple[Entry, ...]
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    user: str = ""


def _layer(entries: tuple[Entry, ...]) -> bytes:
    """An uncompressed tar layer with fixed metadata, entries sorted by path."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in sorted(entries, key=lambda e: e.path):
            info = tarfile.TarInfo(entry.path.lstrip("/"))
            info.mtime, info.uid, info.gid, info.mode = 0, 0, 0, entry.mode
            if entry.symlink is not None:
                info.type, info.linkname = tarfile.SYMTYPE, entry.symlink
                tar.addfile(info)
            elif entry.source is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                data = entry.source.read_bytes()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _config(spec: ImageSpec, layer_digest: str) -> bytes:
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": list(spec.entrypoint) or None,
            "Cmd": list(spec.cmd) or None,
            "User": spec.user,
            "Env": ["PATH=/bin"],
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created_by": "tests/controlplane/nodeimages.py"}],
    }
    return json.dumps(config, sort_keys=True).encode()


def image_archive(spec: ImageSpec) -> tuple[bytes, str]:
    """(Docker-archive tarball, image id) for `spec`; the same spec always gives the same bytes."""
    layer = _layer(spec.entries)
    layer_digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = _config(spec, layer_digest)
    image_id = hashlib.sha256(config).hexdigest()
    manifest = [{"Config": f"{image_id}.json", "RepoTags": [spec.name], "Layers": [f"{image_id}/layer.tar"]}]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in ((f"{image_id}.json", config), (f"{image_id}/layer.tar", layer),
                           ("manifest.json", json.dumps(manifest).encode())):
            info = tarfile.TarInfo(name)
            info.mtime, info.size, info.mode = 0, len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), "sha256:" + image_id


def write_archive(spec: ImageSpec, folder: Path) -> tuple[Path, str]:
    """Write `spec`'s archive under `folder` (named by its id) and return (path, image id)."""
    data, image_id = image_archive(spec)
    path = folder / f"{image_id.split(':')[1][:16]}.tar"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        tmp.write_bytes(data)
        tmp.rename(path)
    return path, image_id


# ----- the node's images --------------------------------------------------------------------

def pause_image(name: str, pause_binary: Path) -> ImageSpec:
    """The pod sandbox image: only the static pause binary (containerd's `sandbox_image`)."""
    return ImageSpec(name, (Entry("pause", pause_binary),), entrypoint=("/pause",), user=str(NONROOT_UID))


def busybox_applets(busybox: Path) -> list[str]:
    """The applets this busybox build provides (`busybox --list`)."""
    done = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True)
    return sorted(a for a in done.stdout.split() if a and "/" not in a)


def busybox_image(name: str, busybox: Path, applets: list[str]) -> ImageSpec:
    """A shell image for test pods: static busybox at /bin/busybox, one symlink per applet, a
    writable /tmp (pods mount an emptyDir there when the root filesystem is read-only)."""
    entries = [Entry("bin", mode=0o755), Entry("bin/busybox", busybox), Entry("tmp", mode=0o1777)]
    entries += [Entry(f"bin/{a}", symlink="busybox") for a in applets if a != "busybox"]
    return ImageSpec(name, tuple(entries), cmd=("/bin/sh",), user=str(NONROOT_UID))


def coredns_image(name: str, coredns: Path) -> ImageSpec:
    """CoreDNS as built by build.sh, alone in the image; the Corefile comes from a ConfigMap."""
    return ImageSpec(name, (Entry("coredns", coredns),), entrypoint=("/coredns",), user=str(NONROOT_UID))
