"""ForagerAgent trajectory data set: repositories → tasks → validation → rollouts → dedup → shards.

Run as a pipeline step (configuration from ``$CWM_STEP_CONFIG`` or ``--config FILE``; section
``TrajectoryDataSpec`` in ``spec``, ``data.sandbox`` and ``data.beam`` beside it)::

    python -m cwm_beam.trajectories --config step.json

or standalone with plain flags::

    python -m cwm_beam.trajectories --repo toolz==1.0.0 --repo cachetools==5.5.0 \\
        --tasks-per-repo 20 --output /tmp/trajectories --workers 2
    python -m cwm_beam.trajectories --repo calc --policy openai \\
        --endpoint http://localhost:8000/v1 --model cwm --output /tmp/t   # a served model

Runner options are the trace pipeline's (:func:`cwm_beam.step.pipeline_for`): the in-process
``FnApiRunner`` with ``--workers N`` processes by default, other runners' flags passed through.

Steps (CamelCase labels in the graph): ``SynthesizeTasks`` prepares each repository (fetch,
sandboxed suite run with coverage) and proposes mutate-fix candidates; ``ValidateTasks`` keeps
those whose covering tests fail on the mutated code; ``SelectTasks`` keeps ``tasksPerRepository``
per repository balanced over families; ``Rollouts`` runs one episode per task (failed episodes
kept); ``Deduplicate`` drops near-duplicate trajectories within a repository (MinHash, Jaccard
at or above ``dedupJaccard`` over the concatenated actions). Output: a ``cwm-dataset/v1`` folder
of kind ``trajectories`` with ``train-*``, ``deadletter-*`` and ``eval_tasks-*`` shards (validated
tasks per repository never rolled out: the evaluation's mutate-fix tasks), records
``{"id", "messages", "meta"}`` in train; the manifest's ``stats`` holds counts, solve rates per family and
rejection reasons. Beam metrics live in namespace ``trajectories``.

The openai policy's API key comes from ``$CWM_POLICY_API_KEY`` (the operator mounts the Secret
named by ``policy.apiKeySecret`` there) or ``$OPENAI_API_KEY``.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics

from cwm_forager.mutations import FAMILIES
from cwm_beam.parts import Part, job_part
from cwm_exec import sandbox
from cwm_exec.sandbox import Limits
from cwm_spec import storage
from cwm_beam.step import (add_common_flags, local_workers, merge_when_complete, output_and_runner,
                           part_label, pipeline_for, read_step, run_as_parts, target_of)
from cwm_beam.traces import WriteShards, shard_file

LOG = logging.getLogger("cwm_beam.trajectories")
NAMESPACE = "trajectories"
DEADLETTER = "deadletter"
OVERSAMPLE = 2  # candidates validated per wanted task (rejects leave room)


@dataclass(frozen=True)
class Settings:
    """The trajectory step's settings (``TrajectoryDataSpec`` plus sandbox limits)."""

    repositories: tuple[dict[str, Any], ...]
    tasks_per_repository: int = 20
    held_out_tasks: int = 4
    families: tuple[str, ...] = FAMILIES
    policy: dict[str, Any] = field(default_factory=lambda: {"kind": "search", "maxTurns": 30})
    max_turns: int = 128
    max_observation_chars: int = 8000
    action_timeout: float = 60.0
    dedup_jaccard: float = 0.5
    shards: int = 2
    seed: int = 0
    limits: Limits = field(default_factory=Limits)
    part: Part = field(default_factory=Part)  # this pod's part of an Indexed Job

    @property
    def episode_turns(self) -> int:
        """The policy's budget, never above the hard cap (CWM: 128)."""
        return min(int(self.policy.get("maxTurns", self.max_turns)), self.max_turns)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], sandbox: dict[str, Any] | None = None,
                  seed: int | None = None) -> "Settings":
        """Validate with the CWMPipeline model (:class:`cwm_spec.api.TrajectoryDataSpec`)."""
        from cwm_spec.api import TrajectoryDataSpec

        parsed = TrajectoryDataSpec.model_validate(spec)
        repositories = tuple(r.model_dump(exclude_none=True) for r in parsed.repositories) or (
            {"path": "calc"}, {"path": "textkit"})  # the bundled fixture repositories
        return cls(
            repositories=repositories, tasks_per_repository=parsed.tasks_per_repository,
            held_out_tasks=parsed.held_out_tasks,
            families=tuple(parsed.mutation_families),
            policy=parsed.policy.model_dump(mode="json", by_alias=True, exclude_none=True),
            max_turns=parsed.max_turns, max_observation_chars=parsed.max_observation_chars,
            action_timeout=parsed.action_timeout_seconds, dedup_jaccard=parsed.dedup_jaccard,
            shards=parsed.shards, seed=parsed.seed if seed is None else seed,
            limits=Limits.from_spec(sandbox))


