"""Running the API: where it may listen, the token, TLS, and uvicorn's timeouts."""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass

from dropkiln.api.token import ensure_token, read_token, write_token
from dropkiln.config import Settings

log = logging.getLogger(__name__)

# uvicorn closes an idle kept-alive connection after this; uploads have their own timeout.
KEEP_ALIVE_S = 5
# How long `systemctl stop` waits for open requests (an SSE stream never ends by itself).
GRACEFUL_S = 3


class ServeRefused(Exception):
    """Not started: the message says why and what to do."""


@dataclass(frozen=True)
class ServeOptions:
    host: str
    port: int
    public: bool = False
    rotate_token: bool = False
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    trusted_proxy: str | None = None
    """A reverse proxy's address whose X-Forwarded-For names the client (rate limits)."""


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback one (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def prepare(settings: Settings, options: ServeOptions) -> list[str]:
    """Check the binding and the token (rotating or making it); returns lines to print."""
    token_path = settings.paths.api_token
    if not settings.paths.db.exists():
        raise ServeRefused(
            f"no dropkiln database at {settings.paths.db}: run 'dropkiln init' or start the daemon"
        )
    notes = []
    if options.rotate_token:
        write_token(token_path)
        notes.append(f"new API token in {token_path} (the old one no longer works)")
    if not is_loopback(options.host):
        if not options.public:
            raise ServeRefused(
                f"{options.host} is not a loopback address: the API would be reachable from "
                "other machines; pass --public to mean it (and put TLS in front, see README)"
            )
        if read_token(token_path) is None:
            raise ServeRefused(
                f"no API token in {token_path}: run 'dropkiln api-token rotate' before "
                "serving on a public address"
            )
    elif ensure_token(token_path):
        notes.append(f"made an API token in {token_path}")
    if bool(options.ssl_certfile) != bool(options.ssl_keyfile):
        raise ServeRefused("TLS needs both --ssl-certfile and --ssl-keyfile")
    return notes


def serve(settings: Settings, options: ServeOptions) -> None:
    """Serve until SIGTERM/SIGINT (uvicorn handles both)."""
    import uvicorn

    from dropkiln.api.app import create_app

    config = uvicorn.Config(
        create_app(settings),
        host=options.host,
        port=options.port,
        log_level=settings.log_level.lower(),
        timeout_keep_alive=KEEP_ALIVE_S,
        timeout_graceful_shutdown=GRACEFUL_S,
        ssl_certfile=options.ssl_certfile,
        ssl_keyfile=options.ssl_keyfile,
        # The client address (for rate limits) is the peer's, unless a proxy is trusted.
        proxy_headers=options.trusted_proxy is not None,
        forwarded_allow_ips=options.trusted_proxy,
        server_header=False,
        lifespan="on",
    )
    uvicorn.Server(config).run()
