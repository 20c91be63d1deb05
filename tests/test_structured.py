"""Structured output on SmolLM2 through the engine: every output of a set of JSON schemas parses
and validates (greedy, sampled, streamed), choices and regexes hold, the grammar wins over
min_tokens, masks work with every sampling option, bad constraints name their field, a new
grammar compiles off the engine loop."""

from __future__ import annotations

import json
import re
import threading

import pytest

from tuili import SamplingParams
from tuili.errors import InvalidParameter
from tuili.structured import StructuredOutputs

jsonschema = pytest.importorskip("jsonschema")

SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                     "zip": {"type": "integer"}},
                    "required": ["city", "zip"], "additionalProperties": False}},
        "required": ["name", "address"], "additionalProperties": False},
    "array_enum": {"type": "object", "properties": {
        "colours": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                    "minItems": 1, "maxItems": 3}},
        "required": ["colours"], "additionalProperties": False},
    "bounded_numbers": {"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "score": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["age", "score"], "additionalProperties": False},
    "any_of": {"type": "object", "properties": {
        "id": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 8}]},
        "ok": {"type": "boolean"}},
        "required": ["id", "ok"], "additionalProperties": False},
}
PROMPT = "Describe a person as JSON."


@pytest.fixture(scope="module")
def prompt(llm) -> list[int]:
    return llm.render_chat([{"role": "user", "content": PROMPT}])


def constrained(**kind) -> StructuredOutputs:
    return StructuredOutputs(**kind)


def valid(text: str, schema: dict) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


def test_every_schema_validates_greedy_and_sampled(llm, prompt):
    """All schemas and modes in one batch: greedy, and seeded samples with top-p, top-k,
    min-p, penalties and logprobs (the masked rows keep every option)."""
    modes = [dict(temperature=0),
             dict(temperature=1.0, top_p=0.9, seed=1),
             dict(temperature=0.8, top_k=20, min_p=0.05, repetition_penalty=1.2,
                  frequency_penalty=0.5, seed=2, logprobs=2)]
    params = [SamplingParams(max_tokens=60, structured_outputs=constrained(json=s), **m)
              for s in SCHEMAS.values() for m in modes]
    outs = llm.generate([prompt] * len(params), params)
    for (name, schema), group in zip(SCHEMAS.items(), _chunks(outs, len(modes))):
        for out in group:
            o = out.outputs[0]
            assert o.finish_reason == "stop", (name, o.text)
            valid(o.text, schema)
    assert outs[-1].outputs[0].logprobs and len(outs[-1].outputs[0].logprobs[0].top) == 2


def test_streamed_output_validates_and_equals_the_whole(llm, prompt):
    schema = SCHEMAS["bounded_numbers"]
    p = SamplingParams(max_tokens=40, temperature=0.7, seed=5,
                       structured_outputs=constrained(json=schema))
    pieces = [o.outputs[0].delta_text for o in llm.stream(prompt, p)]
    whole = llm.generate([prompt], p)[0].outputs[0].text
    assert "".join(pieces) == whole and len(pieces) > 3
    valid(whole, schema)


def test_choice_regex_grammar_and_json_object(llm, prompt):
    cases = [(constrained(choice=["yes", "no", "maybe"]), lambda t: t in {"yes", "no", "maybe"}),
             (constrained(regex=r"\d{3}-[a-z]{2}"), lambda t: re.fullmatch(r"\d{3}-[a-z]{2}", t)),
             (constrained(grammar='root ::= "(" [0-9]{1,3} " + " [0-9]{1,3} ")"'),
              lambda t: re.fullmatch(r"\(\d{1,3} \+ \d{1,3}\)", t)),
             (constrained(json_object=True), lambda t: isinstance(json.loads(t), dict))]
    params = [SamplingParams(max_tokens=40, temperature=1.0, seed=s, structured_outputs=c)
              for c, _ in cases for s in (0, 1)]
    outs = llm.generate([prompt] * len(params), params)
    for (_, ok), group in zip(cases, _chunks(outs, 2)):
        for out in group:
            o = out.outputs[0]
            assert ok(o.text), o.text
            assert o.finish_reason == "stop" or o.finish_reason == "length" and "{" in o.text


