"""Errors that reach a person: each says what is wrong and what to do about it.

Everything the CLI reports to a user derives from :class:`SandportError`; the CLI prints
``error: <message>`` plus the hint and exits with :attr:`SandportError.exit_code`.
Errors caused by bytes a peer sent live in :mod:`sandport.proto.errors` instead.
"""

from __future__ import annotations


class SandportError(Exception):
    """An error with a message for people and an optional hint on how to fix it.

    Attributes:
        hint: one sentence telling the user what to do, or "".
        exit_code: the CLI's exit status for this error (2: the user's input or machine).
    """

    exit_code = 1

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}\n  hint: {self.hint}" if self.hint else text


class UsageError(SandportError):
    """Bad input from the user or a machine that lacks something: CLI exit status 2."""

    exit_code = 2


class MissingCapability(UsageError):
    """The process lacks a Linux capability (usually: not running as root)."""


class MissingPackage(UsageError):
    """A program sandport runs is not installed; names the Debian package."""


class PortInUseError(UsageError):
    """A host port sandport was asked to listen on is already taken."""

    def __init__(self, host: str, port: int, *, what: str = "port") -> None:
        self.host = host
        self.port = port
        super().__init__(
            f"host {what} {host}:{port} is already in use",
            hint=f"stop what listens there (`ss -ltnp 'sport = :{port}'` shows it) "
            "or choose another port",
        )


class StateDirBusy(UsageError):
    """Another gateway holds the state directory's lock."""


class NetworkConflict(UsageError):
    """The configured subnet or bridge clashes with the host's networking."""


class SandboxNotFound(SandportError):
    """No sandbox with that id."""


class SandboxFailed(SandportError):
    """A sandbox could not be created or did not become ready."""


class Conflict(SandportError):
    """The request clashes with the current state (e.g. a session that already ended)."""


class Forbidden(UsageError):
    """Refused by policy (e.g. a target outside the networks a gateway may attach)."""


class Unauthorized(SandportError):
    """A credential is missing (``missing`` true) or wrong."""

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing
