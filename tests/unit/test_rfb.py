"""Unit tests for the sans-I/O RFB client handshake (sandport.proto.rfb), RFC 6143.

Every table case is fed whole, one byte at a time and split in two at every byte boundary;
all feeds must give the same events, the same client output and the same error.
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vncdotool.rfb import _vnc_des, des_encrypt

from conftest import require
from sandport.proto import rfb
from sandport.proto.errors import RemoteProtocolError
from sandport.proto.rfb import (
    MAX_BUFFER,
    MAX_DIMENSION,
    MAX_NAME_LENGTH,
    MAX_REASON_LENGTH,
    SERVER_INIT_HEADER,
    TRANSITIONS,
    AuthFailed,
    AuthOK,
    BadDimensions,
    BadPixelFormat,
    BadProtocolVersion,
    BadSecurityResult,
    BufferOverflow,
    ClientState,
    ConnectionClosedDuringHandshake,
    ConnectionFailed,
    DataAfterFailure,
    Event,
    FieldTooLong,
    InvalidTransition,
    LocalProtocolError,
    MalformedMessage,
    NoSupportedSecurityType,
    PasswordRequired,
    PixelFormat,
    RFBClient,
    RFBProtocolError,
    SecurityTypes,
    ServerInit,
    ServerInitReceived,
    ServerVersion,
    Stage,
    UnsupportedVersion,
    deobfuscate_password,
    negotiate_version,
    obfuscate_password,
    vnc_auth_response,
)

pytestmark = pytest.mark.unit

# --------------------------------------------------------------------------------------------
# Server-side byte builders.
# --------------------------------------------------------------------------------------------


def banner(major: int, minor: int) -> bytes:
    return b"RFB %03d.%03d\n" % (major, minor)


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def string(text: bytes) -> bytes:
    return u32(len(text)) + text


def sec_types(*types: int) -> bytes:
    return bytes([len(types), *types])


V33, V37, V38 = banner(3, 3), banner(3, 7), banner(3, 8)
R33, R37, R38 = b"RFB 003.003\n", b"RFB 003.007\n", b"RFB 003.008\n"
SV33 = ServerVersion(version=(3, 3), negotiated=(3, 3))
SV37 = ServerVersion(version=(3, 7), negotiated=(3, 7))
SV38 = ServerVersion(version=(3, 8), negotiated=(3, 8))

PASSWORD = "s3cret"
CHALLENGE = bytes(range(16))
# Computed independently with OpenSSL: the key is b"s3cret\0\0" with each byte bit-reversed.
#   printf '\x00\x01...\x0f' | openssl enc -des-ecb -nopad -K ceccc64ea62e0000 \
#       -provider legacy -provider default
RESPONSE = bytes.fromhex("fc9a2bb8546a63388eb45b530d3a6337")

PF = PixelFormat(
    bits_per_pixel=32,
    depth=24,
    big_endian=False,
    true_colour=True,
    red_max=255,
    green_max=255,
    blue_max=255,
    red_shift=16,
    green_shift=8,
    blue_shift=0,
)
INIT = ServerInit(width=1024, height=768, pixel_format=PF, name="desk ☃")
INIT_BYTES = bytes(INIT)
SIR = ServerInitReceived(init=INIT)
BIG_INIT = ServerInit(width=MAX_DIMENSION, height=1, pixel_format=PF, name="n" * MAX_NAME_LENGTH)
OK = u32(0)
SHARED, EXCLUSIVE = b"\x01", b"\x00"


def init_header(width: int, height: int, pf: bytes, name_length: int) -> bytes:
    return SERVER_INIT_HEADER.pack(width, height, pf, name_length)


def with_pf(**changes: Any) -> bytes:
    return bytes(dataclasses.replace(PF, **changes))


# --------------------------------------------------------------------------------------------
# The table.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A scripted handshake.

    ``steps`` pairs each server message with the exact bytes the client must answer with
    right after it. If ``error`` is set, the last step raises it.
    """

    id: str
    steps: tuple[tuple[bytes, bytes], ...]
    events: tuple[Event, ...]
    password: str | None = None
    stop_at: Stage = Stage.SERVER_INIT
    shared: bool = True
    error: type[RFBProtocolError] | None = None
    state: ClientState = ClientState.DONE
    trailing: bytes = b""

    @property
    def stream(self) -> bytes:
        return b"".join(server for server, _ in self.steps) + self.trailing

    @property
    def output(self) -> bytes:
        return b"".join(reply for _, reply in self.steps)

    def client(self) -> RFBClient:
        return RFBClient(password=self.password, shared=self.shared, stop_at=self.stop_at)


