"""What every userspace forward shares: addresses, its target, and the lifecycle plumbing.

:class:`Forward` holds the name, the target new connections or flows go to, and the
closing flag, and gives ``async with`` over the subclass's ``start()``/``stop()``. The TCP
and UDP relays differ only in their data paths.
"""

from __future__ import annotations

import errno
import logging
from typing import Self

log = logging.getLogger(__name__)

MAX_PORT = 65535


def format_addr(host: str, port: int) -> str:
    """Return ``host:port``, with brackets around an IPv6 literal."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_ports(listen_port: int, target_port: int) -> None:
    """Check a forward spec's ports: listen 0 (ephemeral) to 65535, target 1 to 65535.

    Raises:
        ValueError: naming the port that is out of range.
    """
    if not 0 <= listen_port <= MAX_PORT:
        raise ValueError(f"listen_port {listen_port} is not in 0..{MAX_PORT}")
    if not 1 <= target_port <= MAX_PORT:
        raise ValueError(f"target_port {target_port} is not in 1..{MAX_PORT}")


class PortInUse(OSError):
    """The host port of a forward is already bound by someone else (``EADDRINUSE``).

    Attributes:
        host: The listen address that was requested.
        port: The port that was requested.
    """

    def __init__(self, host: str, port: int) -> None:
        """Build the error for ``host:port``.

        Args:
            host: The listen address that was requested.
            port: The port that was requested.
        """
        self.message = f"host port {format_addr(host, port)} is already in use"
        super().__init__(errno.EADDRINUSE, self.message)
        self.host = host
        self.port = port

    def __str__(self) -> str:
        """Return the plain message, without the ``[Errno 98]`` prefix."""
        return self.message

    def __reduce__(self) -> tuple[type[PortInUse], tuple[str, int]]:
        """Pickle by constructor arguments (OSError's default would pass errno, strerror)."""
        return (type(self), (self.host, self.port))


class Forward:
    """Base of :class:`~sandport.forward.tcp.TcpForward` and the UDP relay.

    Subclasses implement ``start()`` and ``stop()`` and set ``_closing`` when stopping.
    """

    def __init__(self, *, name: str, target: tuple[str, int]) -> None:
        self._label = name
        self._target = target
        self._closing = False

    async def start(self) -> None:
        """Bind the listener."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Close the listener and everything relayed."""
        raise NotImplementedError

    @property
    def name(self) -> str:
        """Label used in logs and connection or flow ids."""
        return self._label

    @property
    def target(self) -> tuple[str, int]:
        """``(host, port)`` that new connections or flows are relayed to."""
        return self._target

    @target.setter
    def target(self, value: tuple[str, int]) -> None:
        self.retarget(*value)

    @property
    def closing(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._closing

    def retarget(self, host: str, port: int) -> None:
        """Relay what arrives from now on to ``host:port``; what is live stays where it is.

        Raises:
            ValueError: ``port`` is out of range.
        """
        if not 1 <= port <= MAX_PORT:
            raise ValueError(f"target port {port} is not in 1..{MAX_PORT}")
        old, self._target = self._target, (host, port)
        log.info("%s: target %s -> %s", self._label, format_addr(*old), format_addr(host, port))

    async def __aenter__(self) -> Self:
        """Start the forward and return it."""
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Stop the forward."""
        await self.stop()
