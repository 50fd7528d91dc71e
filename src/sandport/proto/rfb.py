"""Sans-I/O RFB (VNC) client handshake, RFC 6143 sections 7.1 to 7.4.

`RFBClient` drives the client side of the handshake without doing any I/O, in the style of
h11 and the protocol objects of `websockets`: the caller feeds it the bytes read from the
server with `RFBClient.receive_data`, gets back the events those bytes completed, writes
whatever `RFBClient.data_to_send` returns, and reports end of stream with
`RFBClient.receive_eof`.

The handshake, with the versions' differences (RFC 6143 Appendix A)::

    server                                  client
    ProtocolVersion "RFB 003.008\\n"   -->                        (7.1.1)
                                      <--  ProtocolVersion        (negotiated version)
    3.7/3.8: u8 count, count x u8     -->                        (7.1.2)
    3.3:     u32 security-type
                                      <--  u8 chosen type         (3.7/3.8 only)
    VncAuth: 16-byte challenge        -->                        (7.2.2)
                                      <--  16-byte DES response
    SecurityResult u32 [+ reason 3.8] -->                        (7.1.3)
                                      <--  ClientInit u8 shared   (7.3.1)
    ServerInit                        -->                        (7.3.2)

Stopping early: with ``stop_at=Stage.SECURITY_TYPES`` the client answers the version, reads
the security types and stops (``done`` becomes true) without answering them, which is what a
readiness probe needs: proof that an RFB server, not just a listening socket, is there.

Failures:

* Bad wire input raises a subclass of `RFBProtocolError` (itself a `RemoteProtocolError`).
  Events the same `receive_data` call completed before the failure are on the exception's
  ``events`` attribute, so feeding the same bytes in any split yields the same events.
  The client moves to `ClientState.FAILED`.
* A refused password is not an exception: `receive_data` returns an `AuthFailed` event and
  the client moves to `ClientState.FAILED` (RFC 6143 section 7.1.3: the server then closes).
  Any further byte from the peer raises `DataAfterFailure`.
* Misusing the object (data after `receive_eof`) raises `LocalProtocolError`; an illegal
  state transition, which would be a bug in this module, raises `InvalidTransition`. Neither
  is a `RemoteProtocolError`.

Bytes that arrive after the handshake is done (for example the start of a server message)
are not parsed: they are kept for `RFBClient.trailing_data`. Every byte the client holds, in
progress or trailing, counts against `MAX_BUFFER`.
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass
from typing import Final, Self

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from sandport.proto.errors import InvalidTransition, LocalProtocolError, RemoteProtocolError

__all__ = [
    "MAX_BUFFER",
    "MAX_DIMENSION",
    "MAX_NAME_LENGTH",
    "MAX_REASON_LENGTH",
    "AuthFailed",
    "AuthOK",
    "BadDimensions",
    "BadPixelFormat",
    "BadProtocolVersion",
    "BadSecurityResult",
    "BufferOverflow",
    "ClientState",
    "ConnectionClosedDuringHandshake",
    "ConnectionFailed",
    "DataAfterFailure",
    "Event",
    "FieldTooLong",
    "InvalidTransition",
    "LocalProtocolError",
    "MalformedMessage",
    "NoSupportedSecurityType",
    "PasswordRequired",
    "PixelFormat",
    "RFBClient",
    "RFBProtocolError",
    "SecurityType",
    "SecurityTypes",
    "ServerInit",
    "ServerInitReceived",
    "ServerVersion",
    "Stage",
    "UnsupportedVersion",
    "deobfuscate_password",
    "negotiate_version",
    "obfuscate_password",
    "vnc_auth_response",
]

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
# Errors.
# --------------------------------------------------------------------------------------------


class RFBProtocolError(RemoteProtocolError):
    """Base for every RFB error caused by bytes the server sent.

    Attributes:
        events: Events that the failing `RFBClient.receive_data` call completed before the
            error; empty unless set by that call.
    """

    events: tuple[Event, ...] = ()


class BadProtocolVersion(RFBProtocolError):
    """The server's ProtocolVersion is not ``RFB xxx.yyy\\n`` (RFC 6143 section 7.1.1)."""


class UnsupportedVersion(RFBProtocolError):
    """The server speaks an RFB version this client cannot negotiate down to 3.3-3.8."""

    def __init__(self, version: tuple[int, int]) -> None:
        self.version = version
        super().__init__(f"unsupported RFB version {version[0]}.{version[1]}")


