"""HTTP/1.1 message framing, sans-I/O: where each request and response starts and ends.

The gateway's front door relays ordinary requests to its HTTP app and bridges WebSocket
upgrades itself. To do that for *every* request of a keep-alive connection (the first,
a later one, a pipelined one), it must know where each request ends and where the app's
answer to it ends. :class:`MessageFramer` finds those boundaries in a byte stream the
way RFC 9112 defines them, and no more: it does not decode bodies or interpret headers
beyond what framing needs.

::

    HEAD ──► LENGTH ─────────────────────────────► HEAD (next message)
      │  └─► CHUNK_SIZE ─► CHUNK_DATA ─► CHUNK_END ─┐
      │          ▲                                  │
      │          └──────────────────────────────────┘
      │      CHUNK_SIZE (size 0) ─► TRAILER ───────► HEAD
      ├─► UNTIL_CLOSE (a response with no length) ─► CLOSED
      └─► PAUSED (a request that asks to upgrade; the owner decides: resume() or hand
                  the rest of the stream to another protocol)

Requests come from untrusted clients, so their framing is checked strictly, and every
form that two parsers could read differently is refused rather than guessed (request
smuggling, RFC 9112 section 11.2): ``Content-Length`` together with
``Transfer-Encoding``, conflicting lengths, a transfer coding other than a final
``chunked``, obsolete line folding, whitespace before a header's colon, bare CR or LF
line endings. Every buffer has a cap.

Example (the relay's use)::

    requests = MessageFramer(Role.REQUEST)
    for event in requests.receive_data(data):
        if isinstance(event, Head): ...   # rewrite and forward, or bridge an upgrade
        elif isinstance(event, Body): ... # forward as is
        else: ...                         # End: the request is complete
"""

from __future__ import annotations

import enum
import re
from collections import deque
from dataclasses import dataclass
from typing import Final

from sandport.proto.errors import InvalidTransition, LocalProtocolError, RemoteProtocolError

__all__ = [
    "MAX_CHUNK_LINE",
    "MAX_HEAD",
    "Body",
    "BodyTooLarge",
    "End",
    "FramingError",
    "Head",
    "HeadTooLarge",
    "MessageFramer",
    "Phase",
    "Role",
    "UnsupportedCoding",
    "parse_head",
]

#: Largest request or response head (start line and header fields), and largest trailer
#: section, in bytes. Beyond it a request is refused with 431.
MAX_HEAD: Final = 16 * 1024
#: Largest chunk-size line (size, extensions, CRLF).
MAX_CHUNK_LINE: Final = 4 * 1024
#: Largest chunk size in hex digits (2**60 bytes is far beyond any real body).
_MAX_CHUNK_DIGITS: Final = 15

#: ``token`` (RFC 9110 section 5.6.2): methods and field names.
_TOKEN: Final = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VERSION: Final = re.compile(rb"^HTTP/1\.[01]$")
_STATUS_LINE: Final = re.compile(rb"^HTTP/1\.[01] (\d{3})(?: .*)?$")
_HEX: Final = re.compile(rb"^[0-9A-Fa-f]+$")
_CRLF: Final = b"\r\n"
_HEAD_END: Final = b"\r\n\r\n"


class FramingError(RemoteProtocolError):
    """The peer's message cannot be framed safely.

    Attributes:
        status: the HTTP status to refuse a request with (400 unless a subclass says).
        events: what :meth:`MessageFramer.receive_data` framed before the error, in
            order: earlier requests are whole and still deserve their answers.
    """

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.events: list[Event] = []


class HeadTooLarge(FramingError):
    """A head or a trailer section is over :data:`MAX_HEAD` bytes."""

    status = 431


class BodyTooLarge(FramingError):
    """A request's content is over the framer's ``max_body`` (declared or as read)."""

    status = 413


class UnsupportedCoding(FramingError):
    """A request's ``Transfer-Encoding`` is not a final ``chunked`` (RFC 9112 section 6.1)."""

    status = 501


