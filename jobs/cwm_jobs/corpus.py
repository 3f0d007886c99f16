"""The local pretraining corpus: Python source files already on this machine, no download.

``python -m cwm_jobs.corpus --config step.json`` (or ``$CWM_STEP_CONFIG``) writes a data set of
kind ``code`` (records ``{"text", "path", "sha256"}``) to ``outputs.dataset`` from the ``.py``
files of the Python standard library and of the installed packages (``site-packages``), or of
the folder ``spec.uri`` names. Files are visited in an order seeded by their path hash, so a
capped corpus (``maxFiles``, ``maxBytes``) samples every package rather than the alphabetically
first; exact duplicates (same text after stripping trailing whitespace) are kept once; files that
are not UTF-8, empty or over 1 MB (generated tables) are skipped and counted.

Licences: the files are used as they are installed, under their own licences (the PSF licence for
the standard library, each package's for the rest, recorded by ``path``). The corpus stays a
local training artifact of the pipeline and is never redistributed; training on it is the
licence-agnostic use this step makes. On a cluster, ``spec.data.corpus.uri`` points at any data
set of kind ``code`` instead, and this step does not run.

When a stage mixes in rehearsal and ``spec.data.rehearsal.uri`` is not set, the plan also asks
this step for ``outputs.rehearsal``: the general-text data set of :mod:`cwm_jobs.rehearsal`,
a data set of its own (never mixed into the corpus, which leaves its source out).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import sysconfig
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cwm_jobs.rehearsal import build_rehearsal, documentation_topics
from cwm_spec.api import CorpusSpec
from cwm_spec.artifacts import Manifest, write_manifest, write_shard
from cwm_spec.stepconfig import load_step_config, read_section

LOG = logging.getLogger("cwm_jobs.corpus")
MAX_FILE_BYTES = 1_000_000
SHARD_BYTES = 16_000_000
VALIDATION_PER_MILLE = 10  # 1% held out, by content hash
# pydoc_data: the documentation text the rehearsal data set is made of (cwm_jobs.rehearsal), kept
# out so the two sources share no file; fixture_repos: the bundled mutate-fix repositories, whose
# functions are evaluation programs (installed with cwm_forager in a non-editable install).
SKIP_DIRS = {"__pycache__", ".git", "node_modules", "pydoc_data", "fixture_repos"}


@dataclass(frozen=True)
class Root:
    label: str  # how paths are recorded: "stdlib/json/decoder.py"
    path: Path


def default_roots() -> list[Root]:
    """The standard library and every site-packages folder of this interpreter."""
    paths = sysconfig.get_paths()
    roots = [Root("stdlib", Path(paths["stdlib"]))]
    for key in ("purelib", "platlib"):
        path = Path(paths[key])
        if path.is_dir() and all(r.path != path for r in roots):
            roots.append(Root("site-packages", path))
    return [r for r in roots if r.path.is_dir()]


def list_sources(roots: Sequence[Root]) -> Iterator[tuple[str, Path]]:
    """``(recorded path, file)`` for every ``.py`` file under the roots (site-packages folders
    nested inside the standard library are left to their own root)."""
    nested = {r.path.resolve() for r in roots}
    for root in roots:
        for folder, dirs, files in os.walk(root.path):
            here = Path(folder)
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")
                             and (here / d).resolve() not in nested)
            for name in sorted(files):
                if name.endswith(".py"):
                    path = here / name
                    yield f"{root.label}/{path.relative_to(root.path).as_posix()}", path


def visiting_order(entries: Iterable[tuple[str, Path]], seed: int) -> list[tuple[str, Path]]:
    """Entries sorted by a seeded hash of their recorded path: a stable pseudo-random sample."""
    key = lambda e: hashlib.sha256(f"{seed}:{e[0]}".encode()).hexdigest()  # noqa: E731
    return sorted(entries, key=key)


def normalized_digest(text: str) -> str:
    body = "\n".join(line.rstrip() for line in text.strip().splitlines())
    return hashlib.sha256(body.encode()).hexdigest()


def collect(entries: Sequence[tuple[str, Path]], *, max_files: int, max_bytes: int,
            stats: Counter) -> list[dict[str, Any]]:
    """Read files in order until a cap is reached, skipping duplicates and unusable files."""
    seen: set[str] = set()
    records: list[dict[str, Any]] = []
    total = 0
    for recorded, path in entries:
        if len(records) >= max_files or total >= max_bytes:
            break
        stats["files_considered"] += 1
        try:
            size = path.stat().st_size
            if size == 0 or size > MAX_FILE_BYTES:
                stats["skipped_size"] += 1
                continue
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            stats["skipped_not_utf8"] += 1
            continue
        except OSError:
            stats["skipped_unreadable"] += 1
            continue
        if not text.strip() or "\x00" in text:
            stats["skipped_size"] += 1
            continue
        digest = normalized_digest(text)
        if digest in seen:
            stats["duplicates"] += 1
            continue
        seen.add(digest)
        records.append({"text": text, "path": recorded, "sha256": digest})
        total += len(text.encode())
    stats["files"] = len(records)
    stats["bytes"] = total
    return records


def split_records(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Hold out ~1% by content hash (at least one file once there are 20)."""
    train: list[dict[str, Any]] = []
    validation: list[dict[str, Any]] = []
    for r in records:
        (validation if int(r["sha256"][:8], 16) % 1000 < VALIDATION_PER_MILLE else train).append(r)
    if not validation and len(records) >= 20:
        validation.append(train.pop())
    return {"train": train, "validation": validation}


