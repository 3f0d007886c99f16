"""Start-up time of the test control plane (tests/controlplane), phase by phase.

    .venv/bin/python benchmarks/controlplane_startup.py [--runs 3]

Starts and stops the whole control plane `--runs` times (etcd, kube-apiserver, our two CRDs,
kube-controller-manager; binaries from tests/controlplane/build.sh) and prints each phase's
median. The baseline measured in the same run is the bare etcd start: the ratio says how much of
the start-up the Kubernetes components add on top of their storage.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.controlplane.cluster import connect  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    phases: dict[str, list[float]] = {}
    totals, stops, first_request = [], [], []
    for _ in range(args.runs):
        t0 = time.monotonic()
        with connect() as kube:
            totals.append(time.monotonic() - t0)
            assert kube.local is not None
            for name, secs in kube.local.timings.items():
                phases.setdefault(name, []).append(secs)
            t1 = time.monotonic()
            kube.kubectl("get", "cwmpipelines", "-A", check=True)
            first_request.append(time.monotonic() - t1)
            t2 = time.monotonic()
        stops.append(time.monotonic() - t2)
    med = statistics.median
    print(f"runs: {args.runs}")
    for name, values in phases.items():
        print(f"  {name:<26} {med(values):6.2f} s")
    print(f"  {'total start-up':<26} {med(totals):6.2f} s")
    print(f"  {'first kubectl get':<26} {med(first_request):6.2f} s")
    print(f"  {'tear-down':<26} {med(stops):6.2f} s")
    print(f"ratio total start-up / bare etcd start (baseline): {med(totals) / med(phases['etcd']):.1f}x")


if __name__ == "__main__":
    main()
