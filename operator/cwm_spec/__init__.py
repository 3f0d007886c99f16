"""cwm_spec: the contract every component reads, and nothing that talks to a cluster.

    api.py         the CWMPipeline pydantic models: every field, default and rule of the spec
    validation.py  manifest files -> CWMPipeline, with errors that name the field
    crd.py         the CustomResourceDefinition generated from api.py
    plan.py        CWMPipeline -> Plan: the steps, their commands, inputs, outputs, fingerprints
    stepconfig.py  how a step reads its section of the spec ($CWM_STEP_CONFIG or --config)
    artifacts.py   data sets on any fsspec URI: manifest.json + JSONL shards, digests

The operator (cwm_operator), the Beam steps (cwm_beam) and the training stages (cwm_jobs) all
import it; it imports none of them.
"""

__version__ = "0.1.0"
