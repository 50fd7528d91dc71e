"""DHCP messages (RFC 2131) and their options (RFC 2132), for a server on one Ethernet link.

The BOOTP fixed part (RFC 2131 section 2, figure 1), then the options::

     0                   1                   2                   3
    +---------------+---------------+---------------+---------------+
    |     op (1)    |   htype (1)   |   hlen (1)    |   hops (1)    |
    +---------------+---------------+---------------+---------------+
    |                            xid (4)                            |
    +-------------------------------+-------------------------------+
    |           secs (2)            |           flags (2)           |
    +-------------------------------+-------------------------------+
    |   ciaddr (4)  client's address when it already has one        |
    |   yiaddr (4)  "your" address: what the server assigns         |
    |   siaddr (4)  next bootstrap server                           |
    |   giaddr (4)  relay agent                                     |
    +---------------------------------------------------------------+
    |   chaddr (16) client hardware address (6 used for Ethernet)   |
    |   sname  (64), file (128)  boot server name and boot file     |
    +---------------------------------------------------------------+
    |   magic cookie 99.130.83.99, then options: code, len, value   |
    +---------------------------------------------------------------+

Options (RFC 2132 section 2): code 0 is a one-byte pad, code 255 ends the list, every other
code is followed by a length byte and that many value bytes. An option that appears more
than once is concatenated in order (RFC 3396), which is also how `DhcpMessage.build` sends
values longer than 255 bytes. A missing end option is tolerated; a length byte or value
that runs past the data is ``dhcp_option_overrun``. Option overload (52, options inside
``sname``/``file``) is not interpreted: the option is kept as data, the fields are ignored.

Only Ethernet (htype 1, hlen 6) is accepted: the server serves a guest link.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Final, Self

from sandport.proto.packets.errors import MalformedFrame

__all__ = [
    "BOOTREPLY",
    "BOOTREQUEST",
    "DHCPACK",
    "DHCPDECLINE",
    "DHCPDISCOVER",
    "DHCPINFORM",
    "DHCPNAK",
    "DHCPOFFER",
    "DHCPRELEASE",
    "DHCPREQUEST",
    "DHCP_CLIENT_PORT",
    "DHCP_FIXED",
    "DHCP_MAGIC",
    "DHCP_SERVER_PORT",
    "FLAG_BROADCAST",
    "OPT_BROADCAST",
    "OPT_DNS",
    "OPT_END",
    "OPT_HOSTNAME",
    "OPT_LEASE_TIME",
    "OPT_MESSAGE",
    "OPT_MESSAGE_TYPE",
    "OPT_MTU",
    "OPT_PAD",
    "OPT_PARAMETER_LIST",
    "OPT_REQUESTED_IP",
    "OPT_ROUTER",
    "OPT_SERVER_ID",
    "OPT_SUBNET_MASK",
    "DhcpMessage",
]

DHCP_SERVER_PORT: Final = 67
DHCP_CLIENT_PORT: Final = 68
#: op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr, sname,
#: file: the 236-byte BOOTP fixed part.
DHCP_FIXED: Final = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")
#: RFC 2131 section 3: the options field starts with 99.130.83.99.
DHCP_MAGIC: Final = b"\x63\x82\x53\x63"
#: RFC 1542 section 3.2.1: some relays and clients drop BOOTP messages under 300 bytes.
_MIN_MESSAGE: Final = 300
BOOTREQUEST: Final = 1
BOOTREPLY: Final = 2
#: The top bit of ``flags``: the client cannot receive unicast before it is configured.
FLAG_BROADCAST: Final = 0x8000
_HTYPE_ETHERNET: Final = 1

# Message types, option 53 (RFC 2132 section 9.6).
DHCPDISCOVER: Final = 1
DHCPOFFER: Final = 2
DHCPREQUEST: Final = 3
DHCPDECLINE: Final = 4
DHCPACK: Final = 5
DHCPNAK: Final = 6
DHCPRELEASE: Final = 7
DHCPINFORM: Final = 8

# Option codes (RFC 2132).
OPT_PAD: Final = 0
OPT_SUBNET_MASK: Final = 1
OPT_ROUTER: Final = 3
OPT_DNS: Final = 6
OPT_HOSTNAME: Final = 12
OPT_MTU: Final = 26
OPT_BROADCAST: Final = 28
OPT_REQUESTED_IP: Final = 50
OPT_LEASE_TIME: Final = 51
OPT_MESSAGE_TYPE: Final = 53
OPT_SERVER_ID: Final = 54
OPT_PARAMETER_LIST: Final = 55
OPT_MESSAGE: Final = 56
OPT_END: Final = 255

_ZERO: Final = IPv4Address(0)


def _parse_options(data: bytes) -> dict[int, bytes]:
    """Parse the options after the magic cookie (RFC 2132 section 2, RFC 3396)."""
    options: dict[int, bytes] = {}
    i = 0
    while i < len(data):
        code = data[i]
        if code == OPT_PAD:
            i += 1
            continue
        if code == OPT_END:
            break
        if i + 1 >= len(data):
            raise MalformedFrame("dhcp_option_overrun", f"option {code} has no length byte")
        end = i + 2 + data[i + 1]
        if end > len(data):
            raise MalformedFrame("dhcp_option_overrun", f"option {code} runs past the end")
        options[code] = options.get(code, b"") + data[i + 2 : end]
        i = end
    return options


def _address_option(options: dict[int, bytes], code: int) -> IPv4Address | None:
    value = options.get(code)
    return IPv4Address(value) if value is not None and len(value) == 4 else None


@dataclass(frozen=True, slots=True, kw_only=True)
class DhcpMessage:
    """One DHCP message from or to an Ethernet client.

    Attributes:
        op: `BOOTREQUEST` (client to server) or `BOOTREPLY`.
        xid: Transaction id chosen by the client; replies echo it.
        chaddr: The client's MAC (6 bytes).
        flags: `FLAG_BROADCAST` or 0.
        secs: Seconds since the client began acquiring.
        hops: Relay hop count.
        ciaddr: Client address (RENEWING/REBINDING/INFORM), else 0.0.0.0.
        yiaddr: The address the server offers or acknowledges.
        siaddr: Next bootstrap server.
        giaddr: Relay agent address.
        options: Option code to value, in wire order, repeated options concatenated.
    """

    op: int
    xid: int
    chaddr: bytes
    flags: int = 0
    secs: int = 0
    hops: int = 0
    ciaddr: IPv4Address = _ZERO
    yiaddr: IPv4Address = _ZERO
    siaddr: IPv4Address = _ZERO
    giaddr: IPv4Address = _ZERO
    options: dict[int, bytes] = field(default_factory=dict)

    @classmethod
    def parse(cls, data: bytes) -> Self:
        """Parse a message (a UDP payload).

        Raises:
            MalformedFrame: ``dhcp_short`` (no room for fixed part and cookie),
                ``dhcp_bad_op``, ``dhcp_unsupported_hardware`` (not Ethernet),
                ``dhcp_bad_magic``, ``dhcp_option_overrun``.
        """
        if len(data) < DHCP_FIXED.size + len(DHCP_MAGIC):
            raise MalformedFrame("dhcp_short", f"{len(data)} bytes")
        (op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr,
         _sname, _file) = DHCP_FIXED.unpack_from(data)  # fmt: skip
        if op not in (BOOTREQUEST, BOOTREPLY):
            raise MalformedFrame("dhcp_bad_op", f"op {op}")
        if htype != _HTYPE_ETHERNET or hlen != 6:
            raise MalformedFrame("dhcp_unsupported_hardware", f"htype {htype} hlen {hlen}")
        if data[DHCP_FIXED.size : DHCP_FIXED.size + 4] != DHCP_MAGIC:
            raise MalformedFrame("dhcp_bad_magic")
        return cls(
            op=op, xid=xid, chaddr=chaddr[:6], flags=flags, secs=secs, hops=hops,
            ciaddr=IPv4Address(ciaddr), yiaddr=IPv4Address(yiaddr),
            siaddr=IPv4Address(siaddr), giaddr=IPv4Address(giaddr),
            options=_parse_options(data[DHCP_FIXED.size + 4 :]),
        )  # fmt: skip

    def build(self) -> bytes:
        """Encode the message: fixed part, cookie, options, end, zero padding to 300 bytes.

        Raises:
            ValueError: ``chaddr`` is not 6 bytes, an option code is 0 or 255 or out of
                range, or a fixed field does not fit.
        """
        if len(self.chaddr) != 6:
            raise ValueError("chaddr must be a 6-byte MAC")
        fixed = DHCP_FIXED.pack(
            self.op, _HTYPE_ETHERNET, 6, self.hops, self.xid, self.secs, self.flags,
            self.ciaddr.packed, self.yiaddr.packed, self.siaddr.packed, self.giaddr.packed,
            self.chaddr, b"", b"",
        )  # fmt: skip
        parts = [fixed, DHCP_MAGIC]
        for code, value in self.options.items():
            if not OPT_PAD < code < OPT_END:
                raise ValueError(f"option code {code} cannot carry a value")
            chunks = [value[i : i + 255] for i in range(0, len(value), 255)] or [b""]
            parts.extend(bytes((code, len(chunk))) + chunk for chunk in chunks)
        parts.append(bytes((OPT_END,)))
        message = b"".join(parts)
        return message + bytes(max(0, _MIN_MESSAGE - len(message)))

    @property
    def message_type(self) -> int | None:
        """Option 53 (`DHCPDISCOVER` ...), or ``None`` if absent or not one byte."""
        value = self.options.get(OPT_MESSAGE_TYPE)
        return value[0] if value is not None and len(value) == 1 else None

    @property
    def requested_ip(self) -> IPv4Address | None:
        """Option 50, the address a client asks for, or ``None`` if absent or malformed."""
        return _address_option(self.options, OPT_REQUESTED_IP)

    @property
    def server_id(self) -> IPv4Address | None:
        """Option 54, the server a client chose, or ``None`` if absent or malformed."""
        return _address_option(self.options, OPT_SERVER_ID)

    @property
    def parameter_list(self) -> tuple[int, ...]:
        """Option 55, the option codes the client asks for (empty if absent)."""
        return tuple(self.options.get(OPT_PARAMETER_LIST, b""))

    @property
    def broadcast(self) -> bool:
        """Whether the client set the broadcast flag (RFC 2131 section 4.1)."""
        return bool(self.flags & FLAG_BROADCAST)
