"""`tuili serve`: load the model, then run the app under uvicorn until SIGTERM/SIGINT.

On SIGTERM uvicorn stops listening, lets in-flight requests finish for up to --drain-timeout
seconds (then cancels them, which aborts their engine requests), and the engine thread stops.
asyncio sets TCP_NODELAY on every TCP connection it accepts, so tokens leave as they are written.
"""

from __future__ import annotations

import argparse
import logging
import os

import uvicorn

from tuili.errors import InvalidParameter

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
                       help="most requests waiting for their first token; more get 503")
    group.add_argument("--drain-timeout", type=float, default=30.0,
                       help="seconds in-flight requests get to finish after SIGTERM")
    group.add_argument("--log-requests", action=argparse.BooleanOptionalAction, default=False,
                       help="log every HTTP request (uvicorn's access log)")


class _Server(uvicorn.Server):
    """uvicorn's server, telling the app it drains once a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, state):
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig, frame) -> None:
        if not self.state.draining:
            log.info("signal %s: draining in-flight requests (up to %.0fs), then exiting",
                     sig, self.config.timeout_graceful_shutdown)
        self.state.draining = True
        super().handle_exit(sig, frame)


def serve(engine_options: dict, args: argparse.Namespace) -> None:
    if args.max_waiting is not None and args.max_waiting < 1:
        raise InvalidParameter("max_waiting", f"got {args.max_waiting}, must be >= 1")
    from tuili.async_llm import AsyncLLM
    from tuili.server.app import build_app
    from tuili.server.serving import ServerState

    llm = AsyncLLM(**engine_options)
    state = ServerState(llm, args.served_model_name or engine_options["model"], args.api_key,
                        args.max_waiting)
    config = uvicorn.Config(build_app(state), host=args.host, port=args.port,
                            access_log=args.log_requests, log_level="info",
                            timeout_graceful_shutdown=args.drain_timeout)
    log.info("serving %s as %r on http://%s:%d (API key %s)", engine_options["model"],
             state.model_name, args.host, args.port, "required" if args.api_key else "off")
    _Server(config, state).run()