class Role(enum.Enum):
    """Which side's messages a framer reads."""

    REQUEST = enum.auto()
    RESPONSE = enum.auto()


@dataclass(frozen=True, slots=True, kw_only=True)
class Head:
    """A start line and its header fields, as sent (names keep their case).

    Attributes:
        start: the request line or the status line, without its CRLF.
        fields: ``(name, value)`` pairs in order, values without surrounding whitespace.
        method, target: of a request (``b""`` for a response).
        status: of a response (0 for a request).
        raw: the head exactly as it came, its final blank line included.
    """

    start: bytes
    fields: tuple[tuple[bytes, bytes], ...]
    method: bytes = b""
    target: bytes = b""
    status: int = 0
    raw: bytes = b""

    def values(self, name: bytes) -> list[bytes]:
        """Every value of the field ``name`` (case-insensitive), comma lists split."""
        key = name.lower()
        out: list[bytes] = []
        for n, v in self.fields:
            if n.lower() == key:
                out += [x.strip() for x in v.split(b",") if x.strip()]
        return out

    @property
    def upgrade(self) -> tuple[bytes, ...]:
        """The protocols an ``Upgrade`` field asks for, lower-cased (empty: none)."""
        return tuple(x.lower() for x in self.values(b"upgrade"))

    @property
    def websocket_upgrade(self) -> bool:
        """True for a request that asks to switch to WebSocket (RFC 6455 section 4.1)."""
        return any(p == b"websocket" or p.startswith(b"websocket/") for p in self.upgrade)


