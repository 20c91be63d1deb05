"""Generated bodies on every endpoint of a real `tuili serve` (hypothesis), and a bounded load:
64 streams, random disconnects, garbage in between. Never a 5xx, every error OpenAI-shaped,
no request lost, and the KV cache back to idle after."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

httpx = pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.server_process import Server, metrics, wait_for  # noqa: E402
from tuili.server.protocol import (ChatCompletionRequest, CompletionRequest,  # noqa: E402
                                   DetokenizeRequest, TokenizeRequest)

# A 64-token context keeps every generated completion short.
FLAGS = ["--dtype", "float32", "--num-threads", "1", "--max-model-len", "64",
         "--num-kv-blocks", "256", "--max-n", "2", "--max-prompts", "4", "--max-waiting", "512"]
EXAMPLES = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("fuzz"), *FLAGS)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


# ---- values at the edges of what each field takes -----------------------------------------

INTS = st.sampled_from([-2**64, -2**63 - 1, -1, 0, 1, 2, 3, 20, 21, 49151, 49152, 2**31,
                        2**63, 2**64, 10**30]) | st.integers(-3, 70)
FLOATS = st.sampled_from([-1e308, -2.5, -0.0, 1e-300, 0.01, 0.5, 1.0, 2.0, 100.0, 1e308]) \
    | st.floats(allow_nan=False, allow_infinity=False)
EDGE_TEXTS = ["", "hi", "The capital of France is", "<|im_start|>", "<|endoftext|>", "\ud800",
              "a\udfffb", "\ud83d", "a\x00b", "\x04" * 5, "\U0001f600" * 3, "x" * 300]
TEXTS = st.sampled_from(EDGE_TEXTS) | st.text(max_size=12)
ANY = st.recursive(st.none() | st.booleans() | INTS | FLOATS | TEXTS,
                   lambda inner: st.lists(inner, max_size=3)
                   | st.dictionaries(TEXTS, inner, max_size=3), max_leaves=6)
IDS = st.lists(INTS | st.integers(0, 49151), max_size=6)
ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool", "robot"])
PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": TEXTS})
MESSAGE = st.fixed_dictionaries({"role": ROLES, "content": TEXTS | st.lists(PART, max_size=2)
                                 | ANY})
# lengths and counts: mostly small, so that what is valid finishes fast, and some past the ends
SHORT = st.integers(-2, 6) | st.sampled_from([63, 64, 65, 2**63, 10**30]) | INTS
VALID_MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]),
                                                  "content": TEXTS}), min_size=1, max_size=2)

FIELDS = {
    "prompt": TEXTS | st.lists(TEXTS, max_size=3) | IDS | st.lists(IDS, max_size=3),
    "messages": st.lists(MESSAGE, max_size=3) | VALID_MESSAGES,
    "tokens": IDS,
    "max_tokens": SHORT, "max_completion_tokens": SHORT, "min_tokens": SHORT,
    "n": SHORT, "best_of": SHORT, "logprobs": st.booleans() | SHORT, "top_logprobs": SHORT,
    "top_k": INTS, "seed": INTS, "stop_token_ids": IDS,
    "temperature": FLOATS, "top_p": FLOATS, "min_p": FLOATS, "repetition_penalty": FLOATS,
    "presence_penalty": FLOATS, "frequency_penalty": FLOATS,
    "stop": TEXTS | st.lists(TEXTS, max_size=3),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}
BOOLS = {"stream", "echo", "ignore_eos", "skip_special_tokens", "include_stop_str_in_output",
         "add_special_tokens", "add_generation_prompt", "continue_final_message",
         "return_token_strs"}


def typed(name: str) -> st.SearchStrategy:
    return FIELDS.get(name, st.booleans() if name in BOOLS else ANY)


def bodies(model) -> st.SearchStrategy[dict]:
    """Dicts of the model's own fields, each value near the edges of its type or anything."""
    return st.fixed_dictionaries({}, optional={name: typed(name) | ANY
                                               for name in model.model_fields})


def near_valid(model, base: dict) -> st.SearchStrategy[dict]:
    """`base` (its values drawn) with up to two more of the model's fields at their edges."""
    names = st.lists(st.sampled_from(sorted(model.model_fields)), max_size=2, unique=True)
    edits = names.flatmap(lambda ns: st.fixed_dictionaries({n: typed(n) for n in ns}))
    return st.tuples(st.fixed_dictionaries(base), edits).map(lambda b_e: {**b_e[0], **b_e[1]})


def check_answer(r: httpx.Response, stream: bool) -> None:
    hypothesis.event(f"status {r.status_code}")
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str) and (error["param"] is None
                                                   or isinstance(error["param"], str))
        return
    if stream and r.headers["content-type"].startswith("text/event-stream"):
        lines = [ln for ln in r.text.split("\n") if ln]
        assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)
        for ln in lines[:-1]:
            assert "error" not in json.loads(ln[6:]), ln  # bad input is refused before the 200
    else:
        r.json()


def post(http, path: str, body: dict) -> None:
    raw = json.dumps(body)  # surrogates go out escaped, as JSON allows
    r = http.post(path, content=raw, headers={"Content-Type": "application/json"})
    check_answer(r, body.get("stream") is True)


