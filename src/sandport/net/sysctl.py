"""The host settings (``/proc/sys``) gateways changed, with their values before: the ledger.

Kernel forwards need a few per-interface IPv4 settings (:func:`sandport.net.nft.apply`
says which): ``route_localnet`` and ``forwarding`` on the link the guest is reached
through, ``forwarding`` where remote clients arrive. They are not sandport's to keep:
each is written to the ledger *before* it is changed, and given back when no forward of
any gateway needs it any more: when the last forward goes, at a clean stop, and, after a
``kill -9``, at the next start on the same bridge (whose reconcile gives back what the
adopted forwards do not need). Only ``net/ipv4/conf/<interface>/{forwarding,
route_localnet}`` can be recorded; ``all`` and ``default`` (``all/forwarding`` is the
global ``net.ipv4.ip_forward``) are refused.

The ledger is one file for the whole host, :data:`LEDGER_DIR`/``sysctl.json`` (mode 0600,
replaced atomically, under ``flock`` on ``sysctl.lock`` beside it), not one per state dir:
the settings are the host's, and two gateways that both need ``eth0``'s ``forwarding``
must not give it back under each other. Each change lists its *owners* (the gateways
that need it, by bridge: one gateway per bridge) and why; the value goes back when the
last owner lets go, or when no owner's bridge exists any more (whatever removed a killed
gateway's bridge also ended its kernel forwards). ``/run`` is emptied at boot, as the
kernel's settings are, so a reboot never "restores" a value onto a fresh kernel.

A value is given back only onto what it was taken from: a change whose interface is gone,
or is another interface by now (another ``ifindex`` under the same name), is dropped
without a write; a value someone else changed since (it no longer reads what sandport
wrote) is left as they set it, and the change dropped. A gateway in another network
namespace sees other interfaces under the same names: each change names its namespace,
and only gateways there touch it.

Owns: the ledger file and the recorded settings. Must not touch: any setting it did not
change itself (one that already had the wanted value is not recorded, so never given
back), the global ``net.ipv4.ip_forward``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import socket
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Per boot, shared by every gateway of this host (as the bridge locks are).
LEDGER_DIR = Path("/run/sandport")
LEDGER_FILE = "sysctl.json"
LOCK_FILE = "sysctl.lock"
PROC_SYS = Path("/proc/sys")
VERSION = 1
KEYS = ("forwarding", "route_localnet")
_IFNAME = re.compile(r"[^/\s]{1,15}")
_PATH = re.compile(r"net/ipv4/conf/(?P<ifname>[^/\s]{1,15})/(?P<key>[a-z_]+)")


def conf(ifname: str, key: str) -> str:
    """The ``/proc/sys`` path of an interface's IPv4 setting ``key``."""
    return f"net/ipv4/conf/{ifname}/{key}"


def interface_of(path: str) -> str:
    """The interface a recordable path belongs to.

    Raises:
        ValueError: not ``net/ipv4/conf/<interface>/<forwarding|route_localnet>``, or
            ``all``/``default`` (host-wide: never sandport's to change).
    """
    m = _PATH.fullmatch(path)
    if m is None or m["key"] not in KEYS:
        raise ValueError(f"{path!r} is not an interface's {' or '.join(KEYS)} setting")
    if m["ifname"] in ("all", "default", ".", ".."):
        raise ValueError(f"{path!r} is host-wide: sandport changes only interfaces' settings")
    return m["ifname"]


def dotted(path: str) -> str:
    """``net.ipv4.conf.eth0.forwarding``: the name ``sysctl`` shows."""
    return path.replace("/", ".")


def read(path: str) -> str:
    """The current value of a ``/proc/sys`` path (``FileNotFoundError``: no such interface)."""
    return (PROC_SYS / path).read_text().strip()


def ifindex(ifname: str) -> int:
    """The interface's index in this thread's network namespace, 0 when there is none
    (asked of the kernel: ``/sys/class/net`` shows the namespace sysfs was mounted in)."""
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        return 0


