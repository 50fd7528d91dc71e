"""Write the seed corpus, ``fuzz/corpus/<target>/``, from the unit tests' byte tables.

    .venv/bin/python fuzz/seeds.py

The known-good and known-bad wires of tests/unit (test_rfb's CASES, test_rfbwatch's
CASES, test_proxyproto's VALID and BAD, test_wsframes' frames, test_packets' VALID_WIRES
and BAD, test_http1's REQUESTS, BAD_REQUESTS and RESPONSES) become the inputs the fuzzer
starts from, each prefixed with the option byte its target reads first (see
``fuzz/targets.py``). Each file is named after its content (``seed-<sha1>``), so running
this again adds only what changed and never duplicates. Files named ``crash-*`` are
reproducers of bugs the fuzzer found: written by hand, never by this script, and replayed
by the short run in ``make test`` like every seed.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from collections.abc import Iterable
from ipaddress import IPv4Address
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "unit")]

import test_http1  # noqa: E402
import test_packets  # noqa: E402
import test_proxyproto  # noqa: E402
import test_rfb  # noqa: E402
import test_rfbwatch  # noqa: E402
import test_wsframes  # noqa: E402
from websockets.frames import Opcode as WsOpcode  # noqa: E402

from sandport.proto.packets.vnet import NEEDS_CSUM, VnetHeader  # noqa: E402


def rfb() -> Iterable[bytes]:
    for case in test_rfb.CASES:
        ctl = ((case.password is not None) | (case.shared << 1)
               | ((case.stop_at is test_rfb.Stage.SECURITY_TYPES) << 2))
        yield bytes([ctl]) + case.stream
        yield bytes([ctl | 8]) + case.stream


def rfbwatch() -> Iterable[bytes]:
    for _, steps, _ in test_rfbwatch.CASES:
        client = b"".join(d for side, d in steps if side == "c")[:255]
        server = b"".join(d for side, d in steps if side == "s")
        yield bytes([len(client)]) + client + server


def proxyproto() -> Iterable[bytes]:
    for case in test_proxyproto.VALID:
        yield b"\x03" + case.wire + b"after"
    for bad in test_proxyproto.BAD:
        yield b"\x03" + bad.wire


def wsframes() -> Iterable[bytes]:
    frame = test_wsframes.client_frame
    raw = test_wsframes.raw_masked
    wires = [
        frame(WsOpcode.BINARY, b"hello"),
        frame(WsOpcode.TEXT, "snow \u2603".encode()),
        frame(WsOpcode.BINARY, b"x" * 126) + frame(WsOpcode.PING, b"p"),
        frame(WsOpcode.BINARY, b"ab", fin=False) + frame(WsOpcode.PING, b"")
        + frame(WsOpcode.CONT, b"cd"),
        frame(WsOpcode.CLOSE, struct.pack("!H", 1000) + b"bye"),
        frame(WsOpcode.CLOSE, struct.pack("!H", 999)),
        frame(WsOpcode.PONG, b"q") + raw(0x9, b"x" * 126),
        bytes([0x82, 0xFF]) + struct.pack("!Q", 1 << 63) + b"\0\0\0\0",
    ]
    for wire in wires:
        yield b"\x03" + wire
        yield b"\x02" + wire


def packets() -> Iterable[bytes]:
    wires = list(test_packets.VALID_WIRES)
    wires += [case.wire for case in test_packets.BAD]
    wires += [test_packets.tcp_wire(b"\x02\x04\x05\xb4\x01\x03\x03\x07\x04\x02\x00\x00",
                                    flags=test_packets.SYN, payload=b"data"),
              test_packets.tcp_wire(b"\x08\x0a" + bytes(8) + b"\x01\x01")]
    a, b = IPv4Address("10.201.240.2"), IPv4Address("10.201.240.1")
    tcp = test_packets.tcp_wire(src=a, dst=b)
    ip = test_packets.IPv4Packet(src=a, dst=b, proto=6, payload=tcp).build()
    frame = test_packets.EthernetFrame(dst=test_packets.GW_MAC, src=test_packets.MAC,
                                       ethertype=0x0800, payload=ip).build()
    wires += [frame, VnetHeader(flags=NEEDS_CSUM, csum_start=34, csum_offset=16).build() + frame]
    for wire in wires:
        yield b"\x00" + wire
        yield b"\x03" + wire


def tokenfile() -> Iterable[bytes]:
    yield (b"# tokens\nvnc1: 10.0.0.2:5901\nv6: [fd00::2]:5900\nsock: unix_socket:/run/x.sock\n"
           b"bad line\nport: host:0\n\n  spaced : 127.0.0.1:1  \r\nt\xff: h:2\n")
    yield from (b"/websockify?token=abc", b"/websockify/abc", b"/abc/", b"/?token=a%20b",
                b"/websockify", b"[fd00::1]:443", b"desk.example:80")


def http1() -> Iterable[bytes]:
    for _, data, _ in test_http1.REQUESTS:
        yield b"\x00" + data
        yield b"\x04" + data
    for _, data, _ in test_http1.BAD_REQUESTS:
        yield b"\x00" + data
    for _, methods, data, _ in test_http1.RESPONSES:
        yield (b"\x03" if methods[:1] == (b"HEAD",) else b"\x01") + data
        yield b"\x05" + data


def rewrite() -> Iterable[bytes]:
    for _, data, _ in test_http1.REQUESTS:
        yield b"\x00" + data
        yield b"\x01" + data.replace(b"\r\n\r\n", b"\r\nX-Forwarded-For: 10.0.0.1\r\n"
                                                 b"Forwarded: for=x\r\n\r\n", 1)
    for _, data, _ in test_http1.BAD_REQUESTS:
        yield b"\x02" + data


SEEDS = {f.__name__: f for f in (rfb, rfbwatch, proxyproto, wsframes, packets, tokenfile,
                                 http1, rewrite)}


def main() -> None:
    for target, make in SEEDS.items():
        out = HERE / "corpus" / target
        out.mkdir(parents=True, exist_ok=True)
        n = 0
        for data in make():
            path = out / f"seed-{hashlib.sha1(data).hexdigest()[:16]}"  # noqa: S324 - a name
            if not path.exists():
                path.write_bytes(data)
                n += 1
        print(f"{target}: {n} new seed(s), {len(list(out.iterdir()))} file(s)")


if __name__ == "__main__":
    main()
