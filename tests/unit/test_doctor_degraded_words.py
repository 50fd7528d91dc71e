"""A degraded sandbox whose hops all answer again (fixed between two readiness probes) is
walked as healthy with one warning; the warning must not point at a failing hop that is
not there (it said "see the failing hop below" under "healthy: every hop answers")."""

from __future__ import annotations

import pytest

from sandport.doctor import Subject, Walk
from sandport.doctor.walk import _route

pytestmark = pytest.mark.unit


def test_a_degraded_sandbox_is_a_warning_true_also_when_every_hop_answers() -> None:
    walk = Walk()
    _route(walk, Subject(sandbox="3f2a1c", known=True, state="degraded",
                         reason="vnc through 127.0.0.1:15901: connection refused"))
    (row,) = walk.rows
    assert (row.hop, row.check, row.status) == ("route", "sandbox", "warn")
    assert row.fix == ("a failing hop below says why; if every hop answers now, the next "
                       "readiness probe turns it ready again")
