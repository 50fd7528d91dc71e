"""Where guest traffic may go: the gateway address is this host's loopback, and every
target must be on an allow-list (deny by default). Shared by UDP and TCP."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

LOOPBACK = IPv4Address("127.0.0.1")


@dataclass(frozen=True, slots=True, kw_only=True)
class EgressRule:
    """Guest traffic to ``network`` (and ``port``, if given) may leave this host."""

    network: IPv4Network
    port: int | None = None

    def allows(self, ip: IPv4Address, port: int) -> bool:
        """True if ``ip:port`` matches."""
        return ip in self.network and (self.port is None or self.port == port)


@dataclass(frozen=True, slots=True)
class Egress:
    """The allow-list of one guest link, with its gateway address."""

    gateway_ip: IPv4Address
    rules: tuple[EgressRule, ...] = ()

    def target(self, ip: IPv4Address, port: int) -> tuple[str, int] | None:
        """The host address the guest's ``ip:port`` goes to, or None: denied."""
        host = LOOPBACK if ip == self.gateway_ip else ip
        if any(rule.allows(host, port) for rule in self.rules):
            return str(host), port
        return None
