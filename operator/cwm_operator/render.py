"""Render a plan step into the exact Kubernetes object the operator creates for it (pure).

Data-generation steps (``traces``, ``trajectories``, ``corpus``, ``tokenizer``) become batch/v1
Jobs whose one container runs the step's command; a Beam step names its runner in its own flags,
so the same Job runs the pipeline in-process (DirectRunner) or submits it to Flink, Spark or
Dataflow. Training stages become kubeflow.org/v1 PyTorchJobs built from the ``kubeflow-training``
SDK's models: a Master and ``nodes - 1`` Workers, container ``pytorch`` running ``torchrun``.

Both carry the plan's command and environment unchanged (``$CWM_STEP_CONFIG``), so a pod does
exactly what ``cwm run`` does locally; pods that run untrusted programs add ``CWM_SANDBOX`` (how
``cwm_exec.sandbox`` must isolate them). Every pod is fit for Pod Security ``restricted``: uid
65532, no privilege escalation, no capabilities, a read-only root file system with an emptyDir at
``/tmp``, no service-account token, and a seccomp profile: ``RuntimeDefault``, or for the pods
that sandbox programs (data steps, and training stages whose RL and evaluation run the model's
code) the chart's Localhost profile that lets bubblewrap create its namespaces
(``CWM_SANDBOX_MODE=bwrap``, the default). Pod labels ``cwm.dev/network`` and ``cwm.dev/egress``
are what the chart's NetworkPolicies select. Retries belong to the operator, not the child: each
attempt is its own child named ``<pipeline>-<step>-<attempt>`` (``backoffLimit: 0``), which is
what makes creation idempotent (a 409 means "already done") and every attempt visible. The one
exception is a training stage's pods: they restart in place a few times (``OnFailure``), because
a lost rank is recovered faster from the stage's own checkpoint than by a new attempt.

    cwm render examples/cluster.yaml              # every step's object, as YAML
    cwm render examples/cluster.yaml --step rl --attempt 2 -o json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from kubeflow.training.api_client import ApiClient
from kubeflow.training.models import (
    KubeflowOrgV1PyTorchJob,
    KubeflowOrgV1PyTorchJobSpec,
    KubeflowOrgV1ReplicaSpec,
    KubeflowOrgV1RunPolicy,
)
from kubernetes.client import (
    V1Capabilities,
    V1Container,
    V1EmptyDirVolumeSource,
    V1EnvFromSource,
    V1EnvVar,
    V1EnvVarSource,
    V1Job,
    V1JobSpec,
    V1ObjectMeta,
    V1PersistentVolumeClaimVolumeSource,
    V1PodSecurityContext,
    V1PodSpec,
    V1PodTemplateSpec,
    V1ResourceRequirements,
    V1SeccompProfile,
    V1SecretEnvSource,
    V1SecretKeySelector,
    V1SecurityContext,
    V1Toleration,
    V1Volume,
    V1VolumeMount,
)

from cwm_operator.settings import Settings
from cwm_spec.api import API_VERSION, KIND, CWMPipeline, Resources
from cwm_spec.plan import Step, Target, build_plan
from cwm_spec.validation import load_documents, parse_pipeline

LABEL_PIPELINE = "cwm.dev/pipeline"
LABEL_STEP = "cwm.dev/step"
LABEL_ATTEMPT = "cwm.dev/attempt"
ANNOTATION_FINGERPRINT = "cwm.dev/fingerprint"
ANNOTATION_METRICS = "cwm.dev/metrics-uri"
ANNOTATION_SUSPENDED = "cwm.dev/suspended"  # "true" while suspended by the operator
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
GPU_RESOURCE = "nvidia.com/gpu"
PYTORCHJOB_API = ("kubeflow.org", "v1", "pytorchjobs")
JOB_API = ("batch", "v1", "jobs")
DATA_VOLUME = "data"
TMP_VOLUME = "tmp"
#: Steps whose pods run untrusted programs in cwm_exec.sandbox: the Beam data steps (traces,
#: trajectories) and the training stages (RL rollouts and mutate-fix evaluation run the model's
#: code). The others (corpus, tokenizer) execute nothing they read.
SANDBOX_KINDS = ("beam", "train")
#: NetworkPolicy selectors (charts/cwm-operator/templates/networkpolicy.yaml): `sandbox` pods get
#: no network but DNS and storage, `trainer` pods only their peers, DNS and storage.
LABEL_NETWORK = "cwm.dev/network"
#: "storage" on every step pod whose artifacts live in an object store: the chart's egress
#: allow-list (DNS and the store) instead of whatever else the pod could reach.
LABEL_EGRESS = "cwm.dev/egress"
#: The images' non-root user (operator/, beam/ and jobs/Dockerfile create it).
RUN_AS = 65532


def child_name(pipeline: str, step: str, attempt: int) -> str:
    """Deterministic, so that a restarted operator finds what it created (≤ 57 characters)."""
    return f"{pipeline}-{step}-{attempt}"


def child_kind(step: Step) -> str:
    return "PyTorchJob" if step.kind == "train" else "Job"


@lru_cache(maxsize=1)
def _api_client() -> Any:
    # The training SDK's serializer: it walks `attribute_map`, which both its own models and the
    # (pydantic-based) kubernetes 37 models carry; the kubernetes client's own serializer
    # falls back to snake_case `to_dict()` for the SDK's models.
    return ApiClient()


def warm_up() -> None:
    """Build the training SDK's serializer ahead of the first reconcile."""
    _api_client()


