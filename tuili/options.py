"""Command-line flags generated from EngineConfig and SamplingParams, shared by every command."""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, fields

from tuili.config import EngineConfig
from tuili.sampling_params import SamplingParams

SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                  "presence_penalty", "frequency_penalty", "max_tokens", "min_tokens",
                  "stop", "ignore_eos", "logprobs")


def _flag_type(annotation):
    """The argparse type for a dataclass field annotation like 'int | None'."""
    hint = eval(annotation, vars(typing)) if isinstance(annotation, str) else annotation  # noqa: S307
    args = [a for a in typing.get_args(hint) if a is not type(None)] \
        if isinstance(hint, types.UnionType) else [hint]
    return args[0]


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    for f in EngineConfig.option_fields():
        kind = _flag_type(f.type)
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                               help=f.metadata.get("help"))
        else:
            group.add_argument(flag, type=kind, default=f.default, help=f.metadata.get("help"))


def add_sampling_options(parser: argparse.ArgumentParser, **defaults) -> None:
    group = parser.add_argument_group("sampling")
    for f in fields(SamplingParams):
        if f.name not in SAMPLING_FLAGS:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = defaults.get(f.name, f.default if f.default is not MISSING else None)
        if f.name == "stop":
            group.add_argument(flag, action="append", default=None, help="stop string (repeatable)")
        elif f.name == "ignore_eos":
            group.add_argument(flag, action="store_true")
        else:
            group.add_argument(flag, type=_flag_type(f.type), default=default)


def engine_options(args: argparse.Namespace) -> dict:
    return {f.name: getattr(args, f.name) for f in EngineConfig.option_fields()}


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    values = {name: getattr(args, name) for name in SAMPLING_FLAGS}
    values["stop"] = values["stop"] or []
    return SamplingParams(**values)


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"got {text!r}, must be an integer >= 1")
    return value