@EXAMPLES
@given(body=bodies(CompletionRequest)
       | near_valid(CompletionRequest, {"prompt": FIELDS["prompt"], "max_tokens": SHORT}))
def test_completions_never_5xx(http, body):
    post(http, "/v1/completions", body)


@EXAMPLES
@given(body=bodies(ChatCompletionRequest)
       | near_valid(ChatCompletionRequest, {"messages": FIELDS["messages"], "max_tokens": SHORT}))
def test_chat_completions_never_5xx(http, body):
    post(http, "/v1/chat/completions", body)


@settings(EXAMPLES, max_examples=40)
@given(path=st.sampled_from(["/tokenize", "/detokenize"]), data=st.data())
def test_tokenizer_endpoints_never_5xx(http, path, data):
    model = TokenizeRequest if path == "/tokenize" else DetokenizeRequest
    post(http, path, data.draw(bodies(model)))


@settings(EXAMPLES, max_examples=40)
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
       path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize",
                             "/detokenize", "/v1/models", "/health", "/version", "/metrics",
                             "/tokenizer_info", "/v1/nothing"]),
       raw=st.binary(max_size=40) | ANY.map(lambda v: json.dumps(v).encode()))
def test_any_method_path_and_bytes_never_5xx(http, method, path, raw):
    r = http.request(method, path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code < 500 or (path == "/health" and r.status_code == 503), r.text[:300]
    if r.status_code >= 400 and path != "/health":
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


# ---- load ---------------------------------------------------------------------------------

GARBAGE = [
    (b"{not json", 400), (b"[" * 5000 + b"]" * 5000, 400), (b'{"prompt": "a\\ud800"}', 400),
    (b'{"prompt": "hi", "n": 100000}', 400), (b'{"prompt": "hi", "temperature": 1e400}', 400),
    (b'{"prompt": "hi", "seed": 1180591620717411303424}', 400), (b'{"prompt": 5}', 400),
    (b'{"prompt": "hi", "max_tokens": 1000}', 400), (b'{"model": "gpt-9", "prompt": "x"}', 404),
]


async def one_stream(c: httpx.AsyncClient, rnd: random.Random) -> dict:
    n = rnd.choice([1, 1, 2])
    body = {"max_tokens": rnd.randint(4, 16), "n": n, "stream": True,
            "ignore_eos": rnd.random() < 0.5}
    if rnd.random() < 0.5:
        path, body["prompt"] = "/v1/completions", rnd.choice(["Once upon a time", "1, 2, 3,"])
    else:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": "Hi!"}]
    drop_after = rnd.choice([None, None, None, 1, 3])  # a quarter of the clients leave early
    await asyncio.sleep(rnd.random() * 0.5)
    async with c.stream("POST", path, json=body) as r:
        lines = []
        async for line in r.aiter_lines():
            if line:
                lines.append(line)
            if drop_after and len(lines) >= drop_after:
                return {"kind": "dropped", "status": r.status_code, "lines": lines}
        return {"kind": "done", "status": r.status_code, "lines": lines, "n": n}


async def one_garbage(c: httpx.AsyncClient, rnd: random.Random) -> dict:
    raw, status = rnd.choice(GARBAGE)
    await asyncio.sleep(rnd.random() * 0.5)
    r = await c.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    return {"kind": "garbage", "status": r.status_code, "want": status, "body": r.json()}


async def load(url: str) -> list[dict]:
    rnd = random.Random(20)
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=180, limits=limits) as c:
        work = [one_stream(c, random.Random(rnd.random())) for _ in range(64)]
        work += [one_garbage(c, random.Random(rnd.random())) for _ in range(32)]
        rnd.shuffle(work)
        return await asyncio.gather(*work)


def test_load_of_streams_disconnects_and_garbage_loses_nothing(server, http):
    results = asyncio.run(load(server.url))
    assert all(x["status"] < 500 for x in results), [x for x in results if x["status"] >= 500]
    for x in results:
        if x["kind"] == "garbage":
            assert x["status"] == x["want"] and set(x["body"]["error"]) == {
                "message", "type", "param", "code"}, x
            continue
        assert x["status"] == 200 and all(ln.startswith("data: ") for ln in x["lines"]), x
        if x["kind"] == "done":  # complete: [DONE] last, each choice finished exactly once
            assert x["lines"][-1] == "data: [DONE]", x["lines"][-3:]
            events = [json.loads(ln[6:]) for ln in x["lines"][:-1]]
            assert not [e for e in events if "error" in e]
            ends = sorted(c["index"] for e in events for c in e["choices"] if c["finish_reason"])
            assert ends == list(range(x["n"])), ends
    done = sum(x["kind"] == "done" for x in results)
    dropped = sum(x["kind"] == "dropped" for x in results)
    assert done + dropped == 64 and dropped > 0
    wait_for(lambda: metrics(server)["tuili:num_requests_running"] == 0
             and metrics(server)["tuili:num_requests_waiting"] == 0, timeout=30)
    assert metrics(server)["tuili:kv_cache_usage_perc"] == 0
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