def test_grammar_wins_over_min_tokens(llm, prompt):
    """min_tokens bans EOS while the finished grammar allows only EOS: the request ends (no
    hang, no token outside the grammar)."""
    p = SamplingParams(max_tokens=30, min_tokens=20, temperature=0,
                       structured_outputs=constrained(choice=["yes", "no"]))
    o = llm.generate([prompt], p)[0].outputs[0]
    assert o.text in {"yes", "no"} and o.finish_reason == "stop"
    assert len(o.token_ids) < 20


def test_unconstrained_rows_in_the_same_batch_are_untouched(llm, prompt):
    free = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = llm.generate([prompt], free)[0].outputs[0].token_ids
    mixed = llm.generate([prompt, prompt], [
        SamplingParams(max_tokens=12, temperature=0, structured_outputs=constrained(
            choice=["first", "second"])), free])
    assert mixed[1].outputs[0].token_ids == alone
    assert mixed[0].outputs[0].text in {"first", "second"}


@pytest.mark.parametrize("kind, value, message", [
    ("regex", "(ab", "invalid regex"),
    ("json", {"type": "object", "properties": {"a": {"type": "wat"}}}, "invalid JSON schema"),
    ("grammar", "root ::= ", "invalid grammar"),
])
def test_bad_constraints_name_their_field(llm, kind, value, message):
    with pytest.raises(InvalidParameter) as e:
        llm.generate(["hi"], SamplingParams(structured_outputs=StructuredOutputs(
            **{kind: value}, param="guided_x")))
    assert e.value.param == "guided_x" and message in str(e.value)
    assert not llm.engine.has_unfinished_requests()


def test_exactly_one_constraint():
    with pytest.raises(InvalidParameter, match="exactly one"):
        StructuredOutputs(regex="a", choice=["a"])
    with pytest.raises(InvalidParameter, match="exactly one"):
        StructuredOutputs()


def test_grammars_are_compiled_once(llm):
    compiler = llm.engine.grammars.compiler
    so = StructuredOutputs(json={"type": "object", "properties": {"k": {"type": "integer"}}})
    first = compiler.compile(so)
    same = StructuredOutputs(json={"properties": {"k": {"type": "integer"}}, "type": "object"})
    assert compiler.compile(same) is first  # keyed by the schema, not its key order


def test_a_new_grammar_compiles_while_other_requests_step(llm, prompt, monkeypatch):
    """The engine compiles an uncached grammar in a background thread: its request waits, an
    unconstrained one runs to the end meanwhile, then the constrained one runs and holds."""
    from tuili.structured.grammar import GrammarCompiler

    gate = threading.Event()
    real = GrammarCompiler._compile

    def held(self, so):
        assert gate.wait(60)
        return real(self, so)

    monkeypatch.setattr(GrammarCompiler, "_compile", held)
    engine = llm.engine
    regex = r"(ab|cd)[0-9]{2}"
    engine.add_request("held", prompt, SamplingParams(
        max_tokens=8, temperature=0, structured_outputs=constrained(regex=regex)))
    engine.add_request("free", prompt, SamplingParams(max_tokens=3, temperature=0,
                                                      ignore_eos=True))
    seen, free_done = set(), False
    for _ in range(20):
        for out in engine.step():
            seen.add(out.request_id)
            free_done |= out.request_id == "free" and out.finished
        if free_done:
            break
    assert not engine.take_failures()
    assert free_done and "held" not in seen and engine.has_unfinished_requests()
    gate.set()
    final = {}
    while engine.has_unfinished_requests():
        final.update((o.request_id, o) for o in engine.step() if o.finished)
    assert re.fullmatch(regex, final["held"].outputs[0].text)


def test_a_grammar_refused_in_the_background_fails_only_its_request(llm, prompt):
    engine = llm.engine  # LLM compiles before queueing; the engine's own path is checked here
    engine.add_request("bad", prompt, SamplingParams(
        max_tokens=4, structured_outputs=constrained(regex="(unclosed")), stream=False)
    while engine.has_unfinished_requests():
        engine.step()
    ((rid, error),) = engine.take_failures()
    assert rid == "bad" and isinstance(error, InvalidParameter) and "regex" in str(error)
    assert llm.generate([prompt], SamplingParams(max_tokens=2))[0].outputs[0].token_ids


def _chunks(items, n):
    return [items[i:i + n] for i in range(0, len(items), n)]
