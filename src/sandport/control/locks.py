"""The locks that make a state dir and a bridge one gateway's.

Owns: taking a lock file with ``flock`` (released by the kernel when the process dies,
so a crashed gateway's lock is free again) and giving it back. The gateway decides
which files: ``<state dir>/gateway.lock`` and ``/run/sandport/bridge-<name>.lock``.

Must not touch: anything behind the lock (the store, the bridge): it only guards.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path
from typing import TextIO

from sandport.errors import StateDirBusy

log = logging.getLogger(__name__)

RUN_DIR = Path("/run/sandport")  # per-boot locks shared by every gateway on this host


def take_lock(path: Path, what: str, hint: str) -> TextIO:
    """flock ``path`` for this process (released when the file closes, also on a crash).

    The holder deletes the file when it stops (:func:`release_lock`), so a lock taken on
    a file that was deleted meanwhile is no lock: then it is taken again on the new one.

    Raises:
        StateDirBusy: another live gateway holds it; the message names its pid.
    """
    for _ in range(10):
        lock = open(path, "a+")  # noqa: SIM115 - held until the gateway stops
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise StateDirBusy(f"{what} is in use by gateway pid {holder}",
                                   hint=hint) from None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # deleted by its last holder between our open and flock
            lock.close()
            continue
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        return lock
    raise StateDirBusy(f"{what}: its lock file keeps being replaced", hint=hint)


def release_lock(lock: TextIO, *, delete: bool) -> None:
    """Release a lock from :func:`take_lock`; ``delete`` removes its file first."""
    if delete:
        try:
            os.unlink(lock.name)
        except OSError as exc:
            log.warning("lock %s stays: %s", lock.name, exc)
    lock.close()
