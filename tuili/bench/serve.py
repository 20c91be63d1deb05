"""`tuili bench serve`: a streaming load generator for any OpenAI-compatible server.

Requests arrive at --request-rate (gamma-distributed gaps: --burstiness 1 is Poisson, lower is
burstier), at most --max-concurrency at a time; each streams, and from its chunks come time to
first token (TTFT), inter-token latencies (ITL), time per output token (TPOT) and end-to-end
latency (E2E). Goodput counts requests per second that meet every SLO given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np

WORDS = ("time year people way day man thing woman life child world school state family "
         "student group country problem hand part place case week company system program "
         "question work government number night point home water room mother area money story "
         "fact month lot right study book eye job word business issue side kind head house").split()


@dataclass
class BenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None
    endpoint: str = "completions"  # or "chat"
    num_prompts: int = 100
    request_rate: float = float("inf")
    burstiness: float = 1.0
    max_concurrency: int | None = None
    input_len: int = 128
    output_len: int = 64
    prompt_file: str | None = None
    ignore_eos: bool = False
    temperature: float = 0.0
    api_key: str | None = None
    seed: int = 0
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


def make_prompts(cfg: BenchConfig) -> list[str | list[int]]:
    """File prompts (one per line, or JSONL with a "prompt" key), else random ones."""
    rng = random.Random(cfg.seed)
    if cfg.prompt_file:
        with open(cfg.prompt_file) as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        prompts = [json.loads(ln)["prompt"] if ln.startswith("{") else ln for ln in lines]
        return [prompts[i % len(prompts)] for i in range(cfg.num_prompts)]
    if cfg.endpoint == "completions":  # token ids give exact input lengths on any tokenizer
        return [[rng.randrange(1000, 20000) for _ in range(cfg.input_len)]
                for _ in range(cfg.num_prompts)]
    return [" ".join(rng.choice(WORDS) for _ in range(cfg.input_len))
            for _ in range(cfg.num_prompts)]


def _payload(cfg: BenchConfig, prompt) -> dict:
    body = {"model": cfg.model, "max_tokens": cfg.output_len, "temperature": cfg.temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


async def one_request(session, cfg: BenchConfig, prompt) -> RequestResult:
    """One streamed request to cfg.base_url: its TTFT, inter-token gaps and token count."""
    res = RequestResult()
    path = "/v1/chat/completions" if cfg.endpoint == "chat" else "/v1/completions"
    start = last = time.perf_counter()
    chunks = 0
    try:
        async with session.post(cfg.base_url.rstrip("/") + path, json=_payload(cfg, prompt)) as r:
            if r.status != 200:
                res.error = f"HTTP {r.status}: {(await r.read())[:200]!r}"
                return res
            async for raw in r.content:  # one SSE line at a time
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if data.get("usage"):
                    res.output_tokens = data["usage"]["completion_tokens"]
                choice = (data.get("choices") or [{}])[0]
                text = choice.get("text") or (choice.get("delta") or {}).get("content")
                if text:
                    now = time.perf_counter()
                    if chunks == 0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last, chunks = now, chunks + 1
        res.e2e = time.perf_counter() - start
        res.output_tokens = res.output_tokens or chunks
        res.ok = chunks > 0
    except Exception as e:  # a failed request is counted, not fatal
        res.error = f"{type(e).__name__}: {e}"
    return res


def wait_until_healthy(base_url: str, timeout: float, proc=None) -> None:
    """Poll GET /health until it answers 200; RuntimeError after `timeout` seconds, or as soon as
    `proc` (the server's subprocess.Popen, if it is ours) has exited."""
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base_url.rstrip("/") + "/health") as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the server did not come up in {timeout:g}s")


async def _resolve_model(session, base_url: str) -> str:
    async with session.get(base_url.rstrip("/") + "/v1/models") as r:
        r.raise_for_status()
        return (await r.json())["data"][0]["id"]


