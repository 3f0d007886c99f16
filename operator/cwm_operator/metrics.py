"""Prometheus metrics of the operator (one registry per operator instance, so tests can run
several operators in one process).

    cwm_pipelines{phase}                    pipelines this operator sees, by status.phase
    cwm_stage_duration_seconds{step}        first child start → success, per step
    cwm_reconcile_total / _errors_total     reconciles run / failed with an exception
    cwm_reconcile_seconds                   time per reconcile (with its API calls)
    cwm_api_requests_total{verb,resource}   requests this operator made outside kopf's watches
    cwm_child_handoff_seconds               a child's success observed → next child created
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PHASES = ("Pending", "Running", "Succeeded", "Failed", "Suspended")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.pipelines = Gauge("cwm_pipelines", "Pipelines by phase.", ["phase"], registry=r)
        self.stage_seconds = Histogram(
            "cwm_stage_duration_seconds", "Duration of each succeeded step.", ["step"],
            buckets=(1, 10, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 24 * 3600, 72 * 3600,
                     float("inf")), registry=r)
        self.reconciles = Counter("cwm_reconcile_total", "Reconciles run.", registry=r)
        self.errors = Counter("cwm_reconcile_errors_total", "Reconciles that raised.",
                              registry=r)
        self.reconcile_seconds = Histogram(
            "cwm_reconcile_seconds", "Time per reconcile.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, float("inf")),
            registry=r)
        self.requests = Counter("cwm_api_requests_total", "API requests made by the operator.",
                                ["verb", "resource"], registry=r)
        self.handoff = Histogram(
            "cwm_child_handoff_seconds", "A child's success observed → next child created.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, float("inf")), registry=r)

    def set_phases(self, phases: Iterable[str]) -> None:
        counts = dict.fromkeys(PHASES, 0)
        for phase in phases:
            counts[phase] = counts.get(phase, 0) + 1
        for phase, count in counts.items():
            self.pipelines.labels(phase=phase).set(count)

    def total_requests(self) -> float:
        return sum(s.value for m in self.requests.collect() for s in m.samples
                   if s.name.endswith("_total"))

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
