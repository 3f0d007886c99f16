"""What the Beam data steps (``cwm_beam.traces``, ``cwm_beam.trajectories``) share around their
pipelines: the common flags, the step configuration's sections read by the API's models, the one
runner (:meth:`DataStep.run`: parse, build, run, write the manifest), the shard writers, and where
a data set is written — whole, or as one part of an Indexed Job (:mod:`cwm_beam.parts`). A step
brings only what is its own (:class:`DataStep`): how it reads its job, builds its graph and
summarises its data set.

Local parallelism (``--workers N`` with the in-process runner) uses the same split as an Indexed
Job: N processes, each the whole pipeline on its part of the work, the last to finish merging the
manifest (:func:`run_as_parts`). It was at least as fast as Beam's multi-processing mode (worker
processes fed over a gRPC data plane) in each same-run comparison (docs/benchmarks.md). Beam's
mode stays one flag away (``--direct_running_mode=multi_processing``), as do other runners.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Generic, Self, TypeVar, cast

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from pydantic import BaseModel

from cwm_beam.parts import Part, job_part
from cwm_exec import sandbox
from cwm_exec.sandbox import Limits
from cwm_spec import artifacts, storage
from cwm_spec.api import TraceDataSpec, TrajectoryDataSpec
from cwm_spec.stepconfig import load_step_config, read_section

LOG = logging.getLogger("cwm_beam.step")
WHOLE = Part()   # the whole of the work: one process, no split


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
    parser.add_argument("--wall-seconds", type=float, default=None,
                        help="the sandbox's wall-clock limit per program (over sandbox)")


@dataclass
class StepInput:
    """The step configuration's sections, as the plan (``cwm_spec.plan``) writes them; all empty
    when the flags name the whole job (then the API's defaults apply)."""

    config: dict[str, Any]
    spec: dict[str, Any]  # the step's section, camelCase: flags may override it, then validated
    evaluation: dict[str, Any]  # what the evaluation holds out (``evaluation``), flags over it
    sandbox: Limits       # ``sandbox``, validated by the API's SandboxSpec
    beam: dict[str, Any]  # ``runtime.beam`` (BeamSpec, dumped)
    rest: list[str]       # arguments no flag claimed: Beam pipeline flags


def read_step(rest: list[str], *, named_by_flags: bool) -> StepInput:
    """Load the step configuration (``--config`` or ``$CWM_STEP_CONFIG``) unless the flags name
    the whole job; split it into the step's spec, the sandbox limits and the Beam section."""
    config: dict[str, Any] = {}
    if "--config" in rest or any(a.startswith("--config=") for a in rest) or not named_by_flags:
        config, rest = load_step_config(rest)
    runtime = config.get("runtime") or {}
    return StepInput(config, dict(config.get("spec") or {}), dict(config.get("evaluation") or {}),
                     Limits.from_spec(config.get("sandbox")), dict(runtime.get("beam") or {}), rest)


def output_and_runner(flags: argparse.Namespace,
                      step: StepInput) -> tuple[str, dict[str, Any], list[str]]:
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
                p, proc = running.pop(cast(int, sentinel))
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
    if not part.split:
        return output
    target = artifacts.part_dir(output, part.index)
    artifacts.discard_manifest(target)
    return target


def merge_when_complete(output: str, part: Part) -> None:
    """After a part: the last one to finish writes the data set's manifest."""
    if part.split and artifacts.merge_parts(output, part.count) is not None:
        LOG.info("all %d parts done: merged into %s", part.count, output)


def part_label(part: Part) -> str:
    return f" as part {part.index} of {part.count}" if part.split else ""


# --------------------------------------------------------------------------------------------
# Shards: written by the pipelines, read back for the manifest


def shard_file(name: str, index: int, shards: int) -> str:
    return f"{name}-{index:05d}-of-{shards:05d}.jsonl"


def write_rows(output: str, name: str, index: int, shards: int,
               rows: Iterable[dict[str, Any]]) -> str:
    """One shard file of split ``name`` (records sorted by id, so any runner writes the same
    bytes); returns its path."""
    rows = sorted(rows, key=lambda r: r["id"])
    return artifacts.write_shard(output, shard_file(name, index, shards), rows).path


class WriteShards(beam.PTransform):
    """Write one split as ``NAME-0000i-of-0000n.jsonl`` shards, a record's shard chosen by a hash
    of its id; outputs the shard file names."""

    def __init__(self, output: str, name: str, shards: int) -> None:
        super().__init__()
        self.output, self.name, self.shards = output, name, shards

    def expand(self, records):
        output, name, shards = self.output, self.name, self.shards

        def shard_of(record):
            return int(hashlib.sha256(record["id"].encode()).hexdigest()[:8], 16) % shards

        return (records
                | f"Key{name.title()}" >> beam.Map(lambda r: (shard_of(r), r))
                | f"Group{name.title()}" >> beam.GroupByKey()
                | f"Write{name.title()}" >> beam.Map(
                    lambda item: write_rows(output, name, item[0], shards, item[1])))


def write_count(item: tuple[str, int], output: str, name: str) -> None:
    """A side counter for the manifest's stats (``(key, count)`` from ``Count.PerElement``),
    one small file per key under ``_stats/NAME/``."""
    key, count = item
    path = storage.join(output, "_stats", name, hashlib.sha1(key.encode()).hexdigest()[:12])
    storage.write_json_atomic(path, {"key": key, "count": count})


def read_counts(output: str, name: str) -> Counter:
    """The side counters of ``name``, summed by key; their files are removed once read."""
    counts: Counter = Counter()
    fs, base = storage.filesystem(artifacts.join(output, "_stats", name))
    if fs.exists(base):
        for path in fs.ls(base, detail=False):
            with fs.open(path, "r") as f:
                item = json.load(f)
            counts[item["key"]] += item["count"]
        fs.rm(base, recursive=True)
    return counts


def read_splits(output: str, counts: dict[str, int]
                ) -> tuple[dict[str, list[artifacts.Shard]], dict[str, list[dict[str, Any]]]]:
    """Every shard of each split (``name -> shard count``), with its rows: the manifest's shard
    list (empty shards where a split got nothing) and the records for the stats."""
    shards: dict[str, list[artifacts.Shard]] = {}
    rows: dict[str, list[dict[str, Any]]] = {}
    for name, count in counts.items():
        shards[name], rows[name] = [], []
        for index in range(count):
            shard, records = artifacts.read_shard(output, shard_file(name, index, count))
            shards[name].append(shard)
            rows[name].extend(records)
    return shards, rows


# --------------------------------------------------------------------------------------------
# The one runner of both data steps

Section = TypeVar("Section", TraceDataSpec, TrajectoryDataSpec)


@dataclass(frozen=True)
class StepSettings(Generic[Section]):
    """What a data step's transforms need: its section validated by the API's model (so every
    default is the API's), the sandbox limits, the seed (the step's, over the section's) and
    this pod's part, and what the evaluation holds out of training (the plan's ``evaluation``
    section for the step, camelCase). A step subclasses it naming its ``model`` and adds views
    of ``spec``."""

    model: ClassVar[type[BaseModel]]
    spec: Section
    sandbox: Limits
    seed: int
    part: Part
    evaluation: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_spec(cls, section: dict[str, Any], sandbox: Limits, seed: int | None = None,
                  part: Part = WHOLE, evaluation: dict[str, Any] | None = None) -> Self:
        """From the ``spec`` section as the plan writes it (camelCase); errors name the field."""
        spec: Any = read_section(cls.model, section, "spec")   # the subclass's model
        return cls(spec, sandbox, spec.seed if seed is None else seed, part,
                   dict(evaluation or {}))


class StepTransform(beam.PTransform):
    """A data step's composite transform: the whole graph between reading and writing, built
    from the step's settings."""

    def __init__(self, settings: StepSettings[Any]) -> None:
        super().__init__()
        self.settings = settings


@dataclass(frozen=True)
class Job:
    """One run of a data step: its settings (with this process's ``part``), where it writes, the
    Beam section (with the flags' overrides) and the Beam flags."""

    settings: StepSettings[Any]  # the step's own subclass
    output: str
    beam: dict[str, Any]
    beam_flags: list[str]

    @property
    def part(self) -> Part:
        return self.settings.part


@dataclass(frozen=True)
class DataStep:
    """What a data step adds to the runner (:meth:`run`); everything else is shared."""

    module: str      # ``python -m`` name, run again by each part process
    doc: str         # its module docstring: the ``--help`` text
    kind: str        # the data set's kind, also the namespace of its Beam metrics
    settings: type[StepSettings[Any]]
    names_job: str   # the flag that names its inputs (``source``, ``repo``): no config needed
    add_flags: Callable[[argparse.ArgumentParser], None]   # its own flags
    # onto its spec section and the evaluation section
    apply_flags: Callable[[argparse.Namespace, dict[str, Any], dict[str, Any]], None]
    build: Callable[[beam.Pipeline, Any, str], None]       # the graph, writing shards
    # shards, stats and each split's program hashes (the manifest's ``programs``)
    tally: Callable[[str, Any], tuple[dict[str, list[artifacts.Shard]], dict[str, Any],
                                      dict[str, list[str]]]]
    throughput: Callable[[dict[str, Any], float], dict[str, float]]  # rate keys of the stats
    describe: Callable[[Any], str]     # what it is about to do, for the log
    summary: Callable[[dict[str, Any]], str]  # what it wrote, for the log

    def load_job(self, argv: list[str]) -> Job:
        """The job from the step configuration (when one is given) overridden by the flags:
        the seed is ``--seed``, else the configuration's (else the section's), the part
        ``--part``/``--parts`` (else the Indexed Job's)."""
        parser = argparse.ArgumentParser(prog=f"python -m {self.module}", description=self.doc,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        self.add_flags(parser)
        add_common_flags(parser)
        flags, rest = parser.parse_known_args(argv)
        step = read_step(rest, named_by_flags=bool(getattr(flags, self.names_job) or flags.output))
        self.apply_flags(flags, step.spec, step.evaluation)
        if flags.shards is not None:
            step.spec["shards"] = flags.shards
        limits = step.sandbox
        if flags.wall_seconds:
            limits = replace(limits, wall_seconds=flags.wall_seconds)
        seed = flags.seed if flags.seed is not None else step.config.get("seed")
        settings = self.settings.from_spec(step.spec, limits, seed,
                                           job_part(flags.part, flags.parts), step.evaluation)
        return Job(settings, *output_and_runner(flags, step))

    def run(self, argv: list[str] | None = None) -> dict[str, Any]:
        """Parse, build, run, write the manifest; returns the manifest's stats, with the wall
        time (``seconds``) and throughput, which the manifest leaves out.

        With ``workers`` > 1 on the in-process runner, the step runs as that many part processes
        (:func:`run_as_parts`); else this process runs the pipeline on its part (the whole, or one
        part of an Indexed Job) and the last part to finish merges the manifest."""
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        logging.getLogger("cwm_beam").setLevel(logging.INFO)   # the step and its helpers
        args = list(sys.argv[1:] if argv is None else argv)
        job = self.load_job(args)
        LOG.info("%s into %s (runner %s, workers %s)", self.describe(job.settings), job.output,
                 job.beam.get("runner", "in-process"), job.beam.get("workers", 1))
        # Decided before any program runs: fails the step here when CWM_SANDBOX=bwrap cannot hold.
        LOG.info("sandbox: %s", sandbox.describe_isolation())
        workers = local_workers(job.beam, job.beam_flags)
        if workers > 1:
            stats, seconds = run_as_parts(self.module, args, job.part, workers, job.output)
            stats.update(seconds=round(seconds, 2), **self.throughput(stats, seconds))
            LOG.info("%d processes: %s", workers, self.summary(stats))
            return stats
        started = time.monotonic()
        target = target_of(job.output, job.part)
        pipeline = pipeline_for(job.beam, job.beam_flags)
        self.build(pipeline, job.settings, target)
        result = pipeline.run()
        result.wait_until_finish()
        log_metrics(result, self.kind)
        stats = self.finish(target, job.settings, time.monotonic() - started)
        LOG.info("%s%s", self.summary(stats), part_label(job.part))
        merge_when_complete(job.output, job.part)
        return stats

    def finish(self, output: str, settings: Any, seconds: float) -> dict[str, Any]:
        """After the pipeline: the shards and stats, and the manifest, written last. The
        manifest says what the data are, so two runs of one spec write the same bytes (and the
        runner's digests match); the wall time and throughput are returned and logged only."""
        shards, stats, programs = self.tally(output, settings)
        stats["sandbox"] = sandbox.isolation_record()  # how its programs were contained
        artifacts.write_manifest(output, artifacts.Manifest(self.kind, shards, stats, programs))
        return {**stats, "seconds": round(seconds, 2), **self.throughput(stats, seconds)}


def log_metrics(result: beam.runners.runner.PipelineResult, namespace: str) -> None:
    try:
        counters = result.metrics().query()["counters"]
    except Exception:   # not every runner reports metrics back
        LOG.info("the runner reported no metrics")
        return
    for counter in counters:
        if counter.key.metric.namespace == namespace:
            LOG.info("metric %s = %s", counter.key.metric.name, counter.committed)