async def run_benchmark(cfg: BenchConfig) -> dict:
    import aiohttp  # light on the client's CPU, which shares the machine in local runs

    prompts = make_prompts(cfg)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    conns = cfg.max_concurrency or cfg.num_prompts
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=None),
                                     connector=aiohttp.TCPConnector(limit=conns)) as session:
        if cfg.model is None:
            cfg.model = await _resolve_model(session, cfg.base_url)
        gate = asyncio.Semaphore(conns)
        rng = np.random.default_rng(cfg.seed)

        async def limited(prompt):
            async with gate:
                return await one_request(session, cfg, prompt)

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(prompt)))
            if cfg.request_rate != float("inf"):
                theta = 1.0 / (cfg.request_rate * cfg.burstiness)
                await asyncio.sleep(rng.gamma(cfg.burstiness, theta))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(cfg, results, duration)


def summarize(cfg: BenchConfig, results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]

    def stats(values: list[float]) -> dict:
        if not values:
            return {"mean": 0.0, "p50": 0.0, "p99": 0.0}
        a = np.asarray(values) * 1000
        return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
                "p99": float(np.percentile(a, 99))}

    good = [r for r in ok if (cfg.slo_ttft_ms is None or r.ttft * 1000 <= cfg.slo_ttft_ms)
            and (cfg.slo_tpot_ms is None or r.tpot * 1000 <= cfg.slo_tpot_ms)]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "config": asdict(cfg), "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration, "output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "goodput": len(good) / duration if (cfg.slo_ttft_ms or cfg.slo_tpot_ms) else None,
        "ttft_ms": stats([r.ttft for r in ok]), "tpot_ms": stats([r.tpot for r in ok
                                                                   if r.output_tokens > 1]),
        "itl_ms": stats([x for r in ok for x in r.itl]), "e2e_ms": stats([r.e2e for r in ok]),
    }


def format_report(s: dict) -> str:
    lines = [f"completed {s['completed']}, failed {s['failed']} in {s['duration_s']:.2f}s",
             f"request throughput  {s['request_throughput']:.2f} req/s",
             f"output throughput   {s['output_throughput']:.1f} tok/s "
             f"({s['output_tokens']} tokens)"]
    if s["goodput"] is not None:
        lines.append(f"goodput             {s['goodput']:.2f} req/s within the SLOs")
    lines.append(f"{'':6}{'mean':>10}{'p50':>10}{'p99':>10}  (ms)")
    for key in ("ttft", "tpot", "itl", "e2e"):
        st = s[f"{key}_ms"]
        lines.append(f"{key.upper():6}{st['mean']:>10.1f}{st['p50']:>10.1f}{st['p99']:>10.1f}")
    lines += [f"error: {e}" for e in s["errors"]]
    return "\n".join(lines)


def add_bench_options(parser: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    parser.add_argument("--base-url", default=d.base_url, help="the server (without /v1)")
    parser.add_argument("--model", default=None, help="default: the server's first model")
    parser.add_argument("--endpoint", choices=("completions", "chat"), default=d.endpoint,
                        help="completions sends token-id prompts; chat sends random words")
    parser.add_argument("--num-prompts", type=int, default=d.num_prompts, help="requests in all")
    parser.add_argument("--request-rate", type=float, default=d.request_rate,
                        help="requests per second (default inf: all at once)")
    parser.add_argument("--burstiness", type=float, default=d.burstiness,
                        help="gamma shape of the arrival gaps: 1 = Poisson, < 1 burstier")
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="most requests in flight (default: no limit)")
    parser.add_argument("--input-len", type=int, default=d.input_len, help="random prompt tokens")
    parser.add_argument("--output-len", type=int, default=d.output_len, help="max_tokens")
    parser.add_argument("--prompt-file", default=None,
                        help="prompts, one per line (or JSONL with a 'prompt' key)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="send ignore_eos (vLLM/tuili extension) for exact output lengths")
    parser.add_argument("--temperature", type=float, default=d.temperature)
    parser.add_argument("--api-key", default=None, help="sent as Authorization: Bearer")
    parser.add_argument("--seed", type=int, default=d.seed, help="for prompts and arrivals")
    parser.add_argument("--slo-ttft-ms", type=float, default=None)
    parser.add_argument("--slo-tpot-ms", type=float, default=None)
    parser.add_argument("--json", default=None, help="also write the results here")


def run_from_args(args: argparse.Namespace) -> dict:
    names = BenchConfig.__dataclass_fields__
    cfg = BenchConfig(**{k: v for k, v in vars(args).items() if k in names})
    summary = asyncio.run(run_benchmark(cfg))
    print(format_report(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary
