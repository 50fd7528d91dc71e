"""sandport's chains in the nftables table ``ip sandport``: kernel forwards, host isolation.

Several gateways can share a host (a user's and a test's), so the table is shared and each
gateway owns only the chains named after its bridge::

    table ip sandport {
      chain pre-<bridge>  { type nat hook prerouting priority dstnat; }   remote clients
      chain out-<bridge>  { type nat hook output priority -100; }          clients on this host
      chain post-<bridge> { type nat hook postrouting priority srcnat; }   replies to 127.0.0.1
      chain in-<bridge>   { type filter hook input priority filter - 10; }    host isolation
      chain fwd-<bridge>  { type filter hook forward priority filter - 10; }  routed traffic
    }

Locally originated packets never pass prerouting: a DNAT rule only there is the classic
"connection refused on localhost" (incident 000), so every forward is written to both hooks.
A client on 127.0.0.1 additionally needs ``route_localnet`` on the bridge (or the kernel
drops the packet as a martian once it leaves ``lo``) and a masquerade so the guest can
answer; :func:`apply` sets both. A remote client's packets are routed from the interface
they arrive on to the bridge, so :func:`apply` turns on IPv4 ``forwarding`` for the bridge
and for the interfaces remote clients arrive on (:func:`ingress_interfaces`), never the
global ``ip_forward``. Remote clients need no SNAT: the guest's default route is the
bridge, and it sees their real address.

**Host settings** (:func:`host_settings`): only what the forwards need, recorded in the
host's ledger (:mod:`sandport.net.sysctl`) before they change and given back when no
forward needs them (the last forward goes, :func:`remove`, or the next start after a
``kill -9`` reconciles). For a rule on a named address that is the interface holding it;
for ``0.0.0.0`` every addressed interface *except* loopback (local clients take the output
hook) and the links of other programs' networks: bridges (``docker0``, ``virbr0``, other
gateways' ``sp-`` bridges), bridge ports, veths and TAPs (:func:`other_links`). Clients
on such a network reach a ``0.0.0.0`` kernel forward when its owner turned ``forwarding``
on there (Docker and libvirt do); otherwise publish on that network's host address
(``-p 172.17.0.1:8080:80``) or use ``--forward-mode proxy``.

Every DNAT rule has a counter. NAT chains only see the first packet of a connection, so
the counter is the number of connections (TCP) or flows (UDP) the rule has translated.

**Host isolation** (a :class:`HostGuard`; guests are hostile). ``route_localnet`` lets a
guest that routes 127.0.0.1 via its gateway reach every host service on loopback
(Kubernetes' CVE-2020-8558), and the bridge address answers for every service bound to
``0.0.0.0``. The input chain therefore lets only this through from the bridge: the agent
port on the gateway address, ICMP echo to it, and replies to connections the host opened
(``ct state established,related``: probes, the bridge, a 127.0.0.1 client's kernel
forward, whose replies are de-NATed to 127.0.0.1). No backend uses DHCP or DNS on the
bridge (addresses are static), so neither is open. Everything else from the bridge is
counted and dropped, 127.0.0.0/8 with a counter of its own; 127.0.0.0/8 is dropped the
same way from every other link where sandport sets ``route_localnet`` (an attached
target's, for kernel forwards), and the gateway address answers only on the bridge and
``lo``. The forward chain routes nothing a guest starts (sandboxes have no way through
the host) and nothing into the bridge but kernel forwards (DNAT) and replies: a client
that routes the pool's subnet via this host does not reach guest services around the
gateway's tokens. Without a guard (tests of forwards alone) only the 127.0.0.0/8 drops
are written, wherever ``route_localnet`` is set.

:func:`apply` replaces this gateway's rules atomically (one ``nft -f`` transaction: flush
and re-add), so running it at start after a ``kill -9`` leaves exactly the expected set,
without duplicates, and stray chains of this gateway are deleted. The guard chains stay
while the gateway is down, so a killed gateway's sandboxes stay contained.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import shutil
import subprocess
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from sandport.errors import MissingPackage, SandportError
from sandport.net import sysctl

log = logging.getLogger(__name__)

TABLE = "sandport"
FAMILY = "ip"
HOOKS = (  # (chain prefix, hook, priority) of the NAT chains
    ("pre", "prerouting", "dstnat"),
    ("out", "output", "-100"),
    ("post", "postrouting", "srcnat"),
)
GUARD_HOOKS = (  # (chain prefix, hook, priority) of the host isolation chains
    ("in", "input", "filter - 10"),
    ("fwd", "forward", "filter - 10"),
)
LOOPBACK_NET = "127.0.0.0/8"
NFT_TIMEOUT = 10.0
WILDCARD = ("0.0.0.0", "")


class NftError(SandportError):
    """nft refused a ruleset; carries nft's own message."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DnatRule:
    """One kernel forward: host address and port to a guest address and port.

    Attributes:
        host_ip: the address clients connect to; ``0.0.0.0`` means every local address.
        host_port: the host port.
        guest_ip: the sandbox's address.
        guest_port: the port inside the sandbox.
        protocol: ``tcp`` or ``udp``.
        egress: the interface the guest is reached through when it is not on the
            gateway's bridge (an attached target's TAP or veth); "" for the bridge.
    """

    host_ip: str
    host_port: int
    guest_ip: str
    guest_port: int
    protocol: str = "tcp"
    egress: str = ""

    def __post_init__(self) -> None:
        if self.protocol not in ("tcp", "udp"):
            raise ValueError(f"protocol {self.protocol!r} is not tcp or udp")
        ipaddress.IPv4Address(self.guest_ip)
        if self.host_ip not in WILDCARD:
            ipaddress.IPv4Address(self.host_ip)
        for port in (self.host_port, self.guest_port):
            if not 1 <= port <= 65535:
                raise ValueError(f"port {port} is outside 1-65535")

    @property
    def comment(self) -> str:
        """The rule's comment: what it forwards, for `nft list` readers."""
        host = "*" if self.host_ip in WILDCARD else self.host_ip
        return f"sandport {self.protocol} {host}:{self.host_port} -> " \
               f"{self.guest_ip}:{self.guest_port}"

    def match(self) -> str:
        """The nft match for packets to this forward's host side."""
        dest = "fib daddr type local" if self.host_ip in WILDCARD else f"ip daddr {self.host_ip}"
        return f"{dest} {self.protocol} dport {self.host_port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class HostGuard:
    """What a gateway's sandboxes may reach on the host (see the module docstring).

    Attributes:
        gateway_ip: the bridge's own address (the guests' gateway).
        agent_port: the agent port on it: the one host service guests may use.
    """

    gateway_ip: str
    agent_port: int

    def __post_init__(self) -> None:
        ipaddress.IPv4Address(self.gateway_ip)
        if not 1 <= self.agent_port <= 65535:
            raise ValueError(f"agent port {self.agent_port} is outside 1-65535")


