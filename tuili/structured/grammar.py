"""Grammars compiled by xgrammar for one tokenizer, cached (LRU) by their constraint."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable

import xgrammar as xgr

from tuili.errors import InvalidParameter
from tuili.models.tokenizer import Tokenizer
from tuili.structured.params import StructuredOutputs

CACHE_SIZE = 256


class GrammarCompiler:
    """Compiles StructuredOutputs for one tokenizer and vocabulary; thread-safe (the server
    compiles in its worker threads, the engine looks the result up)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Iterable[int],
                 max_threads: int = 2):
        self.info = tokenizer_info(tokenizer, vocab_size, stop_token_ids)
        # xgrammar's own cache is off: ours is keyed by the constraint, bounded by count
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=max_threads,
                                            cache_enabled=False)
        self.cache: OrderedDict[tuple[str, str], xgr.CompiledGrammar] = OrderedDict()
        self.lock = threading.Lock()

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    def cached(self, so: StructuredOutputs) -> xgr.CompiledGrammar | None:
        """The compiled grammar for `so` if it is in the cache, else None (no compiling)."""
        with self.lock:
            found = self.cache.get(so.key)
            if found is not None:
                self.cache.move_to_end(so.key)
            return found

    def compile(self, so: StructuredOutputs) -> xgr.CompiledGrammar:
        """The compiled grammar for `so`; a bad schema, regex or grammar is an InvalidParameter
        naming its field."""
        key = so.key
        found = self.cached(so)
        if found is not None:
            return found
        compiled = self._compile(so)  # outside the lock: two threads may both compile a miss
        with self.lock:
            self.cache[key] = compiled
            if len(self.cache) > CACHE_SIZE:
                self.cache.popitem(last=False)
        return compiled

    def _compile(self, so: StructuredOutputs) -> xgr.CompiledGrammar:
        c = self.compiler
        try:
            if so.json is not None:
                schema = json.loads(so.json) if isinstance(so.json, str) else so.json
                return c.compile_json_schema(json.dumps(schema), any_whitespace=False)
            if so.json_object:  # an object, as OpenAI's json_object means (the builtin: any value)
                return c.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if so.regex is not None:
                return c.compile_regex(so.regex)
            if so.choice is not None:
                return c.compile_grammar(choice_grammar(so.choice))
            if so.grammar is not None:
                return c.compile_grammar(so.grammar)
            return c.compile_structural_tag(so.structural_tag)
        except (RuntimeError, ValueError, TypeError) as e:  # xgrammar's parse errors
            what = {"json": "JSON schema", "regex": "regex", "grammar": "grammar",
                    "structural_tag": "structural tag"}.get(so.kind, so.kind)
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InvalidParameter(so.param, f"invalid {what}: {message}") from e


def choice_grammar(choices: Iterable[str]) -> str:
    """EBNF for exactly one of the strings (JSON string literals are valid EBNF literals)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def tokenizer_info(tokenizer: Tokenizer, vocab_size: int,
                   stop_token_ids: Iterable[int]) -> xgr.TokenizerInfo:
    """xgrammar's view of the vocabulary (token strings, byte-level or byte-fallback), through
    transformers' wrapper of the same `tokenizers` object."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend)
    return xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size,
                                              stop_token_ids=sorted(stop_token_ids))
