"""Unit tests for the agent port's body cap in the framer (sandport.proto.http1 with
``max_body``): a request's content over the cap is refused as soon as its size is known,
at every split of the input, and a request at the cap passes; chunk framing is not counted.
"""

from __future__ import annotations

import pytest

from sandport.config import AgentLimits
from sandport.errors import UsageError
from sandport.proto.http1 import Body, BodyTooLarge, End, Head, MessageFramer, Phase, Role

pytestmark = pytest.mark.unit

CAP = 10
HEAD_CL = b"POST /p HTTP/1.1\r\nContent-Length: %d\r\n\r\n"
HEAD_TE = b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
GET = b"GET /a HTTP/1.1\r\n\r\n"


def chunks(*sizes: int) -> bytes:
    return b"".join(b"%x\r\n" % n + b"x" * n + b"\r\n" for n in sizes) + b"0\r\n\r\n"


def feed(data: bytes, pieces: int) -> tuple[list[object], BodyTooLarge | None]:
    """Feed ``data`` split after byte ``pieces`` (0: whole); events and the refusal."""
    f = MessageFramer(Role.REQUEST, max_body=CAP)
    events: list[object] = []
    try:
        for part in ([data[:pieces], data[pieces:]] if pieces else [data]):
            events += f.receive_data(part)
    except BodyTooLarge as exc:
        refusal = exc
    else:
        return events, None
    assert f.phase is Phase.CLOSED and refusal.status == 413
    return events + list(refusal.events), refusal


ACCEPTED = [
    ("length at the cap", HEAD_CL % CAP + b"x" * CAP + GET),
    ("chunked at the cap, 1-byte chunks (framing not counted)", HEAD_TE + chunks(*[1] * CAP)
     + GET),
    ("two requests, each at the cap", HEAD_TE + chunks(4, 6) + HEAD_TE + chunks(CAP)),
]
REFUSED = [
    ("declared length over the cap", HEAD_CL % (CAP + 1), 0),
    ("a chunk over the cap", HEAD_TE + b"b\r\n", 1),
    ("chunks adding up over the cap", HEAD_TE + chunks(6, 5), 1),
    ("a huge chunk size", HEAD_TE + b"fffffffffffffff\r\n", 1),
]


@pytest.mark.parametrize(("name", "data"), ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_bodies_up_to_the_cap_pass_at_every_split(name: str, data: bytes) -> None:
    for at in range(len(data)):
        events, refusal = feed(data, at)
        assert refusal is None, at
        assert sum(isinstance(e, End) for e in events) == data.count(b"HTTP/1.1"), at


@pytest.mark.parametrize(("name", "data", "heads"), REFUSED, ids=[r[0] for r in REFUSED])
def test_bodies_over_the_cap_are_refused_at_every_split(name: str, data: bytes,
                                                       heads: int) -> None:
    """Refused when the size is known: nothing of an over-long chunk is emitted, and a
    declared length over the cap never emits its head (it is not relayed)."""
    for at in range(len(data)):
        events, refusal = feed(data + b"x" * 64, at)
        assert refusal is not None, at
        assert sum(isinstance(e, Head) for e in events) == heads, at
        content = sum(len(e.data) for e in events if isinstance(e, Body))
        assert content <= len(data), at  # no byte after the refused size line


def test_without_a_cap_nothing_changes() -> None:
    f = MessageFramer(Role.REQUEST)
    events = f.receive_data(HEAD_CL % 100 + b"x" * 100)
    assert isinstance(events[-1], End)


def test_agent_limits_are_checked() -> None:
    with pytest.raises(UsageError):
        AgentLimits(max_per_source=0)
    with pytest.raises(UsageError):
        AgentLimits(head_timeout=0)
