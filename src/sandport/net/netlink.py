"""Bridge, veth and network namespaces through netlink (pyroute2); no shelling out to `ip`.

Every function here is idempotent: calling it again converges on the same state, so a
restart after a crash can simply run them again. They block for a few milliseconds, and
async callers MUST run them with :func:`asyncio.to_thread`: pyroute2 0.9's synchronous API
drives an event loop of its own and fails with "this event loop is already running" on a
thread that runs one.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, NetlinkError, NetNS, netns

from sandport.errors import NetworkConflict

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
GUEST_IFNAME = "eth0"


def _addresses(ipr: Any, index: int) -> list[ipaddress.IPv4Interface]:
    out = []
    for msg in ipr.get_addr(index=index, family=2):
        out.append(
            ipaddress.IPv4Interface(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}")
        )
    return out


def _lookup(ipr: Any, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def ensure_bridge(name: str, gateway: ipaddress.IPv4Interface) -> bool:
    """Make bridge ``name`` exist, be up and hold exactly the address ``gateway``.

    Addresses of other subnets on the bridge are removed (a bridge re-addressed by hand
    is the classic cause of unreachable guests) and logged. Returns True if the bridge
    was created.

    Raises:
        NetworkConflict: another interface already holds an address in the subnet (two
            links with one subnet make the host's routes clash), or ``name`` exists and
            is not a bridge.
    """
    created = False
    with IPRoute() as ipr:
        for msg in ipr.get_addr(family=2):
            iface = ipaddress.IPv4Interface(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}")
            owner = msg.get_attr("IFA_LABEL") or str(msg["index"])
            if owner != name and iface.network.overlaps(gateway.network):
                raise NetworkConflict(
                    f"subnet {gateway.network} overlaps {iface} on interface {owner}",
                    hint="choose another --subnet (sandport needs a subnet of its own) or "
                    f"remove that address from {owner}",
                )
        index = _lookup(ipr, name)
        if index is None:
            ipr.link("add", ifname=name, kind="bridge")
            index = _lookup(ipr, name)
            created = True
            log.info("created bridge %s", name)
        else:
            link = ipr.get_links(index)[0]
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            if kind != "bridge":
                raise NetworkConflict(
                    f"interface {name} exists and is a {kind or 'device'}, not a bridge",
                    hint="choose another --bridge name or delete that interface",
                )
        if index is None:
            raise NetworkConflict(f"bridge {name} could not be created", hint="check `dmesg`")
        have = _addresses(ipr, index)
        for iface in have:
            if iface != gateway:
                log.warning("bridge %s had %s; replacing it by %s", name, iface, gateway)
                ipr.addr(
                    "del", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen
                )
        if gateway not in have:
            ipr.addr(
                "add", index=index, address=str(gateway.ip), prefixlen=gateway.network.prefixlen
            )
        ipr.link("set", index=index, state="up")
    return created


def delete_link(name: str) -> bool:
    """Delete interface ``name`` if it exists; True if it did."""
    with IPRoute() as ipr:
        index = _lookup(ipr, name)
        if index is None:
            return False
        try:
            ipr.link("del", index=index)
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise
            return False
    return True


def link_exists(name: str) -> bool:
    """True if interface ``name`` exists in the host namespace."""
    with IPRoute() as ipr:
        return _lookup(ipr, name) is not None


def bridge_ports(bridge: str) -> list[str]:
    """Names of the interfaces enslaved to ``bridge``."""
    with IPRoute() as ipr:
        index = _lookup(ipr, bridge)
        if index is None:
            return []
        return [str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links(master=index)]


def netns_exists(name: str) -> bool:
    """True if the named network namespace exists (/run/netns/NAME)."""
    return (NETNS_DIR / name).exists()


def list_netns(prefix: str) -> list[str]:
    """Named network namespaces whose name starts with ``prefix``."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def netns_inode(name: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) identifying the namespace, to find the processes inside it."""
    try:
        st = os.stat(NETNS_DIR / name)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def create_sandbox_link(
    *,
    netns_name: str,
    host_ifname: str,
    bridge: str,
    address: ipaddress.IPv4Interface,
    gateway: ipaddress.IPv4Address,
    mac: str | None = None,
) -> None:
    """Create a netns wired to ``bridge`` by a veth whose host end is an isolated port.

    Inside: ``lo`` up, ``eth0`` with ``address`` (and the MAC ``mac``, if given: the one
    the bridge's anti-spoofing lets through), default route via ``gateway``. The host
    end is a bridge port with ``isolated on``: sandboxes cannot reach each other, the host
    (the bridge itself) reaches all of them.
    """
    if not netns_exists(netns_name):
        netns.create(netns_name)
    guest_tmp = f"{host_ifname}g"
    with IPRoute() as ipr:
        br = _lookup(ipr, bridge)
        if br is None:
            raise NetworkConflict(f"bridge {bridge} vanished", hint="restart the gateway")
        if _lookup(ipr, host_ifname) is None:
            ipr.link(
                "add",
                ifname=host_ifname,
                kind="veth",
                peer={"ifname": guest_tmp, "net_ns_fd": netns_name},
            )
        index = _lookup(ipr, host_ifname)
        ipr.link("set", index=index, master=br, state="up")
        ipr.brport("set", index=index, isolated=1)
    with NetNS(netns_name) as ns:
        peer = _lookup(ns, guest_tmp)
        if peer is not None:
            ns.link("set", index=peer, ifname=GUEST_IFNAME)
        index = _lookup(ns, GUEST_IFNAME)
        if index is None:
            raise NetworkConflict(
                f"namespace {netns_name} has no {GUEST_IFNAME}", hint="destroy the sandbox"
            )
        if mac is not None:
            ns.link("set", index=index, address=mac)
        if address not in _addresses(ns, index):
            ns.addr(
                "add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen
            )
        ns.link("set", index=index, state="up")
        lo = _lookup(ns, "lo")
        ns.link("set", index=lo, state="up")
        with contextlib.suppress(NetlinkError):  # EEXIST on a second run
            ns.route("add", dst="0.0.0.0/0", gateway=str(gateway))


def create_tap(ifname: str, bridge: str) -> None:
    """Create TAP device ``ifname`` (for a VM) as an isolated, up port of ``bridge``.

    Like a sandbox's veth end: the host reaches the VM, VMs and sandboxes do not reach
    each other. Idempotent.
    """
    with IPRoute() as ipr:
        br = _lookup(ipr, bridge)
        if br is None:
            raise NetworkConflict(f"bridge {bridge} vanished", hint="restart the gateway")
        if _lookup(ipr, ifname) is None:
            ipr.link("add", ifname=ifname, kind="tuntap", mode="tap")
        index = _lookup(ipr, ifname)
        ipr.link("set", index=index, master=br, state="up")
        ipr.brport("set", index=index, isolated=1)


def delete_netns(name: str) -> bool:
    """Delete the named namespace if it exists; True if it did.

    Deleting the namespace also deletes the veth end inside it, and with it the host end.
    """
    if not netns_exists(name):
        return False
    netns.remove(name)
    return True


def ipv4_interfaces() -> dict[str, list[str]]:
    """Every interface with an IPv4 address: ``{ifname: [address, ...]}`` (``lo`` included)."""
    out: dict[str, list[str]] = {}
    with IPRoute() as ipr:
        for msg in ipr.get_addr(family=2):
            name = msg.get_attr("IFA_LABEL")
            if name is None:
                continue
            out.setdefault(str(name).split(":")[0], []).append(str(msg.get_attr("IFA_ADDRESS")))
    return out


#: Route lookups for "somewhere beyond this host": documentation addresses (RFC 5737,
#: RFC 3849) that only a default route leads to. Nothing is ever sent to them.
_BEYOND = {4: "198.51.100.1", 6: "2001:db8::1"}


def default_source_address(version: int = 4) -> str | None:
    """The address this host sends from on its default route: the one clients on its
    network most likely reach it by. None without a default route. A route lookup
    (``ip route get``): no packet is sent."""
    with IPRoute() as ipr:
        try:
            routes = ipr.route("get", dst=_BEYOND[version])
        except NetlinkError:  # ENETUNREACH: no default route
            return None
    for route in routes:
        src = route.get_attr("RTA_PREFSRC")
        if src:
            return str(src)
    return None