def chain_names(bridge: str) -> list[str]:
    """This gateway's NAT chains (the forwards')."""
    return [f"{prefix}-{bridge}" for prefix, _, _ in HOOKS]


def guard_chain_names(bridge: str) -> list[str]:
    """This gateway's host isolation chains: input, forward."""
    return [f"{prefix}-{bridge}" for prefix, _, _ in GUARD_HOOKS]


def localnet_comment(link: str) -> str:
    """The comment of the rule dropping 127.0.0.0/8 that arrives on ``link``."""
    return f"sandport guard: {LOOPBACK_NET} from {link}"


def host_comment(bridge: str) -> str:
    """The comment of the rule dropping whatever else sandboxes send to the host."""
    return f"sandport guard: {bridge} to the host"


GUARD_COMMENTS = {  # the other counted drops of the guard
    "elsewhere": "sandport guard: the bridge address from another link",
    "routed_from": "sandport guard: routed from the bridge",
    "routed_into": "sandport guard: routed into the bridge",
}


def _guard_lines(bridge: str, guard: HostGuard | None, localnet: list[str]) -> list[str]:
    """The host isolation chains' rules (``add rule`` lines; chains declared by the caller)."""
    t = f"{FAMILY} {TABLE}"
    inc, fwd = guard_chain_names(bridge)
    lines: list[str] = []
    if guard is None and not localnet:
        return lines
    lines.append(f"add rule {t} {inc} ct state established,related accept comment "
                 '"sandport guard: replies to connections the host opened"')
    if guard is not None:
        gw = guard.gateway_ip
        lines += [
            f'add rule {t} {inc} iifname "{bridge}" ip daddr {gw} tcp dport '
            f'{guard.agent_port} accept comment "sandport guard: guest agents"',
            f'add rule {t} {inc} iifname "{bridge}" ip daddr {gw} icmp type echo-request '
            'accept comment "sandport guard: guests ping their gateway"',
        ]
        localnet = [bridge, *[link for link in localnet if link != bridge]]
    for link in localnet:
        lines.append(f'add rule {t} {inc} iifname "{link}" ip daddr {LOOPBACK_NET} counter '
                     f'drop comment "{localnet_comment(link)}"')
    if guard is not None:
        gw = guard.gateway_ip
        lines += [
            f'add rule {t} {inc} iifname "{bridge}" counter drop comment '
            f'"{host_comment(bridge)}"',
            f'add rule {t} {inc} iifname != {{ "lo", "{bridge}" }} ip daddr {gw} counter drop '
            f'comment "{GUARD_COMMENTS["elsewhere"]}"',
            f"add rule {t} {fwd} ct state established,related accept",
            f'add rule {t} {fwd} iifname "{bridge}" counter drop comment '
            f'"{GUARD_COMMENTS["routed_from"]}"',
            f'add rule {t} {fwd} oifname "{bridge}" ct status dnat accept comment '
            '"sandport guard: kernel forwards"',
            f'add rule {t} {fwd} oifname "{bridge}" counter drop comment '
            f'"{GUARD_COMMENTS["routed_into"]}"',
        ]
    return lines


