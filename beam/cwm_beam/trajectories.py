"""ForagerAgent trajectory data set: repositories → tasks → validation → rollouts → dedup → shards.

Run as a pipeline step (configuration from ``$CWM_STEP_CONFIG`` or ``--config FILE``, as the plan
writes it: ``TrajectoryDataSpec`` in ``spec``, validated by that model; ``sandbox`` and
``runtime.beam`` beside it)::

    python -m cwm_beam.trajectories --config step.json

or standalone with plain flags::

    python -m cwm_beam.trajectories --repo toolz==1.0.0 --repo cachetools==5.5.0 \\
        --tasks-per-repo 20 --output /tmp/trajectories --workers 2
    python -m cwm_beam.trajectories --repo calc --policy openai \\
        --endpoint http://localhost:8000/v1 --model cwm --output /tmp/t   # a served model

The runner is the one both data steps share (:meth:`cwm_beam.step.DataStep.run`): the in-process
``FnApiRunner`` with ``--workers N`` processes by default, other runners' flags passed through.

Steps (CamelCase labels in the graph): ``SynthesizeTasks`` prepares each repository (fetch,
sandboxed suite run with coverage) and proposes mutate-fix candidates; ``ValidateTasks`` keeps
those whose covering tests fail on the mutated code; ``SelectTasks`` keeps ``tasksPerRepository``
per repository balanced over families; ``Rollouts`` runs one episode per task (failed episodes
kept); ``Deduplicate`` drops near-duplicate trajectories within a repository (MinHash, Jaccard
at or above ``dedupJaccard`` over the concatenated actions). Output: a ``cwm-dataset/v1`` folder
of kind ``trajectories`` with ``train-*``, ``deadletter-*`` and ``eval_tasks-*`` shards (validated
tasks per repository never rolled out: the evaluation's mutate-fix tasks), records
``{"id", "messages", "meta"}`` in train, dead letters (:func:`counted_dead_letter`) ``{"id",
"stage", "reason", "detail"}``; the manifest's ``stats`` holds counts, solve rates per family and
rejection reasons. Beam metrics live in namespace ``trajectories``.

Decontamination: ``SelectTasks`` chooses each repository's held-out tasks first, then the
training tasks among the candidates whose function is none of theirs (a task's program is its
function's original source, :func:`cwm_spec.programs.task_program_hash`), so no trajectory shows
the code an evaluation task asks to restore; ``stats.excluded_for_evaluation`` counts the
candidates left out that way, and the manifest's ``programs`` lists the task programs of
``train`` and ``eval_tasks``.

The openai policy's API key comes from ``$CWM_POLICY_API_KEY`` (the operator mounts the Secret
named by ``policy.apiKeySecret`` there) or ``$OPENAI_API_KEY``.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import traceback
from collections import Counter
from collections.abc import Iterable
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from cwm_beam import step as data_step
from cwm_forager.env import Environments
from cwm_forager.policies import make_policy
from cwm_forager.records import dedup, solve_rates
from cwm_forager.rollout import run_episode
from cwm_forager.tasks import Task, candidate_tasks, select_tasks, validate_task
from cwm_spec import artifacts
from cwm_spec.api import TrajectoryDataSpec
from cwm_spec.programs import task_program_hash

LOG = logging.getLogger("cwm_beam.trajectories")
NAMESPACE = "trajectories"
DEADLETTER = "deadletter"
OVERSAMPLE = 2  # candidates validated per wanted task (rejects leave room)


class Settings(data_step.StepSettings[TrajectoryDataSpec]):
    """The trajectory step's settings (see :class:`cwm_beam.step.StepSettings`)."""

    model = TrajectoryDataSpec

    @property
    def repositories(self) -> tuple[dict[str, Any], ...]:
        """As the YAML spells them; none given: the bundled fixture repositories."""
        return tuple(r.model_dump(exclude_none=True) for r in self.spec.repositories) or (
            {"path": "calc"}, {"path": "textkit"})

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(self.spec.mutation_families)

    @property
    def policy(self) -> dict[str, Any]:
        return self.spec.policy.model_dump(mode="json", by_alias=True, exclude_none=True)

    @property
    def episode_turns(self) -> int:
        """The policy's budget, never above the hard cap (CWM: 128)."""
        return min(self.spec.policy.max_turns, self.spec.max_turns)


