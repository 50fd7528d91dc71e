"""The front door's HTTP half: requests that are not WebSocket upgrades go to the HTTP app.

Owns one client connection while it speaks plain HTTP: :class:`AppRelay` frames every
request the client sends (:class:`~sandport.proto.http1.MessageFramer`), relays it to
the app's Unix socket with the real client marked (:func:`rewrite_head`), relays the
app's answers back as they come, and counts them, so it knows at every moment how many
requests are still unanswered.

A WebSocket upgrade is never relayed, whether it is the connection's first request,
a later one on a keep-alive connection or a pipelined one: once every earlier request
has its answer, the relay hands the upgrade and the bytes after it back to its owner
(the session, :mod:`.session`), which checks it like any other (Origin, token, limits)
and bridges or refuses it. A request that cannot be framed safely gets its 4xx after
the earlier answers, and the connection closes. Must not touch WebSocket framing,
routes or tokens: those are the session's and the router's.

A request refused mid-body (a malformed chunk; with limits, a body over the cap) already
had its head sent to the app, which would wait for the rest for ever: the relay answers
for it once the earlier requests are answered and drops the app's connection, so the
client is never left hanging.

With :class:`RelayLimits` (the agent port's front, :mod:`sandport.control.agent_port`;
the bridge passes none), a request whose content is over a cap is refused with 413 as
soon as the framer sees it, and every refusal is a lingering close: the answer, a FIN,
then the client's bytes read and dropped for a moment, so a client still sending reads
its answer instead of a reset.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, Protocol, cast

from sandport.bridge.web import json_response
from sandport.proto.http1 import (
    Body,
    BodyTooLarge,
    End,
    FramingError,
    Head,
    MessageFramer,
    Role,
)

log = logging.getLogger(__name__)

__all__ = ["AppRelay", "RelayLimits", "RelayOwner", "rewrite_head"]

WRITE_HIGH: Final = 1024 * 1024
WRITE_LOW: Final = 256 * 1024
#: Request fields the relay sets itself; a client's own are dropped (a trusted proxy's
#: ``X-Forwarded-For`` list is kept and extended).
_FORWARDED: Final = (b"x-forwarded-for", b"x-forwarded-proto", b"forwarded")


def rewrite_head(head: Head, client_ip: str, scheme: str, *, trusted: bool) -> bytes:
    """The request head to send the app: the real client marked, no protocol switch.

    Incoming ``X-Forwarded-*``/``Forwarded`` fields are dropped unless the peer is a
    trusted proxy (whose ``X-Forwarded-For`` list is extended), then ``X-Forwarded-For``
    and ``X-Forwarded-Proto`` are added. ``Upgrade`` is dropped: the app never switches
    protocols (WebSocket upgrades never reach it), so its framing and ours stay in step.
    """
    kept = [head.start]
    forwarded_for = b""
    for name, value in head.fields:
        key = name.lower()
        if key in _FORWARDED:
            if trusted and key == b"x-forwarded-for":
                forwarded_for = value + b", "
            continue
        if key == b"upgrade":
            continue
        kept.append(name + b": " + value)
    kept.append(b"X-Forwarded-For: " + forwarded_for + client_ip.encode())
    kept.append(b"X-Forwarded-Proto: " + scheme.encode())
    return b"\r\n".join(kept) + b"\r\n\r\n"


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayLimits:
    """Optional limits of a relay (the bridge's relay has none).

    Attributes:
        max_body: content bytes a request may carry (chunk framing not counted).
        linger: seconds a refused client's bytes are still read (and dropped) after the
            answer and a FIN, before the connection closes.
    """

    max_body: int
    linger: float = 2.0

    def __post_init__(self) -> None:
        if self.max_body < 0 or self.linger < 0:
            raise ValueError("relay limits must not be negative")


class RelayOwner(Protocol):
    """What the relay asks of the session that owns the client connection."""

    cid: str

    def upgrade_requested(self, data: bytes) -> None:
        """Every earlier request is answered: take over with ``data`` (an upgrade request
        head and whatever followed it)."""
        ...


class _Upstream(asyncio.Protocol):
    """The HTTP app's side of a relayed connection."""

    def __init__(self, relay: AppRelay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)

    def data_received(self, data: bytes) -> None:
        self.relay.from_app(data)

    def eof_received(self) -> bool:
        self.relay.app_closed()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.app_closed()

    def pause_writing(self) -> None:
        self.relay.client.pause_reading()

    def resume_writing(self) -> None:
        if not self.relay.handing_over:
            self.relay.client.resume_reading()


class AppRelay:
    """One client connection relayed, request by request, to the HTTP app.

    Args:
        owner: the session; it takes the connection back for a WebSocket upgrade.
        client: the client's transport (the owner stays its protocol).
        app_socket: the app's Unix socket, connected at the first request it must answer.
        client_ip, scheme, trusted: how requests are marked (:func:`rewrite_head`).
        spawn: runs a coroutine as a task the bridge tracks.
    """

    def __init__(self, owner: RelayOwner, client: asyncio.Transport, app_socket: str, *,
                 client_ip: str, scheme: str, trusted: bool,
                 spawn: Callable[[Coroutine[Any, Any, None], str], None],
                 limits: RelayLimits | None = None) -> None:
        self.owner = owner
        self.client = client
        self.app_socket = app_socket
        self.client_ip, self.scheme, self.trusted = client_ip, scheme, trusted
        self._spawn = spawn
        self.limits = limits
        self.requests = MessageFramer(Role.REQUEST,
                                      max_body=limits.max_body if limits else None)
        self.responses = MessageFramer(Role.RESPONSE)
        self.upstream: _Upstream | None = None
        self._connecting = False
        self._out: list[bytes] = []  # for the app, while it is being connected
        #: Requests relayed whose final response has not fully come back.
        self.in_flight = 0
        #: Requests relayed over the connection's life.
        self.relayed = 0
        #: An upgrade (and what followed) waiting for the earlier answers.
        self._held: bytearray | None = None
        #: A request that could not be framed, answered after the earlier ones.
        self._refusal: FramingError | None = None
        self._done = False  # handed over, refused, or the app closed
        #: A request whose head went to the app and whose body has not all come.
        self._open_request = False
        #: That request was refused mid-body (the app never gets the rest).
        self._abandoned = False
        self._linger: asyncio.TimerHandle | None = None
        #: When the last byte came from the client or the app (``time.monotonic()``).
        self.last_activity = time.monotonic()

    @property
    def handing_over(self) -> bool:
        """True while an upgrade or a refusal waits for the earlier answers."""
        return self._held is not None or self._refusal is not None

    # -- the client's bytes -------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        """Frame ``data``; relay requests, hold an upgrade, or refuse what cannot be framed."""
        self.last_activity = time.monotonic()
        if self._done:
            return
        if self._held is not None:
            self._held += data  # reading is paused: at most one read arrives after it
            return
        if self._refusal is not None:
            return
        error: FramingError | None = None
        try:
            events = self.requests.receive_data(data)
        except FramingError as exc:  # what came before it is relayed first
            events, error = exc.events, exc
        i = 0
        while i < len(events):
            event = events[i]
            i += 1
            if isinstance(event, Head):
                if event.upgrade:  # the framer paused after this head
                    if event.websocket_upgrade:
                        self._hold(event)
                        return
                    self.requests.resume()  # another protocol: the app will not switch
                    try:
                        events += self.requests.receive_data(b"")
                    except FramingError as exc:
                        events += exc.events
                        error = exc
                self._relay_head(event)
                self._open_request = True
            elif isinstance(event, Body):
                self._to_app(event.data)
            else:
                self._open_request = False
        if error is not None:
            self._abandoned = self._open_request  # its head went to the app: never answered
            log.info("%s: refused a request from %s: %s", self.owner.cid, self.client_ip,
                     error)
            self._refusal = error
            self.client.pause_reading()
            self._settle()

    def _hold(self, head: Head) -> None:
        self._held = bytearray(head.raw + self.requests.trailing_data())
        self.client.pause_reading()
        self._settle()

    def _relay_head(self, head: Head) -> None:
        self.responses.expect(head.method)
        self.in_flight += 1
        self.relayed += 1
        self._to_app(rewrite_head(head, self.client_ip, self.scheme, trusted=self.trusted))

    def _to_app(self, data: bytes) -> None:
        up = self.upstream.transport if self.upstream is not None else None
        if up is not None:
            up.write(data)
            return
        self._out.append(data)
        if not self._connecting:
            self._connecting = True
            self.client.pause_reading()
            self._spawn(self._connect(), f"{self.owner.cid} http")

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        upstream = _Upstream(self)
        try:
            await loop.create_unix_connection(lambda: upstream, self.app_socket)
        except OSError as exc:
            log.error("%s: the HTTP app at %s is unreachable: %s", self.owner.cid,
                      self.app_socket, exc)
            self._answer(502, "app_unreachable", "the gateway's HTTP app does not answer")
            return
        assert upstream.transport is not None
        self.upstream = upstream
        if self.client.is_closing() or self._done:
            upstream.transport.close()
            return
        out, self._out = self._out, []
        upstream.transport.writelines(out)
        if not self.handing_over:
            self.client.resume_reading()

    def client_eof(self) -> bool:
        """The client ended its side: pass it on, keep the connection for the answers."""
        up = self.upstream.transport if self.upstream is not None else None
        if self.handing_over or self._done or up is None or not up.can_write_eof():
            return False
        up.write_eof()
        return True

    def client_lost(self) -> None:
        """The client connection is gone."""
        self._done = True
        if self._linger is not None:
            self._linger.cancel()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()

    def pause_app(self) -> None:
        """The client reads slower than the app answers."""
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_app(self) -> None:
        """The client caught up."""
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    # -- the app's bytes ----------------------------------------------------------------------

    def from_app(self, data: bytes) -> None:
        """An answer (or part of one) from the app: to the client, and counted."""
        self.last_activity = time.monotonic()
        if self._done:
            return
        self.client.write(data)
        try:
            for event in self.responses.receive_data(data):
                if isinstance(event, End):  # a final answer: one request fewer waits
                    self.in_flight -= 1
        except FramingError as exc:  # our own app: a bug, never a client's doing
            log.error("%s: the HTTP app's answer cannot be framed: %s", self.owner.cid, exc)
            self._done = True
            self.client.close()
            return
        self._settle()

    def app_closed(self) -> None:
        """The app closed the connection: so does the client's, after what is buffered."""
        if self._done:
            return
        self._done = True
        self.client.close()

    # -- handing over -------------------------------------------------------------------------

    def _settle(self) -> None:
        """Once every earlier request is answered: hand an upgrade over, or refuse."""
        if self._done:
            return
        if self._abandoned:  # the refused request is the last relayed; it never completes
            if self.in_flight > 1:
                return
            if not self.in_flight or not self.responses.at_boundary:
                self._detach()  # the app answered it already, or is halfway: no answer
                self._close_client()
                return
        elif self.in_flight:
            return
        if self._refusal is not None:
            exc = self._refusal
            if isinstance(exc, BodyTooLarge):
                self._answer(413, "too_large", str(exc))
            else:
                self._answer(exc.status, "bad_request", f"the request cannot be framed: {exc}")
        elif self._held is not None:
            data, self._held = bytes(self._held), None
            self._detach()
            self.owner.upgrade_requested(data)

    def refuse(self, status: int, error: str, message: str) -> bool:
        """Answer the client with a JSON error and close (the owner's refusals: a head
        timeout, an upgrade it does not take), if nothing is unanswered or half-sent.

        Returns:
            False (nothing written, nothing closed) when an answer cannot go in now.
        """
        if self._done or self.in_flight or not self.responses.at_boundary:
            return False
        self._answer(status, error, message)
        return True

    def _answer(self, status: int, error: str, message: str) -> None:
        self._detach()
        if not self.client.is_closing():
            self.client.write(json_response(status, {"error": error,
                                                     "message": message}).serialize())
            self._close_client()

    def _close_client(self) -> None:
        """Close the client's side; with limits, a lingering close (see the module)."""
        client = self.client
        if self.limits is None or not self.limits.linger or not client.can_write_eof():
            client.close()
            return
        if client.is_closing() or self._linger is not None:
            return
        client.write_eof()
        client.resume_reading()  # drained and dropped (from_client ignores it) until EOF
        self._linger = asyncio.get_running_loop().call_later(self.limits.linger,
                                                              client.close)

    def _detach(self) -> None:
        """The relay is done with the connection; the app's side closes."""
        self._done = True
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()
