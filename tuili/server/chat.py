"""POST /v1/chat/completions: messages through the model's chat template, streaming or not."""

from __future__ import annotations

import time

import jinja2
from fastapi import Request
from fastapi.responses import JSONResponse

from tuili.errors import InvalidParameter
from tuili.models.tokenizer import Tokenizer
from tuili.outputs import CompletionOutput, RequestOutput
from tuili.sampling_params import SamplingParams
from tuili.server.errors import request_id
from tuili.server.protocol import ChatCompletionRequest, ChatMessage
from tuili.server.serving import (EventStream, ServerState, dumps, final_outputs, new_id, now,
                                  quote, sse, sse_parts, unless_disconnected, usage)
from tuili.server.structured import constraint_of, with_constraint
from tuili.server.tool_parsers import StreamingToolCalls, final_calls, pick_parser
from tuili.server.tools import tool_choice_mode, tool_constraint


def render_text(tok: Tokenizer, messages: list[ChatMessage], *, tools: list[dict] | None,
                add_generation_prompt: bool, template_kwargs: dict | None) -> str:
    """The conversation as the model's chat template writes it (run it in a worker thread)."""
    plain = [_plain_message(i, m) for i, m in enumerate(messages)]
    try:
        return tok.apply_chat_template(plain, tools=tools,
                                       add_generation_prompt=add_generation_prompt,
                                       **(template_kwargs or {}))
    except (jinja2.TemplateError, ValueError, TypeError) as e:
        raise InvalidParameter("messages", f"the chat template rejected them: {e}") from e


def _plain_message(i: int, m: ChatMessage) -> dict:
    """A message as templates expect it: string content (text parts joined), extras kept."""
    content = m.content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidParameter(f"messages[{i}].content[{j}]", f"got a part of type "
                                       f"{part.get('type')!r}; only text parts are supported")
            texts.append(part["text"])
        content = "\n".join(texts)
    out = {**(m.model_extra or {}), "role": m.role, "content": content or ""}
    if m.role == "developer":
        out["role"] = "system"
    return out


# what render_text passes to the chat template itself
_TEMPLATE_ARGS = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"}


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest,
                                 request: Request):
    arrival = time.monotonic()
    state.check_model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidParameter("top_logprobs", "needs logprobs: true")
    tool_mode = tool_choice_mode(body.tools, body.tool_choice)
    state.limits.check_logprobs("top_logprobs", body.top_logprobs)
    taken = sorted(set(body.chat_template_kwargs or {}) & _TEMPLATE_ARGS)
    if taken:
        raise InvalidParameter("chat_template_kwargs", f"sets {taken}, which the server passes "
                                                       "to the template itself")
    field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None \
        else body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = state.sampling_params(body, max_tokens, field, logprobs=logprobs)
    parser = pick_parser(state.tool_call_parser, state.llm.tokenizer.chat_template)
    constraint = constraint_of(body)
    forced = tool_constraint(body.tools, tool_mode, parser, body.parallel_tool_calls) \
        if tool_mode else None
    if constraint is not None and forced is not None:
        raise InvalidParameter(constraint.param, f"conflicts with tool_choice={body.tool_choice!r}"
                                                 ", which constrains the output itself")
    params = await with_constraint(state, params, constraint or forced)
    state.admit(params.n, 0)  # a full queue refuses before any templating or tokenizing
    ids = await state.llm.run_in_worker(_prompt_ids, state, body, params, field)
    state.admit(params.n, len(ids))
    rid = new_id("chatcmpl")
    stream = state.generate(rid, ids, params, arrival)
    writer = _Writer(state, rid, body, parser if tool_mode not in (None, "none") else None)
    if body.stream:
        writer.start_stream()
        return EventStream([stream], writer, request_id(request))
    (final,) = await unless_disconnected(request, final_outputs([stream]))
    return await state.llm.run_in_worker(lambda: JSONResponse(writer.response(final)))


def _prompt_ids(state: ServerState, body: ChatCompletionRequest, params: SamplingParams,
                field: str) -> list[int]:
    """The conversation's token ids, checked against the context (in a worker thread)."""
    text = render_text(state.llm.tokenizer, body.messages,
                       tools=body.tools if body.tool_choice != "none" else None,
                       add_generation_prompt=body.add_generation_prompt,
                       template_kwargs=body.chat_template_kwargs)
    return state.encode_prompts([text], params, field, prompt_param="messages",
                                add_special_tokens=False)[0]


def _choice_json(index: int, content: str, finish: str | None) -> str:
    """dumps() of a chunk's choice whose delta is {"content": content} ({} when it is "") and
    has no logprobs, without building the dict."""
    content = f'"content":{quote(content)}' if content else ""
    return (f'{{"index":{index},"delta":{{{content}}},"logprobs":null,"finish_reason":'
            f'{"null" if finish is None else quote(finish)}}}')


