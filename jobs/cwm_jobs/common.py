"""Process setup shared by every training stage: distributed environment, logging, seeding,
configuration and teardown.

A stage runs the same way on a laptop and in a Kubeflow PyTorchJob pod:

* ``python -m cwm_jobs.pretrain --config step.json``: one plain process (rank 0 of 1);
* ``torchrun --nproc_per_node 2 -m cwm_jobs.pretrain --config step.json``: torchrun sets
  ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` for each worker;
* in a pod, the training operator sets ``MASTER_ADDR``/``MASTER_PORT``/``WORLD_SIZE``/``RANK`` and
  the ``PET_*`` variables (``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``,
  ``PET_MASTER_ADDR``, ``PET_MASTER_PORT``) that torchrun reads as its own defaults.

:func:`dist_env_from` turns whichever of these is present into one :class:`DistEnv`, a pure
function of the environment mapping so it is unit-tested without processes.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

LOG = logging.getLogger("cwm_jobs")

STAGES = ("pretrain", "midtrain", "sft", "rl")


# --------------------------------------------------------------------------- caches


def default_cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """``$CWM_CACHE``, else ``<repo>/.cache`` for a source checkout, else ``~/.cache/cwm``."""
    if environ.get("CWM_CACHE"):
        return Path(environ["CWM_CACHE"])
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():
        return repo / ".cache"
    return Path.home() / ".cache" / "cwm"


def ensure_extension_cache(environ: dict[str, str] | None = None) -> str:
    """Point ``TORCH_EXTENSIONS_DIR`` at a persistent folder unless it is already set.

    DeepSpeed JIT-compiles its ``shm_comm`` op the first time a process group starts on the CPU
    (about 110 s on 2 cores); a stable cache makes that a one-off per machine.
    """
    env = os.environ if environ is None else environ
    if not env.get("TORCH_EXTENSIONS_DIR"):
        env["TORCH_EXTENSIONS_DIR"] = str(default_cache_dir(env) / "torch_extensions")
    return env["TORCH_EXTENSIONS_DIR"]


ensure_extension_cache()


# --------------------------------------------------------------------------- distributed env


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"  # single | torchrun | operator

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_var(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={environ[name]!r} is not an integer") from None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dist_env_from(environ: Mapping[str, str]) -> DistEnv:
    """Read the distributed layout from environment variables (see the module docstring).

    A plain process in a pod whose operator asked for several processes per node (``PET_NPROC_PER_NODE``
    above 1) would wait forever for ranks that never start, so that case is an error.
    """
    has = lambda *names: all(environ.get(n) for n in names)  # noqa: E731
    addr = environ.get("MASTER_ADDR") or environ.get("PET_MASTER_ADDR") or "127.0.0.1"
    port_var = "MASTER_PORT" if environ.get("MASTER_PORT") else "PET_MASTER_PORT"
    port = _int_var(environ, port_var) if environ.get(port_var) else None
    if has("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        env = DistEnv(
            rank=_int_var(environ, "RANK"),
            world_size=_int_var(environ, "WORLD_SIZE"),
            local_rank=_int_var(environ, "LOCAL_RANK"),
            master_addr=addr,
            master_port=port or 29500,
            launcher="torchrun",
        )
    elif has("RANK", "WORLD_SIZE") or has("PET_NODE_RANK", "PET_NNODES"):
        nproc = _int_var(environ, "PET_NPROC_PER_NODE") if environ.get("PET_NPROC_PER_NODE") else 1
        if nproc > 1:
            raise ValueError(
                f"PET_NPROC_PER_NODE={nproc} but this is a plain process: launch the stage with "
                "`torchrun -m cwm_jobs.<stage>` so that every local rank starts"
            )
        if environ.get("PET_NODE_RANK") and environ.get("PET_NNODES"):
            rank, world = _int_var(environ, "PET_NODE_RANK"), _int_var(environ, "PET_NNODES")
        else:
            rank, world = _int_var(environ, "RANK"), _int_var(environ, "WORLD_SIZE")
        env = DistEnv(rank, world, 0, addr, port or 23456, "operator")
    else:
        env = DistEnv(master_addr=addr, master_port=port or free_port())
    if not 0 <= env.rank < env.world_size:
        raise ValueError(f"RANK={env.rank} is outside WORLD_SIZE={env.world_size}")
    return env


def init_distributed(env: DistEnv, device_type: str) -> None:
    """Start the process group through DeepSpeed (gloo on the CPU, NCCL on GPUs).

    The variables are exported first because DeepSpeed otherwise tries MPI discovery.
    """
    import deepspeed

    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )
    if device_type == "cuda":
        import torch

        torch.cuda.set_device(env.local_rank)
    elif env.world_size == 1:
        skip_shm_comm_op()
    deepspeed.init_distributed(
        dist_backend="nccl" if device_type == "cuda" else "gloo", auto_mpi_discovery=False
    )


def skip_shm_comm_op() -> None:
    """A single CPU process has nothing to all-reduce: don't JIT-compile DeepSpeed's shared-memory
    communication op for it (~45–110 s with g++ on a fresh machine). DeepSpeed builds the op only
    when it is listed as compatible, so we list it as not."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def teardown_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_type() -> str:
    """``cuda`` when a GPU is visible, else ``cpu`` (``CWM_DEVICE`` overrides)."""
    import torch

    forced = os.environ.get("CWM_DEVICE")
    if forced:
        if forced not in ("cpu", "cuda"):
            raise ValueError(f"CWM_DEVICE={forced!r}: expected cpu or cuda")
        return forced
    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------- logging, seeding