def fails(
    case_id: str,
    error: type[RFBProtocolError],
    *steps: tuple[bytes, bytes],
    events: tuple[Event, ...] = (),
    password: str | None = None,
    stop_at: Stage = Stage.SERVER_INIT,
) -> Case:
    """A Case whose last step raises ``error``."""
    return Case(
        case_id,
        steps,
        events,
        password=password,
        stop_at=stop_at,
        error=error,
        state=ClientState.FAILED,
    )


CASES: list[Case] = [
    # --- 3.8 ----------------------------------------------------------------------------------
    Case(
        "3.8-none",
        ((V38, R38), (sec_types(1), b"\x01"), (OK, SHARED), (INIT_BYTES, b"")),
        (SV38, SecurityTypes(types=(1,), chosen=1), AuthOK(), SIR),
    ),
    Case(
        "3.8-vncauth-ok",
        (
            (V38, R38),
            (sec_types(2), b"\x02"),
            (CHALLENGE, RESPONSE),
            (OK, SHARED),
            (INIT_BYTES, b""),
        ),
        (SV38, SecurityTypes(types=(2,), chosen=2), AuthOK(), SIR),
        password=PASSWORD,
    ),
    Case(
        "3.8-vncauth-ok-exclusive",
        (
            (V38, R38),
            (sec_types(2), b"\x02"),
            (CHALLENGE, RESPONSE),
            (OK, EXCLUSIVE),
            (INIT_BYTES, b""),
        ),
        (SV38, SecurityTypes(types=(2,), chosen=2), AuthOK(), SIR),
        password=PASSWORD,
        shared=False,
    ),
    Case(
        "3.8-prefers-vncauth-with-password",
        (
            (V38, R38),
            (sec_types(1, 2), b"\x02"),
            (CHALLENGE, RESPONSE),
            (OK, SHARED),
            (INIT_BYTES, b""),
        ),
        (SV38, SecurityTypes(types=(1, 2), chosen=2), AuthOK(), SIR),
        password=PASSWORD,
    ),
    Case(
        "3.8-falls-back-to-none-without-password",
        ((V38, R38), (sec_types(16, 2, 1), b"\x01"), (OK, SHARED), (INIT_BYTES, b"")),
        (SV38, SecurityTypes(types=(16, 2, 1), chosen=1), AuthOK(), SIR),
    ),
    Case(
        "3.8-none-with-password-offered-only-none",
        ((V38, R38), (sec_types(1), b"\x01"), (OK, SHARED), (INIT_BYTES, b"")),
        (SV38, SecurityTypes(types=(1,), chosen=1), AuthOK(), SIR),
        password=PASSWORD,
    ),
    Case(
        "3.8-vncauth-fail-with-reason",
        (
            (V38, R38),
            (sec_types(2), b"\x02"),
            (CHALLENGE, RESPONSE),
            (u32(1) + string(b"Authentication failure"), b""),
        ),
        (SV38, SecurityTypes(types=(2,), chosen=2), AuthFailed(reason="Authentication failure")),
        password=PASSWORD,
        state=ClientState.FAILED,
    ),
    Case(
        "3.8-vncauth-fail-empty-reason",
        ((V38, R38), (sec_types(2), b"\x02"), (CHALLENGE, RESPONSE), (u32(1) + string(b""), b"")),
        (SV38, SecurityTypes(types=(2,), chosen=2), AuthFailed(reason="")),
        password=PASSWORD,
        state=ClientState.FAILED,
    ),
    Case(
        "3.8-vncauth-too-many-attempts",
        (
            (V38, R38),
            (sec_types(2), b"\x02"),
            (CHALLENGE, RESPONSE),
            (u32(2) + string(b"slow down"), b""),
        ),
        (SV38, SecurityTypes(types=(2,), chosen=2), AuthFailed(reason="slow down")),
        password=PASSWORD,
        state=ClientState.FAILED,
    ),
    Case(
        "3.8-none-result-failed",
        ((V38, R38), (sec_types(1), b"\x01"), (u32(1) + string(b"go away"), b"")),
        (SV38, SecurityTypes(types=(1,), chosen=1), AuthFailed(reason="go away")),
        state=ClientState.FAILED,
    ),
    fails(
        "3.8-reason-at-cap",
        ConnectionFailed,
        (V38, R38),
        (b"\x00" + string(b"x" * MAX_REASON_LENGTH), b""),
        events=(SV38,),
    ),
    fails(
        "3.8-connection-failed",
        ConnectionFailed,
        (V38, R38),
        (b"\x00" + string(b"Too many security failures"), b""),
        events=(SV38,),
    ),
    fails(
        "3.8-connection-failed-reason-too-long",
        FieldTooLong,
        (V38, R38),
        (b"\x00" + u32(MAX_REASON_LENGTH + 1), b""),
        events=(SV38,),
    ),
    fails(
        "3.8-connection-failed-reason-huge",
        FieldTooLong,
        (V38, R38),
        (b"\x00" + u32(0xFFFFFFFF), b""),
        events=(SV38,),
    ),
    fails(
        "3.8-result-reason-too-long",
        FieldTooLong,
        (V38, R38),
        (sec_types(2), b"\x02"),
        (CHALLENGE, RESPONSE),
        (u32(1) + u32(MAX_REASON_LENGTH + 1), b""),
        events=(SV38, SecurityTypes(types=(2,), chosen=2)),
        password=PASSWORD,
    ),
    fails(
        "3.8-bad-security-result",
        BadSecurityResult,
        (V38, R38),
        (sec_types(1), b"\x01"),
        (u32(3), b""),
        events=(SV38, SecurityTypes(types=(1,), chosen=1)),
    ),
    fails(
        "3.8-vncauth-only-no-password",
        PasswordRequired,
        (V38, R38),
        (sec_types(2), b""),
        events=(SV38, SecurityTypes(types=(2,), chosen=None)),
    ),
    fails(
        "3.8-only-unknown-types",
        NoSupportedSecurityType,
        (V38, R38),
        (sec_types(16, 19), b""),
        events=(SV38, SecurityTypes(types=(16, 19), chosen=None)),
        password=PASSWORD,
    ),
    fails(
        "3.8-data-after-auth-failure",
        DataAfterFailure,
        (V38, R38),
        (sec_types(1), b"\x01"),
        (u32(1) + string(b"no") + b"junk", b""),
        events=(SV38, SecurityTypes(types=(1,), chosen=1), AuthFailed(reason="no")),
    ),
    Case(
        "3.8-trailing-data-kept",
        ((V38, R38), (sec_types(1), b"\x01"), (OK, SHARED), (INIT_BYTES, b"")),
        (SV38, SecurityTypes(types=(1,), chosen=1), AuthOK(), SIR),
        trailing=b"\x00\x00\x00\x01 start of a FramebufferUpdate",
    ),
    # --- 3.8 probes (stop_at=SECURITY_TYPES): never answer the security types -----------------
    Case(
        "probe-3.8-vncauth-no-password",
        ((V38, R38), (sec_types(2), b"")),
        (SV38, SecurityTypes(types=(2,), chosen=None)),
        stop_at=Stage.SECURITY_TYPES,
    ),
    Case(
        "probe-3.8-vncauth-with-password",
        ((V38, R38), (sec_types(1, 2), b"")),
        (SV38, SecurityTypes(types=(1, 2), chosen=2)),
        password=PASSWORD,
        stop_at=Stage.SECURITY_TYPES,
    ),
    Case(
        "probe-3.8-unknown-types",
        ((V38, R38), (sec_types(19), b"")),
        (SV38, SecurityTypes(types=(19,), chosen=None)),
        stop_at=Stage.SECURITY_TYPES,
    ),
    fails(
        "probe-3.8-connection-failed",
        ConnectionFailed,
        (V38, R38),
        (b"\x00" + string(b"busy"), b""),
        events=(SV38,),
        stop_at=Stage.SECURITY_TYPES,
    ),
    # --- 3.7 ----------------------------------------------------------------------------------
    Case(
        "3.7-none",  # no SecurityResult for None before 3.8: ClientInit goes with the choice
        ((V37, R37), (sec_types(1), b"\x01" + SHARED), (INIT_BYTES, b"")),
        (SV37, SecurityTypes(types=(1,), chosen=1), SIR),
    ),
    Case(
        "3.7-vncauth-ok",
        (
            (V37, R37),
            (sec_types(2), b"\x02"),
            (CHALLENGE, RESPONSE),
            (OK, SHARED),
            (INIT_BYTES, b""),
        ),
        (SV37, SecurityTypes(types=(2,), chosen=2), AuthOK(), SIR),
        password=PASSWORD,
    ),
    Case(
        "3.7-vncauth-fail-no-reason",
        ((V37, R37), (sec_types(2), b"\x02"), (CHALLENGE, RESPONSE), (u32(1), b"")),
        (SV37, SecurityTypes(types=(2,), chosen=2), AuthFailed(reason="authentication failed")),
        password=PASSWORD,
        state=ClientState.FAILED,
    ),
    fails(
        "3.7-connection-failed",
        ConnectionFailed,
        (V37, R37),
        (b"\x00" + string(b"nope"), b""),
        events=(SV37,),
    ),
    Case(
        "probe-3.7",
        ((V37, R37), (sec_types(2, 1), b"")),
        (SV37, SecurityTypes(types=(2, 1), chosen=1)),
        stop_at=Stage.SECURITY_TYPES,
    ),
    # --- 3.3: the server picks a U32 type; the client never sends a type -----------------------
    Case(
        "3.3-none",
        ((V33, R33), (u32(1), SHARED), (INIT_BYTES, b"")),
        (SV33, SecurityTypes(types=(1,), chosen=1), SIR),
    ),
    Case(
        "3.3-vncauth-ok",
        ((V33, R33), (u32(2), b""), (CHALLENGE, RESPONSE), (OK, SHARED), (INIT_BYTES, b"")),
        (SV33, SecurityTypes(types=(2,), chosen=2), AuthOK(), SIR),
        password=PASSWORD,
    ),
    Case(
        "3.3-vncauth-fail-no-reason",
        ((V33, R33), (u32(2), b""), (CHALLENGE, RESPONSE), (u32(1), b"")),
        (SV33, SecurityTypes(types=(2,), chosen=2), AuthFailed(reason="authentication failed")),
        password=PASSWORD,
        state=ClientState.FAILED,
    ),
    fails(
        "3.3-connection-failed",
        ConnectionFailed,
        (V33, R33),
        (u32(0) + string(b"max connections"), b""),
        events=(SV33,),
    ),
    fails(
        "3.3-connection-failed-reason-too-long",
        FieldTooLong,
        (V33, R33),
        (u32(0) + u32(MAX_REASON_LENGTH + 1), b""),
        events=(SV33,),
    ),
    fails(
        "3.3-vncauth-no-password",
        PasswordRequired,
        (V33, R33),
        (u32(2), b""),
        events=(SV33, SecurityTypes(types=(2,), chosen=None)),
    ),
    fails(
        "3.3-unknown-type",
        NoSupportedSecurityType,
        (V33, R33),
        (u32(5), b""),
        events=(SV33, SecurityTypes(types=(5,), chosen=None)),
    ),
    Case(
        "probe-3.3-vncauth",
        ((V33, R33), (u32(2), b"")),
        (SV33, SecurityTypes(types=(2,), chosen=None)),
        stop_at=Stage.SECURITY_TYPES,
    ),
    # --- version quirks -----------------------------------------------------------------------
    *(
        Case(
            f"quirk-{major}.{minor}",  # the negotiated version drives the rest of the parse
            (
                ((banner(major, minor), R33), (u32(1), SHARED), (INIT_BYTES, b""))
                if negotiated == (3, 3)
                else (
                    (banner(major, minor), R38),
                    (sec_types(1), b"\x01"),
                    (OK, SHARED),
                    (INIT_BYTES, b""),
                )
            ),
            (
                ServerVersion(version=(major, minor), negotiated=negotiated),
                SecurityTypes(types=(1,), chosen=1),
                *(() if negotiated == (3, 3) else (AuthOK(),)),
                SIR,
            ),
        )
        for major, minor, negotiated in [
            (3, 889, (3, 8)),  # Apple Remote Desktop
            (3, 4, (3, 3)),
            (3, 5, (3, 3)),
            (3, 6, (3, 3)),  # UltraVNC
            (3, 9, (3, 8)),
            (3, 999, (3, 8)),
            (4, 1, (3, 8)),  # RealVNC 4.6
        ]
    ),
    # --- bad banners --------------------------------------------------------------------------
    *(
        fails(f"bad-banner-{i}", BadProtocolVersion, (bad, b""))
        for i, bad in enumerate(
            [
                b"SSH-2.0-OpenSSH_9.2p1\r\n",
                b"HTTP/1.1 400 Bad Request\r\n",
                b"RFB 003.008\r\n",
                b"RFB 3.8\n....",
                b"rfb 003.008\n",
                b"RFB 003,008\n",
                b"RFB 00a.008\n",
                b"RFB 003.00 \n",
                b"RFB  03.008\n",
                b"\x00" * 12,
            ]
        )
    ),
    # --- unsupported versions -----------------------------------------------------------------
    *(
        fails(f"unsupported-{major}.{minor}", UnsupportedVersion, (banner(major, minor), b""))
        for major, minor in [(3, 2), (3, 0), (2, 8), (0, 0), (4, 2), (6, 0), (999, 999)]
    ),
    # --- ServerInit sanity --------------------------------------------------------------------
    *(
        fails(
            f"server-init-{label}",
            error,
            (V33, R33),
            (u32(1), SHARED),
            (raw, b""),
            events=(SV33, SecurityTypes(types=(1,), chosen=1)),
        )
        for label, error, raw in [
            ("zero-width", BadDimensions, init_header(0, 768, bytes(PF), 0)),
            ("zero-height", BadDimensions, init_header(1024, 0, bytes(PF), 0)),
            ("width-over-cap", BadDimensions, init_header(MAX_DIMENSION + 1, 768, bytes(PF), 0)),
            ("height-huge", BadDimensions, init_header(1024, 0xFFFF, bytes(PF), 0)),
            ("name-over-cap", FieldTooLong, init_header(1024, 768, bytes(PF), MAX_NAME_LENGTH + 1)),
            ("name-huge", FieldTooLong, init_header(1024, 768, bytes(PF), 0xFFFFFFFF)),
            ("bpp-24", BadPixelFormat, init_header(1024, 768, with_pf(bits_per_pixel=24), 0)),
            ("depth-0", BadPixelFormat, init_header(1024, 768, with_pf(depth=0), 0)),
            (
                "depth-over-bpp",
                BadPixelFormat,
                init_header(1024, 768, with_pf(bits_per_pixel=16, depth=24), 0),
            ),
        ]
    ),
    Case(
        "server-init-limits",
        ((V33, R33), (u32(1), SHARED), (bytes(BIG_INIT), b"")),
        (SV33, SecurityTypes(types=(1,), chosen=1), ServerInitReceived(init=BIG_INIT)),
    ),
    Case(
        "server-init-bad-utf8-name",
        ((V33, R33), (u32(1), SHARED), (init_header(8, 8, bytes(PF), 3) + b"a\xffb", b"")),
        (
            SV33,
            SecurityTypes(types=(1,), chosen=1),
            ServerInitReceived(
                init=ServerInit(width=8, height=8, pixel_format=PF, name="a\ufffdb")
            ),
        ),
    ),
]


