"""Read-only host checks for ``sandport doctor``: sockets, nftables drops, reachability, links.

Every function here only looks: it changes no state on the host. Each is synchronous and
bounded (by its ``timeout`` or by the speed of ``/proc`` and netlink), and reports ordinary
failures in its result instead of raising: a missing ``nft``, a vanished process, an
unreachable host or an absent interface are answers, not errors.

The netlink checks (:func:`neighbour_state`, :func:`link_facts`) use pyroute2's synchronous
API, which drives an event loop of its own: async callers MUST run them with
:func:`asyncio.to_thread` (see :mod:`sandport.net.netlink`).

Sources:
    * ``/proc/net/tcp`` format: Linux ``Documentation/networking/proc_net_tcp.rst``;
      ``sock_diag(7)`` for TCP sockets that are only bound.
    * ICMP echo and destination unreachable: RFC 792.
    * nftables JSON: ``libnftables-json(5)``.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pyroute2 import IPRoute, NetlinkError

from sandport.proto.packets.errors import MalformedFrame
from sandport.proto.packets.icmp import ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, IcmpEcho

__all__ = [
    "LinkFacts",
    "NftRuleRef",
    "PingResult",
    "SocketHolder",
    "bound",
    "connect_outcome",
    "link_facts",
    "listeners",
    "neighbour_state",
    "ping",
    "rules_dropping",
]

log = logging.getLogger(__name__)

# --- sockets (/proc/net/{tcp,udp}[6]) -------------------------------------------------------

PROC_NET: Final = Path("/proc/net")
PROC: Final = Path("/proc")
#: ``st`` column of /proc/net/tcp: include/net/tcp_states.h.
TCP_LISTEN: Final = 0x0A
TCP_TIME_WAIT: Final = 0x06
TCP_BOUND_INACTIVE: Final = 13  # a pseudo-state for sock_diag requests only (Linux 6.8)
COMMAND_MAX: Final = 200
_TABLES: Final = {"tcp": ("tcp", "tcp6"), "udp": ("udp", "udp6")}

# sock_diag over netlink (linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h).
NETLINK_SOCK_DIAG: Final = 4
SOCK_DIAG_BY_FAMILY: Final = 20
NLM_F_REQUEST: Final = 0x01
NLM_F_DUMP: Final = 0x300
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
NETLINK_BUFFER: Final = 65536
NETLINK_TIMEOUT: Final = 1.0
#: struct nlmsghdr: length, type, flags, sequence, port id (host byte order).
NLMSG_HEADER: Final = struct.Struct("=IHHII")
#: struct inet_diag_req_v2 without its socket id: family, protocol, ext, pad, states.
INET_DIAG_REQ: Final = struct.Struct("=BBBxI")
INET_DIAG_SOCKID_SIZE: Final = 48
#: struct inet_diag_msg (72 bytes): family, state, timer, retrans; the socket id (sport,
#: dport, both big-endian; src, dst: 16 bytes each, network order; interface; cookie);
#: expires, rqueue, wqueue, uid, inode (host order). The parts we read:
INET_DIAG_MSG_SIZE: Final = 72
INET_DIAG_FAMILY: Final = struct.Struct("=B")  # offset 0
INET_DIAG_SPORT: Final = struct.Struct("!H")  # offset 4
INET_DIAG_SRC: Final = slice(8, 24)
INET_DIAG_INODE: Final = struct.Struct("=I")  # offset 68


@dataclass(frozen=True, slots=True, kw_only=True)
class SocketHolder:
    """One process holding one socket bound to a local port.

    Attributes:
        pid: The process id, 0 if no process of this PID namespace holds the socket.
        command: The process's command line (spaces between arguments, at most 200
            characters), "" when ``pid`` is 0.
        address: The local address, ``"IP:PORT"`` or ``"[IPv6]:PORT"``.
    """

    pid: int
    command: str
    address: str


def _decode_address(field: str) -> str:
    """Decode ``0100007F:1F90`` (or its 32-hex-digit IPv6 form) into ``127.0.0.1:8080``.

    The kernel prints the address as 32-bit words, each in host byte order, and the port
    as a plain number.
    """
    host_hex, port_hex = field.split(":")
    raw = bytes.fromhex(host_hex)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    port = int(port_hex, 16)
    if len(raw) == 4:
        return f"{ipaddress.IPv4Address(raw)}:{port}"
    ip6 = ipaddress.IPv6Address(raw)
    text = f"::ffff:{ip6.ipv4_mapped}" if ip6.ipv4_mapped is not None else str(ip6)
    return f"[{text}]:{port}"


def _sockets(port: int, protocol: str, *, listening_only: bool) -> list[tuple[str, int]]:
    """(address, inode) of every socket of this namespace bound to local ``port``."""
    try:
        tables = _TABLES[protocol]
    except KeyError:
        raise ValueError(f"protocol must be 'tcp' or 'udp', not {protocol!r}") from None
    found: list[tuple[str, int]] = []
    for table in tables:
        try:
            lines = (PROC_NET / table).read_text().splitlines()[1:]
        except OSError:  # no IPv6 in this kernel, or /proc not mounted
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            try:
                local, state, inode = fields[1], int(fields[3], 16), int(fields[9])
                if int(local.rsplit(":", 1)[1], 16) != port:
                    continue
                address = _decode_address(local)
            except (ValueError, IndexError):
                continue
            if protocol == "tcp" and listening_only and state != TCP_LISTEN:
                continue
            if protocol == "tcp" and state == TCP_TIME_WAIT:
                continue  # a closed connection's remnant: no socket, nobody holds the port
            found.append((address, inode))
    if protocol == "tcp" and not listening_only:
        seen = {inode for _, inode in found}
        found += [entry for entry in _bound_inactive(port) if entry[1] not in seen]
    return found


def _recv_all(sock: socket.socket) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each netlink message of a dump, up to NLMSG_DONE or an error."""
    while True:
        data = sock.recv(NETLINK_BUFFER)
        if not data:
            return
        offset = 0
        while offset + NLMSG_HEADER.size <= len(data):
            length, msg_type, _, _, _ = NLMSG_HEADER.unpack_from(data, offset)
            if length < NLMSG_HEADER.size or msg_type in (NLMSG_DONE, NLMSG_ERROR):
                return
            yield msg_type, data[offset + NLMSG_HEADER.size : offset + length]
            offset += (length + 3) & ~3


