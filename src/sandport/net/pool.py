"""The sandbox address pool.

Addresses are handed out round-robin from a persisted cursor, so an address freed a moment
ago is the last to come back (stale ARP entries and half-open connections elsewhere then
point at nothing rather than at a new sandbox), and a leased address is never handed out
twice, across restarts too: leases and the cursor live in the store (:class:`LeaseBook`).
"""

from __future__ import annotations

import ipaddress
from typing import Protocol

from sandport.errors import SandportError


class PoolExhausted(SandportError):
    """Every address of the subnet is leased."""


class LeaseBook(Protocol):
    """Persistent lease records; :class:`sandport.control.store.SqliteStore` implements it."""

    def leased_addresses(self) -> set[str]:
        """Every address currently leased."""
        ...

    def pool_cursor(self) -> str | None:
        """The last address handed out, or None."""
        ...

    def add_lease(self, address: str, owner: str, cursor: str) -> None:
        """Record ``address`` as leased by ``owner`` and move the cursor, atomically.

        Raises:
            KeyError: if the address is already leased (a concurrent allocation).
        """
        ...

    def release_lease(self, address: str) -> None:
        """Forget the lease on ``address`` (no error if there is none)."""
        ...


class AddressPool:
    """Leases sandbox addresses from a subnet; the first host address is the gateway's."""

    def __init__(self, subnet: ipaddress.IPv4Network, book: LeaseBook) -> None:
        self.subnet = subnet
        self.gateway = subnet.network_address + 1
        self._book = book
        self._first = int(self.gateway) + 1
        self._last = int(subnet.broadcast_address) - 1

    @property
    def size(self) -> int:
        """How many sandbox addresses the subnet holds."""
        return self._last - self._first + 1

    def lease(self, owner: str) -> ipaddress.IPv4Address:
        """Lease the next free address after the cursor to ``owner``.

        Raises:
            PoolExhausted: when every address is leased.
        """
        leased = self._book.leased_addresses()
        cursor = self._book.pool_cursor()
        start = self._first
        if cursor is not None:
            c = int(ipaddress.IPv4Address(cursor))
            if self._first <= c <= self._last:
                start = c + 1
        for i in range(self.size):
            candidate = self._first + (start - self._first + i) % self.size
            address = str(ipaddress.IPv4Address(candidate))
            if address not in leased:
                self._book.add_lease(address, owner, address)
                return ipaddress.IPv4Address(candidate)
        raise PoolExhausted(
            f"all {self.size} addresses of {self.subnet} are leased",
            hint="destroy sandboxes you no longer need or configure a larger --subnet",
        )

    def release(self, address: ipaddress.IPv4Address | str) -> None:
        """Return ``address`` to the pool."""
        self._book.release_lease(str(address))
