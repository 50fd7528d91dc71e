"""usernet: a user-mode network stack (like passt or slirp) that serves a guest's Ethernet link.

The guest's frames arrive over a TAP fd or a QEMU stream/dgram socket; the link services
in `sandport.usernet.link` (ARP, ICMP echo, DHCP) answer what is addressed to the stack
itself, sans-I/O: bytes in, frames to send back out. The names below are the public API
(README.md, section "usernet", runs them as a program)::

    from sandport.usernet import LinkConfig, TapTransport, Usernet, tap_into_netns
"""

from sandport.usernet.egress import EgressRule
from sandport.usernet.link import LinkConfig
from sandport.usernet.stack import Usernet
from sandport.usernet.stream import DgramTransport, StreamTransport, bind_dgram, listen_stream
from sandport.usernet.tap import TapTransport, open_tap, tap_into_netns
from sandport.usernet.transport import FrameTransport

__all__ = [
    "DgramTransport",
    "EgressRule",
    "FrameTransport",
    "LinkConfig",
    "StreamTransport",
    "TapTransport",
    "Usernet",
    "bind_dgram",
    "listen_stream",
    "open_tap",
    "tap_into_netns",
]
