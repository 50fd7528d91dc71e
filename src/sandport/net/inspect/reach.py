"""Whether an address answers: one raw ICMP echo (:func:`ping`) and one TCP connect.

Owns :class:`PingResult`, :func:`ping` and :func:`connect_outcome`. Each sends at most one
probe and waits at most its ``timeout``; it must not change host state, and must not touch
the socket tables, nftables, links or neighbours (the sibling modules of
:mod:`sandport.net.inspect`). The ICMP wire format lives in
:mod:`sandport.proto.packets.icmp`, not here.

Sources:
    * ICMP echo and destination unreachable: RFC 792.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import secrets
import socket
import struct
import time
from dataclasses import dataclass
from typing import Final

from sandport.net.nsock import namespace_sockets
from sandport.proto.packets.errors import MalformedFrame
from sandport.proto.packets.icmp import ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, IcmpEcho

__all__ = ["PingResult", "connect_outcome", "ping"]

# --- ICMP echo --------------------------------------------------------------------------

ICMP_DEST_UNREACH: Final = 3
ICMP_TIME_EXCEEDED: Final = 11
SOL_RAW: Final = 255  # linux/socket.h; not exported by the socket module
ICMP_FILTER: Final = 1  # linux/icmp.h: bitmask of ICMP types the raw socket drops
IPV4_MIN_HEADER: Final = 20
ICMP_ERROR_HEADER: Final = 8  # type, code, checksum, unused: then the original datagram
_UNREACHABLE: Final = {
    0: "network unreachable",
    1: "host unreachable",
    2: "protocol unreachable",
    3: "port unreachable",
    4: "fragmentation needed",
    5: "source route failed",
    6: "destination network unknown",
    7: "destination host unknown",
    9: "network administratively prohibited",
    10: "host administratively prohibited",
    13: "communication administratively prohibited",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class PingResult:
    """The outcome of one ICMP echo request.

    Attributes:
        ok: An echo reply came back.
        detail: What happened, in words.
        rtt: Round-trip time in seconds when ``ok``, else None.
    """

    ok: bool
    detail: str
    rtt: float | None


def _ip_payload(packet: bytes) -> bytes | None:
    """The payload of an IPv4 packet (what a raw socket receives), None if too short."""
    if len(packet) < IPV4_MIN_HEADER:
        return None
    ihl = (packet[0] & 0x0F) * 4
    return packet[ihl:] if ihl >= IPV4_MIN_HEADER and len(packet) >= ihl else None


def _error_for_us(icmp: bytes, target: bytes, ident: int, seq: int) -> bool:
    """Whether an ICMP error message quotes our echo request to ``target``.

    RFC 792: an error carries the original IP header and the first 8 bytes of its data.
    """
    original = icmp[ICMP_ERROR_HEADER:]
    inner = _ip_payload(original)
    if inner is None or len(inner) < 8:
        return False
    if original[9] != socket.IPPROTO_ICMP or original[16:20] != target:
        return False
    icmp_type, _, _, inner_ident, inner_seq = struct.unpack_from("!BBHHH", inner)
    return bool(icmp_type == ICMP_ECHO_REQUEST and (inner_ident, inner_seq) == (ident, seq))


def ping(address: str, timeout: float = 1.0, netns: str = "") -> PingResult:
    """Send one ICMP echo request to the IPv4 ``address`` and wait for its reply.

    Uses a raw socket (root or CAP_NET_RAW). Other ICMP traffic the socket sees is ignored:
    the reply must carry our random identifier, sequence number and data. A destination
    unreachable or time exceeded message quoting our request ends the wait.

    Args:
        address: An IPv4 address.
        timeout: Seconds to wait for the reply.
        netns: A network namespace file (``/run/netns/NAME``, ``/proc/PID/ns/net``): the
            raw socket is made in there, so the echo goes out from inside it (an
            attached container's address means nothing on the host).

    Returns:
        ``ok`` with the round-trip time, or what went wrong: no reply in time, an ICMP
        error ("host unreachable (ICMP type 3 code 1)"), or the error of the send
        ("No route to host").
    """
    try:
        target = ipaddress.IPv4Address(address)
    except ValueError:
        return PingResult(ok=False, detail=f"not an IPv4 address: {address!r}", rtt=None)
    ident, seq = secrets.randbelow(0x10000), secrets.randbelow(0x10000)
    data = secrets.token_bytes(16)
    request = IcmpEcho(type=ICMP_ECHO_REQUEST, ident=ident, seq=seq, data=data).build()
    try:
        sock = namespace_sockets(netns).socket(
            socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) if netns else \
            socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    except OSError as exc:
        where = f" in {netns}" if netns else ""
        return PingResult(ok=False, detail=f"cannot open a raw ICMP socket{where}: "
                          f"{exc.strerror or exc}", rtt=None)
    with sock:
        wanted = (1 << ICMP_ECHO_REPLY) | (1 << ICMP_DEST_UNREACH) | (1 << ICMP_TIME_EXCEEDED)
        with contextlib.suppress(OSError):  # only an optimisation: we filter below anyway
            sock.setsockopt(SOL_RAW, ICMP_FILTER, struct.pack("=I", ~wanted & 0xFFFFFFFF))
        start = time.monotonic()
        deadline = start + timeout
        try:
            sock.sendto(request, (str(target), 0))
        except OSError as exc:
            return PingResult(ok=False, detail=exc.strerror or str(exc), rtt=None)
        while (remaining := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            try:
                packet, peer = sock.recvfrom(65535)
            except TimeoutError:
                break
            except OSError as exc:
                return PingResult(ok=False, detail=exc.strerror or str(exc), rtt=None)
            icmp = _ip_payload(packet)
            if icmp is None or len(icmp) < ICMP_ERROR_HEADER:
                continue
            if icmp[0] == ICMP_ECHO_REPLY:
                try:
                    echo = IcmpEcho.parse(icmp)
                except MalformedFrame:
                    continue
                if (echo.ident, echo.seq, echo.data) == (ident, seq, data):
                    rtt = time.monotonic() - start
                    return PingResult(ok=True, detail=f"echo reply from {peer[0]} in "
                                      f"{rtt * 1000:.1f} ms", rtt=rtt)
            elif icmp[0] in (ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED) and _error_for_us(
                    icmp, target.packed, ident, seq):
                icmp_type, code = icmp[0], icmp[1]
                what = (_UNREACHABLE.get(code, "destination unreachable")
                        if icmp_type == ICMP_DEST_UNREACH else "time to live exceeded")
                return PingResult(ok=False, detail=f"{what} (ICMP type {icmp_type} code "
                                  f"{code}) from {peer[0]}", rtt=None)
    return PingResult(ok=False, detail=f"no echo reply in {timeout:g} s", rtt=None)


# --- TCP connect ------------------------------------------------------------------------

PORT_MAX: Final = 0xFFFF

def connect_outcome(host: str, port: int, timeout: float = 1.0) -> tuple[str, str]:
    """Try a plain TCP connection and classify what happened.

    Args:
        host: A host name or address.
        port: The TCP port.
        timeout: Seconds to wait for the handshake.

    Returns:
        ``(outcome, detail)``: outcome is ``"open"`` (connected), ``"refused"`` (a reset:
        nothing listens, or a reject rule), ``"no_route"`` (EHOSTUNREACH or ENETUNREACH:
        typically no ARP answer from the host, or no route), ``"timeout"`` (no answer at
        all: a drop rule or a dead host) or ``"error"``; detail is one line of words.
    """
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if not 0 < port <= PORT_MAX:  # getaddrinfo would silently take the port modulo 65536
        return "error", f"{target}: port out of range 1-{PORT_MAX}"
    start = time.monotonic()
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except TimeoutError:
        return "timeout", (f"no answer from {target} in {timeout:g} s "
                           "(a drop rule or a dead host)")
    except ConnectionRefusedError:
        return "refused", f"{target} refused the connection: nothing listens there"
    except socket.gaierror as exc:
        return "error", f"cannot resolve {host}: {exc.strerror or exc}"
    except OSError as exc:
        if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return "no_route", (f"{target}: {exc.strerror} (no route, or the host does not "
                                "answer ARP)")
        return "error", f"{target}: {exc.strerror or exc}"
    except (OverflowError, ValueError) as exc:  # a host string with a NUL, say
        return "error", f"{target}: {exc}"
    with sock:
        elapsed = time.monotonic() - start
    return "open", f"connected to {target} in {elapsed * 1000:.1f} ms"
