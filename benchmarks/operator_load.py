"""The operator under load: one pipeline alone (baseline), then N pipelines at once.

    .venv/bin/python benchmarks/operator_load.py [--pipelines 50]

Runs against the test control plane (tests/controlplane; real kube-apiserver, etcd, garbage
collector), with the operator in-process, authenticated as a ServiceAccount bound to exactly
`cwm_operator.permissions.RULES`. Each pipeline is examples/tiny.yaml's 8 steps; every child is
completed the moment a watch reports it (no kubelet runs). Prints, per run: API requests the
operator made per pipeline (plus the Events it posted), and the time from a child's completion to
the creation of the next child (p50/p95/max, target ≤ 2 s); then the load/baseline ratios.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.controlplane.cluster import connect  # noqa: E402
from tests.operator.helpers import describe_load, operator_identity, run_load  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipelines", type=int, default=50)
    args = parser.parse_args()
    from kubernetes import client

    with connect() as kube, tempfile.TemporaryDirectory() as storage:
        core = client.CoreV1Api(kube.api_client)
        results = []
        for count in (1, args.pipelines):
            namespace = f"bench-{uuid.uuid4().hex[:8]}"
            core.create_namespace({"metadata": {"name": namespace}})
            kubeconfig = operator_identity(kube, namespace)
            result = run_load(kube, namespace, kubeconfig, f"file://{storage}", count)
            print(describe_load(result), flush=True)
            results.append(result)
        base, load = results
        for key in ("requests_per_pipeline", "latency_p50", "latency_p95"):
            print(f"{key}: {load[key] / base[key]:.2f}× the single-pipeline baseline")


if __name__ == "__main__":
    main()
