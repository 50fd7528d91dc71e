"""The gateway: owns the bridge, the sandboxes, their forwards and the HTTP port.

Lifecycle is ``start -> serve -> stop`` (``async with Gateway(config) as gw``):

start:  preflight (capabilities, programs) -> lock the state dir -> admin token and
        secret key -> open the store -> bridge -> agent listener -> adopt what a crashed
        gateway left running (or mark it failed) -> kernel forwards -> HTTP port.
stop:   events end -> HTTP port (browsers get a close code) -> sandboxes -> forwards ->
        bridge -> store and lock. Every step runs even if an earlier one failed.

A gateway that is killed (``kill -9``, a crash) leaves its sandboxes running. The next
start on the same state dir adopts every sandbox whose guest services still run: its
forwards come back on the same host ports (with the same ids), its tokens and access
tokens stay valid, its readiness is probed at once. The others are marked ``failed`` with
the reason and their namespace, link and processes removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import ipaddress
import json
import logging
import os
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from sandport import preflight
from sandport.bridge.server import BridgeConfig, BridgeLimits, BridgeStats, WsBridge
from sandport.config import GatewayConfig, connect_host
from sandport.control.api import agent_app
from sandport.control.app import (
    CONNECT_TIMEOUT,
    GatewayRouter,
    Grant,
    LiveSandbox,
    build_app,
)
from sandport.control.events import EventHub
from sandport.control.forwards import ForwardOptions, ForwardTable, HostForward
from sandport.control.httpserver import HttpServer
from sandport.control.secretbox import DecryptError, SecretBox, load_or_create_key
from sandport.control.store import (
    CredentialRecord,
    EventRecord,
    ForwardRecord,
    GrantRecord,
    SandboxRecord,
    SessionRecord,
    SqliteStore,
    StateStore,
)
from sandport.control.tokens import (
    TokenCheck,
    check_token,
    fingerprint,
    hash_token,
    new_token,
)
from sandport.doctor import (
    ForwardFacts,
    PortFacts,
    Report,
    Row,
    Subject,
    TokenFacts,
    diagnose,
)
from sandport.errors import (
    Conflict,
    PortInUseError,
    SandboxFailed,
    SandboxNotFound,
    StateDirBusy,
    Unauthorized,
    UsageError,
)
from sandport.forward.spec import PortMapping
from sandport.net import netlink, nft
from sandport.net.nsock import netns_path, same_namespace
from sandport.net.pool import AddressPool
from sandport.probe import (
    ProbeResult,
    probe_agent_health,
    probe_http,
    probe_rfb_tcp,
    probe_rfb_ws,
    probe_tcp,
    wait_until,
)
from sandport.sandbox.base import AGENT_PORT, Backend, SandboxSpec
from sandport.sandbox.external import (
    ATTACH_PROFILES,
    ExternalBackend,
    check_target,
    resolve_ip,
    route_to,
)
from sandport.sandbox.netns import NetnsBackend, netns_name, spec_from_record
from sandport.sandbox.profiles import colour_hex, desktop_colour, get_profile
from sandport.sandbox.qemu import QemuBackend
from sandport.sandbox.state import (
    SandboxState,
    SessionState,
    check_session_transition,
    check_transition,
)

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
Probe = Callable[[], Awaitable[ProbeResult]]
RUN_DIR = Path("/run/sandport")  # per-boot locks shared by every gateway on this host
MAX_RESTARTS = 3  # guest service restarts within RESTART_WINDOW before a sandbox fails
RESTART_WINDOW = 300.0
HEARTBEAT_SECONDS = 30.0  # bridge pings; a browser that stops answering is closed (1011)
GATEWAY_FILE = "gateway.json"  # in the state dir: pid, URL and admin token of the gateway
#: In the state dir, mode 0600: the admin token of the API, kept across restarts.
ADMIN_TOKEN_FILE = "admin-token"  # noqa: S105 - a file name, not a secret
#: In the state dir, mode 0600, unless the config names another: the key sealing secrets.
SECRET_KEY_FILE = "secret.key"  # noqa: S105 - a file name, not a secret
DEFAULT_SESSION_TTL = 900.0


def _insecure_client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _probe_json(p: ProbeResult) -> dict[str, Any]:
    return {"hop": p.hop, "ok": p.ok, "stage": str(p.stage), "detail": p.detail,
            "elapsed_ms": round(p.elapsed * 1000, 1)}


def _take_lock(path: Path, what: str, hint: str) -> TextIO:
    """flock ``path`` for this process (released when the file closes, also on a crash).

    The holder deletes the file when it stops (:func:`_release_lock`), so a lock taken on
    a file that was deleted meanwhile is no lock: then it is taken again on the new one.

    Raises:
        StateDirBusy: another live gateway holds it; the message names its pid.
    """
    for _ in range(10):
        lock = open(path, "a+")  # noqa: SIM115 - held until Gateway.stop()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise StateDirBusy(f"{what} is in use by gateway pid {holder}",
                                   hint=hint) from None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # deleted by its last holder between our open and flock
            lock.close()
            continue
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        return lock
    raise StateDirBusy(f"{what}: its lock file keeps being replaced", hint=hint)


def _release_lock(lock: TextIO, *, delete: bool) -> None:
    """Release a lock from :func:`_take_lock`; ``delete`` removes its file first."""
    if delete:
        with contextlib.suppress(OSError):
            os.unlink(lock.name)
    lock.close()


def _forward_facts(f: HostForward) -> ForwardFacts:
    """A forward as the doctor sees it."""
    return ForwardFacts(id=f.id, protocol=f.mapping.protocol, host=f.mapping.host_ip,
                        host_port=f.host_port, mode=f.mode,
                        rule=f.rule().comment if f.mode == "kernel" else "")


def _when(at: float) -> str:
    """A Unix time as the doctor says it: UTC, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def _quiet(_: str) -> None:
    pass


@dataclass(slots=True, kw_only=True)
class Sandbox:
    """A sandbox the gateway runs, with its forwards and readiness evidence."""

    spec: SandboxSpec
    live: LiveSandbox
    token: str
    backend: Backend
    probes: list[ProbeResult] = field(default_factory=list)
    last_probe: ProbeResult | None = None
    ready_seconds: float | None = None
    #: Expiry timers of the sandbox's extra access tokens, by grant id.
    grant_timers: dict[str, asyncio.TimerHandle] = field(default_factory=dict)
    #: The guest agent's token (hashed) and its latest report (its /health document).
    agent_token_hash: str = ""
    agent_report: dict[str, Any] | None = None
    agent_report_at: float | None = None
    #: The doctor's failing check when it last degraded (None while healthy).
    diagnosis: Row | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxInfo:
    """What a caller gets back about a ready sandbox (the demo prints it as JSON)."""

    id: str
    ip: str
    state: str
    profile: str
    token: str
    desktop_url: str
    vnc_host: str
    vnc_port: int
    vnc_password: str
    colour: str
    ready_seconds: float | None
    forwards: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""
    #: Readiness: the probes that declared it ready, and the monitor's latest.
    probes: list[dict[str, Any]] = field(default_factory=list)
    last_probe: dict[str, Any] | None = None
    #: The doctor's failing check when the sandbox degraded (None while healthy).
    diagnosis: dict[str, Any] | None = None
    #: The backend (``netns``, ``qemu``, ``external``) and an attached target's name.
    backend: str = ""
    name: str = ""
    #: The guest agent's latest report, and when it came (Unix time).
    agent: dict[str, Any] | None = None
    agent_report_at: float | None = None

    def as_json(self) -> dict[str, Any]:
        """The SANDPORT-READY document."""
        return {
            "id": self.id,
            "ip": self.ip,
            "state": self.state,
            "profile": self.profile,
            "desktop_url": self.desktop_url,
            "vnc": {"host": self.vnc_host, "port": self.vnc_port},
            "vnc_password": self.vnc_password,
            "token": self.token,
            "colour": self.colour,
            "ready_seconds": self.ready_seconds,
            "forwards": self.forwards,
            "reason": self.reason,
            "readiness": {"probes": self.probes, "last": self.last_probe,
                          "diagnosis": self.diagnosis},
            "backend": self.backend,
            "name": self.name,
            "agent": {"report": self.agent, "reported_at": self.agent_report_at},
        }


