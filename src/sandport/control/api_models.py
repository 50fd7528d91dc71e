"""The shapes of the gateway's HTTP API: what goes in and what comes out (pydantic).

Owns: the request and response models of :mod:`sandport.control.api` and
:mod:`sandport.control.agent_api` (their names are the OpenAPI document's schema names),
and the refusals every route can answer with (:data:`ERRORS`, :data:`CONFLICT`).

Must not touch: the gateway. A model converts a record (``SessionOut.of``) at most; the
routes do the calls.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from sandport.control.store import SessionRecord
from sandport.errors import UsageError
from sandport.sandbox.external import MAX_NAME, MAX_REASON, printable


class ErrorOut(BaseModel):
    """Every refusal: a short error name and a message for people."""

    error: str
    message: str


#: The refusals every /api route can answer with.
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "no token"},
    403: {"model": ErrorOut, "description": "a wrong token"},
    404: {"model": ErrorOut, "description": "no such sandbox, session, forward or token"},
}
CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorOut, "description": "a conflict: a port taken, a session ended"}}


def _port_key(value: str) -> str:
    """A port's name or number; ``8080/tcp`` (as ``forward list`` names a published port)
    is taken as ``8080``: what a token opens (the WebSocket bridge, the desktop) is TCP."""
    key, _, proto = value.partition("/")
    if proto not in ("", "tcp") or re.fullmatch(r"[A-Za-z0-9_-]{1,32}", key) is None:
        raise ValueError(f"{value[:40]!r} is not a port: give its name (vnc), its number "
                         "(8080) or its number with /tcp (8080/tcp); a token opens TCP ports "
                         "only")
    return key


PortKey = Annotated[str, AfterValidator(_port_key)]
SessionKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


def _fit_for_logs(limit: int) -> AfterValidator:
    """Free text that reaches logs: printable, at most ``limit`` characters (a 422 that
    names the field otherwise; see :func:`sandport.sandbox.external.printable`)."""
    def check(value: str) -> str:
        try:
            return printable(value, "the text", limit)
        except UsageError as exc:
            raise ValueError(str(exc)) from None

    return AfterValidator(check)


#: A name people give (an attached target's): shown in lists, written to logs.
Name = Annotated[str, _fit_for_logs(MAX_NAME)]
#: Words for logs and close reasons.
Reason = Annotated[str, _fit_for_logs(MAX_REASON)]


class AttachIn(BaseModel):
    """A guest sandport did not create, to front (``sandport attach``)."""

    model_config = ConfigDict(extra="forbid")

    ip: str = Field(description="the target's IPv4 address (in the gateway's "
                                "--attach-subnet networks)", max_length=15)
    name: Name = Field("", max_length=MAX_NAME, description="its owner's name for it "
                       "(printable: no control characters)")
    profile: Literal["desktop", "http", "tcp"] = Field(
        "desktop", description="what readiness speaks: desktop (VNC on 5901), http (80 or "
                               "port), tcp (port)")
    port: int = Field(0, ge=0, le=65535, description="primary port of an http/tcp target")
    vnc_port: int = Field(0, ge=0, le=65535, description="host port of a desktop's VNC "
                                                         "forward; 0: a free one")
    publish: list[str] = Field(default_factory=list, max_length=64,
                               description="ports to forward: -p specs; one for the primary "
                                           "port (5901 of a desktop, port) sets its host "
                                           "side, every other one is an extra forward")
    vnc_password: str | None = Field(None, max_length=64,
                                     description="the desktop's VNC password")
    interface: str = Field("", max_length=15, pattern=r"^[A-Za-z0-9_.@-]{0,15}$",
                           description="the host interface it is reached through (checked)")
    forward_mode: Literal["proxy", "kernel"] = Field(
        "proxy", description="its forwards: the userspace relay, or nft DNAT (not with "
                             "netns)")
    netns: str = Field("", max_length=64, pattern=r"^[A-Za-z0-9_.-]{0,64}$",
                       description="the network namespace it lives in (a container's): an "
                                   "`ip netns` name or the PID of a process in it; ip is "
                                   "then an address in there (127.0.0.1 too)")


class TargetIn(BaseModel):
    """What the owner of an attached target says: it moved (``ip``) or is ``gone``."""

    model_config = ConfigDict(extra="forbid")

    ip: str | None = Field(None, max_length=15, description="its new address")
    gone: bool = Field(False, description="it is gone (its VM or container stopped)")
    reason: Reason = Field("", max_length=MAX_REASON, description="words for logs and close "
                           "reasons (printable: no control characters)")


class SandboxCreate(BaseModel):
    """A sandbox to create."""

    model_config = ConfigDict(extra="forbid")

    profile: Literal["desktop", "echo"] = Field(
        "desktop", description="guest profile: desktop (Xvnc + openbox), echo (TCP/UDP echo "
                               "on 7, HTTP on 80; qemu only)")
    backend: Literal["netns", "qemu"] = Field(
        "netns", description="netns: a network namespace; qemu: a microVM")
    memory_mb: int | None = Field(None, ge=128, le=16384,
                                  description="a VM's memory (qemu; default by profile)")
    vcpus: int | None = Field(None, ge=1, le=8, description="a VM's CPUs (qemu; default 1)")
    publish: list[str] = Field(
        default_factory=list,
        description="host port forwards, docker syntax: [HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp]"
                    "; one for a port the profile exposes (5901 of a desktop) sets that "
                    "port's host side, every other one is an extra forward",
        examples=[["18080:8080", "127.0.0.1:15353:53/udp"]])
    vnc_port: int = Field(0, ge=0, le=65535,
                          description="host port of the VNC forward; 0 picks a free one, or "
                                      "the one a publish spec for 5901 sets")
    session_ttl_seconds: float | None = Field(
        None, gt=0, le=30 * 86400,
        description="also open a session that lasts this long (see /sessions)")


class ForwardsCreate(BaseModel):
    """Ports to forward from the host into a running sandbox."""

    model_config = ConfigDict(extra="forbid")

    publish: list[str] = Field(
        min_length=1, description="docker syntax: [HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp]",
        examples=[["18080:8080"]])


class TokenCreate(BaseModel):
    """An access token to make: valid for ``ttl_seconds``."""

    model_config = ConfigDict(extra="forbid")

    ttl_seconds: float = Field(gt=0, le=30 * 86400, description="how long it is valid")
    ports: list[PortKey] = Field(
        default_factory=list, max_length=64,
        description="guest ports (names or numbers) it opens; empty: every port")
    kinds: list[Literal["ws", "http"]] = Field(
        default_factory=list,
        description="what it opens: ws (the WebSocket bridge), http (the desktop page); "
                    "empty: both")


class TokenOut(BaseModel):
    """A new access token: shown once."""

    id: str
    token: str
    expires_at: float
    ports: list[str]
    kinds: list[str]
    desktop_url: str = Field(
        description="the desktop page; \"\" when the token cannot open it (a ws-only or "
                    "port-limited token, a sandbox without a desktop)")
    ws_urls: dict[str, str] = Field(
        description="port name: the WebSocket URL of each port the token opens through "
                    "the bridge")


class TokenInfo(BaseModel):
    """An access token as listed (the token itself is never shown again)."""

    id: str
    expires_at: float
    expired: bool
    ports: list[str]
    kinds: list[str]


class TokenList(BaseModel):
    """The access tokens of a sandbox."""

    tokens: list[TokenInfo]


class SessionCreate(BaseModel):
    """A session to open on a sandbox."""

    model_config = ConfigDict(extra="forbid")

    ttl_seconds: float = Field(900, gt=0, le=30 * 86400,
                               description="it expires after this long without credentials")


class SessionOut(BaseModel):
    """A session: ``waiting`` -> ``ready`` -> ``completed`` (or ``expired``, ``cancelled``)."""

    id: str
    sandbox: str
    state: Literal["waiting", "ready", "completed", "expired", "cancelled"]
    reason: str
    credential_id: str | None
    expires_at: float
    created_at: float
    updated_at: float

    @classmethod
    def of(cls, rec: SessionRecord) -> SessionOut:
        """From a store record."""
        return cls(id=rec.id, sandbox=rec.sandbox_id, state=rec.state,  # type: ignore[arg-type]
                   reason=rec.reason, credential_id=rec.credential_id,
                   expires_at=rec.expires_at, created_at=rec.created_at,
                   updated_at=rec.updated_at)


class SessionList(BaseModel):
    """Sessions of a sandbox."""

    sessions: list[SessionOut]


class CredentialsIn(BaseModel):
    """Credentials a guest captured, posted by its agent."""

    model_config = ConfigDict(extra="forbid")

    data: dict[str, Any] = Field(description="whatever the guest captured (stored encrypted)")
    session: SessionKey | None = Field(
        None, description="the session they complete; default: the oldest open one")


class CredentialReceipt(BaseModel):
    """What the gateway did with posted credentials."""

    id: str
    session: SessionOut | None


class Credential(BaseModel):
    """Credentials as stored, decrypted for the admin."""

    id: str
    session: str | None
    created_at: float
    data: dict[str, Any]


class CredentialList(BaseModel):
    """Credentials of a sandbox."""

    credentials: list[Credential]


class Event(BaseModel):
    """One recorded state change."""

    seq: int
    at: float
    kind: str
    sandbox: str | None
    data: dict[str, Any]


class EventList(BaseModel):
    """Events after ``after``, oldest first; ``last`` is the newest seq (for the next call)."""

    events: list[Event]
    last: int


class DoctorRow(BaseModel):
    """One check of the walk: the hop, what was checked, the outcome, the evidence, and
    for a failure the likely cause and the fix."""

    hop: Literal["gateway", "route", "host network", "guest reachability",
                 "guest service", "end to end"]
    check: str
    status: Literal["ok", "fail", "warn", "skip"]
    evidence: str
    fix: str
    port: str = Field(description="the exposed port the row is about; empty: the sandbox")


class DoctorOut(BaseModel):
    """``sandport doctor --json``: every check in walking order; ``failed`` is the first
    failing one, the broken hop (docs/doctor.schema.json)."""

    version: int
    sandbox: str | None
    healthy: bool
    failed: DoctorRow | None
    took: float = Field(description="seconds the walk took")
    rows: list[DoctorRow]


class ForwardList(BaseModel):
    """Forwards of a sandbox."""

    forwards: list[dict[str, Any]]


class Probe(BaseModel):
    """One readiness probe: which hop, how far it got, what the server said."""

    hop: str
    ok: bool
    stage: str
    detail: str
    elapsed_ms: float


class Readiness(BaseModel):
    """The probes that declared the sandbox ready, the monitor's latest, and what
    ``sandport doctor`` found broken when the sandbox degraded (None while healthy)."""

    probes: list[Probe]
    last: Probe | None
    diagnosis: DoctorRow | None = None


class VncAddress(BaseModel):
    """Where a native VNC viewer connects."""

    host: str
    port: int


class AgentStatus(BaseModel):
    """The guest agent's latest report (its /health document) and when it came."""

    report: dict[str, Any] | None
    reported_at: float | None


class SandboxOut(BaseModel):
    """A sandbox as the API shows it."""

    id: str
    state: str
    reason: str
    ip: str
    profile: str
    backend: str = Field("", description="netns, qemu, or external (an attached target)")
    name: str = Field("", description="an attached target's name")
    desktop_url: str = Field(
        description="the desktop page (a VM without one: its console); \"\" when the "
                    "sandbox has neither (an attached target without VNC)")
    token: str
    vnc: VncAddress
    vnc_password: str
    colour: str
    ready_seconds: float | None
    forwards: list[dict[str, Any]]
    readiness: Readiness
    agent: AgentStatus


class SandboxList(BaseModel):
    """Every sandbox of the gateway."""

    sandboxes: list[SandboxOut]
