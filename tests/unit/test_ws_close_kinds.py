"""The label a WebSocket session's close reason is counted under in
``sandport_ws_closes_total{reason}``: a client that reset its connection is named, not
counted as ``other`` (the fault soak's "client stops reading" found that)."""

from __future__ import annotations

import pytest

from sandport.bridge.session import _reason_kind

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("reason", "kind"), [
    ("the client connection failed: Connection reset by peer", "client_connection_failed"),
    ("the client went away", "client_went_away"),
    ("the target connection failed: No route to host (hop: guest reachability)",
     "target_connection_failed"),
    ("the target closed the connection (hop: guest service)", "target_closed"),
    ("keepalive: no pong within 30 s", "keepalive"),
    ("", "closed"),
    ("something nobody expected", "other"),
])
def test_close_reasons_are_counted_under_their_kind(reason: str, kind: str) -> None:
    assert _reason_kind(reason) == kind
