"""Zero-copy downstream for plain ``ws://`` sessions: the guest's bytes never enter Python.

Server frames are not masked (RFC 6455 section 5.1), so a binary message is a header
followed by the guest's bytes exactly as they came. Once a session no longer needs to
see those bytes (the RFB watcher is done, no base64), :class:`SpliceDown` takes the
target→client direction over from the asyncio transports: it splices what the target
sends into a pipe, writes a frame header for that many bytes, and splices the pipe into
the client socket. Everything else the session sends to the client (pongs, pings, the
close frame) is queued behind the frame in flight, so frames never interleave.

Both sockets are ``dup``'ed: the transports keep their descriptors (the client's still
reads the upload), and :meth:`SpliceDown.stop` closes ours. Backpressure is the
readiness of the sockets: while a frame waits for the client, the target is not read.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from collections.abc import Callable

from sandport.net.splice import SPLICE_FLAGS, WOULD_BLOCK, open_pipe
from sandport.proto.wsframes import Opcode, frame_header

log = logging.getLogger(__name__)

#: Messages up to this size are read back from the pipe and written with their header.
SMALL = 16 * 1024


class SpliceDown:
    """The target→client direction of one session, spliced.

    Args:
        client_fd, target_fd: the sockets (duplicated here; the caller keeps its own).
        on_data: called with the byte count of every message sent (counters, idle clock).
        on_target_end: called once with ``None`` at the target's EOF or with the error
            that ended reading it; the session then closes with a reason.
        on_client_error: called once when writing to the client fails.
    """

    def __init__(self, client_fd: int, target_fd: int, *, on_data: Callable[[int], None],
                 on_target_end: Callable[[OSError | None], None],
                 on_client_error: Callable[[OSError], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self.cfd = os.dup(client_fd)
        self.tfd = os.dup(target_fd)
        try:
            self.pipe_r, self.pipe_w, self.capacity = open_pipe()
        except OSError:
            os.close(self.cfd)
            os.close(self.tfd)
            raise
        self._on_data = on_data
        self._on_target_end = on_target_end
        self._on_client_error = on_client_error
        #: What goes to the client, in order: bytes, or a count of payload bytes in the pipe.
        self._out: collections.deque[bytes | int] = collections.deque()
        self._sent = 0  # bytes of the bytes item at the head already written
        self._reading = self._writing = False
        self._target_done = False
        self.stopped = False
        self._want_read()

    # -- what the session sends ----------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Queue ``data`` (a whole frame) after what is in flight."""
        if self.stopped:
            return
        self._out.append(data)
        self._flush()

    @property
    def pending(self) -> bool:
        """Whether frames still wait for the client."""
        return bool(self._out)

    # -- readiness ----------------------------------------------------------------------------

    def _want_read(self) -> None:
        if not self._reading and not self._target_done and not self.stopped:
            self._loop.add_reader(self.tfd, self._on_target_readable)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.tfd)
            self._reading = False

    def _on_target_readable(self) -> None:
        try:
            n = os.splice(self.tfd, self.pipe_w, self.capacity, flags=SPLICE_FLAGS)
        except OSError as exc:
            if exc.errno in WOULD_BLOCK:
                return
            self._target_end(exc)
            return
        if n == 0:
            self._target_end(None)
            return
        self._stop_reading()  # until this message is out: the pipe holds one at a time
        if n <= SMALL:  # one write of header and bytes beats a header write and a splice
            self._out.append(frame_header(Opcode.BINARY, n) + os.read(self.pipe_r, n))
        else:
            self._out.append(frame_header(Opcode.BINARY, n))
            self._out.append(n)
        self._on_data(n)
        self._flush()

    def _target_end(self, exc: OSError | None) -> None:
        self._stop_reading()
        self._target_done = True
        self._on_target_end(exc)

    def _flush(self) -> None:
        out = self._out
        try:
            while out:
                item = out[0]
                if isinstance(item, bytes):
                    k = os.write(self.cfd, memoryview(item)[self._sent:])
                    self._sent += k
                    if self._sent < len(item):
                        continue
                    self._sent = 0
                    out.popleft()
                else:
                    k = os.splice(self.pipe_r, self.cfd, item, flags=SPLICE_FLAGS)
                    if k == item:
                        out.popleft()
                    else:
                        out[0] = item - k
        except OSError as exc:
            if exc.errno in WOULD_BLOCK:
                if not self._writing and not self.stopped:
                    self._loop.add_writer(self.cfd, self._flush)
                    self._writing = True
                return
            self.stop()
            self._on_client_error(exc)
            return
        if self._writing:
            self._loop.remove_writer(self.cfd)
            self._writing = False
        self._want_read()

    # -- ending -------------------------------------------------------------------------------

    def stop_target(self) -> None:
        """Stop reading the target and close our descriptor of it."""
        self._stop_reading()
        self._target_done = True
        if self.tfd >= 0:
            os.close(self.tfd)
            self.tfd = -1

    def stop(self) -> None:
        """Stop everything and close our descriptors (what was not sent is dropped)."""
        if self.stopped:
            return
        self.stopped = True
        self.stop_target()
        if self._writing:
            self._loop.remove_writer(self.cfd)
            self._writing = False
        for fd in (self.cfd, self.pipe_r, self.pipe_w):
            os.close(fd)
        self._out.clear()
