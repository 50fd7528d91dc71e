"""The fuzz targets: one function per parser, ``check(data)``, that raises on a bug.

Each target feeds ``data`` to one of sandport's parsers of untrusted bytes and lets only
that parser's documented rejection escape as "handled": a `RemoteProtocolError` subclass
(`sandport.proto.errors`), or for the token file a line that is skipped. Any other
exception is a crash. Each also checks invariants that are cheap to state:

* incremental parsers (``rfb``, ``rfbwatch``, ``proxyproto``, ``wsframes``, ``http1``) are
  fed the same bytes whole and in random splits (cut points drawn from a generator seeded
  with the input, so a run is repeatable) and must reach the same result: the same events,
  the same error class, the same bytes left over;
* what a parser accepted round-trips: ``parse(build(x)) == x`` (packets, PROXY headers,
  ServerInit), a rewritten HTTP head parses to the same request with the same framing;
* nothing is consumed beyond what was given, and buffers stay under their caps;
* a state machine never leaves a terminal state.

A violated invariant raises `FuzzFailure`. The first byte of an input often picks an option
(a password or none, a cap, a role); the rest is the wire.

The targets import nothing from tests/: the seed corpus (``fuzz/corpus/<target>/``,
written by ``fuzz/seeds.py`` from the unit tests' byte tables) carries the known-good wires.
"""

from __future__ import annotations

import io
import itertools
import random
import zlib
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Final

from sandport.bridge.passthrough import rewrite_head
from sandport.bridge.targets import _parse_line, parse_target, token_from
from sandport.proto.http1 import (
    MAX_HEAD,
    Body,
    FramingError,
    Head,
    MessageFramer,
    Phase,
    Role,
    parse_head,
)
from sandport.proto.packets import (
    ArpPacket,
    DhcpMessage,
    EthernetFrame,
    IcmpEcho,
    IPv4Packet,
    MalformedFrame,
    TcpSegment,
    UdpDatagram,
)
from sandport.proto.packets.ipv4 import checksum
from sandport.proto.packets.vnet import VNET_HEADER, VnetHeader
from sandport.proto.proxyproto import (
    PP2_TYPE_CRC32C,
    ParserState,
    ProxyHeader,
    ProxyHeaderParser,
    ProxyProtocolError,
)
from sandport.proto.rfb import (
    MAX_BUFFER,
    ClientState,
    RFBClient,
    RFBProtocolError,
    ServerInit,
    ServerInitReceived,
    Stage,
)
from sandport.proto.rfb.client import TRANSITIONS as RFB_TRANSITIONS
from sandport.proto.rfbwatch import MAX_SERVER_BYTES, RfbWatch, Watch
from sandport.proto.wsframes import (
    CLOSE_TOO_BIG,
    MAX_CONTROL_PAYLOAD,
    Event,
    FrameError,
    FrameReader,
    Opcode,
    parse_close,
)

__all__ = ["TARGETS", "FuzzFailure"]


class FuzzFailure(AssertionError):
    """An invariant of a parser does not hold for this input."""


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise FuzzFailure(what)


def _rng(data: bytes) -> random.Random:
    return random.Random(zlib.crc32(data))  # noqa: S311 - split points, not secrets


def _cut(rng: random.Random, data: bytes, most: int) -> list[bytes]:
    """``data`` cut at up to ``most`` random points (no empty pieces)."""
    if len(data) < 2:
        return [data] if data else []
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, most))))
    return [data[a:b] for a, b in itertools.pairwise([0, *cuts, len(data)])]


def _splits(data: bytes, n: int = 1) -> Iterator[list[bytes]]:
    """``n`` random splits of ``data`` (up to 8 cuts each), and byte by byte when short."""
    rng = _rng(data)
    for _ in range(n if len(data) > 1 else 0):
        yield _cut(rng, data, 8)
    if 1 < len(data) <= 16:
        yield [data[i : i + 1] for i in range(len(data))]


# -- RFB client (proto/rfb) -------------------------------------------------------------------

_PASSWORD: Final = "s3cret"  # noqa: S105 - a test password, chooses VNC Authentication
_RFB_TERMINAL: Final = frozenset({ClientState.DONE, ClientState.FAILED})


