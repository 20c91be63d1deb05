"""`tuili router`: the router under uvicorn."""

from __future__ import annotations

import argparse
import gc
import logging
import os

from tuili.errors import InvalidParameter
from tuili.router.config import RouterConfig

log = logging.getLogger("tuili")


def add_router_parser(sub) -> None:
    p = sub.add_parser("router", help="OpenAI-compatible router over many `tuili serve` workers")
    p.add_argument("--config", help="YAML file: models, their versions (weight, workers), "
                                    "options (README: Router)")
    p.add_argument("--worker", action="append", default=[], metavar="URL",
                   help="a worker whose served models the router offers (repeatable; beside "
                        "or instead of --config)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8080, help="port to listen on")
    p.add_argument("--api-key", action="append", default=None,
                   help="a key clients must send as 'Authorization: Bearer KEY' (repeatable; "
                        "default: $TUILI_API_KEY, else none)")
    p.add_argument("--worker-api-key", default=os.environ.get("TUILI_WORKER_API_KEY"),
                   help="the key the workers want (default: $TUILI_WORKER_API_KEY)")
    p.add_argument("--health-interval", type=float, default=None,
                   help="seconds between health and load polls of each worker (default 1)")
    p.add_argument("--max-body-bytes", type=int, default=4 * 2**20,
                   help="largest request body in bytes; more gets 413")
    p.set_defaults(func=run)


def config_from(args: argparse.Namespace) -> RouterConfig:
    config = RouterConfig.from_yaml(args.config) if args.config else RouterConfig()
    urls = [RouterConfig.from_dict({"workers": [u]}).discover[0] for u in args.worker]
    config.discover = tuple(dict.fromkeys([*config.discover, *urls]))
    if args.worker_api_key:
        config.worker_api_key = args.worker_api_key
    if args.health_interval is not None:
        config.health_interval = args.health_interval
    return config.validate("--config/--worker")


def run(args: argparse.Namespace) -> None:
    import uvicorn

    from tuili.router.app import build_app
    from tuili.router.proxy import Router

    config = config_from(args)
    if args.max_body_bytes < 1:
        raise InvalidParameter("max_body_bytes", f"got {args.max_body_bytes}, must be >= 1")
    keys = args.api_key if args.api_key is not None else (
        [os.environ["TUILI_API_KEY"]] if os.environ.get("TUILI_API_KEY") else [])
    router = Router(config)
    log.info("router on http://%s:%d over %d workers (%s); API key %s", args.host, args.port,
             len(config.workers), ", ".join(config.workers), "required" if keys else "off")
    app = build_app(router, keys, args.max_body_bytes)
    gc.collect()
    gc.freeze()  # what start-up built is never garbage: collections skip it (as the server's do)
    uvicorn.run(app, host=args.host, port=args.port,
                log_level="info", access_log=False)
