"""Unit tests for HTTP/1.1 message framing (sandport.proto.http1) and the relay's head rewrite.

Every table case is fed whole, one byte at a time and split in two at every byte boundary;
all feeds must give the same messages (heads, the body bytes of each, ends), or the same
error. Smuggling forms two parsers could read differently are refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandport.bridge.passthrough import rewrite_head
from sandport.proto.errors import InvalidTransition, LocalProtocolError, RemoteProtocolError
from sandport.proto.http1 import (
    MAX_HEAD,
    TRANSITIONS,
    Body,
    End,
    FramingError,
    Head,
    HeadTooLarge,
    MessageFramer,
    Phase,
    Role,
    UnsupportedCoding,
    parse_head,
)

pytestmark = pytest.mark.unit


def splits(data: bytes) -> Iterator[tuple[str, list[bytes]]]:
    """Whole, one byte at a time, and in two pieces at every boundary."""
    yield "whole", [data]
    yield "bytewise", [data[i:i + 1] for i in range(len(data))]
    for i in range(1, len(data)):
        yield f"split@{i}", [data[:i], data[i:]]


@dataclass(frozen=True, slots=True)
class Message:
    """A framed message: its start line and its body bytes as they came."""

    start: bytes
    body: bytes


def frame(role: Role, pieces: list[bytes], methods: tuple[bytes, ...] = (),
          eof: bool = False) -> tuple[list[Message], bytes, Phase]:
    """Feed pieces; return complete messages, the bytes of an unfinished one, the phase."""
    f = MessageFramer(role)
    for m in methods:
        f.expect(m)
    events = []
    for piece in pieces:
        events += f.receive_data(piece)
    if eof:
        events += f.receive_eof()
    done: list[Message] = []
    start, body = b"", b""
    for e in events:
        if isinstance(e, Head):
            start, body = e.start, b""
        elif isinstance(e, Body):
            body += e.data
        else:
            assert isinstance(e, End)
            done.append(Message(start, body))
            start, body = b"", b""
    return done, body, f.phase


GET = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
CHUNKED_POST = (b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n")

REQUESTS = [
    ("one GET", GET, [Message(b"GET /a HTTP/1.1", b"")]),
    ("pipelined", GET + GET.replace(b"/a", b"/b"),
     [Message(b"GET /a HTTP/1.1", b""), Message(b"GET /b HTTP/1.1", b"")]),
    ("content-length body then GET",
     b"POST /p HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc" + GET,
     [Message(b"POST /p HTTP/1.1", b"abc"), Message(b"GET /a HTTP/1.1", b"")]),
    ("chunked body with extension and trailer, then GET", CHUNKED_POST + GET,
     [Message(b"POST /p HTTP/1.1", b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n"),
      Message(b"GET /a HTTP/1.1", b"")]),
    ("empty lines before a request", b"\r\n\r\n" + GET, [Message(b"GET /a HTTP/1.1", b"")]),
    ("a body that looks like a request is a body",
     b"POST /p HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(GET) + GET,
     [Message(b"POST /p HTTP/1.1", GET)]),
    ("identical Content-Length values",
     b"POST /p HTTP/1.1\r\nContent-Length: 2, 2\r\n\r\nok",
     [Message(b"POST /p HTTP/1.1", b"ok")]),
]


@pytest.mark.parametrize(("name", "data", "want"), REQUESTS, ids=[r[0] for r in REQUESTS])
def test_requests_frame_the_same_at_every_split(name: str, data: bytes,
                                                want: list[Message]) -> None:
    for how, pieces in splits(data):
        done, rest, phase = frame(Role.REQUEST, pieces)
        assert (done, rest, phase) == (want, b"", Phase.HEAD), how


BAD_REQUESTS: list[tuple[str, bytes, type[FramingError]]] = [
    ("CL and TE (smuggling)", b"POST / HTTP/1.1\r\nContent-Length: 4\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n", FramingError),
    ("conflicting CL", b"POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n",
     FramingError),
    ("CL not a number", b"POST / HTTP/1.1\r\nContent-Length: +4\r\n\r\n", FramingError),
    ("TE not ending in chunked", b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
     UnsupportedCoding),
    ("TE chunked twice", b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
     FramingError),
    ("space before colon", b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", FramingError),
    ("obs-fold", b"GET / HTTP/1.1\r\nX-A: 1\r\n 2\r\n\r\n", FramingError),
    ("bare LF", b"GET / HTTP/1.1\nHost: x\n\n", FramingError),
    ("bare LF inside", b"GET / HTTP/1.1\r\nHost: x\nX-A: 1\r\n\r\n", FramingError),
    ("two-part request line", b"GET /\r\n\r\n", FramingError),
    ("HTTP/2.0", b"GET / HTTP/2.0\r\n\r\n", FramingError),
    ("control character in a value", b"GET / HTTP/1.1\r\nX-A: a\x00b\r\n\r\n", FramingError),
    ("bad chunk size", b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
     FramingError),
    ("chunk without CRLF after data",
     b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\naXY", FramingError),
    ("huge chunk size", b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"1000000000000000\r\n", FramingError),
]


@pytest.mark.parametrize(("name", "data", "error"), BAD_REQUESTS,
                         ids=[r[0] for r in BAD_REQUESTS])
def test_ambiguous_requests_are_refused_at_every_split(name: str, data: bytes,
                                                       error: type[FramingError]) -> None:
    for how, pieces in splits(data):
        with pytest.raises(error) as info:
            frame(Role.REQUEST, pieces)
        assert isinstance(info.value, RemoteProtocolError), how
    assert error.status in (400, 501)


def test_an_oversized_head_is_431_before_its_end_arrives() -> None:
    f = MessageFramer(Role.REQUEST)
    f.receive_data(b"GET / HTTP/1.1\r\n")
    fields = b"X-A: 1234\r\n" * (MAX_HEAD // 11)
    assert f.receive_data(fields[:-20]) == []  # under the cap: waits for more
    with pytest.raises(HeadTooLarge) as info:
        f.receive_data(fields[-20:] + b"X-B: 1\r\n")  # over it, still no end: refused now
    assert info.value.status == 431
    assert f.phase is Phase.CLOSED
    with pytest.raises(LocalProtocolError):
        f.receive_data(b"more")


def test_an_upgrade_request_pauses_with_what_followed_untouched() -> None:
    upgrade = (b"GET /s/x/ports/vnc/ws HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\n"
               b"Connection: Upgrade\r\n\r\n")
    for how, pieces in splits(GET + upgrade + b"\x82\x85frame"):
        f = MessageFramer(Role.REQUEST)
        heads = [e for p in pieces for e in f.receive_data(p) if isinstance(e, Head)]
        assert [h.start for h in heads] == [b"GET /a HTTP/1.1",
                                            b"GET /s/x/ports/vnc/ws HTTP/1.1"], how
        assert heads[1].websocket_upgrade and not heads[0].websocket_upgrade
        assert heads[1].raw == upgrade
        assert f.phase is Phase.PAUSED
        assert f.trailing_data() == b"\x82\x85frame", how


def test_another_upgrade_resumes_into_its_body() -> None:
    f = MessageFramer(Role.REQUEST)
    events = f.receive_data(b"POST / HTTP/1.1\r\nUpgrade: h2c\r\nContent-Length: 2\r\n\r\nok"
                            + GET)
    assert [type(e) for e in events] == [Head]
    assert not events[0].websocket_upgrade  # type: ignore[union-attr]
    f.resume()
    rest = f.receive_data(b"")
    assert rest[0] == Body(b"ok")
    assert isinstance(rest[1], End)
    assert isinstance(rest[2], Head) and rest[2].start == b"GET /a HTTP/1.1"
    with pytest.raises(LocalProtocolError):
        f.resume()


RESPONSES = [
    ("content-length", (b"GET",), b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
     [Message(b"HTTP/1.1 200 OK", b"ok")]),
    ("HEAD has no body even with a length", (b"HEAD", b"GET"),
     b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
     b"HTTP/1.1 204 No Content\r\n\r\n",
     [Message(b"HTTP/1.1 200 OK", b""), Message(b"HTTP/1.1 204 No Content", b"")]),
    ("interim 100 then the final answer", (b"POST",),
     b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nx",
     [Message(b"HTTP/1.1 201 Created", b"x")]),
    ("chunked then 304", (b"GET", b"GET"),
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
     b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
     [Message(b"HTTP/1.1 200 OK", b"3\r\nabc\r\n0\r\n\r\n"),
      Message(b"HTTP/1.1 304 Not Modified", b"")]),
]


@pytest.mark.parametrize(("name", "methods", "data", "want"), RESPONSES,
                         ids=[r[0] for r in RESPONSES])
def test_responses_end_where_the_client_would_see_them_end(
        name: str, methods: tuple[bytes, ...], data: bytes, want: list[Message]) -> None:
    for how, pieces in splits(data):
        done, rest, phase = frame(Role.RESPONSE, pieces, methods)
        assert (done, rest, phase) == (want, b"", Phase.HEAD), how


def test_a_response_without_a_length_ends_at_eof() -> None:
    data = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it"
    for how, pieces in splits(data):
        done, _, phase = frame(Role.RESPONSE, pieces, (b"GET",), eof=True)
        assert done == [Message(b"HTTP/1.1 200 OK", b"all of it")], how
        assert phase is Phase.CLOSED
    f = MessageFramer(Role.RESPONSE)
    f.expect(b"GET")
    f.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort")
    with pytest.raises(FramingError):
        f.receive_eof()


def test_expect_is_for_responses_and_the_table_is_enforced() -> None:
    with pytest.raises(LocalProtocolError):
        MessageFramer(Role.REQUEST).expect(b"GET")
    f = MessageFramer(Role.REQUEST)
    with pytest.raises(InvalidTransition):
        f._move(Phase.TRAILER)  # HEAD -> TRAILER is not an edge
    assert all(Phase.CLOSED in TRANSITIONS[p] for p in Phase if p is not Phase.CLOSED)
    assert TRANSITIONS[Phase.CLOSED] == frozenset()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=1, max_value=50))
def test_any_bytes_give_events_or_a_framing_error(data: bytes, cut: int) -> None:
    """Fuzz: wire input only ever raises the protocol's own error, and buffers stay capped."""
    for role in Role:
        f = MessageFramer(role)
        try:
            for i in range(0, len(data), cut):
                f.receive_data(data[i:i + cut])
                if f.phase is Phase.PAUSED:
                    break
        except FramingError:
            continue
        assert len(f.trailing_data()) <= MAX_HEAD + 400


