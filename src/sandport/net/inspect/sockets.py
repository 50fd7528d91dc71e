"""Which processes hold a local port: ``/proc/net/{tcp,udp}[6]``, ``sock_diag`` and ``/proc/*/fd``.

Owns :class:`SocketHolder`, :func:`listeners` and :func:`bound`, and the reading of the
socket tables, of the ``sock_diag`` dump of bound-only TCP sockets and of the holders'
command lines. It only looks: it must not touch nftables, ICMP, links or neighbours (see
the sibling modules of :mod:`sandport.net.inspect`), and must change no state on the host.

Sources:
    * ``/proc/net/tcp`` format: Linux ``Documentation/networking/proc_net_tcp.rst``;
      ``sock_diag(7)`` for TCP sockets that are only bound.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["SocketHolder", "bound", "listeners"]

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