@dataclass
class Outcome:
    events: list[Event] = field(default_factory=list)
    output: bytes = b""
    error: type[Exception] | None = None
    state: ClientState | None = None
    trailing: bytes = b""


def run(case: Case, chunks: list[bytes]) -> Outcome:
    client = case.client()
    outcome = Outcome()
    out = bytearray()
    for chunk in chunks:
        try:
            outcome.events += client.receive_data(chunk)
        except RFBProtocolError as exc:
            outcome.events += exc.events
            outcome.error = type(exc)
            out += client.data_to_send()
            break
        out += client.data_to_send()
    outcome.output = bytes(out)
    outcome.state = client.state
    if client.done:
        outcome.trailing = client.trailing_data()
    return outcome


def expected(case: Case) -> Outcome:
    return Outcome(
        events=list(case.events),
        output=case.output,
        error=case.error,
        state=case.state,
        trailing=case.trailing,
    )


ids = [case.id for case in CASES]
assert len(set(ids)) == len(ids), "duplicate case ids"


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_whole_stream(case: Case) -> None:
    assert run(case, [case.stream]) == expected(case)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_one_byte_at_a_time(case: Case) -> None:
    stream = case.stream
    assert run(case, [stream[i : i + 1] for i in range(len(stream))]) == expected(case)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_split_at_every_boundary(case: Case) -> None:
    stream = case.stream
    want = expected(case)
    for cut in range(len(stream) + 1):
        assert run(case, [stream[:cut], stream[cut:]]) == want, f"split at {cut}"


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_reply_after_each_step(case: Case) -> None:
    """The client answers each server message with exactly the expected bytes, at once."""
    client = case.client()
    events: list[Event] = []
    for i, (server, reply) in enumerate(case.steps):
        last = i == len(case.steps) - 1
        if last and case.error is not None:
            with pytest.raises(case.error) as info:
                client.receive_data(server + case.trailing)
            events += info.value.events
        else:
            events += client.receive_data(server + (case.trailing if last else b""))
        assert client.data_to_send() == reply, f"reply to step {i}"
        assert client.data_to_send() == b"", "data_to_send() drains"
    assert events == list(case.events)
    assert client.state is case.state
    assert client.done is (case.state is ClientState.DONE)
    client.receive_eof()  # the server closing after done or failure is not an error


# --------------------------------------------------------------------------------------------
# Lifecycle and state machine.
# --------------------------------------------------------------------------------------------


def test_transition_table_covers_every_state() -> None:
    assert set(TRANSITIONS) == set(ClientState)
    assert TRANSITIONS[ClientState.FAILED] == frozenset()
    for targets in TRANSITIONS.values():
        assert ClientState.AWAIT_PROTOCOL_VERSION not in targets


def test_illegal_transition_raises_internal_error() -> None:
    client = RFBClient()
    with pytest.raises(InvalidTransition):
        client._transition(ClientState.AWAIT_SERVER_INIT)
    assert not issubclass(InvalidTransition, RemoteProtocolError)
    assert not issubclass(LocalProtocolError, RemoteProtocolError)
    assert client.state is ClientState.AWAIT_PROTOCOL_VERSION


def test_initial_state() -> None:
    client = RFBClient()
    assert client.state is ClientState.AWAIT_PROTOCOL_VERSION
    assert not client.done
    assert client.version is None
    assert client.data_to_send() == b""
    assert client.receive_data(b"") == []


def test_version_property() -> None:
    client = RFBClient()
    client.receive_data(banner(3, 889))
    assert client.version == (3, 8)


def test_eof_during_handshake() -> None:
    client = RFBClient()
    client.receive_data(V38 + b"\x02\x01")  # count 2, one type so far
    with pytest.raises(ConnectionClosedDuringHandshake):
        client.receive_eof()
    assert client.state is ClientState.FAILED
    client.receive_eof()  # idempotent
    with pytest.raises(LocalProtocolError):
        client.receive_data(b"\x02")


