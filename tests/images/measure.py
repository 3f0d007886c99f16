"""Sizes and container start-up times of the three images (for docs/benchmarks.md).

    python -m tests.images.measure [--repeats 5]

Start-up: wall time of `docker run` (with the pod settings of podrun.py) from the create call to
the container's exit, for a command that imports what the image's entry point imports and exits:
the part of a pod's start that the image decides (the kubelet and a pull add their own). Medians
of the repeats, after one unmeasured run (page cache warm).
"""

from __future__ import annotations

import argparse
import statistics
import time

from tests.images.build import image_refs
from tests.images.engine import ensure_engine
from tests.images.podrun import PodRunner

BASELINE_IMAGE = "cwm-local/python:3.11-bookworm"  # tests/images/bases.py
# What each entry point loads before it does any work.
STARTUP = {
    "cwm-operator": ["python", "-c", "import kopf, cwm_operator.handlers, "
                     "cwm_operator.render as r; r.warm_up()"],
    "cwm-beam": ["python", "-c", "import apache_beam, cwm_beam.traces, cwm_beam.trajectories"],
    "cwm-trainer": ["python", "-c", "import torch, deepspeed, cwm_jobs.pretrain"],
}


def startup_seconds(runner: PodRunner, ref: str, command: list[str], repeats: int) -> list[float]:
    """Wall seconds of `repeats` runs of `command` in `ref`, after one unmeasured run."""
    times = []
    for i in range(repeats + 1):
        started = time.monotonic()
        result = runner.run(ref, command, timeout=300)
        if result.exit_code != 0:
            raise SystemExit(f"{ref}: {' '.join(command)} failed:\n{result.logs[-2000:]}")
        if i:
            times.append(time.monotonic() - started)
        runner.cleanup()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    client = ensure_engine()
    runner = PodRunner(client)
    # Baseline, same run: the bare Python base image starting an empty interpreter.
    rows = [("baseline", BASELINE_IMAGE, ["python", "-c", "pass"])]
    rows += [(name, ref, STARTUP[name]) for name, ref in image_refs().items()]
    print("| image | size | start-up, median (min) | × baseline | command |")
    print("|---|---|---|---|---|")
    base = None
    try:
        for _name, ref, command in rows:
            size = client.images.get(ref).attrs["Size"] / 1e6
            times = startup_seconds(runner, ref, command, args.repeats)
            median = statistics.median(times)
            base = base or median
            print(f"| {ref} | {size:.0f} MB | {median:.2f} s ({min(times):.2f}) | "
                  f"{median / base:.1f} | `{' '.join(command)}` |")
    finally:
        runner.cleanup()


if __name__ == "__main__":
    main()
