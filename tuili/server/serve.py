"""`tuili serve`: load the model, then run the app under uvicorn until SIGTERM/SIGINT.

On SIGTERM uvicorn stops listening and new requests get 503; in-flight ones may finish for up
to --drain-timeout seconds. Then those still running are ended: a stream gets a last SSE error
event and [DONE], a waiting response a 503. The engine thread stops and the process exits 0.
asyncio sets TCP_NODELAY on every TCP connection it accepts, so tokens leave as they are written.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator

import uvicorn

from tuili.errors import InvalidParameter
from tuili.server.limits import ServerLimits, add_limit_options

log = logging.getLogger("tuili")


def add_server_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on")
    group.add_argument("--port", type=int, default=8000, help="port to listen on")
    group.add_argument("--api-key", default=os.environ.get("TUILI_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1, /tokenize, "
                            "/detokenize, /tokenizer_info (default: $TUILI_API_KEY, else none)")
    group.add_argument("--served-model-name", default=None,
                       help="the model name clients send (default: the --model argument)")
    group.add_argument("--max-waiting", type=int, default=1024,
                       help="most sequences (n per prompt) waiting for their first token; more "
                            "get 503")
    group.add_argument("--max-waiting-tokens", type=int, default=None,
                       help="most prompt tokens waiting for their first token; more get 503 "
                            "(default: the KV cache's capacity)")
    group.add_argument("--drain-timeout", type=float, default=30.0,
                       help="seconds in-flight requests get to finish after SIGTERM; then they "
                            "end with an error")
    group.add_argument("--log-requests", action=argparse.BooleanOptionalAction, default=False,
                       help="log every HTTP request (uvicorn's access log)")
    group.add_argument("--tool-call-parser", default="auto",
                       choices=["auto", "hermes", "llama3_json"],
                       help="how tool calls are read from the output (auto: from the chat "
                            "template)")
    add_limit_options(parser.add_argument_group("request limits"))


# After the drain timeout the server ends what still runs itself; uvicorn's own cut (tasks
# cancelled, no error event) only backs it up this much later.
_CUT_GRACE_S = 5.0


class _Server(uvicorn.Server):
    """uvicorn's server, telling the app to drain once a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, state, drain_timeout: float):
        super().__init__(config)
        self.state, self.drain_timeout = state, drain_timeout

    def handle_exit(self, sig, frame) -> None:
        if not self.state.draining:
            log.info("signal %s: draining in-flight requests (up to %gs), then exiting",
                     sig, self.drain_timeout)
        self.state.begin_drain(self.drain_timeout)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises the signal once shut down, so a clean drain would exit "killed
        # by SIGTERM"; the drain is how this server handles SIGTERM, so it exits 0.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve(engine_options: dict, args: argparse.Namespace) -> None:
    for name in ("max_waiting", "max_waiting_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InvalidParameter(name, f"got {value}, must be >= 1")
    if args.drain_timeout < 0:
        raise InvalidParameter("drain_timeout", f"got {args.drain_timeout}, must be >= 0")
    limits = ServerLimits.from_args(args)
    from tuili.async_llm import AsyncLLM
    from tuili.server.app import build_app
    from tuili.server.serving import ServerState

    llm = AsyncLLM(**engine_options)
    max_tokens = args.max_waiting_tokens or llm.kv_cache_tokens
    state = ServerState(llm, args.served_model_name or engine_options["model"], args.api_key,
                        args.max_waiting, max_tokens, limits, args.tool_call_parser)
    config = uvicorn.Config(build_app(state), host=args.host, port=args.port,
                            access_log=args.log_requests, log_level="info",
                            timeout_graceful_shutdown=args.drain_timeout + _CUT_GRACE_S)
    log.info("serving %s as %r on http://%s:%d (API key %s); waiting queue: %d sequences, %d "
             "prompt tokens", engine_options["model"], state.model_name, args.host, args.port,
             "required" if args.api_key else "off", args.max_waiting, max_tokens)
    _Server(config, state, args.drain_timeout).run()
