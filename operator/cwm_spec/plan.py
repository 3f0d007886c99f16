"""One plan, two executors: turn a CWMPipeline into the ordered steps that run it.

A step is a plain command plus its environment — exactly what its container runs — with its
inputs and outputs (artifact URIs), resources and a fingerprint. The local runner executes the
commands as subprocesses; the operator wraps the same steps into Jobs and PyTorchJobs. Nothing
here does I/O.

Order: data generation (``traces``, ``trajectories``, ``corpus``: the code corpus and, when a
stage mixes in rehearsal, the general text), ``tokenizer`` (or, with
``spec.model.init``, ``import``: the released checkpoint converted, its tokenizer adopted), then
each training stage in order. A step's fingerprint hashes its own configuration (not where it runs,
nor its output paths) together with its upstream steps' fingerprints, so changing one section of
the spec reruns that step and everything downstream of it, and nothing else.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from cwm_spec import __version__
from cwm_spec.api import CWMPipeline, Resources, StageSpec
from cwm_spec.stepconfig import ENV_VAR, dump_step_config

StepKind = Literal["beam", "job", "train"]


@dataclass(frozen=True)
class Target:
    """Where a plan runs: this machine (artifacts under the work directory) or a cluster."""

    kind: Literal["local", "cluster"]
    storage_root: str  # artifacts of this pipeline live under here
    images: Mapping[str, str] = field(default_factory=dict)  # default images: beam, trainer
    python: str = "python"

    @classmethod
    def local(cls, artifacts_dir: str, pipeline: CWMPipeline | None = None) -> Target:
        """This machine; artifacts under ``artifacts_dir``, or under ``spec.storage.uri``
        (``<uri>/<pipeline name>``) when ``pipeline`` sets one, credentials from the
        environment (see ``cwm_spec.storage``)."""
        uri = pipeline.spec.storage.uri if pipeline is not None else None
        root = f"{uri}/{pipeline.name}" if uri and pipeline is not None else artifacts_dir
        return cls("local", root.rstrip("/"), python=sys.executable)

    @classmethod
    def cluster(
        cls, pipeline: CWMPipeline, namespace: str, images: Mapping[str, str] | None = None
    ) -> Target:
        storage = pipeline.spec.storage
        base = storage.uri if storage.uri else storage.mount_path
        return cls("cluster", f"{base}/{namespace}/{pipeline.name}", dict(images or {}))


@dataclass(frozen=True)
class Step:
    name: str
    kind: StepKind
    module: str
    command: tuple[str, ...]
    env: Mapping[str, str]
    config: Mapping[str, Any]
    inputs: Mapping[str, str]
    outputs: Mapping[str, str]
    after: tuple[str, ...]
    resources: Resources
    image: str | None
    retries: int
    deadline_seconds: int | None
    fingerprint: str


@dataclass(frozen=True)
class Plan:
    pipeline: str
    target: Target
    steps: tuple[Step, ...]

    def step(self, name: str) -> Step:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(f"no step {name!r} in the plan of {self.pipeline}")

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.steps]


def fingerprint(config: Mapping[str, Any], upstream: list[str]) -> str:
    """Hash of what determines a step's result: its configuration, minus where it runs and
    where it writes, plus the fingerprints of what it reads."""
    semantic = {k: v for k, v in config.items()
                if k not in ("inputs", "outputs", "runtime", "fingerprint")}
    payload = dump_step_config({"config": semantic, "upstream": upstream, "version": __version__})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _beam_args(pipeline: CWMPipeline) -> list[str]:
    """The runner, the in-process runner's worker processes (each runs the step on its part of
    the work: cwm_beam.step.run_as_parts), and Beam options, passed through unchanged."""
    beam = pipeline.spec.data.beam
    args = [f"--runner={beam.runner}"]
    if beam.runner == "DirectRunner":
        args += ["--workers", str(beam.workers)]
    return args + list(beam.options)


def _train_command(target: Target, resources: Resources, module: str) -> list[str]:
    if target.kind == "cluster":
        # The Kubeflow training operator sets PET_MASTER_ADDR/PORT and PET_NODE_RANK.
        return ["torchrun", f"--nnodes={resources.nodes}",
                f"--nproc-per-node={resources.nproc}", "-m", module]
    if resources.processes_per_node and resources.processes_per_node > 1:
        return [target.python, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={resources.processes_per_node}", "-m", module]
    return [target.python, "-m", module]


class _Builder:
    """Accumulates steps; each added step sees the fingerprints of the steps it reads."""

    def __init__(self, pipeline: CWMPipeline, target: Target):
        self.pipeline, self.target = pipeline, target
        self.steps: list[Step] = []
        self.outputs: dict[str, dict[str, str]] = {}
        self.prints: dict[str, str] = {}

    def uri(self, step: str, output: str) -> str:
        return f"{self.target.storage_root}/{step}/{output}"

    def add(
        self,
        name: str,
        kind: StepKind,
        module: str,
        spec: Any,
        inputs: dict[str, tuple[str, str] | str],
        outputs: list[str],
        resources: Resources,
        *,
        extra: Mapping[str, Any] | None = None,
        runtime: Mapping[str, Any] | None = None,
        args: list[str] | None = None,
        retries: int = 2,
        deadline: int | None = None,
        image_key: Literal["beam", "trainer"] | None = None,
    ) -> None:
        # An input is either (step, output) or a literal URI given in the spec.
        upstream_steps = sorted({ref[0] for ref in inputs.values() if isinstance(ref, tuple)})
        resolved = {
            k: self.outputs[ref[0]][ref[1]] if isinstance(ref, tuple) else ref
            for k, ref in inputs.items()
        }
        outs = {o: self.uri(name, o) for o in outputs}
        config = {
            "apiVersion": self.pipeline.api_version,
            "pipeline": self.pipeline.name,
            "step": name,
            "kind": kind,
            "seed": 0,
            "spec": spec,
            **(extra or {}),
            "runtime": dict(runtime or {}),
            "inputs": resolved,
            "outputs": outs,
        }
        fp = fingerprint(config, [f"{s}:{self.prints[s]}" for s in upstream_steps])
        config["fingerprint"] = fp  # the step knows what it is: resumable state is kept per fingerprint
        if kind == "train":
            command = _train_command(self.target, resources, module)
        else:
            command = [self.target.python, "-m", module, *(args or [])]
        image_key = image_key or ("trainer" if kind == "train" else "beam")
        images = self.pipeline.spec.images
        image = resources.image or getattr(images, image_key) or self.target.images.get(image_key)
        self.steps.append(Step(
            name=name, kind=kind, module=module, command=tuple(command),
            env={ENV_VAR: dump_step_config(config), "PYTHONUNBUFFERED": "1"},
            config=config, inputs=resolved, outputs=outs, after=tuple(upstream_steps),
            resources=resources, image=image, retries=retries, deadline_seconds=deadline,
            fingerprint=fp,
        ))
        self.outputs[name] = outs
        self.prints[name] = fp


def build_plan(pipeline: CWMPipeline, target: Target) -> Plan:
    """The ordered steps of a pipeline for a target. Pure: same inputs, same plan."""
    spec = pipeline.spec
    data = spec.data
    b = _Builder(pipeline, target)
    sandbox = data.sandbox.dump()
    beam_runtime = {"beam": data.beam.dump()}
    data_inputs: dict[str, tuple[str, str] | str] = {}

    if data.traces.enabled:
        # What the evaluation holds out of training: the step leaves those programs out.
        held_out = {"cruxevalHeldOut": spec.evaluation.cruxeval_held_out}
        b.add("traces", "beam", "cwm_beam.traces", data.traces.dump(), {}, ["dataset"],
              data.resources, extra={"sandbox": sandbox, "evaluation": held_out},
              runtime=beam_runtime, args=_beam_args(pipeline))
        data_inputs["traces"] = ("traces", "dataset")
    if data.trajectories.enabled:
        b.add("trajectories", "beam", "cwm_beam.trajectories", data.trajectories.dump(), {},
              ["dataset"], data.resources, extra={"sandbox": sandbox}, runtime=beam_runtime,
              args=_beam_args(pipeline))
        data_inputs["trajectories"] = ("trajectories", "dataset")
    _add_pretraining_data(b, pipeline, data_inputs)

    if spec.model.init:
        # A released checkpoint: converted once (streaming) into ours plus its tokenizer, which
        # every stage uses instead of a trained one; the first stage starts from its weights.
        # It builds the model in torch: the trainer image has it, the Beam image leaves it out.
        b.add("import", "job", "cwm_jobs.hf_import", spec.model.dump(),
              {"source": spec.model.init}, ["checkpoint", "tokenizer"],
              data.resources.model_copy(update={"image": None}), image_key="trainer")
        tokenizer: tuple[str, str] = ("import", "tokenizer")
        first_init: tuple[str, str] | str | None = ("import", "checkpoint")
    else:
        b.add("tokenizer", "job", "cwm_jobs.tokenizer", spec.tokenizer.dump(),
              dict(data_inputs), ["tokenizer"], data.resources)
        tokenizer, first_init = ("tokenizer", "tokenizer"), None

    previous: str | None = None
    for stage in spec.stages:
        inputs = {**data_inputs, "tokenizer": tokenizer}
        if previous:
            inputs["init"] = (previous, "checkpoint")
        elif init := first_init or stage.init_from:
            inputs["init"] = init
        b.add(stage.name, "train", f"cwm_jobs.{stage.name}", _stage_section(stage), inputs,
              ["checkpoint", "state", "metrics"], stage.resources,
              extra={"model": spec.model.dump(), "evaluation": spec.evaluation.dump(),
                     "sandbox": sandbox},
              runtime={"resources": stage.resources.dump()},
              retries=stage.retries, deadline=stage.deadline_seconds)
        previous = stage.name
    return Plan(pipeline.name, target, tuple(b.steps))


def _add_pretraining_data(b: _Builder, pipeline: CWMPipeline,
                          data_inputs: dict[str, tuple[str, str] | str]) -> None:
    """The code corpus and, when a stage mixes in rehearsal, the general text: given URIs, else
    built locally by the corpus step (``outputs.rehearsal`` beside its ``dataset``), or by a
    rehearsal step of its own when the corpus is given but the text is not."""
    data = pipeline.spec.data
    rehearsed = any(s.data_mix and s.data_mix.rehearsal > 0 for s in pipeline.spec.stages)
    build_text = rehearsed and not data.rehearsal.uri
    if data.corpus.uri:
        data_inputs["corpus"] = data.corpus.uri
        if build_text:
            b.add("rehearsal", "job", "cwm_jobs.rehearsal", data.rehearsal.dump(), {},
                  ["dataset"], data.resources)
            data_inputs["rehearsal"] = ("rehearsal", "dataset")
    else:
        b.add("corpus", "job", "cwm_jobs.corpus", data.corpus.dump(), {},
              ["dataset", "rehearsal"] if build_text else ["dataset"], data.resources,
              extra={"rehearsal": data.rehearsal.dump()} if build_text else None)
        data_inputs["corpus"] = ("corpus", "dataset")
        if build_text:
            data_inputs["rehearsal"] = ("corpus", "rehearsal")
    if rehearsed and data.rehearsal.uri:
        data_inputs["rehearsal"] = data.rehearsal.uri


def _stage_section(stage: StageSpec) -> dict[str, Any]:
    """The stage's spec minus where it runs (resources, retries, deadline: not in the hash)."""
    section = stage.dump()
    for key in ("resources", "retries", "deadlineSeconds"):
        section.pop(key, None)
    return section
