"""Mid-training: CWM data mixed into code (CWM: 5T tokens at 131k context; 30% CWM data, i.e.
execution traces and ForagerAgent trajectories, 40% code, 30% rehearsal of pretraining data).

Starts from ``inputs.init`` (the pretraining checkpoint). Trajectories train on both agent and
environment turns; each observation is left out of the loss with probability
``spec.observationMaskRate`` (CWM: 0.5). Outputs as for pretraining.

Launched as pretraining is (``cwm_jobs.pretrain``: one process, or several under torchrun)::

    torchrun --standalone --nproc_per_node 2 -m cwm_jobs.midtrain --config step.json
"""

from __future__ import annotations

from cwm_jobs.trainer import run_lm_stage


def main(argv: list[str] | None = None) -> dict[str, float]:
    return run_lm_stage("midtrain", argv)


if __name__ == "__main__":
    main()
