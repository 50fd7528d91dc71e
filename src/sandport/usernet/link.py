"""Link services of the user-mode stack: ARP, ICMP echo and DHCP for one guest, sans-I/O.

The stack pretends to be a router on the guest's Ethernet link, at ``gateway_ip`` /
``gateway_mac``. `LinkServices.handle` takes one frame from the guest and returns the frames
to send back (often none). It answers:

* ARP requests for ``gateway_ip`` (RFC 826), so the guest can reach its default route;
* ICMP echo requests to ``gateway_ip`` (RFC 792, RFC 1122 section 3.2.2.6), so ``ping``
  the gateway works;
* DHCP (RFC 2131) with exactly one lease: DISCOVER gets an OFFER of ``guest_ip``; a REQUEST
  for ``guest_ip`` gets an ACK, a REQUEST for anything else a NAK. OFFER and ACK carry the
  whole configuration (mask, router, DNS, MTU, broadcast, lease), so a client needs nothing
  else.

Everything else is counted and ignored: ``dropped[reason]`` for malformed frames (the
parser's `MalformedFrame.reason`) and for frames not for these services (``not_for_us``,
``unsupported_ethertype``, ``unhandled_ipv4`` for IPv4 that later milestones will NAT ...).
``handled[kind]`` counts the replies sent. Guest input never makes ``handle`` raise: the
guest is untrusted, and one bad frame must not take its link down.

DHCP replies go where RFC 2131 section 4.1 says, for a server without relays: to
255.255.255.255 and the broadcast MAC if the client set the broadcast flag or for a NAK,
to ``ciaddr`` if the client already has an address (renewal), otherwise unicast to
``yiaddr`` at ``chaddr`` (clients on raw sockets, like busybox udhcpc and dhclient, take it).
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Final

from sandport.proto.packets.arp import ARP_REPLY, ARP_REQUEST, ArpPacket
from sandport.proto.packets.dhcp import (
    BOOTREPLY,
    BOOTREQUEST,
    DHCP_CLIENT_PORT,
    DHCP_SERVER_PORT,
    DHCPACK,
    DHCPDECLINE,
    DHCPDISCOVER,
    DHCPNAK,
    DHCPOFFER,
    DHCPRELEASE,
    DHCPREQUEST,
    OPT_BROADCAST,
    OPT_DNS,
    OPT_LEASE_TIME,
    OPT_MESSAGE,
    OPT_MESSAGE_TYPE,
    OPT_MTU,
    OPT_ROUTER,
    OPT_SERVER_ID,
    OPT_SUBNET_MASK,
    DhcpMessage,
)
from sandport.proto.packets.errors import MalformedFrame
from sandport.proto.packets.ethernet import (
    BROADCAST,
    ETH_ARP,
    ETH_HEADER,
    ETH_IPV4,
    EthernetFrame,
    is_multicast,
)
from sandport.proto.packets.icmp import ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, IcmpEcho
from sandport.proto.packets.ipv4 import IPV4_MAX_LENGTH, PROTO_ICMP, PROTO_UDP, IPv4Packet
from sandport.proto.packets.udp import UdpDatagram

__all__ = ["DEFAULT_MTU", "MAX_FRAME", "LinkConfig", "LinkServices"]

logger = logging.getLogger(__name__)

#: The largest frame `LinkServices.handle` looks at: a maximal IPv4 packet plus the Ethernet
#: header. Anything larger is dropped as ``frame_too_large`` before parsing.
MAX_FRAME: Final = ETH_HEADER.size + IPV4_MAX_LENGTH
_LIMITED_BROADCAST: Final = IPv4Address("255.255.255.255")
_ZERO: Final = IPv4Address(0)
_TTL: Final = 64
_MIN_MTU: Final = 68  # RFC 791: every IPv4 host must take 68-byte packets (RFC 2132 9.1)
#: The link MTU when neither the configuration nor a transport says: Ethernet's.
DEFAULT_MTU: Final = 1500


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkConfig:
    """Addresses of the guest link, resolved once.

    Attributes:
        gateway_ip: The stack's own address on the link (router, DHCP server, DNS default).
        gateway_mac: The stack's own MAC (6 bytes, unicast).
        network: The link's subnet, e.g. ``10.201.240.0/24``; both addresses lie inside.
        guest_ip: The one address the DHCP server hands out.
        dns_ip: DNS server announced in option 6; ``None`` announces ``gateway_ip``.
        mtu: Link MTU announced in option 26; ``None``: the transport's default when the
            stack is made with `sandport.usernet.stack.Usernet.on` (65520 on a TAP, 1500
            on QEMU's sockets), else `DEFAULT_MTU`. `link_mtu` is the value in force.
        lease_seconds: Lease time announced in option 51.

    Raises:
        ValueError: The addresses are inconsistent (outside ``network``, equal, the network
            or broadcast address), the MAC is not a 6-byte unicast address, or the MTU or
            lease is out of range.
    """

    gateway_ip: IPv4Address
    gateway_mac: bytes
    network: IPv4Network
    guest_ip: IPv4Address
    dns_ip: IPv4Address | None = None
    mtu: int | None = None
    lease_seconds: int = 3600

    def __post_init__(self) -> None:
        """Check the configuration once, so `LinkServices` can rely on it."""
        if len(self.gateway_mac) != 6 or self.gateway_mac[0] & 0x01:
            raise ValueError(f"gateway_mac {self.gateway_mac.hex(':')} is not a unicast MAC")
        if self.network.prefixlen > 30:
            raise ValueError(f"network {self.network} has no room for a gateway and a guest")
        reserved = (self.network.network_address, self.network.broadcast_address)
        for name, addr in (("gateway_ip", self.gateway_ip), ("guest_ip", self.guest_ip)):
            if addr not in self.network or addr in reserved:
                raise ValueError(f"{name} {addr} is not a host address of {self.network}")
        if self.gateway_ip == self.guest_ip:
            raise ValueError(f"gateway_ip and guest_ip are both {self.guest_ip}")
        if not _MIN_MTU <= self.link_mtu <= IPV4_MAX_LENGTH:
            raise ValueError(f"mtu {self.mtu} is not in {_MIN_MTU}..{IPV4_MAX_LENGTH}")
        if not 0 < self.lease_seconds < 0xFFFFFFFF:
            raise ValueError(f"lease_seconds {self.lease_seconds} is not in 1..2**32-2")

    @property
    def link_mtu(self) -> int:
        """The MTU in force: ``mtu``, or `DEFAULT_MTU`."""
        return self.mtu if self.mtu is not None else DEFAULT_MTU


class LinkServices:
    """ARP, ICMP echo and DHCP server of the stack, for one guest link.

    Attributes:
        config: The link's addresses.
        guest_mac: The guest's MAC once learned (from a DHCP ACK, or an ARP packet sent
            from ``guest_ip``), else ``None``.
        dropped: Frames ignored, by reason (parser reasons and this class's own).
        handled: Replies sent, by kind (``arp_reply``, ``icmp_echo_reply``, ``dhcp_offer``,
            ``dhcp_ack``, ``dhcp_nak``), plus ``dhcp_release`` / ``dhcp_decline`` seen.
    """

    def __init__(self, config: LinkConfig) -> None:
        """Create the services for ``config``; nothing is sent until frames arrive."""
        self.config = config
        self.guest_mac: bytes | None = None
        self.dropped: collections.Counter[str] = collections.Counter()
        self.handled: collections.Counter[str] = collections.Counter()
        #: IPv4 these services do not answer goes here (NAT, forwards), with the frame's
        #: ``offloaded`` flag; it returns the frames to send, or None: not its business
        #: either (then counted as unhandled).
        self.ipv4_hook: Callable[[EthernetFrame, IPv4Packet, bool], list[bytes] | None] | \
            None = None
        #: What goes before every frame to the guest: a plain virtio-net header on a TAP
        #: with offloads (`sandport.proto.packets.vnet`), else nothing.
        self.frame_prefix = b""

    def handle(self, frame: bytes, *, offloaded: bool = False) -> list[bytes]:
        """Process one Ethernet frame from the guest.

        Args:
            frame: The frame, without FCS.
            offloaded: The guest's kernel left the TCP/UDP checksum to the device (a TAP
                with offloads): it is not verified.

        Returns:
            Frames to send to the guest, in order; empty if the frame needs no answer or
            was dropped (see ``dropped``).
        """
        if len(frame) > MAX_FRAME:
            return self._drop("frame_too_large")
        try:
            eth = EthernetFrame.parse(frame)
            if eth.dst not in (self.config.gateway_mac, BROADCAST):
                return self._drop("not_for_us")
            if is_multicast(eth.src):
                return self._drop("bad_source_mac")  # no reply may go to a group address
            if eth.ethertype == ETH_ARP:
                return self._arp(ArpPacket.parse(eth.payload))
            if eth.ethertype == ETH_IPV4:
                return self._ipv4(eth, IPv4Packet.parse(eth.payload), offloaded)
            return self._drop("unsupported_ethertype")
        except MalformedFrame as exc:
            logger.debug("dropped frame from the guest: %s", exc)
            return self._drop(exc.reason)

    def _drop(self, reason: str) -> list[bytes]:
        self.dropped[reason] += 1
        return []

    # -- ARP -------------------------------------------------------------------------------

    def _arp(self, arp: ArpPacket) -> list[bytes]:
        """Answer "who has gateway_ip?"; learn the guest's MAC from its own ARP packets."""
        if arp.spa == self.config.guest_ip and not is_multicast(arp.sha):
            self.guest_mac = arp.sha
        if arp.op != ARP_REQUEST:
            return self._drop("arp_reply_ignored")
        if arp.tpa != self.config.gateway_ip:
            return self._drop("arp_not_for_us")
        reply = ArpPacket(
            op=ARP_REPLY, sha=self.config.gateway_mac, spa=self.config.gateway_ip,
            tha=arp.sha, tpa=arp.spa,
        )  # fmt: skip
        self.handled["arp_reply"] += 1
        return [self._eth(arp.sha, ETH_ARP, reply.build())]

    # -- IPv4 ------------------------------------------------------------------------------

    def _ipv4(self, eth: EthernetFrame, ip: IPv4Packet, offloaded: bool) -> list[bytes]:
        if ip.proto == PROTO_UDP and ip.dst in (_LIMITED_BROADCAST, self.config.gateway_ip):
            udp = UdpDatagram.parse(ip.payload, ip.src, ip.dst, verify_checksum=not offloaded)
            if udp.dport == DHCP_SERVER_PORT:
                return self._dhcp(DhcpMessage.parse(udp.payload))
        elif ip.proto == PROTO_ICMP and ip.dst == self.config.gateway_ip:
            return self._icmp(eth, ip, IcmpEcho.parse(ip.payload))
        if self.ipv4_hook is not None:
            out = self.ipv4_hook(eth, ip, offloaded)
            if out is not None:
                return out
        return self._drop("unhandled_ipv4")

    def _icmp(self, eth: EthernetFrame, ip: IPv4Packet, echo: IcmpEcho) -> list[bytes]:
        """Answer an echo request with the same identifier, sequence and data."""
        if echo.type != ICMP_ECHO_REQUEST:
            return self._drop("icmp_reply_ignored")
        reply = IcmpEcho(type=ICMP_ECHO_REPLY, ident=echo.ident, seq=echo.seq, data=echo.data)
        packet = IPv4Packet(
            src=self.config.gateway_ip, dst=ip.src, proto=PROTO_ICMP, payload=reply.build(),
            ttl=_TTL, ident=ip.ident,
        )  # fmt: skip
        self.handled["icmp_echo_reply"] += 1
        return [self._eth(eth.src, ETH_IPV4, packet.build())]

    # -- DHCP ------------------------------------------------------------------------------

    def _dhcp(self, msg: DhcpMessage) -> list[bytes]:
        """Serve one lease (RFC 2131 section 4.3): DISCOVER, REQUEST, RELEASE, DECLINE."""
        if msg.op != BOOTREQUEST:
            return self._drop("dhcp_not_request")
        if msg.giaddr != _ZERO:
            return self._drop("dhcp_relayed")
        if is_multicast(msg.chaddr):
            return self._drop("dhcp_multicast_chaddr")
        kind = msg.message_type
        if kind == DHCPDISCOVER:
            return [self._dhcp_reply(msg, DHCPOFFER)]
        if kind == DHCPREQUEST:
            server = msg.server_id
            if server is not None and server != self.config.gateway_ip:
                return self._drop("dhcp_other_server")  # the client chose another server
            # SELECTING / INIT-REBOOT carry option 50; RENEWING / REBINDING use ciaddr.
            wanted = msg.requested_ip or msg.ciaddr
            if wanted == self.config.guest_ip:
                self.guest_mac = msg.chaddr
                return [self._dhcp_reply(msg, DHCPACK)]
            return [self._dhcp_reply(msg, DHCPNAK)]
        if kind in (DHCPRELEASE, DHCPDECLINE):
            self.handled["dhcp_release" if kind == DHCPRELEASE else "dhcp_decline"] += 1
            return []
        if kind is None:
            return self._drop("dhcp_no_message_type")
        return self._drop("dhcp_unsupported_type")

    def _dhcp_options(self, kind: int) -> dict[int, bytes]:
        """Options of an OFFER/ACK (the whole configuration) or a NAK (RFC 2131 table 3)."""
        cfg = self.config
        options = {OPT_MESSAGE_TYPE: bytes((kind,)), OPT_SERVER_ID: cfg.gateway_ip.packed}
        if kind == DHCPNAK:
            options[OPT_MESSAGE] = b"requested address not available"
            return options
        dns = cfg.dns_ip if cfg.dns_ip is not None else cfg.gateway_ip
        options |= {
            OPT_LEASE_TIME: struct.pack("!I", cfg.lease_seconds),
            OPT_SUBNET_MASK: cfg.network.netmask.packed,
            OPT_ROUTER: cfg.gateway_ip.packed,
            OPT_DNS: dns.packed,
            OPT_MTU: struct.pack("!H", cfg.link_mtu),
            OPT_BROADCAST: cfg.network.broadcast_address.packed,
        }
        return options

    def _dhcp_reply(self, msg: DhcpMessage, kind: int) -> bytes:
        """Build the reply frame and choose its destination (RFC 2131 section 4.1)."""
        nak = kind == DHCPNAK
        reply = DhcpMessage(
            op=BOOTREPLY, xid=msg.xid, chaddr=msg.chaddr, flags=msg.flags,
            ciaddr=msg.ciaddr if kind == DHCPACK else _ZERO,
            yiaddr=_ZERO if nak else self.config.guest_ip,
            options=self._dhcp_options(kind),
        )  # fmt: skip
        if nak or msg.broadcast:
            dst_ip, dst_mac = _LIMITED_BROADCAST, BROADCAST
        elif msg.ciaddr != _ZERO:
            dst_ip, dst_mac = msg.ciaddr, msg.chaddr
        else:
            dst_ip, dst_mac = self.config.guest_ip, msg.chaddr
        src_ip = self.config.gateway_ip
        udp = UdpDatagram(sport=DHCP_SERVER_PORT, dport=DHCP_CLIENT_PORT, payload=reply.build())
        segment = udp.build(src_ip, dst_ip)
        packet = IPv4Packet(src=src_ip, dst=dst_ip, proto=PROTO_UDP, payload=segment)
        self.handled[{DHCPOFFER: "dhcp_offer", DHCPACK: "dhcp_ack"}.get(kind, "dhcp_nak")] += 1
        return self._eth(dst_mac, ETH_IPV4, packet.build())

    # -- for the NAT halves (UDP, TCP) ----------------------------------------------------

    def to_guest_frame(self, src: IPv4Address, proto: int, segment: bytes) -> bytes | None:
        """An IPv4 packet from ``src`` to the guest carrying ``segment``, framed for the
        guest's MAC; None while that MAC is unknown (counted as ``guest_mac_unknown``).

        Raises:
            ValueError: the packet would be larger than IPv4 allows.
        """
        if self.guest_mac is None:
            self.dropped["guest_mac_unknown"] += 1
            return None
        packet = IPv4Packet(src=src, dst=self.config.guest_ip, proto=proto, payload=segment)
        return self._eth(self.guest_mac, ETH_IPV4, packet.build())

    def guest_view(self, host: str) -> IPv4Address:
        """The address the guest sees a host client at: its own address, or the gateway
        address for a loopback (or IPv6) client, which the guest could not answer."""
        ip = ipaddress.ip_address(host)
        if ip.is_loopback or not isinstance(ip, IPv4Address):
            return self.config.gateway_ip
        return ip

    def _eth(self, dst: bytes, ethertype: int, payload: bytes) -> bytes:
        src = self.config.gateway_mac
        frame = EthernetFrame(dst=dst, src=src, ethertype=ethertype, payload=payload).build()
        return self.frame_prefix + frame if self.frame_prefix else frame
