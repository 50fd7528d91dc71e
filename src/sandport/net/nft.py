"""Kernel port forwards: DNAT rules in the nftables table ``ip sandport``.

Several gateways can share a host (a user's and a test's), so the table is shared and each
gateway owns only the chains named after its bridge::

    table ip sandport {
      chain pre-<bridge>  { type nat hook prerouting priority dstnat; }   remote clients
      chain out-<bridge>  { type nat hook output priority -100; }          clients on this host
      chain post-<bridge> { type nat hook postrouting priority srcnat; }   replies to 127.0.0.1
    }

Locally originated packets never pass prerouting: a DNAT rule only there is the classic
"connection refused on localhost" (incident 000), so every forward is written to both hooks.
A client on 127.0.0.1 additionally needs ``route_localnet`` on the bridge (or the kernel
drops the packet as a martian once it leaves ``lo``) and a masquerade so the guest can
answer; :func:`apply` sets both. A remote client's packets are routed from the interface
they arrive on to the bridge, so :func:`apply` turns on IPv4 ``forwarding`` for the bridge
and for exactly the interfaces that hold the forwarded host addresses (every addressed
interface for a wildcard rule), never the global ``ip_forward``. Remote clients need no
SNAT: the guest's default route is the bridge, and it sees their real address.

Every DNAT rule has a counter. NAT chains only see the first packet of a connection, so
the counter is the number of connections (TCP) or flows (UDP) the rule has translated.

:func:`apply` replaces this gateway's rules atomically (one ``nft -f`` transaction: flush
and re-add), so running it at start after a ``kill -9`` leaves exactly the expected set,
without duplicates, and stray chains of this gateway are deleted.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sandport.errors import MissingPackage, SandportError

log = logging.getLogger(__name__)

TABLE = "sandport"
FAMILY = "ip"
HOOKS = (  # (chain prefix, hook, priority)
    ("pre", "prerouting", "dstnat"),
    ("out", "output", "-100"),
    ("post", "postrouting", "srcnat"),
)
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


def chain_names(bridge: str) -> list[str]:
    """This gateway's chains."""
    return [f"{prefix}-{bridge}" for prefix, _, _ in HOOKS]


def render(bridge: str, rules: list[DnatRule]) -> str:
    """The nft script that makes this gateway's chains hold exactly ``rules``."""
    lines = [f"add table {FAMILY} {TABLE}"]
    for prefix, hook, priority in HOOKS:
        chain = f"{prefix}-{bridge}"
        lines.append(f"add chain {FAMILY} {TABLE} {chain} "
                     f"{{ type nat hook {hook} priority {priority}; policy accept; }}")
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
    for egress in sorted({r.egress for r in rules if r.egress and r.egress != bridge}):
        lines.append(f'add rule {FAMILY} {TABLE} post-{bridge} oifname "{egress}" '
                     'ip saddr 127.0.0.0/8 masquerade comment '
                     f'"sandport: replies to 127.0.0.1 via {egress}"')
    return "\n".join(lines) + "\n"


def _nft() -> str:
    path = shutil.which("nft")
    if path is None:
        raise MissingPackage("nft is not installed (kernel forwards use nftables)",
                             hint="apt-get install nftables")
    return path


def _run(script: str) -> None:
    r = subprocess.run([_nft(), "-f", "-"], input=script, capture_output=True, text=True,
                       timeout=NFT_TIMEOUT, check=False)
    if r.returncode != 0:
        raise NftError(f"nft refused the ruleset: {r.stderr.strip()}",
                       hint="is the nf_tables module available (modprobe nf_tables)?")


def _table_json() -> list[dict[str, object]]:
    r = subprocess.run([_nft(), "-j", "list", "table", FAMILY, TABLE], capture_output=True,
                       text=True, timeout=NFT_TIMEOUT, check=False)
    if r.returncode != 0:  # no table
        return []
    items: list[dict[str, object]] = json.loads(r.stdout)["nftables"]
    return items


def own_chains(bridge: str) -> list[str]:
    """Chains of the table that belong to the gateway of ``bridge``."""
    suffix = f"-{bridge}"
    names = []
    for item in _table_json():
        chain = item.get("chain")
        if isinstance(chain, dict) and str(chain.get("name", "")).endswith(suffix):
            names.append(str(chain["name"]))
    return names


