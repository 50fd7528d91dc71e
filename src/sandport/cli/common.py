"""What the ``sandport`` commands share: consoles, logging, errors, signals, the gateway.

Owns the two consoles (``out`` for results, ``err`` for everything else), printing a
table (laid out by :mod:`sandport.cli.table`) and JSON, logging (the terminal and the
log file of ``up``), mapping a :class:`~sandport.errors.SandportError` onto one line and
an exit code, running a coroutine under uvloop, the stop signals, and finding the running
gateway's API client (through its state file). Must not define commands, and makes no
HTTP call of its own: :class:`sandport.client.Client` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import logging.handlers
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
import uvloop
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from sandport.cli.table import Column, layout, terminal_width, wrap_cell
from sandport.client import ApiError, Client
from sandport.control.gateway import GATEWAY_FILE
from sandport.errors import SandportError, UsageError

log = logging.getLogger("sandport")

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

#: The help of -p/--publish: SPEC_SYNTAX in words short enough for a help column.
PUBLISH_HELP = escape("SPEC is [HOSTIP:]HOSTPORT:GUESTPORT, and /udp or /tcp+udp after it for "
                      "other protocols than tcp; e.g. 15901:5901, 127.0.0.1:8080:80, "
                      "15900-15909:5900-5909, 5353:53/udp. Repeatable.")


def count_option(help: str) -> Any:
    """An option that takes how many of something, 1 or more, shown as ``N``."""
    return typer.Option(help=help, min=1, metavar="N")


def seconds_option(help: str, *, least: float) -> Any:
    """An option that takes a duration, at least ``least`` seconds, shown as ``SECONDS``."""
    return typer.Option(help=help, min=least, metavar="SECONDS")


def json_flag(help: str = "Print JSON.") -> Any:
    """The ``--json`` flag of a command that prints a table or lines otherwise."""
    return typer.Option("--json", help=help)


def print_json(doc: object) -> None:
    """``doc`` on stdout as indented JSON (never read as rich markup)."""
    out.print(json.dumps(doc, indent=2), markup=False)


def wide_flag() -> Any:
    """The ``--wide`` flag of a command that prints a table."""
    return typer.Option("--wide", help="Show every column, each row on one line, however "
                        "wide (default: fit the terminal, COLUMNS or 80).")


def print_table(columns: Sequence[Column], rows: Sequence[Sequence[str]], *,
                wide: bool) -> None:
    """``rows`` on stdout as a table with a header (see :mod:`sandport.cli.table`): fitted
    to the terminal, or every column on one line each if ``wide``. Columns left out to fit
    are named on stderr, with ``--wide``."""
    width = None if wide else terminal_width()
    table = layout(columns, rows, width)
    for line in table.lines:
        out.out(line, highlight=False)
    if table.hidden:
        note = f"not shown in {width} columns (--wide shows them): {', '.join(table.hidden)}"
        for line in wrap_cell(note, width or len(note)):
            err.out(line, highlight=False)


#: The log file of ``sandport up``, in its state dir.
LOG_FILE = "gateway.log"
#: When the log file is rotated (to ``gateway.log.1`` ...), and how many old ones stay.
LOG_FILE_BYTES = 16 * 2**20
LOG_FILE_KEEP = 3


def setup_logging(level: str, log_file: Path | None = None) -> None:
    """Log records at ``level`` and above to stderr: through rich on a terminal, else one
    plain line each; with ``log_file``, records at info (or ``level``, if lower) and above
    to that file too (0600, appended, rotated).

    Raises:
        UsageError: ``level`` is not a logging level, or the log file cannot be written.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise UsageError(f"unknown log level {level!r}: use debug, info, warning or error")
    handler: logging.Handler
    if err.is_terminal:
        handler = RichHandler(console=err, show_path=False, rich_tracebacks=False,
                              log_time_format="%H:%M:%S")
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # a log file or a pipe: one plain line per record, never wrapped
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.setLevel(numeric)
    handlers: list[logging.Handler] = [handler]
    lowest = numeric
    if log_file is not None:
        lowest = min(numeric, logging.INFO)
        handlers.append(_file_handler(log_file, lowest))
    logging.basicConfig(level=lowest, handlers=handlers, force=True)
    # Third-party chatter only at debug.
    for noisy in ("uvicorn", "uvicorn.error", "websockets", "pyroute2", "asyncio"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))


def _file_handler(path: Path, level: int) -> logging.Handler:
    """A handler appending to ``path``, made 0600 (in a 0700 directory) if it is new."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600))
        handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=LOG_FILE_BYTES, backupCount=LOG_FILE_KEEP, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write the log file {path}: {exc.strerror or exc}",
                         hint="run as root, or pass a --state-dir you can write") from None
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    return handler


def show_error(exc: BaseException) -> None:
    """One error line on stderr; the message is text, never rich markup."""
    err.print(f"[bold red]error:[/] {escape(str(exc))}")


def run_reporting(fn: Callable[[], None]) -> None:
    """Call ``fn``; a :class:`~sandport.errors.SandportError` becomes one error line on
    stderr and its exit code."""
    try:
        fn()
    except SandportError as exc:
        show_error(exc)
        raise typer.Exit(exc.exit_code) from None


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _forget_signals_in_child() -> None:
    signal.set_wakeup_fd(-1)
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


@functools.cache
def _install_fork_hook() -> None:
    """Register :func:`_forget_signals_in_child` once per process."""
    os.register_at_fork(after_in_child=_forget_signals_in_child)


def install_stop_signals(loop: asyncio.AbstractEventLoop, on_stop: Callable[[], None]) -> None:
    """Call ``on_stop`` on SIGINT or SIGTERM, and only for signals sent to this process.

    A child forked without exec (pyroute2 forks one for every namespace operation and
    ends it with SIGTERM) inherits the loop's signal handler *and* its wakeup fd: a
    signal sent to the child would reach this process's loop and stop the gateway.
    So every forked child drops both right after fork.
    """
    _install_fork_hook()

    def on_signal(sig: signal.Signals) -> None:
        log.info("received %s: shutting down", sig.name)
        on_stop()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)


def run_async(coro: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine under uvloop, mapping errors to messages and exit codes."""
    try:
        uvloop.run(coro)
    except SandportError as exc:
        show_error(exc)
        raise typer.Exit(exc.exit_code) from None
    except Exception as exc:  # never a traceback to a user
        log.debug("internal error", exc_info=True)
        err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))}\n"
                  "  run again with --log-level debug for the traceback, and report it")
        raise typer.Exit(1) from None


StateDirOption = Annotated[Path, typer.Option(help="State dir of the gateway to ask.",
                                              metavar="DIR")]


def gateway_doc(state_dir: Path) -> dict[str, Any]:
    """The state file of the gateway running with ``state_dir``: its URL, pid and admin
    token.

    Raises:
        UsageError: there is none, it cannot be read, or it is not JSON.
    """
    path = state_dir / GATEWAY_FILE
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"no gateway runs with state dir {state_dir} ({path} is missing)",
                         hint="start one with `sandport up`, or pass its --state-dir") from None
    except PermissionError:
        raise UsageError(f"cannot read {path}: it is the gateway's admin secret",
                         hint="run as root (the user that runs the gateway)") from None
    except ValueError as exc:
        raise UsageError(f"{path} is not valid JSON: {exc}") from None
    return doc


@contextlib.contextmanager
def gateway_client(state_dir: Path, timeout: float = 5.0) -> Iterator[Client]:
    """The API client of the gateway running with ``state_dir`` (its admin token from
    the state file), each call bounded by ``timeout`` seconds.

    Raises:
        UsageError: no gateway runs with this state dir, or the API refused a request
            (its message says why).
        SandportError: the gateway does not answer.
    """
    doc = gateway_doc(state_dir)
    url = str(doc["url"])
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"{state_dir / GATEWAY_FILE} names no http(s):// URL: {url!r}")
    # Our own gateway, found through its root-only state file: its certificate may be
    # self-signed and name another host, so it is not verified.
    try:
        yield Client(url, str(doc["admin_token"]), timeout=timeout, verify_tls=False)
    except ApiError as exc:
        if exc.status:
            raise UsageError(f"the gateway answered {exc.status}: {exc.message}") from None
        raise SandportError(f"gateway pid {doc.get('pid')}: {exc.message}",
                            hint="is it still running? `sandport up` starts one") from None
