"""The search policy's solve rate per mutation family on real projects, task by task.

    .venv/bin/python benchmarks/solve_rates.py                      # all families, 3 projects
    .venv/bin/python benchmarks/solve_rates.py --family body_removal --tasks /tmp/tasks.json

The tasks are the ones the trajectory step rolls out (``benchmarks/rollouts.py --tasks-per-repo
20``): the same PyPI sdists, the same candidate sampling (:func:`candidate_tasks` with the step's
seed 0 and its oversampling), validated in the sandbox, the step's 4 held-out tasks per project
set aside and 20 selected per project by :func:`cwm_beam.trajectories.select_for_repository`.
Each task gets one episode of the built-in search policy (30 turns, the benchmark's budget) in
a fresh sandboxed copy, graded by the task's tests, without the Beam runner around it, so one
family can be rerun alone. ``--tasks FILE`` caches the validated tasks (written if missing).
Prints every episode (family, mutation, solved, turns) and the per-family table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from cwm_beam.trajectories import OVERSAMPLE, select_for_repository
from cwm_exec import sandbox
from cwm_forager.env import Environments
from cwm_forager.mutations import FAMILIES
from cwm_forager.policies import SearchRepairPolicy
from cwm_forager.repos import RepoSource, fetch
from cwm_forager.rollout import run_episode
from cwm_forager.tasks import Task, candidate_tasks, validate_task

PROJECTS = ("toolz==1.0.0", "cachetools==5.5.0", "inflection==0.5.1")
TASKS, HELD_OUT, SEED = 20, 4, 0  # the trajectory step's defaults (TrajectoryDataSpec)

_envs: Environments | None = None


def _environments() -> Environments:
    global _envs  # one set of prepared repositories per worker process
    if _envs is None:
        _envs = Environments(sandbox.Limits(), prefix="cwm-solve-rates-")
    return _envs


def tasks_for(project: str) -> list[dict[str, Any]]:
    """The project's rolled-out tasks, as the trajectory step selects them."""
    spec = {"pypi": project}
    env = _environments().get(spec)
    candidates = candidate_tasks(env, FAMILIES, OVERSAMPLE * (TASKS + HELD_OUT), SEED)
    valid = [t for t in (validate_task(env, c) for c in candidates) if isinstance(t, Task)]
    items = [{"repository": spec, "task": t.to_json()} for t in valid]
    return [i for i in select_for_repository((project, items), FAMILIES, TASKS, HELD_OUT)
            if isinstance(i, dict)]


def episode(item: dict[str, Any], max_turns: int) -> dict[str, Any]:
    task = Task.from_json(item["task"])
    start = time.monotonic()
    trajectory = run_episode(_environments().get(item["repository"]), task, SearchRepairPolicy(),
                             max_turns, seed=SEED)
    meta = trajectory.meta
    return {"task_id": task.task_id, "family": task.family, "mutation": task.description,
            "function": task.function, "success": meta["success"], "turns": meta["turns"],
            "stop": meta["stop"], "seconds": round(time.monotonic() - start, 1),
            **({"messages": trajectory.messages} if not meta["success"] else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", action="append", default=None)
    parser.add_argument("--family", action="append", default=None)
    parser.add_argument("--tasks", type=Path, default=None, help="validated tasks cache (JSON)")
    parser.add_argument("--max-turns", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write every episode here")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.WARNING)
    repos = args.repo or list(PROJECTS)
    # the workers' prepared repositories live under one folder, removed at the end (a pool's
    # workers exit without running atexit handlers)
    tempfile.tempdir = scratch = tempfile.mkdtemp(prefix="cwm-solve-rates-")
    try:
        run(args, repos)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(args: argparse.Namespace, repos: list[str]) -> None:
    if args.tasks and args.tasks.exists():
        items = json.loads(args.tasks.read_text())
    else:
        for repo in repos:
            fetch(RepoSource(pypi=repo))
        with ProcessPoolExecutor(args.workers) as pool:
            items = [i for batch in pool.map(tasks_for, repos) for i in batch]
        if args.tasks:
            args.tasks.write_text(json.dumps(items))
    items = [i for i in items if i["repository"]["pypi"] in repos
             and (not args.family or i["task"]["family"] in args.family)]
    start = time.monotonic()
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(episode, items, [args.max_turns] * len(items)))
    rows: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in results:
        rows[r["family"]][0] += r["success"]
        rows[r["family"]][1] += 1
        print(f"{'SOLVED' if r['success'] else 'failed'}  {r['family']:22} {r['turns']:3} turns "
              f"{r['seconds']:6.1f}s  {r['task_id']}  {r['function']}: {r['mutation']}")
    print(f"\n{len(results)} episodes in {time.monotonic() - start:.0f}s "
          f"(cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f})")
    for family in FAMILIES:
        if family in rows:
            solved, total = rows[family]
            print(f"  {family:22} {solved}/{total} = {solved / total:.0%}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