def rules_of(bridge: str) -> list[tuple[str, str]]:
    """(chain, comment) of every rule in this gateway's chains, for checks and doctor."""
    mine = set(chain_names(bridge))
    out = []
    for item in _table_json():
        rule = item.get("rule")
        if isinstance(rule, dict) and rule.get("chain") in mine:
            out.append((str(rule["chain"]), str(rule.get("comment", ""))))
    return out


def connection_counts(bridge: str) -> dict[str, int]:
    """Connections each rule translated (its counter, summed over prerouting and output).

    Keyed by :attr:`DnatRule.comment`; a rule not in the table is absent.
    """
    mine = set(chain_names(bridge))
    counts: dict[str, int] = {}
    for item in _table_json():
        rule = item.get("rule")
        if not isinstance(rule, dict) or rule.get("chain") not in mine:
            continue
        for expr in rule.get("expr", []):
            if isinstance(expr, dict) and isinstance(expr.get("counter"), dict):
                key = str(rule.get("comment", ""))
                counts[key] = counts.get(key, 0) + int(expr["counter"].get("packets", 0))
    return counts


def ingress_interfaces(rules: list[DnatRule], interfaces: dict[str, list[str]]) -> list[str]:
    """Interfaces remote clients of ``rules`` arrive on: those holding a forwarded address.

    Args:
        rules: the kernel forwards.
        interfaces: ``{ifname: [IPv4 address, ...]}`` of the host.
    """
    names: set[str] = set()
    for rule in rules:
        if rule.host_ip.startswith("127."):
            continue
        for ifname, addrs in interfaces.items():
            if ifname == "lo":
                continue
            if rule.host_ip in WILDCARD or rule.host_ip in addrs:
                names.add(ifname)
    return sorted(names)


def set_sysctl(path: str, value: str) -> None:
    """Write a /proc/sys value, logging a change."""
    p = Path("/proc/sys") / path
    if p.read_text().strip() != value:
        p.write_text(value)
        log.info("sysctl %s = %s", path.replace("/", "."), value)


def apply(bridge: str, rules: list[DnatRule], ingress: list[str] | None = None) -> None:
    """Make this gateway's chains hold exactly ``rules``, atomically; delete stray chains.

    Also enables what the rules need: on the bridge ``route_localnet`` (127.0.0.1
    clients) and ``forwarding`` (replies to remote clients are routed through it), and
    ``forwarding`` on each interface in ``ingress`` (see :func:`ingress_interfaces`).
    """
    if rules and not (Path("/proc/sys/net/ipv4/conf") / bridge).exists():
        raise NftError(f"bridge {bridge} does not exist: kernel forwards go through it",
                       hint="start the gateway (it creates the bridge) before adding forwards")
    expected = set(chain_names(bridge))
    script = render(bridge, rules)
    for stray in sorted(set(own_chains(bridge)) - expected):
        log.warning("deleting stray nft chain %s", stray)
        script += f"flush chain {FAMILY} {TABLE} {stray}\ndelete chain {FAMILY} {TABLE} {stray}\n"
    _run(script)
    if rules:
        set_sysctl(f"net/ipv4/conf/{bridge}/route_localnet", "1")
        set_sysctl(f"net/ipv4/conf/{bridge}/forwarding", "1")
    for ifname in ingress or []:  # an interface that went away meanwhile needs nothing
        with contextlib.suppress(FileNotFoundError):
            set_sysctl(f"net/ipv4/conf/{ifname}/forwarding", "1")
    log.debug("nft: %d forward(s) for %s", len(rules), bridge)


def remove(bridge: str) -> None:
    """Delete this gateway's chains, and the table once no gateway has chains in it."""
    chains = own_chains(bridge)
    if chains:
        _run("".join(f"flush chain {FAMILY} {TABLE} {c}\ndelete chain {FAMILY} {TABLE} {c}\n"
                     for c in chains))
    remaining = [i for i in _table_json() if "chain" in i or "set" in i or "map" in i]
    if not remaining and any("table" in i for i in _table_json()):
        try:
            _run(f"delete table {FAMILY} {TABLE}\n")
        except NftError:  # another gateway added a chain in between: the table stays
            log.debug("table %s still in use", TABLE)
