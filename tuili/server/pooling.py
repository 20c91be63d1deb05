"""The pooling endpoints: POST /v1/embeddings (OpenAI), /v1/rerank (Cohere / Jina; also /rerank
and /v2/rerank) and /v1/score (vLLM), on a model that serves embed or score."""

from __future__ import annotations

import base64

from fastapi import APIRouter, Request

from tuili.errors import InvalidParameter, WrongTask
from tuili.pooling_params import PoolingParams
from tuili.scoring import pair_up, plan_scores, ranking
from tuili.server.pooling_protocol import EmbeddingRequest, RerankRequest, ScoreRequest
from tuili.server.serving import ServerState, final_outputs, new_id, now, unless_disconnected

MAX_INPUTS = 2048  # texts in one call (OpenAI's limit for embeddings)


def require_task(state: ServerState, *tasks: str) -> None:
    """400 (code wrong_task) when the served model has none of `tasks`."""
    if state.llm.task not in tasks:
        raise WrongTask(state.llm.task, " or ".join(tasks))


def pooling_routes(state: ServerState) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict:
        body = await state.parse(request, EmbeddingRequest)
        state.check_model(body.model)
        require_task(state, "embed")
        inputs = _inputs(body.input)
        params = PoolingParams("embed", dimensions=body.dimensions)
        size = state.llm.facts.embedding_size
        if body.dimensions is not None and body.dimensions > size:
            raise InvalidParameter("dimensions", f"got {body.dimensions}, this model's "
                                                 f"embeddings have {size}")
        ids = await state.llm.run_in_worker(_tokenize_all, state, inputs, "input")
        outs = await _run(state, request, "embd", ids, [params] * len(ids))
        data = [{"object": "embedding", "index": i, "embedding": _encoded(o, body.encoding_format)}
                for i, o in enumerate(outs)]
        tokens = sum(map(len, ids))
        return {"object": "list", "data": data, "model": state.model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def rerank(request: Request) -> dict:
        body = await state.parse(request, RerankRequest)
        state.check_model(body.model)
        require_task(state, "score", "embed")
        docs = [d if isinstance(d, str) else d.text for d in body.documents]
        if not docs:
            raise InvalidParameter("documents", "is empty; give at least one document")
        if body.top_n is not None and body.top_n < 1:
            raise InvalidParameter("top_n", f"got {body.top_n}, must be >= 1")
        if not body.query:
            raise InvalidParameter("query", "is empty")
        scores, tokens = await _scores(state, request, pair_up(body.query, docs))
        results = [{"index": i, "relevance_score": scores[i],
                    **({"document": {"text": docs[i]}} if body.return_documents else {})}
                   for i in ranking(scores, body.top_n)]
        return {"id": new_id("rerank"), "model": state.model_name, "results": results,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        r.add_api_route(path, rerank, methods=["POST"])

    @r.post("/v1/score")
    async def score(request: Request) -> dict:
        body = await state.parse(request, ScoreRequest)
        state.check_model(body.model)
        require_task(state, "score", "embed")
        scores, tokens = await _scores(state, request, pair_up(body.text_1, body.text_2))
        return {"id": new_id("score"), "object": "list", "created": now(),
                "model": state.model_name,
                "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens,
                          "completion_tokens": 0}}

    return r


def _inputs(given) -> list[str | list[int]]:
    if isinstance(given, str):
        given = [given]
    elif given and all(isinstance(t, int) for t in given):
        given = [given]
    if not given:
        raise InvalidParameter("input", "is empty; give a string, strings or token ids")
    if len(given) > MAX_INPUTS:
        raise InvalidParameter("input", f"has {len(given)} inputs, at most {MAX_INPUTS} per call")
    for i, item in enumerate(given):
        if not item:
            raise InvalidParameter("input", f"input {i} is empty")
    return list(given)


def _tokenize_all(state: ServerState, prompts: list[str | list[int]], param: str
                  ) -> list[list[int]]:
    """Each prompt's ids, checked against the longest pooling prompt (a text whose bytes prove
    it too long is refused untokenized). Tokenizes: call it through run_in_worker."""
    limit = state.llm.max_pooling_len
    for i, p in enumerate(prompts):
        if isinstance(p, str) and state.llm.min_prompt_tokens(p) > limit:
            raise _too_long(param, i, f"at least {state.llm.min_prompt_tokens(p)}", limit)
    out = []
    for i, p in enumerate(prompts):
        try:
            ids = state.llm.tokenize(p)
        except InvalidParameter as e:  # it names "prompt"; here the field is `param`
            raise InvalidParameter(param, f"input {i}: {str(e).removeprefix('prompt: ')}") from e
        if len(ids) > limit:
            raise _too_long(param, i, str(len(ids)), limit)
        out.append(ids)
    return out


def _too_long(param: str, index: int, has: str, limit: int) -> InvalidParameter:
    return InvalidParameter(param, f"input {index} has {has} tokens, more than the {limit} this "
                                   "model takes; shorten it")


async def _scores(state: ServerState, request: Request, pairs: list[tuple[str, str]]
                  ) -> tuple[list[float], int]:
    if len(pairs) > MAX_INPUTS:
        raise InvalidParameter("documents", f"{len(pairs)} pairs, at most {MAX_INPUTS} per call")
    plan = await state.llm.run_in_worker(plan_scores, state.llm.task, state.llm.cross_encoder,
                                         state.llm.tokenizer, pairs)
    limit = state.llm.max_pooling_len
    for i, ids in enumerate(plan.prompts):
        if len(ids) > limit:
            raise _too_long("documents", i, str(len(ids)), limit)
    outs = await _run(state, request, "score", plan.prompts, plan.params)
    return plan.scores([o.data for o in outs]), sum(map(len, plan.prompts))


async def _run(state: ServerState, request: Request, prefix: str, prompts: list[list[int]],
               params: list[PoolingParams]) -> list:
    state.admit(len(prompts), sum(map(len, prompts)))
    rid = new_id(prefix)
    streams = [state.llm.encode(f"{rid}-{i}", ids, p) for i, (ids, p) in
               enumerate(zip(prompts, params))]
    return await unless_disconnected(request, final_outputs(streams))


def _encoded(out, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # little-endian float32, as OpenAI's clients decode it
        return base64.b64encode(out.data.numpy().astype("<f4").tobytes()).decode()
    return out.data.tolist()
