"""`tuili chat`: a terminal conversation, streamed token by token."""

from __future__ import annotations

import sys

from tuili.errors import TuiliError
from tuili.sampling_params import SamplingParams

HELP = "commands: /reset (new conversation), /system TEXT (set system prompt), /exit"


def chat_loop(options: dict, params: SamplingParams, system: str | None = None) -> None:
    from tuili.entry import LLM

    llm = LLM(**options)
    interactive = sys.stdin.isatty()
    print(f"tuili chat — {options['model']}. {HELP}", file=sys.stderr)
    history: list[dict] = []
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = []
            continue
        if line.startswith("/system"):
            system = line.removeprefix("/system").strip() or None
            history = []
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        try:
            prompt = llm.render_chat(messages, add_generation_prompt=True)
            sys.stdout.write("assistant> " if interactive else "")
            reply = ""
            for out in llm.stream(prompt, params):
                delta = out.outputs[0].delta_text
                reply += delta
                sys.stdout.write(delta)
                sys.stdout.flush()
            print()
        except TuiliError as e:
            history.pop()
            print(f"error: {e}", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": reply})
