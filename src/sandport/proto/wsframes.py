"""WebSocket frames after the handshake, server side, streaming (RFC 6455 section 5).

The bridge's hot path. websockets' protocol object parses the opening handshake; after
the 101, :class:`FrameReader` takes the client's bytes and hands back payload *pieces* as
they arrive, unmasked, without waiting for a frame to be complete and without copying
them into a buffer first: one pass (the unmasking) per byte. :func:`frame_header` builds
the header of a server frame, which is written ahead of the payload (no copy).

Wire format (section 5.2)::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-------+-+-------------+-------------------------------+
    |F|R|R|R| opcode|M| Payload len |    Extended payload length    |
    |I|S|S|S|  (4)  |A|     (7)     |             (16/64)           |
    |N|V|V|V|       |S|             |   (if payload len==126/127)   |
    | |1|2|3|       |K|             |                               |
    +-+-+-+-+-------+-+-------------+ - - - - - - - - - - - - - - - +
    |     Extended payload length continued, if payload len == 127  |
    + - - - - - - - - - - - - - - - +-------------------------------+
    |                               |Masking-key, if MASK set to 1  |
    +-------------------------------+-------------------------------+
    | Masking-key (continued)       |          Payload Data         |
    +-------------------------------- - - - - - - - - - - - - - - - +

Checked: RSV bits 0 (no extension is negotiated), known opcodes, client frames masked,
control frames final and at most 125 bytes, continuation only inside a fragmented
message and no new message inside one, 64-bit lengths below 2**63, a message size cap,
close codes and reasons. A violation raises :class:`FrameError` with the close code to
send (1002 protocol error, 1007 bad reason text, 1009 too big).
"""

from __future__ import annotations

import enum
import struct
from typing import Final

from websockets.speedups import apply_mask

from sandport.proto.errors import RemoteProtocolError


class Opcode(enum.IntEnum):
    """Frame opcodes (section 5.2)."""

    CONT = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


DATA_OPCODES: Final = frozenset({Opcode.CONT, Opcode.TEXT, Opcode.BINARY})
CONTROL_OPCODES: Final = frozenset({Opcode.CLOSE, Opcode.PING, Opcode.PONG})
MAX_CONTROL_PAYLOAD: Final = 125
#: Close codes a peer may send (section 7.4.1; 1004-1006 and 1015 are never sent).
VALID_CLOSE_CODES: Final = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011,
                                      1012, 1013, 1014})
# The close codes sandport sends (section 7.4.1).
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_UNSUPPORTED: Final = 1003
CLOSE_INVALID_DATA: Final = 1007
CLOSE_TOO_BIG: Final = 1009
CLOSE_INTERNAL: Final = 1011

_OPCODES: Final = {int(op): op for op in Opcode}
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")


