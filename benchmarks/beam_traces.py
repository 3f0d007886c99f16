"""Beam trace pipeline throughput: 1 worker vs N workers on the same programs, same run.

    .venv/bin/python benchmarks/beam_traces.py [--synthetic 4200] [--workers 1 2] [--beam-mode]
        [--repeats 3]

Programs: all 800 CRUXEval functions plus ``--synthetic`` generated ones (5,000 in total by
default), traced in the sandbox by ``python -m cwm_beam.traces`` on the in-process runner with
``--workers N``: N processes, each running the pipeline on its part (the step's local
parallelism). ``--beam-mode`` also measures Beam's own multi-processing mode
(``--direct_running_mode=multi_processing``) at each N > 1. Prints traces per second and the
speed-up over the first worker count. Wall time includes start-up, merge and manifests.
``--repeats N`` runs the variants N times, interleaved (a burst of load on a shared machine then
hits every variant alike), and compares their medians.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile

from cwm_beam import traces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--synthetic", type=int, default=4200)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--beam-mode", action="store_true",
                        help="also Beam's multi-processing mode at each worker count > 1")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of all variants, interleaved; medians are compared")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.WARNING)
    variants = [(f"{n} worker(s)", n, []) for n in args.workers]
    if args.beam_mode:
        variants += [(f"{n} Beam multi-processing workers", n,
                      ["--direct_running_mode=multi_processing"]) for n in args.workers if n > 1]
    results: dict[str, list[float]] = {label: [] for label, _, _ in variants}
    for _ in range(args.repeats):
        for label, workers, extra in variants:
            with tempfile.TemporaryDirectory() as out:
                stats = traces.run(["--source", "cruxeval", "--cruxeval-held-out", "0", "--source",
                                    f"synthetic:{args.synthetic}", "--output",
                                    os.path.join(out, "ds"), "--workers", str(workers), *extra])
            traced = stats["train_records"] + stats["validation_records"]
            results[label].append(stats["traces_per_second"])
            print(f"{label}: {traced} traces + {stats['deadletter_records']} dead letters "
                  f"in {stats['seconds']:.1f}s = {stats['traces_per_second']:.1f} traces/s"
                  + (f" (dead letters: {stats['deadletter_reasons']})"
                     if stats["deadletter_reasons"] else ""), flush=True)
    medians = {label: statistics.median(rates) for label, rates in results.items()}
    base_label = variants[0][0]
    for label, rate in medians.items():
        print(f"  {label}: {rate:.1f} traces/s (median of {len(results[label])}), "
              f"{rate / medians[base_label]:.2f}x the throughput of {base_label}")
    print(f"cpus: {os.cpu_count()}")


if __name__ == "__main__":
    main()
