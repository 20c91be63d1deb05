"""A hostile client against a real `tuili serve` on SmolLM2: deep JSON, broken Unicode, huge n,
non-finite numbers, megabyte prompts, every request limit, a queue counted in sequences and
tokens. Each answer is a 4xx naming what is wrong; the server keeps serving."""

from __future__ import annotations

import json
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")

from tests.server_process import (Server, StandInLLM, Streamer, metrics,  # noqa: E402
                                  wait_for)

# The default context (8192: 600 KB of text is tokenized, 1 MB is refused by its bytes); one
# sequence runs at a time and four may wait, with 600 prompt tokens among them.
FLAGS = ["--dtype", "float32", "--num-threads", "1", "--max-model-len", "8192",
         "--num-kv-blocks", "512",
         "--max-num-seqs", "1", "--max-waiting", "4", "--max-waiting-tokens", "600",
         "--max-n", "4"]
JSON = {"Content-Type": "application/json"}
LONG = {"prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True, "stream": True}
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("hardening"), *FLAGS)
    yield s
    s.stop()


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text[:500]
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_deep_nesting_is_400_not_a_recursion_error(http):
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000):
        e = error_of(http.post("/v1/completions", content=raw, headers=JSON), 400)
        assert e["type"] == "invalid_request_error" and "64 deep" in e["message"]
    # under the parser's own limit but over --max-json-depth: the field is named
    deep = {"messages": user("hi"), "tools": [{"type": "function", "function": {
        "name": "f", "parameters": (nest := {"type": "object"})}}]}
    for _ in range(70):
        nest["items"] = nest = {}
    e = error_of(http.post(CHAT, json=deep), 400)
    assert e["param"] == "tools" and "tools[0].function.parameters" in e["message"]


@pytest.mark.parametrize("path,raw,param", [
    ("/v1/completions", rb'{"prompt": "a\ud800b"}', "prompt"),
    ("/v1/completions", b'{"prompt": "a\xed\xa0\x80b"}', "prompt"),  # the surrogate's bytes
    ("/v1/completions", rb'{"prompt": ["ok", "a\udfff"]}', "prompt[1]"),
    ("/v1/completions", rb'{"prompt": "hi", "stop": ["\ud83d"]}', "stop[0]"),
    (CHAT, rb'{"messages": [{"role": "user", "content": "x\ud800"}]}', "messages[0].content"),
    (CHAT, rb'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]}',
     "messages[0].content[0].text"),
    ("/tokenize", rb'{"prompt": "\ud800"}', "prompt"),
])
def test_lone_surrogates_are_400_naming_the_field(http, path, raw, param):
    e = error_of(http.post(path, content=raw, headers=JSON), 400)
    assert e["param"] == param and "surrogate" in e["message"]


@pytest.mark.parametrize("path,body,param,says", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "n": 100_000}, "n", "at most 4"),
    ("/v1/completions", {"prompt": "hi", "n": 2, "best_of": 9}, "best_of", "at most 4"),
    (CHAT, {"messages": user("hi"), "n": 5}, "n", "--max-n"),
    # 1e400 is valid JSON that reads as infinity
    ("/v1/completions", b'{"prompt": "hi", "temperature": 1e400}', "temperature", "finite"),
    ("/v1/completions", b'{"prompt": "hi", "top_p": -1e400}', "top_p", "finite"),
    ("/v1/completions", {"prompt": "hi", "seed": 2**70}, "seed", "64-bit"),
    ("/v1/completions", {"prompt": "hi", "seed": -2**63 - 1}, "seed", "64-bit"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs", "[0, 20]"),
    (CHAT, {"messages": user("hi"), "logprobs": True, "top_logprobs": 21}, "top_logprobs",
     "[0, 20]"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a"] * 17}, "stop", "at most 16"),
    ("/v1/completions", {"prompt": "hi", "stop": "x" * 257}, "stop", "at most 256"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [1] * 17}, "stop_token_ids",
     "at most 16"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [10**6], "min_tokens": 2},
     "stop_token_ids", "[0, 49152)"),
    ("/v1/completions", {"prompt": ["hi"] * 65}, "prompt", "at most 64"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**30}, "max_tokens", "8192"),
    (CHAT, {"messages": user("hi"), "min_tokens": 9000}, "min_tokens", "8192"),
    (CHAT, {"messages": user("hi"), "chat_template_kwargs": {"messages": []}},
     "chat_template_kwargs", "messages"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 1e-300}, "repetition_penalty",
     "[0.01, 100]"),
])
def test_every_limit_is_400_naming_the_parameter_and_its_range(http, path, body, param, says):
    sent = dict(content=body, headers=JSON) if isinstance(body, bytes) else dict(json=body)
    e = error_of(http.post(path, **sent), 400)
    assert e["param"] == param and param in e["message"] and says in e["message"], e


