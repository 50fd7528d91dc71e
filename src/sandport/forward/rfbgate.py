"""Failed VNC logins through a proxy-mode forward of a desktop's VNC port: counted, and a
client that failed too often is refused with a reason (RFC 6143 section 7.1.2).

Every client of a relayed port reaches the guest's Xvnc from the gateway's address, so
Xvnc's own blacklist cannot tell one client from another (and sandport relaxes it). The
WebSocket bridge already counts failed logins per client address and sandbox
(:class:`~sandport.bridge.throttle.LoginThrottle`); this module makes the TCP relay count
into the same throttle, so failures through either path add up.

For a link of a gated forward (:class:`RfbGate` on :attr:`TcpForward.rfb_gate`), once its
upstream is connected and before the pumps start (:class:`_Handshake`):

* a client whose key (address + sandbox, :func:`~sandport.bridge.throttle.login_key`) is
  blocked never reaches the guest: the gate speaks RFB itself, ``RFB 003.008``, reads the
  client's version and sends the failure the version allows: for 3.7/3.8 a security-types
  list of length 0 followed by the reason string, for 3.3 the security type 0 (invalid)
  and the reason ("too many failed logins from <ip>; try again in N s"); then it closes.
  Counted as ``login_blocked`` among the forward's failures (``/metrics``:
  ``sandport_forward_failures_total{reason="login_blocked"}``);
* any other client's handshake bytes are relayed both ways by readiness callbacks while
  an :class:`~sandport.proto.rfbwatch.RfbWatch` looks at them, until it says SERVER_INIT
  (the count of that key is cleared), FAILED (one failure counted; the reason string and
  the close that follow are relayed by the pumps) or NOT_RFB, or until a side ends, too
  many bytes went by (:data:`WATCH_MAX`) or :data:`WATCH_TIMEOUT` passed. Then the link's
  pumps start as for any connection: after the handshake the gate costs nothing.

Kernel-mode forwards (nft DNAT) carry no byte through sandport and cannot be throttled;
neither can a forward that sends a PROXY header (the guest would not speak RFB first).

Owns: the handshake of a gated link. Must not touch: the pumps and the listener; it calls
its link back (:meth:`_Link._pair`) when the pumps may start, or finishes it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import socket
import struct
import time
from typing import TYPE_CHECKING, Final

from sandport.bridge.throttle import LoginThrottle, login_key
from sandport.proto.rfbwatch import RfbWatch, Watch

if TYPE_CHECKING:
    import asyncio

    from sandport.forward.link import _Link

__all__ = ["LOGIN_BLOCKED", "RfbGate"]

log = logging.getLogger("sandport.forward.tcp")

#: The failure reason a refused client is counted under.
LOGIN_BLOCKED: Final = "login_blocked"
#: Bytes one direction may carry while watched; past it the pumps take over unwatched.
WATCH_MAX: Final = 64 * 1024
#: Seconds a handshake is watched (a person typing a password is slow); then unwatched.
WATCH_TIMEOUT: Final = 120.0
#: Seconds a refused client has to send its ProtocolVersion before it is simply closed.
REFUSE_TIMEOUT: Final = 10.0
#: One read while watching.
_CHUNK: Final = 4096
#: RFC 6143 section 7.1.1: the version the gate offers when it refuses by itself.
_BANNER: Final = b"RFB 003.008\n"
_VERSION_LENGTH: Final = 12
_U32 = struct.Struct("!I")
_U8 = struct.Struct("!B")


def refusal_message(client_version: bytes, reason: str) -> bytes:
    """The server's failure after ``client_version`` (RFC 6143 section 7.1.2; Appendix A
    for 3.3): no security types (3.7+) or type 0 (3.3), then the reason string."""
    text = reason.encode()
    minor = client_version[8:11]
    if client_version.startswith(b"RFB 003.") and minor.isdigit() and int(minor) < 7:
        return _U32.pack(0) + _U32.pack(len(text)) + text
    return _U8.pack(0) + _U32.pack(len(text)) + text


def _client_ip(sock: socket.socket) -> str:
    """The client's address (an IPv4-mapped one as IPv4), or "" when unknown."""
    try:
        host = str(sock.getpeername()[0])
    except OSError:
        return ""
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(host)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
    return host


class RfbGate:
    """The gate of one forward: the shared throttle, the sandbox, the refusals counted."""

    __slots__ = ("blocks", "logins", "sandbox")

    def __init__(self, logins: LoginThrottle, sandbox: str) -> None:
        self.logins = logins
        self.sandbox = sandbox
        #: Clients refused because their key was blocked.
        self.blocks = 0

    def watch(self, link: _Link, upstream: socket.socket) -> _Handshake:
        """Take over ``link`` until its handshake is decided (see the module)."""
        return _Handshake(self, link, upstream)