def _chains(bridge: str, rules: list[DnatRule], guard: HostGuard | None) -> list[str]:
    """The chains :func:`render` writes for this set (the others of the gateway are stray)."""
    names = chain_names(bridge)
    if guard is not None:
        names += guard_chain_names(bridge)
    elif rules:  # route_localnet goes on for them: the 127.0.0.0/8 drops need the input chain
        names.append(guard_chain_names(bridge)[0])
    return names


def render(bridge: str, rules: list[DnatRule], guard: HostGuard | None = None) -> str:
    """The nft script that makes this gateway's chains hold exactly ``rules`` (and, with
    ``guard``, the host isolation)."""
    lines = [f"add table {FAMILY} {TABLE}"]
    hooks = {f"{prefix}-{bridge}": (kind, hook, priority) for kind, group in (
        ("nat", HOOKS), ("filter", GUARD_HOOKS)) for prefix, hook, priority in group}
    for chain in _chains(bridge, rules, guard):
        kind, hook, priority = hooks[chain]
        lines.append(f"add chain {FAMILY} {TABLE} {chain} "
                     f"{{ type {kind} hook {hook} priority {priority}; policy accept; }}")
        lines.append(f"flush chain {FAMILY} {TABLE} {chain}")
    for rule in rules:
        dnat = f"dnat to {rule.guest_ip}:{rule.guest_port}"
        for prefix in ("pre", "out"):
            if prefix == "pre" and rule.host_ip.startswith("127."):
                continue  # loopback is never the destination of a packet from outside
            lines.append(f'add rule {FAMILY} {TABLE} {prefix}-{bridge} {rule.match()} '
                         f'counter {dnat} comment "{rule.comment}"')
    if rules:
        lines.append(f'add rule {FAMILY} {TABLE} post-{bridge} oifname "{bridge}" '
                     'ip saddr 127.0.0.0/8 masquerade comment "sandport: replies to 127.0.0.1"')
    egress = sorted({r.egress for r in rules if r.egress and r.egress != bridge})
    for link in egress:
        lines.append(f'add rule {FAMILY} {TABLE} post-{bridge} oifname "{link}" '
                     'ip saddr 127.0.0.0/8 masquerade comment '
                     f'"sandport: replies to 127.0.0.1 via {link}"')
    lines += _guard_lines(bridge, guard, ([bridge] if rules else []) + egress)
    return "\n".join(lines) + "\n"


def program() -> str:
    """The nft program's path.

    Raises:
        MissingPackage: nft is not installed.
    """
    path = shutil.which("nft")
    if path is None:
        raise MissingPackage("nft is not installed (kernel forwards use nftables)",
                             hint="apt-get install nftables")
    return path


def run_script(script: str) -> None:
    """Run an nft script as one transaction.

    Raises:
        NftError: nft refused it (its message).
    """
    r = subprocess.run([program(), "-f", "-"], input=script, capture_output=True, text=True,
                       timeout=NFT_TIMEOUT, check=False)
    if r.returncode != 0:
        raise NftError(f"nft refused the ruleset: {r.stderr.strip()}",
                       hint="is the nf_tables module available (modprobe nf_tables)?")


def table_json(family: str = FAMILY) -> list[dict[str, object]]:
    """The objects of ``nft -j list table <family> sandport``; [] when there is no table."""
    r = subprocess.run([program(), "-j", "list", "table", family, TABLE], capture_output=True,
                       text=True, timeout=NFT_TIMEOUT, check=False)
    if r.returncode != 0:  # no table
        return []
    items: list[dict[str, object]] = json.loads(r.stdout)["nftables"]
    return items


