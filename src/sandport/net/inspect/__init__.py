"""Read-only host checks for ``sandport doctor``: sockets, nftables drops, reachability, links.

This package only re-exports; the checks live in its modules and this file must hold no
logic of its own:

    * :mod:`.sockets`: who holds a local port (``/proc/net``, ``sock_diag``, ``/proc/*/fd``);
    * :mod:`.nftrules`: which nftables rules drop or reject an address (``nft -j``);
    * :mod:`.reach`: one raw ICMP echo and one TCP connect;
    * :mod:`.links`: neighbour (ARP) state and interface facts over netlink.

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

from sandport.net.inspect.links import LinkFacts, link_facts, neighbour_state
from sandport.net.inspect.nftrules import NftRuleRef, rules_dropping
from sandport.net.inspect.reach import PingResult, connect_outcome, ping
from sandport.net.inspect.sockets import SocketHolder, bound, listeners

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