def test_non_json_numbers_and_oversized_bodies(http):
    e = error_of(http.post("/v1/completions", content=b'{"prompt": "hi", "temperature": NaN}',
                           headers=JSON), 400)
    assert e["code"] == "invalid_json" and "NaN" in e["message"]
    digits = b'{"prompt": "hi", "seed": ' + b"9" * 5000 + b"}"
    assert error_of(http.post("/v1/completions", content=digits, headers=JSON),
                    400)["code"] == "invalid_json"
    big = b'{"prompt": "' + b"a" * (4 * 2**20) + b'"}'  # just over --max-body-bytes' 4 MiB
    e = error_of(http.post("/v1/completions", content=big, headers=JSON), 413)
    assert e["code"] == "request_too_large" and str(4 * 2**20) in e["message"]


def test_edge_values_that_are_valid_work(http):
    greedy = http.post("/v1/completions", json={"prompt": "The capital of France is",
                                                "max_tokens": 6, "temperature": 0}).json()
    # a vanishing temperature is near-greedy (raised to 0.01), not a NaN draw
    tiny = http.post("/v1/completions", json={"prompt": "The capital of France is",
                                              "max_tokens": 6, "temperature": 1e-300,
                                              "seed": 2**63 - 1}).json()
    assert tiny["choices"][0]["text"] == greedy["choices"][0]["text"]
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "seed": -2**63})
    assert r.status_code == 200


def test_a_megabyte_prompt_is_refused_by_its_bytes_before_tokenizing(http):
    text = "lorem ipsum " * 90_000  # 1 MB; no SmolLM2 token covers more than 81 bytes
    for path, body, param in (("/v1/completions", {"prompt": text}, "prompt"),
                              (CHAT, {"messages": user(text)}, "messages")):
        start = time.perf_counter()
        e = error_of(http.post(path, json=body), 400)
        assert e["param"] == param and "at least" in e["message"] and "8192" in e["message"]
        assert time.perf_counter() - start < 2.0  # tokenizing it alone takes about a second


def test_tokenizing_long_prompts_leaves_the_event_loop_free(server):
    # 600 KB: under the byte bound, so tokenized in full; encoded once here, so that the
    # senders hold this process's GIL as little as the server's loop may be held
    body = json.dumps({"prompt": "hello world " * 50_000}).encode()
    took, answers = [], []

    def send() -> None:
        start = time.perf_counter()
        answers.append(httpx.post(f"{server.url}/v1/completions", content=body, headers=JSON,
                                  timeout=120))
        took.append(time.perf_counter() - start)

    senders = [threading.Thread(target=send) for _ in range(4)]
    for t in senders:
        t.start()
    health = []  # /health answers from the event loop alone
    with httpx.Client(base_url=server.url, timeout=30) as c:
        while any(t.is_alive() for t in senders):
            start = time.perf_counter()
            assert c.get("/health").status_code == 200
            health.append(time.perf_counter() - start)
            time.sleep(0.02)
    for r in answers:  # tokenized to the end: the exact count
        assert "has 100001 tokens" in error_of(r, 400)["message"]
    # four prompts kept the tokenizer busy this long; a blocked loop would have stalled /health
    # once per prompt for as long as its tokenizing took (~0.3 s each). One slow probe is allowed:
    # on a loaded 2-core machine the scheduler alone can delay one answer
    assert max(took) > 0.5, took
    assert sorted(health)[-2] < 0.25, (sorted(health)[-4:], took)


