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
from cwm_forager.repos import RepositoryError, RepoSource

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


def build_one(pin: str, before: str, suite_seconds: float) -> dict:
    """One project's build record (``envbuild.BuildResult.to_json`` plus the total time)."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cwm-envbench-") as work:
        env = RepoEnvironment(RepoSource(pypi=pin), limits=LIMITS, workroot=Path(work),
                              suite_seconds=suite_seconds, dependencies=True,
                              resolve_before=before)
        error = None
        try:
            env.prepare()
        except RepositoryError as err:
            error = str(err)
        finally:
            env.close()
    record = env.build.to_json() if env.build is not None else {
        "repository": pin, "stage": "fetch", "ok": False}
    if error and not record.get("error"):
        record["error"] = error
    record["pin"], record["total_seconds"] = pin, round(time.monotonic() - start, 1)
    return record


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
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    records = []
    for pin in args.repo or PROJECTS:
        record = build_one(pin, args.before, args.suite_seconds)
        records.append(record)
        print(f"{pin}: {record['stage']} passed={record.get('tests_passed', 0)} "
              f"failed={record.get('tests_failed', 0)} {record['total_seconds']}s", flush=True)
        if args.json:
            with open(args.json, "a", encoding="utf-8") as out:
                out.write(json.dumps(record) + "\n")
    print(table(records))


if __name__ == "__main__":
    main()
