"""The workers behind the router: each one's health, served model and load, kept fresh by polling
its /health, /v1/models and /metrics (the router's own count of requests in flight is exact; the
worker's queue, read from its metrics, also counts other routers' requests)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("tuili")

UP, DRAINING, DOWN = "up", "draining", "down"
_LOAD_METRICS = ("tuili:num_requests_running", "tuili:num_requests_waiting")


@dataclass
class Worker:
    url: str
    state: str = DOWN  # until its first poll answers
    models: list[str] = field(default_factory=list)  # what it serves (its /v1/models)
    in_flight: int = 0  # requests this router has open on it
    reported: float = 0.0  # running + waiting sequences, from its /metrics
    kv_cache_usage: float = 0.0
    last_error: str = ""
    checked_at: float = 0.0

    @property
    def load(self) -> float:
        return max(self.in_flight, self.reported)

    @property
    def serving(self) -> bool:
        return self.state == UP and bool(self.models)


class WorkerPool:
    """Polls every worker every `interval` seconds; `mark_down` takes one out at once (a failed
    request), until a poll finds it answering again."""

    def __init__(self, urls: list[str], interval: float, api_key: str | None = None):
        self.workers = {url: Worker(url) for url in urls}
        self.interval = interval
        self.client: aiohttp.ClientSession | None = None  # the router's, given at start
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._task: asyncio.Task | None = None
        self.on_down = lambda url: None  # the balancer forgets what a lost worker cached

    async def start(self, client: aiohttp.ClientSession) -> None:
        self.client = client
        await self.poll_all()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.poll_all()

    async def poll_all(self) -> None:
        await asyncio.gather(*(self.poll(w) for w in self.workers.values()))

    async def poll(self, w: Worker) -> None:
        timeout = aiohttp.ClientTimeout(total=max(2.0, self.interval))
        get = self.client.get
        try:
            async with get(f"{w.url}/health", timeout=timeout) as health:
                await health.read()
            if health.status != 200:
                self._set(w, DRAINING if health.status == 503 else DOWN,
                          f"/health answered {health.status}")
                return
            if not w.models:
                async with get(f"{w.url}/v1/models", headers=self.headers,
                               timeout=timeout) as models:
                    models.raise_for_status()
                    w.models = [m["id"] for m in (await models.json())["data"]]
            async with get(f"{w.url}/metrics", timeout=timeout) as metrics:
                w.reported, w.kv_cache_usage = _load_from(await metrics.text())
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError) as e:
            self._set(w, DOWN, f"{type(e).__name__}: {e}")
            return
        w.checked_at = time.monotonic()
        self._set(w, UP, "")

    def mark_down(self, url: str, why: str) -> None:
        self._set(self.workers[url], DOWN, why)

    def _set(self, w: Worker, state: str, why: str) -> None:
        if state != w.state:
            if state == UP:
                log.info("router: worker %s is up, serving %s", w.url, ", ".join(w.models))
            else:
                log.warning("router: worker %s is %s (%s)", w.url, state, why)
            if w.state == UP:
                self.on_down(w.url)
        if state == DOWN:
            w.models = []  # a restarted worker may serve something else: asked again
        w.state, w.last_error = state, why


def _load_from(text: str) -> tuple[float, float]:
    """(running + waiting sequences, KV-cache usage) from a worker's Prometheus text."""
    load, usage = 0.0, 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in _LOAD_METRICS:
                load += sample.value
            elif sample.name == "tuili:kv_cache_usage_perc":
                usage = sample.value
    return load, usage
