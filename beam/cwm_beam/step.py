"""What the Beam data steps (``cwm_beam.traces``, ``cwm_beam.trajectories``) share around their
pipelines: the common flags, the step configuration's sections, the runner, and where a data set
is written — whole, or as one part of an Indexed Job (:mod:`cwm_beam.parts`).

Local parallelism (``--workers N`` with the in-process runner) uses the same split as an Indexed
Job: N processes, each the whole pipeline on its part of the work, the last to finish merging the
manifest (:func:`run_as_parts`). It was at least as fast as Beam's multi-processing mode (worker
processes fed over a gRPC data plane) in each same-run comparison (docs/benchmarks.md). Beam's
mode stays one flag away (``--direct_running_mode=multi_processing``), as do other runners.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import sys
import time
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from cwm_beam.parts import Part

LOG = logging.getLogger("cwm_beam.step")


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", help="data set folder (local path or fsspec URI)")
    parser.add_argument("--workers", type=int, default=None,
                        help="in-process runner: processes, each running the pipeline on its part "
                             "of the work (default 1)")
    parser.add_argument("--runner", default=None, help="Beam runner (default: in-process)")
    parser.add_argument("--shards", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--part", type=int, default=None,
                        help="this pod's part (default: $JOB_COMPLETION_INDEX)")
    parser.add_argument("--parts", type=int, default=None,
                        help="parts the step is split into (default: $CWM_PARTS, else 1)")


@dataclass
class StepInput:
    """The step configuration's sections (empty when the job is given by flags alone)."""

    config: dict[str, Any]
    spec: dict[str, Any]
    sandbox: dict[str, Any] | None
    beam: dict[str, Any]
    rest: list[str]  # arguments no flag claimed: Beam pipeline flags


def read_step(rest: list[str], *, named_by_flags: bool) -> StepInput:
    """Load the step configuration (``--config`` or ``$CWM_STEP_CONFIG``) unless the flags name
    the whole job; split it into the pipeline's spec, the sandbox limits and the Beam section."""
    config: dict[str, Any] = {}
    if "--config" in rest or any(a.startswith("--config=") for a in rest) or not named_by_flags:
        from cwm_spec.stepconfig import load_step_config

        config, rest = load_step_config(rest)
    spec = dict(config.get("spec", {}))
    data = config.get("data", {}) or {}
    sandbox = config.get("sandbox") or data.get("sandbox") or spec.pop("sandbox", None)
    beam_section = dict((config.get("runtime") or {}).get("beam") or config.get("beam")
                        or data.get("beam") or spec.pop("beam", None) or {})
    return StepInput(config, spec, sandbox, beam_section, rest)


def output_and_runner(flags: argparse.Namespace, step: StepInput) -> tuple[str, dict[str, Any], list[str]]:
    """The output folder, the Beam section with the flags' overrides, and the Beam flags."""
    output = flags.output or (step.config.get("outputs") or {}).get("dataset")
    if not output:
        raise ValueError("no output: pass --output DIR or give outputs.dataset in the config")
    beam_section = dict(step.beam)
    if flags.workers is not None:
        beam_section["workers"] = flags.workers
    if flags.runner:
        beam_section["runner"] = flags.runner
    return output, beam_section, step.rest + list(beam_section.get("options", []))


IN_PROCESS = ("DirectRunner", "FnApiRunner", "direct")


def pipeline_for(beam_section: dict[str, Any], beam_flags: list[str]) -> beam.Pipeline:
    """The in-process FnApiRunner (never Prism, which downloads at run time) unless another
    runner is named; its flags pass through unchanged (``--direct_running_mode=multi_processing``
    gets ``workers`` as its ``--direct_num_workers`` unless that is given too)."""
    runner = beam_section.get("runner") or "DirectRunner"
    if runner in IN_PROCESS:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        flags = list(beam_flags)
        workers = int(beam_section.get("workers") or 1)
        if (any(f.startswith("--direct_running_mode") for f in flags) and workers > 1
                and not any(f.startswith("--direct_num_workers") for f in flags)):
            flags.append(f"--direct_num_workers={workers}")
        return beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions(flags))
    return beam.Pipeline(options=PipelineOptions([f"--runner={runner}", *beam_flags]))


