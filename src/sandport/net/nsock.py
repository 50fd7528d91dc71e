"""Sockets that live in another network namespace (a container's), made from this process.

A socket belongs to the network namespace its creating thread was in, for its whole life;
reads, writes and connects work from any thread afterwards. So one thread per namespace
enters it once (``setns(2)``; Python 3.11 has no ``os.setns``) and makes sockets on
request; the event loop then connects and relays them like any other. Nothing is created
in the namespace but the sockets themselves.

    sockets = namespace_sockets("/run/netns/app")    # or /proc/<pid>/ns/net
    sock = sockets.socket(socket.AF_INET, socket.SOCK_STREAM)
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import queue
import socket
import threading
from concurrent.futures import Future
from pathlib import Path

from sandport.errors import UsageError

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def netns_path(name_or_pid: str) -> Path:
    """The namespace file of ``name`` (``ip netns add`` names: /run/netns/NAME) or of a
    process (a number: /proc/PID/ns/net, e.g. a container's init).

    Raises:
        UsageError: no such namespace or process.
    """
    text = name_or_pid.strip()
    path = Path(f"/proc/{text}/ns/net") if text.isdigit() else Path("/run/netns") / text
    if "/" in text or not text or not path.exists():
        raise UsageError(f"no network namespace {text!r} ({path} does not exist)",
                         hint="give an `ip netns` name or the PID of a process in it "
                              "(e.g. `docker inspect -f '{{.State.Pid}}' NAME`)")
    return path


class NamespaceSockets:
    """A thread inside one network namespace that makes sockets there."""

    def __init__(self, path: Path) -> None:
        self.path = path
        st = os.stat(path)
        self.identity = (st.st_dev, st.st_ino)  # which namespace the path named then
        self._requests: queue.SimpleQueue[
            tuple[int, int, int, Future[socket.socket]] | None] = queue.SimpleQueue()
        ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True,
                                        name=f"netns {path}")
        self._thread.start()
        ready.result(5)

    def _serve(self, ready: Future[None]) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {self.path}: {os.strerror(err)}")
            finally:
                os.close(fd)
        except OSError as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        while (request := self._requests.get()) is not None:
            family, kind, proto, result = request
            try:
                result.set_result(socket.socket(family, kind, proto))
            except OSError as exc:
                result.set_exception(exc)

    def socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM,
               proto: int = 0) -> socket.socket:
        """A new socket in the namespace (blocking mode: set it as needed)."""
        result: Future[socket.socket] = Future()
        self._requests.put((family, kind, proto, result))
        return result.result(5)

    def close(self) -> None:
        """Stop the thread (the sockets made stay usable)."""
        self._requests.put(None)


async def connect_in_netns(loop: asyncio.AbstractEventLoop, netns: str | Path, host: str,
                           port: int) -> socket.socket:
    """A connected non-blocking TCP socket to ``host:port`` inside the namespace."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = namespace_sockets(netns).socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def same_namespace(a: str | Path, b: str | Path) -> bool:
    """Whether two namespace files (a name's, a PID's; "" for ours) are one namespace."""
    def identity(path: str | Path) -> tuple[int, int]:
        st = os.stat(path or "/proc/self/ns/net")
        return st.st_dev, st.st_ino

    try:
        return identity(a) == identity(b)
    except OSError:
        return str(a) == str(b)


_cache: dict[Path, NamespaceSockets] = {}
_lock = threading.Lock()


def namespace_sockets(path: Path | str) -> NamespaceSockets:
    """The (shared) socket maker of the namespace at ``path``.

    Raises:
        OSError: the namespace cannot be entered (gone, or not a network namespace).
    """
    key = Path(path)
    st = os.stat(key)
    with _lock:
        maker = _cache.get(key)
        if maker is None or not maker._thread.is_alive() or \
                maker.identity != (st.st_dev, st.st_ino):  # the name is another one's now
            if maker is not None:
                maker.close()
            maker = _cache[key] = NamespaceSockets(key)
        return maker
