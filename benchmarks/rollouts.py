"""ForagerAgent trajectory pipeline: rollouts per minute with 1 and 2 Beam workers, and what the
run produced (validated tasks per project and mutation family, solve rate per family).

    .venv/bin/python benchmarks/rollouts.py --tasks-per-repo 6 --workers 1 2     # speed
    .venv/bin/python benchmarks/rollouts.py --tasks-per-repo 20 --workers 2      # acceptance

Each worker count runs the whole ``python -m cwm_beam.trajectories`` pipeline (prepare the
repositories from their PyPI sdists in the sandbox, synthesise and validate mutate-fix tasks,
one built-in search-policy episode per task with ``--max-turns`` turns, MinHash dedup, shards,
manifest) on the in-process runner with ``--direct_num_workers``. The sdists are fetched once
into the cache before timing. Rollouts per minute = episodes run (kept or dropped as
near-duplicates) / pipeline wall time; the speed-up is against the first worker count of the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time

from cwm_beam import trajectories
from cwm_forager.repos import RepoSource, fetch

PROJECTS = ("toolz==1.0.0", "cachetools==5.5.0", "inflection==0.5.1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", action="append", default=None, help="default: " + ", ".join(PROJECTS))
    parser.add_argument("--tasks-per-repo", type=int, default=6)
    parser.add_argument("--max-turns", type=int, default=30)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", default=None, help="also write the stats here")
    args = parser.parse_args()
    repos = args.repo or list(PROJECTS)
    logging.getLogger().setLevel(logging.WARNING)
    for repo in repos:  # download outside the timed runs
        fetch(RepoSource(pypi=repo))
    results = {}
    for workers in args.workers:
        flags = [f"--repo={r}" for r in repos] + [
            "--tasks-per-repo", str(args.tasks_per_repo), "--max-turns", str(args.max_turns),
            "--workers", str(workers)]
        with tempfile.TemporaryDirectory() as out:
            start = time.monotonic()
            stats = trajectories.run(flags + ["--output", os.path.join(out, "ds")])
            wall = time.monotonic() - start
        results[workers] = stats
        print(f"\nworkers={workers}: {stats['episodes']} episodes ({stats['train_records']} "
              f"trajectories kept, {stats['duplicates']} near-duplicates dropped), "
              f"{stats['deadletter_records']} dead letters {stats['deadletter_reasons']}, "
              f"in {wall:.1f}s = {stats['rollouts_per_minute']:.2f} rollouts/min", flush=True)
        print("  validated tasks kept, by project and family:")
        for repo, families in stats["tasks_by_repository_family"].items():
            print(f"    {repo}: {sum(families.values())} {dict(sorted(families.items()))}")
        print(f"  candidate rejections: {stats['rejected']}")
        print("  solve rate by family (search policy):")
        for family, row in stats["solve_rate_by_family"].items():
            print(f"    {family}: {row['solved']}/{row['episodes']} = {row['rate']:.0%}")
    base = results[args.workers[0]]["rollouts_per_minute"]
    for workers, stats in results.items():
        print(f"{workers} worker(s): {stats['rollouts_per_minute'] / base:.2f}x the rollouts/min "
              f"of {args.workers[0]}")
    print(f"cpus: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
