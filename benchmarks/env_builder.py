"""Environment builder (cwm_forager.envbuild) on real PyPI sdists with dependencies and test suites.

    CWM_CACHE=$HOME/.cache/cwm .venv/bin/python benchmarks/env_builder.py --json /tmp/envbuild.jsonl
    .venv/bin/python benchmarks/env_builder.py --repo 'freezegun==1.5.1'         # one project

For each project: fetch the sdist (cached), read its declared dependencies, resolve them from
wheels only (PyPI uploads before ``--before``, so the pins do not drift), install them into the
venv for that resolved set (cached under ``$CWM_CACHE/envs``; ``env reused`` says when an earlier
run built it), and run its suite once in the sandbox exactly as the trajectories step does
(:class:`cwm_forager.env.RepoEnvironment` with ``dependencies=True``). A project succeeds when
the build reaches ``done``: at least one test passes on the pristine tree (the passing tests are
the environment's suite; the failing ones are recorded and left out, as for every repository).
Acceptance (issue 22): at least 7 of the 10+ projects succeed.

``--tasks N`` then uses each built environment as the trajectories step would: synthesise and
validate up to N mutate-fix tasks, run one built-in search-policy episode (30 turns) per task,
and record how many were validated and solved.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from cwm_exec.sandbox import Limits
from cwm_forager.env import RepoEnvironment
from cwm_forager.policies import SearchRepairPolicy
from cwm_forager.repos import RepositoryError, RepoSource
from cwm_forager.rollout import run_episode
from cwm_forager.tasks import synthesize_tasks

# Pure-Python projects whose sdists carry their tests and whose dependencies publish wheels.
PROJECTS = (
    "freezegun==1.5.1",
    "Jinja2==3.1.4",
    "Flask==3.0.3",
    "python-dateutil==2.9.0.post0",
    "jsonschema==4.23.0",
    "referencing==0.35.1",
    "bleach==6.1.0",
    "beautifulsoup4==4.12.3",
    "marshmallow==3.21.3",
    "environs==11.0.0",
    "arrow==1.3.0",
    "glom==23.5.0",
    "markdown-it-py==3.0.0",
    "Deprecated==1.2.14",
)
LIMITS = Limits(wall_seconds=120, cpu_seconds=120, memory_mb=4096, output_bytes=8 << 20,
                processes=256)


def build_one(pin: str, before: str, suite_seconds: float, tasks: int = 0) -> dict:
    """One project's build record (``envbuild.BuildResult.to_json`` plus the total time)."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cwm-envbench-") as work:
        env = RepoEnvironment(RepoSource(pypi=pin), limits=LIMITS, workroot=Path(work),
                              suite_seconds=suite_seconds, dependencies=True,
                              resolve_before=before)
        error, episodes = None, None
        try:
            env.prepare()
            episodes = work_tasks(env, tasks) if tasks else None
        except RepositoryError as err:
            error = str(err)
        finally:
            env.close()
    record = env.build.to_json() if env.build is not None else {
        "repository": pin, "stage": "fetch", "ok": False}
    if error and not record.get("error"):
        record["error"] = error
    record["pin"], record["total_seconds"] = pin, round(time.monotonic() - start, 1)
    if episodes is not None:
        record["tasks"] = episodes
    return record


def work_tasks(env: RepoEnvironment, n: int) -> dict:
    """Validated mutate-fix tasks in a built environment and the search policy's episodes."""
    tasks = synthesize_tasks(env, n=n, seed=0)
    solved = [run_episode(env, task, SearchRepairPolicy(), max_turns=30,
                          action_timeout=20).success() for task in tasks]
    return {"validated": len(tasks), "solved": sum(solved),
            "families": sorted(task.family for task in tasks)}


def table(records: list[dict]) -> str:
    rows = ["| project | stage | pins | tests passed / failed | env reused | time (s) | why not |",
            "|---|---|---|---|---|---|---|"]
    for r in records:
        why = (r.get("error") or r.get("test_reason") or "").replace("\n", " ").replace("|", "/")
        rows.append(f"| {r['pin']} | {r['stage']} | {len(r.get('pins', []))} | "
                    f"{r.get('tests_passed', 0)} / {r.get('tests_failed', 0)} | "
                    f"{r.get('env_reused', False)} | {r['total_seconds']} | {why[:160]} |")
    ok = sum(r["ok"] for r in records)
    rows.append(f"\n{ok} of {len(records)} environments built and their suites passing "
                "(stage done).")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", action="append", default=None,
                        help="a 'name==version' pin (repeatable); default: the built-in list")
    parser.add_argument("--before", default="2026-12-01T00:00:00Z",
                        help="resolve from PyPI uploads before this ISO 8601 date")
    parser.add_argument("--suite-seconds", type=float, default=600.0)
    parser.add_argument("--json", default=None, help="append one JSON record per project here")
    parser.add_argument("--tasks", type=int, default=0,
                        help="then synthesise up to N tasks per environment and run episodes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    records = []
    for pin in args.repo or PROJECTS:
        record = build_one(pin, args.before, args.suite_seconds, args.tasks)
        records.append(record)
        print(f"{pin}: {record['stage']} passed={record.get('tests_passed', 0)} "
              f"failed={record.get('tests_failed', 0)} {record['total_seconds']}s "
              f"{record.get('tasks', '')}", flush=True)
        if args.json:
            with open(args.json, "a", encoding="utf-8") as out:
                out.write(json.dumps(record) + "\n")
    print(table(records))


if __name__ == "__main__":
    main()
