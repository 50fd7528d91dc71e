"""The gateway's private umask is counted and given back; :func:`tighten` takes group and
other bits from a state dir but leaves guests' /tmp and symbolic links alone."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sandport.control.statedir import hold_private_umask, release_private_umask, tighten

pytestmark = pytest.mark.unit


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_the_umask_is_held_by_every_gateway_and_given_back_by_the_last() -> None:
    before = os.umask(0o002)
    try:
        hold_private_umask()
        os.umask(0)  # changed behind the first gateway's back
        hold_private_umask()  # the second sets it again
        assert os.umask(0o077) == 0o077
        release_private_umask()
        assert os.umask(0o077) == 0o077  # one still runs
        release_private_umask()
        assert os.umask(0o002) == 0o002  # the first one's umask is back
        release_private_umask()  # one too many: nothing happens
        assert os.umask(0o002) == 0o002
    finally:
        os.umask(before)


def test_tighten_spares_guests_tmp_and_links(tmp_path: Path) -> None:
    state = tmp_path / "state"
    logs, guest = state / "sandboxes" / "a1b2c3" / "logs", state / "sandboxes" / "a1b2c3" / "tmp"
    logs.mkdir(parents=True)
    guest.mkdir()
    for path, m in ((state, 0o755), (logs, 0o777), (guest, 0o1777)):
        path.chmod(m)
    (logs / "x.log").write_text("")
    (logs / "x.log").chmod(0o664)
    (guest / "mine").write_text("")
    (guest / "mine").chmod(0o666)
    outside = tmp_path / "outside"
    outside.write_text("")
    outside.chmod(0o644)
    (state / "link").symlink_to(outside)
    assert tighten(state) == 5  # state, sandboxes, a1b2c3, logs, x.log
    assert [mode(p) for p in (state, logs, logs / "x.log", state / "sandboxes")] == \
        [0o700, 0o700, 0o600, 0o700]
    assert (mode(guest), mode(guest / "mine"), mode(outside)) == (0o1777, 0o666, 0o644)
    assert tighten(state) == 0
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    assert tighten(shared) == 0 and mode(shared) == 0o1777
