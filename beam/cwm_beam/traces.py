"""Execution-trace data set: read → fuzz → trace in the sandbox → limits → dedup → split → shards.

Run as a pipeline step (configuration from ``$CWM_STEP_CONFIG`` or ``--config FILE``, as the plan
writes it: ``TraceDataSpec`` in ``spec``, validated by that model; ``sandbox`` and ``runtime.beam``
beside it)::

    python -m cwm_beam.traces --config step.json

or standalone with plain flags::

    python -m cwm_beam.traces --source cruxeval --source synthetic:2000 --output /tmp/traces
    python -m cwm_beam.traces --source jsonl:fns.jsonl --workers 2 --output /tmp/traces
    python -m cwm_beam.traces --source repository:path/to/repo --output /tmp/traces
    python -m cwm_beam.traces --source cruxeval --output /tmp/t --runner FlinkRunner \\
        --flink_master=[local] --environment_type=LOOPBACK   # extra flags go to Beam unchanged

The runner is the one both data steps share (:meth:`cwm_beam.step.DataStep.run`): Beam's in-process
``FnApiRunner`` by default (``--workers N`` processes), any other runner's flags passed through.
Output: a ``cwm-dataset/v1`` folder (``cwm_spec.artifacts``) with ``train-*``, ``validation-*``
and ``deadletter-*`` JSONL shards and the manifest, written last, which lists each split's
program hashes (``programs``). Records::

    {"id", "source", "program_hash", "code", "entry", "input", "text", "frames", "return",
     "exception", "truncated", "events"}

Repository episodes (``--source repository:PATH_OR_GIT_URL``, see :mod:`cwm_exec.repository`) add
``"repository", "path", "test"``. Dead letters (:func:`program_dead_letter`): ``{"id", "source",
"stage", "reason", "detail"}``. Beam metrics (namespace ``traces``) count both; the manifest's
``stats`` repeats the counts.

Decontamination: the CRUXEval problems the evaluation holds out (the step configuration's
``evaluation.cruxevalHeldOut``, ``--cruxeval-held-out``; :func:`cwm_beam.sources.cruxeval_split`)
are never traced, and a program of any source whose hash is one of theirs is dropped; the
manifest's ``stats.excluded_for_evaluation`` counts them by source. The validation split (the
held-out traces) is chosen by program hash, so no program is in both splits.

Explained traces (``spec.explain``, ``data.traces.explain``; off unless given; flags
``--explain-endpoint URL --explain-model NAME``): a model behind an OpenAI-compatible endpoint
explains train traces (:mod:`cwm_beam.explain`); the explanations whose stated output is the
traced one are the ``explained`` split (``{"id", "source", "program_hash", "code", "entry",
"input", "return", "explanation", "model", "messages"}``), the others ``explain_rejected``
(``{"id", "verdict", "return", "stated", "explanation", "detail"}``), and ``stats.explain``
counts every verdict. The endpoint is checked before anything is traced (no answer, or the model
not served: the step fails naming the field); a request that fails later is counted
(``endpoint_error``: no answer; ``request_refused``: a 4xx for that request), but when the
endpoint answered none of a part's requests the step fails rather than commit an empty split.
The API key is read from ``apiKeyEnv`` in this process only: the sandbox's environment is built
from a fixed list, and the variable is named a credential (``cwm_spec.storage.
CREDENTIAL_NAMES_VAR``) so the process that starts sandboxes is made non-dumpable (its
``/proc/PID/environ`` unreadable to programs of the same user).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any, get_args

import apache_beam as beam
import fsspec
from apache_beam.metrics import Metrics

from cwm_beam import fuzz, sources, synthetic
from cwm_beam.explain import (
    KEPT,
    VERDICTS,
    EndpointError,
    ExplainSample,
    ExplainSettings,
    check_endpoint,
    part_share,
)
from cwm_beam.step import (
    DataStep,
    StepSettings,
    StepTransform,
    WriteShards,
    read_counts,
    read_splits,
    write_count,
    write_rows,
)
from cwm_exec import repository
from cwm_exec.sandbox import Failure, Limits, TracePool
from cwm_exec.tracer import TraceLimits
from cwm_spec import artifacts, storage
from cwm_spec.api import EvaluationSpec, TraceDataSpec, TraceSource
from cwm_spec.programs import program_hash, split_of

LOG = logging.getLogger("cwm_beam.traces")
NAMESPACE = "traces"
DEADLETTER = "deadletter"
TRACED = "traced"
EXCLUDED = "excluded"
EXPLAINED = "explained"                # kept explanations: a split of their own
EXPLAIN_REJECTED = "explain_rejected"  # the others, with why
EXPLAIN_COUNTS = "explain"             # side counters of the verdicts, and the stats' key
SOURCE_KINDS = get_args(TraceSource.model_fields["kind"].annotation)


# --------------------------------------------------------------------------------------------
# Settings (pure)


class Settings(StepSettings[TraceDataSpec]):
    """The trace step's settings (see :class:`cwm_beam.step.StepSettings`)."""

    model = TraceDataSpec

    @property
    def sources(self) -> tuple[dict[str, Any], ...]:
        """Each source as the YAML spells it, unset fields left out (the readers' own
        defaults apply)."""
        return tuple(s.model_dump(mode="json", by_alias=True, exclude_none=True)
                     for s in self.spec.sources)

    @property
    def trace_limits(self) -> TraceLimits:
        spec = self.spec
        return TraceLimits(max_events=spec.max_events, max_bytes=spec.max_bytes,
                           max_repr_chars=spec.max_repr_chars, seed=spec.seed)

    @property
    def cruxeval_held_out(self) -> int:
        """How many bundled CRUXEval problems the evaluation holds out (the API's default when
        the step configuration names none)."""
        default = EvaluationSpec.model_fields["cruxeval_held_out"].default
        return int(self.evaluation.get("cruxevalHeldOut", default))

    @property
    def explain(self) -> ExplainSettings | None:
        """How to ask for explanations (``spec.explain``), None when off."""
        spec = self.spec.explain
        return None if spec is None else ExplainSettings.from_spec(spec)

    @property
    def explain_cap(self) -> int | None:
        """This part's share of ``explain.maxRecords`` (None: no cap)."""
        spec = self.spec.explain
        if spec is None or spec.max_records is None:
            return None
        return part_share(spec.max_records, self.part.index, self.part.count)

    def excluded_hashes(self) -> frozenset[str]:
        """The program hashes no training record may have: the held-out CRUXEval problems'."""
        held = sources.cruxeval_split(self.cruxeval_held_out).evaluation
        return frozenset(program_hash(r["code"]) for r in held)


