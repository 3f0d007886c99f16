"""Issue-fix tasks from real release histories through the trajectories step
(``spec.data.trajectories.issueFix``): per project, the commits scanned, fix commits, functions
tried, tasks validated by execution, episodes and how many the configured policy solved, as the
data set's manifest reports them (``stats.issue_fix``), and the issue_fix records in ``train``.

    .venv/bin/python benchmarks/issue_fix_history.py                      # the default projects
    .venv/bin/python benchmarks/issue_fix_history.py --project toolz 0.12.0 0.12.1 1.0.0 \\
        --repo toolz==1.0.0 --workers 2

Each project's successive PyPI sdists become one commit each (``release_repository``); the step
validates every task in the sandbox and rolls out each selected one with the policy (the built-in
search policy by default), beside the mutate-fix tasks of ``--repo`` (whose held-out tasks'
functions the issue-fix tasks must avoid). Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from cwm_beam import trajectories
from cwm_forager.history import FAMILY
from cwm_spec import artifacts

PROJECTS = {"cachetools": ["5.3.3", "5.4.0", "5.5.0"],
            "more-itertools": ["10.2.0", "10.3.0"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--project", nargs="+", action="append", metavar=("NAME", "VERSION"),
                        help="a project and two or more versions, oldest first (repeatable)")
    parser.add_argument("--repo", action="append", default=None,
                        help="mutate-fix repositories beside them (default cachetools==5.5.0)")
    parser.add_argument("--max-turns", type=int, default=32)
    parser.add_argument("--tasks", type=int, default=30, help="issue-fix tasks per project")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    projects = {p[0]: p[1:] for p in args.project} if args.project else PROJECTS
    argv = [f for name, versions in projects.items()
            for f in ("--history", f"{name}=={','.join(versions)}")]
    for repo in args.repo or ["cachetools==5.5.0"]:
        argv += ["--repo", repo]
    with tempfile.TemporaryDirectory(prefix="cwm-history-bench-") as tmp:
        out = str(Path(tmp) / "ds")
        start = time.monotonic()
        stats = trajectories.run([*argv, "--tasks-per-repo", "2", "--held-out-tasks", "2",
                                  "--issue-fix-tasks", str(args.tasks), "--max-turns",
                                  str(args.max_turns), "--workers", str(args.workers),
                                  "--output", out])
        seconds = time.monotonic() - start
        manifest = artifacts.verify(out)
        records = [r for r in artifacts.iter_records(out, "train")
                   if r["meta"]["family"] == FAMILY]
    print(json.dumps({"issue_fix": manifest.stats["issue_fix"],
                      "solve_rate_by_family": manifest.stats["solve_rate_by_family"],
                      "rejected": manifest.stats["rejected"],
                      "deadletter_reasons": manifest.stats["deadletter_reasons"],
                      "issue_fix_train_records": len(records), "seconds": round(seconds, 1)}))
    print("| project | releases | commits scanned | fix commits | functions tried | validated "
          "| excluded (held out) | episodes | solved | rate |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, row in manifest.stats["issue_fix"].items():
        print(f"| {name} | {' -> '.join(projects[name])} | {row['commits_scanned']} "
              f"| {row['fix_commits']} | {row['tasks_found']} | {row['validated']} "
              f"| {row['excluded_for_evaluation']} | {row['episodes']} | {row['solved']} "
              f"| {row['rate']} |")
    print(f"issue_fix records in train: {len(records)} "
          f"(family solve rate {stats['solve_rate_by_family'].get(FAMILY)}); {seconds:.0f} s")


if __name__ == "__main__":
    main()