class _Writer:
    """Turns engine outputs into OpenAI chat.completion objects and chunks."""

    def __init__(self, state: ServerState, rid: str, body: ChatCompletionRequest,
                 tool_parser: str | None):
        self.tok, self.rid, self.body = state.llm.tokenizer, rid, body
        self.tool_parser = tool_parser  # None: the text is all content
        self.model, self.created = state.model_name, now()

    def _object(self, kind: str, choices: list[dict]) -> dict:
        return {"id": self.rid, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def response(self, out: RequestOutput) -> dict:
        choices = []
        for o in out.outputs:
            message = {"role": "assistant", "content": o.text, "refusal": None,
                       "annotations": []}
            finish = o.finish_reason
            if self.tool_parser:
                message["content"], calls = final_calls(self.tool_parser, o.text)
                if calls:
                    message["tool_calls"], finish = calls, "tool_calls"
            choices.append({"index": o.index, "message": message,
                            "logprobs": self._logprobs(o, 0, len(o.token_ids)),
                            "finish_reason": finish})
        n_out = sum(len(o.token_ids) for o in out.outputs)
        return {**self._object("chat.completion", choices),
                "usage": usage(len(out.prompt_token_ids), n_out, out.num_cached_tokens)}

    def start_stream(self) -> None:
        """Before first() / chunk() / last() (the ChunkWriter of a streamed response)."""
        self.extra = {"usage": None} if self.body.include_usage else {}
        kind = "chat.completion.chunk"
        self.head, self.tail = sse_parts({**self._object(kind, []), **self.extra})
        self.final: RequestOutput | None = None
        self.ended: set[int] = set()  # samples already sent with their finish_reason
        self.calls = {i: StreamingToolCalls(self.tool_parser) for i in range(self.body.n)} \
            if self.tool_parser else {}
        self.plain = not self.calls and not self.body.logprobs  # chunks are content alone

    def first(self) -> str:
        role = {"role": "assistant", "content": "", "refusal": None}
        return sse({**self._object("chat.completion.chunk", [
            {"index": i, "delta": role, "logprobs": None, "finish_reason": None}
            for i in range(self.body.n)]), **self.extra})

    def chunk(self, _: int, out: RequestOutput) -> str:
        logprobs, ended = self.body.logprobs, self.ended
        self.final = out
        if len(out.outputs) == 1 and self.plain:  # most chunks: one sample's content alone
            o = out.outputs[0]
            if o.index in ended:
                return ""
            finish = o.finish_reason
            if finish is not None:
                ended.add(o.index)
            elif not o.delta_text:
                return ""
            return f"{self.head}{_choice_json(o.index, o.delta_text, finish)}{self.tail}"
        choices = []
        for o in out.outputs:
            if o.index in ended:
                continue
            if o.finished:
                ended.add(o.index)
            n_new = len(o.delta_token_ids)
            if not (o.delta_text or o.finished or (n_new and logprobs)):
                continue
            end = len(o.token_ids)
            delta, finish = self._delta(self.calls.get(o.index), o)
            if not (delta or o.finished or (n_new and logprobs)):
                continue  # text held back: it may open a tool call
            lp = self._logprobs(o, end - n_new, end)
            choices.append(_choice_json(o.index, delta.get("content", ""), finish)
                           if lp is None and delta.keys() <= {"content"} else
                           dumps({"index": o.index, "delta": delta, "logprobs": lp,
                                  "finish_reason": finish}))
        return self.head + ",".join(choices) + self.tail if choices else ""

    def last(self) -> str:
        out = self.final
        if not self.body.include_usage or out is None:
            return ""
        n_out = sum(len(o.token_ids) for o in out.outputs)
        return sse({**self._object("chat.completion.chunk", []), "usage": usage(
            len(out.prompt_token_ids), n_out, out.num_cached_tokens)})

    @staticmethod
    def _delta(calls: StreamingToolCalls | None, o: CompletionOutput) -> tuple[dict, str | None]:
        """A chunk's delta (content, and tool-call pieces as they complete) and finish_reason."""
        if calls is None:
            return ({"content": o.delta_text} if o.delta_text else {}), o.finish_reason
        content, tool_calls = calls.add(o.delta_text, final=o.finished)
        delta = {"content": content} if content else {}
        if tool_calls:
            delta["tool_calls"] = tool_calls
        return delta, ("tool_calls" if o.finished and calls.called else o.finish_reason)

    def _logprobs(self, o: CompletionOutput, start: int, end: int) -> dict | None:
        if not self.body.logprobs:
            return None
        content = []
        for tid, lp in zip(o.token_ids[start:end], (o.logprobs or [])[start:end]):
            entry = self._entry(tid, lp.logprob)
            entry["top_logprobs"] = [self._entry(t, v) for t, v in lp.top]
            content.append(entry)
        return {"content": content, "refusal": None}

    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self.tok.decode([token_id], skip_special_tokens=False)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