def own_chains(bridge: str, family: str = FAMILY) -> list[str]:
    """Chains of the table (of ``family``) that belong to the gateway of ``bridge``."""
    suffix = f"-{bridge}"
    names = []
    for item in table_json(family):
        chain = item.get("chain")
        if isinstance(chain, dict) and str(chain.get("name", "")).endswith(suffix):
            names.append(str(chain["name"]))
    return names


def _rules(chains: list[str]) -> list[dict[str, object]]:
    mine = set(chains)
    return [rule for item in table_json()
            if isinstance(rule := item.get("rule"), dict) and rule.get("chain") in mine]


def _exprs(rule: dict[str, object]) -> list[dict[str, object]]:
    exprs = rule.get("expr", [])
    return [e for e in exprs if isinstance(e, dict)] if isinstance(exprs, list) else []


def packets(rule: dict[str, object]) -> int:
    """The rule's counter (packets), 0 without one."""
    return sum(int(counter.get("packets", 0)) for e in _exprs(rule)
               if isinstance(counter := e.get("counter"), dict))


def rules_of(bridge: str) -> list[tuple[str, str]]:
    """(chain, comment) of every forward rule (the NAT chains), for checks and doctor."""
    return [(str(r["chain"]), str(r.get("comment", ""))) for r in _rules(chain_names(bridge))]


def guard_rules(bridge: str) -> list[tuple[str, str]]:
    """(chain, comment) of every host isolation rule of this gateway."""
    return [(str(r["chain"]), str(r.get("comment", "")))
            for r in _rules(guard_chain_names(bridge))]


def connection_counts(bridge: str) -> dict[str, int]:
    """Connections each rule translated (its counter, summed over prerouting and output).

    Keyed by :attr:`DnatRule.comment`; a rule not in the table is absent.
    """
    counts: dict[str, int] = {}
    for rule in _rules(chain_names(bridge)):
        key = str(rule.get("comment", ""))
        counts[key] = counts.get(key, 0) + packets(rule)
    return counts


def guard_drops(bridge: str) -> dict[str, int]:
    """Packets each counted drop of the host isolation dropped, keyed by its comment
    (:func:`host_comment`, :func:`localnet_comment`, :data:`GUARD_COMMENTS`)."""
    return {str(r.get("comment", "")): packets(r) for r in _rules(guard_chain_names(bridge))
            if any("drop" in e for e in _exprs(r))}


def ingress_interfaces(rules: list[DnatRule], interfaces: dict[str, list[str]],
                       others: Collection[str] = ()) -> list[str]:
    """Interfaces remote clients of ``rules`` arrive on: those holding a forwarded address;
    for a wildcard rule every addressed one but ``lo`` and ``others`` (:func:`other_links`).

    Args:
        rules: the kernel forwards.
        interfaces: ``{ifname: [IPv4 address, ...]}`` of the host.
        others: links of other programs' networks (a rule naming an address held by one
            still gets it: the user asked for that network).
    """
    names: set[str] = set()
    for rule in rules:
        if rule.host_ip.startswith("127."):
            continue
        for ifname, addrs in interfaces.items():
            if ifname == "lo":
                continue
            if rule.host_ip in addrs or (rule.host_ip in WILDCARD and ifname not in others):
                names.add(ifname)
    return sorted(names)


def entry_links(host_ip: str, interfaces: dict[str, list[str]]) -> list[str]:
    """Where remote clients of a kernel forward bound to ``host_ip`` arrive (as
    :func:`ingress_interfaces` for that one address). Blocks (netlink, for a wildcard)."""
    rule = DnatRule(protocol="tcp", host_ip=host_ip, host_port=1, guest_ip="0.0.0.0",
                    guest_port=1)
    others = other_links() if host_ip in WILDCARD else {}
    return ingress_interfaces([rule], interfaces, others)


TUN_TYPE_TAP = 2  # IFLA_TUN_TYPE of a TAP (1: a TUN, an L3 tunnel such as a VPN's)


def other_links() -> dict[str, str]:
    """The host's links that are no place a remote client arrives on for ``0.0.0.0``:
    ``{ifname: what it is}`` (loopback, bridges, bridge ports, veths, TAPs).

    Blocks (netlink): async callers run it in a thread.
    """
    out: dict[str, str] = {}
    with IPRoute() as ipr:
        links = list(ipr.get_links())
    names = {link["index"]: str(link.get_attr("IFLA_IFNAME")) for link in links}
    kinds = {link["index"]: _kind(link) for link in links}
    for link in links:
        name, kind = names[link["index"]], kinds[link["index"]]
        master = link.get_attr("IFLA_MASTER")
        if name == "lo":
            out[name] = "loopback"
        elif kind == "bridge":
            out[name] = "a bridge"
        elif master and kinds.get(master) == "bridge":  # not a VRF's or a bond's
            out[name] = f"a port of bridge {names[master]}"
        elif kind == "veth":
            out[name] = "a veth"
        elif kind == "tun" and _tun_type(link) == TUN_TYPE_TAP:
            out[name] = "a TAP"
    return out