def to_dict(model: Any) -> dict[str, Any]:
    """A kubernetes/kubeflow model as the API server's JSON (camelCase, no nulls)."""
    return _api_client().sanitize_for_serialization(model)


# ------------------------------------------------------------------------------------------
# Pieces shared by Jobs and PyTorchJobs


def _labels(pipeline: CWMPipeline, step: Step, attempt: int) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "cwm-pipeline",
        "app.kubernetes.io/component": step.name,
        "app.kubernetes.io/managed-by": "cwm-operator",
        LABEL_PIPELINE: pipeline.name,
        LABEL_STEP: step.name,
        LABEL_ATTEMPT: str(attempt),
    }


def _metadata(pipeline: CWMPipeline, namespace: str, step: Step, attempt: int) -> Any:
    labels = _labels(pipeline, step, attempt)
    if step.kind == "train" and pipeline.spec.queue:
        labels[KUEUE_QUEUE_LABEL] = pipeline.spec.queue
    annotations = {ANNOTATION_FINGERPRINT: step.fingerprint}
    if "metrics" in step.outputs:
        annotations[ANNOTATION_METRICS] = step.outputs["metrics"]
    return V1ObjectMeta(name=child_name(pipeline.name, step.name, attempt), namespace=namespace,
                        labels=labels, annotations=annotations)


def _env(pipeline: CWMPipeline, step: Step) -> tuple[list[Any], list[Any] | None]:
    env = [V1EnvVar(name=k, value=v) for k, v in sorted(step.env.items())]
    policy = pipeline.spec.data.trajectories.policy
    if step.name == "trajectories" and policy.api_key_secret:
        # The OpenAI-compatible policy reads its key from $CWM_POLICY_API_KEY.
        env.append(V1EnvVar(name="CWM_POLICY_API_KEY", value_from=V1EnvVarSource(
            secret_key_ref=V1SecretKeySelector(name=policy.api_key_secret, key="apiKey"))))
    explain = pipeline.spec.data.traces.explain
    if step.name == "traces" and explain and explain.api_key_secret and explain.api_key_env:
        # Explained traces read their key from the variable the spec names (apiKeyEnv).
        env.append(V1EnvVar(name=explain.api_key_env, value_from=V1EnvVarSource(
            secret_key_ref=V1SecretKeySelector(name=explain.api_key_secret, key="apiKey"))))
    secret = pipeline.spec.storage.secret
    env_from = [V1EnvFromSource(secret_ref=V1SecretEnvSource(name=secret))] if secret else None
    return env, env_from


