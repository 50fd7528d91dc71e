"""Tell the event loop when this network namespace's links or IPv4 addresses change.

Kernel forwards on ``0.0.0.0`` need ``forwarding`` on the interfaces remote clients arrive
on (:func:`sandport.net.nft.ingress_interfaces`); an interface that comes up later (a
VPN's, a hot-plugged NIC's, an address added by DHCP) needs it too, and one that loses its
address needs it no more. :class:`AddressWatch` is a netlink socket subscribed to the
kernel's link and IPv4 address notifications (``RTMGRP_LINK``, ``RTMGRP_IPV4_IFADDR``):
the loop reads it when the kernel says something changed and calls back; what changed is
read again by the caller (the messages are not parsed: a burst of them, or a lost one
when the socket's buffer overflowed, ends in the same single call).

Owns: its socket. Must not touch: any setting or rule (the caller decides).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)

#: rtnetlink multicast groups (linux/rtnetlink.h).
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10


class AddressWatch:
    """Calls ``changed`` (on the loop) after links or IPv4 addresses change, once per
    burst: ``settle`` seconds after the last notification of the burst."""

    def __init__(self, changed: Callable[[], None], *, settle: float = 0.2) -> None:
        self._changed = changed
        self._settle = settle
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: asyncio.TimerHandle | None = None

    @property
    def running(self) -> bool:
        return self._sock is not None

    def start(self) -> None:
        """Subscribe (on the running loop); a no-op when it already runs."""
        if self._sock is not None:
            return
        self._loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                             socket.NETLINK_ROUTE)
        try:
            sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR))
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._readable)
        log.debug("watching links and addresses for kernel forwards on 0.0.0.0")

    def close(self) -> None:
        """Unsubscribe; a pending call is dropped."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
        self._sock = None

    def _readable(self) -> None:
        assert self._sock is not None
        assert self._loop is not None
        while True:  # drain: what changed is read again by the caller, not parsed here
            try:
                if not self._sock.recv(65536):
                    break
            except BlockingIOError:
                break
            except OSError as exc:  # ENOBUFS: notifications were lost; look again anyway
                log.debug("address watch: %s", exc)
                break
        if self._pending is not None:
            self._pending.cancel()
        self._pending = self._loop.call_later(self._settle, self._fire)

    def _fire(self) -> None:
        self._pending = None
        self._changed()
