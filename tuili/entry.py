"""LLM: the offline, synchronous front over the engine (AsyncLLM, the server's, is beside it)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import jinja2

from tuili.async_llm import AsyncLLM  # noqa: F401  (the asyncio front, re-exported here)
from tuili.config import EngineConfig
from tuili.engine.engine import LLMEngine
from tuili.entry_pooling import PoolingCalls
from tuili.errors import InvalidParameter
from tuili.outputs import RequestOutput
from tuili.sampling_params import SamplingParams

Prompt = str | list[int]
Messages = list[dict]

# generation_config.json keys that set default sampling parameters
_GEN_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class LLM(PoolingCalls):
    """LLM("smollm2-135m", dtype="float32").generate(["Hello"], SamplingParams(max_tokens=8));
    LLM("all-minilm-l6-v2").embed(["Hello"]) (entry_pooling.py: embed, score, rerank)."""

    def __init__(self, model: str | None = None, **options):
        if model is not None:
            options["model"] = model
        self.engine = LLMEngine(EngineConfig(**options))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json defaults applied."""
        gen = self.engine.generation_config
        return SamplingParams(**{k: gen[k] for k in _GEN_DEFAULTS if gen.get(k) is not None})

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run all prompts to completion, batched; outputs come back in prompt order."""
        prompts = _as_list(prompts)
        params = self._params_per_prompt(params, len(prompts))
        ids = self._add_all(prompts, params, stream=False)
        final: dict[str, RequestOutput] = {}
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
        finally:
            for rid in ids:
                if rid not in final:
                    self.engine.abort_request(rid)
        return [final[rid] for rid in ids]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the request's output after every step that advanced it (see delta_text)."""
        (rid,) = self._add_all([prompt], self._params_per_prompt(params, 1))
        done = False
        try:
            while not done:
                for out in self.engine.step():
                    if out.request_id == rid:
                        done = out.finished
                        yield out
        finally:
            if not done:
                self.engine.abort_request(rid)

    def chat(self, messages: Messages | Sequence[Messages], params: SamplingParams | None = None,
             *, tools: list[dict] | None = None, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Render each conversation with the model's chat template, then generate."""
        if not messages:
            raise InvalidParameter("messages", "give at least one message")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts = [self.render_chat(c, tools=tools, add_generation_prompt=add_generation_prompt,
                                    **(chat_template_kwargs or {})) for c in conversations]
        return self.generate(prompts, params)

    def render_chat(self, messages: Messages, **kwargs) -> list[int]:
        if not messages:
            raise InvalidParameter("messages", "give at least one message")
        try:
            text = self.tokenizer.apply_chat_template(messages, **kwargs)
        except jinja2.TemplateError as e:
            raise InvalidParameter("messages", f"the chat template rejected them: {e}") from e
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _params_per_prompt(self, params, count: int) -> list[SamplingParams]:
        if params is None:
            return [self.default_sampling_params()] * count
        if isinstance(params, SamplingParams):
            return [params] * count
        if len(params) != count:
            raise InvalidParameter("params", f"{len(params)} SamplingParams for {count} prompts")
        return list(params)

    def _add_all(self, prompts: list[Prompt], params: list[SamplingParams],
                 stream: bool = True) -> list[str]:
        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        prompts = self.tokenizer.encode_prompts(prompts)
        added = []
        try:
            for rid, prompt, p in zip(ids, prompts, params):
                if isinstance(p, SamplingParams):  # a bad grammar raises here, not in a step
                    self.engine.check_params(p)
                self.engine.add_request(rid, prompt, p, stream)
                added.append(rid)
        except Exception:
            for rid in added:  # all or nothing: a bad prompt queues none of the batch
                self.engine.abort_request(rid)
            raise
        return ids


def _as_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts
