"""Generate the CustomResourceDefinition from the API models (``cwm crd``).

Pydantic emits JSON Schema (2020-12); Kubernetes wants a *structural* OpenAPI v3 schema: every
node typed, no ``$ref``/``anyOf``-with-null/``const``, ``nullable`` instead of ``null`` types,
boolean ``exclusiveMinimum``, and no ``additionalProperties: false`` (the API server prunes or,
with strict field validation, rejects unknown fields by itself). :func:`to_structural` does that
translation; the models stay the single source of truth.
"""

from __future__ import annotations

from typing import Any

import yaml

from cwm_spec import api
from cwm_spec.validation import SPEC_RULES

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase",
     "description": "Summary phase of the pipeline."},
    {"name": "Step", "type": "string", "jsonPath": ".status.currentStep",
     "description": "The step running now."},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress",
     "description": "Steps done out of the plan."},
    {"name": "Succeeded", "type": "string",
     "jsonPath": '.status.conditions[?(@.type=="Succeeded")].status',
     "description": "The Succeeded condition."},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.preset", "priority": 1,
     "description": "Model preset."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

# Lists that Kubernetes should treat as maps keyed by a field: duplicates are rejected by the
# API server itself, and strategic merges behave.
LIST_MAP_KEYS = {("spec", "stages"): "name", ("status", "conditions"): "type",
                 ("status", "steps"): "name"}

_DROP = {"title", "additionalProperties", "$defs", "discriminator"}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """Inline every ``$ref`` (our models are not recursive)."""
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**_resolve(target, defs), **{k: v for k, v in node.items() if k != "$ref"}}
        return _resolve(merged, defs)
    return {k: _resolve(v, defs) for k, v in node.items()}


def _strip_null(node: dict[str, Any]) -> dict[str, Any]:
    """``anyOf: [X, {type: null}]`` → X with ``nullable: true``."""
    options = node.get("anyOf")
    if not options:
        return node
    non_null = [o for o in options if o.get("type") != "null"]
    if len(non_null) == len(options) or len(non_null) != 1:
        return node
    rest = {k: v for k, v in node.items() if k != "anyOf"}
    merged = {**non_null[0], **rest, "nullable": True}
    if merged.get("default", 0) is None:
        del merged["default"]
    return merged


def to_structural(node: Any) -> Any:
    """Translate one (resolved) JSON Schema node into a structural OpenAPI v3 node."""
    if isinstance(node, list):
        return [to_structural(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = _strip_null(dict(node))
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key in ("properties",):
            out[key] = {k: to_structural(v) for k, v in value.items()}
        else:
            out[key] = to_structural(value)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and extra:
        out["additionalProperties"] = to_structural(extra)
    elif extra is True or (node.get("type") == "object" and "properties" not in node
                           and not isinstance(extra, dict)):
        out["x-kubernetes-preserve-unknown-fields"] = True
    if out.get("x-kubernetes-preserve-unknown-fields"):
        out["type"] = "object"
        out.pop("additionalProperties", None)
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.pop("pattern", None)
    if "enum" in out and "type" not in out:
        out["type"] = _json_type(out["enum"][0])
    return out


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string"


def _model_schema(model: type[api.Spec]) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    resolved = _resolve({k: v for k, v in schema.items() if k != "$defs"}, schema.get("$defs", {}))
    return to_structural(resolved)


def _mark_list_maps(schema: dict[str, Any]) -> None:
    for (top, field), key in LIST_MAP_KEYS.items():
        node = schema["properties"][top]["properties"][field]
        node["x-kubernetes-list-type"] = "map"
        node["x-kubernetes-list-map-keys"] = [key]


def openapi_schema() -> dict[str, Any]:
    """The openAPIV3Schema of the CWMPipeline resource."""
    schema: dict[str, Any] = {
        "type": "object",
        "description": "CWMPipeline describes a whole code-world-model training run: Beam data "
        "generation (execution traces, ForagerAgent trajectories), then DeepSpeed training "
        "stages pretrain → midtrain → SFT → RL.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "cwm.dev/v1alpha1"},
            "kind": {"type": "string", "description": "CWMPipeline"},
            "metadata": {"type": "object"},
            "spec": _model_schema(api.CWMPipelineSpec),
            "status": _model_schema(api.CWMPipelineStatus),
        },
    }
    _mark_list_maps(schema)
    # The message names the field itself: `fieldPath` would, but needs Kubernetes 1.28 and the
    # chart supports 1.27.
    schema["properties"]["spec"]["x-kubernetes-validations"] = [
        {"rule": r.cel, "message": f"spec{r.field}: {r.message}"} for r in SPEC_RULES
    ]
    return schema


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.GROUP}",
            "labels": {"app.kubernetes.io/part-of": "cwm-pipeline"},
        },
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": api.SHORT_NAMES,
                "categories": ["cwm"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `cwm crd` from cwm_spec/api.py. Do not edit by hand.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100, allow_unicode=True)
