"""Tokenizer: a `tokenizers.Tokenizer` plus the special tokens and chat template around it."""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from tuili.errors import ModelLoadError
from tuili.models.tool_prompt import template_knows_tools, with_tools_in_messages


class Tokenizer:
    def __init__(self, backend: HFTokenizer, *, bos_token: str | None, eos_token: str | None,
                 chat_template: str | None, add_bos: bool = False):
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.chat_template = chat_template
        self.add_bos = add_bos  # prepend BOS when the backend's post-processor does not
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token else None

    @classmethod
    def from_folder(cls, folder: Path) -> Tokenizer:
        path = folder / "tokenizer.json"
        if not path.exists():
            raise ModelLoadError(f"{folder}: no tokenizer.json (tuili reads fast-tokenizer files)")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise ModelLoadError(f"{path}: not a readable tokenizer.json ({e})") from e
        # A saved truncation or padding (BERT exports have 128) would cut or pad prompts
        # silently: the engine checks lengths itself, and refuses what is too long.
        backend.no_truncation()
        backend.no_padding()
        cfg = _read_json(folder / "tokenizer_config.json")
        template = cfg.get("chat_template")
        if (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text()
        elif (folder / "chat_template.json").exists():
            template = _read_json(folder / "chat_template.json").get("chat_template")
        if isinstance(template, list):  # named templates: take the default
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        encoded = backend.encode("a", add_special_tokens=True).ids
        bos = _token_str(cfg.get("bos_token"))
        bos_id = backend.token_to_id(bos) if bos else None
        add_bos = bool(cfg.get("add_bos_token")) and bos_id is not None and encoded[:1] != [bos_id]
        return cls(backend, bos_token=bos, eos_token=_token_str(cfg.get("eos_token")),
                   chat_template=template, add_bos=add_bos)

    def __getstate__(self) -> dict:
        # the compiled template (a cached property) is built again where it is unpickled
        return {k: v for k, v in self.__dict__.items() if k != "_template"}

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.encode_many([text], add_special_tokens)[0]

    def encode_many(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        # The batch call releases the GIL while it works (encode holds it: a long prompt would
        # stall every other thread, the server's event loop among them), and spreads many texts
        # over the library's threads; the same ids as one by one.
        encoded = self.backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)
        bos = [self.bos_token_id] if add_special_tokens and self.add_bos else None
        return [bos + e.ids if bos and e.ids[:1] != bos else e.ids for e in encoded]

    def encode_prompts(self, prompts: list[str | list[int]]) -> list[str | list[int]]:
        """The prompts with each text replaced by its ids, all texts in one batch call (LLM's
        batched calls); other prompts as they are."""
        texts = [i for i, p in enumerate(prompts) if isinstance(p, str)]
        if len(texts) < 2:
            return prompts
        out = list(prompts)
        for i, ids in zip(texts, self.encode_many([prompts[i] for i in texts])):
            out[i] = ids
        return out

    def encode_pair(self, first: str, second: str) -> tuple[list[int], list[int]]:
        """Token ids of a text pair as the post-processor joins them (BERT: [CLS] a [SEP] b
        [SEP]), and each token's segment (0: first, 1: second)."""
        enc = self.backend.encode_batch_fast([(first, second)])[0]
        return enc.ids, enc.type_ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @cached_property
    def _template(self) -> jinja2.Template:
        if not self.chat_template:
            raise ValueError("this model has no chat template; use generate() with a plain prompt")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **kwargs) -> str:
        """Render messages the way HF transformers does (the template adds BOS if it wants one);
        a template that knows no tools gets them through tuili's Hermes-style prompt."""
        if not template_knows_tools(self.chat_template) and (tools or _has_tool_turns(messages)):
            messages = with_tools_in_messages(messages, tools)
        return self._template.render(
            messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _has_tool_turns(messages: list[dict]) -> bool:
    return any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _token_str(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from e