def dead_letter(key: str, stage: str, reason: str, detail: str = "") -> dict[str, Any]:
    Metrics.counter(NAMESPACE, f"deadletter_{stage}").inc()
    return {"id": key, "stage": stage, "reason": reason, "detail": detail[-4000:]}


def repo_key(spec: dict[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True)


class _Environments:
    """Prepared repository environments, shared by every DoFn instance of one worker process:
    a runner may create DoFn instances per stage or per bundle, but each repository is prepared
    (fetched, copied, its suite run) once per process. Removed when the process exits."""

    _shared: dict[str, Any] = {}  # sandbox limits -> forager.env.Environments

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def get(self, spec: dict[str, Any]):
        from cwm_forager.env import Environments

        key = repr(self.settings.limits)
        if key not in _Environments._shared:
            envs = Environments(self.settings.limits, "cwm-trajectories-")
            atexit.register(envs.close)
            _Environments._shared[key] = envs
        return _Environments._shared[key].get(spec)


class _WithEnvironments(beam.DoFn):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.envs: _Environments | None = None

    def setup(self) -> None:
        self.envs = _Environments(self.settings)


class SynthesizeTasks(_WithEnvironments):
    """Repository spec → candidate tasks (unvalidated), or a dead letter if it cannot be
    prepared (fetch failed, no passing test)."""

    def process(self, spec: dict[str, Any]):
        from cwm_forager.tasks import candidate_tasks

        s = self.settings
        try:
            env = self.envs.get(spec)
            tasks = candidate_tasks(env, s.families,
                                    OVERSAMPLE * (s.tasks_per_repository + s.held_out_tasks), s.seed)
        except Exception as err:
            yield beam.pvalue.TaggedOutput(DEADLETTER, dead_letter(
                repo_key(spec), "prepare", f"{type(err).__name__}: {err}".splitlines()[0],
                traceback.format_exc()))
            return
        Metrics.counter(NAMESPACE, "candidates").inc(len(tasks))
        for task in tasks:
            yield {"repository": spec, "task": task.to_json()}


class ValidateTask(_WithEnvironments):
    """Keep a candidate only if some covering test fails on the mutated code."""

    def process(self, item: dict[str, Any]):
        from cwm_forager.tasks import Task, validate_task

        try:
            task = Task.from_json(item["task"])
            result = validate_task(self.envs.get(item["repository"]), task)
        except Exception as err:
            yield beam.pvalue.TaggedOutput(DEADLETTER, dead_letter(
                item.get("task", {}).get("task_id", "?"), "validate",
                f"{type(err).__name__}: {err}".splitlines()[0], traceback.format_exc()))
            return
        if isinstance(result, str):
            Metrics.counter(NAMESPACE, "rejected").inc()
            yield beam.pvalue.TaggedOutput("rejected", result.split(":")[0])
            return
        Metrics.counter(NAMESPACE, "validated").inc()
        yield {"repository": item["repository"], "task": result.to_json()}


def select_for_repository(item: tuple[str, Iterable[dict[str, Any]]], families: tuple[str, ...],
                          n: int, held_out: int):
    """``n`` tasks for the rollouts; then up to ``held_out`` of the rest, never rolled out, as
    the ``heldout`` output (the evaluation's mutate-fix tasks)."""
    from cwm_forager.tasks import Task, select_tasks

    _, items = item
    items = list(items)
    spec = items[0]["repository"]
    tasks = [Task.from_json(i["task"]) for i in items]
    chosen = select_tasks(tasks, families, n)
    for task in chosen:
        yield {"repository": spec, "task": task.to_json()}
    taken = {t.task_id for t in chosen}
    for task in select_tasks([t for t in tasks if t.task_id not in taken], families, held_out):
        yield beam.pvalue.TaggedOutput(
            "heldout", {"id": task.task_id, "repository": spec, "task": task.to_json()})


class Rollout(_WithEnvironments):
    """One episode per task; the trajectory is kept whether or not it solved the task."""

    def setup(self) -> None:
        super().setup()
        from cwm_forager.policies import make_policy

        key = os.environ.get("CWM_POLICY_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.policy = make_policy(self.settings.policy, key)

    def process(self, item: dict[str, Any]):
        from cwm_forager.rollout import run_episode
        from cwm_forager.tasks import Task

        s = self.settings
        try:
            task = Task.from_json(item["task"])
            trajectory = run_episode(self.envs.get(item["repository"]), task, self.policy,
                                     s.episode_turns, max_observation_chars=s.max_observation_chars,
                                     action_timeout=s.action_timeout)
        except Exception as err:
            yield beam.pvalue.TaggedOutput(DEADLETTER, dead_letter(
                item.get("task", {}).get("task_id", "?"), "rollout",
                f"{type(err).__name__}: {err}".splitlines()[0], traceback.format_exc()))
            return
        Metrics.counter(NAMESPACE, "episodes").inc()
        if trajectory.success:
            Metrics.counter(NAMESPACE, "solved").inc()
        record = trajectory.to_record()
        record["id"] = f"{task.task_id}#{trajectory.meta['episode_id'][:8]}"
        record["meta"]["repository"] = item["repository"]
        record["task"] = task.to_json()  # RL's mutate-fix tasks are drawn from the train split
        yield record


class Deduplicate(beam.DoFn):
    """Within one repository: MinHash near-duplicates (over the actions) are dropped."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def process(self, item: tuple[str, Iterable[dict[str, Any]]]):
        from cwm_forager.records import dedup

        _, records = item
        kept, dropped = dedup(list(records), self.threshold)
        Metrics.counter(NAMESPACE, "duplicates").inc(len(dropped))
        for record in kept:
            yield record
        for record in dropped:  # counted (repository, family, solved) for the stats
            meta = record["meta"]
            yield beam.pvalue.TaggedOutput(
                "duplicates", f"{meta['repo']}|{meta['family']}|{int(bool(meta['success']))}")


class TrajectoryDataset(beam.PTransform):
    """Repository specs in; ``{"train", "deadletter"}`` records out, and counter keys:
    ``rejected`` (reason), ``duplicates`` (repo|family|solved), ``tasks`` (repo|family)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings

    def expand(self, repositories):
        s = self.settings
        candidates = (repositories
                      | "SynthesizeTasks" >> beam.ParDo(SynthesizeTasks(s)).with_outputs(
                          DEADLETTER, main="tasks"))
        validated = (candidates.tasks
                     | "SpreadCandidates" >> beam.Reshuffle()
                     | "ValidateTasks" >> beam.ParDo(ValidateTask(s)).with_outputs(
                         DEADLETTER, "rejected", main="tasks"))
        selected = (validated.tasks
                    | "KeyTasksByRepository" >> beam.Map(lambda i: (repo_key(i["repository"]), i))
                    | "GroupTasks" >> beam.GroupByKey()
                    | "SelectTasks" >> beam.FlatMap(select_for_repository, s.families,
                                                    s.tasks_per_repository, s.held_out_tasks)
                    .with_outputs("heldout", main="tasks"))
        held_out = selected.heldout
        selected = selected.tasks
        tasks_kept = selected | "TaskKeys" >> beam.Map(
            lambda i: f"{i['task']['repo']}|{i['task']['family']}")
        episodes = (selected
                    | "SpreadTasks" >> beam.Reshuffle()
                    | "Rollouts" >> beam.ParDo(Rollout(s)).with_outputs(DEADLETTER, main="records"))
        unique = (episodes.records
                  | "KeyByRepository" >> beam.Map(lambda r: (r["meta"]["repo"], r))
                  | "GroupByRepository" >> beam.GroupByKey()
                  | "Deduplicate" >> beam.ParDo(Deduplicate(s.dedup_jaccard)).with_outputs(
                      "duplicates", main="records"))
        dead = ((candidates[DEADLETTER], validated[DEADLETTER], episodes[DEADLETTER])
                | "AllDeadLetters" >> beam.Flatten())
        return {"train": unique.records, "deadletter": dead, "rejected": validated.rejected,
                "duplicates": unique.duplicates, "tasks": tasks_kept, "eval_tasks": held_out}


# --------------------------------------------------------------------------------------------
# Entry point (all reads and writes)


def parse_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m cwm_beam.trajectories", description=__doc__)
    parser.add_argument("--repo", action="append", default=[],
                        help="name==version (PyPI sdist), a folder, or a git URL[#ref]")
    add_common_flags(parser)
    parser.add_argument("--tasks-per-repo", type=int, default=None)
    parser.add_argument("--held-out-tasks", type=int, default=None,
                        help="tasks per repository kept out of the rollouts, for evaluation")
    parser.add_argument("--families", default=None, help="comma-separated mutation families")
    parser.add_argument("--policy", choices=("search", "openai"), default=None)
    parser.add_argument("--endpoint", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-turns", type=int, default=None, help="the policy's turn budget")
    return parser.parse_known_args(argv)


def repo_from_flag(text: str) -> dict[str, Any]:
    """``name==version`` (PyPI), ``URL[#ref]`` (git: a URL or a path ending in .git), or a
    folder."""
    if "==" in text:
        return {"pypi": text}
    url, _, ref = text.partition("#")
    if "://" in url or url.endswith(".git") or url.startswith("git@"):
        return {"git": url, **({"ref": ref} if ref else {})}
    return {"path": text}


def load_job(argv: list[str]) -> tuple[Settings, str, dict[str, Any], list[str]]:
    """Settings, output folder, beam section and Beam flags: the step config (when given)
    overridden by plain flags."""
    flags, rest = parse_flags(argv)
    step = read_step(rest, named_by_flags=bool(flags.repo or flags.output))
    config, spec = step.config, step.spec
    if flags.repo:
        spec["repositories"] = [repo_from_flag(r) for r in flags.repo]
    if flags.tasks_per_repo is not None:
        spec["tasksPerRepository"] = flags.tasks_per_repo
    if flags.held_out_tasks is not None:
        spec["heldOutTasks"] = flags.held_out_tasks
    if flags.families:
        spec["mutationFamilies"] = [f.strip() for f in flags.families.split(",") if f.strip()]
    policy = dict(spec.get("policy") or {})
    for key, value in (("kind", flags.policy), ("endpoint", flags.endpoint),
                       ("model", flags.model), ("maxTurns", flags.max_turns)):
        if value is not None:
            policy[key] = value
    if policy:
        spec["policy"] = policy
    if flags.shards is not None:
        spec["shards"] = flags.shards
    seed = flags.seed if flags.seed is not None else config.get("seed", spec.get("seed"))
    settings = replace(Settings.from_spec(spec, step.sandbox, seed=seed),
                       part=job_part(flags.part, flags.parts))
    return (settings, *output_and_runner(flags, step))


def build(pipeline: beam.Pipeline, settings: Settings, output: str) -> None:
    mine = [r for i, r in enumerate(settings.repositories) if settings.part.owns_position(i)]
    outputs = (pipeline | "Repositories" >> beam.Create(mine)
               | "TrajectoryDataset" >> TrajectoryDataset(settings))
    outputs["train"] | "WriteTrainSplit" >> WriteShards(output, "train", settings.shards)
    outputs["deadletter"] | "WriteDeadletterSplit" >> WriteShards(output, "deadletter", 1)
    outputs["eval_tasks"] | "WriteEvalTasksSplit" >> WriteShards(output, "eval_tasks", 1)
    for name in ("rejected", "duplicates", "tasks"):
        (outputs[name]
         | f"Count{name.title()}" >> beam.combiners.Count.PerElement()
         | f"Write{name.title()}Counts" >> beam.Map(_write_count, output, name))


def _write_count(item: tuple[str, int], output: str, name: str) -> None:
    """Side counters for the manifest's stats, one small file per key under ``_stats/``."""
    import hashlib

    key, count = item
    path = storage.join(output, "_stats", name, hashlib.sha1(key.encode()).hexdigest()[:12])
    storage.write_json_atomic(path, {"key": key, "count": count})


def finish(output: str, settings: Settings, seconds: float) -> dict[str, Any]:
    """After the pipeline: empty shards where a split got nothing, stats, manifest last."""
    from cwm_forager.records import solve_rates
    from cwm_spec import artifacts

    shards: dict[str, list[artifacts.Shard]] = {}
    stats: dict[str, Any] = {"repositories": list(settings.repositories),
                             "policy": settings.policy, "families": list(settings.families)}
    rows_by_split: dict[str, list[dict[str, Any]]] = {}
    for name, count in (("train", settings.shards), ("deadletter", 1), ("eval_tasks", 1)):
        shards[name] = []
        for index in range(count):
            shard, rows = artifacts.read_shard(output, shard_file(name, index, count))
            shards[name].append(shard)
            rows_by_split.setdefault(name, []).extend(rows)
    train, dead = rows_by_split["train"], rows_by_split["deadletter"]
    counted: dict[str, Counter] = {}
    for name in ("rejected", "duplicates", "tasks"):
        counts: Counter = Counter()
        fs, base = storage.filesystem(artifacts.join(output, "_stats", name))
        if fs.exists(base):
            for path in fs.ls(base, detail=False):
                with fs.open(path, "r") as f:
                    item = json.load(f)
                counts[item["key"]] += item["count"]
            fs.rm(base, recursive=True)
        counted[name] = counts
    stats["rejected"] = dict(counted["rejected"])
    stats["duplicates"] = sum(counted["duplicates"].values())
    stats["train_records"] = len(train)
    stats["deadletter_records"] = len(dead)
    stats["eval_tasks"] = len(rows_by_split["eval_tasks"])
    stats["deadletter_reasons"] = dict(Counter(f"{r['stage']}: {r['reason']}" for r in dead))
    by_repo: dict[str, dict[str, int]] = {}
    for key, count in sorted(counted["tasks"].items()):
        repo, family = key.split("|")
        by_repo.setdefault(repo, {})[family] = count
    stats["tasks_by_repository_family"] = by_repo
    # every episode counts for the solve rates, near-duplicates dropped from the data included
    episodes = [{"meta": {"family": r["meta"]["family"], "success": r["meta"]["success"]}}
                for r in train]
    for key, count in counted["duplicates"].items():
        _, family, solved = key.split("|")
        episodes += [{"meta": {"family": family, "success": solved == "1"}}] * count
    stats["episodes"] = len(episodes)
    stats["solve_rate_by_family"] = solve_rates(episodes)
    stats["seconds"] = round(seconds, 2)
    stats["rollouts_per_minute"] = round(60 * len(episodes) / max(seconds, 1e-9), 2)
    stats["sandbox"] = sandbox.isolation_record()  # how its programs were contained
    artifacts.write_manifest(output, artifacts.Manifest("trajectories", shards, stats))
    return stats


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse, build, run, write the manifest; returns the manifest's stats."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("cwm_beam").setLevel(logging.INFO)   # this step and its helpers
    args = list(sys.argv[1:] if argv is None else argv)
    settings, output, beam_section, beam_flags = load_job(args)
    LOG.info("trajectories for %d repositories into %s (runner %s, workers %s, policy %s)",
             len(settings.repositories), output, beam_section.get("runner", "in-process"),
             beam_section.get("workers", 1), settings.policy.get("kind"))
    # Decided before any program runs: fails the step here when CWM_SANDBOX=bwrap cannot hold.
    LOG.info("sandbox: %s", sandbox.describe_isolation())
    workers = local_workers(beam_section, beam_flags)
    if workers > 1:
        stats, seconds = run_as_parts("cwm_beam.trajectories", args, settings.part, workers,
                                      output)
        stats["seconds"] = round(seconds, 2)
        stats["rollouts_per_minute"] = round(60 * stats["episodes"] / max(seconds, 1e-9), 2)
        LOG.info("%d processes wrote %d trajectories, %d dead letters in %.1fs (%.2f "
                 "rollouts/min)", workers, stats["train_records"], stats["deadletter_records"],
                 seconds, stats["rollouts_per_minute"])
        return stats
    started = time.monotonic()
    part = settings.part
    target = target_of(output, part)
    pipeline = pipeline_for(beam_section, beam_flags)
    build(pipeline, settings, target)
    pipeline.run().wait_until_finish()
    stats = finish(target, settings, time.monotonic() - started)
    LOG.info("wrote %d trajectories, %d dead letters in %.1fs (%.2f rollouts/min); solve rates "
             "%s%s", stats["train_records"], stats["deadletter_records"], stats["seconds"],
             stats["rollouts_per_minute"], stats["solve_rate_by_family"], part_label(part))
    merge_when_complete(output, part)
    return stats


if __name__ == "__main__":
    run()
