"""One client connection of a bridge: its HTTP requests, its handshake, then its frames.

Owns everything that happens on one accepted client connection once the server
(:mod:`.server`) has peeked at it: the phase it is in, the WebSocket opening handshake
(websockets' sans-I/O :class:`~websockets.server.ServerProtocol`), the checks before the
upgrade (Origin, the route's token, limits: asked of the server), the frames after it,
the target connection, timers and the close with a code and a reason. In front-door
mode the connection starts in :attr:`Phase.HTTP`, relayed to the app by
:class:`~sandport.bridge.passthrough.AppRelay`, which hands every WebSocket upgrade back
here. Must not accept sockets, parse PROXY headers or choose TLS: that is the server's.

::

    HTTP ──────► HANDSHAKE ──► OPEN ──► CLOSING ──► CLOSED
     │  (an upgrade)  │          │        ▲
     │                └──────────┼────────┤
     └───────────────────────────┴────────┘

``HTTP``: plain requests relayed to the app (front door only). ``HANDSHAKE``: an upgrade
request is read, checked, its target connected. ``OPEN``: upgraded, frames flow.
``CLOSING``: the session has ended (a close frame sent, a refusal written, or the client
gone) and waits for its transport to go. ``CLOSED``: counted and forgotten.

Data path after the 101: :class:`~sandport.proto.wsframes.FrameReader` streams client
payload to the target as it arrives, unmasked in one pass (fragments are not
reassembled, so a 1 MiB message costs no 1 MiB buffer); target bytes become one binary
message per read, a header written ahead of them. For plain ``ws://`` sessions that
direction is spliced once nothing needs to see the bytes (:mod:`.splicedown`).
Backpressure: when one side's transport buffers more than :data:`WRITE_HIGH`, the other
side stops reading.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import ipaddress
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, cast

from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from sandport.bridge.model import RouteStats, UpgradeRefusal, in_networks, origin_allowed
from sandport.bridge.passthrough import AppRelay
from sandport.bridge.splicedown import SpliceDown
from sandport.bridge.targets import Target
from sandport.bridge.throttle import login_key
from sandport.bridge.web import json_response
from sandport.net.splice import SPLICE_AVAILABLE
from sandport.net.upstream import bound_upstream
from sandport.proto.errors import InvalidTransition
from sandport.proto.rfbwatch import RfbWatch, Watch
from sandport.proto.wsframes import (
    CLOSE_INTERNAL,
    CLOSE_NORMAL,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_UNSUPPORTED,
    Event,
    FrameError,
    FrameReader,
    Opcode,
    close_payload,
    frame_header,
    parse_close,
)

if TYPE_CHECKING:
    from sandport.bridge.model import BridgeRoute
    from sandport.bridge.server import WsBridge

__all__ = [
    "SUBPROTOCOLS",
    "TARGET_CLOSED",
    "TRANSITIONS",
    "Phase",
    "WsSession",
    "target_failed",
]

log = logging.getLogger(__name__)
#: websockets' own per-connection lines ("connection open"); ours carry the session id.
_protocol_log = logging.getLogger(f"{__name__}.protocol")
_protocol_log.setLevel(logging.WARNING)

SUBPROTOCOLS: Final = ("binary", "base64")
WRITE_HIGH: Final = 1024 * 1024  # stop reading the other side above this many buffered bytes
WRITE_LOW: Final = 256 * 1024
CLOSE_TIMEOUT: Final = 5.0  # after our close frame, wait this long for the client's

#: Close reasons when the target ends a session; the hop is ``sandport doctor``'s name for
#: where the path broke (the guest's service closed or reset it; or the guest went away).
TARGET_CLOSED: Final = "the target closed the connection (hop: guest service)"


def target_failed(exc: BaseException) -> str:
    """The close reason for a target connection that failed mid-session."""
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    hop = "guest service" if isinstance(exc, ConnectionResetError) else "guest reachability"
    return f"the target connection failed: {reason} (hop: {hop})"


class Phase(enum.Enum):
    """Where a client connection is (see the module's diagram)."""

    HTTP = enum.auto()
    HANDSHAKE = enum.auto()
    OPEN = enum.auto()
    CLOSING = enum.auto()
    CLOSED = enum.auto()


_P = Phase
TRANSITIONS: Final[dict[Phase, frozenset[Phase]]] = {
    _P.HTTP: frozenset({_P.HANDSHAKE, _P.CLOSING}),
    _P.HANDSHAKE: frozenset({_P.OPEN, _P.CLOSING}),
    _P.OPEN: frozenset({_P.CLOSING}),
    _P.CLOSING: frozenset({_P.CLOSED}),
    _P.CLOSED: frozenset(),
}


def _select_subprotocol(protocol: ServerProtocol,
                        offered: Sequence[Subprotocol]) -> Subprotocol | None:
    for name in SUBPROTOCOLS:
        if name in offered:
            return Subprotocol(name)
    return None


class TargetSide(asyncio.Protocol):
    """The target connection of a session."""

    def __init__(self, session: WsSession) -> None:
        self.session = session
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's too
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        transport.pause_reading()  # until the upgrade is answered
        sock = transport.get_extra_info("socket")
        if sock is not None:  # a guest gone without a word: given up, not waited for
            bound_upstream(sock, self.session.bridge.config.limits.guest_timeout)

    def data_received(self, data: bytes) -> None:
        if self.session.phase is Phase.HANDSHAKE:
            # Before the 101 (uvloop ignores pause_reading() in connection_made()): keep
            # what the guest said first (an RFB banner) for after the upgrade.
            self.early.append(data)
            if self.transport is not None:
                self.transport.pause_reading()
            return
        self.session.from_target(data)

    def eof_received(self) -> bool:
        self.session.close(CLOSE_NORMAL, TARGET_CLOSED)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self.session.close(CLOSE_NORMAL, TARGET_CLOSED)
        else:
            self.session.close(CLOSE_INTERNAL, target_failed(exc))

    def pause_writing(self) -> None:
        self.session.pause_client()

    def resume_writing(self) -> None:
        self.session.resume_client()


class WsSession(asyncio.Protocol):
    """One client connection: its requests, the upgrade, then the bridge to the target."""

    def __init__(self, bridge: WsBridge, cid: str, client: tuple[str, int], tls: bool) -> None:
        self.bridge = bridge
        self.cid = cid
        self.client = client
        self.tls = tls
        lim = bridge.config.limits
        self.ws = ServerProtocol(subprotocols=[Subprotocol(s) for s in SUBPROTOCOLS],
                                 select_subprotocol=_select_subprotocol,
                                 max_size=lim.max_message, logger=_protocol_log)
        #: Front door: plain HTTP first; a bare bridge reads one upgrade request.
        self.phase = Phase.HTTP if bridge.config.app_socket is not None else Phase.HANDSHAKE
        self.transport: asyncio.Transport | None = None
        self.relay: AppRelay | None = None
        self.target: TargetSide | None = None
        self.route: BridgeRoute | None = None
        self.route_stats: RouteStats | None = None
        self.subprotocol: str | None = None
        #: Counted in the bridge's sessions (and its per-client limit).
        self.admitted = False
        self.close_reason = ""
        self.b64_carry = b""
        #: After the 101: the client's frames (websockets' protocol did the handshake).
        self.frames = FrameReader(lim.max_message)
        #: Watches an RFB handshake go by (VNC targets) until ServerInit; then None.
        self.rfb: RfbWatch | None = RfbWatch()
        #: Plain ws: the target→client direction spliced once nothing needs to see it.
        self._zc: SpliceDown | None = None
        #: Whether this session may ever splice (set at the upgrade: plain ws, binary).
        self._zc_possible = False
        self.upgraded_at = 0.0
        self.last_activity = time.monotonic()
        self.ping_outstanding = False
        self._timers: list[asyncio.TimerHandle] = []
        self.to_target = 0
        self.to_client = 0
        self.started = time.monotonic()

    @property
    def ending(self) -> bool:
        """True once the session has ended or is ending."""
        return self.phase is Phase.CLOSING or self.phase is Phase.CLOSED

    def _move(self, new: Phase, reason: str = "") -> None:
        """Take one edge of :data:`TRANSITIONS`; a reason is kept for the close."""
        if new not in TRANSITIONS[self.phase]:
            raise InvalidTransition(f"{self.cid}: {self.phase.name} -> {new.name}")
        self.phase = new
        if reason and not self.close_reason:
            self.close_reason = reason

    # -- client transport callbacks -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's too
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        cfg = self.bridge.config
        if cfg.app_socket is not None:
            self.relay = AppRelay(self, transport, cfg.app_socket, client_ip=self.client[0],
                                  scheme="https" if self.tls else "http",
                                  trusted=in_networks(self.client[0], cfg.trusted_proxies),
                                  spawn=self.bridge.spawn)
            self.bridge.stats.passthrough += 1
        self._arm_handshake_timer()

    def data_received(self, data: bytes) -> None:
        if self.phase is Phase.OPEN or (self.phase is Phase.CLOSING and self.upgraded_at):
            self._receive_frames(data)
        elif self.phase is Phase.HTTP:
            assert self.relay is not None
            self.relay.from_client(data)
        elif self.phase is Phase.HANDSHAKE:
            self.ws.receive_data(data)
            self._process()

    def upgrade_requested(self, data: bytes) -> None:
        """The relay's hand-over: ``data`` starts with a WebSocket upgrade request, and
        every request before it on this connection has been answered."""
        self._move(Phase.HANDSHAKE)
        self._arm_handshake_timer()
        self.ws.receive_data(data)
        self._process()

    def _receive_frames(self, data: bytes) -> None:
        """The hot path: client frames to the target, control frames answered."""
        try:
            events = self.frames.receive_data(data)
        except FrameError as exc:
            # The frames before the violation, in the same read, still reach the target.
            if self._deliver(exc.events):
                self.close(exc.code, exc.reason)
            return
        self._deliver(events)

    def _deliver(self, events: list[tuple[Event, Opcode, bytes, bool]]) -> bool:
        """Data to the target, control frames answered; False once the session closed."""
        pieces: list[bytes] = []
        for kind, op, payload, last in events:
            if kind is Event.DATA:
                if self.phase is not Phase.OPEN:
                    continue
                piece: bytes | None = payload
                error = ""
                if self.subprotocol == "base64":  # text; binary messages holding base64 too
                    piece = self._b64_decode(payload, final=last)
                    if piece is None:
                        error = "base64 subprotocol: the message is not base64"
                elif op is Opcode.TEXT:
                    error = ("text messages are not accepted: send binary (or ask for the "
                             "base64 subprotocol)")
                if error:  # what came before still reaches the target
                    self._to_target(pieces)
                    self.close(CLOSE_UNSUPPORTED, error)
                    return False
                if piece:
                    pieces.append(piece)
            elif kind is Event.PING:
                if self.phase is Phase.OPEN:
                    self._send_frame(Opcode.PONG, payload)
            elif kind is Event.PONG:
                self.ping_outstanding = False
            else:
                # What came before the close frame goes to the target first.
                self._to_target(pieces)
                pieces = []
                self._on_client_close(payload)
                return False
        self._to_target(pieces)
        return True

    def _to_target(self, pieces: list[bytes]) -> None:
        target = self.target.transport if self.target is not None else None
        if not pieces or target is None or target.is_closing():
            return
        if self.rfb is not None:
            for piece in pieces:
                self._watch(self.rfb.from_client(piece))
        n = sum(map(len, pieces))
        target.writelines(pieces)
        self.last_activity = time.monotonic()
        self.to_target += n
        self.bridge.stats.bytes_to_target += n
        if self.route_stats is not None:
            self.route_stats.bytes_to_target += n

    def _on_client_close(self, payload: bytes) -> None:
        try:
            code, reason = parse_close(payload)
        except FrameError as exc:
            self.close(exc.code, exc.reason)
            return
        if self.phase is Phase.OPEN:  # echo the close (section 5.5.1), then end the TCP side
            detail = "" if code is None else f" ({code} {reason})".replace(" )", ")")
            self._move(Phase.CLOSING, f"the client closed{detail}")
            self._send_frame(Opcode.CLOSE, b"" if code is None else close_payload(code, ""))
        self._close_target()
        if self._zc is not None:
            self._zc.stop()  # its descriptor would keep the connection open
        if self.transport is not None:
            self.transport.close()  # the server closes TCP first (section 7.1.1)

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        if self._zc is not None and not self._zc.stopped:
            self._zc.send(frame_header(opcode, len(payload)) + payload)
        elif self.transport is not None:
            self.transport.writelines((frame_header(opcode, len(payload)), payload))

    def eof_received(self) -> bool:
        if self.phase is Phase.HTTP:
            assert self.relay is not None
            keep_open = self.relay.client_eof()
            # A TLS transport closes after the client's close_notify whatever this
            # returns, and asyncio warns on True: keeping the write side is plain TCP's.
            return keep_open and not self.tls
        if self.phase is Phase.HANDSHAKE:
            self.ws.receive_eof()
            self._process()
            return False
        # Upgraded: the client's TCP side ended without a close frame.
        if self.phase is Phase.OPEN:
            self._move(Phase.CLOSING, "the client went away")
        self._close_target()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.relay is not None:
            self.relay.client_lost()
        if not self.ending:
            self._move(Phase.CLOSING, "the client went away" if exc is None else
                       f"the client connection failed: {getattr(exc, 'strerror', None) or exc}")
        self._finish()

    def pause_writing(self) -> None:
        if self.phase is Phase.HTTP and self.relay is not None:
            self.relay.pause_app()
        elif self.target is not None and self.target.transport is not None:
            self.target.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.phase is Phase.HTTP and self.relay is not None:
            self.relay.resume_app()
        elif self.target is not None and self.target.transport is not None \
                and self.phase is Phase.OPEN:
            self.target.transport.resume_reading()

    def pause_client(self) -> None:
        """The target's buffer is full: stop reading the client."""
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_client(self) -> None:
        """The target drained: read the client again."""
        if self.transport is not None and not self.ending:
            self.transport.resume_reading()

    # -- events -------------------------------------------------------------------------------

    def _process(self) -> None:
        """Before the upgrade: the request, or websockets' own answer to a bad one."""
        for event in self.ws.events_received():
            if isinstance(event, Request):
                if self.transport is not None:
                    self.transport.pause_reading()
                self.bridge.spawn(self._handle_request(event), f"{self.cid} handshake")
        self._flush()
        if self.ws.state is State.CLOSED or self.ws.close_expected():
            # Not an HTTP request websockets could parse: it answered (or not); end.
            if not self.ending:
                self._move(Phase.CLOSING, "not a valid request")
            if self.transport is not None:
                self.transport.close()

    def _b64_decode(self, chunk: bytes, *, final: bool) -> bytes | None:
        data = self.b64_carry + chunk
        cut = len(data) if final else len(data) - len(data) % 4
        self.b64_carry = data[cut:]
        try:
            return base64.b64decode(data[:cut], validate=True)
        except (binascii.Error, ValueError):
            return None

    def from_target(self, data: bytes) -> None:
        """Bytes from the target: one message to the client."""
        if self.phase is not Phase.OPEN:
            return
        self.last_activity = time.monotonic()
        self.to_client += len(data)
        self.bridge.stats.bytes_to_client += len(data)
        if self.route_stats is not None:
            self.route_stats.bytes_to_client += len(data)
        if self.subprotocol == "base64":
            self._send_frame(Opcode.TEXT, base64.b64encode(data))
        else:
            self._send_frame(Opcode.BINARY, data)
        if self.rfb is not None:
            self._watch(self.rfb.from_server(data))
        if self._zc_possible and self._zc is None and self._zero_copy_ready():
            self._start_zero_copy()

    # -- zero-copy downstream (plain ws) ------------------------------------------------------

    def _zero_copy_ready(self) -> bool:
        """Whether the target→client bytes may bypass Python from now on."""
        target = self.target.transport if self.target is not None else None
        return (self.rfb is None and self.phase is Phase.OPEN
                and self.transport is not None and not self.transport.is_closing()
                and self.transport.get_write_buffer_size() == 0
                and target is not None and not target.is_closing())

    def _start_zero_copy(self) -> None:
        assert self.transport is not None
        assert self.target is not None
        assert self.target.transport is not None
        client = self.transport.get_extra_info("socket")
        target = self.target.transport.get_extra_info("socket")
        if client is None or target is None:
            return
        self.target.transport.pause_reading()  # from now on SpliceDown reads the target
        try:
            self._zc = SpliceDown(client.fileno(), target.fileno(), on_data=self._spliced,
                                  on_target_end=self._zc_target_end,
                                  on_client_error=self._zc_client_error)
        except OSError as exc:  # out of descriptors or pipes: stay on the copy path
            log.warning("%s: no zero-copy downstream: %s", self.cid, exc)
            self.target.transport.resume_reading()
            return
        self.bridge.stats.spliced += 1
        log.debug("%s: downstream spliced (zero-copy)", self.cid)

    def _spliced(self, n: int) -> None:
        self.last_activity = time.monotonic()
        self.to_client += n
        self.bridge.stats.bytes_to_client += n
        if self.route_stats is not None:
            self.route_stats.bytes_to_client += n

    def _zc_target_end(self, exc: OSError | None) -> None:
        if exc is None:
            # A socket's error is reported once: when the target's own transport (writing
            # upstream) met it first (ETIMEDOUT, ECONNRESET), the splice sees a plain end
            # and that transport's connection_lost(exc) is already queued. Close after it,
            # so the close reason is the error, not "the target closed".
            asyncio.get_running_loop().call_soon(self.close, CLOSE_NORMAL, TARGET_CLOSED)
        else:
            self.close(CLOSE_INTERNAL, target_failed(exc))

    def _zc_client_error(self, exc: OSError) -> None:
        if not self.ending:
            self._move(Phase.CLOSING, f"the client connection failed: {exc.strerror or exc}")
        self.abort()

    def _watch(self, state: Watch) -> None:
        if state is Watch.WATCHING:
            return
        self.rfb = None
        rs = self.route_stats
        if state is Watch.SERVER_INIT:
            took = time.monotonic() - self.upgraded_at
            log.info("%s: RFB ServerInit %.0f ms after the upgrade", self.cid, took * 1000)
            if rs is not None:
                rs.rfb_ready_seconds += took
                rs.rfb_ready_count += 1
        elif state is Watch.FAILED:
            log.info("%s: the RFB server refused the handshake (wrong password?)", self.cid)
            if rs is not None:
                rs.rfb_failed += 1
        logins = self.bridge.logins
        if logins is not None and state is Watch.SERVER_INIT:
            logins.succeeded(self.login_key)
        elif logins is not None and state is Watch.FAILED:
            block = logins.failed(self.login_key, time.monotonic())
            if block:
                log.warning("%s: %s failed VNC authentication %d times within %g s: its new "
                            "sessions there are refused for %g s", self.cid, self.client[0],
                            logins.config.failures, logins.config.window, block)

    @property
    def login_key(self) -> str:
        """What failed VNC logins are counted by: the client's address and the sandbox
        (one guesser does not lock a client out of other sandboxes' desktops)."""
        sandbox = self.route.labels[0] if self.route is not None else ""
        return login_key(self.client[0], sandbox)

    def _flush(self) -> None:
        if self.transport is None:
            return
        out = self.ws.data_to_send()
        if out:
            for chunk in out:
                if chunk:
                    self.transport.write(chunk)
                elif self.transport.can_write_eof() and not self.tls:  # EOF from the protocol
                    with contextlib.suppress(OSError, RuntimeError):
                        self.transport.write_eof()

    # -- handshake ----------------------------------------------------------------------------

    def _arm_handshake_timer(self) -> None:
        loop = asyncio.get_running_loop()
        self._timers.append(loop.call_later(self.bridge.config.limits.handshake_timeout,
                                            self._handshake_timeout))

    def _handshake_timeout(self) -> None:
        """No complete request in time. Once the app answers a request, its own keep-alive
        timeout ends an idle connection instead."""
        waiting = (self.phase is Phase.HANDSHAKE and not self.admitted) or (
            self.phase is Phase.HTTP and self.relay is not None and not self.relay.relayed)
        if waiting:
            log.info("%s: no complete request from %s within %.0f s: closed", self.cid,
                     self.client[0], self.bridge.config.limits.handshake_timeout)
            self.abort()

    def _real_client(self, request: Request) -> None:
        trusted = self.bridge.config.trusted_proxies
        if not trusted or not in_networks(self.client[0], trusted):
            return
        hops = [h.strip() for h in ",".join(request.headers.get_all("X-Forwarded-For"))
                .split(",") if h.strip()]
        for hop in reversed(hops):  # rightmost first: the closest proxy appended it
            if not in_networks(hop, trusted):
                with contextlib.suppress(ValueError):
                    self.client = (str(ipaddress.ip_address(hop)), 0)
                return

    def _check_request(self, request: Request) -> BridgeRoute | None:
        """The route of an upgrade request, or None for a plain GET (answered here).

        Raises:
            UpgradeRefusal: a header twice, an Origin not allowed, or the route's refusal.
        """
        bridge = self.bridge
        for name in ("Host", "Upgrade", "Origin", "Sec-WebSocket-Key"):
            if len(request.headers.get_all(name)) > 1:
                raise UpgradeRefusal(400, "bad_request",
                                     f"the request has more than one {name} header")
        self._real_client(request)
        if request.headers.get("Upgrade", "").lower() != "websocket":
            self._respond(bridge.web_response(request))
            return None
        origins = bridge.config.origins
        origin = request.headers.get("Origin")
        # Browsers always send Origin; other clients (probes, scripts) send none. Pages
        # of this server (its noVNC) are same-origin: allowed besides --origin.
        if origins and origin is not None and not origin_allowed(
                origin, origins, scheme="https" if self.tls else "http",
                host=request.headers.get("Host", "")):
            raise UpgradeRefusal(403, "origin_not_allowed",
                                 f"Origin {origin!r} is not allowed (cross-site WebSocket "
                                 f"requests are refused; allowed: this server's own pages, "
                                 f"{', '.join(origins)})")
        return bridge.resolve(request)

    async def _connect(self, route: BridgeRoute) -> None:
        """Count the session and connect its target, or refuse with why.

        Raises:
            UpgradeRefusal: over a limit, or the target refused, timed out or is
                unreachable (503 while the sandbox starts, with the doctor's finding).
        """
        bridge = self.bridge
        bridge.admit(self)
        self.admitted = True
        try:
            await bridge.connect_target(self, route.target)
        except UpgradeRefusal as r:
            bridge.release(self)
            self.admitted = False
            if route.starting and r.status in (502, 504):
                raise UpgradeRefusal(503, "not_ready", f"the sandbox is starting: {r.message}; "
                                     "try the same URL again", [("Retry-After", "2")],
                                     hop=r.hop) from None
            if route.diagnosis:
                r.message = f"{r.message}; sandport doctor: {route.diagnosis}"
            raise
        except BaseException:
            bridge.release(self)
            self.admitted = False
            raise

    async def _handle_request(self, request: Request) -> None:
        bridge = self.bridge
        try:
            route = self._check_request(request)
            if route is None:
                return
            self.route = route
            response = self.ws.accept(request)
            if response.status_code != 101:  # not a valid WebSocket handshake
                self._respond(response)
                return
            await self._connect(route)
            if self.ending:  # the client went away while we connected
                self._close_target()
                return
            self._open(response, route.target)
        except UpgradeRefusal as r:
            bridge.stats.refused[r.status] += 1
            log.info("%s: %s refused: %d %s", self.cid, self.client[0], r.status, r.message)
            doc = {"error": r.error, "message": r.message}
            if r.hop:
                doc["hop"] = r.hop
            self._respond(json_response(r.status, doc, r.headers))
        except Exception:  # a bug must not leave the client waiting for an answer
            log.exception("%s: handling the request from %s failed", self.cid, self.client[0])
            if self.phase is Phase.OPEN:
                self.close(CLOSE_INTERNAL, "internal error in the bridge")
            elif not self.ending:
                bridge.stats.refused[500] += 1
                self._respond(json_response(500, {
                    "error": "internal", "message": "the bridge failed to handle this request; "
                    "its log has the details"}))

    def _open(self, response: Response, target: Target) -> None:
        """Send the 101 and start moving bytes."""
        bridge = self.bridge
        self.subprotocol = response.headers.get("Sec-WebSocket-Protocol")
        self.ws.send_response(response)
        self._move(Phase.OPEN)
        self.upgraded_at = time.monotonic()
        self._zc_possible = (bridge.config.zero_copy and SPLICE_AVAILABLE
                             and not self.tls and self.subprotocol != "base64")
        if self.ws.events_received() or self.ws.reader.buffer:
            # Frames before our 101: RFC 6455 section 4.1 forbids them.
            self._flush()
            self.close(CLOSE_PROTOCOL_ERROR, "data sent before the handshake response")
            return
        bridge.stats.sessions_total += 1
        if self.route_stats is not None:
            self.route_stats.sessions_total += 1
        self._flush()
        log.info("%s: %s%s -> %s (%s%s)", self.cid, self.client[0],
                 f":{self.client[1]}" if self.client[1] else "", target,
                 self.subprotocol or "no subprotocol", ", TLS" if self.tls else "")
        self._start_timers()
        assert self.target is not None
        assert self.target.transport is not None
        early, self.target.early = self.target.early, []
        for chunk in early:
            self.from_target(chunk)
        self.target.transport.resume_reading()
        if self.transport is not None:
            self.transport.resume_reading()

    def _respond(self, response: Response) -> None:
        """Answer the request without an upgrade; the connection closes after it."""
        self.ws.send_response(response)
        self._flush()
        if not self.ending:
            self._move(Phase.CLOSING, f"HTTP {response.status_code}")
        if self.transport is not None:
            self.transport.close()

    # -- timers -------------------------------------------------------------------------------

    def _start_timers(self) -> None:
        lim = self.bridge.config.limits
        loop = asyncio.get_running_loop()
        if lim.idle_timeout:
            self._timers.append(loop.call_later(lim.idle_timeout, self._check_idle))
        if lim.heartbeat:
            self._timers.append(loop.call_later(lim.heartbeat, self._heartbeat))

    def _check_idle(self) -> None:
        lim = self.bridge.config.limits
        assert lim.idle_timeout is not None
        if self.phase is not Phase.OPEN:
            return
        left = self.last_activity + lim.idle_timeout - time.monotonic()
        if left <= 0:
            self.close(CLOSE_NORMAL, f"idle for {lim.idle_timeout:g} s")
            return
        self._timers.append(asyncio.get_running_loop().call_later(left, self._check_idle))

    def _heartbeat(self) -> None:
        lim = self.bridge.config.limits
        assert lim.heartbeat is not None
        if self.phase is not Phase.OPEN:
            return
        if self.ping_outstanding:
            self.close(CLOSE_INTERNAL, f"keepalive: no pong within {lim.heartbeat:g} s")
            return
        self.ping_outstanding = True
        self._send_frame(Opcode.PING, b"sandport")
        self._timers.append(asyncio.get_running_loop().call_later(lim.heartbeat,
                                                                  self._heartbeat))

    # -- ending -------------------------------------------------------------------------------

    def close(self, code: int, reason: str) -> None:
        """Close the WebSocket with ``code`` and ``reason`` (once), and the target."""
        if self.ending:
            return
        was_open = self.phase is Phase.OPEN
        self._move(Phase.CLOSING, reason)
        if was_open:
            self._send_frame(Opcode.CLOSE, close_payload(code, reason))
            if self.transport is not None:
                loop = asyncio.get_running_loop()
                self._timers.append(loop.call_later(CLOSE_TIMEOUT, self.abort))
        elif self.transport is not None:
            self.transport.close()
        self._close_target()

    def abort(self) -> None:
        """Drop both connections now."""
        if not self.ending:
            self._move(Phase.CLOSING)
        if self._zc is not None:
            self._zc.stop()
        if self.transport is not None:
            self.transport.abort()
        if self.target is not None and self.target.transport is not None:
            self.target.transport.abort()
        self._finish()

    def _close_target(self) -> None:
        if self._zc is not None:
            self._zc.stop_target()
        if self.target is not None and self.target.transport is not None:
            self.target.transport.close()

    def _finish(self) -> None:
        if self.phase is Phase.CLOSED:
            return
        if self.transport is not None and not self.transport.is_closing():
            return
        self._move(Phase.CLOSED)
        for t in self._timers:
            t.cancel()
        if self._zc is not None:
            self._zc.stop()
        self._close_target()
        if self.admitted:
            self.bridge.release(self)
            self.bridge.stats.closed[self.close_reason or "closed"] += 1
            if self.route_stats is not None:
                self.route_stats.closed[_reason_kind(self.close_reason)] += 1
            log.info("%s: closed: %s (to target %d B, to client %d B, %.1f s)", self.cid,
                     self.close_reason or "closed", self.to_target, self.to_client,
                     time.monotonic() - self.started)


def _reason_kind(reason: str) -> str:
    """A close reason as a short label for counters (the text without its numbers)."""
    if not reason:
        return "closed"
    for kind in ("target closed", "idle", "keepalive", "shutting down", "client closed",
                 "client went away", "client connection failed",
                 "target connection failed", "not base64",
                 "text messages", "HTTP"):
        if kind in reason:
            return kind.replace(" ", "_")
    return "other"
