"""The kopf layer: watch pipelines and their children, reconcile, carry out the decision.

Thin by design. Every watch event (a pipeline's, or a labelled Job's / PyTorchJob's) updates an
in-memory view and triggers ``reconcile.reconcile`` for the owning pipeline, serialised by a
per-pipeline asyncio lock; then the decision is executed here: children rendered by ``render``,
adopted with ``kopf.adopt`` (the garbage collector deletes them with their pipeline) and created
(409 Conflict = created before a restart: read it back), suspend flags patched, the status patched
on the status subresource, Events posted, and a timer set for retries and stuck checks.

``@kopf.on.event`` rather than ``on.create/update/resume``: the reconcile is level-based (it reads
the whole state each time), so kopf's per-change bookkeeping (annotations, finalizers, progress
storage) would only add API writes. A restarted operator gets every object again in the watch's
initial listing, which is its resume.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import kopf
from kubernetes import client
from kubernetes.client.rest import ApiException

from cwm_operator.metrics import Metrics
from cwm_operator.reconcile import (
    Child,
    Decision,
    children_to_confirm,
    failure_tail,
    observe_child,
    reconcile,
    summary,
)
from cwm_operator.render import ANNOTATION_SUSPENDED, LABEL_PIPELINE, PYTORCHJOB_API, render_child
from cwm_operator.settings import Settings
from cwm_spec import storage
from cwm_spec.api import GROUP, PLURAL, VERSION, StepState

Key = tuple[str, str]  # (namespace, pipeline name)
log = logging.getLogger("cwm_operator")

MERGE_PATCH = "application/merge-patch+json"
ERROR_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)


def _rv(obj: Mapping[str, Any]) -> int:
    """resourceVersion as a number: etcd revisions, so a later write has a larger one. Used only
    to keep the newest of two copies of one object (a watch event may trail our own write)."""
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


def _owner_uid(obj: Mapping[str, Any]) -> str | None:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


def read_stage_metrics(uri: str) -> dict[str, float]:
    """Best effort: the numbers in ``<metrics>/eval.json`` when storage is readable from here
    (through ``cwm_spec.storage``, with the operator's own credentials); {} otherwise, logged."""
    try:
        data = storage.read_json(storage.join(uri, "eval.json"))
    except storage.StorageError as err:  # metrics are optional; the stage already succeeded
        log.warning("stage metrics not read: %s", err)
        return {}
    return _numbers(data)


def _numbers(data: Any) -> dict[str, float]:
    if not isinstance(data, dict):
        return {}
    return {str(k): float(v) for k, v in data.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Controller:
    """The operator's state and its Kubernetes I/O. One per running operator."""

    def __init__(self, settings: Settings, api_client: Any, metrics: Metrics | None = None,
                 clock: Callable[[], dt.datetime] | None = None) -> None:
        self.settings = settings
        self.api_client = api_client
        self.metrics = metrics or Metrics()
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self.batch = client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.pipelines: dict[Key, dict[str, Any]] = {}
        self.children: dict[Key, dict[str, dict[str, Any]]] = defaultdict(dict)
        self.stage_metrics: dict[tuple[str, str], dict[str, float]] = {}
        # (namespace, child) → the failed container's log tail (see reconcile.failure_tail)
        self.failure_tails: dict[tuple[str, str], str] = {}
        self.locks: dict[Key, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.queued: set[Key] = set()
        self.timers: dict[Key, asyncio.TimerHandle] = {}
        self.failures: dict[Key, int] = defaultdict(int)
        # (namespace, pipeline, step) → when its child was first seen Succeeded
        self.succeeded_seen: dict[tuple[str, str, str], float] = {}
        # children this process created or read back itself (see _observe)
        self.confirmed: dict[Key, set[str]] = defaultdict(set)

    # -- API calls (each counted) ---------------------------------------------------------

    async def _call(self, verb: str, resource: str, fn: Callable[..., Any], *args: Any,
                    **kwargs: Any) -> Any:
        self.metrics.requests.labels(verb=verb, resource=resource).inc()
        return await asyncio.to_thread(fn, *args, **kwargs)

    def _plain(self, obj: Any) -> dict[str, Any]:
        return obj if isinstance(obj, dict) else self.api_client.sanitize_for_serialization(obj)

    async def _get_child(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            if kind == "PyTorchJob":
                return await self._call("get", "pytorchjobs", self.custom.get_namespaced_custom_object,
                                        *PYTORCHJOB_API[:2], namespace, PYTORCHJOB_API[2], name)
            job = await self._call("get", "jobs", self.batch.read_namespaced_job, name, namespace)
            return self._with_kind(self._plain(job), "Job")
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    @staticmethod
    def _with_kind(obj: dict[str, Any], kind: str) -> dict[str, Any]:
        obj.setdefault("kind", kind)
        obj.setdefault("apiVersion", "batch/v1" if kind == "Job" else "kubeflow.org/v1")
        return obj

    async def _create_child(self, namespace: str, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create; on 409 read back what an earlier incarnation of the operator created.
        Returns the object and whether this call created it."""
        kind, name = body["kind"], body["metadata"]["name"]
        try:
            if kind == "PyTorchJob":
                return await self._call("create", "pytorchjobs",
                                        self.custom.create_namespaced_custom_object,
                                        *PYTORCHJOB_API[:2], namespace, PYTORCHJOB_API[2],
                                        body), True
            job = await self._call("create", "jobs", self.batch.create_namespaced_job,
                                   namespace, body)
            return self._with_kind(self._plain(job), "Job"), True
        except ApiException as err:
            if err.status != 409:
                raise
        existing = await self._get_child(kind, namespace, name)
        if existing is None:
            raise kopf.TemporaryError(f"{kind} {name} conflicted but is gone", delay=1)
        return existing, False

    async def _set_suspend(self, namespace: str, child: Child, suspend: bool) -> dict[str, Any]:
        # The annotation marks our own suspension, so that resuming never overrides a
        # suspension that belongs to someone else (Kueue's admission gate).
        marker = {"metadata": {"annotations": {ANNOTATION_SUSPENDED: "true" if suspend else None}}}
        if child.kind == "PyTorchJob":
            patch = {**marker, "spec": {"runPolicy": {"suspend": suspend}}}
            return await self._call("patch", "pytorchjobs",
                                    self.custom.patch_namespaced_custom_object,
                                    *PYTORCHJOB_API[:2], namespace, PYTORCHJOB_API[2], child.name,
                                    patch)
        job = await self._call("patch", "jobs", self.batch.patch_namespaced_job, child.name,
                               namespace, {**marker, "spec": {"suspend": suspend}},
                               _content_type=MERGE_PATCH)
        return self._with_kind(self._plain(job), "Job")

    async def _patch_status(self, obj: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        old = obj.get("status") or {}
        # A merge patch keeps keys it does not mention: null out the ones that went away.
        body = {"status": {**{k: None for k in old if k not in status}, **status}}
        meta = obj["metadata"]
        return await self._call("patch", "cwmpipelines/status",
                                self.custom.patch_namespaced_custom_object_status,
                                GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], body)

    async def _pods(self, namespace: str, selector: str) -> list[Any] | None:
        """Best effort: the pods a selector matches (None when they cannot be listed)."""
        try:
            found = await self._call("list", "pods", self.core.list_namespaced_pod, namespace,
                                     label_selector=selector)
        except Exception:  # noqa: BLE001 - optional; RBAC or API trouble must not block progress
            log.warning("pods %s in %s not listed", selector, namespace, exc_info=True)
            return None
        return list(found.items)

    async def _failure_tail(self, namespace: str, child: Child) -> str:
        """The failed child's log tail, read once per child from its pods' status."""
        key = (namespace, child.name)
        if key not in self.failure_tails:
            selector = (f"training.kubeflow.org/job-name={child.name}" if child.kind == "PyTorchJob"
                        else f"batch.kubernetes.io/job-name={child.name}")
            pods = await self._pods(namespace, selector)
            if pods is None:
                return ""
            self.failure_tails[key] = failure_tail(self._plain(p) for p in pods)
        return self.failure_tails[key]

    async def _master_pod_metrics(self, namespace: str, name: str) -> dict[str, float]:
        """Best effort: a JSON termination message of the master pod (no pods: {})."""
        selector = f"training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type=master"
        pods = await self._pods(namespace, selector)
        for pod in pods or []:
            for status in (pod.status.container_statuses or []) if pod.status else []:
                term = status.state.terminated if status.state else None
                if term and term.message:
                    try:
                        return _numbers(json.loads(term.message))
                    except ValueError:
                        continue
        return {}

    async def _metrics_of(self, namespace: str, child: Child) -> dict[str, float]:
        key = (namespace, child.name)
        if key not in self.stage_metrics:
            found: dict[str, float] = {}
            if child.metrics_uri:
                found.update(await asyncio.to_thread(read_stage_metrics, child.metrics_uri))
            found.update(await self._master_pod_metrics(namespace, child.name))
            self.stage_metrics[key] = found
        return self.stage_metrics[key]

    # -- watch events ---------------------------------------------------------------------

    def remember_pipeline(self, obj: dict[str, Any]) -> None:
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        current = self.pipelines.get(key)
        if current is not None and current["metadata"].get("uid") != obj["metadata"].get("uid"):
            current = None  # deleted and re-created with the same name
        if current is None or _rv(obj) >= _rv(current):
            self.pipelines[key] = obj

    def remember_child(self, obj: dict[str, Any]) -> Key | None:
        meta = obj["metadata"]
        pipeline = (meta.get("labels") or {}).get(LABEL_PIPELINE)
        if not pipeline:
            return None
        key = (meta["namespace"], pipeline)
        known = self.children[key].get(meta["name"])
        if known is None or known["metadata"].get("uid") != meta.get("uid") or _rv(obj) >= _rv(known):
            self.children[key][meta["name"]] = obj
        return key

    async def on_pipeline(self, event_type: str | None, obj: dict[str, Any]) -> None:
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        if event_type == "DELETED":
            self.forget(key)
            return
        self.remember_pipeline(obj)
        await self.trigger(key)

    async def on_child(self, event_type: str | None, obj: dict[str, Any]) -> None:
        key: Key | None
        if event_type == "DELETED":
            meta = obj["metadata"]
            key = (meta["namespace"], (meta.get("labels") or {}).get(LABEL_PIPELINE, ""))
            self.children[key].pop(meta["name"], None)
            self.stage_metrics.pop((meta["namespace"], meta["name"]), None)
            self.failure_tails.pop((meta["namespace"], meta["name"]), None)
        else:
            key = self.remember_child(obj)
        if key in self.pipelines:
            await self.trigger(key)

    def forget(self, key: Key) -> None:
        self.pipelines.pop(key, None)
        self.confirmed.pop(key, None)
        for name in self.children.pop(key, {}):
            self.stage_metrics.pop((key[0], name), None)
            self.failure_tails.pop((key[0], name), None)
        for seen in [k for k in self.succeeded_seen if k[:2] == key]:
            del self.succeeded_seen[seen]
        timer = self.timers.pop(key, None)
        if timer:
            timer.cancel()
        self.metrics.set_phases((p.get("status") or {}).get("phase", "Pending")
                                for p in self.pipelines.values())

    # -- reconcile ------------------------------------------------------------------------

    async def trigger(self, key: Key) -> None:
        """Reconcile `key` soon; a trigger arriving while one waits for the lock is merged
        into it (the waiting one will read the newest view anyway)."""
        if key in self.queued:
            return
        self.queued.add(key)
        async with self.locks[key]:
            self.queued.discard(key)
            if key not in self.pipelines:
                return
            started = time.monotonic()
            self.metrics.reconciles.inc()
            try:
                requeue = await self._reconcile(key)
                self.failures.pop(key, None)
            except Exception as err:  # noqa: BLE001 - log, count, retry later; never crash kopf
                self.metrics.errors.inc()
                attempt = self.failures[key]
                self.failures[key] += 1
                requeue = ERROR_BACKOFF[min(attempt, len(ERROR_BACKOFF) - 1)]
                if isinstance(err, kopf.TemporaryError) and err.delay is not None:
                    requeue = float(err.delay)
                log.error("reconcile of %s/%s failed (retry in %.0f s): %s", *key, requeue, err,
                          exc_info=not isinstance(err, kopf.TemporaryError))
            finally:
                self.metrics.reconcile_seconds.observe(time.monotonic() - started)
            self._schedule(key, requeue)

    def _schedule(self, key: Key, delay: float | None) -> None:
        timer = self.timers.pop(key, None)
        if timer:
            timer.cancel()
        if delay is None:
            return
        loop = asyncio.get_running_loop()
        self.timers[key] = loop.call_later(
            delay + 0.01, lambda: asyncio.ensure_future(self.trigger(key)))

    async def _observe(self, key: Key, obj: dict[str, Any]) -> list[Child]:
        namespace = key[0]
        uid = obj["metadata"].get("uid")
        kids = self.children[key]
        confirmed = self.confirmed[key]
        for kind, name in children_to_confirm(obj):
            # An in-flight child the status names is read from the API server when the watch has
            # not delivered it (a lagging watch must not look like a deletion), and once per
            # operator process in any case: after a restart, act on what the server holds.
            if name not in kids or name not in confirmed:
                found = await self._get_child(kind, namespace, name)
                confirmed.add(name)
                if found is not None:
                    self.remember_child(found)
        done = {s.get("name") for s in (obj.get("status") or {}).get("steps") or []
                if s.get("state") == StepState.SUCCEEDED}
        observed = []
        for raw in list(kids.values()):
            if uid and _owner_uid(raw) not in (uid, None):
                continue  # a previous pipeline of the same name, not yet garbage-collected
            child = observe_child(raw)
            if child.phase == "Succeeded":
                if child.step not in done:
                    self.succeeded_seen.setdefault((*key, child.step), time.monotonic())
                if child.kind == "PyTorchJob":
                    child = observe_child(raw, await self._metrics_of(namespace, child))
            elif child.phase == "Failed":
                tail = await self._failure_tail(namespace, child)
                if tail:
                    child = replace(child, message=f"{child.message}; {tail}" if child.message
                                    else tail)
            observed.append(child)
        return observed

    async def _reconcile(self, key: Key) -> float | None:
        obj = self.pipelines[key]
        namespace = key[0]
        for _ in range(3):
            children = await self._observe(key, obj)
            decision = reconcile(obj, children, self.clock(), self.settings)
            if not await self._apply(key, obj, decision):
                break
            # A create answered 409: a child from before a restart that the watch had not
            # delivered yet. It is in the view now; decide again with it.
        else:
            raise kopf.TemporaryError("children keep conflicting", delay=1)
        ref = {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"),
               "namespace": namespace, "name": key[1], "uid": obj["metadata"].get("uid")}
        if decision.changed:
            patched = await self._patch_status(obj, decision.status)
            self.remember_pipeline(patched)
            log.info("status %s", summary(decision.status), extra={
                "k8s_ref": ref, "phase": decision.status.get("phase"),
                "currentStep": decision.status.get("currentStep"),
                "progress": decision.status.get("progress")})
        for event in decision.events:
            kopf.event(obj, type=event.type, reason=event.reason,  # type: ignore[arg-type]
                       message=event.message)
            log.log(logging.WARNING if event.type == "Warning" else logging.INFO, event.message,
                    extra={"k8s_ref": ref, "reason": event.reason})
        for step, seconds in decision.durations:
            self.metrics.stage_seconds.labels(step=step).observe(seconds)
        self.metrics.set_phases((p.get("status") or {}).get("phase", "Pending")
                                for p in self.pipelines.values())
        return decision.requeue_after

    async def _apply(self, key: Key, obj: dict[str, Any], decision: Decision) -> bool:
        """Create and suspend/resume children. Returns True (and stops) when a create finds
        the child already there: the decision was made without it."""
        namespace = key[0]
        for create in decision.create:
            assert decision.pipeline is not None and decision.plan is not None
            body = render_child(decision.pipeline, namespace, create.step, create.attempt,
                                self.settings)
            kopf.adopt(body, owner=obj)  # type: ignore[arg-type]  # kopf takes any object dict
            created, new = await self._create_child(namespace, body)
            if _owner_uid(created) != obj["metadata"].get("uid"):
                raise kopf.TemporaryError(
                    f"{body['metadata']['name']} still belongs to a deleted pipeline of the "
                    "same name", delay=1)
            self.remember_child(created)
            self.confirmed[key].add(body["metadata"]["name"])
            if not new:
                return True
            self._record_handoff(key, decision.plan.names, create.step.name)
        for change in decision.suspend:
            self.remember_child(await self._set_suspend(namespace, change.child, change.suspend))
        return False

    def _record_handoff(self, key: Key, steps: list[str], step: str) -> None:
        """Time from the previous step's success being seen to this step's child created."""
        index = steps.index(step)
        if index == 0:
            return
        seen = self.succeeded_seen.pop((*key, steps[index - 1]), None)
        if seen is not None:
            self.metrics.handoff.observe(time.monotonic() - seen)


# ------------------------------------------------------------------------------------------
# Registration


def connection_info(configuration: Any) -> kopf.ConnectionInfo:
    """kopf's credentials from a kubernetes.client.Configuration (the same identity for kopf's
    watches and our own calls): a bearer token (ServiceAccount, in-cluster or kubeconfig) or a
    client certificate."""
    if configuration.refresh_api_key_hook is not None:
        configuration.refresh_api_key_hook(configuration)
    # kubernetes ≥ 35 stores the token under "BearerToken" (older clients: "authorization").
    auth = configuration.get_api_key_with_prefix("BearerToken", alias="authorization") or ""
    scheme, _, token = auth.partition(" ") if " " in auth else ("Bearer", "", auth)
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert or None,
        insecure=not configuration.verify_ssl,
        scheme=scheme if token else None,
        token=token or None,
        certificate_path=configuration.cert_file or None,
        private_key_path=configuration.key_file or None,
    )


def build_registry(controller: Controller, configuration: Any) -> kopf.OperatorRegistry:
    """Handlers bound to one controller (a fresh registry per operator instance)."""
    registry = kopf.OperatorRegistry()
    child_labels = {LABEL_PIPELINE: kopf.PRESENT}

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return connection_info(configuration)

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def pipeline_event(event: Mapping[str, Any], **_: Any) -> None:
        await controller.on_pipeline(event.get("type"), dict(event["object"]))

    @kopf.on.event("batch", "v1", "jobs", labels=child_labels, registry=registry)
    async def job_event(event: Mapping[str, Any], **_: Any) -> None:
        await controller.on_child(event.get("type"),
                                  Controller._with_kind(dict(event["object"]), "Job"))

    @kopf.on.event(*PYTORCHJOB_API, labels=child_labels, registry=registry)
    async def pytorchjob_event(event: Mapping[str, Any], **_: Any) -> None:
        await controller.on_child(event.get("type"), dict(event["object"]))

    return registry


def operator_settings() -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.peering.standalone = True  # one replica (Recreate): no peering objects
    settings.scanning.disabled = True  # our resources are known; no CRD/namespace watching
    settings.posting.level = logging.CRITICAL  # post only our explicit Events, not log lines
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    return settings
