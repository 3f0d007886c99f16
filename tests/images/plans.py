"""The steps the image tests run: planned for a cluster exactly as the operator plans them.

A pipeline document (examples/tiny.yaml, shrunk) with PVC storage mounted at /data gives each
step its pod command (`python -m cwm_beam.traces --runner=DirectRunner --workers 2`, `torchrun
... -m cwm_jobs.pretrain`) and its $CWM_STEP_CONFIG with paths under /data/<namespace>/<name>/.
The tests mount a host folder at /data, so the host reads what the pod wrote.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from cwm_spec.plan import Plan, Target, build_plan
from cwm_spec.validation import parse_pipeline
from tests.images.build import image_refs

REPO = Path(__file__).resolve().parents[2]
MOUNT = "/data"
NAMESPACE = "images"


def tiny_doc(name: str) -> dict[str, Any]:
    """examples/tiny.yaml on a PVC at /data (what the operator would mount)."""
    doc = copy.deepcopy(yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text()))
    doc["metadata"] = {"name": name}
    doc["spec"]["storage"] = {"pvc": {"claimName": "cwm-data"}, "mountPath": MOUNT}
    return doc


def cluster_plan(doc: dict[str, Any]) -> Plan:
    refs = image_refs()
    images = {"beam": refs["cwm-beam"], "trainer": refs["cwm-trainer"]}
    pipeline = parse_pipeline(doc, target="cluster", default_images=images)
    return build_plan(pipeline, Target.cluster(pipeline, NAMESPACE, images))


def host_path(data_dir: Path, pod_path: str) -> Path:
    """Where a path under the pod's /data lies on the host."""
    assert pod_path.startswith(MOUNT + "/"), pod_path
    return data_dir / pod_path.removeprefix(MOUNT + "/")
