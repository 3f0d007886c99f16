"""The CWMPipeline API (cwm.dev/v1alpha1): the single source of truth for the spec and status.

Every other part speaks this language: the CRD is generated from these models (``cwm crd``),
``cwm validate`` and the operator validate with them, the plan is computed from them, and each
step's entry point parses its own section of them from ``$CWM_STEP_CONFIG``.

YAML uses camelCase (``microBatchSize``); Python attributes are snake_case. Unknown fields are
errors. Defaults keep a minimal manifest short: ``spec: {stages: [{name: pretrain}]}`` is valid.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

GROUP = "cwm.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "CWMPipeline"
PLURAL = "cwmpipelines"
SINGULAR = "cwmpipeline"
SHORT_NAMES = ["cwmp"]

STAGE_ORDER = ("pretrain", "midtrain", "sft", "rl")
StageName = Literal["pretrain", "midtrain", "sft", "rl"]
PRESETS = ("debug", "tiny", "small", "1b", "8b", "cwm-32b")
MUTATION_FAMILIES = (
    "body_removal",
    "parameter_removal",
    "variable_swap",
    "import_return_removal",
    "operator_replacement",
)
STORAGE_SCHEMES = ("file", "s3", "gs", "gcs", "az", "abfs", "hdfs")

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$")
# Child objects are named "<pipeline>-<step>-<attempt>"; the longest step name plus suffix must
# still fit a 63-character label (Job names become pod label values).
MAX_NAME_LENGTH = 40


class Spec(BaseModel):
    """Base for all API objects: camelCase in YAML, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )

    def dump(self) -> dict[str, Any]:
        """The object as it appears in YAML (camelCase, defaults filled in)."""
        return self.model_dump(mode="json", by_alias=True)


def _quantity(value: int | float | str, field: str) -> str:
    text = str(value)
    if not _QUANTITY.match(text):
        raise ValueError(f"{field} {text!r} is not a Kubernetes quantity (e.g. '2', '500m', '8Gi')")
    return text


# --------------------------------------------------------------------------------------------
# Model and tokenizer


