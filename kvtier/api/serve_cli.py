"""``kvtier serve [--config FILE] [--host HOST] [--port PORT]``: run the service with uvicorn."""

from __future__ import annotations

import argparse
import ctypes
import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from kvtier.config import KVTierConfig

log = logging.getLogger("kvtier.serve")


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the REST service (config file + KVTIER_* environment overrides)")
    p.add_argument("--config", default=None, help="JSON config file (default: built-in defaults)")
    p.add_argument("--host", default=None, help="interface to listen on (default: server.host of the config)")
    p.add_argument("--port", type=_port, default=None, help="port, 0-65535 (default: server.port of the config)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(serve=serve)


def _port(text: str) -> int:
    """A TCP port: an integer from 0 (any free one) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (0-65535)")
    return port


def serve(args: argparse.Namespace) -> int:
    """Load the config, build the stores and serve until stopped. A config or store that cannot start (a bad
    file or value, a disk folder that cannot be made, Redis unreachable) is one line on stderr, ``kvtier serve:
    ...``, and exit status 2."""
    import uvicorn

    from kvtier.errors import KVTierError

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app, config = _start(args.config)
    except (KVTierError, OSError, ValueError) as exc:
        print(f"kvtier serve: {exc}", file=sys.stderr)
        return 2
    # h11, whatever else is installed: it copies a body part that is not ``bytes`` before its send returns, so a
    # fetch may send chunks borrowed from a tier and give them back once sent (httptools hands the part to the
    # transport, which may keep a view of it until the socket takes it).
    uvicorn.run(app, host=args.host or config.server.host, port=config.server.port if args.port is None else args.port,
                log_level=args.log_level, timeout_keep_alive=30, http="h11")  # engines keep their connections
    return 0


def _start(path: str | None) -> tuple[FastAPI, KVTierConfig]:
    """The app for the config at ``path`` (defaults and environment when None), its stores built, and the config."""
    import torch

    from kvtier.api.app import create_app
    from kvtier.config import KVTierConfig

    config = KVTierConfig.load(path)
    if not config.tenants and not config.open_access:
        log.warning("no tenants are configured and open_access is off: every tenant request will get 401 "
                    "(configure tenants, or set KVTIER_OPEN_ACCESS=true for local use)")
    if sum(t.quota_bytes is None for t in config.tenants) + config.open_access > 1:
        log.warning("tenants without a quota share one partition: their puts can evict each other's chunks "
                    "(give each a quota_bytes to isolate it)")
    keep_freed_memory()
    if config.server.torch_threads is not None:
        torch.set_num_threads(config.server.torch_threads)
    return create_app(config), config


def keep_freed_memory() -> None:
    """Have glibc keep freed large blocks (up to 256 MiB at the heap's top) instead of unmapping them: request
    bodies and chunk copies then reuse warm pages instead of page-faulting fresh ones on every request, which
    costs several times the copy itself."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: its maximum; larger blocks are still mapped
    libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
