"""Anti-spoofing on the sandbox ports of a bridge: nftables table ``bridge sandport``.

Bridge port isolation stops port-to-port traffic, not a guest that sends as another: a
guest that takes a neighbour's address and sends gratuitous ARP would take over the
neighbour's host forward, desktop and agent identity (the host's ARP entry and the
bridge's FDB follow whoever spoke last). So every frame a sandbox port (a netns
sandbox's veth host end ``sp-<id>-v``, a VM's TAP ``sp-<id>-t``) brings into the bridge
must carry the sandbox's own MAC and, in IPv4 and ARP, its own address, the way libvirt's
``clean-traffic`` filter and OpenStack port security do::

    table bridge sandport {
      chain pre-<bridge> { type filter hook prerouting priority filter; }
        iifname vmap { "<port>" : jump port-<port>-<bridge>, ... }
      chain port-<port>-<bridge> {
        ether saddr != <mac> counter drop          "mac"
        ip saddr <ip> accept                       (IPv4 from its own address)
        ether type ip counter drop                 "ip"
        arp htype 1 ptype ip hlen 6 plen 4 operation {request, reply}
            saddr ether <mac> saddr ip <ip> accept (ARP for its own address only)
        ether type arp counter drop                "arp"
        counter drop                               "other" (IPv6, VLAN tags, any other type)
      }
    }

Each gateway owns the chains named after its bridge (``-<bridge>`` at the end), as in
``ip sandport``; :func:`apply` rewrites them in one ``nft -f`` transaction to exactly the
ports it is given and deletes the others of its bridge, so a restart after ``kill -9``
leaves exactly the expected set. Every drop is counted (:func:`spoofed`). The guest's MAC
is sandport's choice (:func:`sandbox_mac`, set when the link or NIC is made), never read
from the guest, which could have changed it.

The kernel here has no ``meta ibrname`` (nft_meta_bridge): rules match the port name,
which is unique on the host (``sp-<id>-v``, ``sp-<id>-t``).

Owns: the ``bridge sandport`` table's chains of a gateway. Must not touch: the ports
themselves (:mod:`sandport.net.netlink`) or which sandbox has which (the control layer
tells :func:`apply`).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import re
from dataclasses import dataclass

from sandport.net import nft
from sandport.net.nft import TABLE, NftError, run_script

log = logging.getLogger(__name__)

FAMILY = "bridge"
#: What each counted drop of a port chain stands for (its comment's last word).
REASONS = ("mac", "ip", "arp", "other")
MAC_PREFIX = "52:54:00"  # QEMU's locally administered prefix, for VMs and namespaces alike
_MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")


def sandbox_mac(sandbox_id: str) -> str:
    """The MAC sandport gives a sandbox's guest NIC (veth guest end, VM NIC): stable, from
    the id alone, so an adopting gateway knows it without asking the guest."""
    b = hashlib.sha256(sandbox_id.encode()).digest()
    return f"{MAC_PREFIX}:{b[0]:02x}:{b[1]:02x}:{b[2]:02x}"


@dataclass(frozen=True, slots=True, kw_only=True)
class PortGuard:
    """One sandbox port of the bridge and the only source it may send as.

    Attributes:
        port: the bridge port (``sp-<id>-v``, ``sp-<id>-t``).
        mac: the guest's MAC (lower case).
        ip: the guest's IPv4 address.
    """

    port: str
    mac: str
    ip: str

    def __post_init__(self) -> None:
        if not self.port.startswith("sp-") or not 3 < len(self.port) <= 15 or \
                not self.port.replace("-", "").isalnum():
            raise ValueError(f"bridge port {self.port!r} is not a sandport link name")
        if not _MAC.match(self.mac):
            raise ValueError(f"MAC {self.mac!r} is not lower-case aa:bb:cc:dd:ee:ff")
        ipaddress.IPv4Address(self.ip)


def base_chain(bridge: str) -> str:
    """The gateway's base chain in the bridge table."""
    return f"pre-{bridge}"


def port_chain(port: str, bridge: str) -> str:
    """The chain of one port."""
    return f"port-{port}-{bridge}"


def drop_comment(port: str, reason: str) -> str:
    """The comment of a port's counted drop (one of :data:`REASONS`)."""
    return f"sandport spoof {port} {reason}"


def allow_comment(g: PortGuard) -> str:
    """The comment of a port's ARP accept rule: port, MAC and address, read back by
    :func:`guarded`."""
    return f"sandport allow {g.port} {g.mac} {g.ip}"


def render(bridge: str, ports: list[PortGuard]) -> str:
    """The nft script that makes this gateway's bridge chains guard exactly ``ports``."""
    t = f"{FAMILY} {TABLE}"
    base = base_chain(bridge)
    lines = [f"add table {t}",
             f"add chain {t} {base} {{ type filter hook prerouting priority filter; "
             "policy accept; }",
             f"flush chain {t} {base}"]
    for g in sorted(ports, key=lambda g: g.port):
        chain = port_chain(g.port, bridge)
        lines += [
            f"add chain {t} {chain}",
            f"flush chain {t} {chain}",
            f'add rule {t} {chain} ether saddr != {g.mac} counter drop comment '
            f'"{drop_comment(g.port, "mac")}"',
            f"add rule {t} {chain} ether type ip ip saddr {g.ip} accept",  # its own IPv4
            f'add rule {t} {chain} ether type ip counter drop comment '
            f'"{drop_comment(g.port, "ip")}"',
            f"add rule {t} {chain} ether type arp arp htype 1 arp ptype ip arp hlen 6 "
            f"arp plen 4 arp operation {{ request, reply }} arp saddr ether {g.mac} "
            f'arp saddr ip {g.ip} accept comment "{allow_comment(g)}"',
            f'add rule {t} {chain} ether type arp counter drop comment '
            f'"{drop_comment(g.port, "arp")}"',
            f'add rule {t} {chain} counter drop comment "{drop_comment(g.port, "other")}"',
        ]
    if ports:
        jumps = ", ".join(f'"{g.port}" : jump {port_chain(g.port, bridge)}'
                          for g in sorted(ports, key=lambda g: g.port))
        lines.append(f"add rule {t} {base} iifname vmap {{ {jumps} }}")
    return "\n".join(lines) + "\n"