def _resources(resources: Resources) -> Any:
    requests: dict[str, str] = {"cpu": resources.cpu, "memory": resources.memory}
    limits: dict[str, str] = {"memory": resources.memory}
    if resources.gpus_per_node:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(resources.gpus_per_node)
    return V1ResourceRequirements(requests=requests, limits=limits)


def _placement(resources: Resources, settings: Settings) -> dict[str, Any]:
    """nodeSelector, tolerations and affinity; GPU stages get the operator's GPU pool defaults
    underneath their own (the spec wins on conflicts)."""
    gpu = resources.gpus_per_node > 0
    selector = {**(settings.gpu_node_selector if gpu else {}), **resources.node_selector}
    tolerations = [V1Toleration(**_snake(t)) for t in (settings.gpu_tolerations if gpu else ())]
    tolerations += [V1Toleration(key=t.key, operator=t.operator, value=t.value, effect=t.effect,
                                 toleration_seconds=t.toleration_seconds)
                    for t in resources.tolerations]
    return {"node_selector": selector or None, "tolerations": tolerations or None,
            # A plain dict serialises as is: the spec already holds the API's own camelCase.
            "affinity": dict(resources.affinity) or None}


def _snake(toleration: Mapping[str, Any]) -> dict[str, Any]:
    names = {"key": "key", "operator": "operator", "value": "value", "effect": "effect",
             "tolerationSeconds": "toleration_seconds"}
    unknown = set(toleration) - set(names)
    if unknown:
        raise ValueError(f"CWM_GPU_TOLERATIONS: unknown toleration field(s) {sorted(unknown)}")
    return {names[k]: v for k, v in toleration.items()}


def _volumes(pipeline: CWMPipeline, train: bool) -> tuple[list[Any], list[Any]]:
    volumes, mounts = [], []
    storage = pipeline.spec.storage
    if storage.pvc:
        volumes.append(V1Volume(name=DATA_VOLUME, persistent_volume_claim=(
            V1PersistentVolumeClaimVolumeSource(claim_name=storage.pvc.claim_name))))
        mounts.append(V1VolumeMount(name=DATA_VOLUME, mount_path=storage.mount_path))
    if train:
        # NCCL and DataLoader workers exchange tensors through /dev/shm (64 MiB by default).
        volumes.append(V1Volume(name="dshm", empty_dir=V1EmptyDirVolumeSource(medium="Memory")))
        mounts.append(V1VolumeMount(name="dshm", mount_path="/dev/shm"))
    # The root file system is read-only: scratch space (Python, Beam, torch) lives here, per pod.
    volumes.append(V1Volume(name=TMP_VOLUME, empty_dir=V1EmptyDirVolumeSource()))
    mounts.append(V1VolumeMount(name=TMP_VOLUME, mount_path="/tmp"))
    return volumes, mounts


def _network_labels(pipeline: CWMPipeline, step: Step) -> dict[str, str]:
    """Sandboxing pods are network-restricted by the chart (the role). With artifacts in an object
    store every step must reach it, so every step pod gets the egress label: the chart's
    storage policy then limits egress to DNS and the store, for the corpus and tokenizer pods too
    (no other policy selects them; they need nothing else)."""
    role = {"beam": "sandbox", "train": "trainer"}.get(step.kind, "job")
    uri = pipeline.spec.storage.uri or ""
    remote = "://" in uri and not uri.startswith("file://")
    return {LABEL_NETWORK: role, **({LABEL_EGRESS: "storage"} if remote else {})}


