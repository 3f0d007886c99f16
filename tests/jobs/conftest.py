"""Shared fixtures for the training-stage tests.

Importing :mod:`cwm_jobs.common` first points ``TORCH_EXTENSIONS_DIR`` at the persistent cache
(``$CWM_CACHE`` or ``<repo>/.cache``) so DeepSpeed's ``shm_comm`` op compiles once per machine.
"""

from __future__ import annotations

import os

import pytest

import cwm_jobs.common as common


@pytest.fixture(scope="session")
def dist_group():
    """One gloo process group (rank 0 of 1) for the in-process DeepSpeed tests of this session."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield common.DistEnv(dist.get_rank(), dist.get_world_size())
        return
    env = common.DistEnv(master_port=common.free_port())
    common.init_distributed(env, "cpu")
    try:
        yield env
    finally:
        common.teardown_distributed()


@pytest.fixture(autouse=True)
def _no_torchrun_variables(monkeypatch):
    """Tests run as plain processes whatever the outer environment says."""
    for name in ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    yield
    os.environ.pop("CWM_DEVICE", None)