def _rfb_run(chunks: list[bytes], ctl: int) -> tuple[Any, ...]:
    client = RFBClient(password=_PASSWORD if ctl & 1 else None, shared=bool(ctl & 2),
                       stop_at=Stage.SECURITY_TYPES if ctl & 4 else Stage.SERVER_INIT)
    events: list[Any] = []
    error = ""
    state = client.state
    for chunk in chunks:
        try:
            events += client.receive_data(chunk)
        except RFBProtocolError as exc:
            events += exc.events
            error = type(exc).__name__
            _check(client.state is ClientState.FAILED, f"{error} left the client {client.state}")
            break
        finally:  # one call may pass several states, but never out of FAILED or back
            _check(client.state is state or state not in _RFB_TERMINAL
                   or client.state in RFB_TRANSITIONS[state],
                   f"RFB client moved {state} -> {client.state}")
            state = client.state
    sent = client.data_to_send()
    trailing = client.trailing_data() if client.done else b""
    stream = b"".join(chunks)
    _check(stream.endswith(trailing), "trailing data is not the end of the input")
    _check(len(trailing) <= MAX_BUFFER, "trailing data over MAX_BUFFER")
    eof = ""
    if ctl & 8 and not error:
        try:
            client.receive_eof()
        except RFBProtocolError as exc:
            eof = type(exc).__name__
    for event in events:
        # The name is decoded with bad UTF-8 replaced (documented): only a clean one can
        # round-trip (three bytes of U+FFFD for one bad byte may pass the name's cap).
        if isinstance(event, ServerInitReceived) and "\ufffd" not in event.init.name:
            init = event.init
            _check(ServerInit.from_bytes(bytes(init)) == init, "ServerInit does not round-trip")
    return tuple(events), error, client.state, sent, trailing, eof


def rfb(data: bytes) -> None:
    """`RFBClient` (server bytes in), whole and split; ServerInit round-trips."""
    if not data:
        return
    ctl, stream = data[0], data[1:]
    whole = _rfb_run([stream], ctl)
    for chunks in _splits(stream):
        _check(_rfb_run(chunks, ctl) == whole, "RFB client: a split changed the result")


# -- the RFB watcher (proto/rfbwatch.py) ------------------------------------------------------


def _watch_run(steps: list[tuple[bool, bytes]]) -> Watch:
    w = RfbWatch()
    for from_server, piece in steps:
        before = w.state
        after = w.from_server(piece) if from_server else w.from_client(piece)
        _check(after is w.state, "the returned state is not the watcher's state")
        _check(before is Watch.WATCHING or after is before,
               f"the watcher left its terminal state {before} for {after}")
        _check(len(w._srv) <= MAX_SERVER_BYTES and len(w._cli) < 128,
               f"the watcher holds {len(w._srv)} server / {len(w._cli)} client bytes")
    return w.state


def _interleave(rng: random.Random, server: bytes, client: bytes) -> list[tuple[bool, bytes]]:
    """Both streams cut at random points and interleaved at random, each kept in order."""
    s, c = _cut(rng, server, 6), _cut(rng, client, 6)
    out: list[tuple[bool, bytes]] = []
    while s or c:
        if s and (not c or rng.random() < 0.5):
            out.append((True, s.pop(0)))
        else:
            out.append((False, c.pop(0)))
    return out


def rfbwatch(data: bytes) -> None:
    """`RfbWatch`: ``data`` is u8 n, n client bytes, then the server's bytes. Any cut of
    either side, any interleaving that keeps each side's order: the same final state."""
    if not data:
        return
    n = data[0]
    client, server = data[1 : 1 + n], data[1 + n :]
    reference = _watch_run([(True, server), (False, client)])
    _check(_watch_run([(False, client), (True, server)]) is reference,
           "the watcher's result depends on which side came first")
    rng = _rng(data)
    for _ in range(2):
        got = _watch_run(_interleave(rng, server, client))
        _check(got is reference, f"a split changed the watcher's result: {got} != {reference}")


# -- PROXY protocol v1/v2 (proto/proxyproto.py) -----------------------------------------------


def _proxy_run(chunks: list[bytes], cap: int) -> tuple[Any, ...]:
    parser = ProxyHeaderParser(max_v2_payload=cap)
    for i, chunk in enumerate(chunks):
        try:
            header = parser.receive_data(chunk)
        except ProxyProtocolError as exc:
            _check(parser.state is ParserState.FAILED, "an error left the parser unfailed")
            return (type(exc).__name__,)
        if header is not None:
            rest = b"".join(chunks[i + 1 :])
            return header, parser.trailing_data() + rest
    _check(parser.state in (ParserState.DETECT, ParserState.V1, ParserState.V2),
           f"no header and no error, yet state {parser.state}")
    return (None,)