class _Handshake:
    """One link's handshake: watched and relayed, or refused."""

    __slots__ = ("closed", "done", "gate", "key", "link", "loop", "out", "timer",
                 "upstream", "version", "watcher")

    def __init__(self, gate: RfbGate, link: _Link, upstream: socket.socket) -> None:
        self.gate, self.link, self.upstream = gate, link, upstream
        self.loop: asyncio.AbstractEventLoop = link.loop
        ip = _client_ip(link.client)
        self.key = login_key(ip, gate.sandbox)
        self.watcher = RfbWatch()
        #: Bytes waiting for their destination, by the fd they go to.
        self.out: dict[int, bytes] = {}
        self.version = b""
        self.done = self.closed = False
        self.timer: asyncio.TimerHandle | None = None
        wait = gate.logins.retry_after(self.key, time.monotonic())
        if wait > 0:
            self._refuse(ip, wait)
            return
        self.timer = self.loop.call_later(WATCH_TIMEOUT, self._conclude, "timed out")
        self.loop.add_reader(link.client.fileno(), self._on_readable, link.client, upstream)
        self.loop.add_reader(upstream.fileno(), self._on_readable, upstream, link.client)

    # -- refusing -----------------------------------------------------------------------------

    def _refuse(self, ip: str, wait: float) -> None:
        """Blocked: never reach the guest; say why in RFB and close."""
        gate, link = self.gate, self.link
        gate.blocks += 1
        after = math.ceil(wait)
        log.info("%s: %s is blocked after failed VNC logins to sandbox %s; refused for %d "
                 "s more", link.cid, ip, gate.sandbox, after)
        reason = f"too many failed logins from {ip}; try again in {after} s"
        self.upstream.close()  # the guest is never asked
        try:
            link.client.send(_BANNER)
        except OSError:
            link.finish(reset=True)
            return
        self.timer = self.loop.call_later(REFUSE_TIMEOUT, self._give_up)
        self.loop.add_reader(link.client.fileno(), self._on_version, reason)

    def _give_up(self) -> None:
        log.debug("%s: a refused client sent no RFB version: closed", self.link.cid)
        self.link.finish(reset=True)

    def _on_version(self, reason: str) -> None:
        client = self.link.client
        try:
            data = client.recv(_VERSION_LENGTH - len(self.version))
        except BlockingIOError:
            return
        except OSError:
            self.link.finish(reset=True)
            return
        self.version += data
        if data and len(self.version) < _VERSION_LENGTH:
            return
        if data:
            with contextlib.suppress(OSError):
                client.send(refusal_message(self.version, reason))
                client.shutdown(socket.SHUT_WR)
        self.link.finish(reset=False)

    # -- watching -----------------------------------------------------------------------------

    def _on_readable(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            data = src.recv(_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            log.debug("%s: RFB handshake: %r; resetting both sides", self.link.cid, exc)
            self.link.count_reset()
            self.link.finish(reset=True)
            return
        if not data:  # end of stream: it stays readable, the pumps pass it on
            self._conclude("a side ended")
            return
        up = src is self.link.client
        try:
            sent = dst.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            log.debug("%s: RFB handshake: %r; resetting both sides", self.link.cid, exc)
            self.link.count_reset()
            self.link.finish(reset=True)
            return
        if sent < len(data):  # hold the rest; read no more from src until it is gone
            self.out[dst.fileno()] = data[sent:]
            self.loop.remove_reader(src.fileno())
            self.loop.add_writer(dst.fileno(), self._on_writable, dst, src)
        link = self.link  # its handshake bytes count as the forward's, like the pumps'
        if up:
            link.pre_up += len(data)
            seen = link.pre_up
            state = self.watcher.from_client(data)
        else:
            link.pre_down += len(data)
            seen = link.pre_down
            state = self.watcher.from_server(data)
        if state is not Watch.WATCHING:
            self._decided(state)
        elif seen > WATCH_MAX:
            self._conclude("too many bytes for a handshake")

    def _on_writable(self, dst: socket.socket, src: socket.socket) -> None:
        rest = self.out.get(dst.fileno(), b"")
        try:
            sent = dst.send(rest)
        except BlockingIOError:
            return
        except OSError:
            self.link.count_reset()
            self.link.finish(reset=True)
            return
        if sent < len(rest):
            self.out[dst.fileno()] = rest[sent:]
            return
        del self.out[dst.fileno()]
        self.loop.remove_writer(dst.fileno())
        if self.done:
            self._hand_over()
        else:
            self.loop.add_reader(src.fileno(), self._on_readable, src, dst)

    def _decided(self, state: Watch) -> None:
        logins, link = self.gate.logins, self.link
        if state is Watch.SERVER_INIT:
            logins.succeeded(self.key)
        elif state is Watch.FAILED:
            block = logins.failed(self.key, time.monotonic())
            log.info("%s: the RFB server refused the handshake (wrong password?)", link.cid)
            if block:
                log.warning("%s: %s failed VNC authentication %d times within %g s: its new "
                            "connections to sandbox %s are refused for %g s", link.cid,
                            self.key.split(" ")[0], logins.config.failures,
                            logins.config.window, self.gate.sandbox, block)
        self._conclude(state.value)

    def _conclude(self, why: str) -> None:
        """Stop watching; the pumps start once what the gate holds is written."""
        if self.done or self.closed:
            return
        self.done = True
        log.debug("%s: RFB handshake watched until %s", self.link.cid, why)
        self._stop_reading()
        if not self.out:
            self._hand_over()

    def _hand_over(self) -> None:
        self.close()
        link = self.link
        if not link.finished:
            link._pair(self.upstream)  # the link's own continuation

    # -- ending -------------------------------------------------------------------------------

    def _stop_reading(self) -> None:
        for sock in (self.link.client, self.upstream):
            with contextlib.suppress(OSError, ValueError):
                self.loop.remove_reader(sock.fileno())

    def close(self) -> None:
        """Remove every callback and timer (the link closes the sockets). Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        self._stop_reading()
        for fd in list(self.out):
            with contextlib.suppress(OSError, ValueError):
                self.loop.remove_writer(fd)
        self.out.clear()
