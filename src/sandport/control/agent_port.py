"""The agent port's front door: guest agents' connections, limited, relayed to the agent app.

Every guest is hostile, and the agent port is the one gateway port a guest reaches. This
front owns the listening socket on ``<bridge address>:<agent port>`` and what each
connection may cost (:class:`~sandport.config.AgentLimits`):

* connections per source address (a sandbox): over the cap, 429 at once and closed;
* a head timeout: a connection's first request head (or a later one, from its first
  byte) not complete in time gets 408 and is closed;
* an idle timeout: no byte either way for that long, and the connection is closed;
* a body cap on the bytes read, chunked or not: 413 as soon as the framer sees a size
  over it; nothing of the excess is buffered or reaches the app.

Requests are framed by :class:`~sandport.proto.http1.MessageFramer` and relayed, one by
one, by :class:`~sandport.bridge.passthrough.AppRelay` (with
:class:`~sandport.bridge.passthrough.RelayLimits`) to the agent app on a Unix socket
(mode 0600), marked with the guest's real address in ``X-Forwarded-For``: a header the
app trusts on that socket only, so the identity check (:meth:`Access.check_agent`) still
sees the sandbox's address and a guest cannot name another.

Must not touch: the agent routes and the identity check (:mod:`.agent_api`,
:mod:`.access`); HTTP framing (:mod:`sandport.proto.http1`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
from collections import Counter
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, cast

from sandport.bridge.passthrough import AppRelay, RelayLimits
from sandport.bridge.web import json_response
from sandport.config import AgentLimits
from sandport.control.httpserver import bind_tcp
from sandport.proto.http1 import Phase

log = logging.getLogger(__name__)

__all__ = ["AgentPort"]


class AgentPort:
    """The agent port: TCP from sandboxes, each connection limited and relayed.

    Args:
        host, port: where to listen (the bridge address and the agent port).
        app_socket: the agent app's Unix socket (:class:`.httpserver.HttpServer`).
        limits: what one connection and one source may cost.
    """

    def __init__(self, host: str, port: int, app_socket: Path, limits: AgentLimits) -> None:
        self.host, self.port = host, port
        self.app_socket = str(app_socket)
        self.limits = limits
        self.relay_limits = RelayLimits(max_body=limits.max_body)
        #: Connections open now, per source address (refused ones not counted).
        self.per_source: Counter[str] = Counter()
        #: Connections ended by a limit, by reason (``limit``, ``head_timeout``, ``idle``).
        self.refused: Counter[str] = Counter()
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[_AgentConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._seq = itertools.count(1)

    async def start(self) -> None:
        """Bind and accept.

        Raises:
            PortInUseError: the port is taken.
            UsageError: the address is not this machine's.
        """
        sock = bind_tcp(self.host, self.port, what="agent port")
        self.port = sock.getsockname()[1]
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._connection, sock=sock)
        log.info("agent port on %s:%d (relayed to %s)", self.host, self.port, self.app_socket)

    async def stop(self) -> None:
        """Stop accepting, drop every connection, cancel the relays' connects."""
        # 1. No new connections. 2. Open ones end (an agent retries its report).
        #    3. Relays still connecting to the app are cancelled.
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self._conns):
            conn.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _connection(self) -> _AgentConnection:
        return _AgentConnection(self, f"agent:{self.port}#{next(self._seq)}")

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``coro`` as a task this port tracks (cancelled when it stops)."""
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _AgentConnection(asyncio.Protocol):
    """One guest connection: counted, timed, relayed (the relay's owner)."""

    def __init__(self, port: AgentPort, cid: str) -> None:
        self.port, self.cid = port, cid
        self.transport: asyncio.Transport | None = None
        self.relay: AppRelay | None = None
        self.source = ""
        self.counted = False
        #: When the head being read started (the connection's start for its first one);
        #: None between requests and while a body is read.
        self._head_started: float | None = time.monotonic()
        self._head_index = 0  # the relay's request count when that head started
        self._timer: asyncio.TimerHandle | None = None

    # -- transport callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.source = str(peer[0]) if peer else ""
        with contextlib.suppress(OSError):
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        port = self.port
        self.relay = AppRelay(self, transport, port.app_socket, client_ip=self.source,
                              scheme="http", trusted=False, spawn=port.spawn,
                              limits=port.relay_limits)
        port._conns.add(self)
        if port.per_source[self.source] >= port.limits.max_per_source:
            port.refused["limit"] += 1
            log.warning("%s: refused %s: %d connections open from it already", self.cid,
                        self.source, port.per_source[self.source])
            self._head_started = None
            self.relay.refuse(429, "too_many_connections",
                              f"at most {port.limits.max_per_source} connections at once "
                              "from one sandbox")
            return
        port.per_source[self.source] += 1
        self.counted = True
        self._arm()

    def data_received(self, data: bytes) -> None:
        assert self.relay is not None
        relay = self.relay
        relay.from_client(data)
        requests = relay.requests
        if requests.phase is Phase.HEAD and not requests.at_boundary:  # part of a head
            if self._head_started is None or relay.relayed != self._head_index:
                self._head_started = time.monotonic()
                self._head_index = relay.relayed
        else:
            self._head_started = None

    def eof_received(self) -> bool:
        return self.relay is not None and self.relay.client_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.relay is not None:
            self.relay.client_lost()
        self.port._conns.discard(self)
        if self.counted:
            self.counted = False
            self.port.per_source[self.source] -= 1
            if self.port.per_source[self.source] <= 0:
                del self.port.per_source[self.source]

    def pause_writing(self) -> None:
        if self.relay is not None:
            self.relay.pause_app()

    def resume_writing(self) -> None:
        if self.relay is not None:
            self.relay.resume_app()

    # -- the relay's owner --------------------------------------------------------------------

    def upgrade_requested(self, data: bytes) -> None:
        """The agent port has no WebSocket routes: refused, and closed."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(json_response(404, {
                "error": "not_found",
                "message": "the agent port has no WebSocket routes"}).serialize())
            self.transport.close()

    def abort(self) -> None:
        """End the connection now (the port stops)."""
        if self.transport is not None:
            self.transport.abort()

    # -- timeouts -----------------------------------------------------------------------------

    def _deadline(self) -> tuple[float, str]:
        assert self.relay is not None
        limits = self.port.limits
        idle = self.relay.last_activity + limits.idle_timeout
        if self._head_started is not None:
            head = self._head_started + limits.head_timeout
            if head <= idle:
                return head, "head_timeout"
        return idle, "idle"

    def _arm(self) -> None:
        deadline, _ = self._deadline()
        delay = max(0.0, deadline - time.monotonic())
        self._timer = asyncio.get_running_loop().call_later(delay, self._check)

    def _check(self) -> None:
        self._timer = None
        if self.transport is None or self.transport.is_closing() or self.relay is None:
            return
        deadline, why = self._deadline()
        if time.monotonic() < deadline:
            self._arm()
            return
        limits = self.port.limits
        self.port.refused[why] += 1
        if why == "head_timeout":
            log.info("%s: %s sent no complete request head in %.1f s: closed", self.cid,
                     self.source, limits.head_timeout)
            if not self.relay.refuse(408, "head_timeout",
                                     f"no complete request head in {limits.head_timeout} s"):
                self.transport.close()
        else:
            log.info("%s: %s idle for %.1f s: closed", self.cid, self.source,
                     limits.idle_timeout)
            self.transport.close()
