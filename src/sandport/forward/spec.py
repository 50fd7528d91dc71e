"""Port-forward specs in the syntax users know from docker and podman.

::

    -p [HOSTIP:]HOSTPORT:GUESTPORT[/PROTO]       15901:5901, 127.0.0.1:8080:80/tcp
    -p [HOSTIP:]HOSTRANGE:GUESTRANGE[/PROTO]     15900-15909:5900-5909
    -p [HOSTIP:]:GUESTPORT[/PROTO]               any free host port (shown by `forward list`)
    PROTO = tcp (default) | udp | tcp+udp        [V6]:HOSTPORT:GUESTPORT for IPv6

A range maps port by port, so both sides must be the same length. One spec may expand to
several :class:`PortMapping`; :func:`check_overlaps` refuses two mappings that would bind
the same host address, port and protocol.

A spec that names a guest port the sandbox already exposes (a desktop's VNC 5901, an
attached target's ``--port``) *sets* that port's host side, as docker does, rather than
adding a second forward beside it: :func:`place` sorts a request's mappings onto the
exposed ports. Only the first TCP mapping of an exposed port sets it; a second spec for the
same guest port, the other ports of a range and the UDP half of ``/tcp+udp`` are extra
forwards.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
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
    """A -p spec that does not parse, or two specs of one request that want one host port;
    the message shows the syntax or names both."""


class PortTaken(PortSpecError):
    """A host port that another sandbox's forward already has (the API's 409)."""


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


def check_overlaps(mappings: Sequence[PortMapping], existing: dict[PortMapping, str], *,
                   labels: Sequence[str] | None = None) -> None:
    """Refuse a mapping whose host side another mapping (new or ``existing``) already has.

    Args:
        mappings: the new mappings (one request).
        existing: mappings in use, each with a description of its owner.
        labels: how the request names each new mapping (``-p 18080:80``,
            ``--vnc-port 15901``); default ``-p`` and the mapping.

    Raises:
        PortTaken: another sandbox's forward has the port (naming it).
        PortSpecError: the spec or option of the same request that asked for the port
            first (naming both).
    """
    wildcard = {"0.0.0.0", "::"}
    taken: dict[tuple[str, int, str], tuple[str, bool]] = {
        (m.host_ip, m.host_port, m.protocol): (owner, False) for m, owner in existing.items()}
    for i, m in enumerate(mappings):
        label = labels[i] if labels is not None else f"-p {m}"
        if m.host_port == 0:
            continue
        for (ip, port, proto), (owner, same_request) in taken.items():
            same_ip = ip == m.host_ip or ip in wildcard or m.host_ip in wildcard
            if port != m.host_port or proto != m.protocol or not same_ip:
                continue
            where = f"{m.host_ip}:{m.host_port}/{m.protocol}"
            if same_request:
                raise PortSpecError(f"host port {where} is asked for twice: by {owner} and "
                                    f"by {label}", hint="give each forward its own host port")
            raise PortTaken(f"host port {where} is already forwarded by {owner}",
                                hint="choose another host port or remove that forward first")
        taken[(m.host_ip, m.host_port, m.protocol)] = (label, True)


@dataclass(frozen=True, slots=True, kw_only=True)
class ExposedPort:
    """A guest port a sandbox exposes on its own (its profile's, an attached target's).

    Attributes:
        name: the port's name (``vnc``, ``http``); its forward is called so.
        guest_port: the port inside the sandbox (TCP).
        default: its host side when no ``-p`` names it; None: it gets a forward only when
            a ``-p`` names it.
        label: how messages name ``default`` (``--vnc-port 15901``).
        fixed: an option chose ``default``'s host port: a ``-p`` that sets another one is
            refused (False: it is a default, and a ``-p`` sets it).
    """

    name: str
    guest_port: int
    default: PortMapping | None = None
    label: str = ""
    fixed: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Placement:
    """A request's forwards: those of the exposed ports, then the extra ones.

    Attributes:
        exposed: ``(name, mapping)`` of each exposed port that gets a forward, in the
            order of the exposed ports (the primary first).
        extra: ``(name, mapping)`` of every other forward (``8080/tcp``), in request order.
        asked: the names of the exposed ports whose host side a ``-p`` set.
    """

    exposed: tuple[tuple[str, PortMapping], ...]
    extra: tuple[tuple[str, PortMapping], ...]
    asked: frozenset[str] = frozenset()


def place(mappings: Sequence[PortMapping], exposed: Sequence[ExposedPort], *,
          labels: Sequence[str] | None = None,
          existing: dict[PortMapping, str] | None = None) -> Placement:
    """Sort a request's ``-p`` mappings onto the sandbox's exposed ports and check them.

    The first TCP mapping whose guest port an exposed port has sets that port's host side
    (its one forward); every other mapping is an extra forward. Then every host port of
    the request is checked against the others and against ``existing``.

    Args:
        mappings: the ``-p`` mappings, in request order.
        exposed: the sandbox's exposed ports.
        labels: how the request names each of ``mappings`` (see :func:`check_overlaps`).
        existing: forwards in use, each with its owner.

    Raises:
        UsageError: a ``-p`` sets an exposed port whose host port an option chose
            differently (naming both).
        PortSpecError: two forwards want one host port (naming the owner).
    """
    names = list(labels) if labels is not None else [f"-p {m}" for m in mappings]
    setters: dict[int, int] = {}  # guest port -> index of the mapping that sets it
    ports = {p.guest_port for p in exposed}
    for i, m in enumerate(mappings):
        if m.protocol == "tcp" and m.guest_port in ports and m.guest_port not in setters:
            setters[m.guest_port] = i
    own: list[tuple[str, PortMapping, str]] = []
    for p in exposed:
        i = setters.get(p.guest_port, -1)
        if i < 0:
            if p.default is not None:
                own.append((p.name, p.default, p.label or f"the {p.name} forward"))
            continue
        m = mappings[i]
        if p.fixed and p.default is not None and p.default.host_port and \
                m.host_port != p.default.host_port:
            raise UsageError(
                f"{p.label} and {names[i]} both set the host port of the {p.name} port (guest port "
                f"{p.guest_port})", hint=f"give one of them: {names[i]} alone sets it")
        own.append((p.name, m, names[i]))
    taken = set(setters.values())
    extra = [(f"{m.guest_port}/{m.protocol}", m, names[i])
             for i, m in enumerate(mappings) if i not in taken]
    check_overlaps([m for _, m, _ in own + extra], existing or {},
                   labels=[label for _, _, label in own + extra])
    return Placement(exposed=tuple((n, m) for n, m, _ in own),
                     extra=tuple((n, m) for n, m, _ in extra),
                     asked=frozenset(p.name for p in exposed if p.guest_port in setters))