def content_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(record["text"].encode()).hexdigest()


def program_dead_letter(record: dict[str, Any], stage: str, reason: str,
                        detail: str = "") -> dict[str, Any]:
    """The dead letter of a program (or of its source's line): pure; counted by
    :class:`CountDeadLetters` where the dead letters meet."""
    return {"id": record.get("id", "?"), "source": record.get("source", "?"), "stage": stage,
            "reason": reason, "detail": detail[:2000]}


def exception_quota(program_id: str, wanted: int, share: float) -> int:
    """How many of a function's kept fuzzed inputs may raise: ``wanted × share`` rounded up or
    down by a hash of the id, so the share holds on average and the choice is deterministic."""
    exact = wanted * share
    whole = int(exact)
    fraction = int(hashlib.sha256(program_id.encode()).hexdigest()[:8], 16) / 2 ** 32
    return whole + (1 if fraction < exact - whole else 0)


# --------------------------------------------------------------------------------------------
# Reading sources (I/O: files through fsspec)


def expand_source(source: dict[str, Any], seed: int, limits: TraceLimits | None = None,
                  sandbox: Limits | None = None,
                  cruxeval_held_out: int = 0) -> Iterator[dict[str, Any]]:
    """Programs of one source: ``{"id", "source", "code", "entry", "input" | None, ...}``; a
    malformed line becomes ``{"_deadletter": ...}``. A repository's episodes come already traced
    (with ``_result``). The cruxeval source yields its trainable problems (``count`` caps them)
    and then the ``cruxeval_held_out`` evaluation problems, which the caller drops by hash and
    counts."""
    kind = source["kind"]
    if kind == "cruxeval":
        split = sources.cruxeval_split(cruxeval_held_out)
        for record in [*split.trainable[: source.get("count")], *split.evaluation]:
            yield {"id": f"cruxeval/{record['id']}", "source": kind, "code": record["code"],
                   "entry": "f", "input": record["input"], "expected": record["output"]}
    elif kind == "synthetic":
        for program in synthetic.generate(source.get("seed", seed), int(source["count"])):
            yield {**program, "source": kind}
    elif kind in ("jsonl", "functions"):
        yield from _read_jsonl(source, kind)
    else:   # repository: traced while read (the test suite runs once, in the sandbox)
        yield from repository.trace_repository(source, limits or TraceLimits(),
                                               sandbox or Limits())


