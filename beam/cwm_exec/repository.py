"""Repository-level traces: run a repository's pytest suite under the tracer, sandboxed, and cut
it into per-function episodes (CWM's repository traces).

    python -m cwm_beam.traces --source repository:path/to/repo --output /tmp/traces

The repository (a local folder, or a git URL cloned with ``git clone --depth 1``) is copied into a
private folder; ``pytest`` runs there through :func:`cwm_exec.sandbox.run_command` (time, memory,
process and output limits; bubblewrap where available) with :mod:`cwm_exec.repo_trace_plugin`
loaded. Every call a test makes directly into a function of the repository becomes an episode:
the entry's module source is the context (its ``def`` line marked), callees in the repository are
stepped into up to ``depth`` levels with probability ``stepInProbability``.

Source options (keys of the ``repository`` source; ``TraceSource`` in the CRD has only ``uri``
and ``count`` today, so the others apply to standalone runs and default otherwise)::

    {"kind": "repository", "uri": "...", "count": 200,        # episodes in all (default 1000)
     "depth": 2, "stepInProbability": 0.5,                     # TraceLimits.max_depth / step_in
     "perFunction": 3, "timeoutSeconds": 300}                  # episodes per function; pytest

Records have the schema of the other sources (``code`` is the entry's module source, ``entry`` its
qualified name, ``input`` the call's arguments as ``name=repr``) plus ``repository``, ``path`` and
``test``; truncated episodes, a failed run and a suite that calls no repository function become
dead letters with reasons.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from cwm_exec.sandbox import PACKAGE_PARENT, Limits, default_env, run_command
from cwm_exec.tracer import TraceLimits, TraceResult

_IGNORED = shutil.ignore_patterns(".git", "__pycache__", "*.pyc", ".pytest_cache", ".tox",
                                  ".venv", "venv", "node_modules")


class RepositoryError(RuntimeError):
    """The repository could not be fetched (no such folder, clone failed)."""


def fetch(uri: str, destination: Path) -> Path:
    """Copy a local repository folder, or ``git clone --depth 1`` a git URL (``file://``,
    ``https://``, ``ssh://``, ``git@``, ``*.git``), into ``destination`` (without ``.git``)."""
    local = Path(uri).expanduser()
    if local.is_dir():
        shutil.copytree(local, destination, ignore=_IGNORED, symlinks=True)
        return destination
    if not _is_git_url(uri):
        raise RepositoryError(f"repository source uri {uri!r}: no such folder, and not a git URL")
    done = subprocess.run(["git", "clone", "--quiet", "--depth", "1", uri, str(destination)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    if done.returncode != 0:
        raise RepositoryError(f"git clone {uri!r} failed: {done.stderr.strip()[-500:]}")
    shutil.rmtree(destination / ".git", ignore_errors=True)
    return destination


def _is_git_url(uri: str) -> bool:
    return uri.startswith(("file://", "http://", "https://", "git@", "ssh://", "git://")) or \
        uri.endswith(".git")


def limits_for(source: dict[str, Any], base: TraceLimits) -> TraceLimits:
    """The source's depth and step-in probability over the data set's trace limits."""
    return replace(base, max_depth=int(source.get("depth", base.max_depth)),
                   step_in_probability=float(source.get("stepInProbability",
                                                        base.step_in_probability)))


def run_suite(repo: Path, limits: TraceLimits, sandbox: Limits, *, per_function: int,
              max_episodes: int, timeout: float) -> tuple[list[dict], str | None]:
    """Run the suite in the sandbox; the episodes (JSON) and, if the run did not finish
    normally, why (pytest's exit status 1, failing tests, is normal: episodes are data)."""
    out = repo / ".cwm-episodes.jsonl"
    env = default_env({
        "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "src"), PACKAGE_PARENT]),
        "CWM_EPISODES": str(out), "CWM_TRACE_ROOT": str(repo),
        "CWM_TRACE_LIMITS": json.dumps(limits.to_json()),
        "CWM_PER_FUNCTION": str(per_function), "CWM_MAX_EPISODES": str(max_episodes)})
    run_limits = replace(sandbox, wall_seconds=timeout, cpu_seconds=timeout)
    result = run_command([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-p", "cwm_exec.repo_trace_plugin", "-o", "addopts="],
                         cwd=repo, limits=run_limits, env=env)
    episodes: list[dict] = []
    problem = None
    # The file is written inside the sandbox by the suite's own process: read it as untrusted,
    # within a byte budget (every episode within max_bytes, JSON and frames at most ~4x that).
    budget = max_episodes * (4 * limits.max_bytes + 4096)
    if out.exists():
        with out.open("rb") as stream:
            for line in stream:
                budget -= len(line)
                if budget < 0:
                    problem = f"episodes file larger than {max_episodes} episodes can be"
                    break
                try:
                    episodes.append(json.loads(line))
                except ValueError:   # the last line of a run killed mid-write
                    continue
    if problem is None and result.reason is not None:
        problem = f"pytest run stopped: {result.reason}"
    elif problem is None and result.returncode not in (0, 1):
        tail = (result.stdout + result.stderr).decode(errors="replace").strip()[-1500:]
        problem = f"pytest exited with status {result.returncode}: {tail}"
    return episodes, problem


def episode_record(episode: dict[str, Any], uri: str, index: int) -> dict[str, Any]:
    """An episode as a trace record (without ``program_hash``, added by the pipeline)."""
    result = TraceResult.from_json(episode["result"])
    first = result.frames[0].locals or {} if result.frames else {}
    name = Path(uri.rstrip("/")).name.removesuffix(".git") or "repository"
    return {"id": f"repository/{name}/{episode['path']}:{episode['entry']}#{index}",
            "source": "repository", "code": episode["source"].replace("  # << START_OF_TRACE",
                                                                      "", 1),
            "entry": episode["entry"],
            "input": ", ".join(f"{k}={v}" for k, v in first.items()),
            "_result": result.to_json(), "repository": uri, "path": episode["path"],
            "test": episode["test"]}


def trace_repository(source: dict[str, Any], trace_limits: TraceLimits,
                     sandbox: Limits) -> Iterator[dict[str, Any]]:
    """Programs with their ``_result`` (as ``TraceProgram`` yields them), or
    ``{"_deadletter": ...}`` when the repository cannot be traced."""
    uri = str(source["uri"])
    origin = {"id": f"repository:{uri}", "source": "repository"}
    with tempfile.TemporaryDirectory(prefix="cwm-repo-") as work:
        try:
            repo = fetch(uri, Path(work) / "repo")
        except (RepositoryError, OSError, subprocess.TimeoutExpired) as err:
            yield {"_deadletter": {**origin, "stage": "read", "reason": "repository not fetched",
                                   "detail": str(err)[:2000]}}
            return
        episodes, problem = run_suite(
            repo, limits_for(source, trace_limits), sandbox,
            per_function=int(source.get("perFunction", 3)),
            max_episodes=int(source.get("count") or 1000),
            timeout=float(source.get("timeoutSeconds", max(300.0, sandbox.wall_seconds))))
    if problem:
        yield {"_deadletter": {**origin, "stage": "trace", "reason": problem.split(":")[0],
                               "detail": problem[:2000]}}
    if not episodes and not problem:
        yield {"_deadletter": {**origin, "stage": "trace",
                               "reason": "no test called a repository function"}}
    for index, episode in enumerate(episodes):
        try:
            yield episode_record(episode, uri, index)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
            yield {"_deadletter": {**origin, "id": f"{origin['id']}#{index}", "stage": "read",
                                   "reason": "malformed episode",
                                   "detail": f"{type(err).__name__}: {err}"[:2000]}}
