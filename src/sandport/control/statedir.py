"""The state dir is root's alone: every file sandport writes there is 0600 and every
directory 0700, whatever umask the gateway was started with.

Owns: the process umask while a gateway runs (:data:`PRIVATE_UMASK`, as PostgreSQL's
postmaster sets it at start; taken by each gateway of the process, given back to what it
was when the last one stops), so the store and its journal files, logs, ``pids.json``,
sockets and whatever a later version adds are born private; and :func:`tighten`, which
takes group and other bits from what an older gateway (or a wider umask) left there.

Must not touch: a guest's own ``/tmp`` (``sandboxes/<id>/tmp``: the guest's files, mode
1777 as any /tmp, reachable only through its 0700 workdir) and the files handed to a
contained guest (``sandboxes/<id>/guest``, 0755, owned by the guest's mapped root and
mounted read-only in its container); anything outside the state
dir (the image cache is not secret); a state dir that is a shared sticky directory such as
/tmp (left as it is, with a warning).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from pathlib import Path

from sandport.sandbox.netns import GUEST_FILES_DIR

log = logging.getLogger(__name__)

#: No group or other bits on anything the gateway process (or a child) creates.
PRIVATE_UMASK = 0o077
#: ``sandboxes/<id>/GUEST_TMP`` is a guest's /tmp: its own, not tightened.
GUEST_TMP = "tmp"

class _UmaskHold:
    """Who holds the private umask in this process, and what it was before."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.holders = 0
        self.saved = 0


_hold = _UmaskHold()


def hold_private_umask() -> None:
    """Set :data:`PRIVATE_UMASK` for this process while a gateway runs (counted: several
    gateways in one process share it)."""
    with _hold.lock:
        before = os.umask(PRIVATE_UMASK)  # again: someone may have changed it meanwhile
        if _hold.holders == 0:
            _hold.saved = before
        _hold.holders += 1


def release_private_umask() -> None:
    """The gateway stopped: the last one gives the process its umask back."""
    with _hold.lock:
        if _hold.holders == 0:
            return
        _hold.holders -= 1
        if _hold.holders == 0:
            os.umask(_hold.saved)


def tighten(state_dir: Path) -> int:
    """Take group and other bits from the state dir and everything under it (symbolic
    links are not followed; guests' /tmp directories and the directory of files handed to a
    contained guest, 0755 and mounted read-only in its container, are skipped). Returns how many
    modes changed; a path that vanishes meanwhile is skipped."""
    st = os.lstat(state_dir)
    if st.st_mode & stat.S_ISVTX:
        log.warning("state dir %s is a shared sticky directory: its mode is left as it is; "
                    "give the gateway a directory of its own", state_dir)
        return 0
    changed = _private(state_dir, st)
    sandboxes = state_dir / "sandboxes"
    for root, dirs, files in os.walk(state_dir):
        if Path(root).parent == sandboxes:
            for guests in (GUEST_TMP, GUEST_FILES_DIR):
                if guests in dirs:  # the guest's /tmp; what the guest's root must read
                    dirs.remove(guests)
        for name in (*dirs, *files):
            try:
                changed += _private(Path(root, name), os.lstat(Path(root, name)))
            except FileNotFoundError:
                continue
    if changed:
        log.info("state dir %s: %d path(s) made private (0600/0700)", state_dir, changed)
    return changed


def _private(path: Path, st: os.stat_result) -> int:
    """chmod ``path`` without group and other bits; 1 if it changed."""
    if stat.S_ISLNK(st.st_mode) or not st.st_mode & 0o077:
        return 0
    os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o077)
    return 1
