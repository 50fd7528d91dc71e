"""usernet as one object: link services, UDP and TCP for one guest link.

::

    transport = TapTransport(tap_into_netns("sp-x-t", "sp-x"))   # or StreamTransport() ...
    net = Usernet.on(transport, LinkConfig(...), dns_upstream=("127.0.0.1", 53),
                     egress=(EgressRule(network=IPv4Network("127.0.0.1/32"), port=8080),))
    transport.start()
    await net.add_forward("tcp", "127.0.0.1", 0, 7)
    for mapping in parse_port_spec("10007:7/tcp+udp"):     # or the -p syntax
        await net.publish(mapping)

Frames from the guest go to :meth:`handle`; the link services answer ARP, ICMP echo and
DHCP; other IPv4 goes to the UDP or the TCP half. The gateway address stands for this
host's loopback, reachable only through the egress allow-list (deny by default).

On a TAP opened with offloads (``TapTransport.vnet``) every frame both ways starts with a
virtio-net header (`sandport.proto.packets.vnet`); pass ``vnet=True`` so the stack reads
and writes it: the guest's kernel then leaves checksums to us and sends TCP in 64 KiB
segments, and so do we.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from sandport.forward.spec import PortMapping
from sandport.proto.packets.errors import MalformedFrame
from sandport.proto.packets.ethernet import EthernetFrame
from sandport.proto.packets.ipv4 import PROTO_TCP, IPv4Packet
from sandport.proto.packets.vnet import NEEDS_CSUM, PLAIN, VnetHeader
from sandport.usernet.egress import EgressRule
from sandport.usernet.link import LinkConfig, LinkServices
from sandport.usernet.tcp import TcpNat
from sandport.usernet.transport import FrameTransport
from sandport.usernet.udp import UdpNat

Send = Callable[[list[bytes]], None]
PLAIN_LEN = len(PLAIN)


class Usernet:
    """A user-mode network for one guest (see the module docstring)."""

    def __init__(self, config: LinkConfig, send: Send, *,
                 dns_upstream: tuple[str, int] | None = None,
                 egress: tuple[EgressRule, ...] = (), vnet: bool = False) -> None:
        self.link = LinkServices(config)
        self.udp = UdpNat(self.link, send, dns_upstream=dns_upstream, egress=egress)
        self.tcp = TcpNat(self.link, send, allowed=self.udp.egress.target, vnet=vnet)
        self.link.ipv4_hook = self._ipv4
        self.vnet = vnet
        if vnet:
            self.link.frame_prefix = PLAIN

    @classmethod
    def on(cls, transport: FrameTransport, config: LinkConfig, **options: Any) -> Usernet:
        """A stack serving ``transport``: its frames come here and ours go out through it,
        with its virtio-net headers if it has them; a link MTU left unset becomes the
        transport's default (65520 on a TAP, 1500 on QEMU's sockets). ``options``: as
        for the constructor."""
        if config.mtu is None:
            config = dataclasses.replace(config, mtu=transport.default_mtu)
        net = cls(config, transport.send, vnet=transport.vnet, **options)
        transport.handler = net.handle
        return net

    def handle(self, frames: list[bytes]) -> list[bytes]:
        """A batch of guest frames; the frames to send back at once (segments of TCP
        connections go out through ``send`` at the end of the batch)."""
        replies: list[bytes] = []
        fast, link = self.tcp.fast, self.link
        for frame in frames:
            offloaded = False
            data: bytes | memoryview = frame
            if self.vnet:
                try:
                    offloaded = bool(VnetHeader.parse(frame).flags & NEEDS_CSUM)
                except MalformedFrame as exc:
                    link.dropped[exc.reason] += 1
                    continue
                data = memoryview(frame)[PLAIN_LEN:]  # the frame behind the header
            if not fast(data, offloaded):
                replies += link.handle(bytes(data), offloaded=offloaded)
        self.tcp.flush()
        return replies

    def _ipv4(self, eth: EthernetFrame, ip: IPv4Packet, offloaded: bool) -> list[bytes] | None:
        if ip.proto == PROTO_TCP:
            return self.tcp.on_ipv4(eth, ip, offloaded)
        return self.udp.on_ipv4(eth, ip, offloaded)

    async def add_forward(self, protocol: str, host_ip: str, host_port: int,
                          guest_port: int) -> int:
        """Forward ``host_ip:host_port`` (0: a free port) to the guest's ``guest_port``
        over ``protocol`` (tcp, udp); the bound port."""
        if protocol == "tcp":
            return await self.tcp.add_forward(host_ip, host_port, guest_port)
        if protocol == "udp":
            return await self.udp.add_forward(host_ip, host_port, guest_port)
        raise ValueError(f"protocol {protocol!r} is not tcp or udp")

    async def publish(self, mapping: PortMapping) -> int:
        """A ``-p`` mapping (:func:`sandport.forward.spec.parse_port_spec`, one protocol
        each); the bound host port."""
        return await self.add_forward(mapping.protocol, mapping.host_ip, mapping.host_port,
                                      mapping.guest_port)

    def close(self) -> None:
        """Reset every connection, close every flow and listener."""
        self.tcp.close()
        self.udp.close()
