"""The server's streaming path in-process, on an engine stand-in that replays scripted outputs
at known engine times: SSE chunks are byte for byte what json.dumps writes for OpenAI's chunk
objects, deltas add up to the text, usage counts, and /metrics' histograms and counters hold
exactly the scripted tokens and intervals. Also the engine process's wire: outputs rebuilt on
the front equal the engine's, each keeping its own length while later ones grow."""

from __future__ import annotations

import asyncio
import json
import pickle
import time

import pytest

httpx = pytest.importorskip("httpx")

from tuili.async_llm import RequestStream  # noqa: E402
from tuili.engine.request import Logprob  # noqa: E402
from tuili.engine_process import Prefix, _Rebuilder, _Wire  # noqa: E402
from tuili.outputs import CompletionOutput, RequestOutput  # noqa: E402

from tests.server_process import StandInLLM  # noqa: E402

WORDS = ["Once", " upon", " a", " time", ",", " there", " wé", "re", " \"quotes\"", "\n"]
# engine times of a request's outputs, after its arrival: ITL 3 ms, 27 ms, 270 ms, 0.9 s, ...
# (none near a bucket's bound, where float rounding would decide)
OFFSETS = [0.5, 0.503, 0.53, 0.8, 1.7, 1.712, 1.747, 1.9, 1.97, 2.003]
FAILS = 63  # a prompt starting with this token id fails in the engine after two outputs
HOLDS = 62  # one starting with this one runs on after two outputs, until aborted


