"""A request's structured-output fields (OpenAI's response_format, vLLM's guided_* and
structured_outputs) as one StructuredOutputs; compiled off the event loop, bad ones a 400."""

from __future__ import annotations

from dataclasses import replace

from tuili.errors import InvalidParameter
from tuili.sampling_params import SamplingParams
from tuili.server.protocol import SamplingFields
from tuili.structured import StructuredOutputs

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}
_STRUCTURED_KEYS = {"json", "regex", "choice", "grammar", "json_object", "structural_tag"}


def constraint_of(body: SamplingFields) -> StructuredOutputs | None:
    """The one constraint the body asks for, or None; two at once are a 400."""
    found: list[StructuredOutputs] = []
    fmt = body.response_format
    if fmt is not None:
        found += [x for x in [_response_format(fmt)] if x is not None]
    for param, kind in _GUIDED.items():
        value = getattr(body, param)
        if value is not None:
            found.append(StructuredOutputs(**{kind: value}, param=param))
    if body.structured_outputs is not None:
        given = {k: v for k, v in body.structured_outputs.items() if v not in (None, False)}
        unknown = sorted(set(given) - _STRUCTURED_KEYS)
        if unknown:
            raise InvalidParameter("structured_outputs", f"has unknown keys {unknown}; known: "
                                                         f"{sorted(_STRUCTURED_KEYS)}")
        found.append(StructuredOutputs(**given, param="structured_outputs"))
    if len(found) > 1:
        raise InvalidParameter(found[1].param, f"conflicts with {found[0].param}; give one "
                                               "structured-output constraint")
    return found[0] if found else None


def _response_format(fmt: dict) -> StructuredOutputs | None:
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputs(json_object=True, param="response_format")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidParameter("response_format", "json_schema needs a 'schema' object: "
                                   '{"type": "json_schema", "json_schema": {"name": ..., '
                                   '"schema": {...}}}')
        return StructuredOutputs(json=schema, param="response_format")
    raise InvalidParameter("response_format", f"got type {kind!r}; allowed: 'text', "
                                              "'json_object', 'json_schema'")


async def with_constraint(state, params: SamplingParams,
                          constraint: StructuredOutputs | None) -> SamplingParams:
    """params with the constraint, its grammar compiled (and cached) in a worker thread: a
    compilation, and the first one's set-up (seconds), never holds up the event loop."""
    if constraint is None:
        return params
    params = replace(params, structured_outputs=constraint)
    await state.llm.run_in_worker(state.llm.check_params, params)
    return params