class FrameError(RemoteProtocolError):
    """The client broke RFC 6455; ``code`` is the close code to answer with.

    ``events``: what the failing :meth:`FrameReader.receive_data` call parsed before the
    error, in order, so the same bytes in any split yield the same events (as with
    ``RFBProtocolError.events`` and ``FramingError.events``).
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.events: list[tuple[Event, Opcode, bytes, bool]] = []


class Event(enum.Enum):
    """What :meth:`FrameReader.receive_data` hands back, with a payload."""

    DATA = "data"  # a piece of a data message: (DATA, opcode of the message, bytes, last)
    PING = "ping"  # (PING, Opcode.PING, payload, True)
    PONG = "pong"
    CLOSE = "close"  # (CLOSE, Opcode.CLOSE, payload, True): see parse_close()


def frame_header(opcode: int, length: int, *, fin: bool = True) -> bytes:
    """The header of an unmasked (server) frame carrying ``length`` payload bytes."""
    b0 = (0x80 if fin else 0) | opcode
    if length < 126:
        return bytes((b0, length))
    if length < 65536:
        return bytes((b0, 126)) + _U16.pack(length)
    return bytes((b0, 127)) + _U64.pack(length)


def close_payload(code: int, reason: str) -> bytes:
    """The payload of a close frame, the reason cut to fit 125 bytes on a UTF-8 boundary."""
    raw = reason.encode()[: MAX_CONTROL_PAYLOAD - 2]
    return _U16.pack(code) + raw.decode(errors="ignore").encode()


def parse_close(payload: bytes) -> tuple[int | None, str]:
    """``(code, reason)`` of a close frame's payload; ``(None, "")`` when it is empty.

    Raises:
        FrameError: a one-byte payload, an invalid code (1002) or a reason that is not
            UTF-8 (1007).
    """
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise FrameError(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = _U16.unpack_from(payload)[0]
    if code not in VALID_CLOSE_CODES and not 3000 <= code <= 4999:
        raise FrameError(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise FrameError(CLOSE_INVALID_DATA, "close reason is not UTF-8") from None
    return code, reason


class FrameReader:
    """Client frames in, payload pieces out (a sans-I/O parser; feed it any split).

    Args:
        max_message: largest data message in bytes (its fragments summed); beyond it
            :class:`FrameError` with 1009.
    """

    __slots__ = ("_control", "_fin", "_framing", "_head", "_left", "_mask", "_masked_at",
                 "_max", "_msg_op", "_msg_size", "_op")

    def __init__(self, max_message: int) -> None:
        self._max = max_message
        self._head = bytearray()  # an incomplete header (at most 14 bytes)
        self._left = 0  # payload bytes of the current frame still to come
        self._mask = b""
        self._masked_at = 0  # payload offset of the current frame (for the mask phase)
        self._op = Opcode.CONT
        self._fin = True
        self._control = bytearray()  # a control frame's payload, gathered whole
        self._msg_op: Opcode | None = None  # opcode of the data message in progress
        self._msg_size = 0
        self._framing = False  # a header was read; its payload is being received

    def receive_data(self, data: bytes) -> list[tuple[Event, Opcode, bytes, bool]]:
        """Parse ``data``; every complete piece of payload and control frame so far.

        Raises:
            FrameError: the client broke the protocol; send a close with its code. Its
                ``events`` hold what this call parsed before the error.
        """
        out: list[tuple[Event, Opcode, bytes, bool]] = []
        try:
            self._parse(data, out)
        except FrameError as exc:
            exc.events = out
            raise
        return out

    def _parse(self, data: bytes, out: list[tuple[Event, Opcode, bytes, bool]]) -> None:
        view = memoryview(data)
        pos, end = 0, len(data)
        while True:
            if not self._framing:
                pos = self._read_header(view, pos, end)
                if not self._framing:
                    break  # need more header bytes
                if self._left == 0:  # an empty frame ends with its header
                    self._finish_frame(out, b"")
                    continue
            if pos >= end:
                break
            n = min(self._left, end - pos)
            piece = self._unmask(view[pos : pos + n])
            pos += n
            self._left -= n
            if self._op in CONTROL_OPCODES:
                self._control += piece
                if self._left == 0:
                    self._finish_frame(out, bytes(self._control))
                    self._control.clear()
            else:
                out.append((Event.DATA, self._msg_op or Opcode.BINARY, piece,
                            self._left == 0 and self._fin))
                if self._left == 0:
                    self._end_data_frame()

    # -- internals ----------------------------------------------------------------------------

    def _read_header(self, view: memoryview, pos: int, end: int) -> int:
        """Take header bytes; once complete, start the frame. Returns the new position."""
        head = self._head
        if not head and end - pos >= 14:  # fast path: the whole header is here
            b1 = view[pos + 1]
            size7 = b1 & 0x7F
            need = (2 + (2 if size7 == 126 else 8 if size7 == 127 else 0)
                    + (4 if b1 & 0x80 else 0))
            self._start_frame(bytes(view[pos : pos + need]))
            return pos + need
        need = 2
        while True:
            if len(head) >= 2:
                size7 = head[1] & 0x7F
                need = (2 + (2 if size7 == 126 else 8 if size7 == 127 else 0)
                        + (4 if head[1] & 0x80 else 0))  # unmasked: refused at once
            if len(head) >= need:
                break
            take = min(need - len(head), end - pos)
            if take == 0:
                return pos
            head += view[pos : pos + take]
            pos += take
        self._start_frame(bytes(head))
        head.clear()
        return pos

    def _start_frame(self, head: bytes) -> None:
        b0, b1 = head[0], head[1]
        if b0 & 0x70:
            raise FrameError(CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension agreed)")
        op = _OPCODES.get(b0 & 0x0F)
        if op is None:
            raise FrameError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {b0 & 0x0F}")
        fin = bool(b0 & 0x80)
        if not b1 & 0x80:
            raise FrameError(CLOSE_PROTOCOL_ERROR, "client frames must be masked")
        size7 = b1 & 0x7F
        if size7 == 126:
            length, mask_at = _U16.unpack_from(head, 2)[0], 4
        elif size7 == 127:
            length, mask_at = _U64.unpack_from(head, 2)[0], 10
            if length >> 63:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "frame length over 2**63")
        else:
            length, mask_at = size7, 2
        if op in CONTROL_OPCODES:
            if not fin:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "fragmented control frame")
            if length > MAX_CONTROL_PAYLOAD:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "control frame over 125 bytes")
        elif op is Opcode.CONT:
            if self._msg_op is None:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "continuation frame outside a message")
        else:
            if self._msg_op is not None:
                raise FrameError(CLOSE_PROTOCOL_ERROR,
                                 "a new message started inside a fragmented one")
            self._msg_op = op
            self._msg_size = 0
        if op in DATA_OPCODES:
            self._msg_size += length
            if self._msg_size > self._max:
                raise FrameError(CLOSE_TOO_BIG, f"message over {self._max} bytes")
        self._op, self._fin = op, fin
        self._mask = head[mask_at : mask_at + 4]
        self._masked_at = 0
        self._left = length
        self._framing = True

    def _unmask(self, piece: memoryview) -> bytes:
        phase = self._masked_at & 3
        mask = self._mask if phase == 0 else self._mask[phase:] + self._mask[:phase]
        self._masked_at += len(piece)
        return apply_mask(piece, mask)

    def _end_data_frame(self) -> None:
        self._framing = False
        if self._fin:
            self._msg_op = None

    def _finish_frame(self, out: list[tuple[Event, Opcode, bytes, bool]],
                      payload: bytes) -> None:
        self._framing = False
        op = self._op
        if op is Opcode.PING:
            out.append((Event.PING, op, payload, True))
        elif op is Opcode.PONG:
            out.append((Event.PONG, op, payload, True))
        elif op is Opcode.CLOSE:
            out.append((Event.CLOSE, op, payload, True))
        else:  # an empty data frame
            out.append((Event.DATA, self._msg_op or Opcode.BINARY, b"", self._fin))
            self._end_data_frame()
