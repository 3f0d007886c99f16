"""render: the exact objects the operator creates (pure; no cluster)."""

from __future__ import annotations

import json

import pytest
import yaml

from cwm_operator.render import child_name, render_child
from cwm_spec.plan import Target, build_plan
from cwm_spec.validation import parse_pipeline
from tests.operator.helpers import REPO, SETTINGS, manifest, sdk_roundtrip

CLUSTER = REPO / "examples" / "cluster.yaml"


def _plan(doc, settings=SETTINGS, namespace="research"):
    pipeline = parse_pipeline(doc, target="cluster", default_images=settings.default_images)
    return pipeline, build_plan(pipeline, Target.cluster(pipeline, namespace,
                                                         settings.default_images))


def _cluster_doc():
    return yaml.safe_load(CLUSTER.read_text())


def test_every_step_renders_its_plan_command_and_environment_unchanged() -> None:
    pipeline, plan = _plan(_cluster_doc())
    for step in plan.steps:
        obj = render_child(pipeline, "research", step, 1, SETTINGS)
        if obj["kind"] == "PyTorchJob":
            pod = obj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        else:
            pod = obj["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["command"] == list(step.command)
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        sandbox = env.pop("CWM_SANDBOX", None)  # the only addition: how to isolate programs
        assert env == dict(step.env)
        assert sandbox == ("bwrap" if step.kind in ("beam", "train") else None), step.name
        assert container["image"] == step.image
        assert obj["metadata"]["name"] == child_name("cwm-8b", step.name, 1)
        assert obj["metadata"]["labels"]["cwm.dev/step"] == step.name
        assert obj["metadata"]["annotations"]["cwm.dev/fingerprint"] == step.fingerprint


def test_training_stage_is_a_pytorchjob_with_master_workers_and_gpu_placement() -> None:
    pipeline, plan = _plan(_cluster_doc())
    obj = render_child(pipeline, "research", plan.step("pretrain"), 3, SETTINGS)
    assert obj["apiVersion"] == "kubeflow.org/v1" and obj["kind"] == "PyTorchJob"
    assert obj["metadata"]["name"] == "cwm-8b-pretrain-3"
    assert obj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-h100"
    specs = obj["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 7
    pod = specs["Worker"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["name"] == "pytorch"
    assert container["command"][:3] == ["torchrun", "--nnodes=8", "--nproc-per-node=8"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["resources"]["requests"] == {"cpu": "96", "memory": "1600Gi",
                                                  "nvidia.com/gpu": "8"}
    assert container["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    # The spec's node selector wins; the operator's GPU pool default is merged underneath.
    assert pod["nodeSelector"] == {"pool": "gpu",
                                   "cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        pod["tolerations"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    assert pod["automountServiceAccountToken"] is False
    # A lost rank restarts in place (the stage resumes from its checkpoint), a few times.
    assert obj["spec"]["runPolicy"] == {"backoffLimit": 3, "cleanPodPolicy": "None",
                                        "suspend": False}
    assert pod["restartPolicy"] == "OnFailure"
    assert {r["restartPolicy"] for r in obj["spec"]["pytorchReplicaSpecs"].values()} == {"OnFailure"}
    assert obj["spec"]["nprocPerNode"] == "8"


def test_pytorchjob_survives_the_training_sdk_model_without_losing_fields() -> None:
    doc = _cluster_doc()
    doc["spec"]["stages"][0]["deadlineSeconds"] = 7200
    doc["spec"]["stages"][0]["resources"]["affinity"] = {"podAntiAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, "podAffinityTerm": {
            "topologyKey": "kubernetes.io/hostname",
            "labelSelector": {"matchLabels": {"cwm.dev/step": "pretrain"}}}}]}}
    pipeline, plan = _plan(doc)
    for step in plan.steps:
        if step.kind != "train":
            continue
        obj = render_child(pipeline, "research", step, 2, SETTINGS, suspend=True)
        assert sdk_roundtrip(obj) == obj
    pretrain = render_child(pipeline, "research", plan.step("pretrain"), 1, SETTINGS)
    assert pretrain["spec"]["runPolicy"]["activeDeadlineSeconds"] == 7200
    pod = pretrain["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]


def test_data_steps_are_single_pod_jobs_without_pod_retries() -> None:
    pipeline, plan = _plan(_cluster_doc())
    job = render_child(pipeline, "research", plan.step("traces"), 1, SETTINGS, suspend=True)
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["suspend"] is True
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert "nodeSelector" not in pod and "tolerations" not in pod  # CPU: no GPU-pool defaults
    assert "--runner=FlinkRunner" in pod["containers"][0]["command"]
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]


def test_sharded_data_steps_are_indexed_jobs() -> None:
    """spec.data.beam.pods: each data step is an Indexed Job of that many pods, told the part
    count (Kubernetes sets JOB_COMPLETION_INDEX); the other steps are unaffected."""
    doc = manifest("wide", "s3://bucket/runs")
    doc["spec"]["data"] = {"beam": {"pods": 4}}
    pipeline, plan = _plan(doc)
    for step in plan.steps:
        obj = render_child(pipeline, "research", step, 1, SETTINGS)
        if step.kind == "beam":
            spec = obj["spec"]
            assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == \
                ("Indexed", 4, 4), step.name
            env = {e["name"]: e.get("value") for e in spec["template"]["spec"]["containers"][0]["env"]}
            assert env["CWM_PARTS"] == "4"
        elif obj["kind"] == "Job":
            assert "completionMode" not in obj["spec"] and obj["spec"]["completions"] == 1


def test_pods_are_refused_with_a_distributed_runner() -> None:
    doc = manifest("flink", "s3://bucket/runs")
    doc["spec"]["data"] = {"beam": {"pods": 4, "runner": "FlinkRunner"}}
    with pytest.raises(ValueError, match="pods"):
        _plan(doc)


def test_pvc_storage_is_mounted_everywhere(tmp_path) -> None:
    doc = manifest("pvc", "file:///unused")
    doc["spec"]["storage"] = {"pvc": {"claimName": "cwm-data"}, "mountPath": "/mnt/cwm"}
    pipeline, plan = _plan(doc, namespace="ns")
    for step in plan.steps:
        obj = render_child(pipeline, "ns", step, 1, SETTINGS)
        pods = ([r["template"]["spec"] for r in obj["spec"]["pytorchReplicaSpecs"].values()]
                if obj["kind"] == "PyTorchJob" else [obj["spec"]["template"]["spec"]])
        for pod in pods:
            assert {"name": "data", "persistentVolumeClaim": {"claimName": "cwm-data"}} in \
                pod["volumes"]
            assert {"name": "data", "mountPath": "/mnt/cwm"} in pod["containers"][0][
                "volumeMounts"]
        assert all(v.startswith("/mnt/cwm/ns/pvc/") for v in step.outputs.values())


def test_settings_reach_the_pods() -> None:
    settings = SETTINGS.fast(image_pull_policy="Always", service_account="trainer",
                             clean_pod_policy="All")
    pipeline, plan = _plan(_cluster_doc(), settings)
    obj = render_child(pipeline, "research", plan.step("rl"), 1, settings)
    pod = obj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["serviceAccountName"] == "trainer"
    assert pod["containers"][0]["imagePullPolicy"] == "Always"
    assert obj["spec"]["runPolicy"]["cleanPodPolicy"] == "All"


def test_attempt_must_be_positive() -> None:
    pipeline, plan = _plan(_cluster_doc())
    with pytest.raises(ValueError, match="attempt"):
        render_child(pipeline, "research", plan.steps[0], 0, SETTINGS)


def test_cwm_render_prints_every_object(capsys, monkeypatch) -> None:
    from cwm_operator.cli import main

    monkeypatch.delenv("CWM_BEAM_IMAGE", raising=False)
    assert main(["render", str(CLUSTER)]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in docs] == ["Job", "Job", "Job", "PyTorchJob", "PyTorchJob",
                                         "PyTorchJob", "PyTorchJob"]  # corpus comes from a URI
    assert main(["render", str(CLUSTER), "--step", "sft", "--attempt", "2", "-o", "json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["metadata"]["name"] == "cwm-8b-sft-2"


def test_cwm_render_names_missing_images(capsys, monkeypatch) -> None:
    from cwm_operator.cli import main

    monkeypatch.delenv("CWM_BEAM_IMAGE", raising=False)
    monkeypatch.delenv("CWM_TRAINER_IMAGE", raising=False)
    assert main(["render", str(REPO / "examples" / "tiny.yaml")]) == 1
    err = capsys.readouterr().err
    assert "spec.storage" in err and "spec.images.beam" in err
    monkeypatch.setenv("CWM_BEAM_IMAGE", "b:1")
    monkeypatch.setenv("CWM_TRAINER_IMAGE", "t:1")
    assert main(["render", str(REPO / "examples" / "tiny.yaml")]) == 1
    assert "spec.images" not in capsys.readouterr().err


def test_openai_policy_key_comes_from_the_named_secret():
    from cwm_operator.render import render_child
    from cwm_operator.settings import Settings
    from cwm_spec.plan import Target, build_plan
    from cwm_spec.validation import load_file

    pipeline = load_file("examples/cluster.yaml")
    plan = build_plan(pipeline, Target.cluster(pipeline, "research"))
    job = render_child(pipeline, "research", plan.step("trajectories"), 1, Settings())
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    key = next(e for e in env if e["name"] == "CWM_POLICY_API_KEY")
    assert key["valueFrom"]["secretKeyRef"] == {"name": "vllm-api-key", "key": "apiKey"}


# ------------------------------------------------------------------------------------------
# Pod security: what the sandbox's documentation relies on


LOCAL = REPO / "examples" / "local-cluster.yaml"


def _pod_specs(obj):
    if obj["kind"] == "PyTorchJob":
        return [r["template"] for r in obj["spec"]["pytorchReplicaSpecs"].values()]
    return [obj["spec"]["template"]]


def _all_templates(settings=SETTINGS):
    for path in (CLUSTER, LOCAL):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d.get("kind") == "CWMPipeline"]
        pipeline, plan = _plan(docs[0], settings)
        for step in plan.steps:
            for template in _pod_specs(render_child(pipeline, "research", step, 1, settings)):
                yield path.name, step, template


def test_every_pod_runs_non_root_read_only_without_capabilities_or_token() -> None:
    for source, step, template in _all_templates():
        pod = template["spec"]
        what = f"{source}: {step.name}"
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 65532, what
        assert pod["automountServiceAccountToken"] is False, what
        (container,) = pod["containers"]
        ctx = container["securityContext"]
        assert ctx == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                       "readOnlyRootFilesystem": True, "runAsNonRoot": True}, what
        assert {"name": "tmp", "emptyDir": {}} in pod["volumes"], what
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"], what


def test_pods_that_sandbox_programs_get_the_localhost_profile_and_the_mode() -> None:
    """bubblewrap cannot create namespaces under RuntimeDefault: the pods that run untrusted
    programs get the chart's Localhost profile, and are told to refuse weaker isolation."""
    seen = set()
    for _, step, template in _all_templates():
        profile = template["spec"]["securityContext"]["seccompProfile"]
        labels = template["metadata"]["labels"]
        if step.kind in ("beam", "train"):
            assert profile == {"type": "Localhost", "localhostProfile": "cwm-sandbox.json"}, step.name
            assert labels["cwm.dev/network"] == ("sandbox" if step.kind == "beam" else "trainer")
        else:
            assert profile == {"type": "RuntimeDefault"}, step.name
            assert labels["cwm.dev/network"] == "job"
        seen.add(step.kind)
    assert seen == {"beam", "job", "train"}
    weaker = SETTINGS.fast(sandbox_mode="rlimits")
    for _, step, template in _all_templates(weaker):
        assert template["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
        assert env.get("CWM_SANDBOX") == ("rlimits" if step.kind in ("beam", "train") else None)


def test_egress_label_on_every_pod_with_artifacts_in_an_object_store() -> None:
    for source, step, template in _all_templates():
        egress = template["metadata"]["labels"].get("cwm.dev/egress")
        remote = source == "cluster.yaml"
        assert egress == ("storage" if remote else None), (source, step.name)


def test_settings_refuse_an_unknown_sandbox_mode() -> None:
    from cwm_operator.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match="CWM_SANDBOX_MODE"):
        Settings.from_env({"CWM_SANDBOX_MODE": "none"})
    assert Settings.from_env({"CWM_SANDBOX_MODE": "rlimits"}).sandbox_mode == "rlimits"


@pytest.mark.cluster
def test_pod_security_restricted_admits_every_pod(kube, kube_namespace) -> None:
    """The API server's own Pod Security admission, level `restricted`, enforced on a namespace:
    a pod made of each rendered template is admitted (server-side dry run, nothing persists)."""
    from kubernetes import client

    core = client.CoreV1Api(kube.api_client)
    core.patch_namespace(kube_namespace, {"metadata": {"labels": {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest"}}})
    bad = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "root"},
           "spec": {"containers": [{"name": "c", "image": "x"}]}}
    with pytest.raises(client.ApiException, match="violates PodSecurity"):
        core.create_namespaced_pod(kube_namespace, bad, dry_run="All")
    for _source, step, template in _all_templates():
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": f"{step.name}-probe", "labels": template["metadata"]["labels"]},
               "spec": template["spec"]}
        core.create_namespaced_pod(kube_namespace, pod, dry_run="All")  # raises if refused


def test_local_cluster_example_is_what_the_readme_says(capsys) -> None:
    """examples/local-cluster.yaml, through `cwm validate` and `cwm render` as a user runs them:
    Beam steps as Indexed Jobs of 2 pods, every training stage a Master and a Worker on the
    CPU (gloo), artifacts on the PVC the file also declares, in a restricted namespace."""
    from cwm_operator.cli import main

    assert main(["validate", str(LOCAL)]) == 0
    assert "valid CWMPipeline 'local' (8 steps" in capsys.readouterr().out
    assert main(["render", str(LOCAL)]) == 0
    objects = list(yaml.safe_load_all(capsys.readouterr().out))
    kinds = {o["metadata"]["name"]: (o["kind"], o["metadata"]["namespace"]) for o in objects}
    assert kinds == {f"local-{s}-1": ("PyTorchJob" if s in ("pretrain", "midtrain", "sft", "rl") else "Job",
                                      "cwm-local")
                     for s in ("traces", "trajectories", "corpus", "tokenizer", "pretrain", "midtrain",
                               "sft", "rl")}
    for obj in objects:
        name = obj["metadata"]["name"]
        if obj["kind"] == "Job":
            indexed = name in ("local-traces-1", "local-trajectories-1")
            assert (obj["spec"].get("completionMode"), obj["spec"]["completions"]) == \
                (("Indexed", 2) if indexed else (None, 1)), name
        else:
            replicas = obj["spec"]["pytorchReplicaSpecs"]
            assert {k: r["replicas"] for k, r in replicas.items()} == {"Master": 1, "Worker": 1}, name
            assert obj["spec"]["nprocPerNode"] == "1"
        for template in _pod_specs(obj):
            resources = template["spec"]["containers"][0]["resources"]
            assert "nvidia.com/gpu" not in resources["requests"], name  # CPU: gloo
            assert {"name": "data", "persistentVolumeClaim": {"claimName": "cwm-local-data"}} in \
                template["spec"]["volumes"], name
    docs = {d["kind"]: d for d in yaml.safe_load_all(LOCAL.read_text())}
    assert docs["Namespace"]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert docs["PersistentVolumeClaim"]["metadata"]["name"] == "cwm-local-data"