def _read_jsonl(source: dict[str, Any], kind: str) -> Iterator[dict[str, Any]]:
    uri = source["uri"]
    limit = source.get("count")
    with fsspec.open(uri, "r", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if limit is not None and number > limit:
                return
            if not line.strip():
                continue
            origin = {"id": f"{kind}:{uri}:{number}", "source": kind}
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield _unreadable(origin, "line is not JSON", str(err))
                continue
            if not isinstance(record, dict) or not isinstance(record.get("code"), str):
                yield _unreadable(origin, "record has no string 'code'")
                continue
            if kind == "jsonl" and not isinstance(record.get("input"), str):
                yield _unreadable(origin, "record has no string 'input'")
                continue
            entry = record.get("entry")
            if entry is None:
                try:
                    entry = fuzz.find_entry(record["code"]).name if kind == "functions" else "f"
                except fuzz.FuzzError as err:
                    yield _unreadable(origin, str(err))
                    continue
            yield {"id": f"{kind}/{record.get('id', number)}", "source": kind,
                   "code": record["code"], "entry": entry,
                   "input": record.get("input") if kind == "jsonl" else None,
                   "examples": record.get("examples", []),
                   **({"expected": record["output"]} if "output" in record else {})}


def _unreadable(origin: dict[str, Any], reason: str, detail: str = "") -> dict[str, Any]:
    return {"_deadletter": program_dead_letter(origin, "read", reason, detail)}


# --------------------------------------------------------------------------------------------
# DoFns


class ExpandSource(beam.DoFn):
    """Programs to trace; already traced ones (repository episodes) go to ``traced``, the
    evaluation's programs (by hash) to ``excluded`` (their source's kind, to be counted)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.read = Metrics.counter(NAMESPACE, "programs_read")
        self.episodes = Metrics.counter(NAMESPACE, "repository_episodes")
        self.excluded = Metrics.counter(NAMESPACE, "excluded_for_evaluation")
        self.held_out: frozenset[str] = frozenset()

    def setup(self) -> None:
        self.held_out = self.settings.excluded_hashes()

    def process(self, source: dict[str, Any]):
        s = self.settings
        # Split over pods: repository sources are dealt out whole (see build); the programs of
        # the other sources by program hash, their sources' dead letters kept by part 0 alone.
        shared = s.part.split and source["kind"] != "repository"
        for program in expand_source(source, s.seed, s.trace_limits, s.sandbox,
                                     s.cruxeval_held_out):
            if "_deadletter" in program:
                if not shared or s.part.index == 0:
                    yield beam.pvalue.TaggedOutput(DEADLETTER, program["_deadletter"])
                continue
            digest = program_hash(program["code"])
            if shared and not s.part.owns(digest):
                continue
            if digest in self.held_out:
                self.excluded.inc()
                yield beam.pvalue.TaggedOutput(EXCLUDED, program["source"])
            elif "_result" in program:
                self.episodes.inc()
                yield beam.pvalue.TaggedOutput(TRACED, program)
            else:
                self.read.inc()
                yield program


class Fuzz(beam.DoFn):
    """Functions without inputs get candidate inputs (more than needed: some will fail)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.candidates = Metrics.counter(NAMESPACE, "fuzz_candidates")

    def process(self, program: dict[str, Any]):
        if program.get("input") is not None:
            yield program
            return
        wanted = self.settings.spec.fuzz_inputs_per_function
        try:
            inputs = list(fuzz.candidate_inputs(program["code"], program["entry"], wanted * 4,
                                                self.settings.seed, program.get("examples", [])))
        except fuzz.FuzzError as err:
            yield beam.pvalue.TaggedOutput(DEADLETTER,
                                           program_dead_letter(program, "fuzz", str(err)))
            return
        if not inputs:
            yield beam.pvalue.TaggedOutput(DEADLETTER, program_dead_letter(
                program, "fuzz", "no candidate inputs (function takes no arguments?)"))
        for index, text in enumerate(inputs):
            self.candidates.inc()
            yield {**program, "input": text, "fuzz_of": program["id"], "fuzz_index": index,
                   "id": f"{program['id']}#{index}"}


class TraceProgram(beam.DoFn):
    """Trace one program in this worker's sandboxed fork server."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.traced = Metrics.counter(NAMESPACE, "traced")
        self.failed = Metrics.counter(NAMESPACE, "trace_failures")
        self.pool: TracePool | None = None
        self.count = 0
        self.started = 0.0

    def setup(self) -> None:
        self.pool = TracePool(self.settings.sandbox, workers=1,
                              trace_limits=self.settings.trace_limits)
        self.started = time.monotonic()

    def teardown(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def process(self, program: dict[str, Any]):
        if self.pool is None:
            self.setup()
        assert self.pool is not None
        result = self.pool.trace_json(program["code"], program["entry"], program["input"])
        self.count += 1
        if self.count % 500 == 0:
            LOG.info("traced %d programs in this worker (%.0f/s)", self.count,
                     self.count / max(1e-9, time.monotonic() - self.started))
        if isinstance(result, Failure):
            self.failed.inc()
            yield {**program, "_failure": {"stage": result.stage, "reason": result.reason,
                                           "detail": result.detail}}
        else:
            self.traced.inc()
            yield {**program, "_result": result}


def to_record(program: dict[str, Any], limits: TraceLimits) -> dict[str, Any]:
    """A traced program as an output record, or ``{"_deadletter": ...}`` when it failed or broke a
    limit. Pure."""
    if "_failure" in program:
        failure = program["_failure"]
        return {"_deadletter": program_dead_letter(program, failure["stage"], failure["reason"],
                                           failure["detail"])}
    result = program["_result"]    # TraceResult.to_json(): used as is, not rebuilt
    if result["truncated_reason"]:
        return {"_deadletter": program_dead_letter(program, "limits",
                                           f"trace limit: {result['truncated_reason']}")}
    if len(result["text"].encode("utf-8", "surrogatepass")) > limits.max_bytes:
        return {"_deadletter": program_dead_letter(program, "limits",
                                           f"trace limit: max_bytes ({limits.max_bytes})")}
    # Text spelling a special token (``<|frame_sep|>`` in a string) is kept: training encodes it
    # as ordinary text, the tokens come from the record's frames (cwm_jobs.tasks.trace_ids).
    record = {"id": program["id"], "source": program["source"],
              "program_hash": program_hash(program["code"]), "code": program["code"],
              "entry": program["entry"], "input": program["input"], "text": result["text"],
              "frames": result["frames"], "return": result["return_repr"],
              "exception": result["exception"], "truncated": False, "events": result["events"]}
    if "fuzz_of" in program:
        record["fuzz_of"], record["fuzz_index"] = program["fuzz_of"], program["fuzz_index"]
    for key in ("repository", "path", "test"):   # where a repository episode came from
        if key in program:
            record[key] = program[key]
    return record


class ApplyLimits(beam.DoFn):
    def __init__(self, limits: TraceLimits) -> None:
        self.limits = limits
        self.dropped = Metrics.counter(NAMESPACE, "dropped_by_limits")

    def process(self, program: dict[str, Any]):
        record = to_record(program, self.limits)
        if "_deadletter" in record:
            if "fuzz_of" in program:   # a rejected fuzz candidate is not a failure: drop it
                yield beam.pvalue.TaggedOutput("rejected", program["fuzz_of"])
                return
            self.dropped.inc()
            yield beam.pvalue.TaggedOutput(DEADLETTER, record["_deadletter"])
        else:
            yield record


def select_fuzzed(program_id: str, records: Iterable[dict[str, Any]], wanted: int,
                  share: float) -> list[dict[str, Any]]:
    """Keep up to ``wanted`` traces of a fuzzed function, at most its exception quota raising,
    in candidate order. Pure."""
    quota = exception_quota(program_id, wanted, share)
    ordered = sorted(records, key=lambda r: r["fuzz_index"])
    raising = [r for r in ordered if r["exception"] is not None][:quota]
    normal = [r for r in ordered if r["exception"] is None][: wanted - len(raising)]
    kept = sorted(normal + raising, key=lambda r: r["fuzz_index"])
    return [{k: v for k, v in r.items() if k not in ("fuzz_of", "fuzz_index")} for r in kept]


class SelectFuzzed(beam.DoFn):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.rejected = Metrics.counter(NAMESPACE, "fuzz_rejected")

    def process(self, item):
        program_id, grouped = item
        records = [r for r in grouped if isinstance(r, dict)]
        self.rejected.inc(sum(1 for r in grouped if not isinstance(r, dict)))
        spec = self.settings.spec
        kept = select_fuzzed(program_id, records, spec.fuzz_inputs_per_function,
                             spec.exception_share)
        if not kept:
            yield beam.pvalue.TaggedOutput(DEADLETTER, program_dead_letter(
                {"id": program_id, "source": "functions"}, "fuzz",
                "no fuzzed input finished within the limits"))
        yield from kept


def shard_key(record: dict[str, Any], shards: int, validation_fraction: float):
    """``((split, shard), (content hash, record))``: the shard comes from the trace text's hash,
    so duplicates meet in one group and one shuffle both deduplicates and shards. (Equal texts
    hold equal sources, hence equal program hashes and the same split.)"""
    digest = content_hash(record)
    split = split_of(record["program_hash"], validation_fraction)
    return (split, int(digest[:8], 16) % shards), (digest, record)


def deduplicate_shard(item) -> tuple[tuple[str, int], list[dict[str, Any]]]:
    """One shard's records, one per trace text (the smallest id), sorted by id. Pure."""
    key, keyed = item
    kept: dict[str, dict[str, Any]] = {}
    for digest, record in keyed:
        if digest not in kept or record["id"] < kept[digest]["id"]:
            kept[digest] = record
    return key, sorted(kept.values(), key=lambda r: r["id"])


class CountDeadLetters(beam.DoFn):
    def process(self, record: dict[str, Any]):
        Metrics.counter(NAMESPACE, f"deadletter_{record['stage']}").inc()
        yield record


# --------------------------------------------------------------------------------------------
# Composite transforms


class TraceDataset(StepTransform):
    """Source descriptors in; ``{"train", "validation", "deadletter"}`` PCollections out, and
    ``"shards"``: ``((split, shard), records)``, each output shard's records, ready to write."""

    def expand(self, source_descriptors):
        s = self.settings
        read = (source_descriptors
                | "ExpandSources" >> beam.ParDo(ExpandSource(s)).with_outputs(
                    DEADLETTER, TRACED, EXCLUDED, main="programs"))
        fuzzed = (read.programs
                  | "Fuzz" >> beam.ParDo(Fuzz(s)).with_outputs(DEADLETTER, main="programs"))
        traced = (fuzzed.programs
                  | "Redistribute" >> beam.Reshuffle()
                  | "TraceInSandbox" >> beam.ParDo(TraceProgram(s)))
        checked = ((traced, read[TRACED])
                   | "WithEpisodes" >> beam.Flatten()
                   | "ApplyLimits" >> beam.ParDo(ApplyLimits(s.trace_limits)).with_outputs(
                       DEADLETTER, "rejected", main="records"))
        direct = checked.records | "NotFuzzed" >> beam.Filter(lambda r: "fuzz_of" not in r)
        selected = (
            (checked.records | "Fuzzed" >> beam.Filter(lambda r: "fuzz_of" in r)
             | "KeyByFunction" >> beam.Map(lambda r: (r["fuzz_of"], r)),
             checked.rejected | "KeyRejected" >> beam.Map(lambda pid: (pid, "rejected")))
            | "MergeCandidates" >> beam.Flatten()
            | "GroupCandidates" >> beam.GroupByKey()
            | "SelectFuzzed" >> beam.ParDo(SelectFuzzed(s)).with_outputs(
                DEADLETTER, main="records"))
        shards = (
            (direct, selected.records)
            | "AllRecords" >> beam.Flatten()
            | "KeyByShard" >> beam.Map(shard_key, s.spec.shards, s.spec.validation_fraction)
            | "GroupShards" >> beam.GroupByKey()
            | "Deduplicate" >> beam.Map(deduplicate_shard))
        splits = {name: (shards
                         | f"{name.title()}Records" >> beam.FlatMap(
                             lambda item, n=name: item[1] if item[0][0] == n else []))
                  for name in ("train", "validation")}
        dead = ((read[DEADLETTER], fuzzed[DEADLETTER], checked[DEADLETTER],
                 selected[DEADLETTER])
                | "AllDeadLetters" >> beam.Flatten()
                | "CountDeadLetters" >> beam.ParDo(CountDeadLetters()))
        return {"train": splits["train"], "validation": splits["validation"],
                "deadletter": dead, "shards": shards, EXCLUDED: read[EXCLUDED]}


# --------------------------------------------------------------------------------------------
# Entry point (all reads and writes)


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", action="append", default=[],
                        help="cruxeval | synthetic:COUNT | jsonl:URI | functions:URI | "
                        "repository:PATH_OR_GIT_URL")
    parser.add_argument("--validation-fraction", type=float, default=None)
    parser.add_argument("--cruxeval-held-out", type=int, default=None,
                        help="CRUXEval problems held out for evaluation, never traced "
                        "(over the configuration's evaluation.cruxevalHeldOut; default 800)")
    explain = parser.add_argument_group("explained traces (over the configuration's explain)")
    for flag, kind in (("endpoint", str), ("model", str), ("api-key-env", str),
                       ("max-tokens", int), ("concurrency", int), ("fraction", float),
                       ("max-records", int)):
        explain.add_argument(f"--explain-{flag}", type=kind, default=None)


