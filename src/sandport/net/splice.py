"""Zero-copy plumbing shared by the TCP relay and the WebSocket bridge: ``splice(2)``.

Owns the constants and the pipe every splice path uses: whether the platform has
``os.splice``, the flags of every call, and a non-blocking pipe sized for one move. The
data paths themselves live with their owners (:mod:`sandport.forward.tcp`'s pumps,
:mod:`sandport.bridge.splicedown`); this module must not grow sockets or event-loop code.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Final

__all__ = ["PIPE_SIZE", "SPLICE_AVAILABLE", "SPLICE_FLAGS", "WOULD_BLOCK", "open_pipe"]

#: Pipe capacity asked for per direction (``F_SETPIPE_SZ``); the most one splice moves.
PIPE_SIZE: Final = 1024 * 1024
SPLICE_AVAILABLE: Final = hasattr(os, "splice")
#: Flags of every splice: move pages where possible, never block.
SPLICE_FLAGS: Final = (
    os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK if SPLICE_AVAILABLE else 0
)
#: The errnos of a non-blocking call that would have to wait.
WOULD_BLOCK: Final = (errno.EAGAIN, errno.EWOULDBLOCK)


def open_pipe() -> tuple[int, int, int]:
    """A non-blocking pipe sized to :data:`PIPE_SIZE` where allowed: ``(r, w, capacity)``."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        size = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:  # over the per-user pipe budget: keep the default size
        size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
    return r, w, size
