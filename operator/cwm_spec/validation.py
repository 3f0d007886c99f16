"""Reading and validating pipeline manifests, with errors that name the field.

Pure functions over parsed YAML; :func:`load_file` is the only one that touches the disk.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from cwm_spec.api import API_VERSION, KIND, CWMPipeline

Target = Literal["local", "cluster", "auto"]


@dataclass(frozen=True)
class FieldError:
    """One problem, located by its path in the manifest (``spec.stages[1].steps``)."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ManifestError(ValueError):
    """A manifest is invalid; ``errors`` lists every problem found."""

    def __init__(self, source: str, errors: list[FieldError]):
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {e}" for e in errors)
        super().__init__(f"{source}: {len(errors)} error(s)\n{lines}")


def format_path(loc: Iterable[str | int]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _message(error: Mapping[str, Any]) -> str:
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required field is missing"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if kind in ("literal_error", "enum") or "type" in kind or kind.endswith("_parsing"):
        msg = f"{msg} (got {error.get('input')!r})"
    return msg


def pydantic_errors(err: ValidationError) -> list[FieldError]:
    # Errors inside tagged choices repeat the tag in the path; pydantic reports model-level
    # errors at the model's location, which is what we want.
    return [FieldError(format_path(e["loc"]), _message(e)) for e in err.errors()]


def target_errors(
    pipeline: CWMPipeline, target: Target, default_images: Mapping[str, str] | None = None
) -> list[FieldError]:
    """Checks that depend on where the pipeline runs."""
    if resolve_target(pipeline, target) != "cluster":
        return []
    spec, defaults = pipeline.spec, default_images or {}
    errors = []
    if not spec.storage.is_cluster:
        errors.append(FieldError(
            "spec.storage",
            "a cluster run needs shared storage: set storage.pvc.claimName or storage.uri",
        ))
    if not (spec.data.resources.image or spec.images.beam or defaults.get("beam")):
        errors.append(FieldError(
            "spec.images.beam",
            "no image for the data-generation steps: set spec.images.beam, "
            "spec.data.resources.image, or the operator's default beam image",
        ))
    for i, stage in enumerate(spec.stages):
        if not (stage.resources.image or spec.images.trainer or defaults.get("trainer")):
            errors.append(FieldError(
                f"spec.stages[{i}].resources.image",
                f"no image for the {stage.name} stage: set it, spec.images.trainer, or the "
                "operator's default trainer image",
            ))
    return errors


# Rules across fields. Each is checked twice from this one table: in Python by
# :func:`rule_errors` (``cwm validate``, the local runner, the operator's Accepted condition) and
# by the API server itself as a CEL rule on the CRD (``x-kubernetes-validations``, placed on the
# spec by :mod:`cwm_spec.crd`), so `kubectl apply` refuses the manifest before anything runs.
# CEL sees the object after the API server filled in the schema's defaults; fields whose
# defaults come from a factory (objects, lists) may be absent, hence the ``has()`` guards.


@dataclass(frozen=True)
class SpecRule:
    """One rule: ``cel`` must hold for the spec; ``field`` is the path a refusal names."""

    field: str  # relative to spec (``.data.traces.enabled``); the CEL refusal's message names it
    message: str
    cel: str


_RL = "self.stages.exists(s, s.name == 'rl'"
SPEC_RULES = (
    SpecRule(
        ".stages",
        "the rl stage cannot use zeroStage 3: sampling needs whole parameters on every rank "
        "(use zeroStage 0, 1 or 2)",
        f"!{_RL} && has(s.zeroStage) && s.zeroStage == 3)",
    ),
    SpecRule(
        ".data.traces.enabled",
        "the rl stage needs trace data (its output-prediction tasks and held-out evaluation "
        "come from it): enable spec.data.traces",
        f"!{_RL}) || !has(self.data) || !has(self.data.traces) || "
        "!has(self.data.traces.enabled) || self.data.traces.enabled",
    ),
    SpecRule(
        ".data.trajectories.enabled",
        "rl.tasks names mutate_fix, which needs trajectory data (the tasks come from it): "
        "enable spec.data.trajectories",
        f"!{_RL} && has(s.rl) && has(s.rl.tasks) && 'mutate_fix' in s.rl.tasks) || "
        "!has(self.data) || !has(self.data.trajectories) || "
        "!has(self.data.trajectories.enabled) || self.data.trajectories.enabled",
    ),
    SpecRule(
        ".stages",
        "rl.maxPolicyLag 0 with rl.rolloutsAhead >= 1 drops every batch sampled ahead (each "
        "trains with a policy lag of at least 1): set maxPolicyLag >= 1, or rolloutsAhead 0",
        f"!{_RL} && has(s.rl) && has(s.rl.maxPolicyLag) && s.rl.maxPolicyLag == 0 && "
        "(!has(s.rl.rolloutsAhead) || s.rl.rolloutsAhead >= 1))",
    ),
    SpecRule(
        ".stages",
        "rl.updatesPerBatch x gradientAccumulation exceeds the samples per batch "
        "(promptsPerStep x groupSize): some optimiser steps would get no sample",
        f"!{_RL} && has(s.rl) && has(s.rl.updatesPerBatch) && has(s.rl.promptsPerStep) && "
        "has(s.rl.groupSize) && s.rl.updatesPerBatch * (has(s.gradientAccumulation) ? "
        "s.gradientAccumulation : 1) > s.rl.promptsPerStep * s.rl.groupSize)",
    ),
)


def rule_errors(pipeline: CWMPipeline) -> list[FieldError]:
    """The :data:`SPEC_RULES` in Python, each error at the exact field (stage index included)."""
    spec, errors = pipeline.spec, []
    for i, stage in enumerate(spec.stages):
        if stage.name != "rl" or stage.rl is None:
            continue
        if stage.zero_stage == 3:
            errors.append(FieldError(f"spec.stages[{i}].zeroStage", SPEC_RULES[0].message))
        if not spec.data.traces.enabled:
            errors.append(FieldError("spec.data.traces.enabled", SPEC_RULES[1].message))
        if "mutate_fix" in stage.rl.tasks and not spec.data.trajectories.enabled:
            errors.append(FieldError(f"spec.stages[{i}].rl.tasks", SPEC_RULES[2].message))
        errors += _rl_batch_errors(f"spec.stages[{i}]", stage)
    return errors


def _rl_batch_errors(where: str, stage: Any) -> list[FieldError]:
    """SPEC_RULES 3 and 4: the rollout lag bound and the mini-batches of one rl stage."""
    rl, errors = stage.rl, []
    if rl.max_policy_lag == 0 and rl.rollouts_ahead >= 1:
        errors.append(FieldError(f"{where}.rl.maxPolicyLag", SPEC_RULES[3].message))
    if rl.updates_per_batch * stage.gradient_accumulation > rl.prompts_per_step * rl.group_size:
        errors.append(FieldError(f"{where}.rl.updatesPerBatch", SPEC_RULES[4].message))
    return errors


def init_errors(pipeline: CWMPipeline) -> list[FieldError]:
    """What ``spec.model.init`` (a released checkpoint as the starting point) rules out.

    Pretraining is refused rather than dropped from the plan: a stage the manifest lists would
    otherwise silently not run, and its settings (steps, learning rate) silently not apply."""
    spec = pipeline.spec
    if not spec.model.init:
        return []
    errors = []
    for i, stage in enumerate(spec.stages):
        if stage.name == "pretrain":
            errors.append(FieldError("spec.model.init", f"spec.stages[{i}] is pretrain; a "
                                     "checkpoint given by init is already pretrained: remove "
                                     "the pretrain stage (mid-training, SFT and RL start from it)"))
    if spec.stages[0].init_from:
        errors.append(FieldError("spec.stages[0].initFrom", "not allowed with spec.model.init "
                                 "(the first stage starts from the imported checkpoint)"))
    for name in sorted(spec.tokenizer.model_fields_set):
        field = TOKENIZER_FIELDS.get(name, name)
        errors.append(FieldError(f"spec.tokenizer.{field}", "not allowed with spec.model.init "
                                 "(the checkpoint's tokenizer.json is used, none is trained)"))
    return errors


TOKENIZER_FIELDS = {"vocab_size": "vocabSize", "uri": "uri", "sample_records": "sampleRecords"}


def resolve_target(pipeline: CWMPipeline, target: Target) -> Literal["local", "cluster"]:
    if target == "auto":
        return "cluster" if pipeline.spec.storage.is_cluster else "local"
    return target


def parse_pipeline(
    doc: Any,
    source: str = "<manifest>",
    *,
    target: Target = "auto",
    default_images: Mapping[str, str] | None = None,
) -> CWMPipeline:
    """Validate one parsed document; raise :class:`ManifestError` listing every problem."""
    if not isinstance(doc, dict):
        raise ManifestError(source, [FieldError("", "expected a mapping (a CWMPipeline object)")])
    head = []
    if doc.get("apiVersion") != API_VERSION:
        head.append(FieldError("apiVersion", f"must be {API_VERSION} (got {doc.get('apiVersion')!r})"))
    if doc.get("kind") != KIND:
        head.append(FieldError("kind", f"must be {KIND} (got {doc.get('kind')!r})"))
    if head:
        raise ManifestError(source, head)
    try:
        pipeline = CWMPipeline.model_validate(doc)
    except ValidationError as err:
        raise ManifestError(source, pydantic_errors(err)) from None
    errors = (rule_errors(pipeline) + init_errors(pipeline)
              + target_errors(pipeline, target, default_images))
    if errors:
        raise ManifestError(source, errors)
    return pipeline


def load_documents(path: Path) -> list[Any]:
    """Parse a (multi-document) YAML file; syntax errors name the line."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ManifestError(str(path), [FieldError("", err.strerror or str(err))]) from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ManifestError(str(path), [FieldError("", f"invalid YAML: {where}{problem}")]) from None
    if not docs:
        raise ManifestError(str(path), [FieldError("", "the file holds no YAML document")])
    return docs


def load_file(path: Path | str, *, target: Target = "auto") -> CWMPipeline:
    """Load the one CWMPipeline in a manifest file."""
    path = Path(path)
    docs = load_documents(path)
    pipelines = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
    if len(docs) > 1 and len(pipelines) != 1:
        raise ManifestError(
            str(path), [FieldError("", f"expected one {KIND} document, found {len(pipelines)}")]
        )
    return parse_pipeline(pipelines[0] if len(docs) > 1 else docs[0], str(path), target=target)
