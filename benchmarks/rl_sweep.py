"""RL on the tiny task of tests/jobs/test_rl_learns.py at several learning rates and updates per
batch: the reward's first 5 and last 10 steps, held-out accuracy and clip fractions per setting.

    .venv/bin/python -m pytest benchmarks/rl_sweep.py -p tests.jobs.conftest -s

    RL_SWEEP="3e-3x4 1e-3x4" RL_SWEEP_TRUE_SHARE=0.5 .venv/bin/python -m pytest ...   # others

A pytest module (not collected by ``make test``: it lives outside ``tests/``) so it shares the
slow test's fixtures (``-p tests.jobs.conftest``: the small pipeline data and tokenizer) and its
data and stage helpers. One SFT warm-up (answers True with probability ``$RL_SWEEP_TRUE_SHARE``,
default 0.25), then the RL stage from it once per setting ``LRxUPDATES`` in ``$RL_SWEEP``
(default ``3e-3x4 1e-3x4 3e-3x1 1e-3x2``), the same batches each time. Prints one
line per setting; docs/benchmarks.md has a run.
"""

from __future__ import annotations

import os
import statistics

import pytest

from tests.jobs.test_rl_learns import comparison_data, run_rl, warm_up

SETTINGS = os.environ.get("RL_SWEEP", "3e-3x4 1e-3x4 3e-3x1 1e-3x2").split()
TRUE_SHARE = float(os.environ.get("RL_SWEEP_TRUE_SHARE", "0.25"))


@pytest.fixture(scope="module")
def warm(pipeline_data, dist_group, tmp_path_factory):
    root = tmp_path_factory.mktemp("rl-sweep")
    traces_uri, warmup_uri = comparison_data(root, TRUE_SHARE)
    return traces_uri, warm_up(pipeline_data, root, warmup_uri)


@pytest.mark.parametrize("setting", SETTINGS)
def test_setting(warm, pipeline_data, setting, tmp_path):
    lr, updates = setting.split("x")
    traces_uri, init = warm
    results, records = run_rl(pipeline_data, tmp_path, traces_uri, init, lr=float(lr),
                              updates=int(updates))
    rewards = [r["reward_mean"] for r in records]
    print(f"\nlr {lr} x {updates} updates: reward first5 {statistics.mean(rewards[:5]):.3f} "
          f"last10 {statistics.mean(rewards[-10:]):.3f}, held-out "
          f"{results['rl_heldout_accuracy']:.3f}, clip low/high "
          f"{results['rl/clip_fraction_low']:.4f}/{results['rl/clip_fraction_high']:.4f}; "
          f"curve {' '.join(f'{r:.2f}' for r in rewards)}")