def netns() -> int:
    """This thread's network namespace (its inode): the one ``/proc/sys/net`` shows."""
    return os.stat("/proc/thread-self/ns/net").st_ino


@dataclass(frozen=True, slots=True, kw_only=True)
class Setting:
    """A value a forward needs.

    Attributes:
        path: under ``/proc/sys`` (see :func:`conf`).
        value: what it must read.
        why: for the log and the ledger, in words.
    """

    path: str
    value: str
    why: str

    def __post_init__(self) -> None:
        interface_of(self.path)


@dataclass(slots=True, kw_only=True)
class Change:
    """One recorded change: what the setting was before sandport wrote ``value``.

    Attributes:
        path: under ``/proc/sys``.
        before: its value before.
        value: what sandport wrote.
        ifindex: the interface's index then (a new interface of that name is not it).
        netns: the network namespace it is in (its inode); the ledger is the host's, and
            a gateway in another namespace sees other interfaces under the same names.
        owners: ``{owner: why}``, the gateways (by bridge) that need it.
    """

    path: str
    before: str
    value: str
    ifindex: int
    netns: int
    owners: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The ledger file's form."""
        return {"path": self.path, "before": self.before, "value": self.value,
                "ifindex": self.ifindex, "netns": self.netns,
                "owners": dict(sorted(self.owners.items()))}

    @classmethod
    def from_json(cls, doc: Any) -> Change:
        """One entry of the ledger file, checked.

        Raises:
            ValueError: not a change this module writes.
        """
        if not isinstance(doc, dict):
            raise ValueError("an entry is not an object")
        path, before, value = doc.get("path"), doc.get("before"), doc.get("value")
        index, ns, owners = doc.get("ifindex"), doc.get("netns"), doc.get("owners")
        if not (isinstance(path, str) and isinstance(before, str) and before.isdigit()
                and isinstance(value, str) and value.isdigit() and isinstance(index, int)
                and isinstance(ns, int) and isinstance(owners, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in owners.items())):
            raise ValueError(f"malformed entry {doc!r}")
        interface_of(path)
        for owner in owners:
            if not _IFNAME.fullmatch(owner) or owner in (".", ".."):
                raise ValueError(f"owner {owner!r} is not an interface name")
        return cls(path=path, before=before, value=value, ifindex=index, netns=ns,
                   owners=owners)


