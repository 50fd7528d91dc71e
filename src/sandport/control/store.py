"""The gateway's store: SQLite in WAL mode under the state directory.

It holds what must survive the gateway: sandbox records (so a restart after a crash finds
and removes what was left behind) and address leases with the pool cursor (so a restart
never hands out an address that is in use). Secrets are not stored here: only token
hashes. The schema is versioned with ``PRAGMA user_version`` and migrated in order.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIGRATIONS: tuple[str, ...] = (
    # 1: sandboxes, leases, meta
    """
    CREATE TABLE sandboxes (
        id TEXT PRIMARY KEY,
        backend TEXT NOT NULL,
        profile TEXT NOT NULL,
        state TEXT NOT NULL,
        ip TEXT NOT NULL,
        prefixlen INTEGER NOT NULL,
        bridge TEXT NOT NULL,
        token_hash TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        info TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE leases (
        address TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        leased_at REAL NOT NULL
    );
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxRecord:
    """A sandbox as the store knows it."""

    id: str
    backend: str
    profile: str
    state: str
    ip: str
    prefixlen: int
    bridge: str
    token_hash: str
    reason: str
    info: dict[str, Any]
    created_at: float
    updated_at: float


class Store:
    """SQLite-backed records; one connection, used from the gateway's event loop thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _migrate(self) -> None:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > len(MIGRATIONS):
            raise RuntimeError(
                f"store {self.path} has schema {version}, newer than this sandport "
                f"({len(MIGRATIONS)}); upgrade sandport or use another --state-dir"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            with self.transaction() as db:
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")

    # sandboxes -----------------------------------------------------------------------

    def add_sandbox(
        self,
        *,
        sandbox_id: str,
        backend: str,
        profile: str,
        state: str,
        ip: str,
        prefixlen: int,
        bridge: str,
        token_hash: str,
    ) -> None:
        """Insert a new sandbox record."""
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO sandboxes (id, backend, profile, state, ip, prefixlen, bridge,"
                " token_hash, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (sandbox_id, backend, profile, state, ip, prefixlen, bridge, token_hash, now,
                 now),
            )

    def set_state(
        self, sandbox_id: str, state: str, *, reason: str = "", info: dict[str, Any] | None = None
    ) -> None:
        """Record a state change (and its reason, and optional details)."""
        with self.transaction() as db:
            if info is None:
                db.execute(
                    "UPDATE sandboxes SET state=?, reason=?, updated_at=? WHERE id=?",
                    (state, reason, time.time(), sandbox_id),
                )
            else:
                db.execute(
                    "UPDATE sandboxes SET state=?, reason=?, info=?, updated_at=? WHERE id=?",
                    (state, reason, json.dumps(info), time.time(), sandbox_id),
                )

    def remove_sandbox(self, sandbox_id: str) -> None:
        """Forget a sandbox and release its lease, in one transaction."""
        with self.transaction() as db:
            row = db.execute("SELECT ip FROM sandboxes WHERE id=?", (sandbox_id,)).fetchone()
            if row is not None:
                db.execute(
                    "DELETE FROM leases WHERE address=? AND owner=?", (row["ip"], sandbox_id)
                )
            db.execute("DELETE FROM sandboxes WHERE id=?", (sandbox_id,))

    def sandboxes(self) -> list[SandboxRecord]:
        """Every sandbox record, oldest first."""
        rows = self._db.execute("SELECT * FROM sandboxes ORDER BY created_at").fetchall()
        return [
            SandboxRecord(**{k: row[k] for k in row.keys() if k != "info"},  # noqa: SIM118
                          info=json.loads(row["info"]))
            for row in rows
        ]

    # leases (sandport.net.pool.LeaseBook) -----------------------------------------------

    def leased_addresses(self) -> set[str]:
        """Every address currently leased."""
        return {row[0] for row in self._db.execute("SELECT address FROM leases")}

    def pool_cursor(self) -> str | None:
        """The last address handed out."""
        row = self._db.execute("SELECT value FROM meta WHERE key='pool_cursor'").fetchone()
        return None if row is None else str(row[0])

    def add_lease(self, address: str, owner: str, cursor: str) -> None:
        """Lease ``address`` to ``owner`` and move the cursor in one transaction."""
        try:
            with self.transaction() as db:
                db.execute(
                    "INSERT INTO leases (address, owner, leased_at) VALUES (?,?,?)",
                    (address, owner, time.time()),
                )
                db.execute(
                    "INSERT INTO meta (key, value) VALUES ('pool_cursor', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                    (cursor,),
                )
        except sqlite3.IntegrityError:
            raise KeyError(address) from None

    def release_lease(self, address: str) -> None:
        """Forget the lease on ``address``."""
        with self.transaction() as db:
            db.execute("DELETE FROM leases WHERE address=?", (address,))

    def lease_owners(self) -> dict[str, str]:
        """address -> owner for every lease."""
        return {row[0]: row[1] for row in self._db.execute("SELECT address, owner FROM leases")}
