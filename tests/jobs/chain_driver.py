"""Run several stages in one process group (used under torchrun by the distributed test):
``torchrun --nproc_per_node 2 tests/jobs/chain_driver.py midtrain:CFG sft:CFG rl:CFG``.

Each stage's ``main`` reuses the process group started here instead of starting its own, so one
launch covers the whole chain (DeepSpeed caches groups per process, so a process runs one group).
"""

from __future__ import annotations

import importlib
import os
import sys

import cwm_jobs.common as common


def main(argv: list[str]) -> None:
    env = common.dist_env_from(os.environ)
    common.init_distributed(env, "cpu")
    try:
        for item in argv:
            stage, config = item.split(":", 1)
            importlib.import_module(f"cwm_jobs.{stage}").main(["--config", config])
    finally:
        common.teardown_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