def apply_flags(flags: argparse.Namespace, spec: dict[str, Any],
                evaluation: dict[str, Any]) -> None:
    if flags.cruxeval_held_out is not None:
        evaluation["cruxevalHeldOut"] = flags.cruxeval_held_out
    if flags.source:
        spec["sources"] = [source_from_flag(s) for s in flags.source]
    if flags.validation_fraction is not None:
        spec["validationFraction"] = flags.validation_fraction
    given = {name: getattr(flags, f"explain_{name}") for name in (
        "endpoint", "model", "api_key_env", "max_tokens", "concurrency", "fraction",
        "max_records")}
    given = {_camel(name): value for name, value in given.items() if value is not None}
    if given:
        spec["explain"] = {**(spec.get("explain") or {}), **given}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word.title() for word in rest)


def source_from_flag(text: str) -> dict[str, Any]:
    kind, _, value = text.partition(":")
    if kind == "synthetic":
        return {"kind": kind, "count": int(value or 100)}
    if kind in ("jsonl", "functions", "repository"):
        return {"kind": kind, "uri": value}
    if kind == "cruxeval":
        return {"kind": kind, **({"count": int(value)} if value else {})}
    raise ValueError(f"--source {text!r}: kind must be one of {', '.join(SOURCE_KINDS)}")


