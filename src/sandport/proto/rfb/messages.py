"""RFB wire formats, caps, handshake messages and events (RFC 6143 sections 7.1 to 7.4).

Owns the named struct formats and length constants, the ``MAX_*`` caps, `SecurityType`,
`Stage`, the message dataclasses `PixelFormat` and `ServerInit` (``from_bytes`` /
``__bytes__``) and the events `RFBClient` returns. Must not touch: DES (see ``vncauth``) or
the client state machine (see ``client``); nothing here may import anything above
``sandport.proto``.
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass
from typing import Final, Self

from sandport.proto.rfb.errors import (
    BadDimensions,
    BadPixelFormat,
    FieldTooLong,
    MalformedMessage,
)

# --------------------------------------------------------------------------------------------
# Caps on everything a peer can make us hold.
# --------------------------------------------------------------------------------------------

#: Longest reason-string accepted (RFC 6143 sections 7.1.2 and 7.1.3).
MAX_REASON_LENGTH: Final = 4096
#: Longest desktop name accepted in ServerInit (RFC 6143 section 7.3.2).
MAX_NAME_LENGTH: Final = 4096
#: Largest framebuffer width or height accepted in ServerInit.
MAX_DIMENSION: Final = 16384
#: Most bytes the client holds at once: an unfinished message plus undrained trailing data.
#: The largest handshake message (ServerInit with a maximal name) is 24 + 4096 bytes, so only a
#: peer sending data it was not asked for can reach this.
MAX_BUFFER: Final = 64 * 1024

# --------------------------------------------------------------------------------------------
# Wire formats.
# --------------------------------------------------------------------------------------------

# ProtocolVersion, RFC 6143 section 7.1.1: exactly 12 bytes, "RFB xxx.yyy\n", xxx and yyy
# decimal major and minor version numbers padded with zeros.
PROTOCOL_VERSION_LENGTH: Final = 12
_PROTOCOL_VERSION_RE: Final = re.compile(rb"RFB (\d{3})\.(\d{3})\n")
# One template byte per banner position; "0" stands for any ASCII digit.
_PROTOCOL_VERSION_TEMPLATE: Final = b"RFB 000.000\n"

# A reason-string (RFC 6143 sections 7.1.2 and 7.1.3):
# +--------------+--------------+---------------+
# | No. of bytes | Type [Value] | Description   |
# +--------------+--------------+---------------+
# | 4            | U32          | reason-length |
# | reason-length| U8 array     | reason-string |
# +--------------+--------------+---------------+
U32: Final = struct.Struct(">I")
U8: Final = struct.Struct(">B")

# VNC Authentication challenge and response, RFC 6143 section 7.2.2.
CHALLENGE_LENGTH: Final = 16

# PIXEL_FORMAT, RFC 6143 section 7.4:
# +--------------+--------------+-----------------+
# | No. of bytes | Type [Value] | Description     |
# +--------------+--------------+-----------------+
# | 1            | U8           | bits-per-pixel  |
# | 1            | U8           | depth           |
# | 1            | U8           | big-endian-flag |
# | 1            | U8           | true-color-flag |
# | 2            | U16          | red-max         |
# | 2            | U16          | green-max       |
# | 2            | U16          | blue-max        |
# | 1            | U8           | red-shift       |
# | 1            | U8           | green-shift     |
# | 1            | U8           | blue-shift      |
# | 3            |              | padding         |
# +--------------+--------------+-----------------+
PIXEL_FORMAT: Final = struct.Struct(">BBBBHHHBBB3x")
PIXEL_FORMAT_LENGTH: Final = PIXEL_FORMAT.size  # 16

# ServerInit, RFC 6143 section 7.3.2:
# +--------------+--------------+------------------------------+
# | No. of bytes | Type [Value] | Description                  |
# +--------------+--------------+------------------------------+
# | 2            | U16          | framebuffer-width in pixels  |
# | 2            | U16          | framebuffer-height in pixels |
# | 16           | PIXEL_FORMAT | server-pixel-format          |
# | 4            | U32          | name-length                  |
# | name-length  | U8 array     | name-string                  |
# +--------------+--------------+------------------------------+
SERVER_INIT_HEADER: Final = struct.Struct(">HH16sI")
SERVER_INIT_HEADER_LENGTH: Final = SERVER_INIT_HEADER.size  # 24

# ClientInit, RFC 6143 section 7.3.1: one U8, shared-flag (non-zero: share the desktop).
CLIENT_INIT: Final = struct.Struct(">B")

# SecurityResult, RFC 6143 section 7.1.3: U32 status.
SECURITY_RESULT_OK: Final = 0
SECURITY_RESULT_FAILED: Final = 1
#: "failed, too many attempts": not in RFC 6143 but sent by some servers (community RFB
#: protocol document, section SecurityResult); treated as a failure.
SECURITY_RESULT_TOO_MANY: Final = 2
#: Reason given when a 3.3 or 3.7 server reports failure (those versions send none).
DEFAULT_FAILURE_REASON: Final = "authentication failed"

_BITS_PER_PIXEL: Final = frozenset({8, 16, 32})


class SecurityType(enum.IntEnum):
    """Security types this client knows (RFC 6143 sections 7.1.2 and 8.1.2)."""

    INVALID = 0
    NONE = 1
    VNC_AUTH = 2


class Stage(enum.Enum):
    """Where `RFBClient` stops the handshake."""

    #: Stop once the security types are known, without answering them (a probe).
    SECURITY_TYPES = enum.auto()
    #: Complete the handshake through ClientInit / ServerInit.
    SERVER_INIT = enum.auto()


# --------------------------------------------------------------------------------------------
# Messages.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PixelFormat:
    """PIXEL_FORMAT, RFC 6143 section 7.4.

    The flags are booleans: the RFC reads any non-zero flag byte as true, and `__bytes__`
    writes 1. `__bytes__` does not validate, so tests can build bad formats.
    """

    bits_per_pixel: int
    depth: int
    big_endian: bool
    true_colour: bool
    red_max: int
    green_max: int
    blue_max: int
    red_shift: int
    green_shift: int
    blue_shift: int

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """Parse and sanity-check exactly `PIXEL_FORMAT_LENGTH` bytes.

        Args:
            data: The 16 bytes of a PIXEL_FORMAT.

        Returns:
            The parsed pixel format.

        Raises:
            MalformedMessage: ``data`` is not 16 bytes long.
            BadPixelFormat: bits-per-pixel is not 8, 16 or 32, or depth is not in
                1..bits-per-pixel (RFC 6143 section 7.4).
        """
        if len(data) != PIXEL_FORMAT_LENGTH:
            raise MalformedMessage(f"PIXEL_FORMAT is {len(data)} bytes, not {PIXEL_FORMAT_LENGTH}")
        bpp, depth, big, true, rmax, gmax, bmax, rsh, gsh, bsh = PIXEL_FORMAT.unpack(data)
        if bpp not in _BITS_PER_PIXEL:
            raise BadPixelFormat(f"bits-per-pixel {bpp} is not 8, 16 or 32")
        if not 1 <= depth <= bpp:
            raise BadPixelFormat(f"depth {depth} is not in 1..{bpp}")
        return cls(
            bits_per_pixel=bpp,
            depth=depth,
            big_endian=big != 0,
            true_colour=true != 0,
            red_max=rmax,
            green_max=gmax,
            blue_max=bmax,
            red_shift=rsh,
            green_shift=gsh,
            blue_shift=bsh,
        )

    def __bytes__(self) -> bytes:
        """Serialize as the 16 bytes of a PIXEL_FORMAT (RFC 6143 section 7.4)."""
        return PIXEL_FORMAT.pack(
            self.bits_per_pixel,
            self.depth,
            int(self.big_endian),
            int(self.true_colour),
            self.red_max,
            self.green_max,
            self.blue_max,
            self.red_shift,
            self.green_shift,
            self.blue_shift,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerInit:
    """ServerInit, RFC 6143 section 7.3.2.

    ``name`` is decoded as UTF-8 with invalid bytes replaced (the RFC leaves the encoding
    open; TigerVNC sends UTF-8). `__bytes__` encodes it as UTF-8 and does not validate.
    """

    width: int
    height: int
    pixel_format: PixelFormat
    name: str

    @classmethod
    def parse_header(cls, header: bytes) -> tuple[int, int, PixelFormat, int]:
        """Parse and check the fixed 24-byte head of a ServerInit.

        Args:
            header: Exactly `SERVER_INIT_HEADER_LENGTH` bytes.

        Returns:
            ``(width, height, pixel_format, name_length)``.

        Raises:
            MalformedMessage: ``header`` has the wrong length.
            BadDimensions: Width or height is 0 or above `MAX_DIMENSION`.
            BadPixelFormat: See `PixelFormat.from_bytes`.
            FieldTooLong: name-length exceeds `MAX_NAME_LENGTH`.
        """
        if len(header) != SERVER_INIT_HEADER_LENGTH:
            raise MalformedMessage(
                f"ServerInit header is {len(header)} bytes, not {SERVER_INIT_HEADER_LENGTH}"
            )
        width, height, pixel_format, name_length = SERVER_INIT_HEADER.unpack(header)
        if not (1 <= width <= MAX_DIMENSION and 1 <= height <= MAX_DIMENSION):
            raise BadDimensions(f"framebuffer {width}x{height} outside 1..{MAX_DIMENSION}")
        parsed = PixelFormat.from_bytes(pixel_format)
        if name_length > MAX_NAME_LENGTH:
            raise FieldTooLong("desktop name", name_length, MAX_NAME_LENGTH)
        return width, height, parsed, name_length

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """Parse a complete ServerInit message.

        Args:
            data: The whole message: the 24-byte head and exactly name-length more bytes.

        Returns:
            The parsed ServerInit.

        Raises:
            MalformedMessage: ``data`` is shorter or longer than the message it holds.
            BadDimensions, BadPixelFormat, FieldTooLong: See `parse_header`.
        """
        width, height, pixel_format, name_length = cls.parse_header(
            data[:SERVER_INIT_HEADER_LENGTH]
        )
        if len(data) != SERVER_INIT_HEADER_LENGTH + name_length:
            raise MalformedMessage(
                f"ServerInit is {len(data)} bytes, name-length says "
                f"{SERVER_INIT_HEADER_LENGTH + name_length}"
            )
        name = data[SERVER_INIT_HEADER_LENGTH:].decode("utf-8", errors="replace")
        return cls(width=width, height=height, pixel_format=pixel_format, name=name)

    def __bytes__(self) -> bytes:
        """Serialize as a ServerInit message (RFC 6143 section 7.3.2)."""
        name = self.name.encode("utf-8")
        return (
            SERVER_INIT_HEADER.pack(self.width, self.height, bytes(self.pixel_format), len(name))
            + name
        )


# --------------------------------------------------------------------------------------------
# Events.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerVersion:
    """The server's ProtocolVersion arrived (RFC 6143 section 7.1.1).

    Attributes:
        version: The version the server announced, e.g. ``(3, 889)`` for Apple.
        negotiated: The version the client answered with: (3, 3), (3, 7) or (3, 8).
    """

    version: tuple[int, int]
    negotiated: tuple[int, int]


@dataclass(frozen=True, slots=True, kw_only=True)
class SecurityTypes:
    """The server's security types arrived (RFC 6143 section 7.1.2).

    For 3.3 the server decides alone and ``types`` holds its single choice.

    Attributes:
        types: The types offered, in the server's order.
        chosen: The type the client picked (or, with ``stop_at=Stage.SECURITY_TYPES``, would
            pick), or None if it can complete none of them.
    """

    types: tuple[int, ...]
    chosen: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthOK:
    """SecurityResult reported success (RFC 6143 section 7.1.3).

    Not emitted for security type None in 3.3 and 3.7, which send no SecurityResult.
    """


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthFailed:
    """SecurityResult reported failure (RFC 6143 section 7.1.3); the client is now FAILED.

    Attributes:
        reason: The server's reason-string (3.8), or `DEFAULT_FAILURE_REASON` (3.3, 3.7).
    """

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerInitReceived:
    """ServerInit arrived (RFC 6143 section 7.3.2); the handshake is done."""

    init: ServerInit


Event = ServerVersion | SecurityTypes | AuthOK | AuthFailed | ServerInitReceived