def counted_dead_letter(key: str, stage: str, reason: str, detail: str = "") -> dict[str, Any]:
    """The dead letter of a repository or task (``key``), counted in the Beam metrics here; the
    detail keeps its end (a traceback's last lines say what failed)."""
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
        key = repr(self.settings.sandbox)
        if key not in _Environments._shared:
            envs = Environments(self.settings.sandbox, "cwm-trajectories-")
            atexit.register(envs.close)
            _Environments._shared[key] = envs
        return _Environments._shared[key].get(spec)


class _WithEnvironments(beam.DoFn):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.envs: _Environments | None = None

    def setup(self) -> None:
        self.envs = _Environments(self.settings)

    def environments(self) -> _Environments:
        """The worker's environments (set up here if the runner has not called ``setup``)."""
        if self.envs is None:
            self.setup()
        assert self.envs is not None
        return self.envs


class SynthesizeTasks(_WithEnvironments):
    """Repository spec → candidate tasks (unvalidated), or a dead letter if it cannot be
    prepared (fetch failed, no passing test)."""

    def process(self, spec: dict[str, Any]):
        s = self.settings
        try:
            env = self.environments().get(spec)
            wanted = s.spec.tasks_per_repository + s.spec.held_out_tasks
            tasks = candidate_tasks(env, s.families, OVERSAMPLE * wanted, s.seed)
        except Exception as err:
            yield beam.pvalue.TaggedOutput(DEADLETTER, counted_dead_letter(
                repo_key(spec), "prepare", f"{type(err).__name__}: {err}".splitlines()[0],
                traceback.format_exc()))
            return
        Metrics.counter(NAMESPACE, "candidates").inc(len(tasks))
        for task in tasks:
            yield {"repository": spec, "task": task.to_json()}


class ValidateTask(_WithEnvironments):
    """Keep a candidate only if some covering test fails on the mutated code."""

    def process(self, item: dict[str, Any]):
        try:
            task = Task.from_json(item["task"])
            result = validate_task(self.environments().get(item["repository"]), task)
        except Exception as err:
            yield beam.pvalue.TaggedOutput(DEADLETTER, counted_dead_letter(
                item.get("task", {}).get("task_id", "?"), "validate",
                f"{type(err).__name__}: {err}".splitlines()[0], traceback.format_exc()))
            return
        if isinstance(result, str):
            Metrics.counter(NAMESPACE, "rejected").inc()
            yield beam.pvalue.TaggedOutput("rejected", result.split(":")[0])
            return
        Metrics.counter(NAMESPACE, "validated").inc()
        yield {"repository": item["repository"], "task": result.to_json()}


def task_program(task: Task | dict[str, Any]) -> str:
    """The program hash of a task (or of its JSON): its function's original source."""
    t = task.to_json() if isinstance(task, Task) else task
    return task_program_hash(t["original"], t["path"], t["function"])


def select_for_repository(item: tuple[str, Iterable[dict[str, Any]]], families: tuple[str, ...],
                          n: int, held_out: int):
    """Up to ``held_out`` tasks, never rolled out, as the ``heldout`` output (the evaluation's
    mutate-fix tasks); then ``n`` tasks for the rollouts among those whose function is none of
    the held-out ones' (the others go to ``excluded``, the repository's name, to be counted)."""
    _, items = item
    items = list(items)
    spec = items[0]["repository"]
    tasks = [Task.from_json(i["task"]) for i in items]
    held = select_tasks(tasks, families, held_out)
    for task in held:
        yield beam.pvalue.TaggedOutput(
            "heldout", {"id": task.task_id, "repository": spec, "task": task.to_json()})
    reserved = {task_program(t) for t in held}
    taken = {t.task_id for t in held}
    rest = [t for t in tasks if t.task_id not in taken]
    trainable = [t for t in rest if task_program(t) not in reserved]
    for task in rest:
        if task not in trainable:
            yield beam.pvalue.TaggedOutput("excluded", task.repo)
    for task in select_tasks(trainable, families, n):
        yield {"repository": spec, "task": task.to_json()}


