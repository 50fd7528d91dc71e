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

Layout (one package, split along its seams; this module only re-exports):

* ``errors``: the `RFBProtocolError` hierarchy.
* ``messages``: caps, wire formats, `PixelFormat`, `ServerInit` and the events.
* ``vncauth``: VNC Authentication DES and the password file obfuscation.
* ``client``: version negotiation, `ClientState`, `TRANSITIONS` and `RFBClient`.

Nothing in this package may import anything above ``sandport.proto``.
"""

from __future__ import annotations

from sandport.proto.errors import (
    InvalidTransition,
    LocalProtocolError,
)
from sandport.proto.rfb.client import (
    TRANSITIONS as TRANSITIONS,
)
from sandport.proto.rfb.client import (
    ClientState,
    RFBClient,
    negotiate_version,
)
from sandport.proto.rfb.errors import (
    BadDimensions,
    BadPixelFormat,
    BadProtocolVersion,
    BadSecurityResult,
    BufferOverflow,
    ConnectionClosedDuringHandshake,
    ConnectionFailed,
    DataAfterFailure,
    FieldTooLong,
    MalformedMessage,
    NoSupportedSecurityType,
    PasswordRequired,
    RFBProtocolError,
    UnsupportedVersion,
)
from sandport.proto.rfb.messages import (
    MAX_BUFFER,
    MAX_DIMENSION,
    MAX_NAME_LENGTH,
    MAX_REASON_LENGTH,
    AuthFailed,
    AuthOK,
    Event,
    PixelFormat,
    SecurityType,
    SecurityTypes,
    ServerInit,
    ServerInitReceived,
    ServerVersion,
    Stage,
)
from sandport.proto.rfb.messages import (
    SERVER_INIT_HEADER as SERVER_INIT_HEADER,
)
from sandport.proto.rfb.vncauth import (
    PASSWORD_FILE_KEY as PASSWORD_FILE_KEY,
)
from sandport.proto.rfb.vncauth import (
    _des_cipher as _des_cipher,
)
from sandport.proto.rfb.vncauth import (
    deobfuscate_password,
    obfuscate_password,
    vnc_auth_response,
)

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
