"""The doctor's plain data: the hops, a row and a report (the JSON of
``docs/doctor.schema.json``), the facts a walk is given (:class:`Subject` and the facts of
its ports, forwards, token and isolation) and the :class:`Walk` that collects rows and
skips the later hops of a port once one failed.

Owns: these types and ``--port``'s accepted forms. Must not touch: sockets, files, the
network (the walk in :mod:`sandport.doctor.walk` does).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from sandport.errors import UsageError

#: The hops, in walking order.
HOPS = ("gateway", "route", "host network", "guest reachability", "guest service",
        "end to end")
OK, FAIL, WARN, SKIP = "ok", "fail", "warn", "skip"
PROBE_TIMEOUT = 2.0  # per protocol probe; a walk stays well under 5 s when a hop is down
SCHEMA_VERSION = 1
#: The forms of ``--port`` (and ``?port=``): a name (``vnc``), a number (``8080``) or a
#: number with its protocol (``8080/tcp``, ``53/udp``), as ``sandport forward list`` shows.
PORT_FORM = re.compile(r"[A-Za-z0-9_-]{1,32}(?:/(?:tcp|udp))?")
PORT_FORMS = ("a name (vnc, agent), a number (8080) or a number with its protocol "
              "(8080/tcp, 53/udp), as `sandport forward list` shows them")


def check_port(text: str) -> str:
    """``text`` if it is a port the doctor can be asked about (:data:`PORT_FORMS`).

    Raises:
        UsageError: any other form; the message names the accepted ones.
    """
    if PORT_FORM.fullmatch(text) is None:
        shown = text if len(text) <= 40 and text.isprintable() else f"{text[:40]!r}..."
        raise UsageError(f"port {shown!r} is not a port the doctor knows how to name: give "
                         f"{PORT_FORMS}")
    return text


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    """One check of the walk.

    Attributes:
        hop: one of :data:`HOPS`.
        check: what was checked, in a few words (``bridge address``).
        status: ``ok``, ``fail``, ``warn`` (works, but worth knowing) or ``skip``.
        evidence: what was found: addresses, states, what a server said.
        fix: for a failure, the likely cause and what to do, in a sentence.
        port: the exposed port the row is about (its name); "" for the whole sandbox.
    """

    hop: str
    check: str
    status: str
    evidence: str
    fix: str = ""
    port: str = ""

    def as_json(self) -> dict[str, str]:
        """The row as ``--json`` and the API give it."""
        return {"hop": self.hop, "check": self.check, "status": self.status,
                "evidence": self.evidence, "fix": self.fix, "port": self.port}


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """Every row of one walk."""

    sandbox: str | None
    rows: tuple[Row, ...]
    took: float

    @property
    def healthy(self) -> bool:
        """No check failed."""
        return all(r.status != FAIL for r in self.rows)

    @property
    def failed(self) -> Row | None:
        """The first failing check: the broken hop."""
        return next((r for r in self.rows if r.status == FAIL), None)

    def with_rows(self, before: list[Row]) -> Report:
        """The report with ``before`` (the CLI's own gateway rows) in front."""
        return Report(sandbox=self.sandbox, rows=(*before, *self.rows), took=self.took)

    def as_json(self) -> dict[str, Any]:
        """The report as ``sandport doctor --json`` prints it (docs/doctor.schema.json)."""
        failed = self.failed
        return {
            "version": SCHEMA_VERSION,
            "sandbox": self.sandbox,
            "healthy": self.healthy,
            "failed": failed.as_json() if failed is not None else None,
            "took": round(self.took, 3),
            "rows": [r.as_json() for r in self.rows],
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Report:
        """A report the API sent."""
        return cls(sandbox=doc.get("sandbox"), took=float(doc.get("took", 0.0)),
                   rows=tuple(Row(**r) for r in doc.get("rows", [])))


# -- what the gateway tells the doctor --------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardFacts:
    """One host forward of a port.

    Attributes:
        id: the forward's id (``f3``).
        protocol: ``tcp`` or ``udp``.
        host: the host address it listens on (``0.0.0.0``: every address).
        host_port: the host port.
        mode: ``kernel`` (nft DNAT) or ``proxy`` (the userspace relay).
        rule: a kernel forward's nft rule comment (how its rules are found).
        name: its name: the profile port's (``vnc``) for the forward a sandbox is made
            with, ``8080/tcp`` for a published one (only those can be added again alone).
    """

    id: str
    protocol: str
    host: str
    host_port: int
    mode: str
    rule: str = ""
    name: str = ""

    @property
    def published(self) -> bool:
        """A port published by number (``-p``, ``POST .../forwards``): removing it and
        adding it again gives the same forward."""
        return "/" in self.name


@dataclass(frozen=True, slots=True, kw_only=True)
class PortFacts:
    """One port of the sandbox as the walk sees it.

    Attributes:
        name: its name (``vnc``, ``agent``, a number for an app port).
        guest_port: the port inside the guest (0 for a Unix socket on the host).
        protocol: ``rfb``, ``http``, ``agent``, ``tcp`` or ``udp``.
        path: a Unix socket serving it instead of the guest's address (a VM's console).
        forwards: its host forwards.
        ws: whether the WebSocket bridge serves it (``/s/{id}/ports/{name}/ws``).
        managed: sandport started the service behind it (a profile's port of its own
            sandbox: the desktop's Xvnc, a VM image's services; the guest agent). False
            for a port the user serves (``-p 18080:8080``) and for every port of an
            attached target: sandport neither starts nor restarts those.
    """

    name: str
    guest_port: int
    protocol: str
    path: str = ""
    forwards: tuple[ForwardFacts, ...] = ()
    ws: bool = False
    managed: bool = False

    def matches(self, asked: str) -> bool:
        """Whether ``--port asked`` means this port: its name, its guest port's number,
        or that number with its protocol (``8080/tcp``, ``53/udp``)."""
        if asked == self.name:
            return True
        number, _, proto = asked.partition("/")
        if self.path or number != str(self.guest_port):
            return False
        return not proto or proto == ("udp" if self.protocol == "udp" else "tcp")


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenFacts:
    """What the gateway knows of a token presented to the doctor.

    Attributes:
        verdict: ``own`` (the sandbox's token), ``grant`` (an access token of it),
            ``expired``, ``revoked``, ``other`` (another sandbox's), ``deleted`` (a
            deleted sandbox's) or ``unknown``.
        detail: the words for it (its scope and expiry, the other sandbox, when deleted).
        allows: for a grant: whether it opens the port asked about.
    """

    verdict: str
    detail: str
    allows: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class IsolationFacts:
    """What sandport's own guard holds and counted for a sandbox (``ip sandport``'s host
    isolation, ``bridge sandport``'s anti-spoofing).

    Attributes:
        link: where the sandbox's packets reach the host: the bridge, or an attached
            target's link (where a kernel forward turned ``route_localnet`` on).
        guarded: the host isolation rules for ``link`` are in the table.
        host_drops: packets from the bridge to host services dropped (every sandbox of
            the bridge counts; 0 for an attached target's link).
        localnet_drops: packets from ``link`` to 127.0.0.0/8 dropped.
        agent: the one host service sandboxes reach (``gateway:port``); "" for a link.
        port: the sandbox's bridge port ("" for an attached target: not on the bridge).
        port_guarded: the port's anti-spoofing rules are there, with ``mac`` and its address.
        mac: the MAC sandport gave the guest.
        spoofed: frames the port's rules dropped, by reason (``mac``, ``ip``, ``arp``,
            ``other``).
    """

    link: str
    guarded: bool
    host_drops: int = 0
    localnet_drops: int = 0
    agent: str = ""
    port: str = ""
    port_guarded: bool = False
    mac: str = ""
    spoofed: tuple[tuple[str, int], ...] = ()

    @property
    def spoof_count(self) -> int:
        """Frames dropped for a foreign source (MAC, IPv4 or ARP; not other protocols)."""
        return sum(n for reason, n in self.spoofed if reason != "other")

    def spoof_words(self) -> str:
        """``mac 0, ip 3, arp 12``."""
        return ", ".join(f"{reason} {n}" for reason, n in self.spoofed if reason != "other")


@dataclass(frozen=True, slots=True, kw_only=True)
class Subject:
    """Everything the walk needs of one sandbox (the gateway builds it).

    ``known`` False means there is no such sandbox; ``gone`` then says what happened
    to it (deleted when), if anything is known.
    """

    sandbox: str
    known: bool
    gone: str = ""
    state: str = ""
    reason: str = ""
    ip: str = ""
    bridge: str = ""
    pool_gateway: str = ""  # the bridge's expected address, "10.201.0.1/16"
    link: str = ""  # the host end of the sandbox's link (veth or TAP)
    ports: tuple[PortFacts, ...] = ()
    vnc_password: str | None = None
    service_failure: str | None = None  # the backend's word on an exited guest service
    logs: str = ""  # where the guest's logs are ("" when sandport keeps none: attached)
    #: The backend (``netns``, ``qemu``, ``external``) and whether it restarts the guest
    #: services it started when they exit (a namespace's desktop does; a VM does not).
    backend: str = ""
    restarts_services: bool = False
    nft_rules: tuple[tuple[str, str], ...] = ()  # (chain, comment) of our table
    chains: tuple[str, str] = ("", "")  # our (prerouting, output) chains
    ws_base: str = ""  # ws://host:port of the bridge
    token: str = ""  # the sandbox's own token (for the end-to-end WebSocket probe)
    forward_host: str = "127.0.0.1"  # where host forwards are reached from this host
    token_facts: TokenFacts | None = None
    port_asked: str | None = None
    known_ports: tuple[str, ...] = ()
    #: The guest agent's latest report (its /health: listening sockets, processes) and
    #: its age in seconds, if the sandbox runs an agent that reported.
    agent_report: dict[str, Any] | None = None
    agent_report_age: float | None = None
    #: Forwards the store has for the sandbox that the gateway does not run (described).
    unrun_forwards: tuple[str, ...] = ()
    #: An attached target (sandport did not create it): the host network hop checks the
    #: interface it is reached through (``link``), not sandport's bridge.
    external: bool = False
    #: The network namespace (file) an attached target lives in: the walk cannot look
    #: into it from the host, so its guest hops are proven end to end.
    netns: str = ""
    #: sandport's guard for the sandbox (None: nothing to guard, or nft is missing).
    isolation: IsolationFacts | None = None
    pid: int = field(default_factory=os.getpid)


class Walk:
    """Rows in walking order; after a failure the later hops of that port are skipped."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self._blocked: dict[str, str] = {}  # port ("" = all) -> why later hops are skipped

    def blocked(self, port: str = "") -> str | None:
        """Why checks of ``port`` are skipped, or None."""
        return self._blocked.get("") or (self._blocked.get(port) if port else None)

    def skipped(self, hop: str, check: str, port: str = "") -> bool:
        """Record ``check`` as skipped if an earlier hop of ``port`` failed (then the
        check is not run at all: a dead hop costs no timeouts further on)."""
        why = self.blocked(port)
        if why is None:
            return False
        self.rows.append(Row(hop=hop, check=check, status=SKIP, port=port,
                             evidence=f"skipped: {why}"))
        return True

    def add(self, hop: str, check: str, ok: bool | None, evidence: str, fix: str = "",
            *, port: str = "", warn: bool = False) -> bool:
        """Record a check (``ok`` None: informational); False if it failed or is skipped."""
        why = self.blocked(port)
        if why is not None:
            self.rows.append(Row(hop=hop, check=check, status=SKIP, port=port,
                                 evidence=f"skipped: {why}"))
            return False
        status = OK if ok or ok is None else (WARN if warn else FAIL)
        self.rows.append(Row(hop=hop, check=check, status=status, evidence=evidence,
                             fix=fix if status != OK else "", port=port))
        if status == FAIL:
            self._blocked[port] = f"{hop} failed ({check})"
        return status != FAIL


# -- the walk ---------------------------------------------------------------------------
