"""Secrets at rest: AES-256-GCM with a key that never enters the database.

The key is 32 random bytes, hex, in ``<state dir>/secret.key`` (mode 0600, created at the
first start) or in a file the operator names (``GatewayConfig.secret_key_file``, e.g. a
mounted secret). What the store keeps is ``v1:`` + base64(nonce ‖ ciphertext ‖ tag); the
associated data binds each value to its row (``credentials/<id>``), so a value copied into
another row does not decrypt.

Owns: the key file and sealing. Must not touch: where sealed values are kept (the store).
"""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sandport.errors import SandportError, UsageError

KEY_BYTES = 32
NONCE_BYTES = 12
PREFIX = "v1:"


class SecretKeyError(UsageError):
    """The key file is missing, unreadable, or not 32 bytes of hex."""


class DecryptError(SandportError):
    """A stored value does not decrypt with this key (another key, or tampered)."""


def load_or_create_key(path: Path, *, create: bool = True) -> bytes:
    """The key in ``path``; created (0600) when missing and ``create`` is true.

    Raises:
        SecretKeyError: the file is unreadable or does not hold 64 hex digits.
    """
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        if not create:
            raise SecretKeyError(f"secret key file {path} does not exist",
                                 hint="create it with: openssl rand -hex 32 > FILE") from None
        text = secrets.token_hex(KEY_BYTES)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
    except OSError as exc:
        raise SecretKeyError(f"cannot read secret key file {path}: {exc.strerror}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise SecretKeyError(f"secret key file {path} must hold {KEY_BYTES * 2} hex digits",
                             hint="create one with: openssl rand -hex 32 > FILE")
    return key


class SecretBox:
    """Encrypt and decrypt small values with one key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"key must be {KEY_BYTES} bytes")
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, context: str) -> str:
        """``plaintext`` encrypted and bound to ``context`` (e.g. ``credentials/c1``)."""
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext, context.encode())
        return PREFIX + base64.b64encode(nonce + sealed).decode()

    def open(self, value: str, context: str) -> bytes:
        """The plaintext of a :meth:`seal` result.

        Raises:
            DecryptError: another key, another context, or a damaged value.
        """
        if not value.startswith(PREFIX):
            raise DecryptError(f"{context}: not a sealed value")
        try:
            raw = base64.b64decode(value[len(PREFIX):], validate=True)
            return self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode())
        except (InvalidTag, ValueError):
            raise DecryptError(f"{context}: does not decrypt with this gateway's secret key",
                               hint="was the secret key file replaced?") from None
