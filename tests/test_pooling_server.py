"""The pooling endpoints through a real `tuili serve` of all-MiniLM-L6-v2: the openai SDK's
embeddings.create, langchain-openai's OpenAIEmbeddings, raw HTTP for rerank and score, and
OpenAI-shaped 400s for bad input and the wrong task."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
import torch

openai = pytest.importorskip("openai")

from tests.server_process import KEY, Server  # noqa: E402
from tests.test_pooling import DOCS, QUERY, TEXTS  # noqa: E402

MODEL = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("pool-server"), "--model", MODEL, "--dtype", "float32",
               "--api-key", KEY)
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


def close(got, want, atol: float = 1e-5) -> bool:
    return torch.allclose(torch.as_tensor(got, dtype=torch.float32),
                          torch.as_tensor(want, dtype=torch.float32), atol=atol)


def test_sdk_embeddings_equal_llm_embed(client, minilm):
    want = minilm.embed(TEXTS)
    r = client.embeddings.create(model=MODEL, input=TEXTS)  # the SDK asks for base64
    assert r.model == MODEL and [d.index for d in r.data] == list(range(len(TEXTS)))
    assert close([d.embedding for d in r.data], want)
    n_tokens = sum(len(minilm.tokenizer.encode(t)) for t in TEXTS)
    assert r.usage.prompt_tokens == r.usage.total_tokens == n_tokens
    one = client.embeddings.create(model=MODEL, input=TEXTS[1], encoding_format="float")
    assert close(one.data[0].embedding, want[1])
    ids = minilm.tokenizer.encode(TEXTS[2])
    by_ids = client.embeddings.create(model=MODEL, input=[ids, ids], encoding_format="float")
    assert close([d.embedding for d in by_ids.data], want[[2, 2]])
    short = client.embeddings.create(model=MODEL, input=TEXTS[1], dimensions=48)
    assert len(short.data[0].embedding) == 48
    assert close(short.data[0].embedding, minilm.embed(TEXTS[1], dimensions=48)[0])
    assert abs(np.linalg.norm(short.data[0].embedding) - 1) < 1e-5


def test_base64_is_little_endian_float32(http, minilm):
    r = http.post("/v1/embeddings", json={"input": TEXTS[0], "encoding_format": "base64"})
    vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4").copy()
    assert close(vec, minilm.embed(TEXTS[0])[0])


def test_langchain_openai_embeddings(server, minilm):
    lc = pytest.importorskip("langchain_openai")
    emb = lc.OpenAIEmbeddings(model=MODEL, base_url=f"{server.url}/v1", api_key=KEY,
                              check_embedding_ctx_length=False)  # it sends text, not tiktoken ids
    assert close(emb.embed_documents(TEXTS[:3]), minilm.embed(TEXTS[:3]))
    assert close(emb.embed_query(QUERY), minilm.embed(QUERY)[0])


def test_rerank_and_score_over_http(http, minilm):
    scores = minilm.score(QUERY, DOCS)
    order = sorted(range(len(DOCS)), key=lambda i: -scores[i])
    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        r = http.post(path, json={"model": MODEL, "query": QUERY, "documents": DOCS, "top_n": 2})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["index"] for x in results] == order[:2]
        assert [x["relevance_score"] for x in results] == pytest.approx(
            [scores[i] for i in order[:2]], abs=1e-5)
        assert results[0]["document"] == {"text": DOCS[order[0]]}
    r = http.post("/v1/rerank", json={"query": QUERY, "documents": [{"text": d} for d in DOCS],
                                      "return_documents": False}).json()
    assert len(r["results"]) == len(DOCS) and "document" not in r["results"][0]
    assert r["usage"]["total_tokens"] > 0
    r = http.post("/v1/score", json={"model": MODEL, "text_1": QUERY, "text_2": DOCS}).json()
    assert r["object"] == "list" and [d["index"] for d in r["data"]] == list(range(len(DOCS)))
    assert [d["score"] for d in r["data"]] == pytest.approx(scores, abs=1e-5)
    pairwise = http.post("/v1/score", json={"text_1": [QUERY, DOCS[1]],
                                            "text_2": [DOCS[0], DOCS[1]]}).json()
    assert [d["score"] for d in pairwise["data"]] == pytest.approx(
        minilm.score([QUERY, DOCS[1]], [DOCS[0], DOCS[1]]), abs=1e-5)


def error_of(r, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/embeddings", {"input": ""}, "input"),
    ("/v1/embeddings", {"input": []}, "input"),
    ("/v1/embeddings", {"input": ["ok", ""]}, "input"),
    ("/v1/embeddings", {"input": "word " * 300}, "input"),
    ("/v1/embeddings", {"input": [[1, 2], [10**6]]}, "input"),
    ("/v1/embeddings", {"input": "a", "dimensions": 385}, "dimensions"),
    ("/v1/embeddings", {"input": "a", "dimensions": 0}, "dimensions"),
    ("/v1/embeddings", {"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ("/v1/rerank", {"query": QUERY, "documents": []}, "documents"),
    ("/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": 0}, "top_n"),
    ("/v1/rerank", {"query": QUERY, "documents": ["word " * 300]}, "documents"),
    ("/v1/score", {"text_1": [QUERY, QUERY], "text_2": DOCS[:3]}, "text_2"),
    ("/v1/score", {"text_1": QUERY}, "text_2"),
])
def test_bad_input_is_400_naming_the_parameter(http, path, body, param):
    err = error_of(http.post(path, json=body))
    assert err["param"] == param and err["type"] == "invalid_request_error", err


def test_over_long_input_names_both_numbers(http):
    err = error_of(http.post("/v1/embeddings", json={"input": ["fine", "word " * 300]}))
    message = err["message"]
    assert "input 1" in message and "302 tokens" in message and "256" in message


def test_generation_endpoints_say_the_served_task(http, client):
    for path, body in (("/v1/completions", {"prompt": "Hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})):
        err = error_of(http.post(path, json=body))
        assert err["code"] == "wrong_task" and "task=embed" in err["message"], err
    with pytest.raises(openai.BadRequestError, match="task=embed"):
        client.completions.create(model=MODEL, prompt="Hi")
    # and the server still serves its own task
    assert len(client.embeddings.create(model=MODEL, input="ok").data[0].embedding) == 384
