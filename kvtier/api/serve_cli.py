"""``kvtier serve [--config FILE] [--host HOST] [--port PORT]``: run the service with uvicorn."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("kvtier.serve")


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the REST service (config file + KVTIER_* environment overrides)")
    p.add_argument("--config", default=None, help="JSON config file (default: built-in defaults)")
    p.add_argument("--host", default=None, help="interface to listen on (default: server.host of the config)")
    p.add_argument("--port", type=int, default=None, help="port (default: server.port of the config)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(serve=serve)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from kvtier.api.app import create_app
    from kvtier.config import KVTierConfig

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = KVTierConfig.load(args.config)
    if not config.tenants and not config.open_access:
        log.warning("no tenants are configured and open_access is off: every tenant request will get 401 "
                    "(configure tenants, or set KVTIER_OPEN_ACCESS=true for local use)")
    quotas = [t.quota_bytes for t in config.tenants]
    if len(quotas) > 1 and (None in quotas or sum(quotas) > max(t.capacity_bytes for t in config.tiers)):
        log.warning("tenant quotas do not partition the store: one tenant's puts can evict another's chunks")
    app = create_app(config)
    uvicorn.run(app, host=args.host or config.server.host, port=config.server.port if args.port is None else args.port,
                log_level=args.log_level, limit_concurrency=None, timeout_keep_alive=30)
    return 0