def build(pipeline: beam.Pipeline, settings: Settings, output: str) -> None:
    part = settings.part
    sources = [src for i, src in enumerate(settings.sources)
               if src["kind"] != "repository" or part.owns_position(i)]
    outputs = (pipeline | "Sources" >> beam.Create(sources)
               | "TraceDataset" >> TraceDataset(settings))
    # The shards come keyed from deduplication: (split, shard) -> its records.
    shards = settings.spec.shards
    outputs["shards"] | "WriteSplits" >> beam.Map(
        lambda item: write_rows(output, item[0][0], item[0][1], shards, item[1]))
    outputs["deadletter"] | "WriteDeadletterSplit" >> WriteShards(output, "deadletter", 1)
    (outputs[EXCLUDED]
     | "CountExcluded" >> beam.combiners.Count.PerElement()
     | "WriteExcludedCounts" >> beam.Map(write_count, output, EXCLUDED))
    if settings.explain is not None:
        explain_train(outputs["train"], settings, output)


def explain_train(train, settings: Settings, output: str) -> None:
    """The train split's explanations, asked and written (``explained``, ``explain_rejected``
    and the verdicts' counts). The endpoint is checked here, before the pipeline runs; the key's
    variable becomes a credential name, so sandboxes never get it (see the module docstring)."""
    asking = settings.explain
    assert asking is not None and settings.spec.explain is not None
    if asking.api_key_env:
        names = os.environ.get(storage.CREDENTIAL_NAMES_VAR, "")
        os.environ[storage.CREDENTIAL_NAMES_VAR] = ",".join(
            n for n in (names, asking.api_key_env) if n)
    check_endpoint(asking)
    pairs = train | "ExplainTrain" >> ExplainSample(asking, settings.spec.explain.fraction,
                                                     settings.explain_cap)
    (pairs | "KeptExplanations" >> beam.FlatMap(lambda p: [p[1]] if p[0] == KEPT else [])
     | "WriteExplainedSplit" >> WriteShards(output, EXPLAINED, settings.spec.shards))
    (pairs | "RejectedExplanations" >> beam.FlatMap(lambda p: [p[1]] if p[0] != KEPT else [])
     | "WriteRejectedSplit" >> WriteShards(output, EXPLAIN_REJECTED, 1))
    (pairs | "Verdicts" >> beam.Map(lambda p: p[0])
     | "CountVerdicts" >> beam.combiners.Count.PerElement()
     | "WriteVerdictCounts" >> beam.Map(write_count, output, EXPLAIN_COUNTS))


