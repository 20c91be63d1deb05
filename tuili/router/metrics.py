"""The router's own Prometheus metrics: requests, errors, retries and latency per model and
worker, and each worker's state as the router sees it."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
            40.0, 80.0, 160.0)


class RouterMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("tuili_router:requests", "Requests relayed, by answer status.",
                                ["model", "version", "worker", "status"], registry=r)
        self.errors = Counter("tuili_router:worker_errors", "Worker failures seen by the router "
                              "(connect, status_5xx, mid_stream).", ["model", "worker", "kind"],
                              registry=r)
        self.retries = Counter("tuili_router:retries", "Requests served on a second worker after "
                               "the first failed before answering.", ["model"], registry=r)
        self.first_byte = Histogram("tuili_router:time_to_first_byte_seconds", "Request sent to "
                                    "the worker's first byte back.", ["model", "worker"],
                                    buckets=_LATENCY, registry=r)
        self.duration = Histogram("tuili_router:request_duration_seconds", "Request sent to the "
                                  "worker's last byte back.", ["model", "worker"],
                                  buckets=_LATENCY, registry=r)

    def watch(self, pool) -> None:
        """Export each worker's state (up, draining, in-flight requests, reported queue) at every
        scrape."""
        class _Workers:
            def collect(self):
                up = GaugeMetricFamily("tuili_router:worker_up", "1 while the worker serves.",
                                       labels=["worker"])
                draining = GaugeMetricFamily("tuili_router:worker_draining", "1 while the "
                                             "worker's /health answers 503 (out of the pool).",
                                             labels=["worker"])
                flight = GaugeMetricFamily("tuili_router:worker_in_flight", "Requests this "
                                           "router has open on the worker.", labels=["worker"])
                load = GaugeMetricFamily("tuili_router:worker_reported_load", "Running + "
                                         "waiting sequences the worker reports.", labels=["worker"])
                for w in pool.workers.values():
                    up.add_metric([w.url], float(w.serving))
                    draining.add_metric([w.url], float(w.state == "draining"))
                    flight.add_metric([w.url], w.in_flight)
                    load.add_metric([w.url], w.reported)
                yield from (up, draining, flight, load)

        self.registry.register(_Workers())

    def error(self, model: str, worker: str, kind: str) -> None:
        self.errors.labels(model, worker, kind).inc()

    def finished(self, model: str, version: str, worker: str, status: int, seconds: float) -> None:
        self.requests.labels(model, version, worker, str(status)).inc()
        self.duration.labels(model, worker).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