def _tokenizer():
    from tokenizers import Tokenizer as HF, models, pre_tokenizers

    from tuili.models.tokenizer import Tokenizer

    hf = HF(models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w0"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    return Tokenizer(hf, bos_token=None, eos_token=None, chat_template=template)


class _ScriptedLLM(StandInLLM):
    """AsyncLLM's stand-in with the real RequestStreams: each request's samples get WORDS one
    token at a time, delivered on the loop with engine times arrival + OFFSETS."""
    max_model_len, vocab_size = 256, 64

    def __init__(self):
        super().__init__()
        self.tokenizer, self.aborted = _tokenizer(), []

    def tokenize(self, prompt, add_special_tokens: bool = True) -> list[int]:
        return prompt if isinstance(prompt, list) else self.tokenizer.encode(prompt)

    def generate(self, request_id, prompt_ids, params, observe=None) -> RequestStream:
        return RequestStream(self, request_id, prompt_ids, params, observe)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def _queue(self, request_id, prompt_ids, params, inbox) -> None:
        start, n = time.monotonic(), min(params.max_tokens, len(WORDS))
        texts = [""] * params.n
        for k in range(n):
            samples = []
            for i in range(params.n):
                texts[i] += WORDS[k]
                samples.append(CompletionOutput(
                    index=i, text=texts[i], token_ids=list(range(1, k + 2)),
                    finish_reason="length" if k == n - 1 else None, delta_text=WORDS[k],
                    delta_token_ids=[k + 1]))
            out = RequestOutput(request_id, None, prompt_ids, samples, k == n - 1)
            # each output on a later turn of the loop, as the engine's steps come
            inbox.loop.call_later(0.002 * k, inbox.put, (out, start + OFFSETS[k]))
            if prompt_ids[0] in (FAILS, HOLDS) and k == 1:  # two outputs, then fail or hold
                if prompt_ids[0] == FAILS:
                    inbox.loop.call_later(0.002 * k + 0.001, inbox.put, ValueError("broken"))
                break


@pytest.fixture()
def app():
    from tuili.server.app import build_app
    from tuili.server.serving import ServerState

    return build_app(ServerState(_ScriptedLLM(), "m", max_waiting=100))


def _post(app, path: str, body: dict) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.post(path, json=body)
    return asyncio.run(go())


def _metrics(app) -> dict[str, float]:
    text = app.state.tuili.metrics.render().decode()
    return {name: float(v) for name, v in (ln.rsplit(" ", 1) for ln in text.splitlines()
                                          if ln and not ln.startswith("#"))}


def _events(r: httpx.Response) -> list[dict]:
    """The stream's data objects, each checked to be json.dumps' own compact bytes."""
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    lines = [ln for ln in r.text.split("\n\n") if ln]
    assert lines[-1] == "data: [DONE]"
    events = []
    for ln in lines[:-1]:
        assert ln.startswith("data: ")
        data = json.loads(ln[6:])
        assert ln[6:] == json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        events.append(data)
    return events


@pytest.mark.parametrize("n, usage", [(1, False), (1, True), (2, True)])
def test_chat_stream_chunks_are_openai_objects_and_add_up(app, n, usage):
    body = {"messages": [{"role": "user", "content": "w1 w2 w3"}], "max_tokens": 8, "n": n,
            "stream": True, "stream_options": {"include_usage": True} if usage else None}
    events = _events(_post(app, "/v1/chat/completions", body))
    keys = ["id", "object", "created", "model", "system_fingerprint", "choices"]
    assert all(list(e)[:6] == keys and e["object"] == "chat.completion.chunk" for e in events)
    assert all(("usage" in e) == usage for e in events) and len({e["id"] for e in events}) == 1
    role = events[0]["choices"]
    assert [c["delta"] for c in role] == [{"role": "assistant", "content": "", "refusal": None}] * n
    texts, finish = [""] * n, [None] * n
    for e in events[1:-1] if usage else events[1:]:
        for c in e["choices"]:
            assert list(c) == ["index", "delta", "logprobs", "finish_reason"]
            assert c["logprobs"] is None and finish[c["index"]] is None
            texts[c["index"]] += c["delta"].get("content", "")
            finish[c["index"]] = c["finish_reason"]
    assert texts == ["".join(WORDS[:8])] * n and finish == ["length"] * n
    if usage:
        assert events[-1]["choices"] == [] and events[-1]["usage"] == {
            "prompt_tokens": 4, "completion_tokens": 8 * n, "total_tokens": 4 + 8 * n,
            "prompt_tokens_details": {"cached_tokens": 0}}


def test_completion_stream_of_two_prompts_merges_their_chunks(app):
    body = {"prompt": [[1, 2], [3, 4, 5]], "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}}
    events = _events(_post(app, "/v1/completions", body))
    texts = {}
    for e in events[:-1]:
        assert e["object"] == "text_completion" and e["usage"] is None
        for c in e["choices"]:
            assert list(c) == ["index", "text", "logprobs", "finish_reason"]
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert texts == {0: "".join(WORDS[:6]), 1: "".join(WORDS[:6])}
    assert events[-1]["usage"]["prompt_tokens"] == 5
    assert events[-1]["usage"]["completion_tokens"] == 12
    assert app.state.tuili.llm.aborted == []  # closing finished streams aborts nothing


def test_an_engine_error_mid_stream_ends_it_and_aborts_the_other_prompt(app):
    body = {"prompt": [[FAILS, 2], [HOLDS, 4, 5]], "max_tokens": 8, "stream": True}
    events = _events(_post(app, "/v1/completions", body))
    assert events[-1]["error"]["type"] == "server_error"  # the 200 was sent: an error event
    # the prompt still running is aborted (the failed one's abort is AsyncLLM's no-op)
    assert [r[-2:] for r in app.state.tuili.llm.aborted] == ["-0", "-1"]


def test_metrics_count_the_streamed_tokens_and_intervals(app):
    before = _metrics(app)
    _events(_post(app, "/v1/completions", {"prompt": [7, 8, 9], "max_tokens": 10,
                                           "stream": True}))
    m = _metrics(app)
    d = {k: m[k] - before.get(k, 0.0) for k in m}
    assert d["tuili:generation_tokens_total"] == 10 and d["tuili:prompt_tokens_total"] == 3
    assert d['tuili:request_success_total{finished_reason="length"}'] == 1
    itl = "tuili:inter_token_latency_seconds"
    gaps = [b - a for a, b in zip(OFFSETS, OFFSETS[1:])]  # 9 intervals between 10 outputs
    assert d[f"{itl}_count"] == 9 and d[f"{itl}_sum"] == pytest.approx(sum(gaps))
    for le in ("0.001", "0.005", "0.01", "0.02", "0.04", "0.06", "0.08", "0.1", "0.25", "0.5",
               "0.75", "1.0", "2.5", "+Inf"):
        assert d[f'{itl}_bucket{{le="{le}"}}'] == sum(g <= float(le) for g in gaps), le
    ttft = "tuili:time_to_first_token_seconds"  # arrival is taken just before the script
    assert d[f"{ttft}_count"] == 1 and 0.5 <= d[f"{ttft}_sum"] < 0.75
    assert d[f'{ttft}_bucket{{le="0.5"}}'] == 0 and d[f'{ttft}_bucket{{le="0.75"}}'] == 1
    tpot = "tuili:time_per_output_token_seconds"
    assert d[f"{tpot}_count"] == 1
    assert d[f"{tpot}_sum"] == pytest.approx((OFFSETS[-1] - OFFSETS[0]) / 9)
    assert d["tuili:e2e_request_latency_seconds_count"] == 1
    assert "tuili:inter_token_latency_seconds_created" in m


@pytest.mark.parametrize("with_logprobs", [False, True])  # False: the short wire form
def test_rebuilt_outputs_equal_the_engines_and_keep_their_own_length(with_logprobs):
    wire, rebuilder = _Wire(), _Rebuilder()
    lp = [Logprob(k, -0.5 * k, 1, [(k, -0.5 * k), (k + 1, -3.0)]) for k in range(1, 6)]
    texts = ["a", "ab", "abc", "abcd", "ab"]  # the last: a stop string cut the text back
    sent, rebuilt = [], []
    for k in range(5):
        done = k == 4
        out = RequestOutput("r", "p", [1, 2], [CompletionOutput(
            index=0, text=texts[k], token_ids=list(range(1, k + 2)),
            finish_reason="stop" if done else None, stop_reason="cd" if done else None,
            logprobs=lp[:k + 1] if with_logprobs else None,
            delta_text="" if done else texts[k][-1], delta_token_ids=[k + 1])], done,
            num_cached_tokens=16)
        sent.append(out)
        msg = wire.encode(out)
        assert len(msg) == (3 if 0 < k < 4 and not with_logprobs else 6)
        rebuilt.append(rebuilder.rebuild(pickle.loads(pickle.dumps(msg))))
    for a, b in zip(sent, rebuilt):  # compared once all have arrived: none grew after the fact
        (x,), (y,) = a.outputs, b.outputs
        assert (y.text, y.delta_text, y.delta_token_ids) == (x.text, x.delta_text,
                                                             x.delta_token_ids)
        assert isinstance(y.token_ids, Prefix) and y.token_ids == x.token_ids
        assert len(y.token_ids) == len(x.token_ids) and b.num_cached_tokens == 16
        assert (y.logprobs is None) if x.logprobs is None else list(y.logprobs) == x.logprobs
        assert y.token_ids[-1] == x.token_ids[-1] and y.token_ids[1:] == x.token_ids[1:]
        assert (y.finish_reason, y.stop_reason, b.finished) == (x.finish_reason, x.stop_reason,
                                                                a.finished)
    assert rebuilder.streams == {} and wire.sent == {}


def _asgi(app, body: dict, send_waits, disconnect: asyncio.Event | None = None) -> list[dict]:
    """POST /v1/completions straight through ASGI, with a send that awaits send_waits(message)
    first (a client slow to read: the transport paused) and a receive that reports a disconnect
    once `disconnect` is set. Returns the messages sent."""
    sent = []

    async def go():
        data = json.dumps(body).encode()
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/completions",
                 "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json"),
                             (b"content-length", str(len(data)).encode())],
                 "client": ("t", 1), "server": ("t", 80)}
        bodies = [{"type": "http.request", "body": data, "more_body": False}]

        async def receive():
            if bodies:
                return bodies.pop()
            await (disconnect or asyncio.Event()).wait()
            return {"type": "http.disconnect"}

        async def send(message):
            await send_waits(message)
            sent.append(message)

        await app(scope, receive, send)
    asyncio.run(go())
    return sent


