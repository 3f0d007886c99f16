"""Supervised fine-tuning on chat examples built from the pipeline's own data (no download).

* from traces: output-prediction questions ("What does ``f(3, 'a')`` return?") after CWM's
  reasoning system prompt, whose answer carries the execution trace as plain-text reasoning
  (``<think>\n...\n</think>\n``, CWM's format: ``cwm_jobs.tasks``), then the value;
* from trajectories: the agent's messages.

The loss covers assistant turns only; the learning rate is constant after warmup. Starts from
``inputs.init``; outputs as for pretraining.

One process::

    python -m cwm_jobs.sft --config step.json

Several::

    torchrun --standalone --nproc_per_node 2 -m cwm_jobs.sft --config step.json
"""

from __future__ import annotations

from cwm_jobs.trainer import run_lm_stage


def main(argv: list[str] | None = None) -> dict[str, float]:
    return run_lm_stage("sft", argv)


if __name__ == "__main__":
    main()