def test_eof_before_anything() -> None:
    client = RFBClient()
    with pytest.raises(ConnectionClosedDuringHandshake):
        client.receive_eof()


def test_eof_after_done_and_after_auth_failure() -> None:
    done = RFBClient(stop_at=Stage.SECURITY_TYPES)
    done.receive_data(V38 + sec_types(2))
    done.receive_eof()
    assert done.done

    failed = RFBClient(password=PASSWORD)
    failed.receive_data(V37 + sec_types(2) + CHALLENGE + u32(1))
    assert failed.state is ClientState.FAILED
    failed.receive_eof()


def test_data_after_an_error_raises_remote_error() -> None:
    client = RFBClient()
    with pytest.raises(BadProtocolVersion):
        client.receive_data(b"SSH-")
    assert client.state is ClientState.FAILED
    with pytest.raises(DataAfterFailure):
        client.receive_data(b"more")
    assert client.receive_data(b"") == []


def test_banner_rejected_on_first_wrong_byte() -> None:
    """A probe learns "not RFB" without waiting for 12 bytes."""
    with pytest.raises(BadProtocolVersion):
        RFBClient().receive_data(b"S")


def test_trailing_data_drains_and_needs_done() -> None:
    client = RFBClient(stop_at=Stage.SECURITY_TYPES)
    with pytest.raises(LocalProtocolError):
        client.trailing_data()
    client.receive_data(V38 + sec_types(1) + b"ab")
    assert client.receive_data(b"cd") == []
    assert client.trailing_data() == b"abcd"
    assert client.trailing_data() == b""


def test_trailing_data_cap() -> None:
    client = RFBClient(stop_at=Stage.SECURITY_TYPES)
    client.receive_data(V38 + sec_types(1))
    client.receive_data(b"x" * MAX_BUFFER)  # exactly at the cap: fine
    assert len(client.trailing_data()) == MAX_BUFFER
    client.receive_data(b"x" * MAX_BUFFER)
    with pytest.raises(BufferOverflow):
        client.receive_data(b"x")
    assert client.state is ClientState.FAILED


def test_handshake_buffer_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cap also bounds an unfinished message (unreachable with the real caps: the largest
    handshake message is far below MAX_BUFFER, so shrink it)."""
    monkeypatch.setattr("sandport.proto.rfb.client.MAX_BUFFER", 16)  # where RFBClient reads it
    client = RFBClient()
    client.receive_data(V33 + u32(1))
    with pytest.raises(BufferOverflow) as info:
        client.receive_data(INIT_BYTES[:20])
    assert info.value.events == ()


def test_big_read_completing_handshake_is_fine() -> None:
    """A single read that finishes the handshake and carries a server message is not an
    error as long as it stays under the cap."""
    extra = b"\x00" * (MAX_BUFFER - 1)
    client = RFBClient()
    events = client.receive_data(V33 + u32(1) + INIT_BYTES + extra)
    assert events[-1] == SIR
    assert client.trailing_data() == extra


def test_error_hierarchy() -> None:
    for name in rfb.__all__:
        obj = getattr(rfb, name)
        if (
            isinstance(obj, type)
            and issubclass(obj, Exception)
            and obj not in (InvalidTransition, LocalProtocolError)
        ):
            assert issubclass(obj, RFBProtocolError), name
            assert issubclass(obj, RemoteProtocolError), name
    assert issubclass(PasswordRequired, NoSupportedSecurityType)


def test_error_attributes() -> None:
    with pytest.raises(ConnectionFailed) as failed:
        RFBClient().receive_data(V38 + b"\x00" + string(b"busy"))
    assert failed.value.reason == "busy"
    with pytest.raises(NoSupportedSecurityType) as nst:
        RFBClient().receive_data(V38 + sec_types(16, 19))
    assert nst.value.offered == (16, 19)
    with pytest.raises(UnsupportedVersion) as uv:
        RFBClient().receive_data(banner(3, 2))
    assert uv.value.version == (3, 2)
    with pytest.raises(FieldTooLong) as ftl:
        RFBClient().receive_data(V38 + b"\x00" + u32(5000))
    assert (ftl.value.length, ftl.value.cap) == (5000, MAX_REASON_LENGTH)


# --------------------------------------------------------------------------------------------
# Version negotiation.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server", "negotiated"),
    [
        ((3, 3), (3, 3)),
        ((3, 4), (3, 3)),
        ((3, 5), (3, 3)),
        ((3, 6), (3, 3)),
        ((3, 7), (3, 7)),
        ((3, 8), (3, 8)),
        ((3, 9), (3, 8)),
        ((3, 889), (3, 8)),
        ((4, 0), (3, 8)),
        ((4, 1), (3, 8)),
        ((5, 0), (3, 8)),
    ],
)
def test_negotiate_version(server: tuple[int, int], negotiated: tuple[int, int]) -> None:
    assert negotiate_version(server) == negotiated


@pytest.mark.parametrize("server", [(3, 2), (3, 0), (2, 9), (0, 0), (4, 2), (5, 1), (6, 0)])
def test_negotiate_version_unsupported(server: tuple[int, int]) -> None:
    with pytest.raises(UnsupportedVersion):
        negotiate_version(server)


# --------------------------------------------------------------------------------------------
# Messages.
# --------------------------------------------------------------------------------------------


def test_server_init_round_trip() -> None:
    assert ServerInit.from_bytes(INIT_BYTES) == INIT
    assert PixelFormat.from_bytes(bytes(PF)) == PF
    assert len(bytes(PF)) == 16


def test_pixel_format_flags_are_nonzero_true() -> None:
    raw = bytearray(bytes(PF))
    raw[2], raw[3] = 0x80, 0
    pf = PixelFormat.from_bytes(bytes(raw))
    assert pf.big_endian is True
    assert pf.true_colour is False


@pytest.mark.parametrize("data", [b"", bytes(15), bytes(17)])
def test_pixel_format_wrong_length(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        PixelFormat.from_bytes(data)


@pytest.mark.parametrize("data", [INIT_BYTES[:-1], INIT_BYTES + b"x", INIT_BYTES[:10]])
def test_server_init_wrong_length(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        ServerInit.from_bytes(data)


pixel_formats = st.builds(
    PixelFormat,
    bits_per_pixel=st.sampled_from([8, 16, 32]),
    depth=st.integers(1, 8),
    big_endian=st.booleans(),
    true_colour=st.booleans(),
    red_max=st.integers(0, 0xFFFF),
    green_max=st.integers(0, 0xFFFF),
    blue_max=st.integers(0, 0xFFFF),
    red_shift=st.integers(0, 255),
    green_shift=st.integers(0, 255),
    blue_shift=st.integers(0, 255),
)


@given(
    width=st.integers(1, MAX_DIMENSION),
    height=st.integers(1, MAX_DIMENSION),
    pf=pixel_formats,
    name=st.text(max_size=200),
)
def test_server_init_round_trip_property(
    width: int, height: int, pf: PixelFormat, name: str
) -> None:
    init = ServerInit(width=width, height=height, pixel_format=pf, name=name)
    assert ServerInit.from_bytes(bytes(init)) == init


# --------------------------------------------------------------------------------------------
# Random input never escapes as anything but RemoteProtocolError.
# --------------------------------------------------------------------------------------------

PREFIXES = [
    b"",
    b"RFB 003.",
    V33,
    V37,
    V38,
    V38 + sec_types(1, 2),
    V38 + sec_types(2) + CHALLENGE,
    V37 + sec_types(1),
    V33 + u32(1),
    V33 + u32(2) + CHALLENGE,
    V33 + u32(1) + init_header(64, 64, bytes(PF), 8),
]


@given(
    prefix=st.sampled_from(PREFIXES),
    data=st.binary(max_size=300),
    password=st.sampled_from([None, PASSWORD]),
    stop_at=st.sampled_from(Stage),
    cuts=st.lists(st.integers(0, 600), max_size=8),
)
def test_random_bytes_raise_only_remote_errors(
    prefix: bytes, data: bytes, password: str | None, stop_at: Stage, cuts: list[int]
) -> None:
    stream = prefix + data
    bounds = [0, *sorted(c for c in cuts if c <= len(stream)), len(stream)]
    client = RFBClient(password=password, stop_at=stop_at)
    try:
        for start, end in itertools.pairwise(bounds):
            client.receive_data(stream[start:end])
            client.data_to_send()
        client.receive_eof()
    except RemoteProtocolError:
        assert client.state is ClientState.FAILED


# --------------------------------------------------------------------------------------------
# DES, the VNC way.
# --------------------------------------------------------------------------------------------


def test_des_known_answer() -> None:
    """Plain DES: key 0, block 0 -> 8ca64de9c1b123a7 (FIPS 81 style KAT)."""
    enc = rfb._des_cipher(bytes(8)).encryptor()
    assert (enc.update(bytes(8)) + enc.finalize()).hex() == "8ca64de9c1b123a7"


def test_des_key_bits_are_reversed() -> None:
    """VNC key byte 0x80 becomes DES key byte 0x01, which differs from 0x00 only in the
    (ignored) parity bit, so it gives the same KAT; unreversed, 0x80 would not."""
    enc = rfb._des_cipher(b"\x80" * 8).encryptor()
    assert (enc.update(bytes(8)) + enc.finalize()).hex() == "8ca64de9c1b123a7"
    enc = rfb._des_cipher(b"\x01" * 8).encryptor()
    assert (enc.update(bytes(8)) + enc.finalize()).hex() != "8ca64de9c1b123a7"


def test_vnc_auth_response_known_answer() -> None:
    assert vnc_auth_response(CHALLENGE, PASSWORD) == RESPONSE


@pytest.mark.filterwarnings("ignore:TripleDES has been moved")  # vncdotool's own import
def test_vnc_auth_response_matches_vncdotool() -> None:
    for password in ["a", PASSWORD, "12345678", "Zz9!~ ^"]:
        for challenge in [CHALLENGE, bytes(16), b"\xff" * 16]:
            assert vnc_auth_response(challenge, password) == des_encrypt(
                _vnc_des(password), challenge
            )


def test_only_first_eight_characters_count() -> None:
    assert vnc_auth_response(CHALLENGE, "abcdefghXYZ") == vnc_auth_response(CHALLENGE, "abcdefgh")
    assert obfuscate_password("abcdefghXYZ") == obfuscate_password("abcdefgh")


@pytest.mark.parametrize("password", ["", "a\0b", "пароль", "密码"])
def test_bad_passwords(password: str) -> None:
    with pytest.raises(ValueError, match="password"):
        vnc_auth_response(CHALLENGE, password)
    with pytest.raises(ValueError, match="password"):
        obfuscate_password(password)
    with pytest.raises(ValueError, match="password"):
        RFBClient(password=password)


def test_latin1_password_is_accepted() -> None:
    assert len(vnc_auth_response(CHALLENGE, "pässwörd")) == 16
    assert deobfuscate_password(obfuscate_password("pässwörd")) == "pässwörd"


@pytest.mark.parametrize("challenge", [b"", bytes(15), bytes(17)])
def test_challenge_length(challenge: bytes) -> None:
    with pytest.raises(ValueError, match="challenge"):
        vnc_auth_response(challenge, PASSWORD)


def test_obfuscate_known_answer() -> None:
    # What `x11vnc -storepasswd s3cret FILE` wrote on Debian 12; also checked live below.
    assert obfuscate_password(PASSWORD) == bytes.fromhex("e1431299b176609d")


@pytest.mark.parametrize("password", ["a", PASSWORD, "12345678", "abcdefghijk"])
def test_deobfuscate_round_trip(password: str) -> None:
    data = obfuscate_password(password)
    assert len(data) == 8
    assert deobfuscate_password(data) == password[:8]
    assert deobfuscate_password(data + obfuscate_password("view")) == password[:8]


@pytest.mark.parametrize("length", [0, 7, 9, 15, 17])
def test_deobfuscate_wrong_length(length: int) -> None:
    with pytest.raises(ValueError, match="8 or 16"):
        deobfuscate_password(bytes(length))


def test_deobfuscate_empty_password() -> None:
    enc = rfb._des_cipher(rfb.PASSWORD_FILE_KEY).encryptor()
    with pytest.raises(ValueError, match="empty"):
        deobfuscate_password(enc.update(bytes(8)) + enc.finalize())


def _x11vnc() -> str:
    path = shutil.which("x11vnc")
    require(path is not None, "x11vnc", "apt-get install x11vnc")
    assert path is not None
    return path


@pytest.mark.parametrize("password", [PASSWORD, "x", "12345678", "abcdefghijk", "p w~!"])
def test_obfuscate_matches_real_x11vnc(password: str, tmp_path: Path) -> None:
    x11vnc = _x11vnc()
    target = tmp_path / "passwd"
    subprocess.run(
        [x11vnc, "-storepasswd", password, str(target)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    written = target.read_bytes()
    assert written == obfuscate_password(password)
    assert deobfuscate_password(written) == password[:8]
