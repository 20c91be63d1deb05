"""Prometheus metrics, named like vLLM's with a `tuili:` prefix."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tuili.async_llm import EngineStats
from tuili.outputs import RequestOutput
from tuili.server.gpu_metrics import GpuCollector, GpuReading, gpu_readings_source

_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
            7.5, 10.0, 20.0, 40.0, 80.0)
_REQUEST = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
            120.0, 240.0, 480.0)


class _EngineCollector:
    """Gauges and cumulative counters read from the engine thread's latest snapshot."""

    def __init__(self, stats: Callable[[], EngineStats]):
        self.stats = stats

    def collect(self):
        s = self.stats()
        for name, doc, value in (
                ("tuili:num_requests_running", "Sequences in the running batch.", s.num_running),
                ("tuili:num_requests_waiting", "Sequences waiting to run.", s.num_waiting),
                ("tuili:kv_cache_usage_perc", "Share of KV-cache blocks in use (1 = full).",
                 s.kv_cache_usage)):
            yield GaugeMetricFamily(name, doc, value=value)
        for name, doc, value in (
                ("tuili:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                 s.prefix_cache_queries),
                ("tuili:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                 s.prefix_cache_hits),
                ("tuili:num_preemptions", "Sequences preempted for lack of KV blocks.",
                 s.num_preemptions)):
            yield CounterMetricFamily(name, doc, value=value)
        if s.spec:  # speculative decoding, named as vLLM's spec_decode metrics
            for key, doc in (("num_drafts", "Verify steps of requests with drafts."),
                             ("num_draft_tokens", "Draft tokens proposed."),
                             ("num_accepted_tokens", "Draft tokens accepted.")):
                yield CounterMetricFamily(f"tuili:spec_decode_{key}", doc, value=s.spec[key])
            for key, doc in (("acceptance_rate", "Accepted / proposed draft tokens."),
                             ("mean_acceptance_length",
                              "Tokens gained per verify step (accepted drafts + 1).")):
                yield GaugeMetricFamily(f"tuili:spec_decode_{key}", doc, value=s.spec[key])
        for name, value in s.profile.items():  # per phase: MBU, MFU, rates (--profile)
            yield GaugeMetricFamily(name.replace("tuili_", "tuili:", 1),
                                    "Phase profiler: " + name.split("_", 3)[-1], value=value)


class Metrics:
    def __init__(self, stats: Callable[[], EngineStats],
                 gpu_readings: Callable[[], list[GpuReading]] | None = None):
        self.registry = r = CollectorRegistry()
        r.register(_EngineCollector(stats))
        r.register(GpuCollector(gpu_readings or gpu_readings_source()))
        self.ttft = Histogram("tuili:time_to_first_token_seconds", "Time to first token.",
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("tuili:inter_token_latency_seconds", "Time between output tokens.",
                             buckets=_LATENCY, registry=r)
        self.tpot = Histogram("tuili:time_per_output_token_seconds",
                              "Per request: (end - first token) / (output tokens - 1).",
                              buckets=_LATENCY, registry=r)
        self.e2e = Histogram("tuili:e2e_request_latency_seconds", "Arrival to last token.",
                             buckets=_REQUEST, registry=r)
        self.prompt_tokens = Counter("tuili:prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("tuili:generation_tokens", "Tokens generated.", registry=r)
        self.finished = Counter("tuili:request_success", "Requests finished, by finish reason.",
                                ["finished_reason"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self, arrival: float) -> RequestTimer:
        return RequestTimer(self, arrival)


class RequestTimer:
    """Observes one engine request's outputs (times from the engine thread's clock)."""

    def __init__(self, metrics: Metrics, arrival: float):
        self.m, self.arrival = metrics, arrival
        self.first: float | None = None
        self.last = arrival
        self.num_tokens = 0

    def __call__(self, out: RequestOutput, t: float) -> None:
        new = sum(len(o.delta_token_ids) for o in out.outputs)
        if new:
            if self.first is None:
                self.first = t
                self.m.ttft.observe(t - self.arrival)
                self.m.prompt_tokens.inc(len(out.prompt_token_ids))
            else:
                self.m.itl.observe(t - self.last)
            self.last = t
            self.num_tokens += new
            self.m.generation_tokens.inc(new)
        if out.finished:
            self.m.e2e.observe(t - self.arrival)
            n = len(out.outputs)
            if self.first is not None and self.num_tokens > n:
                self.m.tpot.observe((t - self.first) / (self.num_tokens / n - 1))
            for o in out.outputs:
                self.m.finished.labels(o.finish_reason).inc()
