"""The `tuili` command: generate, chat, export, serve, analyze, bench."""

from __future__ import annotations

import argparse
import sys
import types
import typing
from dataclasses import MISSING, fields

from tuili.bench.serve import add_bench_options
from tuili.config import EngineConfig
from tuili.errors import TuiliError
from tuili.sampling_params import SamplingParams
from tuili.server.serve import add_server_options

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


def cmd_generate(args: argparse.Namespace) -> None:
    from tuili.entry import LLM

    llm = LLM(**engine_options(args))
    params = sampling_params(args)
    for out in llm.stream(args.prompt, params):
        sys.stdout.write(out.outputs[0].delta_text)
        sys.stdout.flush()
    print()


def cmd_chat(args: argparse.Namespace) -> None:
    from tuili.chat import chat_loop

    chat_loop(engine_options(args), sampling_params(args), system=args.system)


def cmd_export(args: argparse.Namespace) -> None:
    from tuili.models.export import export_hf_folder
    from tuili.models.loader import resolve

    path = resolve(args.model)
    print(export_hf_folder(path, args.out))


def cmd_serve(args: argparse.Namespace) -> None:
    from tuili.server.serve import serve

    serve(engine_options(args), args)


def cmd_bench_serve(args: argparse.Namespace) -> None:
    from tuili.bench.serve import run_from_args

    run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuili", description="tuili (推理): LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one prompt, streaming to the terminal")
    gen.add_argument("prompt")
    add_engine_options(gen)
    add_sampling_options(gen, max_tokens=128)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="chat with a model in the terminal")
    chat.add_argument("--system", default=None, help="system prompt")
    add_engine_options(chat)
    add_sampling_options(chat, max_tokens=512, temperature=0.7, top_p=0.9)
    chat.set_defaults(func=cmd_chat)

    export = sub.add_parser("export", help="write a GGUF model out as an HF folder (safetensors)")
    export.add_argument("model", help="GGUF file or alias")
    export.add_argument("out", help="folder to write")
    export.set_defaults(func=cmd_export)

    from tuili.analysis.commands import add_analyze_parser, add_bench_parser

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_server_options(serve)
    add_engine_options(serve)
    serve.set_defaults(func=cmd_serve)

    add_analyze_parser(sub)
    bench = add_bench_parser(sub, add_engine_options)
    bench_serve = bench.add_parser("serve", help="load an OpenAI-compatible server; report "
                                                 "TTFT/TPOT/ITL/E2E, throughput and goodput")
    add_bench_options(bench_serve)
    bench_serve.set_defaults(func=cmd_bench_serve)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except TuiliError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
