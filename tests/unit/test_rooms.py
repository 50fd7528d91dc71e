"""The gateway's rooms without a gateway: the roster's state changes and the sessions
that follow them, on a real SQLite store."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sandport.control.access import Access
from sandport.control.app import LiveSandbox
from sandport.control.events import EventHub
from sandport.control.roster import Roster, RunningSandbox
from sandport.control.secretbox import SecretBox
from sandport.control.store import SqliteStore
from sandport.errors import SandboxNotFound
from sandport.sandbox.base import SandboxSpec
from sandport.sandbox.profiles import get_profile
from sandport.sandbox.state import IllegalTransition, SandboxState

pytestmark = pytest.mark.unit


class FakePort:
    """The gateway's port as the rooms see it; remembers what it was asked to close."""

    link_base = "http://127.0.0.1:8700"
    ws_base = "ws://127.0.0.1:8700"

    def __init__(self) -> None:
        self.closed: list[tuple[str, int, str, str | None]] = []

    def close_sessions(self, sandbox_id: str, code: int, reason: str,
                       grant: str | None = None) -> int:
        self.closed.append((sandbox_id, code, reason, grant))
        return 1


@pytest.fixture
def roster(tmp_path: Path) -> Iterator[Roster]:
    store = SqliteStore(tmp_path / "db")
    yield Roster(store, EventHub())
    store.close()


def enrol(roster: Roster, sandbox_id: str = "abc123") -> RunningSandbox:
    """A sandbox in the store and the roster, ``creating``."""
    roster.store.add_sandbox(sandbox_id=sandbox_id, backend="netns", profile="desktop",
                             state="creating", ip="10.201.9.2", prefixlen=24,
                             bridge="sp-x", token_hash="h")
    spec = SandboxSpec(id=sandbox_id, profile="desktop",
                       address=ipaddress.IPv4Interface("10.201.9.2/24"),
                       gateway=ipaddress.IPv4Address("10.201.9.1"), bridge="sp-x",
                       workdir=Path("/nonexistent"))
    live = LiveSandbox(id=sandbox_id, ip="10.201.9.2", state=SandboxState.CREATING,
                       token_hash="h", ports=get_profile("desktop").ports)
    sb = RunningSandbox(spec=spec, live=live, token="t",
                        backend=SimpleNamespace(name="netns"))  # type: ignore[arg-type]
    roster.add(sb)
    return sb


def test_a_state_change_is_stored_recorded_and_heard(roster: Roster) -> None:
    sb = enrol(roster)
    heard: list[tuple[str, SandboxState, str]] = []
    roster.on_state(lambda s, state, reason: heard.append((s.id, state, reason)))
    roster.set_state(sb, SandboxState.STARTING)
    roster.set_state(sb, SandboxState.FAILED, "Xvnc exited")
    (rec,) = roster.store.sandboxes()
    assert (rec.state, rec.reason) == ("failed", "Xvnc exited")
    assert [(e.kind, e.data["from"], e.data["state"]) for e in roster.event_log()] == [
        ("sandbox.state", "creating", "starting"), ("sandbox.state", "starting", "failed")]
    assert heard == [("abc123", SandboxState.STARTING, ""),
                     ("abc123", SandboxState.FAILED, "Xvnc exited")]


def test_an_illegal_transition_raises_and_a_clean_up_logs_it_with_the_id(
        roster: Roster, caplog: pytest.LogCaptureFixture) -> None:
    sb = enrol(roster)
    with pytest.raises(IllegalTransition, match="from creating to ready"):
        roster.set_state(sb, SandboxState.READY)
    roster.set_state(sb, SandboxState.STOPPING)
    roster.set_state(sb, SandboxState.STOPPED)
    with caplog.at_level(logging.ERROR, logger="sandport.control.roster"):
        roster.set_state_or_log(sb, SandboxState.STOPPING)  # a second delete: a bug
    assert sb.live.state is SandboxState.STOPPED
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "sandbox abc123" in record.getMessage()
    assert "from stopped to stopping" in record.getMessage()


def test_an_unknown_sandbox_is_not_found(roster: Roster) -> None:
    with pytest.raises(SandboxNotFound, match="no sandbox 'nope'"):
        roster["nope"]
    enrol(roster)
    roster.discard("abc123")
    assert "abc123" not in roster and roster.store.sandboxes() == []


def test_sessions_follow_their_sandbox_ready_then_cancelled(roster: Roster) -> None:
    async def run() -> list[Any]:
        access = Access(roster, SecretBox(os.urandom(32)), FakePort())
        sb = enrol(roster)
        roster.set_state(sb, SandboxState.STARTING)
        first = access.create_session(sb.id, ttl=60)
        roster.set_state(sb, SandboxState.READY)
        second = access.create_session(sb.id, ttl=60)
        after_ready = [access.session(first.id).state, second.state]
        roster.set_state(sb, SandboxState.FAILED, "Xvnc exited")
        ended = [access.session(r.id) for r in (first, second)]
        access.close()
        return [first.state, after_ready, [(r.state, r.reason) for r in ended]]

    waiting, after_ready, ended = asyncio.run(run())
    assert waiting == "waiting"
    assert after_ready == ["ready", "ready"]
    assert ended == [("cancelled", "the sandbox failed: Xvnc exited")] * 2


def test_a_revoked_access_token_closes_its_sessions_and_is_forgotten(roster: Roster) -> None:
    port = FakePort()

    async def run() -> list[dict[str, Any]]:
        access = Access(roster, SecretBox(os.urandom(32)), port)
        sb = enrol(roster)
        grant = access.create_grant(sb.id, 60, ports=("vnc",))
        assert grant["desktop_url"] == f"{port.link_base}/s/{sb.id}/?token={grant['token']}"
        access.revoke_grant(sb.id, grant["id"])
        with pytest.raises(SandboxNotFound):
            access.revoke_grant(sb.id, grant["id"])
        return access.grants(sb.id)

    assert asyncio.run(run()) == []
    ((sandbox_id, code, reason, grant_id),) = port.closed
    assert (sandbox_id, code, reason) == ("abc123", 1008, "the access token was revoked")
    assert grant_id is not None and grant_id.startswith("g")
    kinds = [e.kind for e in roster.event_log()]
    assert kinds == ["token.created", "token.revoked"]
