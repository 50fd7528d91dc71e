"""Port-forward specs in the syntax users know from docker and podman.

::

    -p [HOSTIP:]HOSTPORT:GUESTPORT[/PROTO]       15901:5901, 127.0.0.1:8080:80/tcp
    -p [HOSTIP:]HOSTRANGE:GUESTRANGE[/PROTO]     15900-15909:5900-5909
    -p [HOSTIP:]:GUESTPORT[/PROTO]               any free host port (shown by `forward list`)
    PROTO = tcp (default) | udp | tcp+udp        [V6]:HOSTPORT:GUESTPORT for IPv6

A range maps port by port, so both sides must be the same length. One spec may expand to
several :class:`PortMapping`; :func:`check_overlaps` refuses two mappings that would bind
the same host address, port and protocol.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from sandport.errors import UsageError

SYNTAX = (
    "[HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp|/tcp+udp], e.g. 15901:5901, "
    "127.0.0.1:8080:80/tcp, 15900-15909:5900-5909, 5353:53/udp"
)
PROTOCOLS = ("tcp", "udp")
MAX_RANGE = 1024  # one spec expands to at most this many mappings
DEFAULT_HOST_IP = "127.0.0.1"


class PortSpecError(UsageError):
    """A -p spec that does not parse; the message shows the syntax."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PortMapping:
    """One host port forwarded to one guest port over one protocol.

    Attributes:
        host_ip: the address the host side binds.
        host_port: the host port; 0 means "pick a free one".
        guest_port: the port inside the sandbox.
        protocol: ``tcp`` or ``udp``.
    """

    host_ip: str
    host_port: int
    guest_port: int
    protocol: str = "tcp"

    def __str__(self) -> str:
        host = f"[{self.host_ip}]" if ":" in self.host_ip else self.host_ip
        return f"{host}:{self.host_port}:{self.guest_port}/{self.protocol}"


def _error(spec: str, why: str) -> PortSpecError:
    return PortSpecError(f"invalid port spec {spec!r}: {why}", hint=f"use {SYNTAX}")


def _port(text: str, spec: str, *, allow_zero: bool) -> int:
    if not (text.isascii() and text.isdigit()):  # '²'.isdigit(), but int('²') fails
        raise _error(spec, f"{text!r} is not a port number")
    value = int(text)
    if not (0 if allow_zero else 1) <= value <= 65535:
        raise _error(spec, f"port {value} is outside {0 if allow_zero else 1}-65535")
    return value


def _ports(text: str, spec: str, *, allow_zero: bool) -> range:
    first, dash, last = text.partition("-")
    lo = _port(first, spec, allow_zero=allow_zero)
    hi = _port(last, spec, allow_zero=allow_zero) if dash else lo
    if hi < lo:
        raise _error(spec, f"range {text} runs backwards")
    if lo == 0 and dash:
        raise _error(spec, "a range cannot start at port 0")
    if hi - lo + 1 > MAX_RANGE:
        raise _error(spec, f"range {text} has more than {MAX_RANGE} ports")
    return range(lo, hi + 1)


def parse_port_spec(spec: str, *, default_host_ip: str = DEFAULT_HOST_IP) -> list[PortMapping]:
    """Expand one ``-p`` spec into mappings.

    Raises:
        PortSpecError: with the accepted syntax, when ``spec`` does not parse.
    """
    text = spec.strip()
    if not text:
        raise _error(spec, "it is empty")
    text, slash, proto_text = text.partition("/")
    protocols: tuple[str, ...] = ("tcp",)
    if slash:
        protocols = tuple(p for p in proto_text.lower().split("+") if p)
        if not protocols or any(p not in PROTOCOLS for p in protocols) or (
            len(set(protocols)) != len(protocols)
        ):
            raise _error(spec, f"protocol {proto_text!r} is not tcp, udp or tcp+udp")
    host_ip = default_host_ip
    if text.startswith("["):  # [V6]:HOST:GUEST
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise _error(spec, "an IPv6 host address is written [ADDR]:HOSTPORT:GUESTPORT")
        host_ip, text = text[1:close], text[close + 2 :]
        parts = text.split(":")
        if len(parts) != 2:
            raise _error(spec, "expected [ADDR]:HOSTPORT:GUESTPORT")
        host_text, guest_text = parts
    else:
        parts = text.split(":")
        if len(parts) == 2:
            host_text, guest_text = parts
        elif len(parts) == 3:
            host_ip, host_text, guest_text = parts
        else:
            raise _error(spec, "expected HOSTPORT:GUESTPORT with an optional HOSTIP: before")
    try:
        host_ip = str(ipaddress.ip_address(host_ip))
    except ValueError:
        raise _error(spec, f"{host_ip!r} is not an IP address") from None
    guest = _ports(guest_text, spec, allow_zero=False)
    if host_text in ("", "0"):  # any free host port for each guest port
        host_ports = [0] * len(guest)
    else:
        host = _ports(host_text, spec, allow_zero=False)
        if len(host) != len(guest):
            raise _error(spec, f"the host range has {len(host)} ports, the guest range "
                         f"{len(guest)}: they map port by port")
        host_ports = list(host)
    return [
        PortMapping(host_ip=host_ip, host_port=hp, guest_port=gp, protocol=proto)
        for proto in protocols
        for hp, gp in zip(host_ports, guest, strict=True)
    ]


def check_overlaps(mappings: list[PortMapping], existing: dict[PortMapping, str]) -> None:
    """Refuse a mapping whose host side another mapping (new or ``existing``) already has.

    Args:
        mappings: the new mappings.
        existing: mappings in use, each with a description of its owner.

    Raises:
        PortSpecError: naming the port and its owner.
    """
    taken: dict[tuple[str, int, str], str] = {}
    wildcard = {"0.0.0.0", "::"}
    for m, owner in existing.items():
        taken[(m.host_ip, m.host_port, m.protocol)] = owner
    for m in mappings:
        if m.host_port == 0:
            continue
        for (ip, port, proto), owner in taken.items():
            same_ip = ip == m.host_ip or ip in wildcard or m.host_ip in wildcard
            if port == m.host_port and proto == m.protocol and same_ip:
                raise PortSpecError(
                    f"host port {m.host_ip}:{m.host_port}/{m.protocol} is already forwarded "
                    f"by {owner}",
                    hint="choose another host port or remove that forward first",
                )
        taken[(m.host_ip, m.host_port, m.protocol)] = f"another -p spec ({m})"
