"""Beam trace pipeline throughput: 1 worker vs 2 workers on the same programs, same run.

    .venv/bin/python benchmarks/beam_traces.py [--synthetic 4200] [--workers 1 2]

Programs: all 800 CRUXEval functions plus ``--synthetic`` generated ones (5,000 in total by
default), traced in the sandbox by ``python -m cwm_beam.traces`` on the in-process runner with
``--direct_num_workers`` worker processes. Prints traces per second and the speed-up over the
first worker count. Wall time includes pipeline start-up and the manifest.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile

from cwm_beam import traces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--synthetic", type=int, default=4200)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.WARNING)
    results = {}
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as out:
            stats = traces.run(["--source", "cruxeval", "--source", f"synthetic:{args.synthetic}",
                                "--output", os.path.join(out, "ds"), "--workers", str(workers)])
        traced = stats["train_records"] + stats["validation_records"]
        results[workers] = stats["traces_per_second"]
        print(f"workers={workers}: {traced} traces + {stats['deadletter_records']} dead letters "
              f"in {stats['seconds']:.1f}s = {stats['traces_per_second']:.1f} traces/s"
              + (f" (dead letters: {stats['deadletter_reasons']})"
                 if stats["deadletter_reasons"] else ""), flush=True)
    base = results[args.workers[0]]
    for workers, rate in results.items():
        print(f"  {workers} worker(s): {rate / base:.2f}x the throughput of {args.workers[0]}")
    print(f"cpus: {os.cpu_count()}")


if __name__ == "__main__":
    main()
