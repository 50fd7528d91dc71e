"""The sandbox lifecycle: one Enum, one transition table; an illegal transition raises.

::

    creating ─► starting ─► ready ◄─► degraded
        │           │         │          │
        └───────────┴────┬────┴──────────┘
                         ▼
                     stopping ─► stopped
    failed (with a reason) is reachable from every other state but stopped;
    failed ─► stopping.

A *session* is a flow an API caller runs on a sandbox (a login: the user works on the
desktop, the guest posts the credentials it captured)::

    waiting ─► ready ─► completed
       │         │
       └─────────┴────► expired | cancelled

``waiting`` until the sandbox is ready; ``completed`` when credentials arrive (also
straight from ``waiting``: a guest may be quicker than the readiness probe); ``expired``
when its TTL runs out; ``cancelled`` when its sandbox goes away first.
"""

from __future__ import annotations

from enum import StrEnum

from sandport.proto.errors import InvalidTransition


class SandboxState(StrEnum):
    """Where a sandbox is in its life."""

    CREATING = "creating"
    STARTING = "starting"
    READY = "ready"
    DEGRADED = "degraded"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class IllegalTransition(InvalidTransition):
    """A caller tried to move a sandbox or a session along an edge the table does not have:
    a bug, never a user's mistake (see :mod:`sandport.proto.errors`)."""


S = SandboxState
TRANSITIONS: dict[SandboxState, frozenset[SandboxState]] = {
    S.CREATING: frozenset({S.STARTING, S.STOPPING, S.FAILED}),
    S.STARTING: frozenset({S.READY, S.STOPPING, S.FAILED}),
    S.READY: frozenset({S.DEGRADED, S.STOPPING, S.FAILED}),
    S.DEGRADED: frozenset({S.READY, S.STOPPING, S.FAILED}),
    S.FAILED: frozenset({S.STOPPING}),
    S.STOPPING: frozenset({S.STOPPED, S.FAILED}),
    S.STOPPED: frozenset(),
}


def check_transition(current: SandboxState, new: SandboxState) -> SandboxState:
    """Return ``new`` if ``current -> new`` is in the table, else raise IllegalTransition."""
    if new not in TRANSITIONS[current]:
        raise IllegalTransition(f"sandbox cannot go from {current.value} to {new.value}")
    return new


class SessionState(StrEnum):
    """Where a session is."""

    WAITING = "waiting"
    READY = "ready"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        """True once nothing can change it."""
        return not SESSION_TRANSITIONS[self]


W = SessionState
SESSION_TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    W.WAITING: frozenset({W.READY, W.COMPLETED, W.EXPIRED, W.CANCELLED}),
    W.READY: frozenset({W.COMPLETED, W.EXPIRED, W.CANCELLED}),
    W.COMPLETED: frozenset(),
    W.EXPIRED: frozenset(),
    W.CANCELLED: frozenset(),
}


def check_session_transition(current: SessionState, new: SessionState) -> SessionState:
    """Return ``new`` if ``current -> new`` is in the session table, else raise."""
    if new not in SESSION_TRANSITIONS[current]:
        raise IllegalTransition(f"session cannot go from {current.value} to {new.value}")
    return new
