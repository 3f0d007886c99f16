"""cwm_operator: the CWMPipeline API, the plan, the local runner, the CLI and the kopf operator.

Importing this package is cheap: kopf and the Kubernetes client load only in the modules that
talk to a cluster.
"""

__version__ = "0.1.0"
