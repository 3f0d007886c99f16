"""Pretraining: next-token prediction on the code corpus (CWM: 8T tokens at 8k context).

Data: ``spec.dataMix`` (default ``{code: 1.0}``) over ``inputs.corpus`` (and traces or
trajectories if the mix names ``cwm``), packed into ``sequenceLength`` tokens with document
masking. Writes ``outputs.checkpoint`` (the model), ``outputs.state`` (resumable DeepSpeed state)
and ``outputs.metrics`` (``metrics.jsonl``, ``tensorboard/``, ``eval.json``).

One process (a laptop, a CPU pod)::

    python -m cwm_jobs.pretrain --config step.json        # or $CWM_STEP_CONFIG

Several (a GPU node; in a PyTorchJob pod the operator's PET_* variables fill in the rest)::

    torchrun --standalone --nproc_per_node 2 -m cwm_jobs.pretrain --config step.json
    torchrun --nnodes 4 --nproc_per_node 8 -m cwm_jobs.pretrain
"""

from __future__ import annotations

from cwm_jobs.trainer import run_lm_stage


def main(argv: list[str] | None = None) -> dict[str, float]:
    return run_lm_stage("pretrain", argv)


if __name__ == "__main__":
    main()
