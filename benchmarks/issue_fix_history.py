"""Issue-fix tasks mined from real release histories (cwm_forager.history): per project, the
commits scanned, fix commits, reverted functions tried, tasks validated by execution, and how
many the built-in search policy solves (one episode each).

    .venv/bin/python benchmarks/issue_fix_history.py                      # the default projects
    .venv/bin/python benchmarks/issue_fix_history.py --project toolz 0.12.0 0.12.1 1.0.0

Each project's successive PyPI sdists become one commit each (release_repository); mining runs
every task in the sandbox like the trajectories step does. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from cwm_forager.history import mine_repository, release_repository
from cwm_forager.policies import SearchRepairPolicy

PROJECTS = {"cachetools": ["5.3.3", "5.4.0", "5.5.0"],
            "more-itertools": ["10.2.0", "10.3.0"],
            "toolz": ["0.12.0", "0.12.1", "1.0.0"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--project", nargs="+", action="append", metavar=("NAME", "VERSION"),
                        help="a project and two or more versions, oldest first (repeatable)")
    parser.add_argument("--max-turns", type=int, default=32)
    args = parser.parse_args()
    projects = {p[0]: p[1:] for p in args.project} if args.project else PROJECTS
    rows = []
    with tempfile.TemporaryDirectory(prefix="cwm-history-bench-") as tmp:
        for name, versions in projects.items():
            start = time.monotonic()
            repo = release_repository(name, versions, Path(tmp) / name)
            report = mine_repository(repo, policy=SearchRepairPolicy(),
                                     max_turns=args.max_turns)
            row = report.summary() | {"versions": " -> ".join(versions),
                                      "seconds": round(time.monotonic() - start, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("| project | releases | commits scanned | fix commits | functions tried | validated "
          "| solved (search policy) | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['repo']} | {r['versions']} | {r['commits_scanned']} | {r['fix_commits']} "
              f"| {r['tasks_found']} | {r['validated']} | {r['solved']} | {r['seconds']} |")


if __name__ == "__main__":
    main()
