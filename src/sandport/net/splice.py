"""Zero-copy plumbing shared by the TCP relay and the WebSocket bridge: ``splice(2)``.

Owns the constants and the pipes every splice path uses: whether the platform has
``os.splice``, the flags of every call, a non-blocking pipe sized for one move, and
:class:`PipePool`, the process's bounded pool of such pipes (HAProxy's ``tune.maxpipes``:
a relay takes a pipe only while a direction has bytes in flight and gives it back, empty,
as soon as it has none). The data paths themselves live with their owners
(:mod:`sandport.forward.pump`, :mod:`sandport.bridge.splicedown`); this module must not grow
sockets or event-loop code.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DEFAULT_MAX_PIPES",
    "PIPES",
    "PIPE_SIZE",
    "SPLICE_AVAILABLE",
    "SPLICE_FLAGS",
    "WOULD_BLOCK",
    "PipePool",
    "PipePoolStats",
    "open_pipe",
]

#: Pipe capacity asked for per direction (``F_SETPIPE_SZ``); the most one splice moves.
PIPE_SIZE: Final = 1024 * 1024
SPLICE_AVAILABLE: Final = hasattr(os, "splice")
#: Flags of every splice: move pages where possible, never block.
SPLICE_FLAGS: Final = (
    os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK if SPLICE_AVAILABLE else 0
)
#: The errnos of a non-blocking call that would have to wait.
WOULD_BLOCK: Final = (errno.EAGAIN, errno.EWOULDBLOCK)
#: Pipes the process's pool hands out at once unless told otherwise (each is two
#: descriptors and, while it holds bytes, up to :data:`PIPE_SIZE` of kernel memory).
#: Past it, a direction that would splice copies through the shared buffer instead.
DEFAULT_MAX_PIPES: Final = 1024
#: Empty pipes the pool keeps open for the next taker; more are closed when given back.
KEEP_FREE: Final = 64


def open_pipe() -> tuple[int, int, int]:
    """A non-blocking pipe sized to :data:`PIPE_SIZE` where allowed: ``(r, w, capacity)``."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        size = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:  # over the per-user pipe budget: keep the default size
        size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
    return r, w, size


@dataclass(frozen=True, slots=True, kw_only=True)
class PipePoolStats:
    """A snapshot of the pipe pool.

    Attributes:
        limit: Most pipes handed out at once (``max_pipes``).
        in_use: Pipes handed out now (each holds bytes of one direction in flight).
        free: Empty pipes kept open for the next taker.
        made: Pipes opened since the process started.
        refused: Takes answered with no pipe (the limit was reached, or the kernel
            refused a new pipe); the taker copied instead.
    """

    limit: int
    in_use: int
    free: int
    made: int
    refused: int


class PipePool:
    """A bounded pool of splice pipes, shared by every relay of the process.

    ``take`` hands out an empty pipe (a kept one, else a new one) while fewer than
    ``limit`` are out, else ``None``; ``give`` takes back an *empty* pipe (kept while
    fewer than :data:`KEEP_FREE` wait, else closed); ``discard`` closes one that may
    still hold bytes (a reset connection's). Safe to use from several event-loop threads.
    """

    __slots__ = ("_free", "_lock", "in_use", "limit", "made", "refused")

    def __init__(self, limit: int = DEFAULT_MAX_PIPES) -> None:
        """An empty pool handing out at most ``limit`` pipes at once."""
        if limit < 0:
            raise ValueError(f"max_pipes must be >= 0, not {limit}")
        self.limit = limit
        self.in_use = 0
        self.made = 0
        self.refused = 0
        self._free: list[tuple[int, int, int]] = []
        self._lock = threading.Lock()

    def take(self) -> tuple[int, int, int] | None:
        """An empty pipe ``(r, w, capacity)``, or None when ``limit`` are out.

        Raises:
            OSError: The kernel refused a new pipe (``EMFILE``/``ENFILE``); counted in
                ``refused`` like an exhausted pool.
        """
        with self._lock:
            if self.in_use >= self.limit:
                self.refused += 1
                return None
            self.in_use += 1
            if self._free:
                return self._free.pop()
        try:
            pipe = open_pipe()
        except OSError:
            with self._lock:
                self.in_use -= 1
                self.refused += 1
            raise
        with self._lock:
            self.made += 1
        return pipe

    def give(self, pipe: tuple[int, int, int]) -> None:
        """Take back an empty pipe."""
        with self._lock:
            self.in_use -= 1
            if len(self._free) < KEEP_FREE and self.in_use + len(self._free) < self.limit:
                self._free.append(pipe)
                return
        os.close(pipe[0])
        os.close(pipe[1])

    def discard(self, pipe: tuple[int, int, int]) -> None:
        """Close a handed-out pipe that may hold bytes (never reused)."""
        with self._lock:
            self.in_use -= 1
        os.close(pipe[0])
        os.close(pipe[1])

    def resize(self, limit: int) -> None:
        """Hand out at most ``limit`` pipes from now on (those out stay out until given)."""
        if limit < 0:
            raise ValueError(f"max_pipes must be >= 0, not {limit}")
        with self._lock:
            self.limit = limit
            drop = self._free[max(0, limit - self.in_use):]
            del self._free[max(0, limit - self.in_use):]
        for r, w, _ in drop:
            os.close(r)
            os.close(w)

    def clear(self) -> None:
        """Close the kept empty pipes (a process whose relays all stopped)."""
        with self._lock:
            drop, self._free = self._free, []
        for r, w, _ in drop:
            os.close(r)
            os.close(w)

    @property
    def stats(self) -> PipePoolStats:
        """A consistent snapshot of the counters."""
        with self._lock:
            return PipePoolStats(limit=self.limit, in_use=self.in_use, free=len(self._free),
                                 made=self.made, refused=self.refused)


#: The process's pool (descriptors are per process, so the bound is too).
PIPES: Final = PipePool()