def tally(output: str, settings: Settings) -> tuple[dict[str, list[artifacts.Shard]],
                                                    dict[str, Any], dict[str, list[str]]]:
    """After the pipeline: the data set's shards (empty ones where a split got nothing), its
    stats and each split's program hashes."""
    shards = settings.spec.shards
    splits = {"train": shards, "validation": shards, "deadletter": 1}
    if settings.explain is not None:
        splits |= {EXPLAINED: shards, EXPLAIN_REJECTED: 1}
    written, rows = read_splits(output, splits)
    stats: dict[str, Any] = {"sources": list(settings.sources),
                             "excluded_for_evaluation": dict(read_counts(output, EXCLUDED))}
    for name in ("train", "validation"):
        stats[f"{name}_by_source"] = dict(Counter(r["source"] for r in rows[name]))
    for name in ("train", "validation", "deadletter"):
        stats[f"{name}_records"] = sum(s.records for s in written[name])
    stats["deadletter_reasons"] = dict(Counter(f"{r['stage']}: {r['reason'].split(' (')[0]}"
                                               for r in rows["deadletter"]))
    if settings.explain is not None:
        stats[EXPLAIN_COUNTS] = explain_stats(read_counts(output, EXPLAIN_COUNTS),
                                              settings.explain.model)
        stats[f"{EXPLAINED}_records"] = sum(s.records for s in written[EXPLAINED])
    return written, stats, programs(rows)