def _security(step: Step, settings: Settings) -> tuple[Any, Any, list[Any]]:
    """Pod and container security contexts, and the sandbox's environment, for one step.

    Pods that sandbox programs run under the Localhost seccomp profile when the sandbox mode is
    ``bwrap`` (RuntimeDefault refuses the user namespaces bubblewrap needs), and are told which
    mode to enforce: ``CWM_SANDBOX=bwrap`` makes the step fail rather than run programs with
    weaker isolation than the cluster was set up for."""
    sandboxed = step.kind in SANDBOX_KINDS
    if sandboxed and settings.sandbox_mode == "bwrap":
        seccomp = V1SeccompProfile(type="Localhost", localhost_profile=settings.sandbox_seccomp_profile)
    else:
        seccomp = V1SeccompProfile(type="RuntimeDefault")
    pod = V1PodSecurityContext(run_as_non_root=True, run_as_user=RUN_AS, run_as_group=RUN_AS,
                               fs_group=RUN_AS, seccomp_profile=seccomp)
    container = V1SecurityContext(
        allow_privilege_escalation=False, capabilities=V1Capabilities(drop=["ALL"]),
        read_only_root_filesystem=True, run_as_non_root=True)
    env = [V1EnvVar(name="CWM_SANDBOX", value=settings.sandbox_mode)] if sandboxed else []
    return pod, container, env


def _pod_template(pipeline: CWMPipeline, step: Step, attempt: int, settings: Settings,
                  container_name: str) -> Any:
    if not step.image:
        raise ValueError(f"step {step.name!r} has no image (validate with target='cluster')")
    train = step.kind == "train"
    env, env_from = _env(pipeline, step)
    pod_security, container_security, sandbox_env = _security(step, settings)
    volumes, mounts = _volumes(pipeline, train)
    container = V1Container(
        name=container_name,
        image=step.image,
        image_pull_policy=settings.image_pull_policy,
        command=list(step.command),
        env=env + sandbox_env,
        env_from=env_from,
        resources=_resources(step.resources),
        volume_mounts=mounts,
        # Stages may report their metrics as JSON here; logs are the fallback for crashes.
        termination_message_policy="FallbackToLogsOnError",
        security_context=container_security,
    )
    pod = V1PodSpec(
        containers=[container],
        restart_policy="Never",
        service_account_name=settings.service_account,
        # Data generation executes untrusted programs: no API credentials in any child pod.
        automount_service_account_token=False,
        security_context=pod_security,
        volumes=volumes,
        **_placement(step.resources, settings),
    )
    labels = {LABEL_PIPELINE: pipeline.name, LABEL_STEP: step.name, LABEL_ATTEMPT: str(attempt),
              **_network_labels(pipeline, step)}
    return V1PodTemplateSpec(metadata=V1ObjectMeta(labels=labels), spec=pod)


# ------------------------------------------------------------------------------------------
# The two kinds of child


def render_job(pipeline: CWMPipeline, namespace: str, step: Step, attempt: int,
               settings: Settings, *, suspend: bool = False) -> dict[str, Any]:
    """A batch/v1 Job running one data-generation step, no pod-level retries (the operator
    retries the step). One pod; or, for a Beam step with ``spec.data.beam.pods`` > 1, an Indexed
    Job of that many pods, each generating its part (``JOB_COMPLETION_INDEX`` of ``CWM_PARTS``,
    see ``cwm_beam.parts``); the Job succeeds when every index has."""
    pods = pipeline.spec.data.beam.pods if step.kind == "beam" else 1
    template = _pod_template(pipeline, step, attempt, settings, "step")
    if pods > 1:
        template.spec.containers[0].env.append(V1EnvVar(name="CWM_PARTS", value=str(pods)))
    job = V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=_metadata(pipeline, namespace, step, attempt),
        spec=V1JobSpec(
            backoff_limit=0,
            completions=pods,
            parallelism=pods,
            completion_mode="Indexed" if pods > 1 else None,
            active_deadline_seconds=step.deadline_seconds,
            suspend=suspend,
            template=template,
        ),
    )
    return to_dict(job)


