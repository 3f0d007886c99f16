"""cwm_operator: the local runner, the CLI and the kopf operator, over the contract in
:mod:`cwm_spec` (the API, the plan, artifacts).

Importing this package is cheap: kopf and the Kubernetes client load only in the modules that
talk to a cluster.
"""

from cwm_spec import __version__

__all__ = ["__version__"]
