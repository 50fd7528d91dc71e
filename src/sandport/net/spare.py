"""The process's spare descriptor: a listener out of descriptors still refuses at once.

When ``accept(2)`` fails with ``EMFILE``/``ENFILE`` the waiting client stays in the
kernel's accept queue, and the listener's readiness stays on: an event loop either spins
on it or (asyncio) stops accepting for a second, and the client hangs either way. The
nginx/libuv technique: hold one descriptor back (:class:`SpareDescriptor`, ``/dev/null``);
when accepting fails for want of descriptors, close it, accept the waiting client, reset
it (RST: there is no descriptor to answer with), and take the spare again
(:func:`refuse_on_spare`). The limit is per process, so there is one spare per process
(:data:`SPARE`), shared by every listener that refuses this way: the TCP relay's
(:mod:`sandport.forward.tcp`) and the WebSocket bridge's front door
(:mod:`sandport.bridge.server`, which is also the HTTP API's door in the gateway).

Owns: the spare and the refusal of one client on it. Must not touch: counters and logs
(each listener counts and reports its refusals itself).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Final

__all__ = ["ACCEPT_RETRY", "DESCRIPTOR_LOG_INTERVAL", "OUT_OF_DESCRIPTORS", "SPARE", "BurstLog",
           "SpareDescriptor", "accept_failed", "close_with_reset", "refuse_on_spare"]

log = logging.getLogger(__name__)

#: The process (``EMFILE``) or the system (``ENFILE``) is out of file descriptors.
OUT_OF_DESCRIPTORS: Final = frozenset({errno.EMFILE, errno.ENFILE})
#: Out of memory for a new socket: pause accepting instead of spinning on the listener.
PAUSE_ERRNOS: Final = frozenset({errno.ENOBUFS, errno.ENOMEM})
#: Seconds a listener pauses when it cannot accept even with the spare given back (another
#: process took the descriptor: ENFILE) or the kernel has no memory for a socket.
ACCEPT_RETRY: Final = 0.5
#: Seconds between two log lines about running out of descriptors: one line per burst.
DESCRIPTOR_LOG_INTERVAL: Final = 10.0
#: ``struct linger {int l_onoff; int l_linger;}`` = {1, 0}: close(2) sends RST.
_LINGER_RESET: Final = struct.pack("ii", 1, 0)


class SpareDescriptor:
    """One descriptor held back so a client can still be accepted, and reset, when the
    process is out of descriptors (nginx and libuv do the same).

    ``release`` closes it just before that ``accept``; ``take`` opens it again after. It is
    held while at least one listener uses it (``hold``/``unhold``), and closed after the
    last.
    """

    __slots__ = ("fd", "holders")

    def __init__(self) -> None:
        self.fd = -1
        self.holders = 0

    def hold(self) -> None:
        """A listener starts: make sure the spare is held."""
        self.holders += 1
        self.take()

    def unhold(self) -> None:
        """A listener stopped: close the spare after the last one."""
        self.holders -= 1
        if self.holders <= 0:
            self.holders = 0
            self.release()

    def take(self) -> bool:
        """Hold the spare (``/dev/null``); False when no descriptor is free for it."""
        if self.fd < 0:
            try:
                self.fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return False
        return True

    def release(self) -> bool:
        """Close the spare so the next ``accept`` can succeed; False when none is held."""
        if self.fd < 0:
            return False
        os.close(self.fd)
        self.fd = -1
        return True


#: The process's spare descriptor, shared by every listener (the limit is per process).
SPARE = SpareDescriptor()


def close_with_reset(sock: socket.socket) -> None:
    """Close ``sock`` so its peer sees a RST (``SO_LINGER {on, 0}``), not a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


def refuse_on_spare(lsock: socket.socket) -> str | None:
    """Out of descriptors: accept one waiting client on the spare and reset it.

    Returns:
        The refused client's address (``""`` when nobody was waiting any more), or None
        when that could not be done (no spare held, or ``accept`` still fails: another
        process took the descriptor freed, ``ENFILE``), so the caller pauses instead.
    """
    if not SPARE.release():
        return None
    try:
        conn, peer = lsock.accept()
    except BlockingIOError:  # the client gave up meanwhile: nothing waits
        SPARE.take()
        return ""
    except OSError:
        SPARE.take()
        return None
    close_with_reset(conn)
    SPARE.take()  # the client's descriptor is free again: hold the spare once more
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


def accept_failed(lsock: socket.socket, exc: OSError, *, refused: Callable[[str], None],
                  pause: Callable[[OSError], None], label: str) -> bool:
    """``accept(2)`` on ``lsock`` raised ``exc``: what a listener's accept loop does next.

    Out of descriptors, a waiting client is refused on the spare (:func:`refuse_on_spare`)
    and ``refused(its address)`` called; when even that cannot be done, or the kernel is
    out of memory for a socket, ``pause(exc)`` is called (the listener stops reading for a
    moment instead of spinning); anything else (``ECONNABORTED``) is passed over.

    Returns:
        Whether the accept loop may go on (False after a pause).
    """
    if exc.errno in OUT_OF_DESCRIPTORS:
        peer = refuse_on_spare(lsock)
        if peer is not None:
            if peer:
                refused(peer)
            return True
    if exc.errno in OUT_OF_DESCRIPTORS or exc.errno in PAUSE_ERRNOS:
        pause(exc)
        return False
    log.debug("%s: accept: %s", label, exc)  # e.g. ECONNABORTED
    return True


class BurstLog:
    """One log line per burst of events, not one per event: :meth:`due` counts an event
    and says how many happened since the last line when another line is due."""

    __slots__ = ("events", "interval", "logged_at")

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.events = 0
        self.logged_at = -math.inf

    def due(self) -> int:
        """Count one event; the events since the last line if a line is due now, else 0."""
        self.events += 1
        now = time.monotonic()
        if now - self.logged_at < self.interval:
            return 0
        events, self.events, self.logged_at = self.events, 0, now
        return events