class ModelSpec(Spec):
    """Which model to train."""

    preset: Literal["debug", "tiny", "small", "1b", "8b", "cwm-32b"] = Field(
        "tiny",
        description="Size preset: debug (<1M parameters, tests), tiny (~10M, the local CPU "
        "default), small (~125M), 1b, 8b, cwm-32b (CWM's exact dimensions).",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Model config fields to override on top of the preset, e.g. {nLayers: 4}.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    init: str | None = Field(
        None,
        description="Start from a Hugging Face CwmForCausalLM checkpoint (a folder or URI with "
        "config.json, tokenizer.json and model.safetensors or model.safetensors.index.json + "
        "shards), e.g. Meta's released CWM. An import step converts it (streaming, shard by "
        "shard); the first stage starts from its weights, every stage uses its tokenizer (none "
        "is trained). Its config.json gives the shape, so preset and overrides are not set; a "
        "pretrain stage, a tokenizer setting and the first stage's initFrom are refused with it.",
    )

    @field_validator("init")
    @classmethod
    def _init_uri(cls, value: str | None) -> str | None:
        if value is None:
            return value
        match = re.match(r"^([a-z][a-z0-9+.-]*)://(.+)$", value)
        if match and match.group(1) not in STORAGE_SCHEMES:
            raise ValueError(f"scheme {match.group(1)!r} is not supported (use a path or one of "
                             f"{', '.join(STORAGE_SCHEMES)})")
        if not value.strip("/"):
            raise ValueError(f"{value!r} is not a checkpoint folder or URI")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _shape_from_init(self) -> ModelSpec:
        # The checkpoint's config.json is the shape: a preset or overrides would be ignored.
        given = sorted({"preset", "overrides"} & self.model_fields_set)
        if self.init and (given or self.overrides):
            raise ValueError(f"{' and '.join(given or ['overrides'])}: not allowed with init "
                             "(the shape comes from the checkpoint's config.json)")
        return self


class TokenizerSpec(Spec):
    """The tokenizer: trained on pipeline data, or a given Llama-3-compatible tokenizer.json."""

    vocab_size: int = Field(
        4096,
        ge=512,
        le=128000,
        description="Base byte-level BPE vocabulary size; CWM's 256 special tokens are added "
        "above it (128000 gives CWM's exact vocabulary of 128,256).",
    )
    uri: str | None = Field(
        None,
        description="Use this tokenizer.json (path or URI) instead of training one.",
    )
    sample_records: int = Field(
        20000, ge=100, description="How many data records to sample for training the BPE."
    )


# --------------------------------------------------------------------------------------------
# Data generation


class SandboxSpec(Spec):
    """Limits for every untrusted program run during data generation and rewards."""

    wall_seconds: float = Field(10.0, gt=0, le=3600, description="Wall-clock timeout per run.")
    cpu_seconds: float = Field(10.0, gt=0, le=3600, description="CPU-time limit per run.")
    memory_mb: int = Field(
        1024, ge=64, le=1048576, alias="memoryMB", description="Address-space limit (MiB)."
    )
    output_bytes: int = Field(
        1_000_000, ge=1024, description="Cap on captured stdout+stderr; more is truncated."
    )
    processes: int = Field(64, ge=1, le=4096, description="Maximum processes per sandbox.")


class BeamSpec(Spec):
    """How the Beam data pipelines run."""

    runner: str = Field(
        "DirectRunner",
        description="Beam runner: DirectRunner (in-process, the local default), FlinkRunner, "
        "SparkRunner, DataflowRunner, PortableRunner.",
    )
    workers: int = Field(
        2, ge=1, le=1024,
        description="With the in-process runner: processes per data step (per pod on a cluster), "
        "each running the pipeline on its part of the work; the last to finish merges the parts. "
        "Beam's own multi-processing mode instead: options ['--direct_running_mode="
        "multi_processing'].",
    )
    options: list[str] = Field(
        default_factory=list,
        description="Extra Beam pipeline flags passed through unchanged, e.g. "
        "['--flink_master=flink:8081'].",
    )
    pods: int = Field(
        1,
        ge=1,
        le=1000,
        description="On a cluster with the in-process runner: pods per data step, as an Indexed "
        "Job; each pod generates a part of the data set (repositories dealt out, programs by "
        "hash) and the last to finish merges the parts. Distributed runners scale themselves.",
    )

    @model_validator(mode="after")
    def _pods_need_the_in_process_runner(self) -> BeamSpec:
        if self.pods > 1 and self.runner not in ("DirectRunner", "FnApiRunner", "direct"):
            raise ValueError(f"pods: {self.pods} pods apply to the in-process runner "
                             f"(DirectRunner), not {self.runner}, which distributes the work "
                             "itself: set pods to 1")
        return self


class TraceSource(Spec):
    """One source of programs to trace."""

    kind: Literal["cruxeval", "jsonl", "functions", "synthetic", "repository"] = Field(
        description="cruxeval: the bundled 800 CRUXEval functions; jsonl: functions with inputs "
        "(CRUXEval's code/input format); functions: functions without inputs (fuzzed); "
        "synthetic: generated small programs; repository: a repo's pytest suite traced."
    )
    uri: str | None = Field(None, description="Path or URI (jsonl, functions, repository).")
    count: int | None = Field(None, ge=1, description="How many programs (synthetic) or a cap.")
    depth: int | None = Field(
        None, ge=0, le=32, description="Repository: callee levels stepped into (default 4)."
    )
    step_in_probability: float | None = Field(
        None, ge=0, le=1, description="Repository: chance of stepping into each callee, as in "
        "CWM's repository episodes (default 1).",
    )
    per_function: int | None = Field(
        None, ge=1, description="Repository: episodes kept per function (default 3)."
    )
    timeout_seconds: float | None = Field(
        None, gt=0, description="Repository: wall-clock limit of the traced pytest run."
    )

    @model_validator(mode="after")
    def _check_source(self) -> TraceSource:
        if self.kind in ("jsonl", "functions", "repository") and not self.uri:
            raise ValueError(f"uri is required for a {self.kind} source")
        if self.kind == "synthetic" and self.count is None:
            raise ValueError("count is required for a synthetic source")
        repo_only = ("depth", "step_in_probability", "per_function", "timeout_seconds")
        given = [f for f in repo_only if getattr(self, f) is not None]
        if given and self.kind != "repository":
            raise ValueError(f"{', '.join(given)} only apply to a repository source")
        return self


class ExplainSpec(Spec):
    """Explained traces (``cwm_beam.explain``): a model behind an OpenAI-compatible endpoint
    explains training traces step by step; an explanation is kept only if the output it states
    is the traced one. Off unless given."""

    endpoint: str = Field(
        description="Base URL of an OpenAI-compatible API (vLLM, SGLang, cwm serve), e.g. "
        "http://explainer:8000/v1. Checked before any program is traced: an endpoint that does "
        "not answer, or does not serve model, fails the step.",
    )
    model: str = Field(min_length=1, description="Model name at the endpoint.")
    api_key_env: str | None = Field(
        None,
        description="Environment variable of the traces step that holds the endpoint's API key "
        "(read by the step itself; sandboxed programs never see it). Empty: no key.",
    )
    api_key_secret: str | None = Field(
        None,
        description="On a cluster: a Secret whose 'apiKey' the operator exposes to the traces pod "
        "as apiKeyEnv (which must be set with it).",
    )
    max_tokens: int = Field(512, ge=1, le=65536, description="Token budget of each explanation.")
    temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature.")
    concurrency: int = Field(
        4, ge=1, le=256, description="Requests in flight at once per worker process."
    )
    timeout_seconds: float = Field(120.0, gt=0, le=3600, description="Timeout per request.")
    fraction: float = Field(
        1.0, gt=0, le=1,
        description="Share of the train split's traces asked for, chosen by a hash of the "
        "trace's id (the validation split is never explained).",
    )
    max_records: int | None = Field(
        None, ge=1,
        description="At most this many traces asked for in all (shared among the step's parts); "
        "empty: every chosen trace that returned.",
    )

    @field_validator("endpoint")
    @classmethod
    def _http_endpoint(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"{value!r} is not an http(s) base URL (e.g. http://host:8000/v1)")
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError(f"{value!r} is not an environment variable name")
        return value

    @model_validator(mode="after")
    def _secret_needs_env(self) -> ExplainSpec:
        if self.api_key_secret and not self.api_key_env:
            raise ValueError("apiKeySecret needs apiKeyEnv: the variable the key is exposed as")
        if self.api_key_secret and not _DNS1123_LABEL.match(self.api_key_secret):
            raise ValueError(f"apiKeySecret {self.api_key_secret!r} is not a Secret name")
        return self


class TraceDataSpec(Spec):
    """Line-level Python execution traces in CWM's format."""

    enabled: bool = Field(True, description="Generate trace data.")
    sources: list[TraceSource] = Field(
        default_factory=lambda: [TraceSource(kind="synthetic", count=2000)],
        min_length=1,
        description="Where programs come from (default: 2000 generated programs; the bundled "
        "CRUXEval problems are the evaluation's unless evaluation.cruxevalHeldOut leaves some).",
    )
    fuzz_inputs_per_function: int = Field(
        3, ge=0, le=100, description="Fuzzed inputs generated per function."
    )
    exception_share: float = Field(
        0.1, ge=0, le=1, description="Share of kept fuzzed inputs that raise (exception traces)."
    )
    max_events: int = Field(10000, ge=1, description="Drop traces with more line events.")
    max_bytes: int = Field(1_000_000, ge=1024, description="Drop traces larger than this.")
    max_repr_chars: int = Field(
        200, ge=8, description="Cap on each value's repr (a visible marker shows truncation)."
    )
    validation_fraction: float = Field(
        0.05, ge=0, lt=1, description="Held-out share, split deterministically by program hash."
    )
    shards: int = Field(4, ge=1, le=100000, description="Output shards per split.")
    seed: int = Field(0, ge=0, description="Seed for fuzzing and sampling.")
    explain: ExplainSpec | None = Field(
        None,
        description="Explained traces: a model explains train traces, kept only when the output "
        "it states is the traced one (their own split, explained; counts in stats.explain).",
    )


class RepositorySource(Spec):
    """A Python repository for ForagerAgent tasks: exactly one of pypi, path or git."""

    pypi: str | None = Field(
        None, description="A pinned source distribution on PyPI, 'name==version'."
    )
    path: str | None = Field(None, description="A local folder.")
    git: str | None = Field(None, description="A git URL.")
    ref: str | None = Field(None, description="Git ref (with git).")

    @model_validator(mode="after")
    def _exactly_one(self) -> RepositorySource:
        given = [k for k in ("pypi", "path", "git") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of pypi, path, git")
        if self.pypi and not re.match(r"^[A-Za-z0-9_.\-]+==[A-Za-z0-9_.\-+]+$", self.pypi):
            raise ValueError(f"pypi {self.pypi!r} must be pinned as 'name==version'")
        if self.ref and not self.git:
            raise ValueError("ref is only meaningful with git")
        return self


class PolicySpec(Spec):
    """The agent that acts in repository environments."""

    kind: Literal["search", "openai"] = Field(
        "search",
        description="search: the built-in search-based repair policy (no model); openai: any "
        "OpenAI-compatible chat endpoint with tool calling (vLLM, SGLang, cwm serve).",
    )
    endpoint: str | None = Field(None, description="Base URL of the endpoint (openai).")
    model: str | None = Field(None, description="Model name at the endpoint (openai).")
    api_key_secret: str | None = Field(
        None, description="Name of a Secret whose 'apiKey' holds the endpoint's key (openai)."
    )
    temperature: float = Field(0.7, ge=0, le=2, description="Sampling temperature (openai).")
    max_turns: int = Field(30, ge=1, le=1024, description="Turn budget per episode.")

    @model_validator(mode="after")
    def _endpoint(self) -> PolicySpec:
        if self.kind == "openai" and not (self.endpoint and self.model):
            raise ValueError("endpoint and model are required for an openai policy")
        return self


class HistorySource(Spec):
    """A repository history to mine issue-fix tasks from: exactly one of ``pypi`` (a project whose
    released source distributions, oldest first, become one commit each) or ``git`` (a
    repository's first-parent commits in ``since``..``until``)."""

    pypi: str | None = Field(
        None, description="A PyPI project name; its releases listed in versions are the history."
    )
    versions: list[str] = Field(
        default_factory=list,
        description="With pypi: two or more released versions, oldest first (each one commit).",
    )
    git: str | None = Field(None, description="A git URL or the path of a local git repository.")
    since: str | None = Field(
        None, description="With git: mine the commits after this ref (default: from the first)."
    )
    until: str | None = Field(None, description="With git: up to this ref (default: HEAD).")
    dependencies: bool = Field(
        False,
        description="Install each commit's declared dependencies into an isolated environment "
        "(cwm_forager.envbuild); default: its tests need only the standard library and pytest.",
    )

    @model_validator(mode="after")
    def _one_history(self) -> HistorySource:
        if bool(self.pypi) == bool(self.git):
            raise ValueError("give exactly one of pypi, git")
        if self.pypi:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", self.pypi):
                raise ValueError(f"pypi {self.pypi!r} must be a project name (no version pin: "
                                 "list the releases in versions)")
            if len(self.versions) < 2 or len(set(self.versions)) != len(self.versions):
                raise ValueError(f"versions {self.versions}: give two or more distinct released "
                                 "versions of the pypi project, oldest first")
            for version in self.versions:
                if not re.fullmatch(r"[A-Za-z0-9_.\-+!]+", version):
                    raise ValueError(f"versions: {version!r} is not a version")
            if self.since or self.until:
                raise ValueError("since and until are only meaningful with git")
        elif self.versions:
            raise ValueError("versions is only meaningful with pypi (use since/until with git)")
        return self


class IssueFixSpec(Spec):
    """Issue-fix tasks from real history (family ``issue_fix``): commits that change non-test code
    with tests that fail before and pass after; each function such a commit changed is put back as
    it was, validated by execution like a mutate-fix task, and rolled out with the policy."""

    sources: list[HistorySource] = Field(
        default_factory=list, description="Histories to mine; empty: no issue-fix tasks."
    )
    max_commits: int = Field(
        20, ge=1, le=100000,
        description="Commits scanned per source: the newest in its range (or release list).",
    )
    tasks_per_repository: int = Field(
        20, ge=1, description="Validated issue-fix tasks rolled out per source."
    )

    @model_validator(mode="after")
    def _distinct_names(self) -> IssueFixSpec:
        seen: dict[str, int] = {}
        for i, source in enumerate(self.sources):
            name = source.pypi or (source.git or "").rstrip("/").rsplit("/", 1)[-1]
            name = name.removesuffix(".git")
            if name in seen:
                raise ValueError(f"sources[{seen[name]}] and sources[{i}] are both named {name!r} "
                                 "(their tasks and numbers go under that name): mine one history "
                                 "per project")
            seen[name] = i
        return self


class TrajectoryDataSpec(Spec):
    """ForagerAgent trajectories: an agent fixing synthetic bugs in real repositories (mutate-fix)
    and real bugs from their history (issue-fix)."""

    enabled: bool = Field(True, description="Generate trajectory data.")
    repositories: list[RepositorySource] = Field(
        default_factory=list,
        description="Repositories to work in; empty uses the bundled fixture repositories.",
    )
    tasks_per_repository: int = Field(20, ge=1, description="Mutate-fix tasks per repository.")
    held_out_tasks: int = Field(
        4,
        ge=0,
        description="Validated tasks per repository kept out of the rollouts, for the "
        "evaluation's mutate-fix solve rate (the data set's eval_tasks split).",
    )
    mutation_families: list[
        Literal[
            "body_removal",
            "parameter_removal",
            "variable_swap",
            "import_return_removal",
            "operator_replacement",
        ]
    ] = Field(
        default_factory=lambda: list(MUTATION_FAMILIES),  # type: ignore[arg-type]
        min_length=1,
        description="Mutation families to synthesise bugs from.",
    )
    issue_fix: IssueFixSpec = Field(
        default_factory=IssueFixSpec, description="Issue-fix tasks mined from repository history."
    )
    policy: PolicySpec = Field(default_factory=PolicySpec, description="The acting policy.")
    max_turns: int = Field(128, ge=1, le=1024, description="Hard turn cap (CWM: 128).")
    max_observation_chars: int = Field(
        8000, ge=256, description="Observations longer than this are capped."
    )
    action_timeout_seconds: float = Field(60, gt=0, description="Timeout per agent action.")
    dedup_jaccard: float = Field(
        0.5, gt=0, le=1, description="Drop near-duplicates at or above this MinHash Jaccard."
    )
    shards: int = Field(2, ge=1, le=100000, description="Output shards per split.")
    seed: int = Field(0, ge=0, description="Seed for task synthesis and sampling.")


class CorpusSpec(Spec):
    """The code corpus for pretraining and mid-training rehearsal."""

    uri: str | None = Field(
        None,
        description="A data set URI (manifest + JSONL shards); empty builds a local corpus from "
        "the Python sources of the installed standard library and packages.",
    )
    max_files: int = Field(20000, ge=1, description="Cap on source files in the local corpus.")
    max_bytes: int = Field(50_000_000, ge=1024, description="Cap on corpus bytes.")


class RehearsalSpec(Spec):
    """General text, distinct from the code corpus: the stages' ``rehearsal`` source (CWM
    rehearses its pre-training mix while mid-training)."""

    uri: str | None = Field(
        None,
        description="A data set of kind text (manifest + JSONL shards of {text} records); empty "
        "builds one from the natural-language documentation shipped with the Python interpreter "
        "(the Language Reference topics of pydoc_data), nothing downloaded.",
    )


class DataSpec(Spec):
    """Mid-training data generation (Beam pipelines)."""

    traces: TraceDataSpec = Field(default_factory=TraceDataSpec, description="Trace data.")
    trajectories: TrajectoryDataSpec = Field(
        default_factory=TrajectoryDataSpec, description="ForagerAgent trajectory data."
    )
    corpus: CorpusSpec = Field(default_factory=CorpusSpec, description="Code corpus.")
    rehearsal: RehearsalSpec = Field(
        default_factory=RehearsalSpec, description="General text for the rehearsal source."
    )
    sandbox: SandboxSpec = Field(default_factory=SandboxSpec, description="Sandbox limits.")
    beam: BeamSpec = Field(default_factory=BeamSpec, description="Beam runner settings.")
    resources: Resources = Field(
        default_factory=lambda: Resources(),
        description="Resources of each data-generation pod.",
    )


# --------------------------------------------------------------------------------------------
# Training stages


class Toleration(Spec):
    """A Kubernetes toleration (for tainted GPU node pools)."""

    key: str | None = Field(None, description="Taint key.")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists or Equal.")
    value: str | None = Field(None, description="Taint value (with Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; empty matches all."
    )
    toleration_seconds: int | None = Field(None, ge=0, description="For NoExecute.")


class Resources(Spec):
    """Where and how big a step runs."""

    nodes: int = Field(1, ge=1, le=4096, description="Nodes (PyTorchJob replicas).")
    gpus_per_node: int = Field(0, ge=0, le=64, description="GPUs per node (0: CPU).")
    processes_per_node: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Training processes per node; defaults to gpusPerNode, or 1 on the CPU.",
    )
    cpu: str = Field(
        "2",
        description="CPU request per pod (Kubernetes quantity).",
        json_schema_extra={"x-kubernetes-int-or-string": True},
    )
    memory: str = Field(
        "8Gi",
        description="Memory request per pod (Kubernetes quantity).",
        json_schema_extra={"x-kubernetes-int-or-string": True},
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the pods must match (GPU node pool)."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Tolerations for tainted node pools."
    )
    affinity: dict[str, Any] = Field(
        default_factory=dict,
        description="A Kubernetes pod affinity object (e.g. spread workers across zones).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    image: str | None = Field(
        None, description="Container image; defaults to spec.images or the operator's default."
    )

    @field_validator("cpu", "memory", mode="before")
    @classmethod
    def _quantity(cls, value: Any, info: Any) -> str:
        return _quantity(value, info.field_name)

    @property
    def nproc(self) -> int:
        return self.processes_per_node or max(self.gpus_per_node, 1)

    @property
    def is_cluster_sized(self) -> bool:
        return self.nodes > 1 or self.gpus_per_node > 0


class DataMix(Spec):
    """Sampling weights of the training sources (normalised; zero drops a source)."""

    cwm: float = Field(0.0, ge=0, description="CWM data: execution traces and trajectories.")
    code: float = Field(0.0, ge=0, description="The code corpus.")
    rehearsal: float = Field(
        0.0, ge=0, description="General text (spec.data.rehearsal), not code: rehearsed in "
        "mid-training as CWM rehearses its pre-training mix (give it a pretrain share too to "
        "pre-train on it).",
    )

    @model_validator(mode="after")
    def _positive(self) -> DataMix:
        if self.cwm + self.code + self.rehearsal <= 0:
            raise ValueError("at least one weight must be positive")
        return self


DEFAULT_MIX = {
    "pretrain": DataMix(code=1.0),
    "midtrain": DataMix(cwm=0.3, code=0.4, rehearsal=0.3),
    "sft": DataMix(cwm=1.0),
    "rl": DataMix(cwm=1.0),
}


class RLSpec(Spec):
    """CWM's GRPO variant."""

    group_size: int = Field(8, ge=2, le=1024, description="Samples per prompt.")
    prompts_per_step: int = Field(4, ge=1, description="Prompts per optimisation step.")
    max_new_tokens: int = Field(64, ge=1, description="Generation budget per sample.")
    temperature: float = Field(1.0, gt=0, le=2, description="Sampling temperature.")
    eps_low: float = Field(0.2, ge=0, le=1, description="Lower clip (CWM: 0.2).")
    eps_high: float = Field(0.25, ge=0, le=1, description="Upper clip, clip-higher (CWM: 0.25).")
    max_length: int = Field(
        512, ge=1, description="Fixed divisor of the loss (no length normalisation)."
    )
    updates_per_batch: int = Field(
        4, ge=1, le=64, description="Optimiser steps on each batch of rollouts, one per "
        "mini-batch: from the second on the policy has moved from the one that sampled, so the "
        "clip acts. The stage's steps count batches (steps x updatesPerBatch optimiser steps)."
    )
    rollouts_ahead: int = Field(
        1, ge=0, le=8, description="Batches a rollout thread may sample ahead of the batch being "
        "trained, from a snapshot of the policy (asynchronous, as CWM). 0: sample, then train."
    )
    max_policy_lag: int = Field(
        1, ge=0, le=8, description="Trajectories sampled by weights more than this many batches "
        "older than the trainer's are stale: dropped and counted."
    )
    max_turns: int = Field(
        8, ge=1, le=128, description="Turn budget of each mutate-fix attempt (CWM: 128)."
    )
    tasks: list[Literal["output_prediction", "mutate_fix"]] = Field(
        default_factory=lambda: ["output_prediction"],  # type: ignore[arg-type]
        min_length=1,
        max_length=2,
        description="Verifiable task families, rewards by execution: output_prediction (traced "
        "programs) and mutate_fix (the model as the agent on the trajectory data's tasks; "
        "needs spec.data.trajectories). Both: half the prompts each.",
    )


class StageSpec(Spec):
    """One training stage, run as a DeepSpeed job starting from the previous stage."""

    name: StageName = Field(description="pretrain, midtrain, sft or rl (in this order).")
    steps: int = Field(200, ge=1, description="Optimizer steps.")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per process per micro-step.")
    gradient_accumulation: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    sequence_length: int = Field(256, ge=16, description="Tokens per packed sequence.")
    learning_rate: float = Field(3e-4, gt=0, lt=1, description="Peak learning rate.")
    min_learning_rate: float | None = Field(
        None, ge=0, lt=1, description="Floor of the cosine decay (default: learningRate / 10)."
    )
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps.")
    schedule: Literal["cosine", "constant"] | None = Field(
        None, description="After warmup: cosine decay, or constant (default for sft)."
    )
    weight_decay: float = Field(0.1, ge=0, lt=1, description="AdamW weight decay.")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    activation_checkpointing: bool = Field(False, description="Recompute activations.")
    data_mix: DataMix | None = Field(
        None, description="Source weights; defaults per stage (midtrain: 0.3/0.4/0.3)."
    )
    observation_mask_rate: float = Field(
        0.5, ge=0, le=1, description="Share of environment-turn tokens masked (CWM: 0.5)."
    )
    checkpoint_every: int = Field(50, ge=1, description="Save resumable state every N steps.")
    eval_every: int = Field(0, ge=0, description="Evaluate every N steps (0: at the end only).")
    init_from: str | None = Field(
        None, description="Checkpoint to start from (first stage only; later stages chain)."
    )
    rl: RLSpec | None = Field(None, description="GRPO settings (rl stage only).")
    resources: Resources = Field(default_factory=Resources, description="Where it runs.")
    retries: int = Field(2, ge=0, le=100, description="Retries after a failure.")
    deadline_seconds: int | None = Field(None, ge=1, description="activeDeadlineSeconds.")

    @model_validator(mode="after")
    def _fill_stage_defaults(self) -> StageSpec:
        if self.rl is not None and self.name != "rl":
            raise ValueError(f"rl settings are only valid on the rl stage, not {self.name}")
        if self.name == "rl" and self.rl is None:
            self.rl = RLSpec()
        if self.schedule is None:
            self.schedule = "constant" if self.name == "sft" else "cosine"
        if self.data_mix is None:
            self.data_mix = DEFAULT_MIX[self.name].model_copy()
        if self.min_learning_rate is None:
            self.min_learning_rate = self.learning_rate / 10
        if self.min_learning_rate > self.learning_rate:
            raise ValueError("minLearningRate must not exceed learningRate")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmupSteps {self.warmup_steps} exceeds steps {self.steps}")
        return self


# --------------------------------------------------------------------------------------------
# Evaluation, storage, images


class EvaluationSpec(Spec):
    """What each stage's evaluation measures, and which programs are kept out of training for it.

    Evaluation programs never reach a training data set: the bundled CRUXEval problems held out
    here are left out of the trace data by program hash, held-out traces are the traces' own
    validation split (split by program hash), held-out mutate-fix tasks are chosen before the
    training tasks, which skip their functions; the evaluation refuses to score when an
    evaluation program's hash is in a training data set's manifest."""

    held_out_traces: int = Field(
        200, ge=0, description="Held-out traces for trace-step exact match."
    )
    trace_outputs: int = Field(
        0,
        ge=0,
        description="Held-out traced programs whose return value the model predicts by "
        "generating their trace from the call frame (0: off).",
    )
    trace_output_tokens: int = Field(
        384, ge=8, description="Generation budget per trace in that measurement."
    )
    cruxeval: bool = Field(True, description="Measure CruxEval-O output prediction.")
    cruxeval_held_out: int = Field(
        800,
        ge=0,
        le=800,
        description="Bundled CRUXEval problems reserved for evaluation, chosen by program hash; "
        "a cruxeval trace source traces only the other 800 - N. The default keeps all of them "
        "out of training.",
    )
    cruxeval_limit: int = Field(
        800, ge=1, le=800,
        description="Held-out CRUXEval problems scored: the first in program-hash order, all "
        "cruxevalHeldOut of them when it holds fewer (only held-out problems are scored).",
    )
    held_out_programs: int = Field(
        0,
        ge=0,
        description="Held-out traced programs (the traces' validation split, never trained on) "
        "whose output the model predicts in chat, directly and by reasoning (0: off).",
    )
    reasoning: bool = Field(
        True,
        description="After SFT and RL, also predict outputs by reasoning (the trace, then the "
        "value, as SFT teaches), reported apart from direct answers.",
    )
    reasoning_tokens: int = Field(
        1024,
        ge=8,
        description="Generation budget of an answer by reasoning: it must hold the trace SFT "
        "teaches as reasoning, so it is far larger than a direct answer's.",
    )
    mutate_fix: bool = Field(
        True,
        description="Measure the mutate-fix solve rate after SFT and RL: the model acts as the "
        "agent on the trajectory data set's held-out tasks.",
    )
    mutate_fix_tasks: int = Field(8, ge=1, description="Held-out mutate-fix tasks to attempt.")
    mutate_fix_turns: int = Field(8, ge=1, le=128, description="Turn budget per attempt.")
    max_new_tokens: int = Field(
        128, ge=1, description="Generation budget of a direct answer and of each mutate-fix turn."
    )
    validation_sequences: int = Field(
        64, ge=1, description="Validation sequences per data source (over all ranks) for the "
        "validation losses.",
    )


class PVCStorage(Spec):
    """A PersistentVolumeClaim mounted into every pod."""

    claim_name: str = Field(description="Name of an existing ReadWriteMany claim.")

    @field_validator("claim_name")
    @classmethod
    def _dns(cls, value: str) -> str:
        if not _DNS1123_LABEL.match(value) or len(value) > 253:
            raise ValueError(f"{value!r} is not a valid claim name (DNS-1123)")
        return value


class StorageSpec(Spec):
    """Where artifacts (data sets, checkpoints, metrics) live. Empty: the local work directory."""

    uri: str | None = Field(
        None, description="Object-store or file URI prefix, e.g. s3://bucket/cwm or gs://b/p."
    )
    pvc: PVCStorage | None = Field(None, description="A PVC mounted at mountPath in every pod.")
    mount_path: str = Field("/data", description="Where the PVC is mounted.")
    secret: str | None = Field(
        None, description="Secret with object-store credentials, exposed to pods as env."
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        if value is None:
            return value
        match = re.match(r"^([a-z][a-z0-9+.-]*)://(.+)$", value)
        if not match:
            raise ValueError(f"{value!r} is not a URI (expected scheme://location, e.g. s3://b/p)")
        if match.group(1) not in STORAGE_SCHEMES:
            raise ValueError(
                f"scheme {match.group(1)!r} is not supported (use one of "
                f"{', '.join(STORAGE_SCHEMES)})"
            )
        return value.rstrip("/")

    @field_validator("mount_path")
    @classmethod
    def _abs(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"{value!r} must be an absolute path")
        return value.rstrip("/") or "/"

    @model_validator(mode="after")
    def _one(self) -> StorageSpec:
        if self.uri and self.pvc:
            raise ValueError("give uri or pvc, not both")
        return self

    @property
    def is_cluster(self) -> bool:
        return bool(self.uri or self.pvc)


class Images(Spec):
    """Default container images of the steps (the operator's defaults apply when empty)."""

    beam: str | None = Field(None, description="Image of the Beam data-generation steps.")
    trainer: str | None = Field(None, description="Image of the training stages.")


class CWMPipelineSpec(Spec):
    """A whole CWM training run: data generation, then pretrain → midtrain → SFT → RL."""

    model: ModelSpec = Field(default_factory=ModelSpec, description="The model.")
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec, description="The tokenizer.")
    data: DataSpec = Field(default_factory=DataSpec, description="Data generation.")
    stages: list[StageSpec] = Field(
        min_length=1,
        max_length=len(STAGE_ORDER),
        description="Training stages in order: pretrain, midtrain, sft, rl.",
    )
    evaluation: EvaluationSpec = Field(
        default_factory=EvaluationSpec, description="End-of-stage evaluation."
    )
    storage: StorageSpec = Field(default_factory=StorageSpec, description="Artifact storage.")
    images: Images = Field(default_factory=Images, description="Container images.")
    queue: str | None = Field(
        None, description="Kueue LocalQueue for the training jobs (kueue.x-k8s.io/queue-name)."
    )
    suspend: bool = Field(False, description="Pause: suspend the running step, start nothing.")

    @field_validator("stages")
    @classmethod
    def _stage_order(cls, stages: list[StageSpec]) -> list[StageSpec]:
        names = [s.name for s in stages]
        for name in set(names):
            if names.count(name) > 1:
                raise ValueError(f"stage {name!r} appears {names.count(name)} times")
        order = [STAGE_ORDER.index(n) for n in names]
        if order != sorted(order):
            raise ValueError(f"stages must follow {' → '.join(STAGE_ORDER)}, got {names}")
        for stage in stages[1:]:
            if stage.init_from:
                raise ValueError(
                    f"initFrom is only allowed on the first stage ({stage.name} starts from "
                    "the previous stage's checkpoint)"
                )
        return stages

    @model_validator(mode="after")
    def _consistency(self) -> CWMPipelineSpec:
        needs_data = any(
            s.data_mix and s.data_mix.cwm > 0 and s.name in ("midtrain", "sft") for s in self.stages
        )
        data = self.data
        if data.traces.enabled and self.evaluation.cruxeval_held_out == 800:
            for i, source in enumerate(data.traces.sources):
                if source.kind == "cruxeval":
                    raise ValueError(
                        f"data.traces.sources[{i}]: the cruxeval source has nothing to trace: "
                        "evaluation.cruxevalHeldOut reserves all 800 problems for evaluation "
                        "(lower it to train on the rest)")
        if needs_data and not (data.traces.enabled or data.trajectories.enabled):
            raise ValueError(
                "a stage mixes in CWM data (dataMix.cwm > 0) but both data.traces and "
                "data.trajectories are disabled"
            )
        return self


# --------------------------------------------------------------------------------------------
# Status


class StepState(StrEnum):
    """The state of one step: one spelling for the local runner, the operator and the status."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    CACHED = "Cached"  # reused: its fingerprint and artifacts' digests are unchanged
    INTERRUPTED = "Interrupted"  # the local runner was stopped (Ctrl-C) while the step ran

    @property
    def done(self) -> bool:
        """Finished well: later steps may start."""
        return self in (StepState.SUCCEEDED, StepState.CACHED)


class Condition(Spec):
    """A Kubernetes-convention status condition."""

    type: str = Field(description="Progressing, Succeeded, Failed, Suspended, Stalled.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field("", description="CamelCase machine-readable reason.")
    message: str = Field("", description="Human-readable detail.")
    last_transition_time: str | None = Field(None, description="RFC 3339 time of the change.")
    observed_generation: int | None = Field(None, description="Spec generation seen.")


class StepStatus(Spec):
    """The record of one step (data generation or a training stage)."""

    name: str = Field(description="Step name (traces, trajectories, corpus, tokenizer, stage).")
    state: StepState = Field(StepState.PENDING, description="Pending, Running, Succeeded, Failed, "
                             "Suspended, Cached (reused from an earlier run) or Interrupted.")
    attempts: int = Field(0, ge=0, description="Attempts started.")
    child: str | None = Field(None, description="Name of the Job or PyTorchJob running it.")
    fingerprint: str | None = Field(None, description="Hash of the step's spec and inputs.")
    start_time: str | None = Field(None, description="When the current attempt started.")
    finish_time: str | None = Field(None, description="When it finished.")
    artifacts: dict[str, str] = Field(default_factory=dict, description="Output URIs by name.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Evaluation metrics.")
    message: str | None = Field(None, description="Last failure or progress message.")


class CWMPipelineStatus(Spec):
    """Observed state of a pipeline."""

    phase: Literal["Pending", "Running", "Succeeded", "Failed", "Suspended"] = Field(
        "Pending", description="Summary phase."
    )
    current_step: str | None = Field(None, description="The step running now.")
    progress: str | None = Field(None, description="Steps done / steps in the plan, e.g. 3/8.")
    steps: list[StepStatus] = Field(default_factory=list, description="Per-step records.")
    conditions: list[Condition] = Field(default_factory=list, description="Conditions.")
    observed_generation: int | None = Field(None, description="Last spec generation handled.")


# --------------------------------------------------------------------------------------------
# The resource


class ObjectMeta(BaseModel):
    """The parts of metadata we read; everything else is kept as is."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(description="Pipeline name (DNS-1123 label, at most 40 characters).")
    namespace: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _DNS1123_LABEL.match(value):
            raise ValueError(
                f"{value!r} must be a DNS-1123 label: lower-case letters, digits and '-', "
                "starting and ending with a letter or digit"
            )
        if len(value) > MAX_NAME_LENGTH:
            raise ValueError(
                f"{value!r} is {len(value)} characters; at most {MAX_NAME_LENGTH} so that child "
                "names fit"
            )
        return value


class CWMPipeline(BaseModel):
    """A CWMPipeline object as stored in Kubernetes or read from a manifest file."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    api_version: Literal["cwm.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["CWMPipeline"]
    metadata: ObjectMeta
    spec: CWMPipelineSpec
    status: CWMPipelineStatus | None = None

    @property
    def name(self) -> str:
        return self.metadata.name


DataSpec.model_rebuild()