class Rollout(_WithEnvironments):
    """One episode per task; the trajectory is kept whether or not it solved the task."""

    def setup(self) -> None:
        super().setup()
        key = os.environ.get("CWM_POLICY_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.policy = make_policy(self.settings.policy, key)

    def process(self, item: dict[str, Any]):
        s = self.settings
        try:
            task = Task.from_json(item["task"])
            trajectory = run_episode(self.environments().get(item["repository"]), task, self.policy,
                                     s.episode_turns,
                                     max_observation_chars=s.spec.max_observation_chars,
                                     action_timeout=s.spec.action_timeout_seconds,
                                     seed=s.seed)  # names the episode: the same every run
        except Exception as err:
            yield beam.pvalue.TaggedOutput(DEADLETTER, counted_dead_letter(
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
        _, records = item
        kept, dropped = dedup(list(records), self.threshold)
        Metrics.counter(NAMESPACE, "duplicates").inc(len(dropped))
        for record in kept:
            yield record
        for record in dropped:  # counted (repository, family, solved) for the stats
            meta = record["meta"]
            yield beam.pvalue.TaggedOutput(
                "duplicates", f"{meta['repo']}|{meta['family']}|{int(bool(meta['success']))}")


class TrajectoryDataset(data_step.StepTransform):
    """Repository specs in; ``{"train", "deadletter"}`` records out, and counter keys:
    ``rejected`` (reason), ``duplicates`` (repo|family|solved), ``tasks`` (repo|family)."""

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
                                                    s.spec.tasks_per_repository,
                                                    s.spec.held_out_tasks)
                    .with_outputs("heldout", "excluded", main="tasks"))
        held_out, excluded = selected.heldout, selected.excluded
        selected = selected.tasks
        tasks_kept = selected | "TaskKeys" >> beam.Map(
            lambda i: f"{i['task']['repo']}|{i['task']['family']}")
        episodes = (selected
                    | "SpreadTasks" >> beam.Reshuffle()
                    | "Rollouts" >> beam.ParDo(Rollout(s)).with_outputs(DEADLETTER, main="records"))
        unique = (episodes.records
                  | "KeyByRepository" >> beam.Map(lambda r: (r["meta"]["repo"], r))
                  | "GroupByRepository" >> beam.GroupByKey()
                  | "Deduplicate" >> beam.ParDo(Deduplicate(s.spec.dedup_jaccard)).with_outputs(
                      "duplicates", main="records"))
        dead = ((candidates[DEADLETTER], validated[DEADLETTER], episodes[DEADLETTER])
                | "AllDeadLetters" >> beam.Flatten())
        return {"train": unique.records, "deadletter": dead, "rejected": validated.rejected,
                "duplicates": unique.duplicates, "tasks": tasks_kept, "eval_tasks": held_out,
                "excluded": excluded}


# --------------------------------------------------------------------------------------------
# Entry point (all reads and writes)


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", action="append", default=[],
                        help="name==version (PyPI sdist), a folder, or a git URL[#ref]")
    parser.add_argument("--tasks-per-repo", type=int, default=None)
    parser.add_argument("--held-out-tasks", type=int, default=None,
                        help="tasks per repository kept out of the rollouts, for evaluation")
    parser.add_argument("--families", default=None, help="comma-separated mutation families")
    parser.add_argument("--policy", choices=("search", "openai"), default=None)
    parser.add_argument("--endpoint", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-turns", type=int, default=None, help="the policy's turn budget")


def repo_from_flag(text: str) -> dict[str, Any]:
    """``name==version`` (PyPI), ``URL[#ref]`` (git: a URL or a path ending in .git), or a
    folder."""
    if "==" in text:
        return {"pypi": text}
    url, _, ref = text.partition("#")
    if "://" in url or url.endswith(".git") or url.startswith("git@"):
        return {"git": url, **({"ref": ref} if ref else {})}
    return {"path": text}


def apply_flags(flags: argparse.Namespace, spec: dict[str, Any],
                _evaluation: dict[str, Any]) -> None:
    if flags.repo:
        spec["repositories"] = [repo_from_flag(r) for r in flags.repo]
    if flags.families:
        spec["mutationFamilies"] = [f.strip() for f in flags.families.split(",") if f.strip()]
    for key, value in (("tasksPerRepository", flags.tasks_per_repo),
                       ("heldOutTasks", flags.held_out_tasks)):
        if value is not None:
            spec[key] = value
    policy = dict(spec.get("policy") or {})
    for key, value in (("kind", flags.policy), ("endpoint", flags.endpoint),
                       ("model", flags.model), ("maxTurns", flags.max_turns)):
        if value is not None:
            policy[key] = value
    if policy:
        spec["policy"] = policy


def build(pipeline: beam.Pipeline, settings: Settings, output: str) -> None:
    mine = [r for i, r in enumerate(settings.repositories) if settings.part.owns_position(i)]
    outputs = (pipeline | "Repositories" >> beam.Create(mine)
               | "TrajectoryDataset" >> TrajectoryDataset(settings))
    write = data_step.WriteShards
    outputs["train"] | "WriteTrainSplit" >> write(output, "train", settings.spec.shards)
    outputs["deadletter"] | "WriteDeadletterSplit" >> write(output, "deadletter", 1)
    outputs["eval_tasks"] | "WriteEvalTasksSplit" >> write(output, "eval_tasks", 1)
    for name in SIDE_COUNTS:
        (outputs[name]
         | f"Count{name.title()}" >> beam.combiners.Count.PerElement()
         | f"Write{name.title()}Counts" >> beam.Map(data_step.write_count, output, name))


SIDE_COUNTS = ("rejected", "duplicates", "tasks", "excluded")


def tally(output: str, settings: Settings) -> tuple[dict[str, list[artifacts.Shard]],
                                                    dict[str, Any], dict[str, list[str]]]:
    """After the pipeline: the data set's shards (empty ones where a split got nothing), its
    stats and the task programs of ``train`` and ``eval_tasks``."""
    shards, rows = data_step.read_splits(
        output, {"train": settings.spec.shards, "deadletter": 1, "eval_tasks": 1})
    train, dead = rows["train"], rows["deadletter"]
    counted = {name: data_step.read_counts(output, name) for name in SIDE_COUNTS}
    stats: dict[str, Any] = {"repositories": list(settings.repositories),
                             "policy": settings.policy, "families": list(settings.families),
                             "rejected": dict(counted["rejected"]),
                             "duplicates": sum(counted["duplicates"].values()),
                             "train_records": len(train), "deadletter_records": len(dead),
                             "eval_tasks": len(rows["eval_tasks"]),
                             "excluded_for_evaluation": dict(counted["excluded"])}
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
    programs = {"train": sorted({task_program(r["task"]) for r in train}),
                "eval_tasks": sorted({task_program(r["task"]) for r in rows["eval_tasks"]})}
    return shards, stats, programs


def throughput(stats: dict[str, Any], seconds: float) -> dict[str, float]:
    return {"rollouts_per_minute": round(60 * stats["episodes"] / max(seconds, 1e-9), 2)}


def describe(settings: Settings) -> str:
    return (f"trajectories for {len(settings.repositories)} repositories "
            f"(policy {settings.policy.get('kind')})")


def summary(stats: dict[str, Any]) -> str:
    return (f"wrote {stats['train_records']} trajectories, {stats['deadletter_records']} dead "
            f"letters in {stats['seconds']:.1f}s ({stats['rollouts_per_minute']:.2f} "
            f"rollouts/min); solve rates {stats['solve_rate_by_family']}")


STEP = data_step.DataStep(module="cwm_beam.trajectories", doc=__doc__, kind=NAMESPACE,
                settings=Settings, names_job="repo", add_flags=add_flags,
                apply_flags=apply_flags, build=build, tally=tally, throughput=throughput,
                describe=describe, summary=summary)
# ``run(argv)``: parse, build, run, write the manifest; returns its stats and timing.
load_job, run = STEP.load_job, STEP.run

if __name__ == "__main__":
    run()
