"""The `tuili` command: generate, chat, export, serve, router, analyze, bench."""

from __future__ import annotations

import argparse
import sys

from tuili.errors import TuiliError
from tuili.options import add_engine_options, add_sampling_options, engine_options, sampling_params
from tuili.server.serve import add_server_options

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

    from tuili.analysis.commands import add_analyze_parser
    from tuili.bench.commands import add_bench_parser
    from tuili.router.main import add_router_parser

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_server_options(serve)
    add_engine_options(serve)
    serve.set_defaults(func=cmd_serve)

    add_router_parser(sub)
    add_analyze_parser(sub)
    add_bench_parser(sub)
    return parser


def run_launched_rank(args: argparse.Namespace) -> bool:
    """Under torchrun (RANK set), ranks > 0 of a tensor-parallel engine serve rank 0's steps
    instead of running the command; True once such a rank is done."""
    if getattr(args, "tensor_parallel_size", 1) <= 1:
        return False  # no engine of several ranks (the router, say): torch is not imported
    from tuili.distributed.launch import env_rank

    launched = env_rank()
    if launched is None or launched[0] == 0:
        return False
    from tuili.config import EngineConfig
    from tuili.distributed.worker import launched_rank_main

    sys.exit(launched_rank_main(EngineConfig(**engine_options(args)).validate()))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if run_launched_rank(args):
            return
        args.func(args)
    except TuiliError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
