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
    python -m cwm_beam.trajectories --repo cachetools==5.5.0 \\
        --history cachetools==5.3.3,5.4.0,5.5.0 --history ../toolz.git#0.12.0..1.0.0 \\
        --max-commits 10 --issue-fix-tasks 10 --output /tmp/t   # and issue-fix tasks

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

Issue-fix tasks (``issueFix.sources``, family ``issue_fix``, :mod:`cwm_forager.history`):
``MineHistory`` opens each history (a PyPI project's releases committed one by one, or a git
repository's range), scans its newest ``maxCommits`` commits for those changing source and tests,
prepares each such commit's tree as an environment whose spec any process can fetch again (the
release's PyPI pin, or the git repository at the commit) and proposes its changed functions put
back as they were; the same ``ValidateTasks`` validates them by execution, and keeps one only if a
failing test is one its commit changed; ``SelectIssueFix`` keeps ``issueFix.tasksPerRepository``
per source, the commits taking turns; with an ``openai`` policy, ``WriteIssues`` has its model
write the issue of a task whose commit message says too little, from the failing tests' output;
they are rolled out and deduplicated with the rest. Their
records carry ``meta.history`` (the source); ``stats.issue_fix`` gives per source commits scanned,
fix commits, tasks found, validated, excluded for evaluation, issues written by the model (and
requests that failed), episodes, solved and the rate.

Decontamination: ``SelectTasks`` chooses each repository's held-out tasks first, then the
training tasks among the candidates whose function is none of theirs (a task's program is its
function's original source, :func:`cwm_spec.programs.task_program_hash`), so no trajectory shows
the code an evaluation task asks to restore; ``stats.excluded_for_evaluation`` counts the
candidates left out that way, and the manifest's ``programs`` lists the task programs of
``train`` and ``eval_tasks``. Issue-fix tasks follow the same rule: none whose function is a
held-out task's is rolled out (counted in ``stats.issue_fix[source].excluded_for_evaluation``); a
history source whose project is also a repository is mined by the part (pod or worker process)
that chose that repository's held-out tasks. Issue-fix tasks are all for training: none is held
out.

The openai policy's API key comes from ``$CWM_POLICY_API_KEY`` (the operator mounts the Secret
named by ``policy.apiKeySecret`` there) or ``$OPENAI_API_KEY``.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import re
import shutil
import tempfile
import traceback
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from cwm_beam import step as data_step
from cwm_forager import history
from cwm_forager.env import Environments
from cwm_forager.policies import make_policy
from cwm_forager.records import dedup, solve_rates
from cwm_forager.repos import RepoSource
from cwm_forager.rollout import run_episode
from cwm_forager.tasks import Task, candidate_tasks, select_tasks, validate_task
from cwm_spec import artifacts
from cwm_spec.api import TrajectoryDataSpec
from cwm_spec.programs import task_program_hash

LOG = logging.getLogger("cwm_beam.trajectories")
NAMESPACE = "trajectories"
DEADLETTER = "deadletter"
HISTORY = "history"  # the side output of per-source issue-fix counts ("source|field", n)
ISSUE_FIX_FIELDS = ("commits_scanned", "fix_commits", "tasks_found", "validated",
                    "excluded_for_evaluation", "issues_written", "issue_errors", "episodes",
                    "solved")
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
    def history_sources(self) -> tuple[dict[str, Any], ...]:
        """``issueFix.sources`` as the YAML spells them (none: no issue-fix tasks)."""
        return tuple(h.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
                     for h in self.spec.issue_fix.sources)

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

    @staticmethod
    def close_all() -> None:
        """Remove this process's environments (after its pipeline: a part process forked by
        ``--workers`` ends without running ``atexit`` handlers, so they would stay behind)."""
        while _Environments._shared:
            _, envs = _Environments._shared.popitem()
            envs.close()


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
    """Keep a candidate only if some covering test fails on the mutated code; an issue-fix
    candidate (one with ``history``) also only if a failing test is one its commit changed."""

    def process(self, item: dict[str, Any]):
        try:
            task = Task.from_json(item["task"])
            result = validate_task(self.environments().get(item["repository"]), task)
            if isinstance(result, Task) and "history" in item:
                result = history.commit_evidence(result, item["commit_tests"]) or result
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
        if "history" in item:
            yield beam.pvalue.TaggedOutput(HISTORY, (f"{item['history']}|validated", 1))
            yield {"repository": item["repository"], "task": result.to_json(),
                   "history": item["history"]}
            return
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
        if "history" in item:
            record["meta"]["history"] = item["history"]  # the issue-fix source it was mined from
        record["task"] = task.to_json()  # RL's mutate-fix tasks are drawn from the train split
        yield record


# --------------------------------------------------------------------------------------------
# Issue-fix tasks from history (cwm_forager.history)


class MineHistory(_WithEnvironments):
    """History source → unvalidated issue-fix candidates, each with its commit's environment
    spec (prepared here, once per process), the source's name and the test files the commit
    changed; per-source counts on the ``history`` output; a dead letter for a source that cannot
    be opened or a commit whose tree cannot be prepared."""

    def process(self, source: dict[str, Any]):
        name = history.source_name(source)
        root = Path(tempfile.mkdtemp(prefix="cwm-history-"))
        try:
            try:
                repo, revisions = history.open_history(source, root / "repo")
                commits, scanned = history.fix_commits(
                    repo, revisions, self.settings.spec.issue_fix.max_commits)
            except Exception as err:
                yield beam.pvalue.TaggedOutput(DEADLETTER, counted_dead_letter(
                    f"history {name}", "history", f"{type(err).__name__}: {err}".splitlines()[0],
                    traceback.format_exc()))
                return
            yield beam.pvalue.TaggedOutput(HISTORY, (f"{name}|commits_scanned", scanned))
            yield beam.pvalue.TaggedOutput(HISTORY, (f"{name}|fix_commits", len(commits)))
            for commit in commits:
                yield from self.commit_candidates(source, name, repo, commit)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def commit_candidates(self, source: dict[str, Any], name: str, repo: Path,
                          commit: history.FixCommit):
        try:
            spec = history.commit_environment(source, commit)
            tasks = list(history.commit_tasks(self.environments().get(spec), repo, commit))
        except Exception as err:
            yield beam.pvalue.TaggedOutput(DEADLETTER, counted_dead_letter(
                f"history {name}@{commit.sha[:10]}", "prepare",
                f"{type(err).__name__}: {err}".splitlines()[0], traceback.format_exc()))
            return
        Metrics.counter(NAMESPACE, "issue_fix_candidates").inc(len(tasks))
        yield beam.pvalue.TaggedOutput(HISTORY, (f"{name}|tasks_found", len(tasks)))
        for task in tasks:
            yield {"repository": spec, "task": task.to_json(), "history": name,
                   "commit_tests": list(commit.tests)}


def select_issue_fix(item: tuple[str, Iterable[dict[str, Any]]], n: int,
                     held_out_programs: Iterable[str]):
    """Up to ``n`` validated issue-fix tasks of one source for the rollouts, the source's commits
    taking turns (in the order of their environment specs, tasks in id order: the same every run
    whatever the runner's order), none whose function is a held-out task's
    (those are counted as ``excluded_for_evaluation``): the held-out rule of the mutate-fix
    tasks, applied to these too."""
    name, items = item
    reserved = set(held_out_programs)
    by_commit: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for i in sorted(items, key=lambda i: i["task"]["task_id"]):
        if task_program(i["task"]) in reserved:
            yield beam.pvalue.TaggedOutput(HISTORY, (f"{name}|excluded_for_evaluation", 1))
        else:
            by_commit[repo_key(i["repository"])].append(i)
    queues = [by_commit[key] for key in sorted(by_commit)]
    taken = 0
    while taken < n and any(queues):
        for queue in queues:
            if queue and taken < n:
                taken += 1
                yield queue.pop(0)


class WriteIssues(_WithEnvironments):
    """With an ``openai`` policy: an issue-fix task whose commit message says too little gets an
    issue written by the policy's model from its failing tests' output (counted per source as
    ``issues_written``); a failed request leaves the task as it was, logged and counted as
    ``issue_errors``."""

    def setup(self) -> None:
        super().setup()
        key = os.environ.get("CWM_POLICY_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.policy = make_policy(self.settings.policy, key)

    def chat(self, messages: list[dict[str, str]]) -> str | None:
        """One completion from the policy's endpoint and model (no tools)."""
        policy = self.policy
        response = policy.client.chat.completions.create(
            model=policy.model, messages=messages, temperature=policy.temperature,
            max_tokens=512)
        return response.choices[0].message.content if response.choices else None

    def process(self, item: dict[str, Any]):
        task = Task.from_json(item["task"])
        if task.issue:
            yield item
            return
        name = item["history"]
        try:
            env = self.environments().get(item["repository"])
            written = history.write_issue(env, task, self.chat)
        except Exception as err:
            LOG.warning("issue for %s not written: %s: %s", task.task_id, type(err).__name__, err)
            yield beam.pvalue.TaggedOutput(HISTORY, (f"{name}|issue_errors", 1))
            yield item
            return
        if written.issue:
            yield beam.pvalue.TaggedOutput(HISTORY, (f"{name}|issues_written", 1))
        yield {**item, "task": written.to_json()}


def episode_counts(record: dict[str, Any]) -> list[tuple[str, int]]:
    """An issue-fix episode's per-source counts (before near-duplicates are dropped, as the
    solve rates by family count them); none for a mutate-fix episode."""
    meta = record["meta"]
    if meta.get("family") != history.FAMILY or "history" not in meta:
        return []
    return [(f"{meta['history']}|episodes", 1), (f"{meta['history']}|solved",
                                                  int(bool(meta["success"])))]


def issue_fix_stats(sources: Iterable[str], counted: Counter) -> dict[str, dict[str, Any]]:
    """Per source: commits scanned, fix commits, tasks found, validated, left out for the
    evaluation, episodes, solved and the solve rate (zeros where nothing was counted)."""
    out: dict[str, dict[str, Any]] = {name: dict.fromkeys(ISSUE_FIX_FIELDS, 0) for name in sources}
    for key, count in counted.items():
        name, field = key.rsplit("|", 1)
        out.setdefault(name, dict.fromkeys(ISSUE_FIX_FIELDS, 0))[field] += count
    for row in out.values():
        row["rate"] = round(row["solved"] / row["episodes"], 3) if row["episodes"] else 0.0
    return dict(sorted(out.items()))


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
    """Repository specs and history sources in (``{"repositories", "histories"}``);
    ``{"train", "deadletter", "eval_tasks"}`` records out, and counter keys: ``rejected``
    (reason), ``duplicates`` (repo|family|solved), ``tasks`` (repo|family), ``excluded`` (repo),
    and ``history`` pairs (source|field, count) for the issue-fix stats."""

    def expand(self, inputs):
        s = self.settings
        candidates = (inputs["repositories"]
                      | "SynthesizeTasks" >> beam.ParDo(SynthesizeTasks(s)).with_outputs(
                          DEADLETTER, main="tasks"))
        mined = (inputs["histories"]
                 | "MineHistory" >> beam.ParDo(MineHistory(s)).with_outputs(
                     DEADLETTER, HISTORY, main="tasks"))
        validated = ((candidates.tasks, mined.tasks)
                     | "AllCandidates" >> beam.Flatten()
                     | "SpreadCandidates" >> beam.Reshuffle()
                     | "ValidateTasks" >> beam.ParDo(ValidateTask(s)).with_outputs(
                         DEADLETTER, "rejected", HISTORY, main="tasks"))
        mutate_fix, issue_fix = (validated.tasks | "SplitFamilies" >> beam.Partition(
            lambda item, _: int("history" in item), 2))
        selected = self.select_mutate_fix(mutate_fix)
        chosen = self.select_issue_fix(issue_fix, selected.heldout)
        rolled = (selected.tasks, chosen["tasks"]) | "AllSelected" >> beam.Flatten()
        tasks_kept = rolled | "TaskKeys" >> beam.Map(
            lambda i: f"{i['task']['repo']}|{i['task']['family']}")
        episodes = (rolled
                    | "SpreadTasks" >> beam.Reshuffle()
                    | "Rollouts" >> beam.ParDo(Rollout(s)).with_outputs(DEADLETTER, main="records"))
        unique = (episodes.records
                  | "KeyByRepository" >> beam.Map(lambda r: (r["meta"]["repo"], r))
                  | "GroupByRepository" >> beam.GroupByKey()
                  | "Deduplicate" >> beam.ParDo(Deduplicate(s.spec.dedup_jaccard)).with_outputs(
                      "duplicates", main="records"))
        dead = ((candidates[DEADLETTER], mined[DEADLETTER], validated[DEADLETTER],
                 episodes[DEADLETTER]) | "AllDeadLetters" >> beam.Flatten())
        counts = ((mined[HISTORY], validated[HISTORY], chosen[HISTORY],
                   episodes.records | "IssueFixEpisodes" >> beam.FlatMap(episode_counts))
                  | "AllHistoryCounts" >> beam.Flatten())
        return {"train": unique.records, "deadletter": dead, "rejected": validated.rejected,
                "duplicates": unique.duplicates, "tasks": tasks_kept,
                "eval_tasks": selected.heldout, "excluded": selected.excluded, HISTORY: counts}

    def select_mutate_fix(self, validated):
        """Per repository: the held-out tasks first, then the training tasks (SelectTasks)."""
        s = self.settings
        return (validated
                | "KeyTasksByRepository" >> beam.Map(lambda i: (repo_key(i["repository"]), i))
                | "GroupTasks" >> beam.GroupByKey()
                | "SelectTasks" >> beam.FlatMap(select_for_repository, s.families,
                                                s.spec.tasks_per_repository,
                                                s.spec.held_out_tasks)
                .with_outputs("heldout", "excluded", main="tasks"))

    def select_issue_fix(self, validated, held_out):
        """Per history source, none of the held-out tasks' functions (a side input); with an
        ``openai`` policy, issues written where the commit message says too little. Returns
        ``{"tasks", HISTORY}``."""
        programs = held_out | "HeldOutPrograms" >> beam.Map(lambda i: task_program(i["task"]))
        chosen = (validated
                  | "KeyIssueFixBySource" >> beam.Map(lambda i: (i["history"], i))
                  | "GroupIssueFix" >> beam.GroupByKey()
                  | "SelectIssueFix" >> beam.FlatMap(
                      select_issue_fix, self.settings.spec.issue_fix.tasks_per_repository,
                      beam.pvalue.AsList(programs)).with_outputs(HISTORY, main="tasks"))
        if self.settings.policy.get("kind") != "openai":
            return {"tasks": chosen.tasks, HISTORY: chosen[HISTORY]}
        written = chosen.tasks | "WriteIssues" >> beam.ParDo(WriteIssues(self.settings)) \
            .with_outputs(HISTORY, main="tasks")
        return {"tasks": written.tasks,
                HISTORY: (chosen[HISTORY], written[HISTORY]) | "IssueCounts" >> beam.Flatten()}


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
    parser.add_argument("--history", action="append", default=[],
                        help="issue-fix tasks from a history: NAME==V1,V2,... (PyPI releases, "
                             "oldest first) or a git URL/path[#SINCE..UNTIL]")
    parser.add_argument("--max-commits", type=int, default=None,
                        help="commits scanned per history source")
    parser.add_argument("--issue-fix-tasks", type=int, default=None,
                        help="issue-fix tasks rolled out per history source")


def repo_from_flag(text: str) -> dict[str, Any]:
    """``name==version`` (PyPI), ``URL[#ref]`` (git: a URL or a path ending in .git), or a
    folder."""
    if "==" in text:
        return {"pypi": text}
    url, _, ref = text.partition("#")
    if "://" in url or url.endswith(".git") or url.startswith("git@"):
        return {"git": url, **({"ref": ref} if ref else {})}
    return {"path": text}


def history_from_flag(text: str) -> dict[str, Any]:
    """``name==v1,v2,...`` (PyPI releases, oldest first) or ``URL-or-path[#since..until]``
    (git; ``#..until`` or ``#since..`` leave one end open)."""
    if "==" in text:
        project, _, versions = text.partition("==")
        return {"pypi": project, "versions": [v for v in versions.split(",") if v]}
    url, _, revisions = text.partition("#")
    since, _, until = revisions.partition("..")
    return {"git": url, **({"since": since} if since else {}), **({"until": until} if until else {})}


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
    issue_fix = dict(spec.get("issueFix") or {})
    if flags.history:
        issue_fix["sources"] = [history_from_flag(h) for h in flags.history]
    for key, value in (("maxCommits", flags.max_commits),
                       ("tasksPerRepository", flags.issue_fix_tasks)):
        if value is not None:
            issue_fix[key] = value
    if issue_fix:
        spec["issueFix"] = issue_fix
    policy = dict(spec.get("policy") or {})
    for key, value in (("kind", flags.policy), ("endpoint", flags.endpoint),
                       ("model", flags.model), ("maxTurns", flags.max_turns)):
        if value is not None:
            policy[key] = value
    if policy:
        spec["policy"] = policy


def project_of(spec: dict[str, Any]) -> str:
    """A repository's or history source's project, normalised (``More_Itertools==10.3.0`` and
    ``more-itertools`` are one project)."""
    if spec.get("pypi") and "==" in spec["pypi"]:
        name = spec["pypi"].split("==")[0]
    elif spec.get("pypi"):
        name = spec["pypi"]
    else:
        name = RepoSource(git=spec.get("git"), path=spec.get("path")).name
    return re.sub(r"[-_.]+", "-", name).lower()


def owned_histories(settings: Settings) -> list[dict[str, Any]]:
    """This part's history sources: one whose project is also a mutate-fix repository goes to
    the part that owns that repository (its held-out tasks, which the issue-fix tasks must avoid,
    are chosen there), the others dealt out after the repositories."""
    positions = {project_of(r): i for i, r in reversed(list(enumerate(settings.repositories)))}
    count = len(settings.repositories)
    return [h for k, h in enumerate(settings.history_sources)
            if settings.part.owns_position(positions.get(project_of(h), count + k))]


def build(pipeline: beam.Pipeline, settings: Settings, output: str) -> None:
    mine = [r for i, r in enumerate(settings.repositories) if settings.part.owns_position(i)]
    inputs = {"repositories": pipeline | "Repositories" >> beam.Create(mine),
              "histories": pipeline | "HistorySources" >> beam.Create(owned_histories(settings))}
    outputs = inputs | "TrajectoryDataset" >> TrajectoryDataset(settings)
    write = data_step.WriteShards
    outputs["train"] | "WriteTrainSplit" >> write(output, "train", settings.spec.shards)
    outputs["deadletter"] | "WriteDeadletterSplit" >> write(output, "deadletter", 1)
    outputs["eval_tasks"] | "WriteEvalTasksSplit" >> write(output, "eval_tasks", 1)
    for name in SIDE_COUNTS:
        (outputs[name]
         | f"Count{name.title()}" >> beam.combiners.Count.PerElement()
         | f"Write{name.title()}Counts" >> beam.Map(data_step.write_count, output, name))
    (outputs[HISTORY]
     | "SumHistoryCounts" >> beam.CombinePerKey(sum)
     | "WriteHistoryCounts" >> beam.Map(data_step.write_count, output, HISTORY))


SIDE_COUNTS = ("rejected", "duplicates", "tasks", "excluded")


def tally(output: str, settings: Settings) -> tuple[dict[str, list[artifacts.Shard]],
                                                    dict[str, Any], dict[str, list[str]]]:
    """After the pipeline: the data set's shards (empty ones where a split got nothing), its
    stats and the task programs of ``train`` and ``eval_tasks``. The environments the pipeline
    prepared in this process are removed first."""
    _Environments.close_all()
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
    stats["issue_fix"] = issue_fix_stats(
        [history.source_name(h) for h in owned_histories(settings)],
        data_step.read_counts(output, HISTORY))
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
    return (f"trajectories for {len(settings.repositories)} repositories and "
            f"{len(settings.history_sources)} histories (policy {settings.policy.get('kind')})")


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