def explain_stats(counts: Counter, model: str) -> dict[str, Any]:
    """``stats.explain``: every verdict's count and how many traces were asked for (pure).

    Raises when the endpoint answered none of this part's requests (all ``endpoint_error``:
    it went away after the check), so that no empty split is committed as if the model had
    been asked. Requests it answered with a refusal (``request_refused``, a 4xx such as a prompt
    longer than its context) are the model's answer for those traces: counted, not fatal."""
    verdicts: dict[str, int] = {kind: int(counts.get(kind, 0)) for kind in VERDICTS}
    asked = sum(n for kind, n in verdicts.items() if kind != "skipped")
    if asked and verdicts["endpoint_error"] == asked:
        raise EndpointError(f"explain: the endpoint answered none of {asked} requests (each "
                            f"one's error is in the {EXPLAIN_REJECTED} split's detail)")
    if not asked:
        LOG.warning("explain: no train trace was asked for (none sampled, or none returned)")
    return {"model": model, "asked": asked, "rejected": asked - verdicts[KEPT], **verdicts}


def programs(rows: dict[str, list[dict[str, Any]]]) -> dict[str, list[str]]:
    """The manifest's ``programs``: each split's program hashes, sorted (``explained``: a
    subset of ``train``'s, listed when it is there). Pure."""
    return {name: sorted({r["program_hash"] for r in rows[name]})
            for name in ("train", "validation", EXPLAINED) if name in rows}