class Ledger:
    """The host's ledger, seen by one owner (a gateway, named by its bridge) in this
    thread's network namespace (changes made in other namespaces are kept as they are).

    Every method takes the ledger's lock for its whole read-change-write, so gateways in
    other processes (or threads) never interleave; they block for milliseconds.
    """

    def __init__(self, owner: str, directory: Path = LEDGER_DIR) -> None:
        self.owner = owner
        self.directory = directory
        self.file = directory / LEDGER_FILE
        self._elsewhere: list[Change] = []  # other namespaces', while the lock is held

    def changes(self) -> list[Change]:
        """Every recorded change (of any owner) in this network namespace."""
        with self._locked() as changes:
            return list(changes.values())

    def held(self) -> dict[str, Change]:
        """The changes this owner holds, by path."""
        return {c.path: c for c in self.changes() if self.owner in c.owners}

    def take(self, wanted: Iterable[Setting]) -> None:
        """Make each setting read its value, recording it first; this owner holds it.

        A setting that already reads its value and that no gateway changed is left alone
        (not recorded: never given back). An interface that is gone is skipped.
        """
        with self._locked() as changes:
            for want in wanted:
                change = changes.get(want.path)
                if change is not None:
                    if change.owners.get(self.owner) != want.why:
                        change.owners[self.owner] = want.why
                        self._save(changes)
                    with contextlib.suppress(FileNotFoundError):
                        if read(want.path) != want.value:  # reset behind our back: again
                            _write(want.path, want.value, want.why)
                    continue
                try:
                    before = read(want.path)
                except FileNotFoundError:
                    continue  # the interface went away meanwhile: nothing to do
                if before == want.value:
                    continue
                changes[want.path] = Change(
                    path=want.path, before=before, value=want.value,
                    ifindex=ifindex(interface_of(want.path)), netns=netns(),
                    owners={self.owner: want.why})
                self._save(changes)  # recorded before it is changed
                try:
                    _write(want.path, want.value, f"{want.why} (was {before})")
                except OSError:
                    del changes[want.path]
                    self._save(changes)
                    raise

    def give_back(self, keep: Collection[str] = ()) -> None:
        """This owner lets go of every change but those in ``keep`` (paths); a change no
        owner holds any more gets its value back."""
        with self._locked() as changes:
            for path, change in list(changes.items()):
                if self.owner not in change.owners or path in keep:
                    continue
                del change.owners[self.owner]
                if not change.owners:
                    _restore(change)
                    del changes[path]
                self._save(changes)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Change]]:
        """This namespace's changes by path, under the ledger's lock; changes whose
        interface is gone or was replaced are dropped, owners whose bridge is gone too."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o755)
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            here = netns()
            changes: dict[str, Change] = {}
            self._elsewhere = []
            for change in self._load():
                if change.netns != here:
                    self._elsewhere.append(change)
                else:
                    changes[change.path] = change
            dirty = False
            for path, change in list(changes.items()):
                if not _same_interface(change):
                    log.info("sysctl %s: its interface is gone or was replaced; nothing to "
                             "give back", dotted(path))
                    del changes[path]
                    dirty = True
                    continue
                gone = [o for o in change.owners if not ifindex(o)]
                for owner in gone:  # no bridge, no gateway, no kernel forward of it
                    del change.owners[owner]
                    dirty = True
                if gone and not change.owners:
                    _restore(change)
                    del changes[path]
            if dirty:
                self._save(changes)
            yield changes
        finally:
            self._elsewhere = []
            os.close(fd)  # releases the flock

    def _load(self) -> list[Change]:
        try:
            text = self.file.read_text()
        except FileNotFoundError:
            return []
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict) or doc.get("version") != VERSION:
                raise ValueError(f"not a version {VERSION} ledger")
            entries = doc.get("changes")
            if not isinstance(entries, list):
                raise ValueError("no list of changes")
            return [Change.from_json(entry) for entry in entries]
        except ValueError as exc:
            kept = self.file.with_name(f"{LEDGER_FILE}.bad")
            os.replace(self.file, kept)
            log.warning("sysctl ledger %s is unreadable (%s): moved to %s; the settings it "
                        "recorded are not given back automatically", self.file, exc, kept)
            return []

    def _save(self, changes: dict[str, Change]) -> None:
        """Replace the ledger file atomically (mode 0600); none when nothing is recorded."""
        every = [*self._elsewhere, *changes.values()]
        if not every:
            self.file.unlink(missing_ok=True)
            return
        doc = {"version": VERSION, "changes": [c.as_json() for c in every]}
        tmp = self.file.with_name(f".{LEDGER_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.file)


def _same_interface(change: Change) -> bool:
    index = ifindex(interface_of(change.path))
    return index != 0 and index == change.ifindex


def _write(path: str, value: str, why: str) -> None:
    (PROC_SYS / path).write_text(value)
    log.info("sysctl %s = %s: %s", dotted(path), value, why)


def _restore(change: Change) -> None:
    """Give a change's value back, unless someone else changed it since."""
    try:
        now = read(change.path)
    except FileNotFoundError:
        return
    if now != change.value:
        log.info("sysctl %s reads %s, not the %s sandport wrote: left as it is",
                 dotted(change.path), now, change.value)
        return
    try:
        (PROC_SYS / change.path).write_text(change.before)
    except OSError as exc:
        log.warning("sysctl %s could not be given back (%s): it stays %s",
                    dotted(change.path), exc, now)
        return
    log.info("sysctl %s = %s: given back, no kernel forward needs it", dotted(change.path),
             change.before)
