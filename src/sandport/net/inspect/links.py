"""Neighbour (ARP) state and interface facts, read over netlink with pyroute2.

Owns :func:`neighbour_state`, :class:`LinkFacts` and :func:`link_facts`. It only reads the
neighbour table and links: it must not change them, and must not touch sockets, nftables
or ICMP (the sibling modules of :mod:`sandport.net.inspect`).

pyroute2's synchronous API drives an event loop of its own: async callers MUST run these
functions with :func:`asyncio.to_thread` (see :mod:`sandport.net.netlink`).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from pyroute2 import IPRoute, NetlinkError

__all__ = ["LinkFacts", "link_facts", "neighbour_state"]

log = logging.getLogger(__name__)

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
