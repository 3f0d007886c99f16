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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cwm_spec.api import EvaluationSpec, StageSpec
from cwm_spec.stepconfig import load_step_config, read_section

LOG = logging.getLogger("cwm_jobs")

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
    import deepspeed  # noqa: PLC0415 (importing DeepSpeed picks the accelerator: only once the step set its environment)

    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )
    if device_type == "cuda":
        torch.cuda.set_device(env.local_rank)
    elif env.world_size == 1 or os.environ.get("LOCAL_WORLD_SIZE") == "1":
        skip_shm_comm_op()
    deepspeed.init_distributed(
        dist_backend="nccl" if device_type == "cuda" else "gloo", auto_mpi_discovery=False
    )


def skip_shm_comm_op() -> None:
    """A CPU process alone on its host has nothing to all-reduce through shared memory (a single
    process, or one pod per rank as a PyTorchJob runs it: torchrun's ``LOCAL_WORLD_SIZE=1``, where
    DeepSpeed's op would disable itself anyway because its peers are not local): don't JIT-compile
    DeepSpeed's shared-memory communication op for it (~45–110 s with g++ in every fresh pod).
    DeepSpeed builds the op only when it is listed as compatible, so we list it as not."""
    import deepspeed.ops  # noqa: PLC0415 (importing DeepSpeed picks the accelerator: only once the step set its environment)
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415 (as above)

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_type() -> str:
    """``cuda`` when a GPU is visible, else ``cpu`` (``CWM_DEVICE`` overrides)."""
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
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- configuration
# The stage's settings are the API's own model (cwm_spec.api.StageSpec): its defaults, its
# validation and its field names in errors; nothing is re-declared here.


@dataclass(frozen=True)
class StepContext:
    """Everything a stage needs from its step configuration."""

    config: dict[str, Any]
    settings: StageSpec  # the stage section, validated, every default filled in
    inputs: dict[str, str]
    outputs: dict[str, str]
    seed: int
    model_spec: dict[str, Any]
    evaluation_spec: EvaluationSpec  # ``evaluation``, validated, every default filled in
    extra_args: list[str]

    def input(self, name: str) -> str | None:
        return self.inputs.get(name) or None

    def output(self, name: str) -> str:
        if not self.outputs.get(name):
            raise ValueError(f"step configuration: outputs.{name} is required for {self.settings.name}")
        return self.outputs[name]


def load_context(stage: str, argv: Sequence[str] | None = None) -> StepContext:
    """Read ``--config FILE`` or ``$CWM_STEP_CONFIG`` and validate the stage section with the
    API's model (errors name the field, e.g. ``spec.zeroStage``)."""
    config, rest = load_step_config(argv)
    settings = read_section(StageSpec, config["spec"], "spec")
    if settings.name != stage:
        raise ValueError(f"spec.name is {settings.name!r} but this entry point runs {stage!r}")
    return StepContext(
        config=config,
        settings=settings,
        inputs=dict(config.get("inputs") or {}),
        outputs=dict(config.get("outputs") or {}),
        seed=int(config.get("seed") or 0),
        model_spec=dict(config.get("model") or {}),
        evaluation_spec=read_section(EvaluationSpec, config.get("evaluation") or {},
                                     "evaluation"),
        extra_args=list(rest),
    )


@contextmanager
def distributed_session(device: str | None = None) -> Iterator[DistEnv]:
    """Set up logging and the process group, and always tear down the group this call started,
    even on errors. A group that already exists (a caller's, e.g. a test's) is reused as is."""
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
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415 (importing DeepSpeed picks the accelerator: only once the step set its environment)

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load()
    return ensure_extension_cache()


if __name__ == "__main__":
    print(f"DeepSpeed extensions cached in {warm_extension_cache()}")
