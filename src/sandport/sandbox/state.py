"""The sandbox lifecycle: one Enum, one transition table; an illegal transition raises.

::

    creating ─► starting ─► ready ◄─► degraded
        │           │         │          │
        └───────────┴────┬────┴──────────┘
                         ▼
                     stopping ─► stopped
    failed (with a reason) is reachable from every state but stopped; failed ─► stopping.
"""

from __future__ import annotations

from enum import StrEnum


class SandboxState(StrEnum):
    """Where a sandbox is in its life."""

    CREATING = "creating"
    STARTING = "starting"
    READY = "ready"
    DEGRADED = "degraded"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class IllegalTransition(RuntimeError):
    """A caller tried to move a sandbox along an edge the table does not have."""


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
