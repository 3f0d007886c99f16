"""Run the operator: ``python -m cwm_operator`` (the container's entry point).

    python -m cwm_operator --all-namespaces --liveness http://0.0.0.0:8080/healthz \\
        --metrics-port 9090
    python -m cwm_operator --namespace research --namespace team-b

Credentials: in-cluster (the pod's ServiceAccount) when running in a pod, else $KUBECONFIG or
~/.kube/config. Settings come from the environment (see ``cwm_operator.settings``). Logs are JSON
lines on stderr. One replica: deploy with ``strategy: Recreate``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import threading
from collections.abc import Sequence
from typing import Any

import kopf
from kubernetes import client, config

from cwm_operator.handlers import Controller, build_registry, operator_settings
from cwm_operator.metrics import Metrics
from cwm_operator.render import warm_up
from cwm_operator.settings import Settings, SettingsError


def load_configuration(kubeconfig: str | None = None) -> Any:
    """A kubernetes.client.Configuration: in-cluster if possible, else the kubeconfig."""
    configuration = client.Configuration()
    if kubeconfig is None:
        try:
            config.load_incluster_config(client_configuration=configuration)
            return _tune(configuration)
        except config.ConfigException:
            pass
    config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    return _tune(configuration)


def _tune(configuration: Any) -> Any:
    configuration.connection_pool_maxsize = 32  # calls run on a thread pool
    return configuration


def build(settings: Settings, configuration: Any) -> tuple[Any, Any]:
    """The controller and its kopf registry, for one operator instance."""
    warm_up()  # import the training SDK now, not during the first pipeline's reconcile
    controller = Controller(settings, client.ApiClient(configuration), Metrics())
    return controller, build_registry(controller, configuration)


async def run(settings: Settings, configuration: Any, *, namespaces: Sequence[str] = (),
              clusterwide: bool = False, liveness: str | None = None,
              metrics_port: int | None = None, stop_flag: Any = None, ready_flag: Any = None,
              controller_ready: Any = None) -> None:
    """Run until stopped. `controller_ready(controller)` is called once it exists (tests)."""
    controller, registry = build(settings, configuration)
    if metrics_port is not None:
        controller.metrics.serve(metrics_port)
    if controller_ready is not None:
        controller_ready(controller)
    await kopf.operator(registry=registry, settings=operator_settings(),
                        namespaces=list(namespaces), clusterwide=clusterwide,
                        liveness_endpoint=liveness, stop_flag=stop_flag, ready_flag=ready_flag)


class OperatorThread:
    """The operator in a thread with its own event loop (tests, embedding)."""

    def __init__(self, settings: Settings, configuration: Any, namespaces: Sequence[str]):
        self.settings, self.configuration, self.namespaces = settings, configuration, namespaces
        self.controller: Any = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True, name="cwm-operator")
        self.error: BaseException | None = None

    def _main(self) -> None:
        try:
            asyncio.run(run(self.settings, self.configuration, namespaces=self.namespaces,
                            stop_flag=self._stop, ready_flag=self._ready,
                            controller_ready=lambda c: setattr(self, "controller", c)))
        except BaseException as err:  # noqa: BLE001 - surfaced by start()/stop()
            self.error = err
            self._ready.set()

    def start(self, timeout: float = 30) -> OperatorThread:
        self._thread.start()
        if not self._ready.wait(timeout) or self.error:
            raise RuntimeError(f"operator did not start: {self.error!r}")
        return self

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def __enter__(self) -> OperatorThread:
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.stop()


def _configure_logging(level: str) -> None:
    kopf.configure(verbose=level == "DEBUG", log_format=kopf.LogFormat.JSON, log_prefix=False)
    logging.getLogger().setLevel(level)
    logging.getLogger("cwm_operator").setLevel(level)
    if level != "DEBUG":
        # kopf reports every handled watch event at INFO; our own lines tell the story.
        logging.getLogger("kopf").setLevel(max(logging.WARNING, logging.getLevelName(level)))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cwm_operator",
                                description="The CWMPipeline operator (kopf).")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--namespace", "-n", action="append", default=[],
                       help="watch this namespace (repeatable)")
    where.add_argument("--all-namespaces", "-A", action="store_true", help="watch all")
    p.add_argument("--liveness", default=None, metavar="URL",
                   help="kopf's liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics")
    p.add_argument("--kubeconfig", default=None, help="default: in-cluster, else $KUBECONFIG")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _configure_logging(args.log_level)
    configuration = load_configuration(args.kubeconfig)
    asyncio.run(run(settings, configuration, namespaces=args.namespace,
                    clusterwide=args.all_namespaces, liveness=args.liveness,
                    metrics_port=args.metrics_port))
    return 0
