"""Prometheus metrics, named like vLLM's with a `tuili:` prefix."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable
from itertools import accumulate

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

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


class _Histogram:
    """A histogram kept in plain numbers, exported at scrape time: observing is a bisect and two
    additions, where a prometheus_client Histogram takes a lock and several calls (its cost per
    streamed token was the front's largest, BENCHMARKS.md issue 19). Observed and scraped on the
    event loop."""

    __slots__ = ("name", "doc", "bounds", "counts", "sum", "created")

    def __init__(self, name: str, doc: str, bounds: tuple[float, ...]):
        self.name, self.doc, self.bounds = name, doc, bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bound >= value (le)
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def family(self) -> HistogramMetricFamily:
        les = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        f = HistogramMetricFamily(self.name, self.doc, sum_value=self.sum,
                                  buckets=list(zip(les, accumulate(self.counts))))
        f.samples.append(Sample(self.name + "_created", {}, self.created))
        return f


class _RequestCollector:
    """The per-request histograms and counters, in the order and names of prometheus_client's own
    Histogram and Counter (with their _created samples)."""

    def __init__(self, metrics: Metrics):
        self.m = metrics

    def collect(self):
        m = self.m
        yield from (h.family() for h in (m.ttft, m.itl, m.tpot, m.e2e))
        for name, doc, value in (("tuili:prompt_tokens", "Prompt tokens processed.",
                                  m.prompt_tokens),
                                 ("tuili:generation_tokens", "Tokens generated.",
                                  m.generation_tokens)):
            yield CounterMetricFamily(name, doc, value=value, created=m.created)
        f = CounterMetricFamily("tuili:request_success", "Requests finished, by finish reason.",
                                labels=["finished_reason"])
        for reason, (count, created) in list(m.finished.items()):
            f.add_metric([reason], count, created=created)
        yield f


class Metrics:
    """What the server counts itself (the engine's gauges and counters are read from its stats)."""

    def __init__(self, stats: Callable[[], EngineStats],
                 gpu_readings: Callable[[], list[GpuReading]] | None = None):
        self.registry = r = CollectorRegistry()
        r.register(_EngineCollector(stats))
        r.register(GpuCollector(gpu_readings or gpu_readings_source()))
        self.ttft = _Histogram("tuili:time_to_first_token_seconds", "Time to first token.",
                               _LATENCY)
        self.itl = _Histogram("tuili:inter_token_latency_seconds", "Time between output tokens.",
                              _LATENCY)
        self.tpot = _Histogram("tuili:time_per_output_token_seconds",
                               "Per request: (end - first token) / (output tokens - 1).", _LATENCY)
        self.e2e = _Histogram("tuili:e2e_request_latency_seconds", "Arrival to last token.",
                              _REQUEST)
        self.created = time.time()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, list] = {}  # finish reason -> [requests, created]
        r.register(_RequestCollector(self))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self, arrival: float) -> RequestTimer:
        return RequestTimer(self, arrival)

    def count_finished(self, reason: str) -> None:
        entry = self.finished.get(reason)
        if entry is None:
            entry = self.finished[reason] = [0, time.time()]
        entry[0] += 1


class RequestTimer:
    """Observes one engine request's outputs (times from the engine thread's clock)."""

    __slots__ = ("m", "arrival", "first", "last", "num_tokens")

    def __init__(self, metrics: Metrics, arrival: float):
        self.m, self.arrival = metrics, arrival
        self.first: float | None = None
        self.last = arrival
        self.num_tokens = 0

    def __call__(self, out: RequestOutput, t: float) -> None:
        samples = out.outputs
        new = len(samples[0].delta_token_ids) if len(samples) == 1 else \
            sum(len(o.delta_token_ids) for o in samples)
        m = self.m
        if new:
            if self.first is None:
                self.first = t
                m.ttft.observe(t - self.arrival)
                m.prompt_tokens += len(out.prompt_token_ids)
            else:
                m.itl.observe(t - self.last)
            self.last = t
            self.num_tokens += new
            m.generation_tokens += new
        if out.finished:
            m.e2e.observe(t - self.arrival)
            n = len(samples)
            if self.first is not None and self.num_tokens > n:
                m.tpot.observe((t - self.first) / (self.num_tokens / n - 1))
            for o in samples:
                m.count_finished(o.finish_reason)