def setup_logging(env: DistEnv) -> None:
    """Rank 0 logs at INFO, the other ranks only warnings, all prefixed with the rank."""
    level = logging.INFO if env.is_main else logging.WARNING
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s [rank{env.rank}] %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- configuration


def _number(spec: Mapping[str, Any], key: str, default: Any, kind: type, where: str) -> Any:
    value = spec.get(key, default)
    if value is None:
        return default
    if kind is int and isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}.{key}: expected a number, got {value!r}")
    if kind is int and float(value) != int(value):
        raise ValueError(f"{where}.{key}: expected an integer, got {value!r}")
    return kind(value)


@dataclass(frozen=True)
class RLSettings:
    """GRPO settings (the ``rl`` block of a stage)."""

    group_size: int = 8
    prompts_per_step: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.25
    max_length: int = 512
    max_turns: int = 8
    tasks: tuple[str, ...] = ("output_prediction",)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | None, where: str = "spec.rl") -> "RLSettings":
        spec = spec or {}
        out = cls(
            group_size=_number(spec, "groupSize", 8, int, where),
            prompts_per_step=_number(spec, "promptsPerStep", 4, int, where),
            max_new_tokens=_number(spec, "maxNewTokens", 64, int, where),
            temperature=_number(spec, "temperature", 1.0, float, where),
            eps_low=_number(spec, "epsLow", 0.2, float, where),
            eps_high=_number(spec, "epsHigh", 0.25, float, where),
            max_length=_number(spec, "maxLength", 512, int, where),
            max_turns=_number(spec, "maxTurns", 8, int, where),
            tasks=tuple(spec.get("tasks") or ("output_prediction",)),
        )
        for name in ("group_size", "prompts_per_step", "max_new_tokens", "max_length", "max_turns"):
            if getattr(out, name) < 1:
                raise ValueError(f"{where}.{_camel(name)} must be at least 1")
        if out.group_size < 2:
            raise ValueError(f"{where}.groupSize must be at least 2 (advantages are group-relative)")
        return out


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


DEFAULT_MIX = {"pretrain": {"code": 1.0}, "midtrain": {"cwm": 0.3, "code": 0.4, "rehearsal": 0.3},
               "sft": {"cwm": 1.0}, "rl": {"cwm": 1.0}}


