"""Configuration and counters of the userspace TCP relay: spec, stats, failure reasons.

Owns :class:`TcpForwardSpec` (validated once, before any socket exists),
:class:`TcpForwardStats` (a snapshot), :class:`FailureReason` and the mapping of a failed
upstream connect to one, plus the spec-level constants (:data:`DATA_PATHS`,
:data:`IDLE_SWEEP_MAX`). Pure data and checks: must not touch sockets, the event loop or
the data path (those live in :mod:`sandport.forward.pump`, :mod:`sandport.forward.link` and
:mod:`sandport.forward.tcp`). Importers use :mod:`sandport.forward.tcp`, which re-exports
these names.
"""

from __future__ import annotations

import enum
import errno
import re
from dataclasses import dataclass, field
from typing import Final

from sandport.forward.base import check_ports
from sandport.net.splice import SPLICE_AVAILABLE
from sandport.net.upstream import DEFAULT_GUEST_TIMEOUT

__all__ = [
    "CONNECT_FAILURES",
    "DATA_PATHS",
    "IDLE_SWEEP_MAX",
    "FailureReason",
    "TcpForwardSpec",
    "TcpForwardStats",
]

#: Longest interval between two idle sweeps (shorter for short idle timeouts: ``idle / 4``).
IDLE_SWEEP_MAX = 1.0
#: Data paths a spec may ask for; ``auto`` is ``splice`` where the platform has it.
DATA_PATHS: Final = ("auto", "splice", "copy")

_PROXY_VERSIONS: Final = (1, 2)


class FailureReason(enum.StrEnum):
    """Why a connection failed or was ended by the relay: the keys of ``failures``."""

    #: Upstream connect answered with RST (``ECONNREFUSED``).
    REFUSED = "refused"
    #: Upstream connect failed otherwise (``EHOSTUNREACH``, ``ENETUNREACH``, name lookup...).
    UNREACHABLE = "unreachable"
    #: No upstream handshake within ``connect_timeout`` (or ``ETIMEDOUT``).
    TIMEOUT = "timeout"
    #: Rejected because ``max_connections`` connections were active.
    LIMIT = "limit"
    #: Closed after ``idle_timeout`` seconds without a byte in either direction.
    IDLE = "idle"
    #: A relayed connection ended because one side failed (RST, write error).
    RESET = "reset"
    #: The relay was out of file descriptors (``EMFILE``/``ENFILE``): the client was reset
    #: at accept, or its upstream socket could not be made.
    DESCRIPTORS = "descriptors"


#: Reasons that count as a failed upstream connect (``failed_connects``).
CONNECT_FAILURES: Final = (FailureReason.REFUSED, FailureReason.UNREACHABLE, FailureReason.TIMEOUT)
_ERRNO_REASONS: Final = {
    errno.ECONNREFUSED: FailureReason.REFUSED,
    errno.EHOSTUNREACH: FailureReason.UNREACHABLE,
    errno.ENETUNREACH: FailureReason.UNREACHABLE,
    errno.ETIMEDOUT: FailureReason.TIMEOUT,
    errno.EMFILE: FailureReason.DESCRIPTORS,
    errno.ENFILE: FailureReason.DESCRIPTORS,
}
#: Several failed addresses of one name are reported as a single OSError without errno
#: ("Multiple exceptions: [Errno 111] ..., [Errno 111] ..."); the errnos are in its text.
_ERRNO_IN_TEXT: Final = re.compile(r"\[Errno (\d+)\]")


def _connect_failure_reason(exc: OSError) -> FailureReason:
    """Map a failed upstream connect to a :class:`FailureReason`."""
    if exc.errno is not None:
        return _ERRNO_REASONS.get(exc.errno, FailureReason.UNREACHABLE)
    reasons = {
        _ERRNO_REASONS.get(int(n), FailureReason.UNREACHABLE)
        for n in _ERRNO_IN_TEXT.findall(str(exc))
    }
    return reasons.pop() if len(reasons) == 1 else FailureReason.UNREACHABLE


def _zero_failures() -> dict[str, int]:
    return dict.fromkeys((r.value for r in FailureReason), 0)


