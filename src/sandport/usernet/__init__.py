"""usernet: a user-mode network stack (like passt or slirp) that serves a guest's Ethernet link.

The guest's frames arrive over a TAP fd or a QEMU stream/dgram socket; the link services
in `sandport.usernet.link` (ARP, ICMP echo, DHCP) answer what is addressed to the stack
itself, sans-I/O: bytes in, frames to send back out.
"""