def throughput(stats: dict[str, Any], seconds: float) -> dict[str, float]:
    traces = stats["train_records"] + stats["validation_records"]
    return {"traces_per_second": round(traces / max(seconds, 1e-9), 1)}


def describe(settings: Settings) -> str:
    explain = settings.explain
    asking = f", explained by {explain.model} at {explain.endpoint}" if explain else ""
    return f"tracing {[source['kind'] for source in settings.sources]}{asking}"


def summary(stats: dict[str, Any]) -> str:
    explain = stats.get(EXPLAIN_COUNTS)
    explained = (f"; explanations: {explain['kept']} kept of {explain['asked']} asked "
                 f"({', '.join(f'{explain[k]} {k}' for k in VERDICTS if k != KEPT)})"
                 if explain else "")
    return (f"wrote {stats['train_records']} train, {stats['validation_records']} validation, "
            f"{stats['deadletter_records']} dead letters in {stats['seconds']:.1f}s "
            f"({stats['traces_per_second']:.1f} traces/s){explained}")


STEP = DataStep(module="cwm_beam.traces", doc=__doc__, kind=NAMESPACE, settings=Settings,
                names_job="source", add_flags=add_flags, apply_flags=apply_flags, build=build,
                tally=tally, throughput=throughput, describe=describe, summary=summary)
# ``run(argv)``: parse, build, run, write the manifest; returns its stats and timing.
load_job, run = STEP.load_job, STEP.run

if __name__ == "__main__":
    run()
