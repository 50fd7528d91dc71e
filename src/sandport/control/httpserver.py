"""uvicorn embedded in the gateway's event loop, on a socket the gateway binds itself.

Binding ourselves turns "address in use" into a clear error (uvicorn would log and call
sys.exit), and calling startup()/shutdown() directly keeps signal handling with the
gateway (uvicorn's serve() would install its own handlers).

Owns: the listening socket and uvicorn's life on it. Must not touch: the apps it serves.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

from sandport.errors import PortInUseError, UsageError

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_SECONDS = 3  # open connections get this long before they are cancelled


def bind_tcp(host: str, port: int, *, what: str) -> socket.socket:
    """A listening TCP socket on ``host:port``.

    Raises:
        PortInUseError: the port is taken.
        UsageError: the address is not one of this machine's.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(host, port, what=what) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise UsageError(f"{host} is not an address of this machine ({what} {host}:{port})",
                             hint="use 127.0.0.1, 0.0.0.0 or one of `ip -br addr`") from None
        raise
    sock.setblocking(False)
    return sock


def bind_unix(path: Path) -> socket.socket:
    """A listening Unix socket at ``path`` (mode 0600: only root talks to the app)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a killed gateway's
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class HttpServer:
    """An ASGI app served by uvicorn, HTTP only (WebSocket upgrades are the bridge's).

    On a TCP port, or on a Unix socket behind a front door (the bridge's,
    :class:`~sandport.bridge.server.WsBridge` with ``app_socket``, or the agent port's,
    :class:`~sandport.control.agent_port.AgentPort`), which marks every request with
    ``X-Forwarded-For``/``-Proto``; only then are those headers trusted.
    """

    def __init__(self, app: ASGIApp, host: str, port: int, *,
                 unix_path: Path | None = None, what: str = "gateway port") -> None:
        self.unix_path = unix_path
        if unix_path is not None:
            self._sock = bind_unix(unix_path)
            self.host, self.port = str(unix_path), 0
        else:
            self._sock = bind_tcp(host, port, what=what)
            self.host = host
            self.port = self._sock.getsockname()[1]
        self._config = uvicorn.Config(
            app,
            ws="none",  # WebSocket upgrades are the bridge's, never the app's
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            date_header=False,
            proxy_headers=unix_path is not None,
            forwarded_allow_ips="*" if unix_path is not None else None,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        )
        self._server = uvicorn.Server(self._config)

    async def start(self) -> None:
        """Serve on the bound socket."""
        self._config.load()
        self._server.lifespan = self._config.lifespan_class(self._config)
        await self._server.startup(sockets=[self._sock])
        log.info("HTTP on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        """Stop accepting, close connections (WebSockets get 1012), wait for them."""
        if self._server.started:
            await self._server.shutdown(sockets=[self._sock])
        else:
            self._sock.close()
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.unix_path.unlink()
