"""Structured output: constraints (params), their grammars (xgrammar), per-request matchers."""

from tuili.structured.params import StructuredOutputs

__all__ = ["StructuredOutputs"]
