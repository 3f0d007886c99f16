"""The operator's brain: a pure state machine from what is observed to what should happen.

``reconcile(pipeline object, observed children, now, settings) → Decision``: the new status, the
children to create, the children to suspend or resume, the Kubernetes Events that tell the story,
and when to look again. No I/O, no clock, no randomness: the kopf handlers (``handlers.py``) feed
it observations and carry out its decision, and the unit tests drive it through every transition
without a cluster.

How progress is kept across operator restarts: the status (written by the operator) and the
children (deterministically named ``<pipeline>-<step>-<attempt>``) together are the whole state.
A child whose attempt is newer than the status knows about was created just before a crash: it
is adopted, not created again.

Spec edits after start: a step that has started is pinned by the fingerprint and output URIs
recorded in its status. An edit that changes neither for any started step is accepted and takes
effect from the next child (later stages' hyper-parameters, added or removed stages that have not
started, resources, retries, deadlines, images, queue, suspend). An edit that would change a
started step (its section, the model, the tokenizer, upstream data, storage) is refused: the
``Accepted`` condition says which step and why, no new child is created, and progress resumes
when the edit is reverted.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from cwm_operator.render import (
    ANNOTATION_METRICS,
    ANNOTATION_SUSPENDED,
    LABEL_ATTEMPT,
    LABEL_PIPELINE,
    LABEL_STEP,
    child_kind,
    child_name,
)
from cwm_operator.settings import Settings
from cwm_spec.api import (
    STAGE_ORDER,
    Condition,
    CWMPipeline,
    CWMPipelineStatus,
    StepState,
    StepStatus,
)
from cwm_spec.plan import Plan, Step, Target, build_plan
from cwm_spec.validation import ManifestError, parse_pipeline

ChildPhase = Literal["Pending", "Running", "Restarting", "Suspended", "Succeeded", "Failed"]
TERMINAL: tuple[ChildPhase, ...] = ("Succeeded", "Failed")
CONDITION_TYPES = ("Accepted", "Progressing", "Succeeded", "Failed", "Suspended", "Stalled")


# ------------------------------------------------------------------------------------------
# Time


def parse_time(value: str | None) -> dt.datetime | None:
    """RFC 3339 as Kubernetes writes it (``2026-11-26T01:50:56Z``, optional fraction)."""
    if not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def format_time(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------------------
# Observing children


@dataclass(frozen=True)
class Child:
    """What the state machine needs to know about one Job or PyTorchJob."""

    name: str
    kind: str
    step: str
    attempt: int
    phase: ChildPhase
    since: dt.datetime | None = None  # when it entered `phase`
    created: dt.datetime | None = None
    finished: dt.datetime | None = None
    message: str = ""
    suspended: bool = False  # the spec-level flag
    suspended_by_operator: bool = False  # we set it (else e.g. Kueue holds it until admission)
    metrics_uri: str | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)


def _true(conditions: list[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_ and c.get("status") == "True"),
                None)


def observe_child(obj: Mapping[str, Any], metrics: Mapping[str, float] | None = None) -> Child:
    """Read a child's phase from its status, the way its controller reports it.

    A child suspended by someone else than the operator (Kueue keeps a queued job suspended
    until it is admitted) is Pending, not Suspended: the operator never resumes it."""
    child = _observe(obj, metrics)
    by_operator = ((obj.get("metadata") or {}).get("annotations") or {}).get(
        ANNOTATION_SUSPENDED) == "true"
    if child.phase == "Suspended" and not by_operator:
        return replace(child, phase="Pending")
    return replace(child, suspended_by_operator=by_operator and child.suspended)


def _observe(obj: Mapping[str, Any], metrics: Mapping[str, float] | None) -> Child:
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    conditions = status.get("conditions") or []
    created = parse_time(meta.get("creationTimestamp"))
    base = {
        "name": meta["name"], "kind": obj.get("kind", "Job"), "step": labels.get(LABEL_STEP, ""),
        "attempt": int(labels.get(LABEL_ATTEMPT, "0") or 0), "created": created,
        "metrics_uri": (meta.get("annotations") or {}).get(ANNOTATION_METRICS),
        "metrics": dict(metrics or {}),
    }
    if obj.get("kind") == "PyTorchJob":
        suspended = bool((spec.get("runPolicy") or {}).get("suspend"))
        for phase in ("Succeeded", "Failed", "Suspended", "Restarting", "Running"):
            cond = _true(conditions, phase)
            if cond:
                at = parse_time(cond.get("lastTransitionTime"))
                finished = parse_time(status.get("completionTime")) or at
                return Child(**base, phase=phase, since=at, suspended=suspended,
                             finished=finished if phase in TERMINAL else None,
                             message=cond.get("message", ""))
        return Child(**base, phase="Suspended" if suspended else "Pending", since=created,
                     suspended=suspended)
    suspended = bool(spec.get("suspend"))
    done = _true(conditions, "Complete")
    if done:
        at = parse_time(status.get("completionTime")) or parse_time(done.get("lastTransitionTime"))
        return Child(**base, phase="Succeeded", since=at, finished=at, suspended=suspended)
    failed = _true(conditions, "Failed")
    if failed:
        at = parse_time(failed.get("lastTransitionTime"))
        why = ": ".join(p for p in (failed.get("reason"), failed.get("message")) if p)
        return Child(**base, phase="Failed", since=at, finished=at, message=why,
                     suspended=suspended)
    if suspended:
        cond = _true(conditions, "Suspended")
        return Child(**base, phase="Suspended", suspended=True,
                     since=parse_time(cond.get("lastTransitionTime")) if cond else created)
    # FailureTarget / SuccessCriteriaMet: pods are done, the terminal condition follows.
    if int(status.get("active") or 0) > 0 or _true(conditions, "FailureTarget") or \
            _true(conditions, "SuccessCriteriaMet"):
        return Child(**base, phase="Running", since=parse_time(status.get("startTime")))
    return Child(**base, phase="Pending", since=created)


#: Lines of a failed container's log kept in the step's status message and its event.
TAIL_LINES = 8
TAIL_WIDTH = 200


def failure_tail(pods: Iterable[Mapping[str, Any]], lines: int = TAIL_LINES) -> str:
    """What a failed child's pods said last, from their status: the rendered containers use
    ``terminationMessagePolicy: FallbackToLogsOnError``, so the kubelet keeps a failed
    container's log tail as its termination message (no log reads, no extra permission).
    The first failed container (by pod name; a restarted one's last run counts), or ""."""
    for pod in sorted(pods, key=lambda p: (p.get("metadata") or {}).get("name", "")):
        name = (pod.get("metadata") or {}).get("name", "?")
        status = pod.get("status") or {}
        for container in (status.get("initContainerStatuses") or []) + \
                (status.get("containerStatuses") or []):
            for state in (container.get("state") or {}, container.get("lastState") or {}):
                term = state.get("terminated") or {}
                if term and term.get("exitCode", 0) != 0:
                    text = (term.get("message") or "").rstrip().splitlines()[-lines:]
                    shown = "\n".join(line[:TAIL_WIDTH] for line in text)
                    head = (f"pod {name} container {container.get('name')} exited "
                            f"{term.get('exitCode')} ({term.get('reason') or 'Error'})")
                    return f"{head}; last log lines:\n{shown}" if shown else head
    return ""


def is_child_of(obj: Mapping[str, Any], pipeline: str) -> bool:
    return ((obj.get("metadata") or {}).get("labels") or {}).get(LABEL_PIPELINE) == pipeline


# ------------------------------------------------------------------------------------------
# The decision


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Create:
    step: Step
    attempt: int

    @property
    def kind(self) -> str:
        return child_kind(self.step)


@dataclass(frozen=True)
class SetSuspend:
    child: Child
    suspend: bool


@dataclass
class Decision:
    status: dict[str, Any]
    changed: bool  # status differs from what was observed: patch it
    pipeline: CWMPipeline | None = None
    plan: Plan | None = None
    create: list[Create] = field(default_factory=list)
    suspend: list[SetSuspend] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None
    durations: list[tuple[str, float]] = field(default_factory=list)  # finished steps, seconds

    def requeue(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after,
                                                                             seconds)


def read_status(obj: Mapping[str, Any]) -> CWMPipelineStatus:
    """The status as last written; anything unreadable counts as a fresh start."""
    try:
        return CWMPipelineStatus.model_validate(obj.get("status") or {})
    except ValueError:
        return CWMPipelineStatus()


def children_to_confirm(obj: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(kind, name) of the children the status says are in flight: the handler must observe
    each (from its cache, else by a GET) before reconciling, so that a child missing from a
    lagging watch is never mistaken for a deleted one."""
    wanted = []
    for rec in read_status(obj).steps:
        if rec.child and not rec.state.done:
            wanted.append(("PyTorchJob" if rec.name in STAGE_ORDER else "Job", rec.child))
    return wanted


def set_condition(status: CWMPipelineStatus, type_: str, value: bool, reason: str, message: str,
                  now: dt.datetime, generation: int | None) -> bool:
    """Set one condition; lastTransitionTime moves only when its status flips. Returns whether
    the status flipped (a condition seen for the first time counts as flipped)."""
    text: Literal["True", "False"] = "True" if value else "False"
    for cond in status.conditions:
        if cond.type == type_:
            flipped = cond.status != text
            if flipped:
                cond.last_transition_time = format_time(now)
            cond.status, cond.reason, cond.message = text, reason, message
            cond.observed_generation = generation
            return flipped
    status.conditions.append(Condition(
        type=type_, status=text, reason=reason, message=message,
        last_transition_time=format_time(now), observed_generation=generation))
    status.conditions.sort(key=lambda c: CONDITION_TYPES.index(c.type)
                           if c.type in CONDITION_TYPES else len(CONDITION_TYPES))
    return True


def _condition(status: CWMPipelineStatus, type_: str) -> Any:
    return next((c for c in status.conditions if c.type == type_), None)


def _dump(status: CWMPipelineStatus) -> dict[str, Any]:
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)


# ------------------------------------------------------------------------------------------
# The state machine


def reconcile(obj: Mapping[str, Any], children: Iterable[Child], now: dt.datetime,
              settings: Settings) -> Decision:
    """Decide what to do for one CWMPipeline object given its observed children."""
    children = list(children)
    meta = obj.get("metadata") or {}
    namespace = meta.get("namespace") or "default"
    generation = meta.get("generation")
    old = read_status(obj)
    status = old.model_copy(deep=True)
    started = any(rec.attempts > 0 for rec in status.steps)
    doc = {k: obj.get(k) for k in ("apiVersion", "kind", "metadata", "spec")}
    try:
        pipeline = parse_pipeline(doc, f"{namespace}/{meta.get('name')}", target="cluster",
                                  default_images=settings.default_images)
    except ManifestError as err:
        problems = "; ".join(str(e) for e in err.errors)
        if started:
            return _refuse(old, status, [f"the edited spec is invalid: {problems}"], now,
                           generation)
        return _invalid(old, status, problems, now, generation)
    plan = build_plan(pipeline, Target.cluster(pipeline, namespace, settings.default_images))
    refused = _refused_edits(status, plan)
    if refused:
        decision = _refuse(old, status, refused, now, generation)
        decision.pipeline, decision.plan = pipeline, plan
        # Suspending still works while an edit is refused: it touches no step's definition.
        suspend = pipeline.spec.suspend
        decision.suspend = [SetSuspend(c, suspend) for c in children if c.phase not in TERMINAL
                            and (c.suspended_by_operator if not suspend else not c.suspended)]
        return decision
    return _progress(old, status, pipeline, plan, list(children), now, settings, generation)


def _finish(old: CWMPipelineStatus, status: CWMPipelineStatus, generation: int | None,
            decision: Decision) -> Decision:
    status.observed_generation = generation
    decision.status = _dump(status)
    decision.changed = decision.status != _dump(old)
    return decision


def _invalid(old: CWMPipelineStatus, status: CWMPipelineStatus, problems: str,
             now: dt.datetime, generation: int | None) -> Decision:
    """Nothing has started and the spec is invalid: say so, create nothing."""
    message = f"invalid spec: {problems}"
    status.phase, status.current_step = "Failed", None
    flipped = set_condition(status, "Accepted", False, "InvalidSpec", message, now, generation)
    set_condition(status, "Progressing", False, "InvalidSpec", message, now, generation)
    set_condition(status, "Succeeded", False, "InvalidSpec", message, now, generation)
    set_condition(status, "Failed", True, "InvalidSpec", message, now, generation)
    return _not_accepted(old, status, generation, flipped, "InvalidSpec", message)


def _refused_edits(status: CWMPipelineStatus, plan: Plan) -> list[str]:
    """Started steps whose recorded fingerprint or outputs the current spec would change."""
    steps = {s.name: s for s in plan.steps}
    problems = []
    for rec in status.steps:
        if rec.attempts == 0:
            continue
        step = steps.get(rec.name)
        if step is None:
            problems.append(f"step {rec.name} has started and cannot be removed")
        elif rec.fingerprint and rec.fingerprint != step.fingerprint:
            problems.append(f"step {rec.name} has started and its configuration (its spec "
                            "section, the model, the tokenizer or an upstream step) would change")
        elif rec.artifacts and rec.artifacts != dict(step.outputs):
            problems.append(f"step {rec.name} has started and its outputs would move "
                            "(spec.storage changed)")
    return problems


def _refuse(old: CWMPipelineStatus, status: CWMPipelineStatus, problems: list[str],
            now: dt.datetime, generation: int | None) -> Decision:
    message = "edit refused: " + "; ".join(problems) + ". Revert it to resume."
    flipped = set_condition(status, "Accepted", False, "EditRefused", message, now, generation)
    set_condition(status, "Progressing", False, "EditRefused", message, now, generation)
    return _not_accepted(old, status, generation, flipped, "EditRefused", message)


def _not_accepted(old: CWMPipelineStatus, status: CWMPipelineStatus, generation: int | None,
                  flipped: bool, reason: str, message: str) -> Decision:
    """A decision that creates nothing; a Warning event when the Accepted condition has just
    flipped or its message changed (so a resync does not repeat it)."""
    decision = Decision(status={}, changed=False)
    prior = _condition(old, "Accepted")
    if flipped or (prior is not None and prior.message != message):
        decision.events.append(Event("Warning", reason, message))
    return _finish(old, status, generation, decision)


def _records(status: CWMPipelineStatus, plan: Plan) -> dict[str, StepStatus]:
    """One record per plan step, in plan order; records of removed, unstarted steps go."""
    existing = {rec.name: rec for rec in status.steps}
    records = {}
    for step in plan.steps:
        rec = existing.get(step.name) or StepStatus(name=step.name)
        if rec.attempts == 0:
            rec.fingerprint = step.fingerprint
        records[step.name] = rec
    status.steps = list(records.values())
    return records


def _describe(child: Child) -> str:
    return f"{child.kind} {child.name}"


def _progress(old: CWMPipelineStatus, status: CWMPipelineStatus, pipeline: CWMPipeline,
              plan: Plan, children: list[Child], now: dt.datetime, settings: Settings,
              generation: int | None) -> Decision:
    """Walk the plan to the first unfinished step and act on its child: start, adopt, record
    success, retry or fail, or watch it in flight; then summarise the whole pipeline."""
    walk = _Walk(Decision(status={}, changed=False, pipeline=pipeline, plan=plan), pipeline,
                 {rec.name: rec for rec in old.steps}, now, settings)
    records = _records(status, plan)
    by_name = {c.name: c for c in children}
    current: Step | None = None
    for step in plan.steps:
        rec = records[step.name]
        if rec.state.done:
            continue
        current = step
        walk.adopt(step, rec, [c for c in children if c.step == step.name])
        if rec.attempts == 0:
            if not walk.suspend:
                walk.start(step, rec, 1)
            break
        child = by_name.get(rec.child or "")
        if child is None:
            # The handler confirmed it is gone (GET → 404): deleted behind our back.
            child = Child(name=rec.child or "", kind=child_kind(step), step=step.name,
                          attempt=rec.attempts, phase="Failed", finished=now,
                          message=f"{child_kind(step)} {rec.child} was deleted")
        if child.phase == "Succeeded":
            walk.succeeded(step, rec, child)
            continue
        if child.phase == "Failed":
            walk.failed(step, rec, child)
        else:
            walk.in_flight(rec, child)
        break
    else:
        current = None
    _summarise(old, status, plan, current, walk.failed_step, walk.waiting_retry, walk.stalled,
               walk.suspend, now, generation, walk.decision)
    return _finish(old, status, generation, walk.decision)


@dataclass
class _Walk:
    """What one pass of :func:`_progress` decides, step by step (pure: no I/O)."""

    decision: Decision
    pipeline: CWMPipeline
    old_records: dict[str, StepStatus]
    now: dt.datetime
    settings: Settings
    failed_step: StepStatus | None = None
    waiting_retry: bool = False
    stalled: tuple[str, str] | None = None

    @property
    def suspend(self) -> bool:
        return self.pipeline.spec.suspend

    def adopt(self, step: Step, rec: StepStatus, mine: list[Child]) -> None:
        """A child created just before a restart that lost the status write: adopt it."""
        newest = max(mine, key=lambda c: c.attempt, default=None)
        if newest is not None and newest.attempt > rec.attempts:
            rec.attempts, rec.child, rec.state = newest.attempt, newest.name, StepState.RUNNING
            rec.fingerprint, rec.artifacts = step.fingerprint, dict(step.outputs)
            rec.start_time = format_time(newest.created or self.now)
            rec.finish_time = rec.message = None

    def start(self, step: Step, rec: StepStatus, attempt: int) -> None:
        self.decision.create.append(Create(step, attempt))
        name = child_name(self.pipeline.name, step.name, attempt)
        rec.state, rec.attempts, rec.child = StepState.RUNNING, attempt, name
        rec.fingerprint, rec.artifacts = step.fingerprint, dict(step.outputs)
        rec.start_time, rec.finish_time, rec.message = format_time(self.now), None, None
        self.decision.events.append(Event(
            "Normal", "StepStarted", f"step {step.name}: created {child_kind(step)} {name} "
            f"(attempt {attempt} of {step.retries + 1})"))

    def succeeded(self, step: Step, rec: StepStatus, child: Child) -> None:
        finished = child.finished or self.now
        rec.state, rec.message = StepState.SUCCEEDED, None
        rec.finish_time = format_time(finished)
        rec.metrics = {k: float(v) for k, v in child.metrics.items()}
        started_at = parse_time(rec.start_time)
        seconds = finished - started_at if started_at else dt.timedelta()
        self.decision.durations.append((step.name, max(seconds.total_seconds(), 0.0)))
        shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(rec.metrics.items())[:4])
        self.decision.events.append(Event(
            "Normal", "StepSucceeded", f"step {step.name}: {_describe(child)} succeeded"
            + (f" ({shown})" if shown else "")))

    def failed(self, step: Step, rec: StepStatus, child: Child) -> None:
        """Retry after the back-off while attempts remain (not while suspended), else fail."""
        finished = child.finished or self.now
        rec.finish_time = format_time(finished)
        first_seen = self.old_records.get(step.name)
        announce = first_seen is None or first_seen.finish_time is None or \
            first_seen.attempts != rec.attempts
        what = f"step {step.name}: {_describe(child)} failed ({child.message})"
        if rec.attempts > step.retries:
            rec.state = StepState.FAILED
            rec.message = f"failed after {rec.attempts} attempt(s); last: {child.message}"
            self.failed_step = rec
            if announce or (first_seen and first_seen.state != StepState.FAILED):
                self.decision.events.append(Event("Warning", "StepFailed",
                                                  f"{what}; no retries left"))
            return
        retry_at = finished + dt.timedelta(seconds=self.settings.retry_delay(rec.attempts))
        rec.message = f"attempt {rec.attempts} failed: {child.message}"
        if announce:
            self.decision.events.append(Event(
                "Warning", "StepFailed", f"{what}; retrying at {format_time(retry_at)}"))
        if self.suspend:
            rec.state = StepState.PENDING
        elif self.now >= retry_at:
            self.start(step, rec, rec.attempts + 1)
        else:
            rec.state = StepState.PENDING
            self.waiting_retry = True
            rec.message += f"; attempt {rec.attempts + 1} at {format_time(retry_at)}"
            self.decision.requeue((retry_at - self.now).total_seconds())

    def in_flight(self, rec: StepStatus, child: Child) -> None:
        """Pending, Running, Restarting or Suspended: keep suspension in line with the spec,
        and report a child stuck Pending/Restarting past the threshold."""
        rec.state = StepState.SUSPENDED if child.phase == "Suspended" else StepState.RUNNING
        if self.suspend and not child.suspended:
            self.decision.suspend.append(SetSuspend(child, True))
        elif not self.suspend and child.suspended_by_operator:
            self.decision.suspend.append(SetSuspend(child, False))
        if child.phase not in ("Pending", "Restarting") or not child.since or self.suspend:
            return
        threshold = self.settings.stuck_seconds
        stuck_at = child.since + dt.timedelta(seconds=threshold)
        if self.now >= stuck_at:
            self.stalled = (f"Child{child.phase}",
                            f"{_describe(child)} has been {child.phase} since "
                            f"{format_time(child.since)} (threshold {threshold:g} s)")
        else:
            self.decision.requeue((stuck_at - self.now).total_seconds())


def _summarise(old: CWMPipelineStatus, status: CWMPipelineStatus, plan: Plan,
               current: Step | None, failed_step: StepStatus | None, waiting_retry: bool,
               stalled: tuple[str, str] | None, suspend: bool, now: dt.datetime,
               generation: int | None, decision: Decision) -> None:
    """Phase, progress and the conditions, from the step records just computed."""
    done = sum(1 for rec in status.steps if rec.state.done)
    status.progress = f"{done}/{len(plan.steps)}"
    g, events = generation, decision.events
    set_condition(status, "Accepted", True, "Valid",
                  f"{len(plan.steps)} steps: {' → '.join(plan.names)}", now, g)
    if current is None:
        status.phase, status.current_step = "Succeeded", None
        message = f"all {len(plan.steps)} steps succeeded"
        set_condition(status, "Progressing", False, "Completed", message, now, g)
        if set_condition(status, "Succeeded", True, "Completed", message, now, g):
            events.append(Event("Normal", "PipelineSucceeded", message))
        set_condition(status, "Failed", False, "Completed", message, now, g)
    elif failed_step is not None:
        status.phase, status.current_step = "Failed", failed_step.name
        message = f"step {failed_step.name} {failed_step.message}"
        set_condition(status, "Progressing", False, "StepFailed", message, now, g)
        set_condition(status, "Succeeded", False, "StepFailed", message, now, g)
        if set_condition(status, "Failed", True, "StepFailed", message, now, g):
            events.append(Event("Warning", "PipelineFailed", message))
    else:
        rec = next(r for r in status.steps if r.name == current.name)
        status.current_step = current.name
        status.phase = "Suspended" if suspend else ("Running" if any(
            r.attempts for r in status.steps) else "Pending")
        if suspend:
            set_condition(status, "Progressing", False, "Suspended",
                          f"suspended at step {current.name} (spec.suspend)", now, g)
        elif waiting_retry:
            set_condition(status, "Progressing", True, "RetryBackoff",
                          f"step {current.name}: {rec.message}", now, g)
        else:
            set_condition(status, "Progressing", True, "StepRunning",
                          f"step {current.name}: attempt {rec.attempts} ({rec.child})", now, g)
        set_condition(status, "Succeeded", False, "InProgress", f"{status.progress} steps done",
                      now, g)
        set_condition(status, "Failed", False, "InProgress", "no step has failed for good", now, g)
    was_suspended = _condition(old, "Suspended")
    flipped = set_condition(status, "Suspended", suspend and current is not None and
                            failed_step is None, "SuspendRequested" if suspend else "Active",
                            "spec.suspend is true" if suspend else "spec.suspend is false", now, g)
    if flipped and suspend:
        events.append(Event("Normal", "Suspended", f"suspended at step {status.current_step}"))
    elif flipped and was_suspended is not None:
        events.append(Event("Normal", "Resumed", f"resumed at step {status.current_step}"))
    if stalled:
        reason, message = stalled
        if set_condition(status, "Stalled", True, reason, message, now, g):
            events.append(Event("Warning", "ChildStalled", message))
    elif _condition(status, "Stalled") is not None:
        set_condition(status, "Stalled", False, "AsExpected", "no child is stuck", now, g)


def summary(status: Mapping[str, Any]) -> str:
    """One line for logs: phase, step, progress."""
    return json.dumps({k: status.get(k) for k in ("phase", "currentStep", "progress")})