def test_a_send_that_waits_gets_the_outputs_that_came_meanwhile_merged(app):
    async def slow(message):  # every body chunk waits 5 ms: outputs come every 2 ms
        if message["type"] == "http.response.body":
            await asyncio.sleep(0.005)
    sent = _asgi(app, {"prompt": [7, 8, 9], "max_tokens": 10, "stream": True}, slow)
    assert sent[0]["status"] == 200 and not sent[-1]["more_body"]
    text = b"".join(m["body"] for m in sent[1:]).decode()
    events = [json.loads(ln[6:]) for ln in text.split("\n\n") if ln and ln != "data: [DONE]"]
    assert text.endswith("data: [DONE]\n\n")
    assert "".join(c["text"] for e in events for c in e["choices"]) == "".join(WORDS)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert len(events) < len(WORDS)  # outputs piled up while a send waited, then went as one


def test_a_client_gone_while_a_send_waits_aborts_the_request(app):
    gone = asyncio.Event()

    async def stuck(message):  # the second body chunk never gets out; then the client leaves
        if message["type"] == "http.response.body" and message["body"]:
            if stuck.chunks:
                gone.set()
                await asyncio.Event().wait()
            stuck.chunks += 1
    stuck.chunks = 0
    sent = _asgi(app, {"prompt": [HOLDS, 8, 9], "max_tokens": 10, "stream": True}, stuck, gone)
    assert len(sent) == 2  # the start and one chunk
    assert [r[-2:] for r in app.state.tuili.llm.aborted] == ["-0"]