def _without_crc(header: ProxyHeader) -> tuple[tuple[int, bytes], ...]:
    return tuple((t, b"" if t == PP2_TYPE_CRC32C else v) for t, v in header.tlvs)


def proxyproto(data: bytes) -> None:
    """`ProxyHeaderParser` whole and split; an accepted header round-trips."""
    if not data:
        return
    cap = (0, 16, 216 + 64, 4096)[data[0] & 3]
    wire = data[1:]
    whole = _proxy_run([wire], cap)
    for chunks in _splits(wire):
        _check(_proxy_run(chunks, cap) == whole, "PROXY parser: a split changed the result")
    header = whole[0]
    if isinstance(header, ProxyHeader):
        trailing = whole[1]
        _check(wire.endswith(trailing) and len(trailing) < len(wire),
               "the header consumed nothing, or more than it was given")
        again = ProxyHeader.from_bytes(bytes(header), max_v2_payload=0xFFFF)
        _check(again.version == header.version and again.command == header.command
               and again.family == header.family and again.protocol == header.protocol
               and again.source == header.source and again.destination == header.destination
               and _without_crc(again) == _without_crc(header),
               "a parsed PROXY header does not round-trip")


# -- WebSocket frames (proto/wsframes.py) -----------------------------------------------------


def _ws_run(chunks: list[bytes], cap: int) -> tuple[Any, ...]:
    reader = FrameReader(cap)
    events: list[tuple[Event, Opcode, bytes, bool]] = []
    code = 0
    for chunk in chunks:
        try:
            got = reader.receive_data(chunk)
        except FrameError as exc:
            events += exc.events
            code = exc.code
            break
        events += got
    # Merge the pieces of each message: where a piece ends depends on the split.
    merged: list[tuple[Event, Opcode, bytes, bool]] = []
    size = 0
    for kind, op, payload, last in events:
        if kind is Event.DATA:
            size += len(payload)
            _check(size <= cap, f"a message of {size} bytes passed the cap of {cap}")
            if merged and merged[-1][0] is Event.DATA and not merged[-1][3]:
                merged[-1] = (kind, merged[-1][1], merged[-1][2] + payload, last)
            else:
                merged.append((kind, op, payload, last))
            if last:
                size = 0
        else:
            _check(last and len(payload) <= MAX_CONTROL_PAYLOAD, "a bad control frame passed")
            merged.append((kind, op, payload, last))
            if kind is Event.CLOSE:
                try:
                    parse_close(payload)
                except FrameError as exc:
                    _check(exc.code in (1002, 1007), f"close code {exc.code} for a bad close")
    total = sum(len(e[2]) for e in events)
    _check(total <= sum(map(len, chunks)), "more payload out than bytes in")
    _check(code in (0, 1002, 1007, CLOSE_TOO_BIG), f"unexpected close code {code}")
    return tuple(merged), code


def wsframes(data: bytes) -> None:
    """`FrameReader` whole and split: the same messages, control frames and close code."""
    if not data:
        return
    cap = (0, 1, 125, 1 << 20)[data[0] & 3]
    wire = data[1:]
    whole = _ws_run([wire], cap)
    for chunks in _splits(wire):
        _check(_ws_run(chunks, cap) == whole, "FrameReader: a split changed the result")


# -- the packet parsers (proto/packets) -------------------------------------------------------

_TOKEN_PATH: Final = Path("fuzz-tokens.txt")  # only named in the log line of a skipped line
_A: Final = IPv4Address("10.201.240.2")
_B: Final = IPv4Address("10.201.240.1")


def _parsed(parse: Callable[[], Any]) -> Any:
    try:
        return parse()
    except MalformedFrame:
        return None


def _with_ipv4_checksum(data: bytes) -> bytes:
    """``data`` with its IPv4 header checksum made right (so mutations reach the layers
    behind it), when the header length field fits the data."""
    ihl = (data[0] & 0x0F) * 4 if data else 0
    if ihl < 20 or ihl > len(data):
        return data
    header = data[:10] + b"\0\0" + data[12:ihl]
    return header[:10] + checksum(header).to_bytes(2, "big") + data[12:]