def _bound_inactive(port: int) -> list[tuple[str, int]]:
    """(address, inode) of TCP sockets bound to ``port`` that neither listen nor connect.

    Such sockets (a port reservation: ``bind()`` without ``listen()``) are in no table that
    ``/proc/net/tcp`` prints; only ``sock_diag`` dumps them, since Linux 6.8 and only when
    asked for the pseudo-state TCP_BOUND_INACTIVE (older kernels return nothing). The
    dump request is ``struct inet_diag_req_v2`` (linux/inet_diag.h) with a zero socket id;
    each answer is a ``struct inet_diag_msg``.
    """
    found: list[tuple[str, int]] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        request = INET_DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0,
                                     1 << TCP_BOUND_INACTIVE) + bytes(INET_DIAG_SOCKID_SIZE)
        header = NLMSG_HEADER.pack(NLMSG_HEADER.size + len(request), SOCK_DIAG_BY_FAMILY,
                                   NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
        try:
            with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
                nl.settimeout(NETLINK_TIMEOUT)
                nl.sendto(header + request, (0, 0))
                messages = list(_recv_all(nl))
        except OSError as exc:
            log.debug("sock_diag dump failed: %s", exc)
            continue
        for _, payload in messages:
            if len(payload) < INET_DIAG_MSG_SIZE:
                continue
            (msg_family,) = INET_DIAG_FAMILY.unpack_from(payload, 0)
            (sport,) = INET_DIAG_SPORT.unpack_from(payload, 4)
            (inode,) = INET_DIAG_INODE.unpack_from(payload, 68)
            raw = payload[INET_DIAG_SRC]
            if sport != port:
                continue
            if msg_family == socket.AF_INET:
                found.append((f"{ipaddress.IPv4Address(raw[:4])}:{sport}", inode))
            else:
                ip6 = ipaddress.IPv6Address(raw)
                text = f"::ffff:{ip6.ipv4_mapped}" if ip6.ipv4_mapped is not None else str(ip6)
                found.append((f"[{text}]:{sport}", inode))
    return found


def _owners(inodes: set[int]) -> dict[int, list[int]]:
    """Map each socket inode in ``inodes`` to the PIDs holding it (via /proc/PID/fd)."""
    owners: dict[int, list[int]] = {}
    if not inodes:
        return owners
    try:
        pids = [int(name) for name in os.listdir(PROC) if name.isdigit()]
    except OSError:
        return owners
    for pid in sorted(pids):
        fd_dir = PROC / str(pid) / "fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                target = os.readlink(fd_dir / fd)
            except OSError:
                continue
            if not target.startswith("socket:["):
                continue
            with contextlib.suppress(ValueError):
                inode = int(target[len("socket:[") : -1])
                holders = owners.setdefault(inode, []) if inode in inodes else None
                if holders is not None and pid not in holders:
                    holders.append(pid)
    return owners


def _command(pid: int) -> str:
    """The command line of ``pid`` (falling back to its ``comm``), truncated; "" if gone."""
    try:
        argv = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
        text = " ".join(a.decode(errors="replace") for a in argv if a)
    except OSError:
        text = ""
    if not text:
        try:
            text = (PROC / str(pid) / "comm").read_text(errors="replace").strip()
        except OSError:
            text = ""
    return text[:COMMAND_MAX]


def _holders(port: int, protocol: str, *, listening_only: bool) -> list[SocketHolder]:
    sockets = _sockets(port, protocol, listening_only=listening_only)
    owners = _owners({inode for _, inode in sockets if inode})
    commands: dict[int, str] = {}
    out: list[SocketHolder] = []
    for address, inode in sockets:
        pids = owners.get(inode, []) if inode else []
        if not pids:
            out.append(SocketHolder(pid=0, command="", address=address))
        for pid in pids:
            if pid not in commands:
                commands[pid] = _command(pid)
            out.append(SocketHolder(pid=pid, command=commands[pid], address=address))
    return sorted(set(out), key=lambda h: (h.address, h.pid))


def listeners(port: int, protocol: str = "tcp") -> list[SocketHolder]:
    """Every process with a socket on local ``port``: for TCP only listening sockets.

    Reads ``/proc/net/tcp`` and ``tcp6`` (``udp`` and ``udp6`` for UDP, any state) of this
    network namespace and finds the holders by scanning ``/proc/*/fd``. A socket no visible
    process holds is reported with ``pid`` 0. Sockets of other network namespaces are not
    visible at all.

    Args:
        port: The local port.
        protocol: ``"tcp"`` or ``"udp"``.

    Returns:
        One entry per (address, process), sorted by address and PID.

    Raises:
        ValueError: ``protocol`` is neither "tcp" nor "udp".
    """
    return _holders(port, protocol, listening_only=True)


def bound(port: int, protocol: str = "tcp") -> list[SocketHolder]:
    """Like :func:`listeners`, but TCP sockets in any state (except TIME_WAIT) count.

    A kernel-mode forward reserves its port with a socket bound without listening (state
    07, CLOSE). ``/proc/net/tcp`` does not list such sockets at all, so for TCP they are
    asked from the kernel through ``sock_diag`` (Linux 6.8 and later; older kernels do not
    report them). Connections accepted on a listener share its local port and count too.
    TIME_WAIT entries are left out: remnants of closed connections that no socket or
    process holds. Several sockets of one process on one address give one entry.

    Raises:
        ValueError: ``protocol`` is neither "tcp" nor "udp".
    """
    return _holders(port, protocol, listening_only=False)


# --- nftables ---------------------------------------------------------------------------

NFT_TIMEOUT: Final = 5.0
#: Our own tables: their drops are the guard's (host isolation, anti-spoofing), which the
#: doctor reads from their counters, not from the rules.
OWN_TABLES: Final = (("ip", "sandport"), ("bridge", "sandport"))
_DROP_VERDICTS: Final = ("drop", "reject")
_POSITIVE_OPS: Final = ("==", "in")
_TEXT_MAX: Final = 200

IPv4Net = ipaddress.IPv4Network


@dataclass(frozen=True, slots=True, kw_only=True)
class NftRuleRef:
    """An nftables rule that drops or rejects traffic of some address.

    Attributes:
        family: Table family (``ip``, ``inet``, ...).
        table: Table name.
        chain: Chain name.
        handle: Rule handle (``nft delete rule FAMILY TABLE CHAIN handle N``).
        verdict: ``"drop"`` or ``"reject"``.
        text: A short human rendering such as ``ip daddr 10.201.0.5 drop`` (close to, but
            not necessarily exactly, nft's own syntax).
    """

    family: str
    table: str
    chain: str
    handle: int
    verdict: str
    text: str


def _ruleset() -> list[dict[str, Any]]:
    """The objects of ``nft -j list ruleset``; [] if nft is missing or fails."""
    nft = shutil.which("nft")
    if nft is None:
        log.debug("nft not found: no rules to inspect")
        return []
    try:
        r = subprocess.run([nft, "-j", "list", "ruleset"], capture_output=True, text=True,
                           timeout=NFT_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("nft -j list ruleset failed: %s", exc)
        return []
    if r.returncode != 0:
        log.warning("nft -j list ruleset failed: %s", r.stderr.strip())
        return []
    try:
        doc = json.loads(r.stdout)
    except ValueError as exc:
        log.warning("nft -j list ruleset printed no JSON: %s", exc)
        return []
    items = doc.get("nftables", []) if isinstance(doc, dict) else []
    return [item for item in items if isinstance(item, dict)]


def _contains(value: Any, address: ipaddress.IPv4Address,
              named_sets: dict[str, list[Any]]) -> bool:
    """Whether an nft JSON right-hand side (address, prefix, range, set) contains ``address``.

    Args:
        value: The ``right`` of a ``match`` or one set element.
        address: The address looked for.
        named_sets: Elements of the named sets of the rule's table, by name.
    """
    if isinstance(value, str):
        if value.startswith("@"):
            return any(_contains(e, address, {}) for e in named_sets.get(value[1:], []))
        with contextlib.suppress(ValueError):
            return ipaddress.IPv4Address(value) == address
        return False
    if not isinstance(value, dict):
        return False
    if "prefix" in value:
        prefix = value["prefix"]
        with contextlib.suppress(ValueError, TypeError, KeyError):
            return address in IPv4Net(f"{prefix['addr']}/{prefix['len']}", strict=False)
        return False
    if "range" in value:
        with contextlib.suppress(ValueError, TypeError, IndexError):
            low, high = (ipaddress.IPv4Address(v) for v in value["range"][:2])
            return low <= address <= high
        return False
    if "set" in value:
        elements = value["set"]
        elements = elements if isinstance(elements, list) else [elements]
        return any(_contains(e, address, named_sets) for e in elements)
    if "elem" in value:  # a set element with options: {"elem": {"val": ..., "timeout": ...}}
        elem = value["elem"]
        return isinstance(elem, dict) and _contains(elem.get("val"), address, named_sets)
    return False


def _mentions(expr: list[Any], address: ipaddress.IPv4Address,
              named_sets: dict[str, list[Any]]) -> bool:
    """Whether the rule's ``ip saddr`` or ``ip daddr`` matches select ``address``.

    For one of the two fields, there must be a positive match (``==``) that contains the
    address and no match on that field that rules it out (``!= 10.0.0.7``, or a second
    positive match that does not contain it): ``ip daddr != 10.0.0.7 ip daddr 10.0.0.0/24
    drop`` drops 10.0.0.5, not 10.0.0.7.
    """
    for field in ("saddr", "daddr"):
        selected = None
        for stmt in expr:
            match = stmt.get("match") if isinstance(stmt, dict) else None
            if not isinstance(match, dict):
                continue
            left = match.get("left")
            payload = left.get("payload") if isinstance(left, dict) else None
            if not (isinstance(payload, dict) and payload.get("protocol") == "ip"
                    and payload.get("field") == field):
                continue
            inside = _contains(match.get("right"), address, named_sets)
            if match.get("op", "==") in _POSITIVE_OPS:
                selected = inside and selected is not False
            elif inside:  # a negated match that names the address: the rule spares it
                selected = False
        if selected:
            return True
    return False


def _verdict(expr: list[Any]) -> str | None:
    """``"drop"`` or ``"reject"`` if a top-level statement of the rule is one."""
    for stmt in expr:
        if isinstance(stmt, dict):
            for verdict in _DROP_VERDICTS:
                if verdict in stmt:
                    return verdict
    return None


def _render_value(value: Any) -> str:
    if isinstance(value, str | int | float):
        return str(value)
    if isinstance(value, list):
        return " . ".join(_render_value(v) for v in value)
    if isinstance(value, dict):
        if "prefix" in value and isinstance(value["prefix"], dict):
            return f"{value['prefix'].get('addr')}/{value['prefix'].get('len')}"
        if "range" in value and isinstance(value["range"], list):
            return "-".join(_render_value(v) for v in value["range"])
        if "set" in value:
            elements = value["set"] if isinstance(value["set"], list) else [value["set"]]
            return "{ " + ", ".join(_render_value(e) for e in elements) + " }"
        if "elem" in value and isinstance(value["elem"], dict):
            return _render_value(value["elem"].get("val"))
        if "payload" in value and isinstance(value["payload"], dict):
            p = value["payload"]
            return f"{p.get('protocol', '')} {p.get('field', '')}".strip()
        if len(value) == 1:
            key, inner = next(iter(value.items()))
            if isinstance(inner, dict) and "key" in inner:  # meta, ct, ...
                return f"{key} {inner['key']}"
            return str(key)
    return json.dumps(value, separators=(",", ":"))


def _render(expr: list[Any]) -> str:
    """A short human rendering of a rule's statements."""
    parts: list[str] = []
    for stmt in expr:
        if not isinstance(stmt, dict) or not stmt:
            continue
        key, body = next(iter(stmt.items()))
        if key == "match" and isinstance(body, dict):
            op = body.get("op", "==")
            shown_op = "" if op in _POSITIVE_OPS else f"{op} "
            parts.append(f"{_render_value(body.get('left'))} {shown_op}"
                         f"{_render_value(body.get('right'))}")
        elif key == "reject" and isinstance(body, dict) and body.get("expr"):
            parts.append(f"reject with {body.get('type', 'icmp')} {body['expr']}")
        else:
            parts.append(key)
    text = " ".join(parts)
    return text if len(text) <= _TEXT_MAX else text[: _TEXT_MAX - 1] + "…"


def rules_dropping(address: str) -> list[NftRuleRef]:
    """Every nftables rule that drops or rejects traffic from or to the IPv4 ``address``.

    A rule counts when a top-level statement is ``drop`` or ``reject`` and its matches on
    ``ip saddr`` (or on ``ip daddr``) select ``address``: a positive match contains it (the
    address itself, a prefix, a range, or an anonymous or named set holding one of these)
    and no negated match (``!=``) on the same field excludes it. Other matches of the rule
    (ports, interfaces) are not evaluated, chain policies are not considered, and the
    tables ``ip sandport`` and ``bridge sandport`` (ours) are skipped.

    Args:
        address: An IPv4 address.

    Returns:
        The rules in ruleset order; [] if ``nft`` is missing or fails, or ``address`` is not
        an IPv4 address.
    """
    try:
        wanted = ipaddress.IPv4Address(address)
    except ValueError:
        return []
    items = _ruleset()
    named_sets: dict[tuple[str, str], dict[str, list[Any]]] = {}
    for item in items:
        nft_set = item.get("set")
        if isinstance(nft_set, dict) and isinstance(nft_set.get("elem"), list):
            key = (str(nft_set.get("family")), str(nft_set.get("table")))
            named_sets.setdefault(key, {})[str(nft_set.get("name"))] = nft_set["elem"]
    found: list[NftRuleRef] = []
    for item in items:
        rule = item.get("rule")
        if not isinstance(rule, dict) or not isinstance(rule.get("expr"), list):
            continue
        family, table = str(rule.get("family", "")), str(rule.get("table", ""))
        if (family, table) in OWN_TABLES:
            continue
        expr = rule["expr"]
        verdict = _verdict(expr)
        if verdict is None or not _mentions(expr, wanted, named_sets.get((family, table), {})):
            continue
        found.append(NftRuleRef(family=family, table=table, chain=str(rule.get("chain", "")),
                                handle=int(rule.get("handle", 0)), verdict=verdict,
                                text=_render(expr)))
    return found


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


def ping(address: str, timeout: float = 1.0) -> PingResult:
    """Send one ICMP echo request to the IPv4 ``address`` and wait for its reply.

    Uses a raw socket (root or CAP_NET_RAW). Other ICMP traffic the socket sees is ignored:
    the reply must carry our random identifier, sequence number and data. A destination
    unreachable or time exceeded message quoting our request ends the wait.

    Args:
        address: An IPv4 address.
        timeout: Seconds to wait for the reply.

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
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    except OSError as exc:
        return PingResult(ok=False, detail=f"cannot open a raw ICMP socket: "
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


# --- netlink: neighbours and links ------------------------------------------------------

NUD_INCOMPLETE: Final = 0x01
NUD_REACHABLE: Final = 0x02
NUD_STALE: Final = 0x04
NUD_DELAY: Final = 0x08
NUD_PROBE: Final = 0x10
NUD_FAILED: Final = 0x20
NUD_NOARP: Final = 0x40
NUD_PERMANENT: Final = 0x80
#: Most telling first: the word for a state, and the order used to pick among entries.
_NUD_NAMES: Final = (
    (NUD_REACHABLE, "reachable"),
    (NUD_PERMANENT, "permanent"),
    (NUD_NOARP, "noarp"),
    (NUD_DELAY, "delay"),
    (NUD_PROBE, "probe"),
    (NUD_STALE, "stale"),
    (NUD_INCOMPLETE, "incomplete"),
    (NUD_FAILED, "failed"),
)
_NUD_RANK: Final = {name: rank for rank, (_, name) in enumerate(_NUD_NAMES)}
IFF_UP: Final = 0x1


def _nud_name(state: int) -> str:
    for bit, name in _NUD_NAMES:
        if state & bit:
            return name
    return "none"


def neighbour_state(address: str) -> str | None:
    """The kernel's neighbour (ARP) state for the IPv4 ``address`` in this namespace.

    Args:
        address: An IPv4 address.

    Returns:
        ``"reachable"``, ``"stale"``, ``"delay"``, ``"probe"``, ``"failed"``,
        ``"incomplete"``, ``"noarp"`` or ``"permanent"`` (``"none"`` for an entry without
        state bits); None if there is no entry, or netlink fails. With entries on several
        interfaces, the most telling state wins (reachable before failed).
    """
    try:
        wanted = str(ipaddress.IPv4Address(address))
    except ValueError:
        return None
    try:
        with IPRoute() as ipr:
            msgs = list(ipr.get_neighbours(family=socket.AF_INET, dst=wanted))
    except (NetlinkError, OSError) as exc:
        log.warning("cannot read the neighbour table: %s", exc)
        return None
    states = [_nud_name(int(m["state"])) for m in msgs if m.get_attr("NDA_DST") == wanted]
    if not states:
        return None
    return min(states, key=lambda s: _NUD_RANK.get(s, len(_NUD_RANK)))


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkFacts:
    """What netlink says about one interface.

    Attributes:
        exists: The interface exists in this namespace (False also if netlink failed).
        up: Administratively up (IFF_UP).
        master: Name of its master device (a bridge for a bridge port), or None.
        addresses: Its IPv4 addresses as ``"a.b.c.d/len"``.
        isolated: For a bridge port, whether it is isolated (``bridge link set ...
            isolated on``); None if it is no bridge port or the kernel does not say.
    """

    exists: bool
    up: bool = False
    master: str | None = None
    addresses: tuple[str, ...] = ()
    isolated: bool | None = None


def _attrs(msg: Any, *path: str) -> Iterator[Any]:
    """Walk nested netlink attributes; yields the value at ``path`` if every step exists."""
    value = msg
    for name in path:
        if value is None or not hasattr(value, "get_attr"):
            return
        value = value.get_attr(name)
    if value is not None:
        yield value


def _isolated(ipr: Any, link: Any, index: int) -> bool | None:
    """IFLA_BRPORT_ISOLATED of a bridge port: from the link's slave data, else AF_BRIDGE."""
    for kind in _attrs(link, "IFLA_LINKINFO", "IFLA_INFO_SLAVE_KIND"):
        if kind != "bridge":
            return None
    for value in _attrs(link, "IFLA_LINKINFO", "IFLA_INFO_SLAVE_DATA", "IFLA_BRPORT_ISOLATED"):
        return bool(value)
    try:
        ports: Iterable[Any] = ipr.brport("show", index=index)
    except (NetlinkError, OSError):
        return None
    for port in ports:
        for value in _attrs(port, "IFLA_PROTINFO", "IFLA_BRPORT_ISOLATED"):
            return bool(value)
    return None


def link_facts(ifname: str) -> LinkFacts:
    """Existence, admin state, master, IPv4 addresses and port isolation of ``ifname``.

    Args:
        ifname: The interface name, in this network namespace.

    Returns:
        The facts; ``LinkFacts(exists=False)`` if there is no such interface (or netlink
        fails, which is logged).
    """
    try:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                return LinkFacts(exists=False)
            index = int(found[0])
            link = ipr.get_links(index)[0]
            master: str | None = None
            master_index = link.get_attr("IFLA_MASTER")
            if master_index:
                masters = ipr.get_links(int(master_index))
                master = str(masters[0].get_attr("IFLA_IFNAME")) if masters else None
            addresses = tuple(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                              for a in ipr.get_addr(family=socket.AF_INET, index=index))
            isolated = _isolated(ipr, link, index) if master is not None else None
    except (NetlinkError, OSError) as exc:
        log.warning("cannot read link %s: %s", ifname, exc)
        return LinkFacts(exists=False)
    return LinkFacts(exists=True, up=bool(int(link["flags"]) & IFF_UP), master=master,
                     addresses=addresses, isolated=isolated)