def own_chains(bridge: str) -> list[str]:
    """Chains of the bridge table that belong to the gateway of ``bridge``."""
    return nft.own_chains(bridge, FAMILY)


def apply(bridge: str, ports: list[PortGuard]) -> None:
    """Make this gateway's bridge chains guard exactly ``ports``, atomically; delete the
    chains of ports no longer given."""
    expected = {base_chain(bridge), *(port_chain(g.port, bridge) for g in ports)}
    script = render(bridge, ports)
    for stray in sorted(set(own_chains(bridge)) - expected):
        script += f"flush chain {FAMILY} {TABLE} {stray}\ndelete chain {FAMILY} {TABLE} {stray}\n"
    run_script(script)
    log.debug("nft: anti-spoofing on %d port(s) of %s", len(ports), bridge)


def remove(bridge: str) -> None:
    """Delete this gateway's bridge chains, and the table once no gateway has any."""
    chains = own_chains(bridge)
    base = base_chain(bridge)
    if chains:  # the base chain first: it jumps to the others
        ordered = sorted(chains, key=lambda c: c != base)
        run_script("".join(f"flush chain {FAMILY} {TABLE} {c}\n" for c in ordered)
             + "".join(f"delete chain {FAMILY} {TABLE} {c}\n" for c in ordered))
    items = nft.table_json(FAMILY)
    if items and not any("chain" in i for i in items):
        try:
            run_script(f"delete table {FAMILY} {TABLE}\n")
        except NftError:  # another gateway added a chain in between: the table stays
            log.debug("table %s %s still in use", FAMILY, TABLE)


def guarded(bridge: str) -> dict[str, tuple[str, str]]:
    """The ports the table guards now: ``{port: (mac, ip)}`` (read back, for checks and
    the doctor)."""
    out: dict[str, tuple[str, str]] = {}
    for rule in _port_rules(bridge):
        words = str(rule.get("comment", "")).split()
        if len(words) == 5 and words[:2] == ["sandport", "allow"]:
            out[words[2]] = (words[3], words[4])
    return out


def _port_rules(bridge: str) -> list[dict[str, object]]:
    """The rules of this gateway's port chains."""
    return [rule for item in nft.table_json(FAMILY) if isinstance(rule := item.get("rule"), dict)
            and str(rule.get("chain", "")).startswith("port-")
            and str(rule.get("chain", "")).endswith(f"-{bridge}")]


def spoofed(bridge: str) -> dict[str, dict[str, int]]:
    """Frames each guarded port's rules dropped: ``{port: {reason: frames}}``."""
    out: dict[str, dict[str, int]] = {}
    for rule in _port_rules(bridge):
        words = str(rule.get("comment", "")).split()
        if len(words) != 4 or words[:2] != ["sandport", "spoof"]:
            continue
        out.setdefault(words[2], {})[words[3]] = nft.packets(rule)
    return out


class PortGuards:
    """The guarded ports of one gateway's bridge, by sandbox; every change rewrites the
    bridge chains (one transaction, under a lock, in a thread).

    A sandbox's port is guarded before its guest runs (after the link is made) and
    released after its link is gone; an adopting gateway guards every sandbox it adopts
    and :meth:`reconcile` then drops what a killed gateway's other sandboxes left.
    """

    def __init__(self, bridge: str) -> None:
        self.bridge = bridge
        self._ports: dict[str, PortGuard] = {}
        self._lock = asyncio.Lock()

    def __contains__(self, sandbox_id: str) -> bool:
        return sandbox_id in self._ports

    def of(self, sandbox_id: str) -> PortGuard | None:
        """The guard of a sandbox's port, or None."""
        return self._ports.get(sandbox_id)

    async def admit(self, sandbox_id: str, port: str, ip: str) -> PortGuard:
        """Guard ``port``: only the sandbox's MAC (:func:`sandbox_mac`) and ``ip`` pass.

        Raises:
            NftError, MissingPackage: the rules could not be written (the sandbox must
                not run unguarded: its creation fails).
        """
        guard = PortGuard(port=port, mac=sandbox_mac(sandbox_id), ip=ip)
        async with self._lock:
            self._ports[sandbox_id] = guard
            try:
                await self._apply()
            except BaseException:
                del self._ports[sandbox_id]
                raise
        return guard

    async def release(self, sandbox_id: str) -> None:
        """Remove a sandbox's rules (its link is gone)."""
        async with self._lock:
            if self._ports.pop(sandbox_id, None) is not None:
                await self._apply()

    async def reconcile(self) -> None:
        """Write exactly the guarded ports (at start: what was adopted)."""
        async with self._lock:
            await self._apply()

    async def close(self) -> None:
        """Delete this gateway's bridge chains (its sandboxes are gone)."""
        async with self._lock:
            self._ports.clear()
            await asyncio.to_thread(remove, self.bridge)

    async def _apply(self) -> None:
        await asyncio.to_thread(apply, self.bridge, list(self._ports.values()))