def write_dataset(uri: str, splits: dict[str, list[dict[str, Any]]], stats: Counter,
                  extra_stats: dict[str, Any]) -> Manifest:
    manifest = Manifest(kind="code", stats={**dict(stats), **extra_stats})
    for split, records in splits.items():
        size = sum(len(r["text"]) for r in records)
        count = max(1, min(64, size // SHARD_BYTES + 1)) if records else 0
        for i in range(count):
            name = f"{split}-{i:05d}-of-{count:05d}.jsonl"
            manifest.splits.setdefault(split, []).append(write_shard(uri, name, records[i::count]))
    write_manifest(uri, manifest)
    return manifest


def build_corpus(out_uri: str, *, roots: Sequence[Root], max_files: int, max_bytes: int,
                 seed: int = 0) -> Manifest:
    stats: Counter = Counter()
    entries = visiting_order(list_sources(roots), seed)
    stats["files_found"] = len(entries)
    records = collect(entries, max_files=max_files, max_bytes=max_bytes, stats=stats)
    if not records:
        folders = ", ".join(str(r.path) for r in roots)
        raise ValueError(f"corpus: no usable .py files under {folders}")
    splits = split_records(records)
    packages = Counter(r["path"].split("/", 2)[1].split(".")[0] if r["path"].startswith("site-")
                       else "stdlib" for r in records)
    extra = {"roots": [f"{r.label}={r.path}" for r in roots], "python": sys.version.split()[0],
             "packages": len(packages),
             "licence": "files keep their own licences (PSF for stdlib); see module docstring"}
    return write_dataset(out_uri, splits, stats, extra)


def main(argv: Sequence[str] | None = None) -> Manifest:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config, _ = load_step_config(argv)
    spec = read_section(CorpusSpec, config["spec"], "spec")
    out = (config.get("outputs") or {}).get("dataset")
    if not out:
        raise ValueError("step configuration: outputs.dataset is required for the corpus step")
    if spec.uri:
        folder = Path(spec.uri)
        if not folder.is_dir():
            raise ValueError(f"spec.uri {spec.uri}: not a local folder of Python sources "
                             "(a data set URI is read directly by the training stages)")
        roots = [Root(folder.name or "src", folder)]
    else:
        roots = default_roots()
    manifest = build_corpus(out, roots=roots, max_files=spec.max_files, max_bytes=spec.max_bytes,
                            seed=int(config.get("seed") or 0))
    LOG.info("corpus: %d train / %d validation files, %s bytes -> %s", manifest.records("train"),
             manifest.records("validation"), manifest.stats["bytes"], out)
    text_out = (config.get("outputs") or {}).get("rehearsal")
    if text_out:   # the plan asks for the rehearsal text beside the corpus (cwm_jobs.rehearsal)
        text = build_rehearsal(text_out, documentation_topics())
        LOG.info("rehearsal: %d train / %d validation sections, %s bytes -> %s",
                 text.records("train"), text.records("validation"), text.stats["bytes"], text_out)
    return manifest


if __name__ == "__main__":
    main()
