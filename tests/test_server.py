"""`tuili serve` as clients see it: a real server subprocess on SmolLM2, driven by the official
openai SDK for every endpoint and streaming mode, and by raw HTTP for the error cases,
disconnects, a full queue and a SIGTERM drain."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from tuili import SamplingParams  # noqa: E402

from tests.conftest import MODEL  # noqa: E402
from tests.server_process import (KEY, ROOT, Server, Streamer,  # noqa: E402
                                  accepts_connections, metrics, wait_for)
# float32 like the `llm` fixture, so greedy text through the server must equal LLM.generate.
# Two sequences at a time and four waiting make a full queue easy to reach. The engine runs in a
# process of its own here (the GPU's default; the other server suites run it in a thread).
SERVER_FLAGS = ["--dtype", "float32", "--max-num-seqs", "2", "--max-waiting", "4",
                "--max-model-len", "1024", "--num-kv-blocks", "128", "--api-key", KEY,
                "--profile", "--engine-process"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("server"), *SERVER_FLAGS)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as c:
        yield c


def greedy(llm, prompt, n: int) -> str:
    return llm.generate(prompt, SamplingParams(max_tokens=n, temperature=0))[0].outputs[0].text


# ---- the openai SDK on every endpoint -----------------------------------------------------

def test_models_list_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].object == "model" and models[0].owned_by == "tuili"


def test_completion_greedy_equals_llm_generate(client, llm):
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == MODEL
    (choice,) = r.choices
    assert choice.text == greedy(llm, prompt, 12)
    assert choice.finish_reason == "length" and choice.index == 0
    assert r.usage.prompt_tokens == len(llm.tokenizer.encode(prompt))
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_completion_prompt_forms_and_n(client, llm):
    texts = ["12 + 35 = ", "List three colours:\n1."]
    ids = [llm.tokenizer.encode(t) for t in texts]
    expected = [greedy(llm, t, 6) for t in texts]
    for prompt in (texts, ids):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
        assert [c.index for c in r.choices] == [0, 1]
        assert [c.text for c in r.choices] == expected
    r = client.completions.create(model=MODEL, prompt=ids[0], max_tokens=6, temperature=0)
    assert r.choices[0].text == expected[0]
    # n samples per prompt: indexes prompt * n + sample; a seed makes them repeatable
    kw = dict(model=MODEL, prompt=texts, max_tokens=8, temperature=1.0, n=2, seed=7)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2, 3]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # the samples differ
    assert 4 <= a.usage.completion_tokens <= 4 * 8
    assert a.usage.prompt_tokens == sum(len(i) for i in ids)


def test_completion_echo_logprobs_and_stop(client, llm):
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0,
                                  echo=True, logprobs=2)
    (c,) = r.choices
    n_prompt = len(llm.tokenizer.encode(prompt))
    assert c.text == prompt + greedy(llm, prompt, 5)
    lp = c.logprobs
    assert len(lp.tokens) == n_prompt + 5 == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:])
    assert "".join(lp.tokens) == c.text
    offline = llm.generate(prompt, SamplingParams(max_tokens=5, temperature=0, logprobs=2))
    assert lp.token_logprobs[n_prompt:] == pytest.approx(
        [x.logprob for x in offline[0].outputs[0].logprobs], abs=1e-4)
    full = greedy(llm, prompt, 12)
    stop = full.split()[1]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                  stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_completion_stream_with_usage(client, llm, server):
    prompt = "Once upon a time"
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=16,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == greedy(llm, prompt, 16)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    with httpx.stream("POST", f"{server.url}/v1/completions",
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": prompt, "max_tokens": 4, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_chat_greedy_equals_llm_chat(client, llm):
    messages = [{"role": "system", "content": "You are a terse assistant."},
                {"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                       max_completion_tokens=20)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    (c,) = r.choices
    offline = llm.chat(messages, SamplingParams(max_tokens=20, temperature=0))[0]
    assert c.message.content == offline.outputs[0].text and "Paris" in c.message.content
    assert c.message.role == "assistant" and c.message.refusal is None
    assert c.finish_reason == offline.outputs[0].finish_reason
    assert r.usage.prompt_tokens == len(llm.render_chat(messages))
    assert r.usage.completion_tokens == len(offline.outputs[0].token_ids)
    # max_tokens (the older name) works the same; content parts join to the same text
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
             for m in messages]
    r2 = client.chat.completions.create(model=MODEL, messages=parts, temperature=0, max_tokens=20)
    assert r2.choices[0].message.content == c.message.content


def test_chat_roles_tools_n_and_seed(client, llm):
    messages = [{"role": "user", "content": "What's the weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
                {"role": "user", "content": "So, is it warm?"}]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    kw = dict(model=MODEL, messages=messages, tools=tools, max_tokens=8, temperature=0.9,
              n=2, seed=3)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.prompt_tokens == len(llm.render_chat(messages, tools=tools))
    assert a.usage.completion_tokens <= 16


def test_stream_n_samples_each_end_once(client):
    # seeded samples that stop at different steps: the early one must end just once
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=16,
              temperature=1.0, n=2, seed=0, stop=[".", "!"])
    whole = client.chat.completions.create(**kw)
    assert len({len(c.message.content) for c in whole.choices}) == 2  # the case under test
    texts, ends = ["", ""], [[], []]
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                ends[c.index].append(c.finish_reason)
    assert texts == [c.message.content for c in whole.choices]
    assert ends == [[c.finish_reason] for c in whole.choices]


def test_chat_stream_with_logprobs_and_usage(client, llm):
    messages = [{"role": "user", "content": "Name three rivers."}]
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=12, stream=True,
        logprobs=True, top_logprobs=2, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    offline = llm.chat(messages, SamplingParams(max_tokens=12, temperature=0, logprobs=2))[0]
    assert content == offline.outputs[0].text
    lps = [e for c in chunks if c.choices and c.choices[0].logprobs
           for e in c.choices[0].logprobs.content]
    assert len(lps) == 12 == chunks[-1].usage.completion_tokens
    assert [e.logprob for e in lps] == pytest.approx(
        [x.logprob for x in offline.outputs[0].logprobs], abs=1e-4)
    assert all(len(e.top_logprobs) == 2 and e.bytes == list(e.token.encode()) for e in lps)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_vllm_sampling_extras(client, llm):
    prompt = "The capital of France is"
    expected = greedy(llm, prompt, 10)
    for extra in ({"top_k": 1}, {"min_p": 1.0}):  # each leaves only the top token
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=1.0,
                                      extra_body=extra)
        assert r.choices[0].text == expected, extra
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0,
                                  extra_body={"ignore_eos": True, "repetition_penalty": 1.3})
    assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"
    first = llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0))[0].outputs[0] \
        .token_ids[0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                                  extra_body={"stop_token_ids": [first]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=30, temperature=0,
                                       extra_body={"min_tokens": 30})
    assert r.usage.completion_tokens == 30


def test_tokenize_detokenize_and_info(http, llm):
    text = "Hello, 世界 🍕"
    r = http.post("/tokenize", json={"prompt": text}).json()
    assert r["tokens"] == llm.tokenizer.encode(text) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 1024
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == text
    messages = [{"role": "user", "content": "Hi"}]
    r = http.post("/tokenize", json={"messages": messages}).json()
    assert r["tokens"] == llm.render_chat(messages)
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == llm.tokenizer.eos_token
    assert info["chat_template"] == llm.tokenizer.chat_template
    assert http.get("/version").json()["version"]
    assert http.get("/health").status_code == 200
    page = httpx.get(http.base_url.join("/"))  # the chat page, open without a key
    assert page.status_code == 200 and "/v1/chat/completions" in page.text


def test_bench_serve_reports_latencies_and_goodput(server, tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "tuili", "bench", "serve", "--base-url", server.url,
                        "--api-key", KEY, "--num-prompts", "4", "--input-len", "8",
                        "--output-len", "6", "--ignore-eos", "--request-rate", "20",
                        "--max-concurrency", "2",
                        "--burstiness", "0.5", "--slo-ttft-ms", "60000", "--json", str(out)],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert "completed 4, failed 0" in r.stdout and "TTFT" in r.stdout and "goodput" in r.stdout
    s = json.loads(out.read_text())
    assert s["output_tokens"] == 24 and s["goodput"] > 0 and s["config"]["model"] == MODEL
    assert 0 < s["ttft_ms"]["p50"] <= s["e2e_ms"]["p99"] and s["itl_ms"]["mean"] > 0


# ---- errors over raw HTTP ---------------------------------------------------------------

def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_malformed_json_is_400(http):
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        e = error_of(http.post("/v1/completions", content=raw,
                               headers={"Content-Type": "application/json"}), 400)
        assert "JSON" in e["message"]


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, "stream"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 7}]},
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]},
     "messages[0].role"),
    ("/v1/chat/completions", {"messages": "hello"}, "messages"),
])
def test_wrong_types_are_400_naming_the_parameter(http, path, body, param):
    e = error_of(http.post(path, json=body), 400)
    assert e["param"] == param and e["message"].startswith(param)


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}, "logprobs"),
    ("/v1/completions", {"prompt": [5, 10**7]}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 30}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
])
def test_out_of_range_values_are_400_naming_the_parameter(http, path, body, param):
    e = error_of(http.post(path, json=body), 400)
    assert e["param"] == param and param in e["message"]


def test_too_long_prompt_is_400_with_both_numbers(http):
    prompt = [100] * 1500
    e = error_of(http.post("/v1/completions", json={"prompt": prompt}), 400)
    assert "1500" in e["message"] and "1024" in e["message"] and e["param"] == "prompt"
    e = error_of(http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2000}), 400)
    assert "2000" in e["message"] and "1024" in e["message"] and e["param"] == "max_tokens"
    long_chat = [{"role": "user", "content": "word " * 1200}]
    e = error_of(http.post("/v1/chat/completions", json={"messages": long_chat}), 400)
    assert "1024" in e["message"] and re.search(r"has \d{4} tokens", e["message"])


def test_unknown_model_is_404(http, client):
    e = error_of(http.post("/v1/completions", json={"model": "gpt-9", "prompt": "hi"}), 404)
    assert e["param"] == "model" and "gpt-9" in e["message"] and e["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    error_of(http.get("/v1/no-such-route"), 404)


def test_missing_or_wrong_api_key_is_401(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi"}, headers=headers)
        assert error_of(r, 401)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(f"{server.url}/health").status_code == 200  # open without a key


# ---- load, disconnects, metrics --------------------------------------------------------

LONG = {"prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True, "stream": True}


def test_disconnect_aborts_and_frees_blocks_and_metrics_move(server, http):
    before = metrics(server)
    s = Streamer(server, LONG)
    s.start()
    wait_for(lambda: s.chunks >= 3)
    m = metrics(server)
    assert m["tuili:num_requests_running"] == 1 and m["tuili:kv_cache_usage_perc"] > 0
    s.stop_now.set()
    s.join(30)
    wait_for(lambda: metrics(server)["tuili:num_requests_running"] == 0, timeout=10)
    after = metrics(server)
    assert after["tuili:kv_cache_usage_perc"] == 0
    generated = after["tuili:generation_tokens_total"] - before["tuili:generation_tokens_total"]
    assert 0 < generated < 900
    # a non-streaming request whose client gives up once it runs is aborted too
    body = json.dumps({**LONG, "stream": False}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: "
                     b"application/json\r\nAuthorization: Bearer " + KEY.encode() +
                     b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_for(lambda: metrics(server)["tuili:num_requests_running"] == 1)
    wait_for(lambda: metrics(server)["tuili:num_requests_running"] == 0, timeout=10)
    assert metrics(server)["tuili:kv_cache_usage_perc"] == 0
    # a finished request moves the counters and histograms
    before = metrics(server)
    http.post("/v1/completions", json={"prompt": [100, 200, 300], "max_tokens": 5,
                                       "ignore_eos": True})
    after = metrics(server)
    for name, delta in (("tuili:generation_tokens_total", 5),
                        ("tuili:prompt_tokens_total", 3),
                        ("tuili:time_to_first_token_seconds_count", 1),
                        ("tuili:e2e_request_latency_seconds_count", 1),
                        ("tuili:time_per_output_token_seconds_count", 1),
                        ("tuili:inter_token_latency_seconds_count", 4),
                        ("tuili:prefix_cache_queries_total", 3)):
        assert after[name] - before[name] == delta, name
    assert after['tuili:request_success_total{finished_reason="length"}'] > 0
    assert "tuili:num_preemptions_total" in after and "tuili:prefix_cache_hits_total" in after
    # --profile: each phase's achieved bandwidth and FLOP rate against the device's ceilings
    assert after["tuili:profile_decode_steps"] > before["tuili:profile_decode_steps"]
    assert 0 < after["tuili:profile_decode_mbu"] < 1 and 0 < after["tuili:profile_prefill_mfu"] < 1


def test_full_queue_is_503_with_retry_after_and_others_unharmed(server, http):
    running = [Streamer(server, LONG) for _ in range(2)]  # --max-num-seqs 2
    for s in running:
        s.start()
    wait_for(lambda: all(s.chunks >= 1 for s in running))
    waiting = [Streamer(server, LONG) for _ in range(4)]  # --max-waiting 4
    for s in waiting:
        s.start()
    wait_for(lambda: metrics(server)["tuili:num_requests_waiting"] == 4)
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert error_of(r, 503)["code"] == "queue_full" and int(r.headers["Retry-After"]) >= 1
    # a bad request now is a 400 and leaves the running streams going
    error_of(http.post("/v1/completions", json={"prompt": "hi", "top_p": 5}), 400)
    n = [s.chunks for s in running]
    wait_for(lambda: all(s.chunks > c for s, c in zip(running, n)))
    for s in running + waiting:
        s.stop_now.set()
    for s in running:
        s.join(30)
    # the waiting ones get their first token once slots free up, then drop too
    for s in waiting:
        s.join(60)
    wait_for(lambda: metrics(server)["tuili:num_requests_running"] == 0
             and metrics(server)["tuili:num_requests_waiting"] == 0, timeout=20)
    assert metrics(server)["tuili:kv_cache_usage_perc"] == 0
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200


def test_sigterm_drains_then_ends_what_outlives_the_drain_timeout(tmp_path):
    s = Server(tmp_path, "--drain-timeout", "8", "--num-kv-blocks", "128", "--max-num-seqs", "3",
               "--engine-process")
    try:
        short = Streamer(s, {**LONG, "max_tokens": 6})  # done well inside the drain
        long = Streamer(s, LONG)  # 900 tokens: outlives it
        waiting: dict = {}

        def non_streaming() -> None:
            waiting["r"] = httpx.post(f"{s.url}/v1/completions", json={**LONG, "stream": False},
                                      timeout=60)

        t = threading.Thread(target=non_streaming)
        for x in (short, long, t):
            x.start()
        wait_for(lambda: short.chunks >= 2 and long.chunks >= 2)
        signalled = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: not accepts_connections(s), timeout=10)  # stops accepting
        for x in (short, long, t):
            x.join(60)
        assert short.lines[-1] == "data: [DONE]"
        assert json.loads(short.lines[-2][6:])["choices"][0]["finish_reason"] == "length"
        # the drain timeout ends the long stream: an error event, then [DONE]
        assert long.lines[-1] == "data: [DONE]"
        error = json.loads(long.lines[-2][6:])["error"]
        assert error["code"] == "shutting_down" and error["type"] == "server_error"
        assert "drain timeout" in error["message"]
        assert time.monotonic() - signalled < 8 + 4  # ended by the server, not uvicorn's backstop
        assert error_of(waiting["r"], 503)["code"] == "shutting_down"
        assert s.proc.wait(30) == 0  # a drained SIGTERM is a clean exit
        log = s.log()
        assert "draining" in log and "Application shutdown complete" in log
    finally:
        s.stop()


def test_pooling_endpoints_on_a_generation_model_say_its_task(http):
    for path, body in (("/v1/embeddings", {"input": "Hi"}),
                       ("/v1/rerank", {"query": "q", "documents": ["d"]}),
                       ("/v1/score", {"text_1": "q", "text_2": "d"})):
        err = error_of(http.post(path, json=body), 400)
        assert err["code"] == "wrong_task" and "task=generate" in err["message"], err


def test_a_dead_engine_process_fails_its_streams_and_turns_health_503(server, http):
    """Last in this module: it kills the module's server's engine."""
    s = Streamer(server, LONG)
    s.start()
    wait_for(lambda: s.chunks >= 2)
    pid = int(re.search(r"engine process (\d+)", server.log()).group(1))
    os.kill(pid, signal.SIGKILL)
    s.join(30)
    assert s.lines[-1] == "data: [DONE]"
    error = json.loads(s.lines[-2][6:])["error"]
    assert error["code"] == "engine_dead" and error["type"] == "server_error", error
    assert http.get("/health").status_code == 503
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert error_of(r, 503)["code"] == "engine_dead"
    assert server.proc.poll() is None  # the HTTP side still answers
