"""The end-to-end run's pipeline: examples/local-cluster.yaml, moved into the test's namespace
and volume, with a pretrain stage long enough to lose a pod in the middle of it (pure).

The same CWMPipeline document runs on the cluster (``cluster_documents``) and embedded with
``cwm run`` (``embedded_document``), so their data sets and losses can be compared.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "local-cluster.yaml"
CLAIM = "cwm-local-data"
#: pretrain: long enough that a pod deleted after its first checkpoint dies mid-stage.
PRETRAIN_STEPS = 100
PRETRAIN_CHECKPOINT_EVERY = 10


def example() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]


def pipeline_document(name: str, namespace: str) -> dict[str, Any]:
    """The example's CWMPipeline, renamed, with the longer pretrain stage."""
    doc = copy.deepcopy(next(d for d in example() if d["kind"] == "CWMPipeline"))
    doc["metadata"] = {"name": name, "namespace": namespace}
    pretrain = next(s for s in doc["spec"]["stages"] if s["name"] == "pretrain")
    pretrain.update(steps=PRETRAIN_STEPS, checkpointEvery=PRETRAIN_CHECKPOINT_EVERY)
    return doc


def cluster_documents(name: str, namespace: str, volume: Path) -> list[dict[str, Any]]:
    """The PersistentVolume (a hostPath ``volume``), its claim and the pipeline, in ``namespace``
    (which the caller creates, labelled as the example's Namespace is)."""
    docs = example()
    pv = copy.deepcopy(next(d for d in docs if d["kind"] == "PersistentVolume"))
    pv["metadata"]["name"] = f"{namespace}-data"
    pv["spec"]["claimRef"]["namespace"] = namespace
    pv["spec"]["hostPath"]["path"] = str(volume)
    claim = copy.deepcopy(next(d for d in docs if d["kind"] == "PersistentVolumeClaim"))
    claim["metadata"]["namespace"] = namespace
    claim["spec"]["volumeName"] = pv["metadata"]["name"]
    return [pv, claim, pipeline_document(name, namespace)]


def namespace_labels() -> dict[str, str]:
    """The example Namespace's labels (Pod Security `restricted`)."""
    return dict(next(d for d in example() if d["kind"] == "Namespace")["metadata"]["labels"])


def embedded_document(name: str, namespace: str, storage: Path,
                      corpus_from: Path | None = None) -> dict[str, Any]:
    """The same pipeline for `cwm run`: artifacts in a local folder instead of the claim, each
    Beam step 2 processes and each stage 2 processes on this machine."""
    doc = pipeline_document(name, namespace)
    doc["spec"]["storage"] = {"uri": f"file://{storage}"}
    # The same parts as the 2-pod Indexed Jobs: 2 worker processes, one part each
    # (cwm_beam.step.run_as_parts splits the work the same way in both).
    doc["spec"]["data"]["beam"].update(workers=2, pods=1)
    if corpus_from is not None:
        # The corpus and rehearsal text are built from the Python installed where the step runs
        # (the image's, or this machine's): read the cluster run's data sets instead, so the
        # tokenizer and the stages see the same inputs.
        doc["spec"]["data"]["corpus"] = {"uri": f"file://{corpus_from / 'dataset'}"}
        doc["spec"]["data"]["rehearsal"] = {"uri": f"file://{corpus_from / 'rehearsal'}"}
    for stage in doc["spec"]["stages"]:
        # The same world size on one machine: 2 processes instead of 2 pods of one (where a
        # stage runs is not part of its fingerprint, so the outputs are comparable).
        stage["resources"] = {**stage["resources"], "nodes": 1, "processesPerNode": 2}
    return doc


def broken_document(name: str, namespace: str) -> dict[str, Any]:
    """A pipeline whose first step fails in its pod: its traces source names a file that is
    not on the volume."""
    doc = pipeline_document(name, namespace)
    doc["spec"]["data"]["traces"]["sources"] = [{"kind": "jsonl", "uri": "/data/no-such-programs.jsonl"}]
    return doc