class ConnectionFailed(RFBProtocolError):
    """The server refused the connection and said why (RFC 6143 section 7.1.2)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"server refused the connection: {reason}")


class NoSupportedSecurityType(RFBProtocolError):
    """No security type the server offers is one this client can complete."""

    def __init__(self, offered: tuple[int, ...]) -> None:
        self.offered = offered
        super().__init__(f"no supported security type among {list(offered)}")


class PasswordRequired(NoSupportedSecurityType):
    """The server requires VNC Authentication and the client has no password."""


class BadSecurityResult(RFBProtocolError):
    """SecurityResult holds a status other than OK / failed (RFC 6143 section 7.1.3)."""


class MalformedMessage(RFBProtocolError):
    """A message has the wrong length for its fixed layout."""


class FieldTooLong(RFBProtocolError):
    """A length field exceeds its cap (see the ``MAX_*`` constants)."""

    def __init__(self, field: str, length: int, cap: int) -> None:
        self.field = field
        self.length = length
        self.cap = cap
        super().__init__(f"{field} length {length} exceeds cap {cap}")


class BadDimensions(RFBProtocolError):
    """ServerInit announces a framebuffer of zero size or wider/taller than `MAX_DIMENSION`."""


class BadPixelFormat(RFBProtocolError):
    """PIXEL_FORMAT fails a sanity check (RFC 6143 section 7.4)."""


class BufferOverflow(RFBProtocolError):
    """The server sent more unrequested bytes than `MAX_BUFFER`."""


class ConnectionClosedDuringHandshake(RFBProtocolError):
    """The server closed the connection before the handshake finished."""


class DataAfterFailure(RFBProtocolError):
    """Bytes arrived after the handshake had already failed."""




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

# --------------------------------------------------------------------------------------------
# Version negotiation.
# --------------------------------------------------------------------------------------------

#: Versions outside 3.x that real servers announce and that speak 3.8 (as noVNC maps them).
_VERSION_QUIRKS: Final[dict[tuple[int, int], tuple[int, int]]] = {
    (4, 0): (3, 8),  # Intel AMT KVM
    (4, 1): (3, 8),  # RealVNC 4.6
    (5, 0): (3, 8),  # RealVNC 5.3
}


def negotiate_version(server: tuple[int, int]) -> tuple[int, int]:
    """Pick the version to answer a server's ProtocolVersion with (RFC 6143 section 7.1.1).

    Only 3.3, 3.7 and 3.8 are official. Documented quirks: 3.4 and 3.6 (UltraVNC) and 3.5
    speak 3.3; 3.889 (Apple Remote Desktop) and anything above 3.8 speak 3.8; 4.0 (Intel AMT),
    4.1 and 5.0 (RealVNC) speak 3.8.

    Args:
        server: The ``(major, minor)`` the server announced.

    Returns:
        (3, 3), (3, 7) or (3, 8).

    Raises:
        UnsupportedVersion: Below 3.3, or a major version other than 3 not listed above.
    """
    if server in _VERSION_QUIRKS:
        return _VERSION_QUIRKS[server]
    major, minor = server
    if major != 3 or minor < 3:
        raise UnsupportedVersion(server)
    if minor < 7:
        return (3, 3)
    if minor == 7:
        return (3, 7)
    return (3, 8)


def _check_banner_prefix(data: bytes | bytearray) -> None:
    """Reject a ProtocolVersion as soon as its first bytes cannot match the template."""
    for got, want in zip(data[:PROTOCOL_VERSION_LENGTH], _PROTOCOL_VERSION_TEMPLATE, strict=False):
        ok = (0x30 <= got <= 0x39) if want == 0x30 else got == want
        if not ok:
            raise BadProtocolVersion(
                f"not an RFB ProtocolVersion: {bytes(data[:PROTOCOL_VERSION_LENGTH])!r}"
            )


# --------------------------------------------------------------------------------------------
# DES, the VNC way.
# --------------------------------------------------------------------------------------------

#: Fixed DES key of the VNC password file obfuscation (vncauth.c ``fixedkey``).
PASSWORD_FILE_KEY: Final = bytes([23, 82, 107, 6, 35, 78, 88, 7])
#: Significant length of a VNC password: DES keys are 8 bytes.
PASSWORD_LENGTH: Final = 8
#: Byte ``i`` with its bit order reversed.
_REVERSED_BITS: Final = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def _des_cipher(vnc_key: bytes) -> Cipher[modes.ECB]:
    """Single DES-ECB keyed the VNC way.

    VNC's d3des takes key bits least significant first, so every key byte is bit-reversed
    before standard DES sees it (the well-known erratum to RFC 6143 section 7.2.2). TripleDES
    with the key repeated three times (EDE) is single DES.
    """
    key = vnc_key.translate(_REVERSED_BITS)
    # Single DES is what RFB specifies; nothing stronger would interoperate.
    return Cipher(TripleDES(key * 3), modes.ECB())  # noqa: S305


def _password_block(password: str) -> bytes:
    """The 8-byte DES block / key for ``password``: truncated or NUL-padded to 8 bytes.

    Raises:
        ValueError: ``password`` is empty, contains NUL, or is not latin-1.
    """
    if not password:
        raise ValueError("VNC password must not be empty")
    if "\0" in password:
        raise ValueError("VNC password must not contain NUL")
    try:
        raw = password.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError("VNC password must be latin-1 (ideally ASCII)") from None
    return raw[:PASSWORD_LENGTH].ljust(PASSWORD_LENGTH, b"\0")


def vnc_auth_response(challenge: bytes, password: str) -> bytes:
    """Answer a VNC Authentication challenge (RFC 6143 section 7.2.2).

    The response is the 16-byte challenge DES-ECB encrypted with the password as key: the
    password truncated to 8 characters or padded with NULs, each key byte bit-reversed.
    Only the first 8 characters of a longer password count.

    Args:
        challenge: The server's 16 random bytes.
        password: Non-empty latin-1 text without NUL.

    Returns:
        The 16-byte response.

    Raises:
        ValueError: ``challenge`` is not 16 bytes, or ``password`` is unusable.
    """
    if len(challenge) != CHALLENGE_LENGTH:
        raise ValueError(f"challenge must be {CHALLENGE_LENGTH} bytes, not {len(challenge)}")
    encryptor = _des_cipher(_password_block(password)).encryptor()
    return encryptor.update(challenge) + encryptor.finalize()


def obfuscate_password(password: str) -> bytes:
    """The 8-byte content of a VNC password file (TigerVNC ``-PasswordFile``, x11vnc -rfbauth).

    The NUL-padded password block DES-encrypted with the fixed key `PASSWORD_FILE_KEY`, keyed
    with the same bit reversal as `vnc_auth_response`; byte-identical to what
    ``x11vnc -storepasswd PASS FILE`` writes. Obfuscation, not protection: anyone who can read
    the file can recover the password. Only the first 8 characters count.

    Args:
        password: Non-empty latin-1 text without NUL.

    Returns:
        8 bytes.

    Raises:
        ValueError: ``password`` is unusable.
    """
    encryptor = _des_cipher(PASSWORD_FILE_KEY).encryptor()
    return encryptor.update(_password_block(password)) + encryptor.finalize()


def deobfuscate_password(data: bytes) -> str:
    """Recover the password from a VNC password file's content.

    Args:
        data: 8 bytes, or 16 (TigerVNC appends a view-only password; it is ignored).

    Returns:
        The full-access password (at most 8 characters).

    Raises:
        ValueError: ``data`` has another length or holds an empty password.
    """
    if len(data) not in (PASSWORD_LENGTH, 2 * PASSWORD_LENGTH):
        raise ValueError(f"VNC password file must be 8 or 16 bytes, not {len(data)}")
    decryptor = _des_cipher(PASSWORD_FILE_KEY).decryptor()
    block = decryptor.update(data[:PASSWORD_LENGTH]) + decryptor.finalize()
    password = block.split(b"\0", 1)[0].decode("latin-1")
    if not password:
        raise ValueError("VNC password file holds an empty password")
    return password


# --------------------------------------------------------------------------------------------
# The client state machine.
# --------------------------------------------------------------------------------------------


class ClientState(enum.Enum):
    """What `RFBClient` waits for next."""

    AWAIT_PROTOCOL_VERSION = enum.auto()
    AWAIT_SECURITY = enum.auto()
    AWAIT_CHALLENGE = enum.auto()
    AWAIT_SECURITY_RESULT = enum.auto()
    AWAIT_SERVER_INIT = enum.auto()
    DONE = enum.auto()
    FAILED = enum.auto()


_S = ClientState
#: The only legal transitions. FAILED is terminal; DONE only fails (on `BufferOverflow`).
TRANSITIONS: Final[dict[ClientState, frozenset[ClientState]]] = {
    _S.AWAIT_PROTOCOL_VERSION: frozenset({_S.AWAIT_SECURITY, _S.FAILED}),
    _S.AWAIT_SECURITY: frozenset(
        {
            _S.AWAIT_CHALLENGE,  # VncAuth
            _S.AWAIT_SECURITY_RESULT,  # None, 3.8
            _S.AWAIT_SERVER_INIT,  # None, 3.3 / 3.7
            _S.DONE,  # stop_at=SECURITY_TYPES
            _S.FAILED,
        }
    ),
    _S.AWAIT_CHALLENGE: frozenset({_S.AWAIT_SECURITY_RESULT, _S.FAILED}),
    _S.AWAIT_SECURITY_RESULT: frozenset({_S.AWAIT_SERVER_INIT, _S.FAILED}),
    _S.AWAIT_SERVER_INIT: frozenset({_S.DONE, _S.FAILED}),
    _S.DONE: frozenset({_S.FAILED}),
    _S.FAILED: frozenset(),
}
del _S


class RFBClient:
    """Sans-I/O RFB client handshake (RFC 6143 section 7).

    Args:
        password: VNC Authentication password; None if the client has none. Only the first
            8 characters count (see `vnc_auth_response`).
        shared: The ClientInit shared-flag: True lets other clients stay connected.
        stop_at: `Stage.SECURITY_TYPES` to stop (without answering) once the security types
            are known; `Stage.SERVER_INIT` for the full handshake.

    Raises:
        ValueError: ``password`` is empty, contains NUL, or is not latin-1.
    """

    def __init__(
        self,
        *,
        password: str | None = None,
        shared: bool = True,
        stop_at: Stage = Stage.SERVER_INIT,
    ) -> None:
        if password is not None:
            _password_block(password)  # validate now, not mid-handshake
        self._password = password
        self._shared = shared
        self._stop_at = stop_at
        self._state = ClientState.AWAIT_PROTOCOL_VERSION
        self._buffer = bytearray()
        self._outgoing = bytearray()
        self._version: tuple[int, int] | None = None
        self._failure: str | None = None
        self._eof = False

    # -- public API ---------------------------------------------------------------------------

    @property
    def state(self) -> ClientState:
        """The current state."""
        return self._state

    @property
    def done(self) -> bool:
        """True once the handshake reached ``stop_at``."""
        return self._state is ClientState.DONE

    @property
    def version(self) -> tuple[int, int] | None:
        """The negotiated version, once the server's ProtocolVersion arrived."""
        return self._version

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes read from the server.

        Args:
            data: Any number of bytes, split anywhere; ``b""`` is not end of stream.

        Returns:
            The events these bytes completed, in order.

        Raises:
            RFBProtocolError: A subclass naming what was wrong with the input; its ``events``
                hold the events completed before the error. The client is then FAILED.
            LocalProtocolError: Called after `receive_eof`.
        """
        if self._eof:
            raise LocalProtocolError("receive_data() after receive_eof()")
        if not data:
            return []
        if self._failure is not None:  # set exactly when the state is FAILED
            raise DataAfterFailure(
                f"{len(data)} bytes after the handshake failed ({self._failure})"
            )
        self._buffer += data
        events: list[Event] = []
        try:
            while self._state not in (ClientState.DONE, ClientState.FAILED):
                if not self._step(events):
                    break
            if self._state is ClientState.FAILED and self._buffer:
                raise DataAfterFailure(
                    f"{len(self._buffer)} bytes after the handshake failed ({self._failure})"
                )
            if len(self._buffer) > MAX_BUFFER:
                raise BufferOverflow(
                    f"{len(self._buffer)} unconsumed bytes exceed cap {MAX_BUFFER} "
                    f"in state {self._state.name}"
                )
        except RFBProtocolError as exc:
            exc.events = tuple(events)
            self._fail(str(exc))
            raise
        return events

    def receive_eof(self) -> None:
        """Report that the server closed the connection.

        Harmless once the handshake is done or has failed (the server closes after a failed
        SecurityResult); calling it twice is harmless.

        Raises:
            ConnectionClosedDuringHandshake: The handshake was still in progress.
        """
        if self._eof:
            return
        self._eof = True
        if self._state in (ClientState.DONE, ClientState.FAILED):
            return
        exc = ConnectionClosedDuringHandshake(
            f"connection closed in state {self._state.name} with {len(self._buffer)} bytes "
            "of an unfinished message"
        )
        self._fail(str(exc))
        raise exc

    def data_to_send(self) -> bytes:
        """Return and forget the bytes the client wants written to the server."""
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    def trailing_data(self) -> bytes:
        """Return and forget bytes received after the handshake was done.

        They belong to whatever follows the handshake (e.g. the first server message); drain
        them before `MAX_BUFFER` is reached.

        Raises:
            LocalProtocolError: The handshake is not done.
        """
        if self._state is not ClientState.DONE:
            raise LocalProtocolError(f"trailing_data() in state {self._state.name}")
        out = bytes(self._buffer)
        self._buffer.clear()
        return out

    # -- machinery ----------------------------------------------------------------------------

    def _transition(self, new: ClientState) -> None:
        if new not in TRANSITIONS[self._state]:
            raise InvalidTransition(f"{self._state.name} -> {new.name}")
        self._state = new

    def _fail(self, reason: str) -> None:
        if self._state is not ClientState.FAILED:
            self._transition(ClientState.FAILED)
            self._failure = reason

    def _consume(self, n: int) -> bytes:
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    def _peek_string(self, offset: int, field: str, cap: int) -> tuple[str, int] | None:
        """Read a U32-length-prefixed string at ``offset`` without consuming it.

        Returns:
            ``(text, end offset)``, or None if more bytes are needed.

        Raises:
            FieldTooLong: The length exceeds ``cap`` (checked as soon as it is readable).
        """
        if len(self._buffer) < offset + U32.size:
            return None
        (length,) = U32.unpack_from(self._buffer, offset)
        if length > cap:
            raise FieldTooLong(field, length, cap)
        end = offset + U32.size + length
        if len(self._buffer) < end:
            return None
        text = bytes(self._buffer[offset + U32.size : end]).decode("utf-8", errors="replace")
        return text, end

    def _send_client_init(self) -> None:
        self._outgoing += CLIENT_INIT.pack(1 if self._shared else 0)

    def _step(self, events: list[Event]) -> bool:
        """Parse one message if complete; return False if more bytes are needed."""
        match self._state:
            case ClientState.AWAIT_PROTOCOL_VERSION:
                return self._on_protocol_version(events)
            case ClientState.AWAIT_SECURITY:
                if self._version == (3, 3):
                    return self._on_security_type_33(events)
                return self._on_security_types(events)
            case ClientState.AWAIT_CHALLENGE:
                return self._on_challenge()
            case ClientState.AWAIT_SECURITY_RESULT:
                return self._on_security_result(events)
            case ClientState.AWAIT_SERVER_INIT:
                return self._on_server_init(events)
            case _:  # DONE, FAILED: the caller's loop never gets here
                raise InvalidTransition(f"no message expected in state {self._state.name}")

    def _on_protocol_version(self, events: list[Event]) -> bool:
        """RFC 6143 section 7.1.1."""
        _check_banner_prefix(self._buffer)
        if len(self._buffer) < PROTOCOL_VERSION_LENGTH:
            return False
        banner = self._consume(PROTOCOL_VERSION_LENGTH)
        match = _PROTOCOL_VERSION_RE.fullmatch(banner)
        if match is None:  # the prefix check makes this unreachable; keep the parse honest
            raise BadProtocolVersion(f"not an RFB ProtocolVersion: {banner!r}")
        server = (int(match[1]), int(match[2]))
        self._version = negotiate_version(server)
        self._outgoing += b"RFB %03d.%03d\n" % self._version
        self._transition(ClientState.AWAIT_SECURITY)
        events.append(ServerVersion(version=server, negotiated=self._version))
        return True

    def _choose(self, types: tuple[int, ...]) -> int | None:
        if self._password is not None and SecurityType.VNC_AUTH in types:
            return int(SecurityType.VNC_AUTH)
        if SecurityType.NONE in types:
            return int(SecurityType.NONE)
        return None

    def _no_choice(self, types: tuple[int, ...]) -> NoSupportedSecurityType:
        if SecurityType.VNC_AUTH in types and self._password is None:
            return PasswordRequired(types)
        return NoSupportedSecurityType(types)

    def _on_security_type_33(self, events: list[Event]) -> bool:
        """RFC 6143 Appendix A: a 3.3 server decides alone and sends a U32 type."""
        if len(self._buffer) < U32.size:
            return False
        (chosen_by_server,) = U32.unpack_from(self._buffer)
        if chosen_by_server == SecurityType.INVALID:
            peeked = self._peek_string(U32.size, "reason", MAX_REASON_LENGTH)
            if peeked is None:
                return False
            raise ConnectionFailed(peeked[0])
        self._consume(U32.size)
        types = (int(chosen_by_server),)
        chosen = self._choose(types)
        events.append(SecurityTypes(types=types, chosen=chosen))
        if self._stop_at is Stage.SECURITY_TYPES:
            self._transition(ClientState.DONE)
            return True
        if chosen is None:
            raise self._no_choice(types)
        if chosen == SecurityType.VNC_AUTH:
            self._transition(ClientState.AWAIT_CHALLENGE)
        else:  # None: no SecurityResult before 3.8
            self._send_client_init()
            self._transition(ClientState.AWAIT_SERVER_INIT)
        return True

    def _on_security_types(self, events: list[Event]) -> bool:
        """RFC 6143 section 7.1.2 (3.7 and 3.8): U8 count, then count U8 types."""
        if not self._buffer:
            return False
        count = self._buffer[0]
        if count == 0:
            peeked = self._peek_string(U8.size, "reason", MAX_REASON_LENGTH)
            if peeked is None:
                return False
            raise ConnectionFailed(peeked[0])
        if len(self._buffer) < U8.size + count:
            return False
        types = tuple(self._consume(U8.size + count)[U8.size :])
        chosen = self._choose(types)
        events.append(SecurityTypes(types=types, chosen=chosen))
        if self._stop_at is Stage.SECURITY_TYPES:
            self._transition(ClientState.DONE)
            return True
        if chosen is None:
            raise self._no_choice(types)
        self._outgoing += U8.pack(chosen)
        if chosen == SecurityType.VNC_AUTH:
            self._transition(ClientState.AWAIT_CHALLENGE)
        elif self._version == (3, 8):  # None: 3.8 still sends SecurityResult
            self._transition(ClientState.AWAIT_SECURITY_RESULT)
        else:
            self._send_client_init()
            self._transition(ClientState.AWAIT_SERVER_INIT)
        return True

    def _on_challenge(self) -> bool:
        """RFC 6143 section 7.2.2."""
        if len(self._buffer) < CHALLENGE_LENGTH:
            return False
        challenge = self._consume(CHALLENGE_LENGTH)
        if self._password is None:  # _choose only picks VncAuth with a password
            raise InvalidTransition("VNC Authentication without a password")
        self._outgoing += vnc_auth_response(challenge, self._password)
        self._transition(ClientState.AWAIT_SECURITY_RESULT)
        return True

    def _on_security_result(self, events: list[Event]) -> bool:
        """RFC 6143 section 7.1.3."""
        if len(self._buffer) < U32.size:
            return False
        (status,) = U32.unpack_from(self._buffer)
        if status == SECURITY_RESULT_OK:
            self._consume(U32.size)
            events.append(AuthOK())
            self._send_client_init()
            self._transition(ClientState.AWAIT_SERVER_INIT)
            return True
        if status not in (SECURITY_RESULT_FAILED, SECURITY_RESULT_TOO_MANY):
            raise BadSecurityResult(f"SecurityResult status {status} is not 0, 1 or 2")
        if self._version == (3, 8):
            peeked = self._peek_string(U32.size, "reason", MAX_REASON_LENGTH)
            if peeked is None:
                return False
            reason, end = peeked
        else:
            reason, end = DEFAULT_FAILURE_REASON, U32.size
        self._consume(end)
        events.append(AuthFailed(reason=reason))
        self._fail(f"authentication failed: {reason}")
        return True

    def _on_server_init(self, events: list[Event]) -> bool:
        """RFC 6143 section 7.3.2."""
        if len(self._buffer) < SERVER_INIT_HEADER_LENGTH:
            return False
        header = bytes(self._buffer[:SERVER_INIT_HEADER_LENGTH])
        *_, name_length = ServerInit.parse_header(header)  # checks caps before waiting
        total = SERVER_INIT_HEADER_LENGTH + name_length
        if len(self._buffer) < total:
            return False
        init = ServerInit.from_bytes(self._consume(total))
        events.append(ServerInitReceived(init=init))
        self._transition(ClientState.DONE)
        return True