@dataclass(frozen=True)
class StageSettings:
    """One training stage, read from the step configuration's ``spec`` (camelCase keys)."""

    name: str
    steps: int = 200
    micro_batch_size: int = 8
    gradient_accumulation: int = 1
    sequence_length: int = 256
    learning_rate: float = 3e-4
    min_learning_rate: float = 3e-5
    warmup_steps: int = 20
    schedule: str = "cosine"
    weight_decay: float = 0.1
    zero_stage: int = 2
    activation_checkpointing: bool = False
    data_mix: dict[str, float] = field(default_factory=dict)
    observation_mask_rate: float = 0.5
    checkpoint_every: int = 50
    eval_every: int = 0
    rl: RLSettings = field(default_factory=RLSettings)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], stage: str) -> "StageSettings":
        where = "spec"
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where}: expected an object with the stage settings")
        name = spec.get("name", stage)
        if name not in STAGES:
            raise ValueError(f"{where}.name: {name!r} is not one of {', '.join(STAGES)}")
        default_schedule = "constant" if name == "sft" else "cosine"
        mix = spec.get("dataMix") or DEFAULT_MIX.get(name, {})
        if not isinstance(mix, Mapping) or not all(
            isinstance(v, (int, float)) and v >= 0 for v in mix.values()
        ):
            raise ValueError(f"{where}.dataMix: expected source -> non-negative weight, got {mix!r}")
        out = cls(
            name=name,
            steps=_number(spec, "steps", 200, int, where),
            micro_batch_size=_number(spec, "microBatchSize", 8, int, where),
            gradient_accumulation=_number(spec, "gradientAccumulation", 1, int, where),
            sequence_length=_number(spec, "sequenceLength", 256, int, where),
            learning_rate=_number(spec, "learningRate", 3e-4, float, where),
            min_learning_rate=_number(spec, "minLearningRate", 3e-5, float, where),
            warmup_steps=_number(spec, "warmupSteps", 20, int, where),
            schedule=spec.get("schedule") or default_schedule,
            weight_decay=_number(spec, "weightDecay", 0.1, float, where),
            zero_stage=_number(spec, "zeroStage", 2, int, where),
            activation_checkpointing=bool(spec.get("activationCheckpointing", False)),
            data_mix={str(k): float(v) for k, v in mix.items()},
            observation_mask_rate=_number(spec, "observationMaskRate", 0.5, float, where),
            checkpoint_every=_number(spec, "checkpointEvery", 50, int, where),
            eval_every=_number(spec, "evalEvery", 0, int, where),
            rl=RLSettings.from_spec(spec.get("rl")),
        )
        out.validate()
        return out

    def validate(self) -> None:
        for name in ("steps", "micro_batch_size", "gradient_accumulation", "sequence_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"spec.{_camel(name)} must be at least 1, got {getattr(self, name)}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"spec.schedule: {self.schedule!r} is not cosine or constant")
        if not 0 <= self.zero_stage <= 3:
            raise ValueError(f"spec.zeroStage: {self.zero_stage} is not in 0..3")
        if self.warmup_steps < 0 or self.checkpoint_every < 0 or self.eval_every < 0:
            raise ValueError("spec.warmupSteps, checkpointEvery and evalEvery must be >= 0")
        if not 0.0 <= self.observation_mask_rate <= 1.0:
            raise ValueError(f"spec.observationMaskRate: {self.observation_mask_rate} not in [0, 1]")
        if self.learning_rate <= 0 or not 0 <= self.min_learning_rate <= self.learning_rate:
            raise ValueError("spec.learningRate must be > 0 and spec.minLearningRate in [0, learningRate]")
        if self.name in ("pretrain", "midtrain") and sum(self.data_mix.values()) <= 0:
            raise ValueError("spec.dataMix: the weights sum to zero")


@dataclass(frozen=True)
class StepContext:
    """Everything a stage needs from its step configuration."""

    config: dict[str, Any]
    settings: StageSettings
    inputs: dict[str, str]
    outputs: dict[str, str]
    seed: int
    model_spec: dict[str, Any]
    evaluation: dict[str, Any]
    extra_args: list[str]

    def input(self, name: str) -> str | None:
        return self.inputs.get(name) or None

    def output(self, name: str) -> str:
        if not self.outputs.get(name):
            raise ValueError(f"step configuration: outputs.{name} is required for {self.settings.name}")
        return self.outputs[name]


def validate_with_api(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the stage section with ``cwm_spec.api.StageSpec`` (the single source of truth
    for the spec) and return it with every default filled in, camelCase."""
    from cwm_spec.api import StageSpec

    return StageSpec.model_validate(dict(spec)).dump()


def load_context(stage: str, argv: Sequence[str] | None = None) -> StepContext:
    """Read ``--config FILE`` or ``$CWM_STEP_CONFIG`` and parse the stage section."""
    from cwm_spec.stepconfig import load_step_config

    config, rest = load_step_config(argv)
    spec = validate_with_api(config["spec"])
    settings = StageSettings.from_spec(spec, stage)
    if settings.name != stage:
        raise ValueError(f"spec.name is {settings.name!r} but this entry point runs {stage!r}")
    return StepContext(
        config=config,
        settings=settings,
        inputs=dict(config.get("inputs") or {}),
        outputs=dict(config.get("outputs") or {}),
        seed=int(config.get("seed") or 0),
        model_spec=dict(config.get("model") or {}),
        evaluation=dict(config.get("evaluation") or {}),
        extra_args=list(rest),
    )


@contextmanager
def distributed_session(device: str | None = None) -> Iterator[DistEnv]:
    """Set up logging and the process group, and always tear down the group this call started,
    even on errors. A group that already exists (a caller's, e.g. a test's) is reused as is."""
    import torch.distributed as dist

    env = dist_env_from(os.environ)
    owned = not (dist.is_available() and dist.is_initialized())
    if not owned:
        env = DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                      launcher=env.launcher)
    setup_logging(env)
    try:
        if owned:
            init_distributed(env, device or device_type())
        yield env
    finally:
        if owned:
            teardown_distributed()


def warm_extension_cache() -> str:
    """Compile DeepSpeed's CPU communication op into the cache now (``python -m
    cwm_jobs.common``), so the first multi-process stage or test does not pay for it."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load()
    return ensure_extension_cache()


if __name__ == "__main__":
    print(f"DeepSpeed extensions cached in {warm_extension_cache()}")
