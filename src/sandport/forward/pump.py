"""One direction of a relayed TCP connection: the data path of the userspace relay.

Owns :class:`_Pump` (source socket → destination, through a pipe taken from the process's
:data:`~sandport.net.splice.PIPES` pool while bytes are in flight, or through the thread's
shared copy buffer; backpressure, the PROXY prefix, passing FIN on) and the per-read
constants (:data:`COPY_CHUNK`, :data:`READS_PER_WAKEUP`, :data:`SPLICE_AFTER`). This is the
hot path: every name it uses per read is a module global or a slot. It must not touch the
link's sockets' lifetime (the :class:`~sandport.forward.link._Link` closes them), the
listener or the counters of the forward; it reports to its link (``fell_back``,
``failed``, ``fin_passed``, ``pump_drained``, ``out_of_pipes``).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING

from sandport.net.splice import PIPES, SPLICE_FLAGS

if TYPE_CHECKING:
    from sandport.forward.link import _Link

__all__ = ["COPY_CHUNK", "READS_PER_WAKEUP", "SPLICE_AFTER", "shared_buffer"]

#: Same logger as before the split (``sandport.forward.tcp``): one name for the relay's log.
log = logging.getLogger("sandport.forward.tcp")

KiB = 1024
#: Size of the copy path's shared read buffer: the most one ``recv`` reads.
COPY_CHUNK = 256 * KiB
#: Reads one readiness callback may do before yielding to other connections.
READS_PER_WAKEUP = 4
#: Bytes a direction copies before it asks the pool for a pipe: short exchanges (a request,
#: a reply, a banner) never take one; bulk transfers move on to splice.
SPLICE_AFTER = 64 * KiB

_monotonic = time.monotonic
_take_pipe = PIPES.take
_give_pipe = PIPES.give
_EMFILE = (errno.EMFILE, errno.ENFILE)

_shared = threading.local()


def shared_buffer() -> memoryview:
    """The calling thread's copy buffer (:data:`COPY_CHUNK` bytes), shared by every pump of
    the event loop running there: a read goes in, is sent on at once, and only what the
    destination did not take is copied out into the pump."""
    buf: memoryview | None = getattr(_shared, "buf", None)
    if buf is None:
        buf = _shared.buf = memoryview(bytearray(COPY_CHUNK))
    return buf


class _Pump:
    """One direction of a relayed connection: source socket → destination.

    Reads only while nothing is pending, so at most one read is ever held; when the
    destination would block, reading stops until it is writable again. Between reads an
    idle direction holds neither a pipe nor a buffer.
    """

    __slots__ = (
        "buf",
        "capacity",
        "dfd",
        "draining",
        "dst",
        "eof",
        "fin_sent",
        "link",
        "loop",
        "may_splice",
        "nbytes",
        "off",
        "pending",
        "pipe",
        "pipe_r",
        "pipe_w",
        "prefix",
        "reading",
        "rest",
        "sfd",
        "side",
        "src",
        "starved",
        "writing",
    )

    def __init__(
        self, link: _Link, src: socket.socket, dst: socket.socket, side: str, prefix: bytes
    ) -> None:
        self.link = link
        self.loop = link.loop
        self.src, self.dst = src, dst
        self.sfd, self.dfd = src.fileno(), dst.fileno()
        #: ``up`` (client → upstream) or ``down`` (upstream → client), for logs.
        self.side = side
        #: Bytes to write before anything read from the source (the PROXY header).
        self.prefix = prefix
        #: Whether this direction may take a pipe once it moved :data:`SPLICE_AFTER` bytes.
        self.may_splice = False
        #: The pipe taken from the pool while bytes are in flight (``-1``: none).
        self.pipe: tuple[int, int, int] | None = None
        self.pipe_r = self.pipe_w = -1
        self.capacity = COPY_CHUNK
        #: The thread's shared read buffer (not this pump's memory).
        self.buf = shared_buffer()
        #: What the destination did not take of the last copied read, and its offset.
        self.rest: bytes | None = None
        self.off = 0
        #: Bytes read from the source and not yet written (in the pipe or ``rest``).
        self.pending = 0
        #: Bytes read from the source.
        self.nbytes = 0
        #: The pool had no pipe the last time this direction asked (counted once).
        self.starved = False
        self.eof = False
        self.fin_sent = False
        self.draining = False
        self.reading = False
        self.writing = False

    # -- set-up -----------------------------------------------------------------------------

    def use_splice(self) -> None:
        """Take a pipe from the pool once bulk data flows (the default is to copy)."""
        self.may_splice = True

    def use_copy(self) -> None:
        """Relay with recv/send through the shared buffer from now on (nothing pending)."""
        self.may_splice = False
        self._put_pipe()

    def start(self) -> None:
        """Write the prefix, then start reading the source."""
        if self._flush():
            self._want_read()

    # -- the pipe ---------------------------------------------------------------------------

    def _get_pipe(self) -> bool:
        """Take a pipe from the pool; False (and copy this read) when none is to be had."""
        try:
            pipe = _take_pipe()
        except OSError as exc:
            pipe = None
            if not self.starved and exc.errno in _EMFILE:
                self.link.out_of_pipes(exc)
        if pipe is None:
            if not self.starved:
                self.starved = True
                self.link.fell_back(None)
            return False
        self.starved = False
        self.pipe = pipe
        self.pipe_r, self.pipe_w, self.capacity = pipe
        return True

    def _put_pipe(self) -> None:
        """Give the (empty) pipe back to the pool."""
        pipe = self.pipe
        if pipe is not None:
            self.pipe = None
            self.pipe_r = self.pipe_w = -1
            self.capacity = COPY_CHUNK
            _give_pipe(pipe)

    # -- readiness callbacks ----------------------------------------------------------------

    def _on_readable(self) -> None:
        link = self.link
        for _ in range(READS_PER_WAKEUP):
            if self.pipe_w < 0 and self.may_splice and self.nbytes >= SPLICE_AFTER:
                self._get_pipe()
            try:
                if self.pipe_w >= 0:
                    n = os.splice(self.sfd, self.pipe_w, self.capacity, flags=SPLICE_FLAGS)
                else:
                    n = self.src.recv_into(self.buf)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EINVAL and self.pipe_w >= 0:
                    self.link.fell_back(f"splice refused the {self.side} direction: {exc}")
                    self.use_copy()  # nothing was moved: the pipe is still empty
                    continue
                link.failed(self, exc, "reading")
                return
            if n == 0:
                self._put_pipe()
                self._got_eof()
                return
            self.nbytes += n
            self.pending = n
            link.last_activity = _monotonic()
            if self.pipe_w < 0:
                if not self._send_copied(n):
                    return
            elif not self._flush():
                return
        if self.pipe is not None:
            self._put_pipe()

    def _on_writable(self) -> None:
        if not self._flush():
            return
        self._put_pipe()
        if self.eof:
            self._send_fin()
        elif self.draining:
            self.link.pump_drained()
        else:
            self._want_read()

    # -- moving bytes -----------------------------------------------------------------------

    def _send_copied(self, n: int) -> bool:
        """Send the ``n`` bytes just read into the shared buffer; keep what the destination
        did not take (False: it would block, writing waits for it)."""
        try:
            k = self.dst.send(self.buf[:n])
        except BlockingIOError:
            k = 0
        except OSError as exc:
            self.link.failed(self, exc, "writing")
            return False
        if k == n:
            self.pending = 0
            return True
        self.rest = bytes(self.buf[k:n])
        self.off = 0
        self.pending = n - k
        self._stop_read()
        self._want_write()
        return False

    def _flush(self) -> bool:
        """Write the prefix and everything pending; False when the destination would block.

        Registers for writability when it would block, and stops reading meanwhile.
        """
        try:
            while self.prefix:
                k = self.dst.send(self.prefix)
                self.prefix = self.prefix[k:]
            while self.pending:
                if self.pipe_r >= 0:
                    k = os.splice(self.pipe_r, self.dfd, self.pending, flags=SPLICE_FLAGS)
                else:
                    assert self.rest is not None
                    k = self.dst.send(memoryview(self.rest)[self.off : self.off + self.pending])
                    self.off += k
                if k <= 0:  # pragma: no cover - a TCP socket never accepts 0 bytes
                    raise BlockingIOError
                self.pending -= k
        except BlockingIOError:
            self._stop_read()
            self._want_write()
            return False
        except OSError as exc:
            self.link.failed(self, exc, "writing")
            return False
        self.rest = None
        self._stop_write()
        return True

    def _got_eof(self) -> None:
        self.eof = True
        self._stop_read()
        if not self.pending and not self.prefix:
            self._send_fin()

    def _send_fin(self) -> None:
        if self.fin_sent:
            return
        self.fin_sent = True
        if self.link.fin_passed(self):
            return  # both directions are done: close() sends this FIN
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError as exc:  # the peer is gone already; its own pump reports that
            log.debug("%s: FIN %s: %s", self.link.cid, self.side, exc)

    # -- registration -----------------------------------------------------------------------

    def _want_read(self) -> None:
        if not self.reading and not self.eof and not self.draining:
            self.reading = True
            self.loop.add_reader(self.sfd, self._on_readable)

    def _stop_read(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.sfd)

    def _want_write(self) -> None:
        if not self.writing:
            self.writing = True
            self.loop.add_writer(self.dfd, self._on_writable)

    def _stop_write(self) -> None:
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.dfd)

    # -- ending -----------------------------------------------------------------------------

    def drain(self) -> bool:
        """Stop reading; True when nothing is left to write (else the writer finishes it)."""
        self.draining = True
        self._stop_read()
        return not self.pending and not self.prefix

    def held(self) -> int:
        """Bytes read and not yet written, plus an unsent prefix."""
        return self.pending + len(self.prefix)

    def holds_pipe(self) -> bool:
        """Whether this direction has a pipe of the pool now."""
        return self.pipe is not None

    def close(self) -> None:
        """Unregister from the loop and release the pipe (the link closes the sockets).

        A pipe that still holds bytes is closed, never given back for another connection.
        """
        self._stop_read()
        self._stop_write()
        pipe = self.pipe
        if pipe is not None:
            self.pipe = None
            self.pipe_r = self.pipe_w = -1
            if self.pending:
                PIPES.discard(pipe)
            else:
                _give_pipe(pipe)
        self.rest = None
        self.pending = 0