def _kind(link: Any) -> str:
    info = link.get_attr("IFLA_LINKINFO")
    return str(info.get_attr("IFLA_INFO_KIND") or "") if info is not None else ""


def _tun_type(link: Any) -> int:
    data = link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
    return int(data.get_attr("IFLA_TUN_TYPE") or 0) if hasattr(data, "get_attr") else 0


def host_settings(bridge: str, rules: list[DnatRule],
                  ingress: Collection[str] = ()) -> list[sysctl.Setting]:
    """The per-interface settings ``rules`` need, each with why.

    The link a guest is reached through (the bridge, or an attached target's ``egress``):
    ``route_localnet`` for rules 127.0.0.1 clients use, ``forwarding`` for rules remote
    clients use (their replies are routed through it). Each interface in ``ingress``:
    ``forwarding``. Never ``all``, ``default`` or the global ``ip_forward``.
    """
    wanted: dict[str, sysctl.Setting] = {}

    def want(ifname: str, key: str, why: str) -> None:
        path = sysctl.conf(ifname, key)
        wanted.setdefault(path, sysctl.Setting(path=path, value="1", why=why))

    for rule in rules:
        link = rule.egress or bridge
        if rule.host_ip in WILDCARD or rule.host_ip.startswith("127."):
            want(link, "route_localnet", f"kernel forwards of {bridge}: 127.0.0.1 clients "
                                         f"reach their guests through {link}")
        if not rule.host_ip.startswith("127."):
            want(link, "forwarding", f"kernel forwards of {bridge}: replies to remote "
                                     f"clients are routed through {link}")
    for ifname in ingress:
        want(ifname, "forwarding", f"kernel forwards of {bridge}: remote clients arrive "
                                   f"on {ifname}")
    return list(wanted.values())


def apply(bridge: str, rules: list[DnatRule], ingress: list[str] | None = None,
          guard: HostGuard | None = None, *, give_back: bool = True) -> None:
    """Make this gateway's chains hold exactly ``rules`` and ``guard``, atomically; delete
    stray chains.

    Also makes the host settings the rules need (:func:`host_settings`: on the bridge
    ``route_localnet`` and ``forwarding``, ``forwarding`` on each interface in
    ``ingress``, see :func:`ingress_interfaces`) through the ledger; the 127.0.0.0/8
    drops are in the table before ``route_localnet`` goes on. With ``give_back`` (the
    default) the settings this gateway holds and ``rules`` do not need are given back
    first; without, they stay (a start adopting forwards one sandbox at a time).
    """
    if rules and not (Path("/proc/sys/net/ipv4/conf") / bridge).exists():
        raise NftError(f"bridge {bridge} does not exist: kernel forwards go through it",
                       hint="start the gateway (it creates the bridge) before adding forwards")
    expected = set(_chains(bridge, rules, guard))
    script = render(bridge, rules, guard)
    for stray in sorted(set(own_chains(bridge)) - expected):
        log.warning("deleting stray nft chain %s", stray)
        script += f"flush chain {FAMILY} {TABLE} {stray}\ndelete chain {FAMILY} {TABLE} {stray}\n"
    wanted = host_settings(bridge, rules, ingress or [])
    ledger = sysctl.Ledger(owner=bridge)
    if give_back:  # before their 127.0.0.0/8 drops may go
        ledger.give_back(keep={w.path for w in wanted})
    run_script(script)
    ledger.take(wanted)
    log.debug("nft: %d forward(s) for %s%s", len(rules), bridge,
              ", host isolation" if guard is not None else "")


def remove(bridge: str) -> None:
    """Give back the host settings this gateway holds, then delete its chains, and the
    table once no gateway has chains in it."""
    sysctl.Ledger(owner=bridge).give_back()
    chains = own_chains(bridge)
    if chains:
        run_script("".join(f"flush chain {FAMILY} {TABLE} {c}\ndelete chain {FAMILY} {TABLE} {c}\n"
                     for c in chains))
    remaining = [i for i in table_json() if "chain" in i or "set" in i or "map" in i]
    if not remaining and any("table" in i for i in table_json()):
        try:
            run_script(f"delete table {FAMILY} {TABLE}\n")
        except NftError:  # another gateway added a chain in between: the table stays
            log.debug("table %s still in use", TABLE)
