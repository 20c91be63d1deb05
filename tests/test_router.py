"""The router: its choices alone (versions by weight and pin, prefix affinity under load), then
in front of three real `tuili serve` workers (two versions of one model at 80/20, another model,
all three as one pool): splits, affinity, the openai SDK, errors, API keys, and a worker killed
under load."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.server_process import ROOT, TuiliProcess, wait_for
from tests.tiny_models import tiny_llama
from tuili.errors import InvalidParameter
from tuili.router.balance import PrefixIndex, VersionPicker, choose_worker
from tuili.router.config import RouterConfig, Version
from tuili.router.proxy import prompt_text

KEY = "router-key"


# ---- the choices alone -------------------------------------------------------------------------

def test_config_is_checked_and_names_what_is_wrong():
    ok = RouterConfig.from_dict({"models": {"m": {"versions": [
        {"name": "a", "weight": 9, "workers": ["http://h:1/"]},
        {"name": "b", "weight": 1, "workers": ["http://h:2"]}]}, "n": {"workers": ["http://h:3"]}}})
    assert [v.name for v in ok.models["m"].versions] == ["a", "b"]
    assert ok.models["n"].versions[0].workers == ("http://h:3",)
    assert ok.workers == ["http://h:1", "http://h:2", "http://h:3"]
    bad = [({"models": {"m": {"workers": ["h:1"]}}}, "http(s)://"),
           ({"models": {"m": {"versions": [{"name": "a", "workers": ["http://h"]},
                                           {"name": "a", "workers": ["http://h"]}]}}}, "twice"),
           ({"models": {"m": {"versions": [{"weight": 0, "workers": ["http://h"]}]}}}, "weight 0"),
           ({"models": {"m": {"versions": [{"weight": -1, "workers": ["http://h"]}]}}}, ">= 0"),
           ({"modles": {}}, "unknown keys"), ({}, "names no models")]
    for data, words in bad:
        with pytest.raises(InvalidParameter, match=words.replace("(", r"\(").replace(")", r"\)")):
            RouterConfig.from_dict(data)


def test_weights_split_exactly_and_a_pin_holds():
    versions = [Version("v1", 80, ("a",)), Version("v2", 20, ("b",))]
    picker = VersionPicker(versions)
    picks = Counter(picker.pick({"v1", "v2"}).name for _ in range(500))
    assert picks == {"v1": 400, "v2": 100}
    assert {picker.pick({"v1", "v2"}).name for _ in range(20)} == {"v1", "v2"}
    assert all(picker.pick({"v1"}).name == "v1" for _ in range(10))  # v2 down: all to v1
    users = Counter(VersionPicker(versions).pick({"v1", "v2"}, f"user-{i}").name
                    for i in range(2000))
    assert abs(users["v1"] / 2000 - 0.8) < 0.04
    pinned = {VersionPicker(versions).pick({"v1", "v2"}, "alice").name for _ in range(20)}
    assert len(pinned) == 1


def test_prefix_affinity_bounded_by_load():
    index = PrefixIndex(chunk=16, max_chunks=8)
    workers = ["a", "b", "c"]
    load = {w: 0 for w in workers}
    system = "You are a helpful assistant who answers briefly. " * 2
    first = choose_worker(workers, load, index, index.hashes(system + "Q1"), 0)
    index.record(first, index.hashes(system + "Q1"))
    for turn in range(1, 6):  # other questions after the same system prompt: the same worker
        hashes = index.hashes(system + f"Question number {turn}?")
        assert choose_worker(workers, load, index, hashes, turn) == first
    other = index.hashes("A different prompt that shares nothing at all with the first one.")
    assert index.match(first, other) == 0
    busy = {**load, first: 100}  # far busier than the rest: balance wins over affinity
    assert choose_worker(workers, busy, index, index.hashes(system + "Q9"), 7) != first
    assert index.hashes("short") == []  # under one chunk: no affinity key


def test_prompt_text_of_each_request_kind():
    chat = {"messages": [{"role": "system", "content": "S"},
                         {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert "S" in prompt_text(chat) and "hi" in prompt_text(chat)
    assert prompt_text({"prompt": "abc"}) == "abc"
    assert prompt_text({"prompt": ["abc", "def"]}) == "abc"
    assert prompt_text({"prompt": [1, 2, 3]}) == "1,2,3,"
    assert prompt_text({"input": "emb"}) == "emb"
    assert prompt_text({"prompt": 5}) == ""


def test_router_imports_no_torch():
    code = "import sys, tuili.router.app, tuili.router.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr


# ---- in front of real workers ------------------------------------------------------------------

class RouterProcess(TuiliProcess):
    def __init__(self, tmp: Path, config: str, *flags: str):
        path = tmp / "router.yaml"
        path.write_text(config)
        super().__init__(tmp, ["router", "--config", str(path), "--health-interval", "0.2",
                               *flags], timeout=60)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, gguf_path):
    """Workers of a tiny random Llama (SmolLM2's tokenizer and chat template): routing, not
    the model's words, is what these tests check, and it starts in a fraction of the time."""
    tmp = tmp_path_factory.mktemp("router")
    model = tmp / "tiny-llama"
    tiny_llama(model, gguf_path)
    names = ["smol-a", "smol-b", "other"]
    with ThreadPoolExecutor(3) as pool:
        workers = list(pool.map(lambda name: TuiliProcess(tmp, [
            "serve", "--model", str(model), "--served-model-name", name, "--num-threads", "1",
            "--dtype", "float32"]), names))
    a, b, c = (w.url for w in workers)
    config = f"""
models:
  smol:
    versions:
      - {{name: v1, weight: 80, workers: [{a}]}}
      - {{name: v2, weight: 20, workers: [{b}]}}
  other:
    workers: [{c}]
  shared:
    workers: [{a}, {b}, {c}]
prefix_chars: 64
"""
    router = RouterProcess(tmp, config, "--api-key", KEY)
    wait_for(lambda: len(httpx.get(f"{router.url}/v1/models", headers=AUTH).json()["data"]) == 3)
    yield router, workers
    router.proc.terminate()
    router.proc.wait(10)
    for w in workers:
        w.stop()


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_openai_sdk_sees_one_server(cluster):
    from openai import OpenAI

    router, _ = cluster
    client = OpenAI(base_url=f"{router.url}/v1", api_key=KEY)
    assert sorted(m.id for m in client.models.list().data) == ["other", "shared", "smol"]
    reply = client.chat.completions.create(model="other", max_tokens=4, temperature=0,
                                           messages=[{"role": "user", "content": "Hi"}])
    assert reply.model == "other" and reply.choices[0].message.content
    pieces = list(client.completions.create(model="smol", prompt="The sky is", max_tokens=5,
                                            temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces if p.choices)
    # the worker is sent its own served name for the model, and its answer names it
    raw = httpx.post(f"{router.url}/v1/completions", headers={**AUTH, "x-tuili-version": "v2"},
                     json={"model": "smol", "prompt": "Hello", "max_tokens": 2})
    assert raw.status_code == 200 and raw.headers["x-tuili-version"] == "v2"
    assert raw.json()["model"] == "smol-b"


def test_errors_keys_and_metrics(cluster):
    router, _ = cluster
    r = httpx.post(f"{router.url}/v1/completions", json={"model": "smol", "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(f"{router.url}/v1/completions", headers=AUTH,
                   json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(f"{router.url}/v1/completions", headers=AUTH, content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(f"{router.url}/v1/completions", headers={**AUTH, "x-tuili-version": "v9"},
                   json={"model": "smol", "prompt": "x"})
    assert r.status_code == 400 and "v9" in r.json()["error"]["message"]
    # a worker's own 400 passes through untouched (and is not retried)
    r = httpx.post(f"{router.url}/v1/completions", headers=AUTH,
                   json={"model": "smol", "prompt": "x", "temperature": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    text = httpx.get(f"{router.url}/metrics").text
    assert 'tuili_router:requests_total{model="smol"' in text
    assert "tuili_router:worker_up" in text


def test_versions_split_80_20_over_500_requests(cluster):
    router, workers = cluster

    async def run() -> Counter:
        seen: Counter = Counter()
        limit = asyncio.Semaphore(24)
        async with httpx.AsyncClient(timeout=120, headers=AUTH) as client:
            async def one(i: int) -> None:
                async with limit:
                    r = await client.post(f"{router.url}/v1/completions", json={
                        "model": "smol", "prompt": f"Count {i}", "max_tokens": 1})
                    assert r.status_code == 200, r.text
                    seen[r.headers["x-tuili-version"]] += 1
            await asyncio.gather(*(one(i) for i in range(500)))
        return seen

    seen = asyncio.run(run())
    assert abs(seen["v1"] / 500 - 0.8) <= 0.03, seen


def test_shared_prefixes_stay_on_one_worker(cluster):
    router, workers = cluster
    prefixes = [f"Context {k}: " + " ".join(f"fact{k}-{j}" for j in range(16)) for k in range(5)]
    placed: dict[int, set[str]] = {k: set() for k in range(len(prefixes))}
    for rnd in range(2):
        for k, prefix in enumerate(prefixes):
            r = httpx.post(f"{router.url}/v1/completions", headers=AUTH, timeout=60, json={
                "model": "shared", "prompt": prefix + f" Question {rnd}?", "max_tokens": 1})
            assert r.status_code == 200
            placed[k].add(r.headers["x-tuili-worker"])
    assert all(len(urls) == 1 for urls in placed.values()), placed
    assert len(set().union(*placed.values())) >= 2  # and the prefixes spread over the pool


def test_a_worker_killed_under_load_loses_no_request_that_had_not_streamed(cluster):
    router, workers = cluster
    doomed = workers[1]  # smol v2's only worker: its traffic falls back to v1

    async def run():
        results = []
        async with httpx.AsyncClient(timeout=120, headers=AUTH) as client:
            async def one(i: int) -> None:
                stream = i % 2 == 0
                body = {"model": "smol", "prompt": f"Tell a story {i}", "max_tokens": 64,
                        "ignore_eos": True, "stream": stream}
                async with client.stream("POST", f"{router.url}/v1/completions",
                                         json=body) as r:
                    worker = r.headers.get("x-tuili-worker")
                    text = (await r.aread()).decode()
                ok = r.status_code == 200 and ("[DONE]" in text and '"error"' not in text
                                               if stream else '"text"' in text)
                results.append((stream, worker, ok, r.status_code, text[-300:]))

            async def killer() -> None:  # once the doomed worker holds requests
                gauge = f'tuili_router:worker_in_flight{{worker="{doomed.url}"}}'
                while True:
                    await asyncio.sleep(0.05)
                    text = (await client.get(f"{router.url}/metrics")).text
                    held = [ln for ln in text.splitlines() if ln.startswith(gauge)]
                    if held and float(held[0].split()[-1]) >= 3:
                        break
                await asyncio.sleep(0.1)
                doomed.proc.kill()

            await asyncio.gather(killer(), *(one(i) for i in range(40)))
        return results

    results = asyncio.run(run())
    assert doomed.proc.poll() is not None
    for stream, worker, ok, status, tail in results:
        # only a stream that had begun on the killed worker may fail
        if not (stream and worker == doomed.url):
            assert ok, (stream, worker, status, tail)
    after = [httpx.post(f"{router.url}/v1/completions", headers=AUTH, timeout=60,
                        json={"model": "smol", "prompt": f"After {i}", "max_tokens": 2})
             for i in range(10)]
    assert all(r.status_code == 200 and r.headers["x-tuili-version"] == "v1" for r in after)
    assert httpx.get(f"{router.url}/health").status_code == 200
    text = httpx.get(f"{router.url}/metrics").text
    assert f'tuili_router:worker_up{{worker="{doomed.url}"}} 0.0' in text
    # the kill hit requests in flight (else this test showed nothing): the router saw them fail,
    # and sent those that had no byte back yet to the other version's worker
    assert f'worker="{doomed.url}"' in text.split("tuili_router:worker_errors_total", 1)[1]
    retried = [line for line in text.splitlines()
               if line.startswith('tuili_router:retries_total{model="smol"}')]
    assert retried and float(retried[0].split()[-1]) >= 1, retried


def test_a_draining_worker_leaves_the_pool_and_finishes_its_stream(cluster):
    """Runs last: SIGTERM drains `other`'s worker. Its open stream (already streaming: never
    retried) ends whole; the router takes the worker out of the pool at once."""
    router, workers = cluster
    a, draining = workers[0], workers[2]
    chunks: list[str] = []
    began = threading.Event()

    def stream() -> None:
        body = {"model": "other", "prompt": "Tell a long story", "max_tokens": 400,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{router.url}/v1/completions", headers=AUTH, json=body,
                          timeout=120) as r:
            for line in r.iter_lines():
                if line:
                    chunks.append(line)
                    began.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert began.wait(60)
    draining.proc.send_signal(signal.SIGTERM)
    # the router polls every second; a loaded CI machine answers late
    wait_for(lambda: f'tuili_router:worker_up{{worker="{draining.url}"}} 0.0'
             in httpx.get(f"{router.url}/metrics").text, timeout=20)
    for i in range(3):  # the shared model's pool is now the first worker alone
        r = httpx.post(f"{router.url}/v1/completions", headers=AUTH, timeout=60,
                       json={"model": "shared", "prompt": f"Hello {i}", "max_tokens": 1})
        assert r.status_code == 200 and r.headers["x-tuili-worker"] == a.url
    reader.join(60)
    assert chunks[-1] == "data: [DONE]" and not any('"error"' in c for c in chunks)
    last = json.loads(chunks[-2].removeprefix("data: "))  # the stream was relayed whole
    assert last["choices"][0]["finish_reason"] == "length", last
    assert draining.proc.wait(40) == 0
    r = httpx.post(f"{router.url}/v1/completions", headers=AUTH,
                   json={"model": "other", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_worker_available"
    text = httpx.get(f"{router.url}/metrics").text
    assert f'worker="{a.url}"' in text.split("tuili_router:request_duration_seconds_count", 1)[1]