def _transport(ip: IPv4Packet, verify: bool) -> None:
    """The layers inside an IPv4 packet, and what they accept round-trips."""
    payload, src, dst = ip.payload, ip.src, ip.dst
    udp = _parsed(lambda: UdpDatagram.parse(payload, src, dst, verify_checksum=verify))
    if udp is not None:
        _check(UdpDatagram.parse(udp.build(src, dst), src, dst) == udp, "UDP round trip")
        dhcp = _parsed(lambda: DhcpMessage.parse(udp.payload))
        if dhcp is not None:
            _check(DhcpMessage.parse(dhcp.build()) == dhcp, "DHCP round trip")
    tcp = _parsed(lambda: TcpSegment.parse(payload, src, dst, verify_checksum=verify))
    if tcp is not None:
        _check(TcpSegment.parse(tcp.build(src, dst), src, dst) == tcp, "TCP round trip")
    icmp = _parsed(lambda: IcmpEcho.parse(payload))
    if icmp is not None:
        _check(IcmpEcho.parse(icmp.build()) == icmp, "ICMP round trip")


def packets(data: bytes) -> None:
    """Every packet parser on ``data``: as a virtio-net header + frame, as an Ethernet frame
    and down its layers, and each layer on its own; what parses round-trips."""
    if not data:
        return
    ctl, wire = data[0], data[1:]
    verify = not ctl & 1
    vnet = _parsed(lambda: VnetHeader.parse(wire))
    if vnet is not None:
        _check(VnetHeader.parse(vnet.build() + wire[VNET_HEADER.size :]) == vnet,
               "virtio-net header round trip")
    eth = _parsed(lambda: EthernetFrame.parse(wire))
    if eth is not None:
        _check(eth.build() == wire, "an Ethernet frame does not rebuild to its bytes")
    for layer in (wire, eth.payload if eth is not None else b""):
        arp = _parsed(lambda: ArpPacket.parse(layer))  # noqa: B023 - called at once
        if arp is not None:
            _check(ArpPacket.parse(arp.build()) == arp, "ARP round trip")
        for candidate in (layer, _with_ipv4_checksum(layer)) if ctl & 2 else (layer,):
            ip = _parsed(lambda: IPv4Packet.parse(candidate))  # noqa: B023 - called at once
            if ip is not None:
                _check(IPv4Packet.parse(ip.build()) == ip, "IPv4 round trip")
                _transport(ip, verify)
    # The layers on their own, with fixed addresses (TCP/UDP need them for the checksum).
    _transport(IPv4Packet(src=_A, dst=_B, proto=0, payload=wire), verify)
    _parsed(lambda: DhcpMessage.parse(wire))


# -- the token file and the token in a request (bridge/targets.py) ----------------------------


def tokenfile(data: bytes) -> None:
    """A token file's lines as the bridge reads them (text, undecodable bytes replaced),
    and the token in a request path or Host header: never more than a skipped line; every
    target kept parses again at lookup, and a target prints as text that parses back."""
    targets: dict[str, str] = {}
    text = io.TextIOWrapper(io.BytesIO(data), errors="replace")
    for number, raw in enumerate(text, 1):
        _parse_line(targets, raw, _TOKEN_PATH, number)
    for token, target_text in targets.items():
        _check(bool(token), "an empty token was kept")
        target = parse_target(target_text)  # what lookup() does: must not raise
        _check(parse_target(str(target)) == target, f"{target!r} does not print back")
    line = data.decode("latin-1")
    for host_token in (False, True):
        token = token_from(line, line, host_token=host_token)
        _check(token is None or isinstance(token, str), "token_from returned a non-string")


# -- HTTP/1.1 framing (proto/http1.py) and the head rewriter (bridge/passthrough.py) ----------


def _merge_bodies(events: list[Any]) -> list[Any]:
    out: list[Any] = []
    for event in events:
        if isinstance(event, Body) and out and isinstance(out[-1], Body):
            out[-1] = Body(out[-1].data + event.data)
        elif not (isinstance(event, Body) and not event.data):
            out.append(event)
    return out


