"""Failed VNC logins per client address: after a few, that address waits.

Every desktop session reaches the guest's VNC server from the gateway's own address, so
the server's own blacklist (TigerVNC's ``-BlacklistThreshold``) cannot tell one client
from another, and sandport relaxes it so that one guesser does not lock everybody out.
The bridge sees each handshake pass (:class:`~sandport.proto.rfbwatch.RfbWatch`) and
knows the real client (PROXY protocol, a trusted proxy's ``X-Forwarded-For``), so it
counts the failures here, by a key the bridge gives (the client's address and the
sandbox: one guesser does not lock that client out of other desktops): ``failures``
refused handshakes of one key within ``window`` seconds block it for ``block`` seconds
(doubling while it goes on, up to ``max_block``); a handshake that succeeds clears its
count. The table is bounded (``max_clients``: the oldest entry goes first).

Owns: the counts. Must not touch: sockets, clocks (``now`` is passed in).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


def login_key(ip: str, sandbox: str) -> str:
    """What failed logins are counted by: the client's address and the sandbox. The bridge
    and the TCP relay (:mod:`sandport.forward.rfbgate`) use the same key, so failures
    through either add up."""
    return f"{ip} {sandbox}"


@dataclass(slots=True)
class _Client:
    failed: list[float] = field(default_factory=list)  # times of recent failures
    blocked_until: float = 0.0
    blocks: int = 0  # blocks in a row (each one doubles the next)


@dataclass(frozen=True, slots=True, kw_only=True)
class ThrottleConfig:
    """How many failed logins an address may have, and what follows.

    Attributes:
        failures: refused handshakes within ``window`` that block the address.
        window: seconds the failures are counted over.
        block: seconds the first block lasts; each block in a row doubles it.
        max_block: the longest block.
        max_clients: addresses tracked at once (the oldest is forgotten first).
    """

    failures: int = 5
    window: float = 300.0
    block: float = 60.0
    max_block: float = 900.0
    max_clients: int = 10_000


class LoginThrottle:
    """Failed logins by client address (see the module)."""

    def __init__(self, config: ThrottleConfig) -> None:
        self.config = config
        self._clients: OrderedDict[str, _Client] = OrderedDict()

    def retry_after(self, addr: str, now: float) -> float:
        """Seconds ``addr`` must still wait (0: it may try)."""
        client = self._clients.get(addr)
        if client is None or client.blocked_until <= now:
            return 0.0
        return client.blocked_until - now

    def failed(self, addr: str, now: float) -> float:
        """Record a refused handshake of ``addr``; the block it starts (0: none)."""
        cfg = self.config
        client = self._clients.pop(addr, None) or _Client()
        self._clients[addr] = client  # most recent last
        while len(self._clients) > cfg.max_clients:
            self._clients.popitem(last=False)
        client.failed = [t for t in client.failed if now - t < cfg.window] + [now]
        if len(client.failed) < cfg.failures:
            return 0.0
        client.failed.clear()
        block = float(min(cfg.max_block, cfg.block * 2.0 ** client.blocks))
        client.blocks += 1
        client.blocked_until = now + block
        return block

    def succeeded(self, addr: str) -> None:
        """A handshake of ``addr`` succeeded: its count starts again."""
        self._clients.pop(addr, None)
