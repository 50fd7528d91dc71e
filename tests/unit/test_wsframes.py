"""The bridge's streaming frame reader against frames websockets' client writes."""

from __future__ import annotations

import os
import random
import struct

import pytest
from websockets.frames import Frame
from websockets.frames import Opcode as WsOpcode

from sandport.proto.wsframes import (
    Event,
    FrameError,
    FrameReader,
    Opcode,
    close_payload,
    frame_header,
    parse_close,
)

pytestmark = pytest.mark.unit


def client_frame(opcode: WsOpcode, data: bytes, fin: bool = True) -> bytes:
    """A masked client frame, as a browser sends it."""
    return Frame(opcode, data, fin).serialize(mask=True, extensions=[])


def feed(reader: FrameReader, wire: bytes, cuts: list[int]) -> list[tuple[Event, Opcode, bytes,
                                                                          bool]]:
    out = []
    prev = 0
    for cut in [*cuts, len(wire)]:
        out += reader.receive_data(wire[prev:cut])
        prev = cut
    return out


def joined(events: list[tuple[Event, Opcode, bytes, bool]]) -> bytes:
    return b"".join(e[2] for e in events if e[0] is Event.DATA)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 100_003])
def test_binary_frames_of_every_length_form(size: int) -> None:
    payload = os.urandom(size)
    wire = client_frame(WsOpcode.BINARY, payload)
    events = FrameReader(1 << 24).receive_data(wire)
    assert joined(events) == payload
    assert events[-1][3] is True and all(e[1] is Opcode.BINARY for e in events)


def test_every_split_of_a_fragmented_message_with_a_ping_inside() -> None:
    a, b, c = os.urandom(9), os.urandom(130), os.urandom(3)
    wire = (client_frame(WsOpcode.BINARY, a, fin=False) + client_frame(WsOpcode.PING, b"hi")
            + client_frame(WsOpcode.CONT, b, fin=False) + client_frame(WsOpcode.CONT, c))
    for cut in range(len(wire) + 1):
        for cut2 in range(cut, len(wire) + 1, 7):
            events = feed(FrameReader(1 << 20), wire, [cut, cut2])
            assert joined(events) == a + b + c
            assert [e for e in events if e[0] is Event.PING] == [
                (Event.PING, Opcode.PING, b"hi", True)]
            data = [e for e in events if e[0] is Event.DATA]
            assert [e[3] for e in data].count(True) == 1 and data[-1][3] is True


def test_random_splits_of_large_messages() -> None:
    rng = random.Random(7)
    payloads = [os.urandom(rng.randrange(0, 200_000)) for _ in range(5)]
    wire = b"".join(client_frame(WsOpcode.BINARY, p) for p in payloads)
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(wire)), 30))
        events = feed(FrameReader(1 << 20), wire, cuts)
        assert joined(events) == b"".join(payloads)
        assert sum(e[3] for e in events if e[0] is Event.DATA) == len(payloads)


def test_text_close_and_pong() -> None:
    wire = (client_frame(WsOpcode.TEXT, b"aGVsbG8=") + client_frame(WsOpcode.PONG, b"")
            + client_frame(WsOpcode.CLOSE, struct.pack("!H", 1000) + "bye ✓".encode()))
    events = FrameReader(100).receive_data(wire)
    assert events[0] == (Event.DATA, Opcode.TEXT, b"aGVsbG8=", True)
    assert events[1] == (Event.PONG, Opcode.PONG, b"", True)
    assert events[2][0] is Event.CLOSE
    assert parse_close(events[2][2]) == (1000, "bye ✓")
    assert parse_close(b"") == (None, "")


def unmasked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    return frame_header(opcode, len(payload), fin=fin) + payload


def raw_masked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A masked frame websockets would refuse to write (all-zero key: payload as is)."""
    head = bytearray(frame_header(opcode, len(payload), fin=fin))
    head[1] |= 0x80
    return bytes(head) + b"\0\0\0\0" + payload


@pytest.mark.parametrize(
    ("wire", "code", "why"),
    [
        (bytes([0xC2, 0x80]) + b"\0\0\0\0", 1002, "reserved bits"),
        (bytes([0x83, 0x80]) + b"\0\0\0\0", 1002, "unknown opcode 3"),
        (unmasked(0x2, b"x"), 1002, "must be masked"),
        (raw_masked(0x9, b"x" * 126), 1002, "over 125"),
        (raw_masked(0x9, b"x", fin=False), 1002, "fragmented control"),
        (client_frame(WsOpcode.CONT, b"x"), 1002, "outside a message"),
        (client_frame(WsOpcode.BINARY, b"x", fin=False) + client_frame(WsOpcode.BINARY, b"y"),
         1002, "inside a fragmented"),
        (client_frame(WsOpcode.BINARY, b"x" * 101), 1009, "message over 100 bytes"),
        (client_frame(WsOpcode.BINARY, b"x" * 60, fin=False)
         + client_frame(WsOpcode.CONT, b"x" * 60), 1009, "message over 100 bytes"),
        (bytes([0x82, 0xFF]) + struct.pack("!Q", 1 << 63) + b"\0\0\0\0", 1002, "2**63"),
    ],
    ids=["rsv", "opcode", "unmasked", "long-ping", "fragmented-ping", "stray-cont",
         "nested-message", "big-frame", "big-message", "huge-length"],  # masks are random
)
def test_violations_name_their_close_code(wire: bytes, code: int, why: str) -> None:
    with pytest.raises(FrameError) as info:
        FrameReader(100).receive_data(wire)
    assert info.value.code == code and why in info.value.reason


@pytest.mark.parametrize(
    ("payload", "code"),
    [(b"\x03", 1002), (struct.pack("!H", 1005), 1002), (struct.pack("!H", 999), 1002),
     (struct.pack("!H", 1000) + b"\xff", 1007)],
    ids=["one-byte", "1005", "999", "bad-utf8"],
)
def test_bad_close_payloads(payload: bytes, code: int) -> None:
    with pytest.raises(FrameError) as info:
        parse_close(payload)
    assert info.value.code == code


def test_server_frames_parse_back_with_websockets() -> None:
    from websockets.frames import Frame as WsFrame
    from websockets.streams import StreamReader

    for size in (0, 125, 126, 65535, 65536, 70000):
        payload = os.urandom(size)
        reader = StreamReader()
        reader.feed_data(frame_header(Opcode.BINARY, size) + payload)
        parser = WsFrame.parse(reader.read_exact, mask=False)
        with pytest.raises(StopIteration) as done:  # the frame is complete: no more to read
            next(parser)
        assert done.value.value.data == payload
    assert parse_close(close_payload(1000, "é" * 100)) == (1000, "é" * 61)
