"""Access tokens: random, shown once, stored as SHA-256, compared in constant time.

Owns: making, hashing and checking a token. Must not touch: which token opens what
(:mod:`sandport.control.access`, :func:`sandport.control.app.authorise`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from enum import Enum

TOKEN_BYTES = 24  # 192 bits: guessing is not an attack
MAX_TOKEN_LENGTH = 256  # longer input is refused without hashing it


class TokenCheck(Enum):
    """The outcome of checking a presented token, with the HTTP status it maps to."""

    OK = 200
    MISSING = 401
    INVALID = 403


def new_token() -> str:
    """A fresh URL-safe token."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def hash_token(token: str) -> str:
    """The stored form of ``token``: hex SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()


def fingerprint(token_hash: str) -> str:
    """A short, non-secret name for a token: the start of its hash (the event log keeps
    it, so a token of a deleted sandbox or a revoked link can be recognised later)."""
    return token_hash[:16]


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    scheme, _, value = (authorization or "").partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def check_token(presented: str | None, stored_hash: str) -> TokenCheck:
    """Compare a presented token with a stored hash in constant time."""
    if not presented:
        return TokenCheck.MISSING
    if len(presented) > MAX_TOKEN_LENGTH:
        return TokenCheck.INVALID
    ok = hmac.compare_digest(hash_token(presented), stored_hash)
    return TokenCheck.OK if ok else TokenCheck.INVALID
