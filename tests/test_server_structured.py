"""Structured output and tool calling as clients see them: a real `tuili serve` on SmolLM2,
driven by the openai SDK (response_format, guided_* extras, tools with tool_choice required
and named, streamed and not), raw HTTP for the 400s, and langchain-openai's
with_structured_output."""

from __future__ import annotations

import json

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from tests.conftest import MODEL  # noqa: E402
from tests.server_process import KEY, Server  # noqa: E402

FLAGS = ["--dtype", "float32", "--max-num-seqs", "8", "--max-model-len", "1024",
         "--num-kv-blocks", "128", "--api-key", KEY]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10},
    "age": {"type": "integer", "minimum": 1, "maximum": 99},
    "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 2}},
    "required": ["name", "age", "pets"], "additionalProperties": False}
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 999}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather "
                                           "in a city", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                           "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("structured"), *FLAGS)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"})


def person_format() -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                   "strict": True}}


def test_response_format_json_schema_chat(client):
    msgs = [{"role": "user", "content": "Describe a person."}]
    greedy = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=50,
                                            temperature=0, response_format=person_format())
    sampled = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=50, n=2,
                                             temperature=1.0, seed=4,
                                             response_format=person_format())
    for choice in [*greedy.choices, *sampled.choices]:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in
                       client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=50,
                                                      temperature=0, stream=True,
                                                      response_format=person_format()))
    assert streamed == greedy.choices[0].message.content


def test_completions_guided_fields_and_json_object(client):
    prompt = "Q: Is the sky blue?\nA:"
    choice = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8,
                                       temperature=1.0, n=3, seed=0,
                                       extra_body={"guided_choice": ["yes", "no"]})
    assert {c.text for c in choice.choices} <= {"yes", "no"}
    regex = client.completions.create(model=MODEL, prompt="Phone: ", max_tokens=12,
                                      temperature=0.8, seed=1,
                                      extra_body={"guided_regex": r"\d{3}-\d{4}"})
    assert len(regex.choices[0].text) == 8 and regex.choices[0].text[3] == "-"
    obj = client.completions.create(model=MODEL, prompt="JSON: ", max_tokens=40, temperature=0,
                                    extra_body={"structured_outputs": {"json": PERSON}})
    jsonschema.validate(json.loads(obj.choices[0].text), PERSON)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True,
        extra_body={"guided_choice": ["yes", "no"]}))
    assert streamed in {"yes", "no"}


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}}},
     "response_format", "invalid JSON schema"),
    ({"guided_regex": "([a-z"}, "guided_regex", "invalid regex"),
    ({"guided_grammar": "root ::= (", "max_tokens": 4}, "guided_grammar", "invalid grammar"),
    ({"response_format": {"type": "xml"}}, "response_format", "allowed"),
    ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice", "conflicts"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "not among"),
    ({"tool_choice": "required"}, "tool_choice", "no tools"),
])
def test_bad_constraints_are_400s(server, body, param, words):
    r = post(server, "/v1/chat/completions", {"messages": ASK, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"]
    assert err["type"] == "invalid_request_error"


def check_call(call) -> dict:
    assert call.id.startswith("call_") and call.type == "function"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    return args


@pytest.fixture(scope="module")
def required(client):
    """A chat answer with tool_choice="required" (shared: the round trip replays it)."""
    return client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                          tool_choice="required", max_tokens=60, temperature=0,
                                          parallel_tool_calls=False)


def test_tool_choice_required_and_named(client, required):
    (choice,) = required.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    check_call(call)
    named = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, max_tokens=60, temperature=0.9, seed=2,
        tool_choice={"type": "function", "function": {"name": "add"}})
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "add"
    check_call(call)


@pytest.mark.parametrize("tool_choice", ["required",
                                         {"type": "function", "function": {"name": "add"}}],
                         ids=["required", "named"])
def test_streamed_tool_calls_arrive_incrementally(client, tool_choice):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice=tool_choice, max_tokens=60,
        temperature=0, parallel_tool_calls=False, stream=True))
    pieces = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    first, rest = pieces[0], pieces[1:]
    assert first.index == 0 and first.id.startswith("call_") and first.function.name
    if isinstance(tool_choice, dict):
        assert first.function.name == "add"
    assert len(rest) > 2 and all(p.id is None and p.function.name is None for p in rest)
    arguments = "".join(p.function.arguments or "" for p in pieces)
    jsonschema.validate(json.loads(arguments), SCHEMAS[first.function.name])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks)


def test_tool_round_trip_renders(client, server, required):
    """The call and its result go back through the chat template (SmolLM2's knows no tools:
    tuili's Hermes prompt carries them), and the model answers in text with tool_choice none."""
    call = required.choices[0].message
    history = [*ASK, call.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.tool_calls[0].id,
                "content": "18 degrees and sunny"}]
    ids = post(server, "/tokenize", {"messages": history, "tools": TOOLS}).json()["tokens"]
    rendered = post(server, "/detokenize", {"tokens": ids}).json()["prompt"]
    assert "<tool_response>\n18 degrees and sunny\n</tool_response>" in rendered
    assert call.tool_calls[0].function.name in rendered and '"get_weather"' in rendered
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS,
                                            tool_choice="none", max_tokens=8, temperature=0)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


def test_langchain_with_structured_output(server):
    lc = pytest.importorskip("langchain_openai")
    pydantic = pytest.importorskip("pydantic")

    class City(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=12)
        country: str = pydantic.Field(max_length=12)

    chat = lc.ChatOpenAI(model=MODEL, base_url=f"{server.url}/v1", api_key=KEY, temperature=0,
                         max_tokens=40, max_retries=0)
    for method in ("json_schema", "function_calling"):
        city = chat.with_structured_output(City, method=method).invoke("Name a city in France.")
        assert isinstance(city, City) and city.name