def _run_part(module: str, argv: list[str]) -> None:
    """A part process: the step's own ``run`` on its part (a forked child of the step)."""
    importlib.import_module(module).run(argv)


def local_workers(beam_section: dict[str, Any], beam_flags: list[str]) -> int:
    """How many part processes this step runs as: ``workers`` for the in-process runner, 1 for
    other runners and where Beam's own multi-processing mode is asked for by flags."""
    runner = beam_section.get("runner") or "DirectRunner"
    if runner not in IN_PROCESS or any(
            f.startswith(("--direct_running_mode", "--direct_num_workers")) for f in beam_flags):
        return 1
    return max(1, int(beam_section.get("workers") or 1))


def run_as_parts(module: str, argv: list[str], part: Part, workers: int,
                 output: str) -> tuple[dict[str, Any], float]:
    """Run the step ``module`` as ``workers`` processes at once, each on one part of the work.

    Inside a pod that is itself part i of P (an Indexed Job), process j is part i*W+j of P*W,
    so the data set is always split one way and merged once, by the last part to finish.
    Nothing is shared between the processes but the output folder. A process that fails stops
    the others and raises (its part's manifest is missing, so no merge happens). Returns this
    pod's parts' stats merged and the wall-clock seconds."""
    from cwm_spec import artifacts

    parts = [Part(part.index * workers + j, part.count * workers) for j in range(workers)]
    started = time.monotonic()
    LOG.info("running %s as %d processes: parts %s of %d", module, workers,
             ", ".join(str(p.index) for p in parts), parts[0].count)
    # Forked, not spawned: the processes start with Beam and this step already imported (seconds
    # per process otherwise). Nothing has started a pipeline, a sandbox or a gRPC thread yet.
    context = multiprocessing.get_context("fork")
    sys.stdout.flush()
    sys.stderr.flush()
    procs = [context.Process(target=_run_part, name=f"part-{p.index}",
                             args=(module, [*argv, "--part", str(p.index), "--parts", str(p.count),
                                            "--workers", "1"])) for p in parts]
    failed: list[str] = []
    try:
        for proc in procs:
            proc.start()
        running = {proc.sentinel: (p, proc) for p, proc in zip(parts, procs)}
        while running:   # in the order they end, so that a failure stops the others at once
            for sentinel in multiprocessing.connection.wait(list(running)):
                p, proc = running.pop(sentinel)
                proc.join()
                if proc.exitcode != 0 and not failed:
                    failed.append(f"part {p.index} of {p.count} exited with code {proc.exitcode}")
                    for other in procs:
                        if other.is_alive():
                            other.terminate()
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            if proc.pid is not None:
                proc.join()
    if failed:
        raise RuntimeError(f"{module}: {failed[0]}")
    seconds = time.monotonic() - started
    stats = artifacts.merge_stats([artifacts.read_manifest(artifacts.part_dir(output, p.index))
                                   .stats for p in parts])
    return stats, seconds


def target_of(output: str, part: Part) -> str:
    """Where this run writes: the data set itself, or its part's folder (emptied of a previous
    attempt's manifest, so that no merge pairs that attempt's part with this one's)."""
    from cwm_spec import artifacts

    if not part.split:
        return output
    target = artifacts.part_dir(output, part.index)
    artifacts.discard_manifest(target)
    return target


def merge_when_complete(output: str, part: Part) -> None:
    """After a part: the last one to finish writes the data set's manifest."""
    from cwm_spec import artifacts

    if part.split and artifacts.merge_parts(output, part.count) is not None:
        LOG.info("all %d parts done: merged into %s", part.count, output)


def part_label(part: Part) -> str:
    return f" as part {part.index} of {part.count}" if part.split else ""