@dataclass(frozen=True, slots=True, kw_only=True)
class TcpForwardSpec:
    """What to listen on and where to relay to.

    Attributes:
        listen_host: Host address to bind (a name binds every address it resolves to).
        listen_port: Host port to bind; 0 picks an ephemeral port (see
            :attr:`TcpForward.bound_port`).
        target_host: Address (or name) of the target service for new connections.
        target_port: Port of the target service.
        connect_timeout: Seconds allowed for the upstream TCP handshake.
        name: Label used in log lines and connection ids; defaults to ``tcp:<bound port>``.
        idle_timeout: Seconds without a byte in either direction after which a relayed
            connection is closed (counted as ``idle``); ``None``: never.
        max_connections: Most connections active at once; further clients are reset at
            accept (counted as ``limit``); ``None``: no limit.
        proxy_protocol: Send a PROXY protocol header of this version (1 or 2) to the
            upstream before any client byte; ``None``: send none.
        data_path: ``splice`` (zero-copy through a pipe), ``copy`` (recv/send) or ``auto``
            (splice where the platform has it).
        netns: the network namespace (its file: /run/netns/NAME, /proc/PID/ns/net) the
            target lives in, a container's; upstream sockets are made there. "": ours.
        guest_timeout: Seconds data sent upstream may stay unacknowledged (a guest gone
            without a word, or one that reads nothing) before the connection is reset
            (``TCP_USER_TIMEOUT``; :mod:`sandport.net.upstream`).
    """

    listen_host: str = "127.0.0.1"
    listen_port: int
    target_host: str
    target_port: int
    connect_timeout: float = 5.0
    name: str = ""
    idle_timeout: float | None = None
    max_connections: int | None = None
    proxy_protocol: int | None = None
    data_path: str = "auto"
    netns: str = ""
    guest_timeout: float = DEFAULT_GUEST_TIMEOUT

    def __post_init__(self) -> None:
        """Check ranges once, so bad configuration fails before any socket exists.

        Raises:
            ValueError: A port is out of range, a timeout is not positive, the connection
                limit is below 1, the PROXY protocol version is not 1 or 2, or the data path
                is unknown or not available here.
        """
        check_ports(self.listen_port, self.target_port)
        if not self.connect_timeout > 0:
            raise ValueError(f"connect_timeout must be > 0, not {self.connect_timeout}")
        if self.idle_timeout is not None and not self.idle_timeout > 0:
            raise ValueError(f"idle_timeout must be > 0 or None, not {self.idle_timeout}")
        if not self.guest_timeout > 0:
            raise ValueError(f"guest_timeout must be > 0, not {self.guest_timeout}")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1 or None, not {self.max_connections}")
        if self.proxy_protocol is not None and self.proxy_protocol not in _PROXY_VERSIONS:
            raise ValueError(f"proxy_protocol must be 1, 2 or None, not {self.proxy_protocol}")
        if self.data_path not in DATA_PATHS:
            raise ValueError(f"data_path must be one of {', '.join(DATA_PATHS)}, "
                             f"not {self.data_path!r}")
        if self.data_path == "splice" and not SPLICE_AVAILABLE:
            raise ValueError("data_path 'splice' needs os.splice (Linux, Python >= 3.10)")

    @property
    def idle_sweep_interval(self) -> float | None:
        """Seconds between idle sweeps: ``min(IDLE_SWEEP_MAX, idle_timeout / 4)``, or None."""
        if self.idle_timeout is None:
            return None
        return min(IDLE_SWEEP_MAX, self.idle_timeout / 4)

    @property
    def splice(self) -> bool:
        """Whether connections start on the splice data path."""
        return self.data_path != "copy" and SPLICE_AVAILABLE


@dataclass(frozen=True, slots=True, kw_only=True)
class TcpForwardStats:
    """A snapshot of a forward's counters.

    Attributes:
        active: Connections accepted and not yet fully closed (including ones still
            connecting upstream).
        total: Connections accepted since start.
        bytes_up: Bytes received from clients and passed on to targets.
        bytes_down: Bytes received from targets and passed on to clients.
        failed_connects: Upstream connects that failed: the sum of ``failures`` for
            ``refused``, ``unreachable`` and ``timeout``.
        buffered: Bytes the relay currently holds (in pipes or copy remainders) because a
            destination could not take them yet. Bounded by backpressure: at most one
            read per direction of each connection.
        fallbacks: Times a direction of a spliced connection copied instead: the pipe pool
            was empty (counted once until it gets a pipe again), the kernel refused a
            pipe, or refused splice for that socket (then for good).
        pipes: Pipes of the process's pool this forward's connections hold now: one per
            direction with bytes in flight on the splice path; an idle connection holds
            none.
        failures: Count per :class:`FailureReason` value (every key present).
    """

    active: int
    total: int
    bytes_up: int
    bytes_down: int
    failed_connects: int
    buffered: int
    fallbacks: int = 0
    pipes: int = 0
    failures: dict[str, int] = field(default_factory=_zero_failures)