class Gateway:
    """sandport's gateway process, usable from Python as well as from the CLI."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self._sandboxes: dict[str, Sandbox] = {}
        self._store: StateStore | None = None
        self._box: SecretBox | None = None
        #: Every recorded state change goes to the log and to live watchers (SSE).
        self.events = EventHub()
        #: Guest agents' port on the bridge address (agent routes only).
        self._agent_http: HttpServer | None = None
        self._session_timers: dict[str, asyncio.TimerHandle] = {}
        #: Set (and replaced) on every session change: long polls wait on it.
        self._session_changed = asyncio.Event()
        self._pool: AddressPool | None = None
        self._http: HttpServer | None = None
        #: The gateway's port: WebSocket bridge, TLS detection; other requests go to _http.
        self._front: WsBridge | None = None
        self._lock_file: TextIO | None = None
        self._bridge_lock: TextIO | None = None
        #: The backends by name (netns, qemu); a sandbox knows its own.
        self._backends: dict[str, Backend] = {}
        self._bridge_created = False
        self.forwards = ForwardTable(config.net.bridge)
        #: Readiness probes of ready sandboxes, by sandbox id (see _monitor).
        self._monitors: dict[str, asyncio.Task[None]] = {}
        #: For the admin routes (/api/forwards, /metrics); new on every start.
        #: For the API, /metrics and the CLI; created at the first start in the state dir
        #: (ADMIN_TOKEN_FILE, mode 0600) and the same at every start after.
        self.admin_token = ""
        self._admin_hash = ""

    # Registry for the HTTP app ---------------------------------------------------------

    def lookup(self, sandbox_id: str) -> LiveSandbox | None:
        """The live sandbox with that id."""
        sb = self._sandboxes.get(sandbox_id)
        return None if sb is None else sb.live

    def count(self) -> int:
        """How many sandboxes run."""
        return len(self._sandboxes)

    @property
    def admin_token_hash(self) -> str:
        """Stored form of this run's admin token."""
        return self._admin_hash

    @property
    def bridge_stats(self) -> BridgeStats | None:
        """The WebSocket bridge's counters, per sandbox and port (``/metrics``)."""
        return self._front.stats if self._front is not None else None

    async def forward_listing(self) -> list[dict[str, Any]]:
        """Every forward with its counters (``/api/forwards``, ``/metrics``)."""
        return await self.forwards.listing()

    # Lifecycle --------------------------------------------------------------------------

    @property
    def http_port(self) -> int:
        """The bound HTTP port (useful when the config asked for port 0)."""
        if self._front is None:
            raise RuntimeError("gateway not started")
        return self._front.bound_port

    @property
    def base_url(self) -> str:
        """``http://host:port`` as printed for people."""
        return f"{self.config.scheme}://{self.config.url_host}:{self.http_port}"

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self, progress: Progress = _quiet) -> None:
        """Check the machine, take the state dir, clean leftovers, open the HTTP port."""
        cfg = self.config
        preflight.require_capabilities()
        programs = preflight.require_programs()
        novnc = preflight.find_novnc()
        self._backends = {"external": ExternalBackend(), "netns": NetnsBackend(programs),
                          "qemu": QemuBackend(image_cache=cfg.image_cache, accel=cfg.qemu_accel)}
        self._lock_state_dir()
        self.events, self._session_changed = EventHub(), asyncio.Event()  # this loop's
        try:
            self._load_admin_token()
            key_file = cfg.secret_key_file or cfg.state_dir / SECRET_KEY_FILE
            self._box = SecretBox(load_or_create_key(key_file,
                                                     create=cfg.secret_key_file is None))
            self._store = SqliteStore(cfg.state_dir / "sandport.db")
            self._pool = AddressPool(cfg.net.subnet, self._store)
            progress(f"bridge {cfg.net.bridge} {cfg.net.gateway_ip}/{cfg.net.subnet.prefixlen}")
            gateway_iface = ipaddress.IPv4Interface(
                f"{cfg.net.gateway_ip}/{cfg.net.subnet.prefixlen}"
            )
            self._bridge_created = await asyncio.to_thread(
                netlink.ensure_bridge, cfg.net.bridge, gateway_iface
            )
            self._agent_http = HttpServer(agent_app(self), str(cfg.net.gateway_ip),
                                          cfg.agent_port, what="agent port")
            await self._agent_http.start()
            # Sandboxes a killed gateway left: adopted with their forwards, or failed.
            await self._recover(progress)
            # Kernel forwards: exactly this gateway's; a killed one's stale rules are gone.
            await self.forwards.reconcile()
            app = build_app(self, novnc_dir=novnc, api=self)
            # The app listens on a Unix socket next to the bridge lock (one gateway per
            # bridge); the front door below passes it what is not a bridge request.
            app_socket = RUN_DIR / f"bridge-{cfg.net.bridge}.http.sock"
            self._http = HttpServer(app, cfg.listen_host, cfg.listen_port,
                                    unix_path=app_socket)
            await self._http.start()
            self._front = WsBridge(BridgeConfig(
                listen_host=cfg.listen_host, listen_port=cfg.listen_port,
                router=GatewayRouter(self), app_socket=str(app_socket), tls=cfg.tls,
                origins=cfg.origins, trusted_proxies=cfg.trusted_proxies,
                limits=BridgeLimits(connect_timeout=CONNECT_TIMEOUT,
                                    heartbeat=HEARTBEAT_SECONDS,
                                    max_connections=cfg.ws_max_sessions,
                                    max_per_client=cfg.ws_max_per_client)))
            await self._front.start()
            self._write_gateway_file()
        except BaseException:
            # A start that fails (its port taken, say) after adopting sandboxes leaves them
            # running and recorded for the next start; it does not destroy them.
            await self.stop(keep_sandboxes=True)
            raise
        log.info("gateway up: %s, state %s", self.base_url, cfg.state_dir)

    def _load_admin_token(self) -> None:
        path = self.config.state_dir / ADMIN_TOKEN_FILE
        try:
            token = path.read_text().strip()
        except FileNotFoundError:
            token = ""
        if not token:
            token = new_token()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
            log.info("admin token created in %s", path)
        os.chmod(path, 0o600)
        self.admin_token = token
        self._admin_hash = hash_token(token)

    @property
    def gateway_file(self) -> Path:
        """``<state dir>/gateway.json``: how local tools reach this gateway (mode 0600)."""
        return self.config.state_dir / GATEWAY_FILE

    def _write_gateway_file(self) -> None:
        doc = {"pid": os.getpid(), "url": self.base_url, "admin_token": self.admin_token,
               "bridge": self.config.net.bridge}
        tmp = self.gateway_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        tmp.replace(self.gateway_file)

    def _lock_state_dir(self) -> None:
        """Take the state dir and the bridge: one gateway each, or a clear refusal.

        Two gateways on one state dir would remove each other's sandboxes as leftovers;
        two on one bridge would re-address it and delete it under each other.
        """
        state_dir = self.config.state_dir
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (state_dir / "sandboxes").mkdir(exist_ok=True, mode=0o700)
        self._lock_file = _take_lock(
            state_dir / "gateway.lock", f"state dir {state_dir}",
            "stop that gateway first, or give this one its own --state-dir")
        RUN_DIR.mkdir(parents=True, exist_ok=True, mode=0o755)
        bridge = self.config.net.bridge
        try:
            self._bridge_lock = _take_lock(
                RUN_DIR / f"bridge-{bridge}.lock", f"bridge {bridge}",
                "give this gateway its own --bridge and --subnet")
        except BaseException:
            self._lock_file.close()
            self._lock_file = None
            raise

    @property
    def agent_url(self) -> str:
        """Where guest agents reach this gateway: the agent port on the bridge address."""
        return f"http://{self.config.net.gateway_ip}:{self.config.agent_port}"

    def _unseal_secrets(self, rec: SandboxRecord) -> dict[str, str]:
        if self._box is None or not rec.secrets:
            raise DecryptError(f"sandboxes/{rec.id}: no sealed secrets (an older store)")
        doc = json.loads(self._box.open(rec.secrets, f"sandboxes/{rec.id}"))
        return {str(k): str(v) for k, v in doc.items()}

    async def _recover(self, progress: Progress) -> None:
        """Adopt every sandbox a killed gateway left running; fail and clean the others.

        Adopted: guest services still run (same pids, same start times), the namespace
        and link exist, the secrets unseal, the forwards bind again. Their state stays
        (``ready``/``degraded``) and the monitor probes at once. Any other sandbox is
        marked ``failed`` with the reason and its resources removed; its record stays
        until it is deleted, so callers see what happened.
        """
        assert self._store is not None
        for rec in self._store.sandboxes():
            state = SandboxState(rec.state)
            backend = self._backends.get(rec.backend)
            if backend is None:
                log.error("sandbox %s: unknown backend %r in the store; left alone", rec.id,
                          rec.backend)
                continue
            try:
                secrets = self._unseal_secrets(rec)
                why = ""
            except (DecryptError, ValueError) as exc:
                secrets, why = {}, str(exc).splitlines()[0]
            spec = spec_from_record(sandbox_id=rec.id, profile=rec.profile, ip=rec.ip,
                                    prefixlen=rec.prefixlen, bridge=rec.bridge,
                                    state_dir=self.config.state_dir,
                                    secrets={k: v for k, v in secrets.items() if k != "token"},
                                    agent_url=self.agent_url
                                    if backend.runs_agent(rec.profile) else "")
            if rec.backend == "external":
                spec = dataclasses.replace(
                    spec, name=str(rec.info.get("name", "")),
                    interface=str(rec.info.get("interface", "")),
                    target_port=int(rec.info.get("target_port", 0)),
                    netns=str(rec.info.get("netns", "")))
            if state in (SandboxState.STOPPING, SandboxState.STOPPED):  # was being deleted
                progress(f"removing sandbox {rec.id}: it was being deleted")
                await backend.destroy(spec)
                self._store.remove_sandbox(rec.id)
                continue
            live = LiveSandbox(id=rec.id, ip=rec.ip, state=state, token_hash=rec.token_hash,
                               ports=backend.ports(spec), secrets=spec.secrets,
                               reason=rec.reason, netns=spec.netns)
            sb = Sandbox(spec=spec, live=live, token=secrets.get("token", ""),
                         backend=backend, agent_token_hash=rec.agent_token_hash)
            self._sandboxes[rec.id] = sb
            if state is SandboxState.FAILED:
                await backend.destroy(spec)  # resources of a failed one never stay
                continue
            if not why and state not in (SandboxState.READY, SandboxState.DEGRADED):
                why = f"the gateway stopped while the sandbox was {state.value}"
            if not why:
                why = await backend.adopt(spec) or ""
            if not why:
                try:
                    await self._restore_forwards(sb)
                except Exception as exc:
                    why = f"its forwards could not be restored: {str(exc).splitlines()[0]}"
            if why:
                reason = f"not adopted after a gateway restart: {why}"
                progress(f"sandbox {rec.id}: {reason}")
                log.warning("sandbox %s: %s", rec.id, reason)
                with contextlib.suppress(Exception):
                    await self.forwards.remove_sandbox(rec.id)
                await backend.destroy(spec)
                self._set_state(sb, SandboxState.FAILED, reason)
                continue
            self._restore_grants(sb)
            self._restore_sessions(sb)
            progress(f"sandbox {rec.id}: adopted ({state.value}, {rec.ip})")
            log.info("sandbox %s: adopted from a previous gateway (%s)", rec.id, state.value)
            self._record_event("sandbox.adopted", rec.id, {"state": state.value})
            self._monitors[rec.id] = asyncio.create_task(
                self._monitor(sb, first_delay=0.0), name=f"sandbox {rec.id} readiness")
        # Links on our bridge that no sandbox explains (e.g. the store was deleted by hand).
        for port in await asyncio.to_thread(netlink.bridge_ports, self.config.net.bridge):
            owner = port.removeprefix("sp-").rsplit("-", 1)[0]  # sp-<id>-v (veth), -t (tap)
            if port.startswith("sp-") and owner not in self._sandboxes:
                log.warning("removing stray link %s from bridge %s", port, self.config.net.bridge)
                await asyncio.to_thread(netlink.delete_link, port)

    async def _restore_forwards(self, sb: Sandbox) -> None:
        """Publish the stored forwards of an adopted sandbox again: same ports, same ids."""
        assert self._store is not None
        for rec in self._store.forwards(sb.spec.id):
            mapping = PortMapping(host_ip=rec.host_ip, host_port=rec.host_port,
                                  guest_port=rec.guest_port, protocol=rec.protocol)
            await self.forwards.add(sandbox=sb.spec.id, guest_ip=sb.live.ip,
                                    mappings=[(rec.name, mapping)],
                                    options=ForwardOptions(**rec.options), ids=[rec.id])

    def _restore_grants(self, sb: Sandbox) -> None:
        assert self._store is not None
        loop = asyncio.get_running_loop()
        for rec in self._store.grants(sb.spec.id):
            grant = Grant(id=rec.id, token_hash=rec.token_hash, expires_at=rec.expires_at,
                          ports=tuple(rec.scope.get("ports", ())),
                          kinds=tuple(rec.scope.get("kinds", ())))
            sb.live.grants[grant.id] = grant
            left = rec.expires_at - time.time()
            if left > 0:
                sb.grant_timers[grant.id] = loop.call_later(
                    left, self._end_grant, sb.spec.id, grant.id, "the access token expired")

    def _restore_sessions(self, sb: Sandbox) -> None:
        assert self._store is not None
        for rec in self._store.sessions(sb.spec.id):
            if not SessionState(rec.state).final:
                self._arm_session(rec)
                if rec.state == SessionState.WAITING and sb.live.state is SandboxState.READY:
                    self._move_session(rec.id, SessionState.READY)

    async def stop(self, *, keep_sandboxes: bool = False) -> None:
        """Shut down in order; each step runs even if one before it failed.

        ``keep_sandboxes`` leaves the sandboxes running and recorded (a failed start):
        only this process's part of them (monitors, forwards) stops.
        """
        # 1. Event streams end, then the HTTP port: browsers get a close code, no new
        #    sessions arrive.
        self.events.close()
        for timer in self._session_timers.values():
            timer.cancel()
        self._session_timers.clear()
        if self._front is not None:
            with contextlib.suppress(Exception):
                await self._front.stop()
            self._front = None
        if self._http is not None:
            with contextlib.suppress(Exception):
                await self._http.stop()
            self._http = None
        if self._agent_http is not None:
            with contextlib.suppress(Exception):
                await self._agent_http.stop()
            self._agent_http = None
        # 2. Sandboxes: their forwards, guest processes, namespaces, links, leases.
        if keep_sandboxes:
            for sandbox_id, sb in list(self._sandboxes.items()):
                for timer in sb.grant_timers.values():
                    timer.cancel()
                monitor = self._monitors.pop(sandbox_id, None)
                if monitor is not None:
                    monitor.cancel()
                    await asyncio.gather(monitor, return_exceptions=True)
            self._sandboxes.clear()
        for sandbox_id in list(self._sandboxes):
            try:
                await self.destroy_sandbox(sandbox_id)
            except Exception:
                log.exception("destroying sandbox %s failed", sandbox_id)
        # 3. Forwards left without a sandbox (none, normally) and this gateway's nft chains;
        #    only with the bridge lock held, or they would be another gateway's.
        if self._bridge_lock is not None:
            with contextlib.suppress(Exception):
                await self.forwards.close()
        # 4. The bridge, once no port is left on it (sandboxes kept running keep it).
        if self._store is not None:
            with contextlib.suppress(Exception):
                if not await asyncio.to_thread(netlink.bridge_ports, self.config.net.bridge):
                    await asyncio.to_thread(netlink.delete_link, self.config.net.bridge)
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                self.gateway_file.unlink()
        # 5. Store and lock last: a crash before here leaves records for the next start.
        if self._store is not None:
            self._store.close()
            self._store = None
        # The bridge lock lives in /run/sandport: deleted, so stopped gateways leave no
        # files there. The state dir's stays with the state dir.
        if self._bridge_lock is not None:
            _release_lock(self._bridge_lock, delete=True)
        if self._lock_file is not None:
            _release_lock(self._lock_file, delete=False)
        self._lock_file = self._bridge_lock = None

    # Sandboxes --------------------------------------------------------------------------

    def _new_id(self) -> str:
        while True:
            sandbox_id = secrets.token_hex(3)
            if sandbox_id not in self._sandboxes and not netlink.netns_exists(
                netns_name(sandbox_id)
            ):
                return sandbox_id

    def _set_state(self, sb: Sandbox, state: SandboxState, reason: str = "") -> None:
        before = sb.live.state
        sb.live.state = check_transition(sb.live.state, state)
        sb.live.reason = reason
        data = {"state": state.value, "from": before.value, "reason": reason}
        if self._store is not None:
            seq = self._store.set_state(sb.spec.id, state.value, reason=reason,
                                        event=("sandbox.state", data))
            self._published(seq, "sandbox.state", sb.spec.id, data)
        log.info("sandbox %s: %s%s", sb.spec.id, state.value, f" ({reason})" if reason else "")
        if state is SandboxState.READY:
            for rec in self._open_sessions(sb.spec.id):
                if rec.state == SessionState.WAITING:
                    self._move_session(rec.id, SessionState.READY)
        elif state is SandboxState.FAILED:  # its sessions can no longer complete
            self._end_sessions(sb.spec.id, SessionState.CANCELLED, f"the sandbox failed: {reason}")

    def _published(self, seq: int | None, kind: str, sandbox_id: str,
                   data: dict[str, Any]) -> None:
        """Hand an event the store recorded (as ``seq``) to live watchers."""
        if seq:
            self.events.publish(EventRecord(seq=seq, at=time.time(), kind=kind,
                                            sandbox_id=sandbox_id, data=data))

    def _record_event(self, kind: str, sandbox_id: str, data: dict[str, Any]) -> None:
        """Record an event that goes with no other change, and publish it."""
        if self._store is not None:
            self._published(self._store.add_event(kind, sandbox_id, data), kind, sandbox_id,
                            data)

    def event_log(self, *, after: int = 0, sandbox_id: str | None = None,
                  limit: int = 1000) -> list[EventRecord]:
        """Recorded events after ``after`` (``GET /api/events``)."""
        if self._store is None:
            raise RuntimeError("gateway not started")
        return self._store.events(after=after, sandbox_id=sandbox_id, limit=limit)

    # Sessions and credentials ------------------------------------------------------------

    def _open_sessions(self, sandbox_id: str) -> list[SessionRecord]:
        if self._store is None:
            return []
        return [r for r in self._store.sessions(sandbox_id) if not SessionState(r.state).final]

    def _arm_session(self, rec: SessionRecord) -> None:
        left = max(0.0, rec.expires_at - time.time())
        self._session_timers[rec.id] = asyncio.get_running_loop().call_later(
            left, self._expire_session, rec.id)

    def _expire_session(self, session_id: str) -> None:
        self._session_timers.pop(session_id, None)
        with contextlib.suppress(Exception):
            self._move_session(session_id, SessionState.EXPIRED,
                               "no credentials arrived before the session's TTL ran out")

    def _move_session(self, session_id: str, state: SessionState, reason: str = "") -> None:
        assert self._store is not None
        rec = self._store.session(session_id)
        if rec is None:
            return
        check_session_transition(SessionState(rec.state), state)
        data = {"id": session_id, "state": state.value, "from": rec.state, "reason": reason}
        seq = self._store.set_session_state(session_id, state.value, reason=reason,
                                            event=("session.state", data))
        self._published(seq, "session.state", rec.sandbox_id, data)
        if state.final:
            timer = self._session_timers.pop(session_id, None)
            if timer is not None:
                timer.cancel()
        self._notify_sessions()

    def _notify_sessions(self) -> None:
        changed, self._session_changed = self._session_changed, asyncio.Event()
        changed.set()  # wakes every waiter of the old event; new ones wait on the new

    def _end_sessions(self, sandbox_id: str, state: SessionState, reason: str) -> None:
        for rec in self._open_sessions(sandbox_id):
            with contextlib.suppress(Exception):
                self._move_session(rec.id, state, reason)

    def create_session(self, sandbox_id: str, ttl: float = DEFAULT_SESSION_TTL) -> SessionRecord:
        """A flow on a sandbox that ends when its guest posts credentials (or ``ttl`` ends).

        It is ``waiting`` until the sandbox is ready, then ``ready``; ``completed`` once
        the guest agent posts credentials; ``expired`` after ``ttl`` seconds without.

        Raises:
            SandboxNotFound: no such sandbox.
            Conflict: the sandbox failed or is going away.
        """
        sb = self._sandboxes.get(sandbox_id)
        if sb is None or self._store is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        if sb.live.state in (SandboxState.FAILED, SandboxState.STOPPING, SandboxState.STOPPED):
            raise Conflict(f"sandbox {sandbox_id} is {sb.live.state.value}: {sb.live.reason}")
        now = time.time()
        state = SessionState.READY if sb.live.state is SandboxState.READY \
            else SessionState.WAITING
        rec = SessionRecord(id=f"w{secrets.token_hex(5)}", sandbox_id=sandbox_id,
                            state=state.value, reason="", credential_id=None,
                            expires_at=now + ttl, created_at=now, updated_at=now)
        data = {"id": rec.id, "state": state.value, "from": "", "reason": ""}
        self._published(self._store.add_session(rec, event=("session.state", data)),
                        "session.state", sandbox_id, data)
        self._arm_session(rec)
        log.info("sandbox %s: session %s (%s, ttl %g s)", sandbox_id, rec.id, state.value, ttl)
        return rec

    def session(self, session_id: str) -> SessionRecord:
        """One session.

        Raises:
            SandboxNotFound: no such session (or its sandbox was deleted).
        """
        rec = self._store.session(session_id) if self._store is not None else None
        if rec is None:
            raise SandboxNotFound(f"no session {session_id!r}")
        return rec

    def sessions(self, sandbox_id: str) -> list[SessionRecord]:
        """The sessions of a sandbox, oldest first.

        Raises:
            SandboxNotFound: no such sandbox.
        """
        if sandbox_id not in self._sandboxes or self._store is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        return self._store.sessions(sandbox_id)

    def session_counts(self) -> dict[str, int]:
        """How many sessions are in each state (``/metrics``)."""
        counts = dict.fromkeys((s.value for s in SessionState), 0)
        for rec in self._store.sessions() if self._store is not None else []:
            counts[rec.state] = counts.get(rec.state, 0) + 1
        return counts

    async def wait_session(self, session_id: str, timeout: float) -> SessionRecord:
        """The session once it is final, or as it is after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            changed = self._session_changed  # taken before reading: no change is missed
            rec = self.session(session_id)
            left = deadline - loop.time()
            if SessionState(rec.state).final or left <= 0:
                return rec
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), left)

    def check_agent(self, sandbox_id: str, token: str | None,
                    client_ip: str | None = None) -> Sandbox:
        """The sandbox whose guest agent presents ``token`` (from ``client_ip``, if given).

        Raises:
            Unauthorized: no token, a wrong one (also: no such sandbox), or a client that
                is not the sandbox.
        """
        sb = self._sandboxes.get(sandbox_id)
        stored = sb.agent_token_hash if sb is not None else ""
        # No token: 401; a token for a sandbox that does not exist is as wrong as any (403),
        # so agent tokens do not tell which sandboxes exist.
        verdict = check_token(token, stored) if stored else (
            TokenCheck.MISSING if not token else TokenCheck.INVALID)
        if verdict is TokenCheck.MISSING:
            raise Unauthorized("guest agent routes need 'Authorization: Bearer <agent token>'",
                               missing=True)
        if verdict is not TokenCheck.OK or sb is None:
            raise Unauthorized(f"not the agent token of sandbox {sandbox_id!r}")
        if client_ip is not None and client_ip != sb.live.ip:
            raise Unauthorized(f"sandbox {sandbox_id}'s agent calls from {sb.live.ip}, "
                               f"not {client_ip}")
        return sb

    def post_credentials(self, sandbox_id: str, data: dict[str, Any],
                         session_id: str | None = None) -> tuple[CredentialRecord,
                                                                 SessionRecord | None]:
        """Store credentials a guest captured (sealed) and complete their session.

        The session is ``session_id``, or else the sandbox's oldest open one (if any).

        Raises:
            SandboxNotFound: no such sandbox, or it has no such session.
            Conflict: that session already ended.
        """
        sb = self._sandboxes.get(sandbox_id)
        if sb is None or self._store is None or self._box is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        session: SessionRecord | None = None
        if session_id is not None:
            session = self._store.session(session_id)
            if session is None or session.sandbox_id != sandbox_id:
                raise SandboxNotFound(f"sandbox {sandbox_id} has no session {session_id!r}")
            if SessionState(session.state).final:
                raise Conflict(f"session {session_id} is already {session.state}")
        else:
            open_ = self._open_sessions(sandbox_id)
            session = open_[0] if open_ else None
        cred_id = f"c{secrets.token_hex(5)}"
        sealed = self._box.seal(json.dumps(data).encode(), f"credentials/{cred_id}")
        rec = CredentialRecord(id=cred_id, sandbox_id=sandbox_id,
                               session_id=session.id if session else None, sealed=sealed,
                               created_at=time.time())
        events: list[tuple[str, dict[str, Any]]] = [
            ("credentials.received", {"id": cred_id, "session": rec.session_id})]
        if session is not None:
            check_session_transition(SessionState(session.state), SessionState.COMPLETED)
            events.append(("session.state", {"id": session.id, "state": "completed",
                                             "from": session.state, "reason": ""}))
        seqs = self._store.add_credentials(
            rec, session_state=SessionState.COMPLETED.value if session else None, events=events)
        for seq, (kind, doc) in zip(seqs, events, strict=True):
            self._published(seq, kind, sandbox_id, doc)
        if session is not None:
            timer = self._session_timers.pop(session.id, None)
            if timer is not None:
                timer.cancel()
            session = self._store.session(session.id)
            self._notify_sessions()
        log.info("sandbox %s: credentials %s received%s", sandbox_id, cred_id,
                 f"; session {session.id} completed" if session else "")
        return rec, session

    def credentials(self, sandbox_id: str) -> list[dict[str, Any]]:
        """The credentials of a sandbox, unsealed (admin only).

        Raises:
            SandboxNotFound: no such sandbox.
        """
        if sandbox_id not in self._sandboxes or self._store is None or self._box is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        return [{"id": r.id, "session": r.session_id, "created_at": r.created_at,
                 "data": json.loads(self._box.open(r.sealed, f"credentials/{r.id}"))}
                for r in self._store.credentials(sandbox_id)]

    def read_log(self, sandbox_id: str, name: str = "", offset: int = -65536,
                 limit: int = 1 << 20) -> tuple[bytes, int, list[str]]:
        """A guest log from ``offset`` (negative: from the end): ``(bytes, next offset,
        every log name)``. ``name`` "" is the VM's serial console, or the first log.

        Raises:
            SandboxNotFound: no such sandbox, or no such log (the message lists them).
        """
        sb = self._sandboxes.get(sandbox_id)
        if sb is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        logs = sb.spec.workdir / "logs"
        names = sorted(p.stem for p in logs.glob("*.log")) if logs.is_dir() else []
        name = name or ("serial" if "serial" in names else (names[0] if names else ""))
        if name not in names:
            raise SandboxNotFound(f"sandbox {sandbox_id} has no log {name!r}; it has "
                                  f"{', '.join(names) or 'none yet'}")
        with open(logs / f"{name}.log", "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size + offset) if offset < 0 else min(offset, size)
            f.seek(start)
            data = f.read(limit)
        return data, start + len(data), names

    def agent_report(self, sandbox_id: str, report: dict[str, Any]) -> None:
        """Keep a guest agent's latest report (the first one is an event)."""
        sb = self._sandboxes.get(sandbox_id)
        if sb is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        first = sb.agent_report is None
        sb.agent_report, sb.agent_report_at = report, time.time()
        if first:
            self._record_event("agent.connected", sandbox_id,
                               {"listening": report.get("listening", [])})

    async def create_sandbox(
        self, *, profile: str = "desktop", vnc_port: int = 0,
        publish: list[PortMapping] | None = None, options: ForwardOptions | None = None,
        progress: Progress = _quiet, session_ttl: float | None = None,
        backend: str = "netns", memory_mb: int | None = None, vcpus: int | None = None,
    ) -> SandboxInfo:
        """Create a sandbox, start its services and return once it is proven ready.

        Args:
            profile: guest profile name.
            vnc_port: host port of the VNC forward; 0 picks a free one.
            publish: more guest ports to forward (``-p`` specs, parsed).
            options: mode and limits of the ``publish`` forwards; default: the
                gateway's forward mode.
            progress: called with a short line before each step.
            session_ttl: also open a session (``waiting`` until the sandbox is ready)
                that lasts this many seconds; its id is in the info.
            backend: ``netns`` (a network namespace) or ``qemu`` (a microVM).
            memory_mb, vcpus: a VM's memory and CPUs (default: the profile's).

        Raises:
            PortInUseError: ``vnc_port`` or a published port is taken (nothing is left
                behind).
            UsageError: published ports overlap each other or another sandbox's.
            SandboxFailed: a step failed or the guest never answered; the reason says
                which hop and what it answered.
        """
        if self._store is None or self._pool is None or self._box is None:
            raise RuntimeError("gateway not started")
        prof = get_profile(profile)
        be = self._backends.get(backend)
        if be is None:
            raise UsageError(f"unknown backend {backend!r}; known: {', '.join(self._backends)}")
        if backend not in prof.backends:
            raise UsageError(f"profile {prof.name} runs in the {' or '.join(prof.backends)} "
                             f"backend, not {backend}")
        if (memory_mb is not None or vcpus is not None) and backend != "qemu":
            raise UsageError("memory and vCPU limits are for qemu sandboxes (a namespace "
                             "shares the host's)")
        t0 = time.perf_counter()
        sandbox_id = self._new_id()
        address = self._pool.lease(sandbox_id)
        token = new_token()
        spec = SandboxSpec(
            id=sandbox_id,
            profile=prof.name,
            address=ipaddress.IPv4Interface(f"{address}/{self.config.net.subnet.prefixlen}"),
            gateway=self.config.net.gateway_ip,
            bridge=self.config.net.bridge,
            workdir=self.config.state_dir / "sandboxes" / sandbox_id,
            secrets={**prof.new_secrets(), "agent_token": new_token()},
            agent_url=self.agent_url if be.runs_agent(prof.name) else "",
            memory_mb=memory_mb, vcpus=vcpus,
        )
        live = LiveSandbox(id=sandbox_id, ip=str(address), state=SandboxState.CREATING,
                           token_hash=hash_token(token), ports=be.ports(spec),
                           secrets=spec.secrets)
        sb = Sandbox(spec=spec, live=live, token=token, backend=be,
                     agent_token_hash=hash_token(spec.secrets["agent_token"]))
        # Secrets are sealed: the database alone opens no desktop and impersonates no agent.
        sealed = self._box.seal(json.dumps({"token": token, **spec.secrets}).encode(),
                                f"sandboxes/{sandbox_id}")
        created = {"state": live.state.value, "from": "", "reason": "", "ip": str(address),
                   "profile": prof.name}
        seq = self._store.add_sandbox(
            sandbox_id=sandbox_id, backend=be.name, profile=prof.name,
            state=live.state.value, ip=str(address), prefixlen=spec.address.network.prefixlen,
            bridge=spec.bridge, token_hash=live.token_hash,
            agent_token_hash=sb.agent_token_hash, secrets=sealed,
            event=("sandbox.state", created))
        self._published(seq, "sandbox.state", sandbox_id, created)
        self._sandboxes[sandbox_id] = sb
        if session_ttl is not None:
            self.create_session(sandbox_id, session_ttl)

        async def steps() -> None:
            what = "network namespace" if be.name == "netns" else "microVM tap"
            progress(f"sandbox {sandbox_id}: {what}, {address} on {spec.bridge}")
            await be.create(spec)
            self._set_state(sb, SandboxState.STARTING)
            progress(f"sandbox {sandbox_id}: starting {prof.summary.split(';')[0]}")
            await be.start(spec)
            await self._publish(sb, vnc_port, publish or [], options, progress)
            await self._await_ready(sb, progress)

        return await self._bring_up(sb, steps, t0)

    async def _bring_up(self, sb: Sandbox, steps: Callable[[], Awaitable[None]],
                        t0: float) -> SandboxInfo:
        """Run the steps that make a new sandbox ready; then ready and monitored. A step
        that fails fails the sandbox and removes what was made (and raises)."""
        sandbox_id = sb.spec.id
        try:
            await steps()
        except BaseException as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if sandbox_id not in self._sandboxes:  # deleted (DELETE) while it started
                raise SandboxFailed(f"sandbox {sandbox_id} was deleted while it started: "
                                    f"{reason}") from None
            with contextlib.suppress(Exception):
                self._set_state(sb, SandboxState.FAILED, reason)
            await self.destroy_sandbox(sandbox_id)
            raise
        sb.ready_seconds = round(time.perf_counter() - t0, 3)
        self._set_state(sb, SandboxState.READY)
        self._monitors[sandbox_id] = asyncio.create_task(
            self._monitor(sb), name=f"sandbox {sandbox_id} readiness")
        log.info("sandbox %s ready in %.2f s: %s", sandbox_id, sb.ready_seconds,
                 "; ".join(f"{p.hop} {p.detail} ({p.elapsed * 1000:.0f} ms)" for p in sb.probes))
        return self.info(sandbox_id)

    async def attach(
        self, *, ip: str, name: str = "", profile: str = "desktop", port: int = 0,
        vnc_port: int = 0, publish: list[PortMapping] | None = None,
        vnc_password: str | None = None, interface: str = "", netns: str = "",
        forward_mode: str = "proxy", progress: Progress = _quiet,
    ) -> SandboxInfo:
        """Front a guest sandport did not create (a VM or container of another manager)
        at ``ip``: forwards, the WebSocket bridge, readiness and the doctor, as for a
        sandbox; nothing is created in the guest (see :mod:`sandport.sandbox.external`).

        Args:
            ip: the target's IPv4 address; it must lie in ``attach_subnets``.
            name: its owner's name for it (shown, searchable).
            profile: ``desktop`` (VNC on 5901), ``http`` (80 or ``port``) or ``tcp``
                (``port``): what readiness speaks to its primary port.
            port: the primary port of an ``http`` or ``tcp`` target.
            vnc_port: host port of a desktop's VNC forward; 0 picks a free one.
            publish: more ports to forward (proxy mode).
            vnc_password: the desktop's VNC password (None: the server asks for none).
            interface: the host interface the target is reached through (checked).
            netns: a network namespace the target lives in, by ``ip netns`` name or by
                the PID of a process in it (a container's): ``ip`` is an address in
                there (its own 127.0.0.1 too) and every connection is made in there.
            forward_mode: ``proxy`` (the default for attached targets) or ``kernel``
                (nft DNAT; ``route_localnet`` and ``forwarding`` go on for the interface
                the target is reached through while a forward needs them). Not with
                ``netns``.

        Raises:
            Forbidden: the address is outside ``attach_subnets``.
            UsageError: no route to it, a bad profile or port, the port of a forward taken.
            Conflict: a sandbox or attached target already has this address.
            SandboxFailed: it does not answer its protocol within ``ready_timeout``.
        """
        if self._pool is None or self._store is None or self._box is None:
            raise RuntimeError("gateway not started")
        target = resolve_ip(ip)
        ns = str(netns_path(netns)) if netns else ""
        if ns and interface:
            raise UsageError("--interface and --netns exclude each other: a target in "
                             "another namespace is reached in there, not through a link")
        check_target(target, allowed=self.config.attach_subnets, pool=self.config.net.subnet,
                     netns=ns)
        if forward_mode not in ("proxy", "kernel"):
            raise UsageError(f"forward mode {forward_mode!r} for an attached target is "
                             "proxy or kernel")
        if ns and forward_mode == "kernel":
            raise UsageError("kernel forwards cannot reach into another network namespace: "
                             "use proxy mode with --netns")
        if profile not in ATTACH_PROFILES:
            raise UsageError(f"an attached target's profile is one of "
                             f"{', '.join(ATTACH_PROFILES)}, not {profile!r}")
        if profile == "tcp" and not 0 < port < 65536:
            raise UsageError("a tcp target needs its port (--port N): readiness connects "
                             "to it")
        if not 0 <= port < 65536:
            raise UsageError(f"port {port} is outside 1-65535")
        for other in self._sandboxes.values():
            if other.live.ip == str(target) and same_namespace(other.spec.netns, ns):
                raise Conflict(f"{target} is already attached as sandbox {other.spec.id}"
                               + (f" ({other.spec.name})" if other.spec.name else ""))
        be = self._backends["external"]
        t0 = time.perf_counter()
        sandbox_id = self._new_id()
        token = new_token()
        secrets_ = {"vnc_password": vnc_password} if vnc_password else {}
        spec = SandboxSpec(
            id=sandbox_id, profile=profile, address=ipaddress.IPv4Interface(f"{target}/32"),
            gateway=target, bridge=interface,
            workdir=self.config.state_dir / "sandboxes" / sandbox_id, secrets=secrets_,
            name=name, interface=interface, target_port=port, netns=ns,
        )
        live = LiveSandbox(id=sandbox_id, ip=str(target), state=SandboxState.CREATING,
                           token_hash=hash_token(token), ports=be.ports(spec),
                           secrets=spec.secrets, netns=ns)
        sb = Sandbox(spec=spec, live=live, token=token, backend=be)
        sealed = self._box.seal(json.dumps({"token": token, **spec.secrets}).encode(),
                                f"sandboxes/{sandbox_id}")
        created = {"state": live.state.value, "from": "", "reason": "", "ip": str(target),
                   "profile": profile, "attached": name or str(target)}
        seq = self._store.add_sandbox(
            sandbox_id=sandbox_id, backend=be.name, profile=profile, state=live.state.value,
            ip=str(target), prefixlen=32, bridge=interface, token_hash=live.token_hash,
            secrets=sealed, event=("sandbox.state", created))
        self._published(seq, "sandbox.state", sandbox_id, created)
        self._store.set_state(sandbox_id, live.state.value, info={
            "name": name, "interface": interface, "target_port": port, "netns": ns})
        self._sandboxes[sandbox_id] = sb

        async def steps() -> None:
            progress(f"sandbox {sandbox_id}: attaching {target}" + (f" ({name})" if name else ""))
            await be.create(spec)
            self._set_state(sb, SandboxState.STARTING)
            await self._publish(sb, vnc_port, publish or [],
                                ForwardOptions(mode=forward_mode), progress)
            await self._await_ready(sb, progress)

        return await self._bring_up(sb, steps, t0)

    async def retarget(self, sandbox_id: str, *, ip: str | None = None, gone: bool = False,
                       reason: str = "") -> SandboxInfo:
        """The owner of an attached target says it moved to ``ip``, or is ``gone``.

        Moved: live connections are closed with the reason, the forwards (same ids, same
        host ports) and the bridge go to the new address, tokens stay valid, readiness is
        proven again. Gone: the target is ``failed`` with the reason; its forwards and
        live connections are closed.

        Raises:
            SandboxNotFound: no such attached target.
            Forbidden, UsageError, Conflict: as for :meth:`attach` (the new address).
        """
        sb = self._sandboxes.get(sandbox_id)
        if sb is None or sb.backend.name != "external":
            raise SandboxNotFound(f"no attached target {sandbox_id!r}")
        if gone == (ip is not None):
            raise UsageError("say where the target moved (ip) or that it is gone, one of them")
        if sb.live.state not in (SandboxState.READY, SandboxState.DEGRADED) and not gone:
            raise Conflict(f"attached target {sandbox_id} is {sb.live.state.value}: attach "
                           "it again (detach, attach) rather than moving it")
        monitor = self._monitors.pop(sandbox_id, None)
        if monitor is not None:
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)
        if gone:
            why = f"its owner says it is gone{': ' + reason if reason else ''}"
            if self._front is not None:
                self._front.close_sessions(sandbox_id, 1001, f"the target is gone: {reason}"
                                           if reason else "the target is gone")
            with contextlib.suppress(Exception):
                await self.forwards.remove_sandbox(sandbox_id)
            if sb.live.state is not SandboxState.FAILED:
                self._set_state(sb, SandboxState.FAILED, why)
            return self.info(sandbox_id)
        assert ip is not None
        target = resolve_ip(ip)
        check_target(target, allowed=self.config.attach_subnets, pool=self.config.net.subnet,
                     netns=sb.spec.netns)
        for other in self._sandboxes.values():
            if other is not sb and other.live.ip == str(target) and \
                    same_namespace(other.spec.netns, sb.spec.netns):
                raise Conflict(f"{target} is already attached as sandbox {other.spec.id}")
        if not sb.spec.netns:
            await asyncio.to_thread(route_to, target, sb.spec.interface)
        old = sb.live.ip
        moved = f"the target moved from {old} to {target}" + (f": {reason}" if reason else "")
        if self._front is not None:  # browsers reconnect with the same URL
            self._front.close_sessions(sandbox_id, 1012, moved)
        sb.spec = dataclasses.replace(sb.spec, address=ipaddress.IPv4Interface(f"{target}/32"),
                                      gateway=target)
        sb.live.ip = str(target)
        if self._store is not None:
            self._store.move_sandbox(sandbox_id, str(target))
        for fwd in self.forwards.of(sandbox_id):  # same ids and host ports, new target
            await self.forwards.remove(fwd.id)
            options = fwd.options
            if options.egress:  # the new address may go out through another link
                options = dataclasses.replace(options, egress=await asyncio.to_thread(
                    sb.backend.host_link, sb.spec))
            await self.forwards.add(sandbox=sandbox_id, guest_ip=str(target),
                                    mappings=[(fwd.name, fwd.mapping)], options=options,
                                    ids=[fwd.id])
        self._record_event("sandbox.moved", sandbox_id, {"from": old, "to": str(target),
                                                          "reason": reason})
        if sb.live.state is SandboxState.READY:  # until readiness is proven again
            self._set_state(sb, SandboxState.DEGRADED, moved)
        sb.probes.clear()
        try:
            await self._await_ready(sb, _quiet)
        except SandboxFailed as exc:
            self._set_state(sb, SandboxState.FAILED, str(exc).splitlines()[0])
            raise
        if sb.live.state is not SandboxState.READY:
            self._set_state(sb, SandboxState.READY)
        self._monitors[sandbox_id] = asyncio.create_task(
            self._monitor(sb), name=f"sandbox {sandbox_id} readiness")
        return self.info(sandbox_id)

    async def _publish(self, sb: Sandbox, vnc_port: int, publish: list[PortMapping],
                       options: ForwardOptions | None, progress: Progress) -> None:
        """Forward the profile's primary port (a desktop's VNC; ``vnc_port`` on the host)
        and the ``publish`` ports to the host."""
        primary = sb.live.ports[0]
        mode = options.mode if sb.backend.name == "external" and options is not None \
            else self.config.forward_mode
        progress(f"sandbox {sb.spec.id}: forwarding ports ({mode} mode)")
        mapping = PortMapping(host_ip=self.config.forward_host,
                              host_port=vnc_port if primary.protocol == "rfb" else 0,
                              guest_port=primary.port)
        try:
            await self._add_forwards(sb, [(primary.name, mapping)], ForwardOptions(mode=mode))
        except PortInUseError as exc:
            what = "VNC port" if primary.protocol == "rfb" else f"{primary.name} port"
            raise PortInUseError(exc.host, exc.port, what=what) from None
        if publish:
            await self._add_forwards(sb, [(f"{m.guest_port}/{m.protocol}", m) for m in publish],
                                     options or ForwardOptions(mode=mode))

    async def _add_forwards(self, sb: Sandbox, mappings: list[tuple[str, PortMapping]],
                            options: ForwardOptions) -> list[HostForward]:
        """Publish ports of a sandbox and remember them (a restart publishes them again)."""
        if sb.spec.netns:  # an attached container's: relayed, sockets made in its namespace
            options = dataclasses.replace(options, mode="proxy", netns=sb.spec.netns)
        elif sb.backend.name == "external":  # kernel mode: masquerade on its link
            egress = await asyncio.to_thread(sb.backend.host_link, sb.spec)
            options = dataclasses.replace(options, egress=egress)
        added = await self.forwards.add(sandbox=sb.spec.id, guest_ip=sb.live.ip,
                                        mappings=mappings, options=options)
        if self._store is not None:
            for f in added:
                m = f.mapping
                self._store.add_forward(ForwardRecord(
                    id=f.id, sandbox_id=sb.spec.id, name=f.name, host_ip=m.host_ip,
                    host_port=m.host_port, guest_port=m.guest_port, protocol=m.protocol,
                    options=dataclasses.asdict(options)))
                self._record_event("forward.added", sb.spec.id, f.summary())
        return added

    async def add_forwards(self, sandbox_id: str, publish: list[PortMapping],
                           options: ForwardOptions | None = None) -> list[dict[str, Any]]:
        """Forward more ports of a running sandbox; all or nothing.

        Raises:
            SandboxNotFound: no such sandbox.
            PortInUseError, UsageError: a port is taken or already forwarded.
        """
        sb = self._sandboxes.get(sandbox_id)
        if sb is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        if sb.live.state not in (SandboxState.READY, SandboxState.DEGRADED,
                                 SandboxState.STARTING):
            raise Conflict(f"sandbox {sandbox_id} is {sb.live.state.value}")
        added = await self._add_forwards(
            sb, [(f"{m.guest_port}/{m.protocol}", m) for m in publish],
            options or ForwardOptions(mode=self.config.forward_mode))
        return [f.summary() for f in added]

    def create_grant(self, sandbox_id: str, ttl: float, *, ports: tuple[str, ...] = (),
                     kinds: tuple[str, ...] = ()) -> dict[str, Any]:
        """An extra access token for a sandbox, valid ``ttl`` seconds (a link that expires).

        ``ports`` (names or numbers) and ``kinds`` (``ws``: the WebSocket bridge,
        ``http``: the desktop page) limit what it opens; empty means all. It is stored
        hashed and survives a gateway restart. When it expires, or is revoked, the
        bridge sessions opened with it are closed (1008, with the reason) and new
        requests with it get 403.

        Raises:
            SandboxNotFound: no such sandbox.
        """
        sb = self._sandboxes.get(sandbox_id)
        if sb is None or self._store is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        token = new_token()
        grant = Grant(id=f"g{secrets.token_hex(4)}", token_hash=hash_token(token),
                      expires_at=time.time() + ttl, ports=ports, kinds=kinds)
        scope = {"ports": list(ports), "kinds": list(kinds)}
        self._store.add_grant(GrantRecord(id=grant.id, sandbox_id=sandbox_id,
                                          token_hash=grant.token_hash,
                                          expires_at=grant.expires_at, scope=scope,
                                          created_at=time.time()))
        sb.live.grants[grant.id] = grant
        loop = asyncio.get_running_loop()
        sb.grant_timers[grant.id] = loop.call_later(
            ttl, self._end_grant, sandbox_id, grant.id, "the access token expired")
        self._record_event("token.created", sandbox_id,
                           {"id": grant.id, "expires_at": grant.expires_at, **scope,
                            "fingerprint": fingerprint(grant.token_hash)})
        log.info("sandbox %s: access token %s, valid %g s", sandbox_id, grant.id, ttl)
        return {"id": grant.id, "token": token, "expires_at": grant.expires_at, **scope,
                "desktop_url": f"{self.base_url}/s/{sandbox_id}/?token={token}"}

    def grants(self, sandbox_id: str) -> list[dict[str, Any]]:
        """The extra access tokens of a sandbox (ids and expiry; never the tokens).

        Raises:
            SandboxNotFound: no such sandbox.
        """
        sb = self._sandboxes.get(sandbox_id)
        if sb is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        now = time.time()
        return [{"id": g.id, "expires_at": g.expires_at, "expired": g.expires_at <= now,
                 "ports": list(g.ports), "kinds": list(g.kinds)}
                for g in sb.live.grants.values()]

    def revoke_grant(self, sandbox_id: str, grant_id: str) -> None:
        """Revoke an access token now: its sessions close, new requests with it get 403.

        Raises:
            SandboxNotFound: no such sandbox or token.
        """
        sb = self._sandboxes.get(sandbox_id)
        if sb is None or grant_id not in sb.live.grants:
            raise SandboxNotFound(f"sandbox {sandbox_id!r} has no access token {grant_id!r}")
        timer = sb.grant_timers.pop(grant_id, None)
        if timer is not None:
            timer.cancel()
        self._end_grant(sandbox_id, grant_id, "the access token was revoked", forget=True)

    def _end_grant(self, sandbox_id: str, grant_id: str, reason: str,
                   forget: bool = False) -> None:
        sb = self._sandboxes.get(sandbox_id)
        if sb is None:
            return
        sb.grant_timers.pop(grant_id, None)
        if forget:  # revoked: unknown from now on (an expired one says "expired")
            sb.live.grants.pop(grant_id, None)
            if self._store is not None:
                self._store.remove_grant(grant_id)
        self._record_event("token.revoked" if forget else "token.expired", sandbox_id,
                           {"id": grant_id})
        closed = self._front.close_sessions(sandbox_id, 1008, reason, grant=grant_id) \
            if self._front is not None else 0
        log.info("sandbox %s: %s (%s); %d session(s) closed", sandbox_id, reason, grant_id,
                 closed)

    async def remove_forward(self, sandbox_id: str, forward_id: str) -> None:
        """Stop one forward of a sandbox (its VNC forward too, if asked).

        Raises:
            SandboxNotFound: no such sandbox, or no such forward of it.
        """
        if sandbox_id not in self._sandboxes:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        if not any(f.id == forward_id for f in self.forwards.of(sandbox_id)):
            raise SandboxNotFound(f"sandbox {sandbox_id} has no forward {forward_id!r}")
        gone = await self.forwards.remove(forward_id)
        if self._store is not None:
            self._store.remove_forward(forward_id)
        if gone is not None:
            self._record_event("forward.removed", sandbox_id, gone.summary())

    def _forward(self, sandbox_id: str, name: str) -> HostForward | None:
        return next((f for f in self.forwards.of(sandbox_id) if f.name == name), None)

    def _primary_probe(self, sb: Sandbox, timeout: float) -> tuple[str, Probe] | None:
        """``(label, probe)`` of the profile's primary port through its host forward:
        an RFB handshake for a desktop, an HTTP GET for an HTTP service, a connect for
        a TCP one."""
        primary = sb.live.ports[0]
        fwd = self._forward(sb.spec.id, primary.name)
        if fwd is None:
            return None
        host, port = connect_host(self.config.forward_host), fwd.host_port
        if primary.protocol == "rfb":
            password = sb.spec.secrets.get("vnc_password")
            return (f"VNC through the host port {host}:{port} ({fwd.mode} forward)",
                    lambda: probe_rfb_tcp(host, port, password=password, timeout=timeout))
        if primary.protocol == "tcp":
            guest, netns = sb.live.ip, sb.spec.netns

            async def service_then_forward() -> ProbeResult:
                # A relay accepts before its target does: the service must accept first.
                direct = await probe_tcp(guest, primary.port, timeout=timeout, netns=netns)
                if not direct.ok:
                    return direct
                return await probe_tcp(host, port, timeout=timeout)

            return (f"{primary.name} at the guest, then through the host port {host}:{port} "
                    f"({fwd.mode} forward)", service_then_forward)
        return (f"{primary.name} through the host port {host}:{port} ({fwd.mode} forward)",
                lambda: probe_http(host, port, timeout=timeout))

    async def _monitor(self, sb: Sandbox, first_delay: float | None = None) -> None:
        """Probe a ready sandbox's primary port through its host forward, every
        ``probe_interval``.

        A failed probe turns it ``degraded`` with the reason; the next good probe turns it
        ``ready`` again. A guest service that exited is restarted (``degraded`` meanwhile;
        see :meth:`_restart_services`). Ends with the sandbox. ``first_delay`` (default:
        the interval) is 0 for an adopted sandbox: its readiness is proven again at once.
        """
        interval = self.config.probe_interval
        timeout = min(3.0, max(1.0, 2 * interval))
        restarts: list[float] = []  # when guest services were restarted, recent ones
        delay = interval if first_delay is None else first_delay
        degraded_since = time.monotonic()
        while True:
            await asyncio.sleep(delay)
            delay = interval
            if sb.live.state not in (SandboxState.READY, SandboxState.DEGRADED):
                return
            dead = sb.backend.failure(sb.spec)
            if dead is not None and not sb.backend.restarts_services:
                self._set_state(sb, SandboxState.FAILED, dead)  # a VM that exited
                return
            if dead is not None:
                if not await self._restart_services(sb, dead, restarts):
                    return
                continue  # the next probe tells whether it is back
            if await sb.backend.revive_agent(sb.spec):
                log.warning("sandbox %s: the guest agent had exited; started it again",
                            sb.spec.id)
                self._record_event("agent.restarted", sb.spec.id, {})
            probe = self._primary_probe(sb, timeout)
            if probe is None:
                ok, why = False, "the forward of its primary port is gone"
            else:
                result = await probe[1]()
                sb.last_probe = result
                ok, why = result.ok, f"{result.hop}: {result.detail} (stage {result.stage})"
            if sb.live.state not in (SandboxState.READY, SandboxState.DEGRADED):
                return  # it changed while we probed
            if not ok and sb.live.state is SandboxState.READY:
                self._set_state(sb, SandboxState.DEGRADED, why)
                degraded_since = time.monotonic()
                await self._diagnose(sb)
            elif ok and sb.live.state is SandboxState.DEGRADED:
                sb.diagnosis, sb.live.diagnosis = None, ""
                self._set_state(sb, SandboxState.READY)
            elif not ok and sb.backend.name == "external" and \
                    time.monotonic() - degraded_since > self.config.attach_grace:
                # Not ours to restart: after the grace it is failed, with the doctor's word.
                await self._diagnose(sb)
                finding = sb.live.diagnosis or why
                self._set_state(sb, SandboxState.FAILED, f"no answer for "
                                f"{self.config.attach_grace:g} s: {finding}")
                return

    async def _diagnose(self, sb: Sandbox) -> None:
        """Name the broken hop of a sandbox that degraded (``sandport doctor``), for its
        readiness details and the reasons refusals give."""
        try:
            report = await self.doctor(sb.spec.id)
        except Exception:  # a diagnosis must never stop the monitor
            log.exception("sandbox %s: the doctor failed", sb.spec.id)
            return
        row = report.failed
        sb.diagnosis = row
        sb.live.diagnosis = "" if row is None else \
            f"{row.hop} hop, {row.check}: {row.evidence}" + (f" — {row.fix}" if row.fix else "")
        if row is not None:
            log.warning("sandbox %s: doctor: %s", sb.spec.id, sb.live.diagnosis)
            self._record_event("sandbox.diagnosis", sb.spec.id, row.as_json())

    async def _restart_services(self, sb: Sandbox, why: str, restarts: list[float]) -> bool:
        """A guest service exited: degraded, then restart the profile's services.

        More than :data:`MAX_RESTARTS` in :data:`RESTART_WINDOW` seconds, or a restart
        that fails, turns the sandbox failed (returns False: stop monitoring).
        """
        now = time.monotonic()
        restarts[:] = [t for t in restarts if now - t < RESTART_WINDOW]
        if sb.live.state is SandboxState.READY:
            self._set_state(sb, SandboxState.DEGRADED, f"{why}; restarting")
        if len(restarts) >= MAX_RESTARTS:
            self._set_state(sb, SandboxState.FAILED,
                            f"{why} ({len(restarts)} restarts in {RESTART_WINDOW:.0f} s)")
            return False
        restarts.append(now)
        try:
            await sb.backend.stop(sb.spec)
            await sb.backend.start(sb.spec)
        except Exception as exc:
            self._set_state(sb, SandboxState.FAILED, f"restart failed: {exc}")
            return False
        log.info("sandbox %s: guest services restarted (%s)", sb.spec.id, why)
        return True

    async def _await_ready(self, sb: Sandbox, progress: Progress) -> None:
        """Probe every path a user takes until each answers its protocol: the primary port
        through its host forward, a desktop's VNC through the WebSocket bridge too, and
        the guest agent."""
        backend, spec = sb.backend, sb.spec
        password = spec.secrets.get("vnc_password")
        primary = self._primary_probe(sb, 3.0)
        if primary is None:
            raise RuntimeError(f"sandbox {spec.id} has no forward of its primary port")
        ws_host = connect_host(self.config.listen_host)
        ws_host = f"[{ws_host}]" if ":" in ws_host else ws_host
        ws_scheme = "wss" if self.config.tls is not None else "ws"
        ws_url = f"{ws_scheme}://{ws_host}:{self.http_port}/s/{spec.id}/ports/vnc/ws?token={sb.token}"
        # Our own certificate, probed by address: the path is what is proven, not the name.
        probe_ssl = _insecure_client_context() if self.config.tls is not None else None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.ready_timeout

        def give_up() -> str | None:  # no waiting out the timeout for what already died
            if sb.live.state in (SandboxState.STOPPING, SandboxState.STOPPED):
                return "the sandbox was deleted while it started"
            return backend.failure(spec, agent=True)

        hops: list[tuple[str, Probe]] = [primary]
        if sb.live.ports[0].protocol == "rfb":
            hops.append(("VNC through the WebSocket bridge",
                         lambda: probe_rfb_ws(ws_url, password=password, timeout=3.0,
                                              ssl_context=probe_ssl)))
        if spec.agent_url:  # credentials and health go through it: it answers first
            hops.append(("the guest agent", lambda: probe_agent_health(
                str(spec.ip), AGENT_PORT, sandbox_id=spec.id, timeout=3.0)))
        for label, probe in hops:
            progress(f"sandbox {spec.id}: waiting for {label}")
            result, attempts = await wait_until(
                probe, timeout=max(0.1, deadline - loop.time()), give_up=give_up
            )
            sb.probes.append(result)
            if not result.ok:
                console = backend.diagnostics(spec)
                raise SandboxFailed(
                    f"sandbox {spec.id} did not become ready: {label}: {result.detail} "
                    f"(stage {result.stage}, {attempts} attempts)"
                    + (f"; guest console: {console}" if console else ""),
                    hint=f"guest logs are in {spec.workdir / 'logs'}",
                )

    def info(self, sandbox_id: str) -> SandboxInfo:
        """The printable facts of a running sandbox."""
        sb = self._sandboxes.get(sandbox_id)
        if sb is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        fwd = self._forward(sandbox_id, "vnc")  # desktops only
        return SandboxInfo(
            id=sandbox_id,
            ip=sb.live.ip,
            state=sb.live.state.value,
            profile=sb.spec.profile,
            token=sb.token,
            desktop_url=f"{self.base_url}/s/{sandbox_id}/?token={sb.token}",
            vnc_host=connect_host(self.config.forward_host),
            vnc_port=fwd.host_port if fwd is not None else 0,
            vnc_password=sb.spec.secrets.get("vnc_password", ""),
            colour=colour_hex(desktop_colour(sandbox_id)),
            ready_seconds=sb.ready_seconds,
            forwards=[f.summary() for f in self.forwards.of(sandbox_id)],
            reason=sb.live.reason,
            probes=[_probe_json(p) for p in sb.probes],
            last_probe=_probe_json(sb.last_probe) if sb.last_probe is not None else None,
            agent=sb.agent_report,
            agent_report_at=sb.agent_report_at,
            diagnosis=sb.diagnosis.as_json() if sb.diagnosis is not None else None,
            backend=sb.backend.name,
            name=sb.spec.name,
        )

    def sandbox_ids(self) -> list[str]:
        """Ids of the running sandboxes."""
        return list(self._sandboxes)

    # Doctor ----------------------------------------------------------------------------

    async def doctor(self, sandbox_id: str, *, port: str | None = None,
                     token: str | None = None) -> Report:
        """Walk the path to ``sandbox_id`` (its ``port``; all by default) hop by hop and
        name the broken hop (:mod:`sandport.doctor`). ``token``: a token someone uses for
        it (a link), checked too. A sandbox that was deleted gives a report saying when."""
        sb = self._sandboxes.get(sandbox_id)
        link = await asyncio.to_thread(sb.backend.host_link, sb.spec) if sb else ""
        return await diagnose(self._subject(sandbox_id, port, token, link))

    def _subject(self, sandbox_id: str, port: str | None, token: str | None,
                 link: str) -> Subject:
        sb = self._sandboxes.get(sandbox_id)
        facts = self._token_facts(sandbox_id, token, port) if token else None
        if sb is None:
            gone = self._gone(sandbox_id)
            if facts is not None and facts.verdict == "deleted":
                gone = facts.detail
            return Subject(sandbox=sandbox_id, known=False, gone=gone)
        net = self.config.net
        forwards = self.forwards.of(sandbox_id)
        ports = []
        for guest_port in sb.live.ports:
            own = [f for f in forwards if f.name == guest_port.name or
                   (f.mapping.guest_port == guest_port.port and f.mapping.protocol == "tcp"
                    and not guest_port.path)]
            protocol = guest_port.protocol if guest_port.protocol in ("rfb", "http") else "tcp"
            ports.append(PortFacts(
                name=guest_port.name, guest_port=guest_port.port, protocol=protocol,
                path=guest_port.path, ws=True, forwards=tuple(
                    _forward_facts(f) for f in own)))
        named = {p.name for p in ports}
        for f in forwards:  # app ports published by number
            attached = f.name in named or (f.mapping.protocol == "tcp" and any(
                f.mapping.guest_port == p.guest_port and not p.path for p in ports))
            if not attached:
                named.add(f.name)
                ports.append(PortFacts(
                    name=f.name, guest_port=f.mapping.guest_port,
                    protocol="udp" if f.mapping.protocol == "udp" else "tcp",
                    forwards=(_forward_facts(f),)))
        if sb.spec.agent_url:
            ports.append(PortFacts(name="agent", guest_port=AGENT_PORT, protocol="agent"))
        chains = nft.chain_names(net.bridge)
        nft_rules: list[tuple[str, str]] = []
        if self.forwards.nft_available and any(f.mode == "kernel" for f in forwards):
            nft_rules = nft.rules_of(net.bridge)
        ws_host = connect_host(self.config.listen_host)
        ws_host = f"[{ws_host}]" if ":" in ws_host else ws_host
        scheme = "wss" if self.config.tls is not None else "ws"
        return Subject(
            sandbox=sandbox_id, known=True, state=sb.live.state.value,
            reason=sb.live.reason, ip=sb.live.ip, bridge=net.bridge,
            pool_gateway=f"{net.gateway_ip}/{net.subnet.prefixlen}",
            link=link, ports=tuple(ports),
            vnc_password=sb.spec.secrets.get("vnc_password"),
            service_failure=sb.backend.failure(sb.spec),
            logs=str(sb.spec.workdir / "logs"),
            nft_rules=tuple(nft_rules), chains=(chains[0], chains[1]),
            ws_base=f"{scheme}://{ws_host}:{self.http_port}", token=sb.token,
            forward_host=connect_host(self.config.forward_host), token_facts=facts,
            port_asked=port, known_ports=tuple(p.name for p in ports),
            agent_report=sb.agent_report,
            agent_report_age=time.time() - sb.agent_report_at
            if sb.agent_report_at is not None else None,
            external=sb.backend.name == "external", netns=sb.spec.netns,
            unrun_forwards=tuple(
                f"forward {r.id} ({r.protocol} {r.host_ip}:{r.host_port} -> {r.guest_port})"
                for r in (self._store.forwards(sandbox_id) if self._store is not None else [])
                if r.id not in {f.id for f in forwards}))

    def _gone(self, sandbox_id: str) -> str:
        """What became of a sandbox that is not here, from the event log ("" if unknown)."""
        if self._store is None:
            return ""
        for event in reversed(self._store.events(sandbox_id=sandbox_id, limit=100_000)):
            if event.kind == "sandbox.deleted":
                return f"sandbox {sandbox_id} was deleted at {_when(event.at)} (event " \
                       f"#{event.seq})"
            if event.kind == "sandbox.state" and event.data.get("state") == "failed":
                return f"sandbox {sandbox_id} failed at {_when(event.at)}: " \
                       f"{event.data.get('reason', '')}; it is gone since"
        return ""

    def _token_facts(self, sandbox_id: str, token: str, port: str | None) -> TokenFacts:
        """What ``token`` is: this sandbox's, an access token of it (in scope of ``port``?),
        expired or revoked, another sandbox's, a deleted sandbox's, or unknown."""
        sb = self._sandboxes.get(sandbox_id)
        if sb is not None:
            verdict, grant_id, expired = sb.live.check(token)
            if verdict is TokenCheck.OK and not grant_id:
                return TokenFacts(verdict="own", detail="the sandbox's own token (all ports)")
            grant = sb.live.grants.get(grant_id)
            if verdict is TokenCheck.OK and grant is not None:
                guest_port = sb.live.port(port) if port else None
                allows = grant.allows(guest_port, "ws") or grant.allows(guest_port, "http")
                scope = f"ports {', '.join(grant.ports) or 'all'}, as " \
                        f"{', '.join(grant.kinds) or 'any kind'}"
                left = grant.expires_at - time.time()
                return TokenFacts(verdict="grant", allows=allows,
                                  detail=f"access token {grant.id}: {scope}, expires in "
                                  f"{left:.0f} s" + ("" if allows else
                                                     f"; it does not open port {port}"))
            if expired:
                return TokenFacts(verdict="expired",
                                  detail=f"access token {grant_id} of sandbox {sandbox_id} "
                                  "expired")
        for other in self._sandboxes.values():
            if other.live.id != sandbox_id and other.live.check(token)[0] is TokenCheck.OK:
                return TokenFacts(verdict="other", detail=f"the token belongs to sandbox "
                                  f"{other.live.id}, not {sandbox_id}")
        mark = fingerprint(hash_token(token))
        if self._store is not None:
            revoked: set[str] = set()
            for event in reversed(self._store.events(limit=100_000)):
                if event.kind == "token.revoked":
                    revoked.add(str(event.data.get("id")))
                elif event.kind == "sandbox.deleted" and mark in event.data.get("tokens", []):
                    return TokenFacts(verdict="deleted", detail=f"the token is sandbox "
                                      f"{event.sandbox_id}'s, which was deleted at "
                                      f"{_when(event.at)} (event #{event.seq})")
                elif event.kind == "token.created" and \
                        event.data.get("fingerprint") == mark and \
                        event.data.get("id") in revoked:
                    return TokenFacts(verdict="revoked", detail=f"access token "
                                      f"{event.data.get('id')} of sandbox "
                                      f"{event.sandbox_id} was revoked")
        return TokenFacts(verdict="unknown",
                          detail="no sandbox of this gateway has this token, now or before")

    async def destroy_sandbox(self, sandbox_id: str) -> None:
        """Stop forwards and guest, remove namespace, link, files, record and lease."""
        sb = self._sandboxes.get(sandbox_id)
        if sb is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        for timer in sb.grant_timers.values():
            timer.cancel()
        sb.grant_timers.clear()
        monitor = self._monitors.pop(sandbox_id, None)
        if monitor is not None:
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)
        if sb.live.state is not SandboxState.STOPPING:
            with contextlib.suppress(Exception):
                self._set_state(sb, SandboxState.STOPPING)
        self._end_sessions(sandbox_id, SessionState.CANCELLED, "the sandbox was deleted")
        # Its tokens' fingerprints: the doctor can tell a link of a deleted sandbox.
        self._record_event("sandbox.deleted", sandbox_id, {"tokens": [
            fingerprint(h) for h in (sb.live.token_hash,
                                     *(g.token_hash for g in sb.live.grants.values()))]})
        with contextlib.suppress(Exception):
            await self.forwards.remove_sandbox(sandbox_id)
        if self._front is not None:  # browsers see why, not a session that hangs
            self._front.close_sessions(
                sandbox_id, 1001, "the target was detached: sandport no longer fronts it"
                if sb.backend.name == "external" else "the sandbox was destroyed")
        await sb.backend.destroy(sb.spec)
        with contextlib.suppress(Exception):
            self._set_state(sb, SandboxState.STOPPED)
        del self._sandboxes[sandbox_id]
        if self._store is not None:
            self._store.remove_sandbox(sandbox_id)
