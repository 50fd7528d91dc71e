"""Bugs `make fuzz` found in the parsers, each with the input that showed it.

The same inputs are in the seed corpus (``fuzz/corpus/<target>/crash-*``), so the short
run replays them too (tests/unit/test_fuzz_short.py).
"""

from __future__ import annotations

import struct

import pytest

from sandport.bridge.targets import Target, parse_target, token_from
from sandport.errors import UsageError
from sandport.proto.rfbwatch import RfbWatch, Watch
from sandport.proto.wsframes import Event, FrameError, FrameReader, Opcode

pytestmark = pytest.mark.unit


def test_a_frame_error_carries_the_frames_parsed_before_it_in_the_same_read() -> None:
    """fuzz/corpus/wsframes/crash-events-before-an-error: a masked binary frame, then a
    byte with reserved bits set. Fed in two reads the data frame came out of the first;
    fed in one read it was lost with the error: the result depended on the split."""
    wire = b"\x82\x82\x82\x01\xa3\xa3\xa3\xa3\xa3\x00"
    data = (Event.DATA, Opcode.BINARY, bytes([0xA3 ^ 0x82, 0xA3 ^ 0x01]), True)
    with pytest.raises(FrameError) as info:
        FrameReader(125).receive_data(wire)
    assert info.value.code == 1002
    assert info.value.events == [data]
    split = FrameReader(125)
    assert split.receive_data(wire[:8]) == [data]
    with pytest.raises(FrameError) as info:
        split.receive_data(wire[8:])
    assert info.value.events == []


def _server_init_head(name_length: int) -> bytes:
    return struct.pack("!HH", 1280, 800) + bytes([32, 24, 0, 1]) + bytes(12) + \
        struct.pack("!I", name_length)


def test_the_rfb_watcher_lets_go_of_a_server_init_whose_name_is_over_the_cap() -> None:
    """fuzz/corpus/rfbwatch/crash-server-init-name-over-cap: a ServerInit announcing a
    4 GiB name kept the watcher waiting (and holding every byte the server sent)."""
    w = RfbWatch()
    w.from_server(b"RFB 003.008\n")
    w.from_client(b"RFB 003.008\n")
    w.from_server(b"\x01\x01")
    w.from_client(b"\x01")
    w.from_server(struct.pack("!I", 0))
    assert w.from_server(_server_init_head(0xFFFFFFFF) + b"x" * 64) is Watch.NOT_RFB


def test_the_rfb_watcher_holds_a_bounded_number_of_server_bytes() -> None:
    """A server that streams while the client has not sent its version: before, the
    watcher kept all of it (100 KiB here, without end in a session)."""
    w = RfbWatch()
    state = w.from_server(b"RFB 003.008\n")
    for _ in range(100):
        state = w.from_server(b"\0" * 1024)
    assert state is Watch.NOT_RFB
    assert len(w._srv) == 0


def test_a_name_at_the_cap_is_still_followed() -> None:
    w = RfbWatch()
    w.from_server(b"RFB 003.008\n")
    w.from_client(b"RFB 003.008\n\x01")
    w.from_server(b"\x01\x01" + struct.pack("!I", 0) + _server_init_head(4096))
    assert w.from_server(b"n" * 4095) is Watch.WATCHING
    assert w.from_server(b"n") is Watch.SERVER_INIT


def test_a_path_with_an_unclosed_ipv6_authority_carries_no_token() -> None:
    """fuzz/corpus/tokenfile/crash-unclosed-ipv6-authority: ``GET //[x/...`` made
    urlsplit raise ValueError out of the bridge's token lookup instead of a 401."""
    assert token_from("//[x/websockify?token=abc", None, host_token=False) is None
    assert token_from("/websockify?token=abc", None, host_token=False) == "abc"


@pytest.mark.parametrize("text", ["[[]]:9", "[a]b]:9", "a[b:9", "[x]]:5900"])
def test_a_target_whose_host_holds_a_bracket_is_refused(text: str) -> None:
    """fuzz/corpus/tokenfile/crash-bracket-in-host: the token-file line ``v: [[]]:9`` was
    kept with the host ``[]``, which prints as ``[]:9``: a target that does not parse back
    and can never connect. Now the line is skipped like any other bad target."""
    with pytest.raises(UsageError, match="is not HOST:PORT"):
        parse_target(text)
    assert parse_target("[fd00::1]:5900") == Target(host="fd00::1", port=5900)