@dataclass(frozen=True, slots=True)
class Body:
    """Bytes of a message body exactly as they came (chunked framing included)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class End:
    """The message is complete: for a response, the *final* response to one request."""


Event = Head | Body | End


class Phase(enum.Enum):
    """What the framer reads next."""

    HEAD = enum.auto()
    LENGTH = enum.auto()
    CHUNK_SIZE = enum.auto()
    CHUNK_DATA = enum.auto()
    CHUNK_END = enum.auto()
    TRAILER = enum.auto()
    UNTIL_CLOSE = enum.auto()
    PAUSED = enum.auto()
    CLOSED = enum.auto()


_P = Phase
TRANSITIONS: Final[dict[Phase, frozenset[Phase]]] = {
    _P.HEAD: frozenset({_P.HEAD, _P.LENGTH, _P.CHUNK_SIZE, _P.UNTIL_CLOSE, _P.PAUSED,
                        _P.CLOSED}),
    _P.LENGTH: frozenset({_P.HEAD, _P.CLOSED}),
    _P.CHUNK_SIZE: frozenset({_P.CHUNK_DATA, _P.TRAILER, _P.CLOSED}),
    _P.CHUNK_DATA: frozenset({_P.CHUNK_END, _P.CLOSED}),
    _P.CHUNK_END: frozenset({_P.CHUNK_SIZE, _P.CLOSED}),
    _P.TRAILER: frozenset({_P.HEAD, _P.CLOSED}),
    _P.UNTIL_CLOSE: frozenset({_P.CLOSED}),
    _P.PAUSED: frozenset({_P.HEAD, _P.LENGTH, _P.CHUNK_SIZE, _P.CLOSED}),
    _P.CLOSED: frozenset(),
}


def _check_line_endings(head: bytes) -> None:
    """Every line ends in CRLF: a bare CR or LF is read differently by other parsers."""
    if head.count(b"\n") != head.count(_CRLF) or head.count(b"\r") != head.count(_CRLF):
        raise FramingError("a line of the head does not end in CRLF (bare CR or LF)")


def parse_head(raw: bytes, role: Role) -> Head:
    """Parse a complete head (start line, fields, the blank line).

    Args:
        raw: the head, ending in ``\\r\\n\\r\\n``.
        role: whether it is a request's or a response's.

    Raises:
        FramingError: the head is malformed (a specific reason in the message).
    """
    _check_line_endings(raw)
    lines = raw[: -len(_HEAD_END)].split(_CRLF)
    start, method, target, status = lines[0], b"", b"", 0
    if role is Role.REQUEST:
        parts = start.split(b" ")
        if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1]:
            raise FramingError("the request line is not METHOD SP TARGET SP VERSION")
        if not _VERSION.match(parts[2]):
            raise FramingError(f"unsupported HTTP version {parts[2][:16]!r}")
        if any(c < 0x21 or c == 0x7F for c in parts[1]):
            raise FramingError("the request target holds a control character or space")
        method, target = parts[0], parts[1]
    else:
        m = _STATUS_LINE.match(start)
        if m is None:
            raise FramingError("the status line is not HTTP/1.x NNN")
        status = int(m.group(1))
    fields: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise FramingError("obsolete line folding in the head (RFC 9112 section 5.2)")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            raise FramingError("a header field name is empty, not a token or followed "
                               "by whitespace before its colon")
        if any((c < 0x20 and c != 0x09) or c == 0x7F for c in value):
            raise FramingError(f"the value of {name[:40]!r} holds a control character")
        fields.append((name, value.strip(b" \t")))
    return Head(start=start, fields=tuple(fields), method=method, target=target,
                status=status, raw=raw)


def _content_length(head: Head) -> int | None:
    values = head.values(b"content-length")
    if not values:
        return None
    if any(not v.isdigit() or len(v) > 18 for v in values) or len(set(values)) != 1:
        raise FramingError("Content-Length is not one decimal number")
    return int(values[0])


class MessageFramer:
    """Finds message boundaries in one direction of an HTTP/1.1 connection.

    Feed bytes with :meth:`receive_data`; it returns :class:`Head`, :class:`Body` and
    :class:`End` events. A response framer must be told the method of each request its
    responses answer (:meth:`expect`), since a response to HEAD has no body.

    With ``max_body``, a request framer refuses (:class:`BodyTooLarge`) a request whose
    content is over that many bytes: a ``Content-Length`` over it before its head is
    emitted, a chunked body as soon as a chunk size would take it over (chunk framing is
    not counted); nothing of the excess is buffered.
    """

    def __init__(self, role: Role, *, max_head: int = MAX_HEAD,
                 max_body: int | None = None) -> None:
        self.role = role
        self.max_head = max_head
        self.max_body = max_body
        self._content = 0  # content bytes of the current request announced so far
        self._phase = Phase.HEAD
        self._buf = bytearray()
        self._left = 0  # bytes left of a LENGTH body or of a chunk (its CRLF excluded)
        self._next = Phase.HEAD  # where a PAUSED framer goes on resume()
        self._methods: deque[bytes] = deque()

    @property
    def phase(self) -> Phase:
        """What the framer reads next."""
        return self._phase

    @property
    def at_boundary(self) -> bool:
        """True between messages, with no byte of the next one buffered."""
        return self._phase is Phase.HEAD and not self._buf

    def _move(self, new: Phase) -> None:
        if new not in TRANSITIONS[self._phase]:
            raise InvalidTransition(f"{self._phase.name} -> {new.name}")
        self._phase = new

    def expect(self, method: bytes) -> None:
        """A response framer: the next unanswered request used ``method``."""
        if self.role is not Role.RESPONSE:
            raise LocalProtocolError("expect() is for a response framer")
        self._methods.append(method.upper())

    def trailing_data(self) -> bytes:
        """The bytes after a PAUSED head, not yet framed (the owner may take them)."""
        return bytes(self._buf)

    def resume(self) -> None:
        """Go on framing after a PAUSED head (the upgrade was not taken)."""
        if self._phase is not Phase.PAUSED:
            raise LocalProtocolError("resume() without a paused upgrade request")
        self._move(self._next)

    def receive_data(self, data: bytes) -> list[Event]:
        """Frame ``data``; return the events it completes.

        Raises:
            FramingError: the stream cannot be framed safely; the framer is then CLOSED.
            LocalProtocolError: data after :meth:`receive_eof`.
        """
        if self._phase is Phase.CLOSED:
            raise LocalProtocolError("data after the end of the stream")
        events: list[Event] = []
        if not self._buf and (self._phase is Phase.LENGTH or self._phase is Phase.CHUNK_DATA):
            # Body bytes as they arrive (a file the app sends): framed without a pass
            # through the buffer, only counted.
            n = min(len(data), self._left)
            events.append(Body(data if n == len(data) else data[:n]))
            self._left -= n
            data = data[n:] if n < len(data) else b""
            if not self._left:
                self._end_counted(events)
        self._buf += data
        try:
            while self._step(events):
                pass
        except FramingError as exc:
            self._move(Phase.CLOSED)
            exc.events = events
            raise
        return events

    def receive_eof(self) -> list[Event]:
        """The peer closed its side: the end of a response read until close, or nothing.

        Raises:
            FramingError: the stream ended inside a message.
        """
        phase = self._phase
        self._move(Phase.CLOSED)
        if phase is Phase.UNTIL_CLOSE:
            return [End()]
        if phase is Phase.HEAD and not self._buf.strip(b"\r\n"):
            return []
        if phase is Phase.PAUSED:
            return []
        raise FramingError(f"the stream ended inside a message ({phase.name.lower()})")

    # -- one step per phase; each returns True while it made progress --------------------

    def _step(self, events: list[Event]) -> bool:
        phase = self._phase
        if phase is Phase.HEAD:
            return self._head(events)
        if phase is Phase.LENGTH or phase is Phase.CHUNK_DATA:
            return self._counted(events)
        if phase is Phase.CHUNK_SIZE:
            return self._chunk_size(events)
        if phase is Phase.CHUNK_END:
            return self._chunk_end(events)
        if phase is Phase.TRAILER:
            return self._trailer(events)
        if phase is Phase.UNTIL_CLOSE and self._buf:
            events.append(Body(bytes(self._buf)))
            self._buf.clear()
        return False  # PAUSED, CLOSED, or UNTIL_CLOSE with nothing buffered

    def _head(self, events: list[Event]) -> bool:
        while self._buf[:2] == _CRLF:  # RFC 9112 section 2.2: empty lines before a request
            del self._buf[:2]
        if not self._buf:
            return False
        end = self._buf.find(_HEAD_END)
        if end < 0:
            if len(self._buf) > self.max_head:
                raise HeadTooLarge(f"the head is over {self.max_head} bytes")
            if b"\n\n" in self._buf or b"\r\r" in self._buf:
                raise FramingError("a line of the head does not end in CRLF (bare CR or LF)")
            return False
        if end + 4 > self.max_head:
            raise HeadTooLarge(f"the head is over {self.max_head} bytes")
        raw = bytes(self._buf[: end + 4])
        del self._buf[: end + 4]
        head = parse_head(raw, self.role)
        if self.role is Role.REQUEST:
            self._after_request_head(head, events)
        else:
            self._after_response_head(head, events)
        return True

    def _after_request_head(self, head: Head, events: list[Event]) -> None:
        """Check the request's framing, then emit its head (never a head that fails)."""
        length = _content_length(head)
        codings = [c.lower() for c in head.values(b"transfer-encoding")]
        if codings and length is not None:
            raise FramingError("the request has both Content-Length and Transfer-Encoding")
        if codings and codings[-1] != b"chunked":
            raise UnsupportedCoding("Transfer-Encoding must end in chunked")
        if codings and b"chunked" in codings[:-1]:
            raise FramingError("chunked is applied more than once")
        if self.max_body is not None and length is not None and length > self.max_body:
            raise BodyTooLarge(f"the body is {length} bytes; the limit is {self.max_body}")
        self._content = 0
        if codings:
            body = Phase.CHUNK_SIZE
        elif length:
            body, self._left = Phase.LENGTH, length
        else:
            body = Phase.HEAD
        events.append(head)
        if head.upgrade:
            self._next = body
            self._move(Phase.PAUSED)
            return
        self._move(body)
        if body is Phase.HEAD:
            events.append(End())

    def _after_response_head(self, head: Head, events: list[Event]) -> None:
        events.append(head)
        if 100 <= head.status < 200:
            if head.status == 101:  # switched: the rest is another protocol's
                raise FramingError("the response switches protocols")
            return  # interim: the final response follows (no End)
        method = self._methods.popleft() if self._methods else b""
        length = _content_length(head)
        codings = [c.lower() for c in head.values(b"transfer-encoding")]
        if method == b"HEAD" or head.status in (204, 304):
            self._move(Phase.HEAD)
            events.append(End())
        elif codings and codings[-1] == b"chunked":
            self._move(Phase.CHUNK_SIZE)
        elif codings:
            self._move(Phase.UNTIL_CLOSE)
        elif length is not None:
            self._left = length
            self._move(Phase.LENGTH if length else Phase.HEAD)
            if not length:
                events.append(End())
        else:
            self._move(Phase.UNTIL_CLOSE)

    def _counted(self, events: list[Event]) -> bool:
        if not self._buf:
            return False
        n = min(len(self._buf), self._left)
        events.append(Body(bytes(self._buf[:n])))
        del self._buf[:n]
        self._left -= n
        if self._left:
            return False
        self._end_counted(events)
        return True

    def _end_counted(self, events: list[Event]) -> None:
        """A LENGTH body or a chunk's data is complete."""
        if self._phase is Phase.LENGTH:
            self._move(Phase.HEAD)
            events.append(End())
        else:
            self._move(Phase.CHUNK_END)

    def _chunk_size(self, events: list[Event]) -> bool:
        end = self._buf.find(_CRLF)
        if end < 0:
            if len(self._buf) > MAX_CHUNK_LINE:
                raise FramingError(f"a chunk-size line is over {MAX_CHUNK_LINE} bytes")
            return False
        line = bytes(self._buf[:end])
        if b"\r" in line or b"\n" in line or end + 2 > MAX_CHUNK_LINE:
            raise FramingError("a chunk-size line is malformed")
        size = line.split(b";", 1)[0]
        if not _HEX.match(size) or len(size.lstrip(b"0")) > _MAX_CHUNK_DIGITS:
            raise FramingError("a chunk size is not a hexadecimal number")
        self._left = int(size, 16)
        self._content += self._left
        if self.max_body is not None and self._content > self.max_body:
            raise BodyTooLarge(f"the chunked body is over {self.max_body} bytes")
        events.append(Body(bytes(self._buf[: end + 2])))
        del self._buf[: end + 2]
        self._move(Phase.CHUNK_DATA if self._left else Phase.TRAILER)
        return True

    def _chunk_end(self, events: list[Event]) -> bool:
        if len(self._buf) < 2:
            return False
        if self._buf[:2] != _CRLF:
            raise FramingError("chunk data is not followed by CRLF")
        events.append(Body(_CRLF))
        del self._buf[:2]
        self._move(Phase.CHUNK_SIZE)
        return True

    def _trailer(self, events: list[Event]) -> bool:
        if self._buf[:2] == _CRLF:  # no trailer fields
            n = 2
        else:
            end = self._buf.find(_HEAD_END)
            if end < 0:
                if len(self._buf) > self.max_head:
                    raise HeadTooLarge(f"the trailer section is over {self.max_head} bytes")
                return False
            n = end + 4
            _check_line_endings(bytes(self._buf[:n]))
        events.append(Body(bytes(self._buf[:n])))
        del self._buf[:n]
        self._move(Phase.HEAD)
        events.append(End())
        return True
