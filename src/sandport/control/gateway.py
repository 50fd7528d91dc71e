"""The gateway: owns the bridge, the sandboxes, their forwards and the HTTP port.

Lifecycle is ``start -> serve -> stop`` (``async with Gateway(config) as gw``):

start:  preflight (capabilities, programs) -> lock the state dir -> open the store ->
        remove what a crashed gateway left -> bridge -> HTTP port.
stop:   HTTP port (browsers get a close code) -> forwards -> sandboxes -> bridge ->
        store and lock. Every step runs even if an earlier one failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import json
import logging
import os
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from sandport import preflight
from sandport.bridge.server import BridgeConfig, BridgeLimits, BridgeStats, WsBridge
from sandport.config import GatewayConfig, connect_host
from sandport.control.app import (
    CONNECT_TIMEOUT,
    GatewayRouter,
    Grant,
    LiveSandbox,
    build_app,
)
from sandport.control.forwards import Forward, ForwardOptions, ForwardTable
from sandport.control.httpserver import HttpServer
from sandport.control.store import Store
from sandport.control.tokens import hash_token, new_token
from sandport.errors import PortInUseError, SandboxFailed, SandboxNotFound, StateDirBusy
from sandport.forward.spec import PortMapping
from sandport.net import netlink
from sandport.net.pool import AddressPool
from sandport.probe import ProbeResult, probe_rfb_tcp, probe_rfb_ws, wait_until
from sandport.sandbox.base import SandboxSpec
from sandport.sandbox.netns import NetnsBackend, netns_name, spec_from_record
from sandport.sandbox.profiles import colour_hex, desktop_colour, get_profile
from sandport.sandbox.state import SandboxState, check_transition

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
RUN_DIR = Path("/run/sandport")  # per-boot locks shared by every gateway on this host
MAX_RESTARTS = 3  # guest service restarts within RESTART_WINDOW before a sandbox fails
RESTART_WINDOW = 300.0
HEARTBEAT_SECONDS = 30.0  # bridge pings; a browser that stops answering is closed (1011)
GATEWAY_FILE = "gateway.json"  # in the state dir: pid, URL and admin token of the gateway
#: In the state dir, mode 0600: the admin token of the API, kept across restarts.
ADMIN_TOKEN_FILE = "admin-token"  # noqa: S105 - a file name, not a secret


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


def _quiet(_: str) -> None:
    pass


@dataclass(slots=True, kw_only=True)
class Sandbox:
    """A sandbox the gateway runs, with its forwards and readiness evidence."""

    spec: SandboxSpec
    live: LiveSandbox
    token: str
    probes: list[ProbeResult] = field(default_factory=list)
    last_probe: ProbeResult | None = None
    ready_seconds: float | None = None
    #: Expiry timers of the sandbox's extra access tokens, by grant id.
    grant_timers: dict[str, asyncio.TimerHandle] = field(default_factory=dict)


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
            "readiness": {"probes": self.probes, "last": self.last_probe},
        }


class Gateway:
    """sandport's gateway process, usable from Python as well as from the CLI."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self._sandboxes: dict[str, Sandbox] = {}
        self._store: Store | None = None
        self._pool: AddressPool | None = None
        self._http: HttpServer | None = None
        #: The gateway's port: WebSocket bridge, TLS detection; other requests go to _http.
        self._front: WsBridge | None = None
        self._lock_file: TextIO | None = None
        self._bridge_lock: TextIO | None = None
        self._backend: NetnsBackend | None = None
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
        self._backend = NetnsBackend(programs)
        self._lock_state_dir()
        self._load_admin_token()
        try:
            self._store = Store(cfg.state_dir / "sandport.db")
            self._pool = AddressPool(cfg.net.subnet, self._store)
            await self._remove_leftovers(progress)
            progress(f"bridge {cfg.net.bridge} {cfg.net.gateway_ip}/{cfg.net.subnet.prefixlen}")
            gateway_iface = ipaddress.IPv4Interface(
                f"{cfg.net.gateway_ip}/{cfg.net.subnet.prefixlen}"
            )
            self._bridge_created = await asyncio.to_thread(
                netlink.ensure_bridge, cfg.net.bridge, gateway_iface
            )
            # Kernel forwards: exactly this gateway's (none yet); a killed one's are gone.
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
            await self.stop()
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

    async def _remove_leftovers(self, progress: Progress) -> None:
        """Destroy every sandbox the store still lists: a previous gateway died with them."""
        if self._store is None or self._backend is None:
            return
        records = self._store.sandboxes()
        for rec in records:
            progress(f"removing leftover sandbox {rec.id} from a previous run")
            log.warning("removing leftover sandbox %s (%s, state %s)", rec.id, rec.ip, rec.state)
            spec = spec_from_record(sandbox_id=rec.id, profile=rec.profile, ip=rec.ip,
                                    prefixlen=rec.prefixlen, bridge=rec.bridge,
                                    state_dir=self.config.state_dir)
            await self._backend.destroy(spec)
            self._store.remove_sandbox(rec.id)
        # Links on our bridge that no record explains (e.g. the store was deleted by hand).
        for port in await asyncio.to_thread(netlink.bridge_ports, self.config.net.bridge):
            if port.startswith("sp-"):
                log.warning("removing stray link %s from bridge %s", port, self.config.net.bridge)
                await asyncio.to_thread(netlink.delete_link, port)

    async def stop(self) -> None:
        """Shut down in order; each step runs even if one before it failed."""
        # 1. The HTTP port first: browsers get a close code, no new sessions arrive.
        if self._front is not None:
            with contextlib.suppress(Exception):
                await self._front.stop()
            self._front = None
        if self._http is not None:
            with contextlib.suppress(Exception):
                await self._http.stop()
            self._http = None
        # 2. Sandboxes: their forwards, guest processes, namespaces, links, leases.
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
        # 4. The bridge, once no port is left on it.
        if self._store is not None:
            with contextlib.suppress(Exception):
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
        sb.live.state = check_transition(sb.live.state, state)
        sb.live.reason = reason
        if self._store is not None:
            self._store.set_state(sb.spec.id, state.value, reason=reason)
        log.info("sandbox %s: %s%s", sb.spec.id, state.value, f" ({reason})" if reason else "")

    async def create_sandbox(
        self, *, profile: str = "desktop", vnc_port: int = 0,
        publish: list[PortMapping] | None = None, options: ForwardOptions | None = None,
        progress: Progress = _quiet,
    ) -> SandboxInfo:
        """Create a sandbox, start its services and return once it is proven ready.

        Args:
            profile: guest profile name.
            vnc_port: host port of the VNC forward; 0 picks a free one.
            publish: more guest ports to forward (``-p`` specs, parsed).
            options: mode and limits of the ``publish`` forwards; default: the
                gateway's forward mode.
            progress: called with a short line before each step.

        Raises:
            PortInUseError: ``vnc_port`` or a published port is taken (nothing is left
                behind).
            UsageError: published ports overlap each other or another sandbox's.
            SandboxFailed: a step failed or the guest never answered; the reason says
                which hop and what it answered.
        """
        if self._store is None or self._pool is None or self._backend is None:
            raise RuntimeError("gateway not started")
        prof = get_profile(profile)
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
            secrets=prof.new_secrets(),
        )
        live = LiveSandbox(id=sandbox_id, ip=str(address), state=SandboxState.CREATING,
                           token_hash=hash_token(token), ports=prof.ports, secrets=spec.secrets)
        sb = Sandbox(spec=spec, live=live, token=token)
        self._store.add_sandbox(sandbox_id=sandbox_id, backend=self._backend.name,
                                profile=prof.name, state=live.state.value, ip=str(address),
                                prefixlen=spec.address.network.prefixlen,
                                bridge=spec.bridge, token_hash=live.token_hash)
        self._sandboxes[sandbox_id] = sb
        try:
            progress(f"sandbox {sandbox_id}: network namespace, {address} on {spec.bridge}")
            await self._backend.create(spec)
            self._set_state(sb, SandboxState.STARTING)
            progress(f"sandbox {sandbox_id}: starting {prof.summary.split(';')[0]}")
            await self._backend.start(spec)
            await self._publish(sb, vnc_port, publish or [], options, progress)
            await self._await_ready(sb, progress)
        except BaseException as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
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

    async def _publish(self, sb: Sandbox, vnc_port: int, publish: list[PortMapping],
                       options: ForwardOptions | None, progress: Progress) -> None:
        """Forward the profile's VNC port and the ``publish`` ports to the host."""
        vnc = sb.live.ports[0]
        mode = self.config.forward_mode
        progress(f"sandbox {sb.spec.id}: forwarding ports ({mode} mode)")
        vnc_mapping = PortMapping(host_ip=self.config.forward_host, host_port=vnc_port,
                                  guest_port=vnc.port)
        try:
            await self.forwards.add(sandbox=sb.spec.id, guest_ip=sb.live.ip,
                                    mappings=[(vnc.name, vnc_mapping)],
                                    options=ForwardOptions(mode=mode))
        except PortInUseError as exc:
            raise PortInUseError(exc.host, exc.port, what="VNC port") from None
        if publish:
            await self.forwards.add(
                sandbox=sb.spec.id, guest_ip=sb.live.ip,
                mappings=[(f"{m.guest_port}/{m.protocol}", m) for m in publish],
                options=options or ForwardOptions(mode=mode))

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
        added = await self.forwards.add(
            sandbox=sandbox_id, guest_ip=sb.live.ip,
            mappings=[(f"{m.guest_port}/{m.protocol}", m) for m in publish],
            options=options or ForwardOptions(mode=self.config.forward_mode))
        return [f.summary() for f in added]

    def create_grant(self, sandbox_id: str, ttl: float) -> dict[str, Any]:
        """An extra access token for a sandbox, valid ``ttl`` seconds (a link that expires).

        When it expires, or is revoked, the bridge sessions opened with it are closed
        (1008, with the reason) and new requests with it get 403.

        Raises:
            SandboxNotFound: no such sandbox.
        """
        sb = self._sandboxes.get(sandbox_id)
        if sb is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        token = new_token()
        grant = Grant(id=f"g{secrets.token_hex(4)}", token_hash=hash_token(token),
                      expires_at=time.time() + ttl)
        sb.live.grants[grant.id] = grant
        loop = asyncio.get_running_loop()
        sb.grant_timers[grant.id] = loop.call_later(
            ttl, self._end_grant, sandbox_id, grant.id, "the access token expired")
        log.info("sandbox %s: access token %s, valid %g s", sandbox_id, grant.id, ttl)
        return {"id": grant.id, "token": token, "expires_at": grant.expires_at,
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
        return [{"id": g.id, "expires_at": g.expires_at, "expired": g.expires_at <= now}
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
        await self.forwards.remove(forward_id)

    def _forward(self, sandbox_id: str, name: str) -> Forward | None:
        return next((f for f in self.forwards.of(sandbox_id) if f.name == name), None)

    async def _monitor(self, sb: Sandbox) -> None:
        """Probe a ready sandbox's VNC through its host port, every ``probe_interval``.

        A failed probe turns it ``degraded`` with the reason; the next good probe turns it
        ``ready`` again. A guest service that exited is restarted (``degraded`` meanwhile;
        see :meth:`_restart_services`). Ends with the sandbox.
        """
        interval = self.config.probe_interval
        timeout = min(3.0, max(1.0, 2 * interval))
        restarts: list[float] = []  # when guest services were restarted, recent ones
        password = sb.spec.secrets.get("vnc_password")
        host = connect_host(self.config.forward_host)
        while True:
            await asyncio.sleep(interval)
            if sb.live.state not in (SandboxState.READY, SandboxState.DEGRADED):
                return
            fwd = self._forward(sb.spec.id, "vnc")
            dead = self._backend.failure(sb.spec) if self._backend is not None else None
            if dead is not None:
                if not await self._restart_services(sb, dead, restarts):
                    return
                continue  # the next probe tells whether it is back
            if fwd is None:
                ok, why = False, "no VNC forward"
            else:
                result = await probe_rfb_tcp(host, fwd.host_port, password=password,
                                             timeout=timeout)
                sb.last_probe = result
                ok, why = result.ok, f"{result.hop}: {result.detail} (stage {result.stage})"
            if sb.live.state not in (SandboxState.READY, SandboxState.DEGRADED):
                return  # it changed while we probed
            if not ok and sb.live.state is SandboxState.READY:
                self._set_state(sb, SandboxState.DEGRADED, why)
            elif ok and sb.live.state is SandboxState.DEGRADED:
                self._set_state(sb, SandboxState.READY)

    async def _restart_services(self, sb: Sandbox, why: str, restarts: list[float]) -> bool:
        """A guest service exited: degraded, then restart the profile's services.

        More than :data:`MAX_RESTARTS` in :data:`RESTART_WINDOW` seconds, or a restart
        that fails, turns the sandbox failed (returns False: stop monitoring).
        """
        assert self._backend is not None
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
            await self._backend.stop(sb.spec)
            await self._backend.start(sb.spec)
        except Exception as exc:
            self._set_state(sb, SandboxState.FAILED, f"restart failed: {exc}")
            return False
        log.info("sandbox %s: guest services restarted (%s)", sb.spec.id, why)
        return True

    async def _await_ready(self, sb: Sandbox, progress: Progress) -> None:
        """Probe every path a user takes until each completes the RFB handshake."""
        if self._backend is None:
            raise RuntimeError("gateway not started")
        backend, spec = self._backend, sb.spec
        password = spec.secrets.get("vnc_password")
        fwd = self._forward(spec.id, "vnc")
        if fwd is None:
            raise RuntimeError(f"sandbox {spec.id} has no VNC forward")
        host = connect_host(self.config.forward_host)
        ws_host = connect_host(self.config.listen_host)
        ws_host = f"[{ws_host}]" if ":" in ws_host else ws_host
        ws_scheme = "wss" if self.config.tls is not None else "ws"
        ws_url = f"{ws_scheme}://{ws_host}:{self.http_port}/s/{spec.id}/ports/vnc/ws?token={sb.token}"
        # Our own certificate, probed by address: the path is what is proven, not the name.
        probe_ssl = _insecure_client_context() if self.config.tls is not None else None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.ready_timeout

        def give_up() -> str | None:
            return backend.failure(spec)

        hops = [
            (f"VNC through the host port {host}:{fwd.host_port} ({fwd.mode} forward)",
             lambda: probe_rfb_tcp(host, fwd.host_port, password=password, timeout=3.0)),
            ("VNC through the WebSocket bridge",
             lambda: probe_rfb_ws(ws_url, password=password, timeout=3.0,
                                  ssl_context=probe_ssl)),
        ]
        for label, probe in hops:
            progress(f"sandbox {spec.id}: waiting for {label}")
            result, attempts = await wait_until(
                probe, timeout=max(0.1, deadline - loop.time()), give_up=give_up
            )
            sb.probes.append(result)
            if not result.ok:
                raise SandboxFailed(
                    f"sandbox {spec.id} did not become ready: {label}: {result.detail} "
                    f"(stage {result.stage}, {attempts} attempts)",
                    hint=f"guest logs are in {spec.workdir / 'logs'}",
                )

    def info(self, sandbox_id: str) -> SandboxInfo:
        """The printable facts of a running sandbox."""
        sb = self._sandboxes.get(sandbox_id)
        if sb is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        fwd = self._forward(sandbox_id, "vnc")
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
        )

    def sandbox_ids(self) -> list[str]:
        """Ids of the running sandboxes."""
        return list(self._sandboxes)

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
        with contextlib.suppress(Exception):
            await self.forwards.remove_sandbox(sandbox_id)
        if self._front is not None:  # browsers see why, not a session that hangs
            self._front.close_sessions(sandbox_id, 1001, "the sandbox was destroyed")
        if self._backend is not None:
            await self._backend.destroy(sb.spec)
        with contextlib.suppress(Exception):
            self._set_state(sb, SandboxState.STOPPED)
        del self._sandboxes[sandbox_id]
        if self._store is not None:
            self._store.remove_sandbox(sandbox_id)
