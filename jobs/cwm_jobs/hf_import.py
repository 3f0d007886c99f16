"""The import step (``spec.model.init``): a released Hugging Face CWM checkpoint becomes the
pipeline's starting point.

``python -m cwm_jobs.hf_import --config step.json`` converts ``inputs.source`` (a folder or URI)
with :func:`cwm_model.hf_import.import_hf`, streaming shard by shard, into ``outputs.checkpoint``
(the first stage's ``inputs.init``) and writes its ``tokenizer.json``, validated for CWM's
special slots, to ``outputs.tokenizer`` (every stage's ``inputs.tokenizer``; no tokenizer is
trained). Both outputs are committed through ``cwm_spec.storage``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from cwm_model.hf_import import import_hf
from cwm_spec import storage
from cwm_spec.stepconfig import load_step_config

LOG = logging.getLogger("cwm_jobs.hf_import")


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config, _ = load_step_config(argv)
    source = (config.get("inputs") or {}).get("source")
    outputs = config.get("outputs") or {}
    if not source:
        raise ValueError("step configuration: inputs.source (spec.model.init) is required")
    for name in ("checkpoint", "tokenizer"):
        if not outputs.get(name):
            raise ValueError(f"step configuration: outputs.{name} is required for the import step")
    model, tokenizer = import_hf(source, outputs["checkpoint"], replace=True)
    staged = storage.staging_dir(outputs["tokenizer"], "tokenizer")
    tokenizer.save(staged)
    storage.upload_tree(staged, outputs["tokenizer"])
    LOG.info("imported %s: %d layers, dim %d, vocabulary %d; tokenizer %d tokens", source,
             model.n_layers, model.dim, model.vocab_size, tokenizer.vocab_size)


if __name__ == "__main__":
    main()
