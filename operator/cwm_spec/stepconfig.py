"""How a step's process learns what to do: one JSON document, the same locally and in a pod.

The plan (``cwm_spec.plan``) renders each step's configuration as JSON into the environment
variable ``CWM_STEP_CONFIG``; entry points (``python -m cwm_beam.traces``, ``torchrun -m
cwm_jobs.pretrain`` ...) read it back with :func:`load_step_config`. ``--config FILE`` overrides
the variable, which is handy when running one step by hand.

The document has this shape (built by ``cwm_spec.plan``; ``spec`` is the step's own
section of the CWMPipeline spec, camelCase, defaults filled in and validated — parse it back with
its model, e.g. ``TraceDataSpec.model_validate(config["spec"])``)::

    {"apiVersion": "cwm.dev/v1alpha1", "pipeline": "tiny", "step": "pretrain",
     "kind": "beam" | "job" | "train", "seed": 0,
     "spec": {...},
     "sandbox": {...SandboxSpec...},            # beam steps and training stages
     "model": {...ModelSpec...}, "evaluation": {...EvaluationSpec...},   # training stages
     "evaluation": {"cruxevalHeldOut": N},      # the traces step: what it must leave out
     "rehearsal": {...RehearsalSpec...},        # the corpus step, when it also writes the text
     "runtime": {"beam": {...BeamSpec...}} | {"resources": {...}},       # not part of the hash
     "fingerprint": "3f2a...",                  # the hash: configuration + upstream fingerprints
     "inputs": {"tokenizer": "/work/artifacts/tokenizer/tokenizer", "init": ..., ...},
     "outputs": {"checkpoint": ".../pretrain/checkpoint", "state": ..., "metrics": ...}}

Beam steps also receive their pipeline options on the command line (``--runner=DirectRunner
--direct_num_workers=2 ...``): :func:`load_step_config` returns them as the leftover arguments,
to be handed to ``PipelineOptions`` unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from cwm_spec.validation import pydantic_errors

ENV_VAR = "CWM_STEP_CONFIG"
REQUIRED_KEYS = ("pipeline", "step", "kind", "spec", "inputs", "outputs")


class StepConfigError(ValueError):
    """The step configuration is missing or malformed; the message says where."""


Section = TypeVar("Section", bound=BaseModel)


def read_section(model: type[Section], section: Any, where: str) -> Section:
    """One section of the configuration, validated by its API model (``TraceDataSpec``,
    ``SandboxSpec``, ``StageSpec`` ...): the workers' only reading of it, so every default and
    rule is the API's. Errors name the field as the YAML spells it (``spec.zeroStage: ...``)."""
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise StepConfigError(f"{where}: expected an object, got {type(section).__name__}")
    try:
        return model.model_validate(section)
    except ValidationError as err:
        raise StepConfigError("; ".join(
            f"{where}.{e}" if e.path else f"{where}: {e.message}" for e in pydantic_errors(err)
        )) from None


def json_document(text: str, kind: type, where: str,
                  error: type[Exception] = StepConfigError) -> Any:
    """``text`` parsed as JSON and checked to be a ``kind`` (``dict``, ``list`` ...); otherwise
    ``error`` with a message that starts with ``where`` (the file, flag or variable)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{where}: not valid JSON ({err})") from None
    if not isinstance(value, kind):
        names: dict[type, str] = {dict: "a JSON object", list: "a JSON array"}
        expected = names.get(kind, kind.__name__)
        raise error(f"{where}: expected {expected}, got {type(value).__name__}")
    return value


def parse_step_config(text: str, origin: str) -> dict[str, Any]:
    config = json_document(text, dict, origin)
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing:
        raise StepConfigError(f"{origin}: missing key(s) {', '.join(missing)}")
    return config


def load_step_config(argv: Sequence[str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Return the step configuration and the command-line arguments left over.

    Reads ``--config FILE`` from ``argv`` if given, else ``$CWM_STEP_CONFIG``.
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", default=None)
    known, rest = parser.parse_known_args(argv)
    if known.config:
        path = Path(known.config)
        try:
            text = path.read_text()
        except OSError as err:
            raise StepConfigError(f"--config {path}: {err.strerror}") from None
        return parse_step_config(text, f"--config {path}"), rest
    variable = os.environ.get(ENV_VAR)
    if variable is None:
        raise StepConfigError(f"no step configuration: pass --config FILE or set ${ENV_VAR}")
    return parse_step_config(variable, f"${ENV_VAR}"), rest


def dump_step_config(config: dict[str, Any]) -> str:
    """Canonical JSON (sorted keys, no spaces) so that hashes of it are stable."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"))