def test_admission_counts_sequences_and_prompt_tokens(server, http):
    running = Streamer(server, LONG)  # --max-num-seqs 1: everything else waits
    running.start()
    wait_for(lambda: running.chunks >= 1)
    three = Streamer(server, {**LONG, "n": 3, "max_tokens": 4})
    three.start()
    wait_for(lambda: metrics(server)["tuili:num_requests_waiting"] == 3)
    # one request, but two more sequences do not fit in --max-waiting 4
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "n": 2})
    e = error_of(r, 503)
    assert e["code"] == "queue_full" and "sequences" in e["message"] and r.headers["Retry-After"]
    # a request that could never fit is the client's to split: 400
    e = error_of(http.post("/v1/completions", json={"prompt": ["a", "b"], "n": 3}), 400)
    assert e["param"] == "n" and "6 sequences" in e["message"]
    # the fourth sequence fits, but not with 598 prompt tokens beside the waiting ones
    e = error_of(http.post("/v1/completions", json={"prompt": [100] * 598, "max_tokens": 2}), 503)
    assert "prompt tokens" in e["message"] and "--max-waiting-tokens 600" in e["message"]
    e = error_of(http.post("/v1/completions", json={"prompt": [100] * 700, "max_tokens": 2}), 400)
    assert e["param"] == "prompt" and "700 prompt tokens" in e["message"]
    running.stop_now.set()
    running.join(30)
    three.join(60)  # runs once the slot frees
    assert three.lines[-1] == "data: [DONE]" and three.status == 200
    wait_for(lambda: metrics(server)["tuili:num_requests_running"] == 0
             and metrics(server)["tuili:num_requests_waiting"] == 0, timeout=20)
    assert metrics(server)["tuili:kv_cache_usage_perc"] == 0
    r = http.post("/v1/completions", json={"prompt": [100] * 598, "max_tokens": 2})
    assert r.status_code == 200  # with the queue empty it fits


# ---- our own faults: a 500 (or a stream's error event) that the log ties to a request id -----
# No input makes the real server fail (that is the point of the tests above), so these run the
# app in-process on a stand-in for AsyncLLM whose tokenizing or stream has a bug.

class _BuggyLLM(StandInLLM):
    """tokenize() or the stream raises like a bug."""

    def __init__(self, fail_in: str):
        super().__init__()
        self.fail_in = fail_in

    def tokenize(self, prompt, add_special_tokens: bool = True) -> list[int]:
        if self.fail_in == "tokenize":
            raise ZeroDivisionError("a bug")
        return [1, 2, 3]

    def generate(self, *args, **kwargs):
        return _BrokenStream()


class _BrokenStream:
    """A RequestStream with an output delivered and a bug in taking it."""
    done = False

    def __init__(self):
        import asyncio

        from tuili.async_llm import Inbox

        self.inbox = Inbox(asyncio.get_running_loop())
        self.inbox.items.append(None)

    def take(self):
        raise KeyError("a bug")

    def close(self) -> None:
        pass


def _ask(fail_in: str, path: str, body: dict, caplog) -> tuple:
    import asyncio
    import logging

    from tuili.server.app import build_app
    from tuili.server.serving import ServerState

    app = build_app(ServerState(_BuggyLLM(fail_in), "stub", max_waiting=10))
    log = logging.getLogger("tuili")
    log.addHandler(caplog.handler)  # tuili's logger does not propagate to the root

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://stub") as c:
            return await c.post(path, json=body, headers={"X-Request-Id": "req-42"})
    try:
        r = asyncio.run(go())
    finally:
        log.removeHandler(caplog.handler)
    return r, [rec for rec in caplog.records if rec.levelname == "ERROR"]


def test_a_fault_of_ours_is_a_500_logged_with_its_request_id(caplog):
    r, logged = _ask("tokenize", "/v1/completions", {"prompt": "hi"}, caplog)
    e = error_of(r, 500)
    assert e["type"] == "server_error" and "req-42" in e["message"]
    assert r.headers["x-request-id"] == "req-42"
    assert any("req-42" in rec.getMessage() and rec.exc_info[0] is ZeroDivisionError
               for rec in logged)


def test_a_fault_mid_stream_is_an_error_event_logged_with_its_request_id(caplog):
    r, logged = _ask("stream", "/v1/completions", {"prompt": "hi", "stream": True}, caplog)
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"
    lines = [ln for ln in r.text.split("\n") if ln]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])["error"]
    assert error["type"] == "server_error" and "req-42" in error["message"]
    assert any("req-42" in rec.getMessage() and rec.exc_info[0] is KeyError for rec in logged)
