"""The sandboxes a gateway runs, and the journal of what happens to them.

Owns: the table of :class:`RunningSandbox` records by id; every sandbox state change
(checked against the transition table of :mod:`sandport.sandbox.state`, stored, logged
and published to live watchers); events that go with no other change; the event log.

Must not touch: guests, forwards, sockets or timers; it starts and stops nothing. A room
that reacts to a state change (sessions wait for ``ready`` and end on ``failed``)
subscribes with :meth:`Roster.on_state`. :class:`GatewayPort` is what the rooms may ask
of the gateway's own port (its URLs, closing bridge sessions): the gateway implements it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from sandport.control.app import LiveSandbox
from sandport.control.events import EventHub
from sandport.control.store import EventRecord, StateStore
from sandport.doctor import Row
from sandport.errors import SandboxNotFound
from sandport.probe import ProbeResult
from sandport.sandbox.base import Backend, SandboxSpec
from sandport.sandbox.state import IllegalTransition, SandboxState, check_transition

log = logging.getLogger(__name__)

#: Called after every state change a sandbox makes: ``(sandbox, new state, reason)``.
StateListener = Callable[["RunningSandbox", SandboxState, str], None]


@dataclass(slots=True, kw_only=True)
class RunningSandbox:
    """A sandbox the gateway runs, with its forwards and readiness evidence."""

    spec: SandboxSpec
    live: LiveSandbox
    token: str
    backend: Backend
    probes: list[ProbeResult] = field(default_factory=list)
    last_probe: ProbeResult | None = None
    ready_seconds: float | None = None
    #: Expiry timers of the sandbox's extra access tokens, by grant id.
    grant_timers: dict[str, asyncio.TimerHandle] = field(default_factory=dict)
    #: The guest agent's token (hashed) and its latest report (its /health document).
    agent_token_hash: str = ""
    agent_report: dict[str, Any] | None = None
    agent_report_at: float | None = None
    #: The doctor's failing check when it last degraded (None while healthy).
    diagnosis: Row | None = None

    @property
    def id(self) -> str:
        """The sandbox's id."""
        return self.spec.id


class GatewayPort(Protocol):
    """What the rooms need of the gateway's HTTP port (the gateway is it)."""

    @property
    def link_base(self) -> str:
        """``http(s)://host:port`` that links handed out to clients start with."""
        ...

    @property
    def ws_base(self) -> str:
        """``ws(s)://host:port`` where this host reaches the WebSocket bridge."""
        ...

    def close_sessions(self, sandbox_id: str, code: int, reason: str,
                       grant: str | None = None) -> int:
        """Close the bridge sessions to a sandbox (with ``grant``: opened with it)."""
        ...


class Roster:
    """The sandboxes of one gateway run, their state changes and the event journal."""

    def __init__(self, store: StateStore, events: EventHub) -> None:
        self.store = store
        self.events = events
        self._table: dict[str, RunningSandbox] = {}
        self._listeners: list[StateListener] = []

    # The table ---------------------------------------------------------------------------

    def __contains__(self, sandbox_id: object) -> bool:
        return sandbox_id in self._table

    def __iter__(self) -> Iterator[RunningSandbox]:
        return iter(list(self._table.values()))

    def __len__(self) -> int:
        return len(self._table)

    def get(self, sandbox_id: str) -> RunningSandbox | None:
        """The sandbox with that id, or None."""
        return self._table.get(sandbox_id)

    def __getitem__(self, sandbox_id: str) -> RunningSandbox:
        """The sandbox with that id.

        Raises:
            SandboxNotFound: there is none.
        """
        sb = self._table.get(sandbox_id)
        if sb is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        return sb

    def ids(self) -> list[str]:
        """Ids of the sandboxes, oldest first."""
        return list(self._table)

    def add(self, sb: RunningSandbox) -> None:
        """Take a sandbox into the table (its record is already stored)."""
        self._table[sb.id] = sb

    def discard(self, sandbox_id: str) -> None:
        """Forget a sandbox: out of the table, its record out of the store."""
        self._table.pop(sandbox_id, None)
        self.store.remove_sandbox(sandbox_id)

    def clear(self) -> None:
        """Forget every sandbox of this run; their records stay for the next start."""
        self._table.clear()

    # State changes and events ------------------------------------------------------------

    def on_state(self, listener: StateListener) -> None:
        """Call ``listener`` after every state change (in the order they subscribed)."""
        self._listeners.append(listener)

    def set_state(self, sb: RunningSandbox, state: SandboxState, reason: str = "") -> None:
        """Move a sandbox to ``state``: stored with its event, logged, then the listeners.

        Raises:
            IllegalTransition: the table has no such edge (a bug).
        """
        before = sb.live.state
        sb.live.state = check_transition(sb.live.state, state)
        sb.live.reason = reason
        data = {"state": state.value, "from": before.value, "reason": reason}
        seq = self.store.set_state(sb.id, state.value, reason=reason,
                                   event=("sandbox.state", data))
        self.published(seq, "sandbox.state", sb.id, data)
        log.info("sandbox %s: %s%s", sb.id, state.value, f" ({reason})" if reason else "")
        for listener in self._listeners:
            listener(sb, state, reason)

    def set_state_or_log(self, sb: RunningSandbox, state: SandboxState, reason: str = "") -> None:
        """:meth:`set_state` on a path that must go on (a delete, a failed start): an
        illegal transition is a bug, logged at error level with the sandbox id."""
        try:
            self.set_state(sb, state, reason)
        except IllegalTransition as exc:
            log.error("sandbox %s: %s (going on with the clean-up)", sb.id, exc)

    def published(self, seq: int | None, kind: str, sandbox_id: str,
                  data: dict[str, Any]) -> None:
        """Hand an event the store recorded (as ``seq``) to live watchers."""
        if seq:
            self.events.publish(EventRecord(seq=seq, at=time.time(), kind=kind,
                                            sandbox_id=sandbox_id, data=data))

    def record_event(self, kind: str, sandbox_id: str, data: dict[str, Any]) -> None:
        """Record an event that goes with no other change, and publish it."""
        self.published(self.store.add_event(kind, sandbox_id, data), kind, sandbox_id, data)

    def event_log(self, *, after: int = 0, sandbox_id: str | None = None,
                  limit: int = 1000) -> list[EventRecord]:
        """Recorded events after ``after`` (``GET /api/events``)."""
        return self.store.events(after=after, sandbox_id=sandbox_id, limit=limit)
