"""One direction of a relayed TCP connection: the data path of the userspace relay.

Owns :class:`_Pump` (source socket → pipe via ``splice(2)``, or a copy buffer → destination;
backpressure, the PROXY prefix, passing FIN on) and the per-read constants
(:data:`COPY_CHUNK`, :data:`READS_PER_WAKEUP`). This is the hot path: every name it uses per
read is a module global or a slot. It must not touch the link's sockets' lifetime (the
:class:`~sandport.forward.link._Link` closes them), the listener or the counters of the
forward; it reports to its link (``fell_back``, ``failed``, ``fin_passed``, ``pump_drained``).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from typing import TYPE_CHECKING

from sandport.net.splice import SPLICE_FLAGS, open_pipe

if TYPE_CHECKING:
    from sandport.forward.link import _Link

__all__ = ["COPY_CHUNK", "READS_PER_WAKEUP"]

#: Same logger as before the split (``sandport.forward.tcp``): one name for the relay's log.
log = logging.getLogger("sandport.forward.tcp")

KiB = 1024
#: Buffer per direction of the copy data path: the most one ``recv`` holds.
COPY_CHUNK = 256 * KiB
#: Reads one readiness callback may do before yielding to other connections.
READS_PER_WAKEUP = 4

_monotonic = time.monotonic


class _Pump:
    """One direction of a relayed connection: source socket → pipe (or buffer) → destination.

    Reads only while nothing is pending, so at most one read is ever held; when the
    destination would block, reading stops until it is writable again.
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
        "nbytes",
        "off",
        "pending",
        "pipe_r",
        "pipe_w",
        "prefix",
        "reading",
        "sfd",
        "side",
        "src",
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
        self.pipe_r = self.pipe_w = -1
        self.buf: memoryview | None = None
        self.capacity = COPY_CHUNK
        #: Bytes read from the source and not yet written (in the pipe or the buffer).
        self.pending = 0
        #: Offset of the pending bytes in the copy buffer.
        self.off = 0
        #: Bytes read from the source.
        self.nbytes = 0
        self.eof = False
        self.fin_sent = False
        self.draining = False
        self.reading = False
        self.writing = False

    # -- set-up -----------------------------------------------------------------------------

    def open_pipe(self) -> OSError | None:
        """Take a pipe for splice; the error when the kernel refuses one (the caller then
        puts the connection on the copy path with :meth:`use_copy`)."""
        try:
            self.pipe_r, self.pipe_w, self.capacity = open_pipe()
        except OSError as exc:
            return exc
        return None

    def use_copy(self) -> None:
        """Relay with recv/send through a buffer; give back the pipe if one was taken."""
        self._close_pipe()
        self.buf = memoryview(bytearray(COPY_CHUNK))
        self.capacity = COPY_CHUNK

    def _close_pipe(self) -> None:
        for fd in (self.pipe_r, self.pipe_w):
            if fd >= 0:
                os.close(fd)
        self.pipe_r = self.pipe_w = -1

    def start(self) -> None:
        """Write the prefix, then start reading the source."""
        if self._flush():
            self._want_read()

    # -- readiness callbacks ----------------------------------------------------------------

    def _on_readable(self) -> None:
        link = self.link
        for _ in range(READS_PER_WAKEUP):
            try:
                if self.pipe_w >= 0:
                    n = os.splice(self.sfd, self.pipe_w, self.capacity, flags=SPLICE_FLAGS)
                else:
                    assert self.buf is not None
                    n = self.src.recv_into(self.buf)
                    self.off = 0
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EINVAL and self.pipe_w >= 0 and self.pending == 0:
                    link.fell_back(f"splice refused the {self.side} direction: {exc}")
                    self.use_copy()
                    continue
                link.failed(self, exc, "reading")
                return
            if n == 0:
                self._got_eof()
                return
            self.nbytes += n
            self.pending = n
            link.last_activity = _monotonic()
            if not self._flush():
                return

    def _on_writable(self) -> None:
        if not self._flush():
            return
        if self.eof:
            self._send_fin()
        elif self.draining:
            self.link.pump_drained()
        else:
            self._want_read()

    # -- moving bytes -----------------------------------------------------------------------

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
                    assert self.buf is not None
                    k = self.dst.send(self.buf[self.off : self.off + self.pending])
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
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError as exc:  # the peer is gone already; its own pump reports that
            log.debug("%s: FIN %s: %s", self.link.cid, self.side, exc)
        self.link.fin_passed()

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

    def close(self) -> None:
        """Unregister from the loop and release the pipe (the link closes the sockets)."""
        self._stop_read()
        self._stop_write()
        self._close_pipe()
        self.buf = None
        self.pending = 0

