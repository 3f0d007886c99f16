"""The traces step on a dask.distributed cluster (cwm_beam.dask.DaskRunner): throughput with 1
and 2 worker processes, as a ratio to 1 worker, next to the in-process runner on the same data.

    .venv/bin/python benchmarks/dask_runner.py --programs 400

A scheduler and N single-threaded worker processes are started on this machine for each run;
every run traces the same programs (synthetic, fuzzed inputs) and must write the same manifest.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distributed import Client

from cwm_beam import traces


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster(workers: int) -> tuple[str, list[subprocess.Popen]]:
    port = free_port()
    address = f"127.0.0.1:{port}"
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host",
                               "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker",
                                   f"tcp://{address}", "--nworkers", str(workers), "--nthreads",
                                   "1", "--no-dashboard"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for _ in range(120):
        try:
            with Client(address, timeout=5) as client:
                client.wait_for_workers(workers, timeout=60)
            return address, procs
        except OSError:
            time.sleep(1)
    raise RuntimeError("the Dask cluster did not start")


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    traces.run(argv)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--programs", type=int, default=400)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    base = ["--source", f"synthetic:{args.programs}"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        seconds = timed([*base, "--output", f"{tmp}/in-process", "--workers", "1"])
        rows.append(("in-process, 1 worker", seconds))
        manifest = Path(f"{tmp}/in-process/manifest.json").read_text()
        for n in args.workers:
            address, procs = cluster(n)
            try:
                out = f"{tmp}/dask-{n}"
                seconds = timed([*base, "--output", out, "--runner", "cwm_beam.dask.DaskRunner",
                                 f"--dask_client_address={address}"])
            finally:
                for proc in reversed(procs):
                    proc.terminate()
                    proc.wait(timeout=60)
            assert Path(out, "manifest.json").read_text() == manifest, "data sets differ"
            rows.append((f"DaskRunner, {n} worker(s)", seconds))
    records = json.loads(manifest)["stats"]["train_records"]
    one = next(s for name, s in rows if name.startswith("DaskRunner, 1"))
    for name, s in rows:
        print(f"{name:24s} {s:7.1f} s  {records / s:6.1f} traces/s  x{one / s:.2f} vs Dask 1")


if __name__ == "__main__":
    main()
