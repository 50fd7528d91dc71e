"""What the gateway sets on its own connections to guests (the relay's and the bridge's).

A guest can vanish without a word: its link cut, its VM paused, its host end of the veth
gone. No FIN or RST comes back, so without a bound a connection with data on its way to
the guest waits for the kernel's retransmission limit (``tcp_retries2``: about 15
minutes) while its client hangs. ``TCP_USER_TIMEOUT`` (RFC 5482 §3.2; Linux: ``tcp(7)``)
bounds how long sent data may stay unacknowledged, zero-window probes included: after
the guest timeout (:data:`DEFAULT_GUEST_TIMEOUT`, ``sandport up --guest-timeout``) the
kernel aborts the connection with ``ETIMEDOUT``, and the
relay resets its client (counted as ``reset``) or the bridge closes its session (1011,
"the target connection failed: Connection timed out"). A guest that stops reading for as
long is cut the same way. An idle connection sends nothing and is not affected.

Owns: that option and its value. Must not touch: the sockets' data paths.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Final

__all__ = ["DEFAULT_GUEST_TIMEOUT", "bound_upstream"]

#: Seconds data to a guest may stay unacknowledged before the connection is given up: the
#: default of nginx's ``proxy_send_timeout``, the same bound on a guest that takes nothing.
DEFAULT_GUEST_TIMEOUT: Final = 60.0


def bound_upstream(sock: socket.socket, seconds: float = DEFAULT_GUEST_TIMEOUT) -> None:
    """Give up ``sock`` (a TCP connection to a guest) after ``seconds`` of unacknowledged
    data; nothing for other sockets (a unix socket target)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, int(seconds * 1000)))
