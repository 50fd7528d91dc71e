"""Who may do what with a sandbox: access tokens, sessions, credentials, the guest agent.

Owns:
    * access tokens (*grants*): extra tokens of a sandbox with a TTL and a scope, their
      expiry timers, revocation (the bridge sessions opened with one are closed);
    * sessions: ``waiting -> ready -> completed | expired | cancelled`` (the table is in
      :mod:`sandport.sandbox.state`), their TTL timers and the long poll on them; a
      session follows its sandbox (ready when it is, cancelled when it fails);
    * credentials a guest posts (sealed at rest with the gateway's secret key);
    * the guest agent's token check and its reports.

Must not touch: guests, forwards or the sandbox state (it only listens to its changes,
see :meth:`Access.sandbox_changed`). The HTTP side of these checks (which token opens
which route) is :func:`sandport.control.app.authorise`'s and :mod:`sandport.control.api`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from typing import Any

from sandport.control.app import Grant, check_grant_scope, grant_links
from sandport.control.roster import GatewayPort, Roster, RunningSandbox
from sandport.control.secretbox import SecretBox
from sandport.control.store import CredentialRecord, GrantRecord, SessionRecord
from sandport.control.tokens import TokenCheck, check_token, fingerprint, hash_token, new_token
from sandport.errors import Conflict, SandboxNotFound, Unauthorized
from sandport.sandbox.state import (
    IllegalTransition,
    SandboxState,
    SessionState,
    check_session_transition,
)

log = logging.getLogger(__name__)

DEFAULT_SESSION_TTL = 900.0


class Access:
    """Grants, sessions, credentials and agent checks of one gateway run."""

    def __init__(self, roster: Roster, box: SecretBox, port: GatewayPort) -> None:
        self._roster = roster
        self._store = roster.store
        self._box = box
        self._port = port
        self._session_timers: dict[str, asyncio.TimerHandle] = {}
        #: Set (and replaced) on every session change: long polls wait on it.
        self._session_changed = asyncio.Event()
        roster.on_state(self.sandbox_changed)

    # Adoption and shutdown ----------------------------------------------------------------

    def restore(self, sb: RunningSandbox) -> None:
        """Arm again what an adopted sandbox had: its grants' expiry, its open sessions."""
        loop = asyncio.get_running_loop()
        for grant_rec in self._store.grants(sb.id):
            grant = Grant(id=grant_rec.id, token_hash=grant_rec.token_hash,
                          expires_at=grant_rec.expires_at,
                          ports=tuple(grant_rec.scope.get("ports", ())),
                          kinds=tuple(grant_rec.scope.get("kinds", ())))
            sb.live.grants[grant.id] = grant
            left = grant_rec.expires_at - time.time()
            if left > 0:
                sb.grant_timers[grant.id] = loop.call_later(
                    left, self._end_grant, sb.id, grant.id, "the access token expired")
        for rec in self._store.sessions(sb.id):
            if not SessionState(rec.state).final:
                self._arm_session(rec)
                if rec.state == SessionState.WAITING and sb.live.state is SandboxState.READY:
                    self._move_session(rec.id, SessionState.READY)

    def release(self, sb: RunningSandbox) -> None:
        """Stop the grant timers of a sandbox that goes (or that this run leaves)."""
        for timer in sb.grant_timers.values():
            timer.cancel()
        sb.grant_timers.clear()

    def close(self) -> None:
        """Stop every session timer (the gateway stops; sessions stay recorded)."""
        for timer in self._session_timers.values():
            timer.cancel()
        self._session_timers.clear()

    # Sessions ------------------------------------------------------------------------------

    def sandbox_changed(self, sb: RunningSandbox, state: SandboxState, reason: str) -> None:
        """A sandbox moved (a :class:`Roster` listener): its waiting sessions are ready once
        it is; a failed one's can no longer complete."""
        if state is SandboxState.READY:
            for rec in self.open_sessions(sb.id):
                if rec.state == SessionState.WAITING:
                    self._move_session(rec.id, SessionState.READY)
        elif state is SandboxState.FAILED:
            self.end_sessions(sb.id, SessionState.CANCELLED, f"the sandbox failed: {reason}")

    def open_sessions(self, sandbox_id: str) -> list[SessionRecord]:
        """The sessions of a sandbox that can still change, oldest first."""
        return [r for r in self._store.sessions(sandbox_id) if not SessionState(r.state).final]

    def end_sessions(self, sandbox_id: str, state: SessionState, reason: str) -> None:
        """End every open session of a sandbox (it goes away, or failed)."""
        for rec in self.open_sessions(sandbox_id):
            try:
                self._move_session(rec.id, state, reason)
            except IllegalTransition as exc:
                log.error("sandbox %s: session %s: %s", sandbox_id, rec.id, exc)

    def _arm_session(self, rec: SessionRecord) -> None:
        left = max(0.0, rec.expires_at - time.time())
        self._session_timers[rec.id] = asyncio.get_running_loop().call_later(
            left, self._expire_session, rec)

    def _expire_session(self, rec: SessionRecord) -> None:
        self._session_timers.pop(rec.id, None)
        try:
            self._move_session(rec.id, SessionState.EXPIRED,
                               "no credentials arrived before the session's TTL ran out")
        except IllegalTransition as exc:
            log.error("sandbox %s: session %s: %s", rec.sandbox_id, rec.id, exc)

    def _move_session(self, session_id: str, state: SessionState, reason: str = "") -> None:
        rec = self._store.session(session_id)
        if rec is None:
            return
        check_session_transition(SessionState(rec.state), state)
        data = {"id": session_id, "state": state.value, "from": rec.state, "reason": reason}
        seq = self._store.set_session_state(session_id, state.value, reason=reason,
                                            event=("session.state", data))
        self._roster.published(seq, "session.state", rec.sandbox_id, data)
        if state.final:
            self._disarm_session(session_id)
        self._notify_sessions()

    def _disarm_session(self, session_id: str) -> None:
        timer = self._session_timers.pop(session_id, None)
        if timer is not None:
            timer.cancel()

    def _notify_sessions(self) -> None:
        changed, self._session_changed = self._session_changed, asyncio.Event()
        changed.set()  # wakes every waiter of the old event; new ones wait on the new

    def create_session(self, sandbox_id: str, ttl: float = DEFAULT_SESSION_TTL) -> SessionRecord:
        """A flow on a sandbox that ends when its guest posts credentials (or ``ttl`` ends).

        It is ``waiting`` until the sandbox is ready, then ``ready``; ``completed`` once
        the guest agent posts credentials; ``expired`` after ``ttl`` seconds without.

        Raises:
            SandboxNotFound: no such sandbox.
            Conflict: the sandbox failed or is going away.
        """
        sb = self._roster[sandbox_id]
        if sb.live.state in (SandboxState.FAILED, SandboxState.STOPPING, SandboxState.STOPPED):
            raise Conflict(f"sandbox {sandbox_id} is {sb.live.state.value}: {sb.live.reason}")
        now = time.time()
        state = SessionState.READY if sb.live.state is SandboxState.READY \
            else SessionState.WAITING
        rec = SessionRecord(id=f"w{secrets.token_hex(5)}", sandbox_id=sandbox_id,
                            state=state.value, reason="", credential_id=None,
                            expires_at=now + ttl, created_at=now, updated_at=now)
        data = {"id": rec.id, "state": state.value, "from": "", "reason": ""}
        self._roster.published(self._store.add_session(rec, event=("session.state", data)),
                               "session.state", sandbox_id, data)
        self._arm_session(rec)
        log.info("sandbox %s: session %s (%s, ttl %g s)", sandbox_id, rec.id, state.value, ttl)
        return rec

    def session(self, session_id: str) -> SessionRecord:
        """One session.

        Raises:
            SandboxNotFound: no such session (or its sandbox was deleted).
        """
        rec = self._store.session(session_id)
        if rec is None:
            raise SandboxNotFound(f"no session {session_id!r}")
        return rec

    def sessions(self, sandbox_id: str) -> list[SessionRecord]:
        """The sessions of a sandbox, oldest first.

        Raises:
            SandboxNotFound: no such sandbox.
        """
        return self._store.sessions(self._roster[sandbox_id].id)

    def session_counts(self) -> dict[str, int]:
        """How many sessions are in each state (``/metrics``)."""
        counts = dict.fromkeys((s.value for s in SessionState), 0)
        for rec in self._store.sessions():
            counts[rec.state] = counts.get(rec.state, 0) + 1
        return counts

    async def wait_session(self, session_id: str, timeout: float) -> SessionRecord:
        """The session once it is final, or as it is after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            changed = self._session_changed  # taken before reading: no change is missed
            rec = self.session(session_id)
            left = deadline - loop.time()
            if SessionState(rec.state).final or left <= 0:
                return rec
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), left)

    # Access tokens (grants) ----------------------------------------------------------------

    def create_grant(self, sandbox_id: str, ttl: float, *, ports: tuple[str, ...] = (),
                     kinds: tuple[str, ...] = ()) -> dict[str, Any]:
        """An extra access token for a sandbox, valid ``ttl`` seconds (a link that expires).

        ``ports`` (names or numbers) and ``kinds`` (``ws``: the WebSocket bridge,
        ``http``: the desktop page) limit what it opens; empty means all. It is stored
        hashed and survives a gateway restart. When it expires, or is revoked, the
        bridge sessions opened with it are closed (1008, with the reason) and new
        requests with it get 403.

        The answer's links are the ones the token opens (:func:`grant_links`): the
        desktop page only if it opens the page and its WebSocket, a WebSocket URL per port.

        Raises:
            SandboxNotFound: no such sandbox.
            UsageError: a scope that opens nothing it names (:func:`check_grant_scope`).
        """
        sb = self._roster[sandbox_id]
        check_grant_scope(sb.live, ports, kinds)
        token = new_token()
        grant = Grant(id=f"g{secrets.token_hex(4)}", token_hash=hash_token(token),
                      expires_at=time.time() + ttl, ports=ports, kinds=kinds)
        scope = {"ports": list(ports), "kinds": list(kinds)}
        self._store.add_grant(GrantRecord(id=grant.id, sandbox_id=sandbox_id,
                                          token_hash=grant.token_hash,
                                          expires_at=grant.expires_at, scope=scope,
                                          created_at=time.time()))
        sb.live.grants[grant.id] = grant
        loop = asyncio.get_running_loop()
        sb.grant_timers[grant.id] = loop.call_later(
            ttl, self._end_grant, sandbox_id, grant.id, "the access token expired")
        self._roster.record_event("token.created", sandbox_id,
                                  {"id": grant.id, "expires_at": grant.expires_at, **scope,
                                   "fingerprint": fingerprint(grant.token_hash)})
        log.info("sandbox %s: access token %s, valid %g s", sandbox_id, grant.id, ttl)
        return {"id": grant.id, "token": token, "expires_at": grant.expires_at, **scope,
                **grant_links(self._port.link_base, sb.live, token, grant)}

    def grants(self, sandbox_id: str) -> list[dict[str, Any]]:
        """The extra access tokens of a sandbox (ids and expiry; never the tokens).

        Raises:
            SandboxNotFound: no such sandbox.
        """
        sb = self._roster[sandbox_id]
        now = time.time()
        return [{"id": g.id, "expires_at": g.expires_at, "expired": g.expires_at <= now,
                 "ports": list(g.ports), "kinds": list(g.kinds)}
                for g in sb.live.grants.values()]

    def revoke_grant(self, sandbox_id: str, grant_id: str) -> None:
        """Revoke an access token now: its sessions close, new requests with it get 403.

        Raises:
            SandboxNotFound: no such sandbox or token.
        """
        sb = self._roster.get(sandbox_id)
        if sb is None or grant_id not in sb.live.grants:
            raise SandboxNotFound(f"sandbox {sandbox_id!r} has no access token {grant_id!r}")
        timer = sb.grant_timers.pop(grant_id, None)
        if timer is not None:
            timer.cancel()
        self._end_grant(sandbox_id, grant_id, "the access token was revoked", forget=True)

    def _end_grant(self, sandbox_id: str, grant_id: str, reason: str,
                   forget: bool = False) -> None:
        sb = self._roster.get(sandbox_id)
        if sb is None:
            return
        sb.grant_timers.pop(grant_id, None)
        if forget:  # revoked: unknown from now on (an expired one says "expired")
            sb.live.grants.pop(grant_id, None)
            self._store.remove_grant(grant_id)
        self._roster.record_event("token.revoked" if forget else "token.expired", sandbox_id,
                                  {"id": grant_id})
        closed = self._port.close_sessions(sandbox_id, 1008, reason, grant=grant_id)
        log.info("sandbox %s: %s (%s); %d session(s) closed", sandbox_id, reason, grant_id,
                 closed)

    # The guest agent and its credentials --------------------------------------------------

    def check_agent(self, sandbox_id: str, token: str | None,
                    client_ip: str | None = None) -> RunningSandbox:
        """The sandbox whose guest agent presents ``token`` (from ``client_ip``, if given).

        Raises:
            Unauthorized: no token, a wrong one (also: no such sandbox), or a client that
                is not the sandbox.
        """
        sb = self._roster.get(sandbox_id)
        stored = sb.agent_token_hash if sb is not None else ""
        # No token: 401; a token for a sandbox that does not exist is as wrong as any (403),
        # so agent tokens do not tell which sandboxes exist.
        verdict = check_token(token, stored) if stored else (
            TokenCheck.MISSING if not token else TokenCheck.INVALID)
        if verdict is TokenCheck.MISSING:
            raise Unauthorized("guest agent routes need 'Authorization: Bearer <agent token>'",
                               missing=True)
        if verdict is not TokenCheck.OK or sb is None:
            raise Unauthorized(f"not the agent token of sandbox {sandbox_id!r}")
        if client_ip is not None and client_ip != sb.live.ip:
            raise Unauthorized(f"sandbox {sandbox_id}'s agent calls from {sb.live.ip}, "
                               f"not {client_ip}")
        return sb

    def agent_report(self, sandbox_id: str, report: dict[str, Any]) -> None:
        """Keep a guest agent's latest report (the first one is an event).

        Raises:
            SandboxNotFound: no such sandbox.
        """
        sb = self._roster[sandbox_id]
        first = sb.agent_report is None
        sb.agent_report, sb.agent_report_at = report, time.time()
        if first:
            self._roster.record_event("agent.connected", sandbox_id,
                                      {"listening": report.get("listening", [])})

    def post_credentials(self, sandbox_id: str, data: dict[str, Any],
                         session_id: str | None = None) -> tuple[CredentialRecord,
                                                                 SessionRecord | None]:
        """Store credentials a guest captured (sealed) and complete their session.

        The session is ``session_id``, or else the sandbox's oldest open one (if any).

        Raises:
            SandboxNotFound: no such sandbox, or it has no such session.
            Conflict: that session already ended.
        """
        sb = self._roster[sandbox_id]
        session: SessionRecord | None = None
        if session_id is not None:
            session = self._store.session(session_id)
            if session is None or session.sandbox_id != sb.id:
                raise SandboxNotFound(f"sandbox {sandbox_id} has no session {session_id!r}")
            if SessionState(session.state).final:
                raise Conflict(f"session {session_id} is already {session.state}")
        else:
            open_ = self.open_sessions(sandbox_id)
            session = open_[0] if open_ else None
        cred_id = f"c{secrets.token_hex(5)}"
        sealed = self._box.seal(json.dumps(data).encode(), f"credentials/{cred_id}")
        rec = CredentialRecord(id=cred_id, sandbox_id=sandbox_id,
                               session_id=session.id if session else None, sealed=sealed,
                               created_at=time.time())
        events: list[tuple[str, dict[str, Any]]] = [
            ("credentials.received", {"id": cred_id, "session": rec.session_id})]
        if session is not None:
            check_session_transition(SessionState(session.state), SessionState.COMPLETED)
            events.append(("session.state", {"id": session.id, "state": "completed",
                                             "from": session.state, "reason": ""}))
        seqs = self._store.add_credentials(
            rec, session_state=SessionState.COMPLETED.value if session else None, events=events)
        for seq, (kind, doc) in zip(seqs, events, strict=True):
            self._roster.published(seq, kind, sandbox_id, doc)
        if session is not None:
            self._disarm_session(session.id)
            session = self._store.session(session.id)
            self._notify_sessions()
        log.info("sandbox %s: credentials %s received%s", sandbox_id, cred_id,
                 f"; session {session.id} completed" if session else "")
        return rec, session

    def credentials(self, sandbox_id: str) -> list[dict[str, Any]]:
        """The credentials of a sandbox, unsealed (admin only).

        Raises:
            SandboxNotFound: no such sandbox.
        """
        return [{"id": r.id, "session": r.session_id, "created_at": r.created_at,
                 "data": json.loads(self._box.open(r.sealed, f"credentials/{r.id}"))}
                for r in self._store.credentials(self._roster[sandbox_id].id)]