def _http_run(chunks: list[bytes], role: Role, methods: tuple[bytes, ...],
              eof: bool) -> tuple[Any, ...]:
    framer = MessageFramer(role, max_body=None)
    for method in methods:
        framer.expect(method)
    events: list[Any] = []
    error = ""
    leftover = b""
    for i, chunk in enumerate(chunks):
        try:
            events += framer.receive_data(chunk)
        except FramingError as exc:
            events += exc.events
            error = "error"
            _check(framer.phase is Phase.CLOSED, "an error left the framer open")
            break
        if framer.phase is Phase.PAUSED:
            leftover = framer.trailing_data() + b"".join(chunks[i + 1 :])
            break
    else:
        if eof:
            try:
                events += framer.receive_eof()
            except FramingError:
                error = "error"
    _check(len(framer.trailing_data()) <= MAX_HEAD + max(map(len, chunks), default=0),
           "the framer holds more than a head and one read")
    return tuple(_merge_bodies(events)), error, leftover


def http1(data: bytes) -> None:
    """`MessageFramer` (requests or responses) whole and split: the same heads, bodies and
    ends, the same refusal, the same bytes after an upgrade request."""
    if not data:
        return
    ctl, wire = data[0], data[1:]
    role = Role.RESPONSE if ctl & 1 else Role.REQUEST
    methods = (b"GET", b"HEAD", b"GET") if role is Role.RESPONSE and ctl & 2 else ()
    if role is Role.RESPONSE and not ctl & 2:
        methods = (b"GET",) * 3
    eof = bool(ctl & 4)
    whole = _http_run([wire], role, methods, eof)
    _check(wire.endswith(whole[2]), "bytes after an upgrade are not the end of the input")
    for chunks in _splits(wire):
        _check(_http_run(chunks, role, methods, eof) == whole,
               "MessageFramer: a split changed the result")


def _framing_fields(head: Head) -> tuple[list[bytes], list[bytes]]:
    return head.values(b"content-length"), head.values(b"transfer-encoding")


def rewrite(data: bytes) -> None:
    """`parse_head` then `rewrite_head`: what the app gets is a head that parses, names the
    same method and target, keeps the framing fields, has no Upgrade, one X-Forwarded-For
    and one X-Forwarded-Proto, and frames the same way."""
    if not data:
        return
    trusted = bool(data[0] & 1)
    raw = data[1:]
    end = raw.find(b"\r\n\r\n")
    raw = raw[: end + 4] if end >= 0 else raw + b"\r\n\r\n"
    try:
        head = parse_head(raw, Role.REQUEST)
    except FramingError:
        return
    out = rewrite_head(head, "192.0.2.7", "https" if data[0] & 2 else "http", trusted=trusted)
    again = parse_head(out, Role.REQUEST)  # a FramingError here is a crash: we wrote it
    _check((again.method, again.target, again.start) == (head.method, head.target, head.start),
           "the rewritten head names another request")
    _check(_framing_fields(again) == _framing_fields(head), "the rewrite changed the framing")
    _check(not again.upgrade, "the rewritten head still asks to upgrade")
    names = [n.lower() for n, _ in again.fields]
    _check(names.count(b"x-forwarded-for") == 1 and names.count(b"x-forwarded-proto") == 1
           and b"forwarded" not in names, "X-Forwarded-* not exactly once each")
    _check(again.values(b"x-forwarded-for")[-1] == b"192.0.2.7",
           "the real client is not the last X-Forwarded-For")
    # Framed as the relay frames it, the app sees the same request boundaries.
    theirs, ours = MessageFramer(Role.REQUEST), MessageFramer(Role.REQUEST)
    try:
        got = ours.receive_data(out)
    except FramingError:
        got = None
    try:
        want = theirs.receive_data(raw)
    except FramingError:
        want = None
    _check((got is None) == (want is None), "the rewrite changed whether the head frames")
    if got is not None and want is not None:
        _check([type(e) for e in got if not isinstance(e, Head)]
               == [type(e) for e in want if not isinstance(e, Head)] or theirs.phase
               is Phase.PAUSED, "the rewrite changed where the request ends")


TARGETS: Final[dict[str, Callable[[bytes], None]]] = {
    "rfb": rfb,
    "rfbwatch": rfbwatch,
    "proxyproto": proxyproto,
    "wsframes": wsframes,
    "packets": packets,
    "tokenfile": tokenfile,
    "http1": http1,
    "rewrite": rewrite,
}
