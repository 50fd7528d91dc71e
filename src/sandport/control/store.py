"""The gateway's store: what must survive the gateway, behind one interface.

:class:`StateStore` is the interface; :class:`SqliteStore` implements it with SQLite in WAL
mode under the state directory (a PostgreSQL store for several hosts sharing one state
would implement the same interface; none is written yet). It holds sandbox records (so a
restart adopts what still runs and removes the rest), address leases with the pool cursor
(never a second lease of an address in use), forwards and access tokens (back after a
restart), sessions, credentials and the event log. Every change is one transaction.

Secrets are never stored in the clear: tokens as SHA-256 (:mod:`sandport.control.tokens`),
sandbox secrets and credentials sealed with the gateway's key
(:mod:`sandport.control.secretbox`), which lives outside the database. The schema is
versioned with ``PRAGMA user_version`` and migrated in order at open.

Owns: the schema, its migrations and every read and write of the database. Must not
touch: anything live (sandboxes, timers, sockets); it keeps records, it decides nothing.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

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
    # 2: sealed sandbox secrets and the agent token; forwards, grants, sessions,
    #    credentials and events
    """
    ALTER TABLE sandboxes ADD COLUMN agent_token_hash TEXT NOT NULL DEFAULT '';
    ALTER TABLE sandboxes ADD COLUMN secrets TEXT NOT NULL DEFAULT '';
    CREATE TABLE forwards (
        id TEXT PRIMARY KEY,
        sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        host_ip TEXT NOT NULL,
        host_port INTEGER NOT NULL,
        guest_port INTEGER NOT NULL,
        protocol TEXT NOT NULL,
        options TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE grants (
        id TEXT PRIMARY KEY,
        sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
        token_hash TEXT NOT NULL,
        expires_at REAL NOT NULL,
        scope TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
        state TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        credential_id TEXT,
        expires_at REAL NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE credentials (
        id TEXT PRIMARY KEY,
        sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
        session_id TEXT,
        sealed TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        kind TEXT NOT NULL,
        sandbox_id TEXT NOT NULL DEFAULT '',
        data TEXT NOT NULL
    );
    CREATE INDEX events_sandbox ON events (sandbox_id, seq);
    """,
)

#: The event log keeps this many of the newest events.
EVENTS_KEPT = 10_000


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxRecord:
    """A sandbox as the store knows it (``secrets`` sealed, tokens hashed)."""

    id: str
    backend: str
    profile: str
    state: str
    ip: str
    prefixlen: int
    bridge: str
    token_hash: str
    agent_token_hash: str
    secrets: str
    reason: str
    info: dict[str, Any]
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardRecord:
    """A published port, enough to publish it again after a restart."""

    id: str
    sandbox_id: str
    name: str
    host_ip: str
    host_port: int
    guest_port: int
    protocol: str
    options: dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class GrantRecord:
    """An access token of a sandbox: its hash, expiry and scope."""

    id: str
    sandbox_id: str
    token_hash: str
    expires_at: float
    scope: dict[str, Any]
    created_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionRecord:
    """A sandbox-bound flow a backend waits on (see :mod:`sandport.sandbox.state`)."""

    id: str
    sandbox_id: str
    state: str
    reason: str
    credential_id: str | None
    expires_at: float
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class CredentialRecord:
    """Credentials a guest posted; ``sealed`` is the ciphertext."""

    id: str
    sandbox_id: str
    session_id: str | None
    sealed: str
    created_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class EventRecord:
    """One entry of the event log."""

    seq: int
    at: float
    kind: str
    sandbox_id: str
    data: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        """The event as the API shows it."""
        return {"seq": self.seq, "at": self.at, "kind": self.kind,
                "sandbox": self.sandbox_id or None, "data": self.data}


class StateStore(Protocol):
    """What the gateway keeps across restarts. Every method is one transaction."""

    def close(self) -> None:
        """Release the store."""
        ...

    # sandboxes
    def add_sandbox(self, *, sandbox_id: str, backend: str, profile: str, state: str, ip: str,
                    prefixlen: int, bridge: str, token_hash: str, agent_token_hash: str = "",
                    secrets: str = "", event: tuple[str, dict[str, Any]] | None = None
                    ) -> int | None:
        """Insert a sandbox record (and its creation event: its sequence number)."""
        ...

    def set_state(self, sandbox_id: str, state: str, *, reason: str = "",
                  info: dict[str, Any] | None = None,
                  event: tuple[str, dict[str, Any]] | None = None) -> int | None:
        """Record a state change and its event; the event's sequence number."""
        ...

    def remove_sandbox(self, sandbox_id: str) -> None:
        """Forget a sandbox with its lease, forwards, grants, sessions and credentials."""
        ...

    def sandboxes(self) -> list[SandboxRecord]:
        """Every sandbox record, oldest first."""
        ...

    def move_sandbox(self, sandbox_id: str, ip: str) -> None:
        """An attached target's new address."""
        ...

    # leases (sandport.net.pool.LeaseBook)
    def leased_addresses(self) -> set[str]:
        """Every leased address."""
        ...

    def pool_cursor(self) -> str | None:
        """The last address handed out."""
        ...

    def add_lease(self, address: str, owner: str, cursor: str) -> None:
        """Lease ``address`` and move the cursor; KeyError if it is leased."""
        ...

    def release_lease(self, address: str) -> None:
        """Forget a lease."""
        ...

    # forwards
    def add_forward(self, rec: ForwardRecord) -> None:
        """Remember a published port."""
        ...

    def remove_forward(self, forward_id: str) -> None:
        """Forget a published port."""
        ...

    def forwards(self, sandbox_id: str) -> list[ForwardRecord]:
        """The published ports of a sandbox, oldest first."""
        ...

    # grants
    def add_grant(self, rec: GrantRecord) -> None:
        """Remember an access token (hashed)."""
        ...

    def remove_grant(self, grant_id: str) -> None:
        """Forget an access token."""
        ...

    def grants(self, sandbox_id: str) -> list[GrantRecord]:
        """The access tokens of a sandbox."""
        ...

    # sessions and credentials
    def add_session(self, rec: SessionRecord,
                    event: tuple[str, dict[str, Any]] | None = None) -> int | None:
        """Insert a session (and its event)."""
        ...

    def set_session_state(self, session_id: str, state: str, *, reason: str = "",
                          credential_id: str | None = None,
                          event: tuple[str, dict[str, Any]] | None = None) -> int | None:
        """Move a session (and record the event)."""
        ...

    def session(self, session_id: str) -> SessionRecord | None:
        """One session."""
        ...

    def sessions(self, sandbox_id: str | None = None) -> list[SessionRecord]:
        """Sessions of a sandbox (or all), oldest first."""
        ...

    def add_credentials(self, rec: CredentialRecord, *, session_state: str | None = None,
                        events: Sequence[tuple[str, dict[str, Any]]] = ()) -> list[int]:
        """Store sealed credentials; the session (if any) moves to ``session_state``."""
        ...

    def credentials(self, sandbox_id: str) -> list[CredentialRecord]:
        """Credentials of a sandbox, oldest first."""
        ...

    # events
    def add_event(self, kind: str, sandbox_id: str, data: dict[str, Any]) -> int:
        """Append an event; its sequence number."""
        ...

    def events(self, *, after: int = 0, sandbox_id: str | None = None,
               limit: int = 1000) -> list[EventRecord]:
        """Events with ``seq > after``, oldest first."""
        ...


def _row(cls: Any, row: sqlite3.Row, **decoded: Any) -> Any:
    fields = {k: row[k] for k in row.keys() if k not in decoded}  # noqa: SIM118
    return cls(**fields, **decoded)


class SqliteStore:
    """:class:`StateStore` on one SQLite file; used from the gateway's event loop thread."""

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

    @staticmethod
    def _event(db: sqlite3.Connection, sandbox_id: str,
               event: tuple[str, dict[str, Any]] | None) -> int | None:
        if event is None:
            return None
        kind, data = event
        cur = db.execute("INSERT INTO events (at, kind, sandbox_id, data) VALUES (?,?,?,?)",
                         (time.time(), kind, sandbox_id, json.dumps(data)))
        seq = int(cur.lastrowid or 0)
        if seq % 500 == 0:  # keep the log bounded, now and then
            db.execute("DELETE FROM events WHERE seq <= ?", (seq - EVENTS_KEPT,))
        return seq

    # sandboxes -----------------------------------------------------------------------

    def add_sandbox(self, *, sandbox_id: str, backend: str, profile: str, state: str, ip: str,
                    prefixlen: int, bridge: str, token_hash: str, agent_token_hash: str = "",
                    secrets: str = "", event: tuple[str, dict[str, Any]] | None = None
                    ) -> int | None:
        """Insert a new sandbox record (and its event: its sequence number)."""
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO sandboxes (id, backend, profile, state, ip, prefixlen, bridge,"
                " token_hash, agent_token_hash, secrets, created_at, updated_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (sandbox_id, backend, profile, state, ip, prefixlen, bridge, token_hash,
                 agent_token_hash, secrets, now, now),
            )
            return self._event(db, sandbox_id, event)

    def set_state(self, sandbox_id: str, state: str, *, reason: str = "",
                  info: dict[str, Any] | None = None,
                  event: tuple[str, dict[str, Any]] | None = None) -> int | None:
        """Record a state change (and its reason, details and event)."""
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
            return self._event(db, sandbox_id, event)

    def remove_sandbox(self, sandbox_id: str) -> None:
        """Forget a sandbox and everything that hangs on it, in one transaction."""
        with self.transaction() as db:
            row = db.execute("SELECT ip FROM sandboxes WHERE id=?", (sandbox_id,)).fetchone()
            if row is not None:
                db.execute(
                    "DELETE FROM leases WHERE address=? AND owner=?", (row["ip"], sandbox_id)
                )
            db.execute("DELETE FROM sandboxes WHERE id=?", (sandbox_id,))

    def move_sandbox(self, sandbox_id: str, ip: str) -> None:
        """An attached target's new address."""
        with self.transaction() as db:
            db.execute("UPDATE sandboxes SET ip=?, updated_at=? WHERE id=?",
                       (ip, time.time(), sandbox_id))

    def sandboxes(self) -> list[SandboxRecord]:
        """Every sandbox record, oldest first."""
        rows = self._db.execute("SELECT * FROM sandboxes ORDER BY created_at").fetchall()
        return [_row(SandboxRecord, r, info=json.loads(r["info"])) for r in rows]

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

    # forwards ---------------------------------------------------------------------------

    def add_forward(self, rec: ForwardRecord) -> None:
        """Remember a published port."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO forwards (id, sandbox_id, name, host_ip, host_port, guest_port,"
                " protocol, options, created_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (rec.id, rec.sandbox_id, rec.name, rec.host_ip, rec.host_port, rec.guest_port,
                 rec.protocol, json.dumps(rec.options), time.time()))

    def remove_forward(self, forward_id: str) -> None:
        """Forget a published port."""
        with self.transaction() as db:
            db.execute("DELETE FROM forwards WHERE id=?", (forward_id,))

    def forwards(self, sandbox_id: str) -> list[ForwardRecord]:
        """The published ports of a sandbox, oldest first."""
        rows = self._db.execute(
            "SELECT id, sandbox_id, name, host_ip, host_port, guest_port, protocol, options"
            " FROM forwards WHERE sandbox_id=? ORDER BY created_at, rowid",
            (sandbox_id,)).fetchall()
        return [_row(ForwardRecord, r, options=json.loads(r["options"])) for r in rows]

    # grants -----------------------------------------------------------------------------

    def add_grant(self, rec: GrantRecord) -> None:
        """Remember an access token (its hash)."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO grants (id, sandbox_id, token_hash, expires_at, scope, created_at)"
                " VALUES (?,?,?,?,?,?)",
                (rec.id, rec.sandbox_id, rec.token_hash, rec.expires_at,
                 json.dumps(rec.scope), rec.created_at))

    def remove_grant(self, grant_id: str) -> None:
        """Forget an access token."""
        with self.transaction() as db:
            db.execute("DELETE FROM grants WHERE id=?", (grant_id,))

    def grants(self, sandbox_id: str) -> list[GrantRecord]:
        """The access tokens of a sandbox, oldest first."""
        rows = self._db.execute("SELECT * FROM grants WHERE sandbox_id=? ORDER BY created_at",
                                (sandbox_id,)).fetchall()
        return [_row(GrantRecord, r, scope=json.loads(r["scope"])) for r in rows]

    # sessions and credentials -----------------------------------------------------------

    def add_session(self, rec: SessionRecord,
                    event: tuple[str, dict[str, Any]] | None = None) -> int | None:
        """Insert a session (and its event)."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO sessions (id, sandbox_id, state, reason, credential_id,"
                " expires_at, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?)",
                (rec.id, rec.sandbox_id, rec.state, rec.reason, rec.credential_id,
                 rec.expires_at, rec.created_at, rec.updated_at))
            return self._event(db, rec.sandbox_id, event)

    def set_session_state(self, session_id: str, state: str, *, reason: str = "",
                          credential_id: str | None = None,
                          event: tuple[str, dict[str, Any]] | None = None) -> int | None:
        """Move a session (keeping its credential id unless one is given)."""
        with self.transaction() as db:
            db.execute(
                "UPDATE sessions SET state=?, reason=?, updated_at=?,"
                " credential_id=COALESCE(?, credential_id) WHERE id=?",
                (state, reason, time.time(), credential_id, session_id))
            row = db.execute("SELECT sandbox_id FROM sessions WHERE id=?",
                             (session_id,)).fetchone()
            return self._event(db, row[0] if row else "", event)

    def session(self, session_id: str) -> SessionRecord | None:
        """One session, or None."""
        row = self._db.execute("SELECT * FROM sessions WHERE id=?", (session_id,)).fetchone()
        return None if row is None else _row(SessionRecord, row)

    def sessions(self, sandbox_id: str | None = None) -> list[SessionRecord]:
        """Sessions of a sandbox (or every session), oldest first."""
        if sandbox_id is None:
            rows = self._db.execute("SELECT * FROM sessions ORDER BY created_at").fetchall()
        else:
            rows = self._db.execute(
                "SELECT * FROM sessions WHERE sandbox_id=? ORDER BY created_at",
                (sandbox_id,)).fetchall()
        return [_row(SessionRecord, r) for r in rows]

    def add_credentials(self, rec: CredentialRecord, *, session_state: str | None = None,
                        events: Sequence[tuple[str, dict[str, Any]]] = ()) -> list[int]:
        """Store sealed credentials; their session moves to ``session_state``; the events'
        sequence numbers."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO credentials (id, sandbox_id, session_id, sealed, created_at)"
                " VALUES (?,?,?,?,?)",
                (rec.id, rec.sandbox_id, rec.session_id, rec.sealed, rec.created_at))
            if rec.session_id is not None and session_state is not None:
                db.execute(
                    "UPDATE sessions SET state=?, reason='', credential_id=?, updated_at=?"
                    " WHERE id=?", (session_state, rec.id, time.time(), rec.session_id))
            return [self._event(db, rec.sandbox_id, e) or 0 for e in events]

    def credentials(self, sandbox_id: str) -> list[CredentialRecord]:
        """Credentials of a sandbox, oldest first."""
        rows = self._db.execute(
            "SELECT * FROM credentials WHERE sandbox_id=? ORDER BY created_at",
            (sandbox_id,)).fetchall()
        return [_row(CredentialRecord, r) for r in rows]

    # events -----------------------------------------------------------------------------

    def add_event(self, kind: str, sandbox_id: str, data: dict[str, Any]) -> int:
        """Append an event; its sequence number."""
        with self.transaction() as db:
            seq = self._event(db, sandbox_id, (kind, data))
        assert seq is not None
        return seq

    def events(self, *, after: int = 0, sandbox_id: str | None = None,
               limit: int = 1000) -> list[EventRecord]:
        """Events after ``after``, oldest first, at most ``limit``."""
        if sandbox_id is None:
            rows = self._db.execute(
                "SELECT * FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, limit)).fetchall()
        else:
            rows = self._db.execute(
                "SELECT * FROM events WHERE seq > ? AND sandbox_id = ? ORDER BY seq LIMIT ?",
                (after, sandbox_id, limit)).fetchall()
        return [_row(EventRecord, r, data=json.loads(r["data"])) for r in rows]
