"""The virtio-net header a TAP device puts before each frame when it offloads work.

With ``IFF_VNET_HDR`` every read from and write to a TAP fd starts with this header (the
legacy 10-byte ``struct virtio_net_hdr`` of the virtio spec, section 5.1.6, in the host's
byte order). It lets the two sides skip work no wire needs between a kernel and its
user-mode peer:

* **checksum offload** (``flags`` = `NEEDS_CSUM`): the TCP/UDP checksum field holds only
  the pseudo-header sum; whoever puts the packet on a real wire completes it, starting at
  ``csum_start`` and storing at ``csum_start + csum_offset``. A local stack takes such a
  packet without verifying.
* **segmentation offload** (``gso_type`` = `GSO_TCPV4`): one TCP "super segment" of up to
  64 KiB stands for the run of ``gso_size``-byte segments a wire would carry, like a
  packet after GRO.

Layout (little-endian on every machine sandport runs on)::

    u8 flags | u8 gso_type | u16 hdr_len | u16 gso_size | u16 csum_start | u16 csum_offset
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final, Self

from sandport.proto.packets.errors import MalformedFrame

__all__ = [
    "DATA_VALID",
    "GSO_NONE",
    "GSO_TCPV4",
    "NEEDS_CSUM",
    "PLAIN",
    "VNET_HEADER",
    "VnetHeader",
]

VNET_HEADER: Final = struct.Struct("=BBHHHH")  # 10 bytes, host byte order
NEEDS_CSUM: Final = 0x01  # VIRTIO_NET_HDR_F_NEEDS_CSUM
DATA_VALID: Final = 0x02  # VIRTIO_NET_HDR_F_DATA_VALID
GSO_NONE: Final = 0
GSO_TCPV4: Final = 1
GSO_UDP: Final = 3
GSO_TCPV6: Final = 4
GSO_ECN: Final = 0x80
#: The header of a frame that needs nothing done: no checksum to complete, no segments.
PLAIN: Final = bytes(VNET_HEADER.size)


@dataclass(frozen=True, slots=True)
class VnetHeader:
    """One virtio-net header.

    Attributes:
        flags: `NEEDS_CSUM` and/or `DATA_VALID`.
        gso_type: `GSO_NONE`, `GSO_TCPV4` ... (with `GSO_ECN` or-ed in when CWR was set).
        hdr_len: Bytes of headers (Ethernet + IP + TCP) before the segmented data.
        gso_size: Payload bytes per segment a wire would carry (the MSS).
        csum_start: Where the checksum's coverage starts, from the start of the frame.
        csum_offset: Where the checksum field is, from ``csum_start``.
    """

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    @classmethod
    def parse(cls, data: bytes) -> Self:
        """The header at the start of ``data`` (a read from a TAP fd).

        Raises:
            MalformedFrame: ``vnet_short`` (under 10 bytes), ``vnet_bad_csum`` (a checksum
                to complete that lies outside the frame).
        """
        if len(data) < VNET_HEADER.size:
            raise MalformedFrame("vnet_short", f"{len(data)} bytes")
        header = cls(*VNET_HEADER.unpack_from(data))
        if header.flags & NEEDS_CSUM and \
                header.csum_start + header.csum_offset + 2 > len(data) - VNET_HEADER.size:
            raise MalformedFrame("vnet_bad_csum", f"csum at {header.csum_start}+"
                                 f"{header.csum_offset}, {len(data)} bytes")
        return header

    def build(self) -> bytes:
        """Encode the header.

        Raises:
            ValueError: A field does not fit (flags and type 0..255, the rest 0..65535).
        """
        try:
            return VNET_HEADER.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size,
                                    self.csum_start, self.csum_offset)
        except struct.error as exc:
            raise ValueError(f"virtio-net header field out of range: {exc}") from None
