"""VNC Authentication DES and the VNC password file obfuscation (RFC 6143 section 7.2.2).

Owns the bit-reversed-key DES of VNC: the challenge response (`vnc_auth_response`) and the
fixed-key password file format (`obfuscate_password`, `deobfuscate_password`). Must not
touch: the handshake state machine or message parsing; nothing here may import anything
above ``sandport.proto``.
"""

from __future__ import annotations

from typing import Final

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from sandport.proto.rfb.messages import CHALLENGE_LENGTH

# --------------------------------------------------------------------------------------------
# DES, the VNC way.
# --------------------------------------------------------------------------------------------

#: Fixed DES key of the VNC password file obfuscation (vncauth.c ``fixedkey``).
PASSWORD_FILE_KEY: Final = bytes([23, 82, 107, 6, 35, 78, 88, 7])
#: Significant length of a VNC password: DES keys are 8 bytes.
PASSWORD_LENGTH: Final = 8
#: Byte ``i`` with its bit order reversed.
_REVERSED_BITS: Final = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def _des_cipher(vnc_key: bytes) -> Cipher[modes.ECB]:
    """Single DES-ECB keyed the VNC way.

    VNC's d3des takes key bits least significant first, so every key byte is bit-reversed
    before standard DES sees it (the well-known erratum to RFC 6143 section 7.2.2). TripleDES
    with the key repeated three times (EDE) is single DES.
    """
    key = vnc_key.translate(_REVERSED_BITS)
    # Single DES is what RFB specifies; nothing stronger would interoperate.
    return Cipher(TripleDES(key * 3), modes.ECB())  # noqa: S305


def _password_block(password: str) -> bytes:
    """The 8-byte DES block / key for ``password``: truncated or NUL-padded to 8 bytes.

    Raises:
        ValueError: ``password`` is empty, contains NUL, or is not latin-1.
    """
    if not password:
        raise ValueError("VNC password must not be empty")
    if "\0" in password:
        raise ValueError("VNC password must not contain NUL")
    try:
        raw = password.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError("VNC password must be latin-1 (ideally ASCII)") from None
    return raw[:PASSWORD_LENGTH].ljust(PASSWORD_LENGTH, b"\0")


def vnc_auth_response(challenge: bytes, password: str) -> bytes:
    """Answer a VNC Authentication challenge (RFC 6143 section 7.2.2).

    The response is the 16-byte challenge DES-ECB encrypted with the password as key: the
    password truncated to 8 characters or padded with NULs, each key byte bit-reversed.
    Only the first 8 characters of a longer password count.

    Args:
        challenge: The server's 16 random bytes.
        password: Non-empty latin-1 text without NUL.

    Returns:
        The 16-byte response.

    Raises:
        ValueError: ``challenge`` is not 16 bytes, or ``password`` is unusable.
    """
    if len(challenge) != CHALLENGE_LENGTH:
        raise ValueError(f"challenge must be {CHALLENGE_LENGTH} bytes, not {len(challenge)}")
    encryptor = _des_cipher(_password_block(password)).encryptor()
    return encryptor.update(challenge) + encryptor.finalize()


def obfuscate_password(password: str) -> bytes:
    """The 8-byte content of a VNC password file (TigerVNC ``-PasswordFile``, x11vnc -rfbauth).

    The NUL-padded password block DES-encrypted with the fixed key `PASSWORD_FILE_KEY`, keyed
    with the same bit reversal as `vnc_auth_response`; byte-identical to what
    ``x11vnc -storepasswd PASS FILE`` writes. Obfuscation, not protection: anyone who can read
    the file can recover the password. Only the first 8 characters count.

    Args:
        password: Non-empty latin-1 text without NUL.

    Returns:
        8 bytes.

    Raises:
        ValueError: ``password`` is unusable.
    """
    encryptor = _des_cipher(PASSWORD_FILE_KEY).encryptor()
    return encryptor.update(_password_block(password)) + encryptor.finalize()


def deobfuscate_password(data: bytes) -> str:
    """Recover the password from a VNC password file's content.

    Args:
        data: 8 bytes, or 16 (TigerVNC appends a view-only password; it is ignored).

    Returns:
        The full-access password (at most 8 characters).

    Raises:
        ValueError: ``data`` has another length or holds an empty password.
    """
    if len(data) not in (PASSWORD_LENGTH, 2 * PASSWORD_LENGTH):
        raise ValueError(f"VNC password file must be 8 or 16 bytes, not {len(data)}")
    decryptor = _des_cipher(PASSWORD_FILE_KEY).decryptor()
    block = decryptor.update(data[:PASSWORD_LENGTH]) + decryptor.finalize()
    password = block.split(b"\0", 1)[0].decode("latin-1")
    if not password:
        raise ValueError("VNC password file holds an empty password")
    return password
