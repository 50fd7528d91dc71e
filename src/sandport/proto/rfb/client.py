"""The sans-I/O RFB client handshake state machine (RFC 6143 section 7).

Owns version negotiation, `ClientState`, the one `TRANSITIONS` table and `RFBClient`, which
turns bytes from the server into events and bytes to send. Must not touch: sockets, asyncio
or clocks (the caller does the I/O); wire formats and DES live in ``messages`` and
``vncauth``; nothing here may import anything above ``sandport.proto``.
"""

from __future__ import annotations

import enum
from typing import Final

from sandport.proto.errors import InvalidTransition, LocalProtocolError
from sandport.proto.rfb.errors import (
    BadProtocolVersion,
    BadSecurityResult,
    BufferOverflow,
    ConnectionClosedDuringHandshake,
    ConnectionFailed,
    DataAfterFailure,
    FieldTooLong,
    NoSupportedSecurityType,
    PasswordRequired,
    RFBProtocolError,
    UnsupportedVersion,
)
from sandport.proto.rfb.messages import (
    _PROTOCOL_VERSION_RE,
    _PROTOCOL_VERSION_TEMPLATE,
    CHALLENGE_LENGTH,
    CLIENT_INIT,
    DEFAULT_FAILURE_REASON,
    MAX_BUFFER,
    MAX_REASON_LENGTH,
    PROTOCOL_VERSION_LENGTH,
    SECURITY_RESULT_FAILED,
    SECURITY_RESULT_OK,
    SECURITY_RESULT_TOO_MANY,
    SERVER_INIT_HEADER_LENGTH,
    U8,
    U32,
    AuthFailed,
    AuthOK,
    Event,
    SecurityType,
    SecurityTypes,
    ServerInit,
    ServerInitReceived,
    ServerVersion,
    Stage,
)
from sandport.proto.rfb.vncauth import _password_block, vnc_auth_response

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
