"""The passive RFB handshake watcher, fed at every split."""

from __future__ import annotations

import struct

import pytest

from sandport.proto.rfbwatch import RfbWatch, Watch

pytestmark = pytest.mark.unit

INIT = struct.pack("!HH", 1280, 800) + bytes(16) + struct.pack("!I", 7) + b"desktop"


def u32(n: int) -> bytes:
    return struct.pack("!I", n)


# (name, [(direction, bytes), ...], final state)
CASES = [
    ("3.8-vncauth", [("s", b"RFB 003.008\n"), ("c", b"RFB 003.008\n"), ("s", b"\x01\x02"),
                     ("c", b"\x02"), ("s", bytes(16)), ("c", bytes(16)), ("s", u32(0)),
                     ("c", b"\x01"), ("s", INIT)], Watch.SERVER_INIT),
    ("3.8-none", [("s", b"RFB 003.008\n"), ("c", b"RFB 003.008\n"), ("s", b"\x02\x01\x02"),
                  ("c", b"\x01"), ("s", u32(0)), ("c", b"\x01"), ("s", INIT)],
     Watch.SERVER_INIT),
    ("3.7-none", [("s", b"RFB 003.008\n"), ("c", b"RFB 003.007\n"), ("s", b"\x01\x01"),
                  ("c", b"\x01"), ("c", b"\x01"), ("s", INIT)], Watch.SERVER_INIT),
    ("3.3-vncauth", [("s", b"RFB 003.003\n"), ("c", b"RFB 003.003\n"), ("s", u32(2)),
                     ("s", bytes(16)), ("c", bytes(16)), ("s", u32(0)), ("c", b"\x01"),
                     ("s", INIT)], Watch.SERVER_INIT),
    ("wrong-password", [("s", b"RFB 003.008\n"), ("c", b"RFB 003.008\n"), ("s", b"\x01\x02"),
                        ("c", b"\x02"), ("s", bytes(16)), ("c", bytes(16)),
                        ("s", u32(1) + u32(22) + b"Authentication failure")], Watch.FAILED),
    ("no-types", [("s", b"RFB 003.008\n"), ("c", b"RFB 003.008\n"),
                  ("s", b"\x00" + u32(4) + b"busy")], Watch.FAILED),
    ("vencrypt", [("s", b"RFB 003.008\n"), ("c", b"RFB 003.008\n"), ("s", b"\x01\x13"),
                  ("c", b"\x13")], Watch.NOT_RFB),
    ("ssh", [("s", b"SSH-2.0-OpenSSH_9\r\n")], Watch.NOT_RFB),
]


@pytest.mark.parametrize(("steps", "final"), [(c[1], c[2]) for c in CASES],
                         ids=[c[0] for c in CASES])
def test_every_split(steps: list[tuple[str, bytes]], final: Watch) -> None:
    for cut in range(1, 13):  # each message fed in pieces of `cut` bytes
        w = RfbWatch()
        for direction, data in steps:
            for i in range(0, len(data), cut):
                piece = data[i : i + cut]
                (w.from_server if direction == "s" else w.from_client)(piece)
        assert w.state is final, cut


def test_server_init_is_not_reported_before_its_name_arrives() -> None:
    w = RfbWatch()
    w.from_server(b"RFB 003.008\n")
    w.from_client(b"RFB 003.008\n")
    w.from_server(b"\x01\x01")
    w.from_client(b"\x01")
    w.from_server(u32(0))
    assert w.from_server(INIT[:-1]) is Watch.WATCHING
    assert w.from_server(INIT[-1:]) is Watch.SERVER_INIT
