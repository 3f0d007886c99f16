"""Where repositories come from: a pinned PyPI source distribution, a local folder, or git.

Fetching is the only network I/O of the trajectory pipeline and happens once per repository:
sdists are downloaded with pip (a package registry's ordinary client) into
``$CWM_CACHE/repos/`` (default ``<project>/.cache/repos``) and unpacked next to it; a second
fetch finds them there.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cwm_forager

FIXTURE_ROOT = Path(__file__).resolve().parent / "fixture_repos"
IGNORED = shutil.ignore_patterns(".git", "__pycache__", "*.pyc", ".tox", ".nox", ".pytest_cache",
                                 "*.egg-info", ".mypy_cache", ".venv", ".cwm-complete")


class RepositoryError(RuntimeError):
    """A repository could not be fetched or is unusable; the message names it."""


@dataclass(frozen=True)
class RepoSource:
    """One repository: exactly one of ``pypi`` ("name==version"), ``path`` or ``git`` (+ ref)."""

    pypi: str | None = None
    path: str | None = None
    git: str | None = None
    ref: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("pypi", "path", "git") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"repository {self}: give exactly one of pypi, path, git")
        if self.pypi and not re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.\-+]+", self.pypi):
            raise ValueError(f"repository pypi {self.pypi!r}: pin it as 'name==version'")

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | str) -> RepoSource:
        """From a ``RepositorySource`` dict; a bare string is a pypi pin, a path or a git URL."""
        if isinstance(spec, str):
            if "==" in spec:
                return cls(pypi=spec)
            if spec.endswith(".git") or "://" in spec:
                return cls(git=spec)
            return cls(path=spec)
        unknown = set(spec) - {"pypi", "path", "git", "ref"}
        if unknown:
            raise ValueError(f"repository {dict(spec)}: unknown field(s) {sorted(unknown)}")
        return cls(**{k: spec.get(k) for k in ("pypi", "path", "git", "ref")})

    @property
    def name(self) -> str:
        """A short stable name: ``toolz-1.0.0``, ``calc``, ``repo@ref``."""
        if self.pypi:
            return self.pypi.replace("==", "-")
        if self.path:
            return Path(self.path).name
        base = self.git.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")  # type: ignore[union-attr]
        return f"{base}@{self.ref}" if self.ref else base

    def to_json(self) -> dict[str, str]:
        return {k: v for k, v in vars(self).items() if v}


def cache_root() -> Path:
    """``$CWM_CACHE/repos``, else ``<project checkout>/.cache/repos``, else ``~/.cache/cwm``."""
    if os.environ.get("CWM_CACHE"):
        return Path(os.environ["CWM_CACHE"]) / "repos"
    project = Path(cwm_forager.__file__).resolve().parents[2]
    if (project / "pyproject.toml").exists():
        return project / ".cache" / "repos"
    return Path.home() / ".cache" / "cwm" / "repos"


def fetch(source: RepoSource, cache: Path | None = None) -> Path:
    """A pristine source tree for ``source`` (downloaded and unpacked at most once)."""
    cache = cache or cache_root()
    if source.path:
        path = Path(source.path)
        if not path.is_absolute() and not path.exists() and (FIXTURE_ROOT / path.name).is_dir():
            path = FIXTURE_ROOT / path.name  # a bundled fixture repository named by its folder
        if not path.is_dir():
            raise RepositoryError(f"repository path {source.path!r}: not a folder")
        return path.resolve()
    if source.pypi:
        return _fetch_sdist(source.pypi, cache)
    return _fetch_git(source.git, source.ref, cache)  # type: ignore[arg-type]


def _fetch_sdist(pin: str, cache: Path) -> Path:
    target = cache / "src" / pin.replace("==", "-")
    if (target / ".cwm-complete").exists():
        return _single_child(target)
    downloads = cache / "sdists"
    downloads.mkdir(parents=True, exist_ok=True)
    name, version = pin.split("==")
    archive = _find_archive(downloads, name, version)
    if archive is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
               "--disable-pip-version-check", "-q", "-d", str(downloads), pin]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        archive = _find_archive(downloads, name, version)
        if done.returncode != 0 or archive is None:
            raise RepositoryError(f"repository pypi {pin!r}: pip download failed: "
                                  f"{(done.stderr or done.stdout).strip()[-500:]}")
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _unpack(archive, tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    (target / ".cwm-complete").write_text(pin + "\n")
    return _single_child(target)


def _find_archive(folder: Path, name: str, version: str) -> Path | None:
    def normal(text: str) -> str:
        return re.sub(r"[-_.]+", "-", text).lower()

    wanted = f"{normal(name)}-{version}"
    for path in sorted(folder.iterdir()):
        for suffix in (".tar.gz", ".zip", ".tar.bz2"):
            stem = path.name[: -len(suffix)] if path.name.endswith(suffix) else None
            if stem and normal(stem.rsplit("-", 1)[0]) + "-" + stem.rsplit("-", 1)[-1] == wanted:
                return path
    return None


def _unpack(archive: Path, dest: Path) -> None:
    """Unpack safely: tar's "data" filter refuses links and paths out of ``dest``."""
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                if member.startswith("/") or ".." in Path(member).parts:
                    raise RepositoryError(f"{archive}: unsafe member {member!r}")
            zf.extractall(dest)
    else:
        with tarfile.open(archive) as tf:
            tf.extractall(dest, filter="data")


def _single_child(folder: Path) -> Path:
    children = [p for p in folder.iterdir() if p.is_dir()]
    return children[0] if len(children) == 1 else folder


def _fetch_git(url: str, ref: str | None, cache: Path) -> Path:
    key = hashlib.sha256(f"{url}@{ref}".encode()).hexdigest()[:16]
    target = cache / "git" / key
    if (target / ".git").is_dir():
        return target
    tmp = target.with_name(key + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    steps = [["git", "clone", "--quiet", url, str(tmp)]]
    if ref:
        steps.append(["git", "-C", str(tmp), "checkout", "--quiet", ref])
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RepositoryError(f"repository git {url!r} (ref {ref!r}): {' '.join(cmd[:3])} "
                                  f"failed: {done.stderr.strip()[-500:]}")
    tmp.rename(target)
    return target


def copy_tree(src: Path, dest: Path) -> None:
    """Copy a source tree without VCS data and caches (the environment's pristine base)."""
    shutil.copytree(src, dest, ignore=IGNORED, symlinks=True)
