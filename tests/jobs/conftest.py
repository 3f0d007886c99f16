"""Shared fixtures for the training-stage tests.

Importing :mod:`cwm_jobs.common` first points ``TORCH_EXTENSIONS_DIR`` at the persistent cache
(``$CWM_CACHE`` or ``<repo>/.cache``) so DeepSpeed's ``shm_comm`` op compiles once per machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import cwm_jobs.common as common
from tests.jobs.jobhelpers import traced_records, trajectory_records, write_dataset

# The suite shares 2 cores with other test processes: one intra-op thread per process avoids
# OpenMP threads spinning against each other (10x slower steps measured under load).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


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


# --------------------------------------------------------------------------- small pipeline data

@pytest.fixture(scope="session")
def pipeline_data(tmp_path_factory):
    """Corpus, traces, trajectories and a trained tokenizer, small enough for seconds of CPU."""
    import sysconfig

    from cwm_beam.sources import cruxeval_split
    from cwm_jobs.corpus import Root, build_corpus
    from cwm_jobs.rehearsal import build_rehearsal, documentation_topics
    from cwm_jobs.tasks import comparison_tasks
    from cwm_jobs.tokenizer import sample_texts
    from cwm_model.tokenizer import train_tokenizer
    from cwm_spec.programs import program_hash, split_of

    root = tmp_path_factory.mktemp("pipeline")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = str(root / "corpus")
    build_corpus(corpus, roots=[Root("stdlib", stdlib / "json"), Root("stdlib", stdlib / "email")],
                 max_files=40, max_bytes=400_000)
    # The trainable side of the bundled problems (stage_config holds the other 400 out).
    crux = [(r["code"], r["input"]) for r in cruxeval_split(400).trainable[:120]]
    digits = [(t.source, t.call[2:-1]) for t in comparison_tasks(40, seed=1)]
    traces = traced_records(crux + digits)
    # Split by program, as the trace step does: no program in both splits.
    held = [split_of(program_hash(r["code"]), 0.2) == "validation" for r in traces]
    traces_uri = write_dataset(root / "traces", "traces",
                               {"train": [r for r, h in zip(traces, held) if not h],
                                "validation": [r for r, h in zip(traces, held) if h]})
    trajectories = trajectory_records(24)
    traj_uri = write_dataset(root / "trajectories", "trajectories",
                             {"train": trajectories[:20], "validation": trajectories[20:]})
    rehearsal = str(root / "rehearsal")
    build_rehearsal(rehearsal, dict(sorted(documentation_topics().items())[:12]))
    inputs = {"corpus": corpus, "traces": traces_uri, "trajectories": traj_uri,
              "rehearsal": rehearsal}
    tokenizer = train_tokenizer(list(sample_texts(inputs, 600)), 512)
    tokenizer.save(root / "tokenizer")
    return {**inputs, "tokenizer": str(root / "tokenizer"), "root": root}




@pytest.fixture(scope="session")
def tokenizer(pipeline_data):
    from cwm_model.tokenizer import CWMTokenizer

    return CWMTokenizer.load(pipeline_data["tokenizer"])
