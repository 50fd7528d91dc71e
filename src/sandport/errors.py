"""Errors that reach a person: each says what is wrong and what to do about it.

Everything the CLI reports to a user derives from :class:`SandportError`; the CLI prints
``error: <message>`` plus the hint and exits with :attr:`SandportError.exit_code`.
Errors caused by bytes a peer sent live in :mod:`sandport.proto.errors` instead.
"""

from __future__ import annotations

import os
import re


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
    """A host port sandport was asked to listen on is already taken.

    The hint names the process that holds the port when this host's kernel says
    (:func:`port_holder_hint`); ``protocol`` defaults to ``udp`` when ``what`` starts
    with it (``"udp port"``), else ``tcp``.
    """

    def __init__(self, host: str, port: int, *, what: str = "port",
                 protocol: str | None = None) -> None:
        self.host = host
        self.port = port
        protocol = protocol or ("udp" if what.startswith("udp") else "tcp")
        super().__init__(f"host {what} {host}:{port} is already in use",
                         hint=port_holder_hint(host, port, protocol))


#: ``sandport up`` in a command line (``.venv/bin/sandport up``, ``python -m sandport up``).
_GATEWAY_COMMAND = re.compile(r"(?:^|[\s/])sandport\s+up(?:\s|$)")
_COMMAND_SHOWN = 60  # characters of a holder's command line in a hint


def port_holder_hint(host: str, port: int, protocol: str = "tcp") -> str:
    """What to do about ``host:port`` being taken, naming who holds it where we can see.

    The holder is read from the kernel (`sandport.net.inspect.sockets.bound`: the socket
    tables, and ``sock_diag`` for TCP sockets that are bound without listening, as a
    sandport kernel forward's are: Debian 12's ``ss`` (iproute2 6.1) shows those in none
    of its listings). A holder that is a ``sandport up`` gets the ``sandport forward list``
    that lists its forwards.
    """
    # Lazy: every module imports errors; sandport.net.inspect pulls in pyroute2.
    from sandport.net.inspect.sockets import bound  # noqa: PLC0415

    holders = [h for h in bound(port, protocol) if h.pid]
    wildcards = ("0.0.0.0", "::", "")
    near = [h for h in holders if host in wildcards
            or h.address.rsplit(":", 1)[0].strip("[]") in (host, *wildcards)]
    if not holders:
        if protocol != "tcp":
            return f"see what holds it with `ss -uanp 'sport = :{port}'`, or choose another port"
        return (f"see what holds it with `ss -tanp 'sport = :{port}'`; a TCP port that a "
                "sandport gateway forwards in kernel mode is only bound, which `ss` does not "
                "list: `sandport forward list` shows those. Or choose another port")
    holder = (near or holders)[0]
    if holder.pid == os.getpid():
        return (f"{holder.address} is held by pid {holder.pid}, the very process that asked "
                "for it (its own port or one of its forwards): choose another port")
    command = holder.command
    shown = command if len(command) <= _COMMAND_SHOWN else command[:_COMMAND_SHOWN] + "..."
    where = f"{holder.address} is held by pid {holder.pid} ({shown})"
    if _GATEWAY_COMMAND.search(command) is None:
        return f"{where}: stop it or choose another port"
    words = command.split()
    state_dir = next((w.split("=", 1)[1] for w in words if w.startswith("--state-dir=")), "")
    if not state_dir and "--state-dir" in words[:-1]:
        state_dir = words[words.index("--state-dir") + 1]
    listing = f"sandport forward list --state-dir {state_dir}" if state_dir \
        else "sandport forward list"
    return (f"{where}, a sandport gateway: stop it, or if the port is one of its forwards "
            f"(`{listing}` lists them) remove that forward or its sandbox; or choose "
            "another port")


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
