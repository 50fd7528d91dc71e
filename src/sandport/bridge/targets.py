"""Where a WebSocket session goes: a fixed target, or one looked up by token.

websockify's shapes, so existing set-ups keep working:

* a fixed ``TARGET_ADDR:TARGET_PORT``, or ``--unix-target PATH``;
* ``--token-plugin TokenFile --token-source PATH``: ``PATH`` is a file of lines
  ``token: host:port`` (``#`` starts a comment) or a directory of such files. Unlike
  websockify's ``ReadOnlyTokenFile``, every plugin here notices edits: the files are
  re-read when their size, mtime or inode changes, so a token added or removed takes
  effect without a restart. A target may also be ``unix_socket:/path``. On the event
  loop a large file (600k lines take seconds) is parsed in a worker thread and its table
  swapped in whole when done; lookups meanwhile answer from the previous table. A file
  over the cap, or one that cannot be read, keeps the previous table (logged);
* ``--token-plugin UnixDomainSocketDirectory --token-source DIR``: the token names a
  Unix socket inside ``DIR``.

The token comes from the ``token`` query parameter, else from the last path segment
(``/websockify/T`` or ``/T``), or with ``--host-token`` from the Host header's name.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from sandport.errors import UsageError

log = logging.getLogger(__name__)

UNIX_PREFIX = "unix_socket:"
#: The path noVNC asks for by default; never a token.
DEFAULT_PATH_SEGMENT = "websockify"
_TOKEN_LINE = re.compile(r"^(?P<token>[^:\s][^:]*?):\s+(?P<target>\S+)\s*$")
#: A worker thread parsing a token file lets the event loop run every this many lines
#: (without it the loop waited up to half a second for the interpreter lock).
YIELD_EVERY = 256
MAX_TOKEN_FILE_BYTES = 16 * 1024 * 1024  # a token file larger than this is refused
#: Token files up to this many bytes in all are parsed inline, on the event loop (well
#: under a millisecond per KiB): an edit is then seen by the very next connection.
INLINE_RELOAD_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """A TCP ``host:port`` or a Unix socket ``path``; ``netns``: the network namespace
    (its file) the TCP target lives in, if not ours (a container's)."""

    host: str = ""
    port: int = 0
    path: str = ""
    netns: str = ""

    def __str__(self) -> str:
        if self.path:
            return f"{UNIX_PREFIX}{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_target(text: str, *, what: str = "target") -> Target:
    """``host:port``, ``[v6]:port`` or ``unix_socket:/path`` to a :class:`Target`.

    Raises:
        UsageError: the text is none of these.
    """
    text = text.strip()
    if text.startswith(UNIX_PREFIX):
        path = text[len(UNIX_PREFIX):]
        if not path:
            raise UsageError(f"{what} {text!r} names no socket path")
        return Target(path=path)
    host, sep, port_text = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    # A name or an address never holds a bracket: "[[]]:9" is no host (and would print
    # as "[]:9", which does not parse back).
    if not sep or not host or "[" in host or "]" in host or \
            not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise UsageError(f"{what} {text!r} is not HOST:PORT (port 1-65535) or "
                         f"{UNIX_PREFIX}/path")
    return Target(host=host, port=int(port_text))


def token_from(path: str, host_header: str | None, *, host_token: bool) -> str | None:
    """The token a request carries, websockify's way (see the module docstring)."""
    if host_token:
        if not host_header:
            return None
        name = host_header.strip()
        if name.startswith("["):
            return name[1:name.find("]")] or None
        return name.partition(":")[0] or None
    try:
        parts = urlsplit(path)
    except ValueError:  # "//[x": an unclosed IPv6 authority; such a path carries no token
        return None
    values = parse_qs(parts.query).get("token")
    if values and values[0].rstrip("\n"):
        return values[0].rstrip("\n")
    segment = unquote(parts.path.rstrip("/").rpartition("/")[2])
    if segment and segment != DEFAULT_PATH_SEGMENT:
        return segment
    return None


class TokenPlugin(Protocol):
    """Maps a token to a target; ``None`` when the token is unknown."""

    def lookup(self, token: str) -> Target | None:
        """The target of ``token``, or ``None``."""
        ...


def _file_key(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _parse_line(targets: dict[str, str], raw: str, path: Path, number: int) -> None:
    """Add the token of one line of a token file; a line that does not parse is logged
    with its file and line number and skipped."""
    line = raw.strip()
    if not line or line.startswith("#"):
        return
    m = _TOKEN_LINE.match(line)
    try:
        if m is None:
            raise UsageError("expected 'token: host:port'")
        parse_target(m["target"])
    except UsageError as exc:
        log.warning("token file %s line %d: %s (skipped)", path, number,
                    str(exc).splitlines()[0])
        return
    targets[m["token"]] = m["target"]


class TokenFile:
    """websockify's ``TokenFile``: a file or a directory of ``token: host:port`` lines.

    Re-reads whenever a file changes (checked with ``stat`` at each lookup: cheap). Off
    the event loop, or for small files, the reload happens inline and the very next
    lookup sees the edit. On the loop, files over :data:`INLINE_RELOAD_BYTES` are parsed
    in a worker thread; the new table replaces the old one in a single assignment on the
    loop when it is complete, and lookups answer from the old one meanwhile (one reload
    at a time; an edit during it is picked up by the next lookup after it). A line that
    does not parse is logged with its file and line number and skipped, as websockify
    does; a file over :data:`MAX_TOKEN_FILE_BYTES` or one that cannot be read keeps the
    previous table, logged once per change.
    """

    def __init__(self, source: str | Path) -> None:
        self.source = Path(source)
        if not self.source.exists():
            raise UsageError(f"token source {self.source} does not exist",
                             hint="give a file of 'token: host:port' lines or a directory "
                                  "of such files")
        self._keys: dict[Path, tuple[int, int, int, int]] = {}
        # token -> its checked target text: str to str only, so the garbage collector
        # does not track (and walk) a table of 600k entries; parsed again per lookup.
        self._targets: dict[str, str] = {}
        self._loading: asyncio.Future[dict[str, str] | None] | None = None
        self._source_error = ""
        self.loads = 0
        files = self._files()  # the first table at once, before anything is served
        if files is not None:
            self._swap(files, self._parse(files))

    def _files(self) -> dict[Path, tuple[int, int, int, int]] | None:
        """Each token file's identity (inode, size, times); None: the source cannot be
        read (logged once per distinct error)."""
        try:
            if self.source.is_dir():
                out = {}
                for entry in sorted(os.scandir(self.source), key=lambda e: e.name):
                    if entry.name.startswith(".") or not entry.is_file():
                        continue
                    out[Path(entry.path)] = _file_key(entry.stat())
                files = out
            else:
                files = {self.source: _file_key(self.source.stat())}
        except OSError as exc:
            if str(exc) != self._source_error:
                log.warning("token source %s: %s (the previous %d token(s) stay)",
                            self.source, exc, len(self._targets))
            self._source_error = str(exc)
            return None
        self._source_error = ""
        return files

    def _parse(self, files: dict[Path, tuple[int, int, int, int]]) -> dict[str, str] | None:
        """The table the files hold; None (logged) if one is over the cap or unreadable.
        Runs in a worker thread for large files: it touches no state of ``self``, and
        reads line by line (no single call holds the interpreter lock for long)."""
        targets: dict[str, str] = {}
        for path, key in files.items():
            if key[1] > MAX_TOKEN_FILE_BYTES:
                log.warning("token file %s is larger than %d bytes: not loaded, the previous "
                            "table stays", path, MAX_TOKEN_FILE_BYTES)
                return None
            try:
                with path.open(errors="replace") as f:
                    for number, raw in enumerate(f, 1):
                        _parse_line(targets, raw, path, number)
                        if not number % YIELD_EVERY:
                            time.sleep(0)  # hand the interpreter lock to the event loop
            except OSError as exc:
                log.warning("token file %s: %s: not loaded, the previous table stays", path,
                            exc)
                return None
        return targets

    def _swap(self, files: dict[Path, tuple[int, int, int, int]],
              targets: dict[str, str] | None) -> None:
        """Take a parsed table (None: keep the previous one); ``files`` are seen either
        way, so a broken file is not parsed again until it changes."""
        self._keys = files
        if targets is None:
            return
        self._targets = targets
        self.loads += 1
        log.info("token source %s: %d token(s)", self.source, len(targets))

    def _reload_if_changed(self) -> None:
        if self._loading is not None:  # one reload at a time; lookups use the old table
            return
        files = self._files()
        if files is None or files == self._keys:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or sum(k[1] for k in files.values()) <= INLINE_RELOAD_BYTES:
            self._swap(files, self._parse(files))
            return
        log.info("token source %s changed: loading it in the background", self.source)
        loading = self._loading = loop.run_in_executor(None, self._parse, files)

        def done(fut: asyncio.Future[dict[str, str] | None]) -> None:
            self._loading = None
            if fut.cancelled():
                return
            exc = fut.exception()
            if exc is not None:
                log.error("token source %s: loading failed: %s (the previous table stays)",
                          self.source, exc)
                self._keys = files
                return
            previous = self._targets
            self._swap(files, fut.result())
            if previous is not self._targets:  # freed off the loop, a few entries at a time
                loop.run_in_executor(None, _drain, previous)

        loading.add_done_callback(done)

    def lookup(self, token: str) -> Target | None:
        """The target of ``token`` as the files say (or, while a large file is being
        loaded, as they said before)."""
        self._reload_if_changed()
        text = self._targets.get(token)
        return parse_target(text) if text is not None else None


def _drain(table: dict[str, str]) -> None:
    """Free a replaced table entry by entry, in a worker thread: dropping 600k entries in
    one ``dict`` deallocation would hold the interpreter lock (and stall the event loop)
    for as long as it takes."""
    while table:
        table.popitem()


class UnixDomainSocketDirectory:
    """websockify's ``UnixDomainSocketDirectory``: the token names a socket in a directory."""

    def __init__(self, source: str | Path) -> None:
        self.source = Path(source).resolve()
        if not self.source.is_dir():
            raise UsageError(f"token source {self.source} is not a directory")

    def lookup(self, token: str) -> Target | None:
        """The socket ``<dir>/<token>``, if it is one and stays inside the directory."""
        path = (self.source / token).resolve()
        if path.parent != self.source:
            return None
        try:
            if not stat.S_ISSOCK(path.stat().st_mode):
                return None
        except OSError:
            return None
        return Target(path=str(path))


PLUGINS: dict[str, Callable[[str], TokenPlugin]] = {
    "TokenFile": TokenFile,
    "ReadOnlyTokenFile": TokenFile,
    "UnixDomainSocketDirectory": UnixDomainSocketDirectory,
}


def load_plugin(name: str, source: str | None) -> TokenPlugin:
    """A token plugin by websockify's class name (``websockify.token_plugins.X`` works too).

    Raises:
        UsageError: an unknown plugin, or no source.
    """
    short = name.rpartition(".")[2]
    cls = PLUGINS.get(short)
    if cls is None:
        raise UsageError(f"token plugin {name!r} is not supported; sandport ws has "
                         f"{', '.join(PLUGINS)}")
    if not source:
        raise UsageError(f"--token-plugin {short} needs --token-source")
    return cls(source)
