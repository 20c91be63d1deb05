"""POST /v1/completions: prompts as text or token ids, echo, logprobs, n, streaming."""

from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import JSONResponse

from tuili.errors import InvalidParameter
from tuili.outputs import CompletionOutput, RequestOutput
from tuili.server.errors import request_id
from tuili.server.protocol import CompletionRequest
from tuili.server.serving import (EventStream, ServerState, dumps, final_outputs, new_id, now,
                                  quote, sse, sse_parts, unless_disconnected, usage)
from tuili.server.structured import constraint_of, with_constraint


def _prompts(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidParameter("prompt", "is empty; give a string, strings or token ids")
    if all(isinstance(p, int) for p in prompt):
        return [prompt]
    return list(prompt)


async def create_completion(state: ServerState, body: CompletionRequest, request: Request):
    arrival = time.monotonic()
    state.check_model(body.model)
    if body.suffix:
        raise InvalidParameter("suffix", "is not supported; leave it out")
    prompts = _prompts(body.prompt)
    limits = state.limits
    limits.check_prompts(len(prompts))
    if body.best_of is not None:
        limits.check_n("best_of", body.best_of)
        if body.best_of != body.n:
            raise InvalidParameter("best_of", f"got {body.best_of}, only best_of == n ({body.n}) "
                                              "is supported")
    limits.check_logprobs("logprobs", body.logprobs)
    params = state.sampling_params(body, body.max_tokens, logprobs=body.logprobs,
                                   prompt_logprobs=body.logprobs if body.echo else None)
    params = await with_constraint(state, params, constraint_of(body))
    sequences = len(prompts) * params.n
    state.admit(sequences, 0)  # a full queue refuses before any tokenizing
    ids = await state.llm.run_in_worker(state.encode_prompts, prompts, params, "max_tokens")
    state.admit(sequences, sum(map(len, ids)))
    rid = new_id("cmpl")
    streams = [state.generate(f"{rid}-{i}", p, params, arrival) for i, p in enumerate(ids)]
    writer = _Writer(state, rid, body)
    if body.stream:
        writer.start_stream()
        return EventStream(streams, writer, request_id(request))
    finals = await unless_disconnected(request, final_outputs(streams))
    # building the body grows with the output (echo, logprobs): off the event loop too
    return await state.llm.run_in_worker(lambda: JSONResponse(writer.response(finals)))


def _choice_json(index: int, text: str, finish: str | None) -> str:
    """dumps(_Writer._choice(index, text, None, finish)), without building the dict."""
    return (f'{{"index":{index},"text":{quote(text)},"logprobs":null,"finish_reason":'
            f'{"null" if finish is None else quote(finish)}}}')


class _Writer:
    """Turns engine outputs into OpenAI completion objects and chunks."""

    def __init__(self, state: ServerState, rid: str, body: CompletionRequest):
        self.tok, self.rid, self.body = state.llm.tokenizer, rid, body
        self.model, self.created = state.model_name, now()

    def _object(self, choices: list[dict]) -> dict:
        return {"id": self.rid, "object": "text_completion", "created": self.created,
                "model": self.model, "choices": choices, "system_fingerprint": None}

    def _choice(self, index: int, text: str, logprobs: dict | None, finish: str | None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def response(self, finals: list[RequestOutput]) -> dict:
        choices, n_prompt, n_out, n_cached = [], 0, 0, 0
        for i, out in enumerate(finals):
            n_prompt += len(out.prompt_token_ids)
            n_cached += out.num_cached_tokens
            for o in out.outputs:
                n_out += len(o.token_ids)
                text, lp = o.text, None
                if self.body.echo:
                    text = self.tok.decode(out.prompt_token_ids) + text
                if self.body.logprobs is not None:
                    lp = self._logprobs(out, o, 0, len(o.token_ids), self.body.echo, 0)
                choices.append(self._choice(i * self.body.n + o.index, text, lp, o.finish_reason))
        return {**self._object(choices), "usage": usage(n_prompt, n_out, n_cached)}

    def start_stream(self) -> None:
        """Before first() / chunk() / last() (the ChunkWriter of a streamed response)."""
        extra = {"usage": None} if self.body.include_usage else {}
        self.head, self.tail = sse_parts({**self._object([]), **extra})  # each chunk's fixed parts
        self.n_prompt = self.n_out = self.n_cached = 0
        self.offsets: dict[int, int] = {}  # choice index -> text offset (for text_offset)
        self.ended: set[int] = set()  # choices already sent with their finish_reason
        self.plain = not self.body.echo and self.body.logprobs is None  # chunks are text alone

    def first(self) -> str:
        return ""

    def chunk(self, i: int, out: RequestOutput) -> str:
        body, offsets, ended = self.body, self.offsets, self.ended
        if len(out.outputs) == 1 and self.plain:  # most chunks: one sample's text, no logprobs
            o = out.outputs[0]
            index = i * body.n + o.index
            if index in offsets and index not in ended:  # neither its first chunk nor past its end
                self.n_out += len(o.delta_token_ids)
                finish = o.finish_reason
                if finish is not None:
                    ended.add(index)
                elif not o.delta_text:
                    return ""
                return f"{self.head}{_choice_json(index, o.delta_text, finish)}{self.tail}"
        choices = []
        for o in out.outputs:
            index = i * body.n + o.index
            if index in ended:  # a sample that finished before the rest of its group
                continue
            first = index not in offsets
            text = self.tok.decode(out.prompt_token_ids) if first and body.echo else ""
            if first:
                offsets[index] = 0
                self.n_prompt += len(out.prompt_token_ids) if o.index == 0 else 0
                self.n_cached += out.num_cached_tokens if o.index == 0 else 0
            text += o.delta_text
            n_new = len(o.delta_token_ids)
            self.n_out += n_new
            if not (text or o.finished or (n_new and body.logprobs is not None)):
                continue
            lp = None
            if body.logprobs is not None:
                start = len(o.token_ids) - n_new
                lp = self._logprobs(out, o, start, len(o.token_ids), first and body.echo,
                                    offsets[index])
                offsets[index] += sum(len(t) for t in lp["tokens"])
            choices.append(_choice_json(index, text, o.finish_reason) if lp is None else
                           dumps(self._choice(index, text, lp, o.finish_reason)))
            if o.finished:
                ended.add(index)
        return self.head + ",".join(choices) + self.tail if choices else ""

    def last(self) -> str:
        if not self.body.include_usage:
            return ""
        return sse({**self._object([]), "usage": usage(self.n_prompt, self.n_out, self.n_cached)})

    def _logprobs(self, out: RequestOutput, o: CompletionOutput, start: int, end: int,
                  with_prompt: bool, offset: int) -> dict:
        """OpenAI's legacy logprobs object for output tokens [start, end), prompt first if asked."""
        entries = []  # (token id, logprob or None, top or None)
        if with_prompt:
            given = out.prompt_logprobs or []
            for k, tid in enumerate(out.prompt_token_ids):
                lp = given[k] if k < len(given) else None  # the first token has none
                entries.append((tid, lp.logprob if lp else None, lp.top if lp else None))
        for tid, lp in zip(o.token_ids[start:end], (o.logprobs or [])[start:end]):
            entries.append((tid, lp.logprob, lp.top))
        tokens, offsets, pos = [], [], offset
        for tid, _, _ in entries:
            tokens.append(self._token(tid))
            offsets.append(pos)
            pos += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": [e[1] for e in entries],
                "top_logprobs": [None if e[2] is None else
                                 {self._token(t): v for t, v in e[2]} for e in entries],
                "text_offset": offsets}

    def _token(self, token_id: int) -> str:
        return self.tok.decode([token_id], skip_special_tokens=False)