def test_head_fields_and_rewrite() -> None:
    head = parse_head(b"GET /x HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.2.3.4\r\n"
                      b"Forwarded: for=5.6.7.8\r\nUpgrade: h2c\r\nConnection: Upgrade, x\r\n"
                      b"\r\n", Role.REQUEST)
    assert head.values(b"connection") == [b"Upgrade", b"x"]
    assert head.upgrade == (b"h2c",)
    out = rewrite_head(head, "10.0.0.9", "https", trusted=False)
    assert out == (b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, x\r\n"
                   b"X-Forwarded-For: 10.0.0.9\r\nX-Forwarded-Proto: https\r\n\r\n")
    trusted = rewrite_head(head, "10.0.0.9", "http", trusted=True)
    assert b"X-Forwarded-For: 1.2.3.4, 10.0.0.9\r\n" in trusted
    names = [line.split(b":")[0] for line in trusted.split(b"\r\n")[1:] if line]
    assert names == [b"Host", b"Connection", b"X-Forwarded-For", b"X-Forwarded-Proto"]


def test_a_request_that_fails_is_never_emitted_but_those_before_it_are() -> None:
    f = MessageFramer(Role.REQUEST)
    with pytest.raises(UnsupportedCoding) as info:
        f.receive_data(GET + b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n")
    events = info.value.events
    assert [type(e) for e in events] == [Head, End]
    assert isinstance(events[0], Head) and events[0].start == b"GET /a HTTP/1.1"


def test_the_bridge_session_moves_only_along_its_table() -> None:
    """The bridge session's phases (sandport.bridge.session): one table, illegal edges raise."""
    from sandport.bridge.session import TRANSITIONS as SESSION_TRANSITIONS
    from sandport.bridge.session import Phase as SessionPhase

    reachable = {SessionPhase.HTTP}
    for _ in SessionPhase:
        reachable |= {n for p in reachable for n in SESSION_TRANSITIONS[p]}
    assert reachable == set(SessionPhase)  # every phase can be reached from HTTP
    assert SESSION_TRANSITIONS[SessionPhase.CLOSED] == frozenset()
    assert SessionPhase.HTTP not in {n for ns in SESSION_TRANSITIONS.values() for n in ns}
    assert all(SessionPhase.CLOSING in SESSION_TRANSITIONS[p]
               for p in (SessionPhase.HTTP, SessionPhase.HANDSHAKE, SessionPhase.OPEN))


def test_a_bridge_session_refuses_an_illegal_edge() -> None:
    from sandport.bridge.model import BridgeConfig
    from sandport.bridge.server import WsBridge
    from sandport.bridge.session import Phase as SessionPhase
    from sandport.bridge.session import WsSession
    from sandport.bridge.targets import Target

    bridge = WsBridge(BridgeConfig(target=Target(host="127.0.0.1", port=9)))
    session = WsSession(bridge, "t#1", ("127.0.0.1", 1), False)
    assert session.phase is SessionPhase.HANDSHAKE  # a bare bridge reads one upgrade
    with pytest.raises(InvalidTransition, match="HANDSHAKE -> HTTP"):
        session._move(SessionPhase.HTTP)
    session.close(1000, "done")  # no transport yet: nothing to send
    assert (session.phase, session.close_reason) == (SessionPhase.CLOSING, "done")
    session._finish()
    assert session.phase is SessionPhase.CLOSED
    with pytest.raises(InvalidTransition):
        session._move(SessionPhase.OPEN)
