"""RFB errors: every `RFBProtocolError` subclass raised on bad server input (RFC 6143).

Owns the exception hierarchy of the RFB client handshake, all rooted at `RFBProtocolError`
(a `RemoteProtocolError`). Must not touch: parsing, the wire formats, DES or the state
machine; nothing here may import anything above ``sandport.proto``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sandport.proto.errors import RemoteProtocolError

if TYPE_CHECKING:
    from sandport.proto.rfb.messages import Event

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