def render_pytorchjob(pipeline: CWMPipeline, namespace: str, step: Step, attempt: int,
                      settings: Settings, *, suspend: bool = False) -> dict[str, Any]:
    """A kubeflow.org/v1 PyTorchJob running one training stage with torchrun. Its pods restart
    in place (``OnFailure``, at most ``settings.training_restarts`` times in all) so that a lost
    pod costs the steps since the last checkpoint, not the attempt."""
    def replicas(count: int) -> Any:
        # OnFailure: a rank that dies (its peer's pod was lost) restarts in place and the
        # training operator recreates a deleted pod; both resume from the last checkpoint.
        # `backoffLimit` caps those restarts; then the attempt fails and the operator retries.
        template = _pod_template(pipeline, step, attempt, settings, "pytorch")
        template.spec.restart_policy = "OnFailure"
        return KubeflowOrgV1ReplicaSpec(replicas=count, restart_policy="OnFailure",
                                        template=template)

    specs = {"Master": replicas(1)}
    if step.resources.nodes > 1:
        specs["Worker"] = replicas(step.resources.nodes - 1)
    job = KubeflowOrgV1PyTorchJob(
        api_version="kubeflow.org/v1",
        kind="PyTorchJob",
        metadata=_metadata(pipeline, namespace, step, attempt),
        spec=KubeflowOrgV1PyTorchJobSpec(
            nproc_per_node=str(step.resources.nproc),
            pytorch_replica_specs=specs,
            run_policy=KubeflowOrgV1RunPolicy(
                backoff_limit=settings.training_restarts,
                clean_pod_policy=settings.clean_pod_policy,
                active_deadline_seconds=step.deadline_seconds,
                suspend=suspend,
            ),
        ),
    )
    return to_dict(job)


def render_child(pipeline: CWMPipeline, namespace: str, step: Step, attempt: int,
                 settings: Settings, *, suspend: bool = False) -> dict[str, Any]:
    """The object for one attempt of one step (without owner references: the caller adopts)."""
    if attempt < 1:
        raise ValueError(f"attempt must be ≥ 1, got {attempt}")
    render = render_pytorchjob if step.kind == "train" else render_job
    return render(pipeline, namespace, step, attempt, settings, suspend=suspend)


# ------------------------------------------------------------------------------------------
# `cwm render FILE`


def render_file(path: str, namespace: str | None, settings: Settings, *, step: str | None = None,
                attempt: int = 1) -> list[dict[str, Any]]:
    docs = [d for d in load_documents(Path(path)) if isinstance(d, dict) and d.get("kind") == KIND]
    objects = []
    for doc in docs:
        pipeline = parse_pipeline(doc, path, target="cluster",
                                  default_images=settings.default_images)
        ns = namespace or pipeline.metadata.namespace or "default"
        plan = build_plan(pipeline, Target.cluster(pipeline, ns, settings.default_images))
        steps = [plan.step(step)] if step else list(plan.steps)
        objects += [render_child(pipeline, ns, s, attempt, settings) for s in steps]
    return objects


def _cmd_render(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    try:
        objects = render_file(str(args.file), args.namespace, settings, step=args.step,
                              attempt=args.attempt)
    except KeyError as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps(objects if len(objects) != 1 else objects[0], indent=2))
    else:
        sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False, width=100))
    return 0


def register(subparsers: Any) -> None:
    """Add `cwm render` (called by cwm_operator.cli)."""
    p = subparsers.add_parser(
        "render", help="print the Jobs and PyTorchJobs the operator creates for a pipeline",
        description="Print the exact objects the operator creates for each step (attempt 1, "
        "no owner reference). Default images come from CWM_BEAM_IMAGE / CWM_TRAINER_IMAGE as "
        "in the operator's environment.")
    p.add_argument("file", help=f"a {KIND} manifest ({API_VERSION})")
    p.add_argument("--namespace", "-n", default=None, help="default: the manifest's, or default")
    p.add_argument("--step", default=None, help="only this step")
    p.add_argument("--attempt", type=int, default=1, help="attempt number in the names")
    p.add_argument("--output", "-o", choices=["yaml", "json"], default="yaml")
    p.set_defaults(func=_cmd_render)
