"""The gateway: its own lifecycle, the role uvicorn's ``Server`` plays; it wires the rooms.

Owns: the state dir and bridge locks, the admin token and the secret key, the store's
life, the Linux bridge, the agent listener and the HTTP port (the WebSocket bridge's
front door with the HTTP app behind it), adopting what a crashed gateway left, and the
shutdown. Python callers (the CLI, tests) and the HTTP API talk to :class:`Gateway`;
each API method hands the call to the room that owns it:

=====================================  ===================================================
:mod:`~sandport.control.roster`        the sandbox table, state changes, the event journal
:mod:`~sandport.control.sandboxes`     create, attach, retarget, destroy; forwards; info
:mod:`~sandport.control.readiness`     probes, await-ready, the monitor, restarts, doctor
:mod:`~sandport.control.access`        access tokens, sessions, credentials, guest agents
:mod:`~sandport.control.facts`         the doctor's facts about a sandbox
:mod:`~sandport.control.locks`         the lock files of a state dir and of a bridge
=====================================  ===================================================

Must not touch: what a room owns. A sandbox's state, forwards, probes, tokens and
sessions change only through its rooms; adoption rebuilds an adopted sandbox's record
from the store and hands it to them.

Lifecycle is ``start -> serve -> stop`` (``async with Gateway(config) as gw``):

start:  preflight (capabilities, programs) -> lock the state dir -> admin token and
        secret key -> open the store (the rooms are made on it) -> bridge -> agent
        listener -> adopt what a crashed gateway left running (or mark it failed) ->
        kernel forwards with host isolation (host settings the adopted forwards do not
        need are given back), anti-spoofing -> HTTP port.
stop:   events end -> HTTP port (browsers get a close code) -> sandboxes -> forwards
        (and the host settings they needed, given back) -> bridge -> store and lock.
        Every step runs even if an earlier one failed.

A gateway that is killed (``kill -9``, a crash) leaves its sandboxes running. The next
start on the same state dir adopts every sandbox whose guest services still run: its
forwards come back on the same host ports (with the same ids), its tokens and access
tokens stay valid, its readiness is probed at once. The others are marked ``failed`` with
the reason and their namespace, link and processes removed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import logging
import os
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TextIO, TypeVar, Unpack, cast

from sandport import preflight
from sandport.bridge.model import BridgeConfig, BridgeLimits, BridgeStats
from sandport.bridge.server import WsBridge
from sandport.bridge.throttle import LoginThrottle
from sandport.config import GatewayConfig, connect_host
from sandport.control.access import DEFAULT_SESSION_TTL, Access
from sandport.control.agent_api import agent_app
from sandport.control.agent_port import AgentPort
from sandport.control.app import CONNECT_TIMEOUT, GatewayRouter, LiveSandbox, build_app
from sandport.control.events import EventHub
from sandport.control.forwards import ForwardOptions, ForwardTable
from sandport.control.httpserver import HttpServer
from sandport.control.locks import RUN_DIR, release_lock, take_lock
from sandport.control.readiness import Progress, ReadinessMonitor, quiet
from sandport.control.roster import Roster, RunningSandbox
from sandport.control.sandboxes import AttachArgs, CreateArgs, Sandboxes, SandboxInfo
from sandport.control.secretbox import DecryptError, SecretBox, load_or_create_key
from sandport.control.statedir import hold_private_umask, release_private_umask, tighten
from sandport.control.store import (
    CredentialRecord,
    EventRecord,
    SandboxRecord,
    SessionRecord,
    SqliteStore,
    StateStore,
)
from sandport.control.tokens import hash_token, new_token
from sandport.doctor import Report
from sandport.forward.spec import PortMapping
from sandport.net import netlink, nft
from sandport.net.antispoof import PortGuards
from sandport.net.pool import AddressPool
from sandport.sandbox.base import Backend
from sandport.sandbox.external import ExternalBackend
from sandport.sandbox.netns import NetnsBackend, spec_from_record
from sandport.sandbox.qemu import QemuBackend
from sandport.sandbox.state import SandboxState

__all__ = ["ADMIN_TOKEN_FILE", "GATEWAY_FILE", "SECRET_KEY_FILE", "Gateway", "SandboxInfo"]

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 30.0  # bridge pings; a browser that stops answering is closed (1011)
GATEWAY_FILE = "gateway.json"  # in the state dir: pid, URL and admin token of the gateway
#: In the state dir, mode 0600: the admin token of the API, kept across restarts.
ADMIN_TOKEN_FILE = "admin-token"  # noqa: S105 - a file name, not a secret
#: In the state dir, mode 0600, unless the config names another: the key sealing secrets.
SECRET_KEY_FILE = "secret.key"  # noqa: S105 - a file name, not a secret


async def _step(what: str, step: Awaitable[Any]) -> None:
    """One shutdown step: a failure is logged, and the steps after it still run."""
    try:
        await step
    except Exception:
        log.exception("gateway stop: %s failed; going on", what)


R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class _Rooms:
    """The rooms of one run, made on the store once it is open."""

    roster: Roster
    access: Access
    readiness: ReadinessMonitor
    sandboxes: Sandboxes


class _Room(Generic[R]):
    """A gateway attribute that is one of its rooms, there once the gateway has started
    (``RuntimeError`` before)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, gw: Gateway, owner: type | None = None) -> R:
        return cast(R, getattr(gw._live(), self.name))


class Gateway:
    """sandport's gateway process, usable from Python as well as from the CLI.

    The rooms are reachable as :attr:`roster`, :attr:`sandboxes`, :attr:`readiness` and
    :attr:`access` once it has started; the methods below the lifecycle are the API
    (:class:`~sandport.control.api.SandboxApi`, :class:`~sandport.control.app.Registry`).
    """

    #: The sandboxes of this run and their journal.
    roster = _Room[Roster]()
    #: Sandbox lifecycle: create, attach, retarget, destroy, forwards.
    sandboxes = _Room[Sandboxes]()
    #: Probes, monitors, restarts, the doctor.
    readiness = _Room[ReadinessMonitor]()
    #: Access tokens, sessions, credentials, guest agents.
    access = _Room[Access]()

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self._store: StateStore | None = None
        self._rooms: _Rooms | None = None
        #: Every recorded state change goes to the log and to live watchers (SSE).
        self.events = EventHub()
        #: The guest agents' app (agent routes only), on a Unix socket behind _agent_port.
        self._agent_http: HttpServer | None = None
        #: Its front: connection cap, head and idle timeouts, body cap (control.agent_port).
        self._agent_port: AgentPort | None = None
        self._http: HttpServer | None = None
        #: The gateway's port: WebSocket bridge, TLS detection; other requests go to _http.
        self._front: WsBridge | None = None
        self._lock_file: TextIO | None = None
        self._bridge_lock: TextIO | None = None
        #: The backends by name (netns, qemu, external); a sandbox knows its own.
        self._backends: dict[str, Backend] = {}
        #: Forwards and, in the same nft transaction, what sandboxes reach on the host.
        self.forwards = ForwardTable(config.net.bridge, guard=nft.HostGuard(
            gateway_ip=str(config.net.gateway_ip), agent_port=config.agent_port))
        #: Failed VNC logins by client and sandbox: one count for the bridge and the relay.
        self.forwards.logins = LoginThrottle(config.vnc_logins) \
            if config.vnc_logins is not None else None
        self.forwards.guest_timeout = config.guest_timeout
        #: Anti-spoofing on the sandboxes' bridge ports.
        self.guards = PortGuards(config.net.bridge)
        #: For the API, /metrics and the CLI; created at the first start in the state dir
        #: (ADMIN_TOKEN_FILE, mode 0600) and the same at every start after.
        self.admin_token = ""
        self._admin_hash = ""
        self._private_umask = False  # held while it runs (see sandport.control.statedir)
        #: The host links name (see link_base), resolved at start.
        self._link_host = ""

    # The rooms ---------------------------------------------------------------------------

    def _live(self) -> _Rooms:
        if self._rooms is None:
            raise RuntimeError("gateway not started")
        return self._rooms

    # Its port (the rooms' GatewayPort) ---------------------------------------------------

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

    @property
    def link_base(self) -> str:
        """``http(s)://host:port`` that every link handed out to clients starts with: the
        public URL; else the listen address, and for a wildcard listen this host's
        address on its default route (:func:`link_host`)."""
        if self.config.public_url:
            return self.config.public_url
        host = self._link_host or self.config.url_host
        return f"{self.config.scheme}://{host}:{self.http_port}"

    @property
    def ws_base(self) -> str:
        """``ws(s)://host:port`` where this host reaches the WebSocket bridge."""
        host = connect_host(self.config.listen_host)
        host = f"[{host}]" if ":" in host else host
        scheme = "wss" if self.config.tls is not None else "ws"
        return f"{scheme}://{host}:{self.http_port}"

    @property
    def agent_url(self) -> str:
        """Where guest agents reach this gateway: the agent port on the bridge address."""
        return f"http://{self.config.net.gateway_ip}:{self.config.agent_port}"

    @property
    def gateway_file(self) -> Path:
        """``<state dir>/gateway.json``: how local tools reach this gateway (mode 0600)."""
        return self.config.state_dir / GATEWAY_FILE

    def close_sessions(self, sandbox_id: str, code: int, reason: str,
                       grant: str | None = None) -> int:
        """Close the bridge sessions to a sandbox (with ``grant``: opened with that
        access token) with a close code and reason; how many (0 before the port runs)."""
        if self._front is None:
            return 0
        return self._front.close_sessions(sandbox_id, code, reason, grant=grant)

    # Lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self, progress: Progress = quiet) -> None:
        """Check the machine, take the state dir, clean leftovers, open the HTTP port."""
        cfg = self.config
        preflight.require_capabilities()
        programs = preflight.require_programs()
        novnc = preflight.find_novnc()
        self._backends = {"external": ExternalBackend(), "netns": NetnsBackend(
                              programs, state_dir=cfg.state_dir,
                              guest_privileges=cfg.guest_privileges),
                          "qemu": QemuBackend(image_cache=cfg.image_cache, accel=cfg.qemu_accel)}
        self._lock_state_dir()
        self._link_host = await asyncio.to_thread(link_host, cfg)
        self.events, self._rooms = EventHub(), None  # this loop's, made on this run's store
        try:
            # What this run writes in the state dir is private whatever the umask was;
            # what an older run left is made so.
            hold_private_umask()
            self._private_umask = True
            await asyncio.to_thread(tighten, cfg.state_dir)
            self._load_admin_token()
            key_file = cfg.secret_key_file or cfg.state_dir / SECRET_KEY_FILE
            box = SecretBox(load_or_create_key(key_file, create=cfg.secret_key_file is None))
            self._store = SqliteStore(cfg.state_dir / "sandport.db")
            rooms = self._rooms = self._make_rooms(self._store, box)
            progress(f"bridge {cfg.net.bridge} {cfg.net.gateway_ip}/{cfg.net.subnet.prefixlen}")
            gateway_iface = ipaddress.IPv4Interface(
                f"{cfg.net.gateway_ip}/{cfg.net.subnet.prefixlen}"
            )
            await asyncio.to_thread(netlink.ensure_bridge, cfg.net.bridge, gateway_iface)
            # The agent app listens on a Unix socket; guests reach it only through the
            # agent port's front (limits, and their real address in X-Forwarded-For).
            agent_socket = RUN_DIR / f"bridge-{cfg.net.bridge}.agent.sock"
            self._agent_http = HttpServer(agent_app(self), "", 0, unix_path=agent_socket)
            await self._agent_http.start()
            self._agent_port = AgentPort(str(cfg.net.gateway_ip), cfg.agent_port,
                                         agent_socket, cfg.agent_limits)
            await self._agent_port.start()
            # Sandboxes a killed gateway left: adopted with their forwards, or failed.
            # Meanwhile the host settings its kernel forwards needed (sandport.net.sysctl)
            # stay: the forwards come back one sandbox at a time.
            self.forwards.keep_host_settings = True
            adopted = await self._recover(rooms, box, progress)
            # Kernel forwards and host isolation, anti-spoofing: exactly this gateway's;
            # a killed one's stale rules are gone, host settings no adopted forward
            # needs are given back.
            await self.forwards.reconcile()
            await self.guards.reconcile()
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
                # Its own pages' origin is allowed by the bridge (same origin); the public
                # URL's is added: a reverse proxy may hand the request on under another Host.
                origins=(*cfg.origins, cfg.public_url) if cfg.origins and cfg.public_url
                else cfg.origins, trusted_proxies=cfg.trusted_proxies,
                limits=BridgeLimits(connect_timeout=CONNECT_TIMEOUT,
                                    heartbeat=HEARTBEAT_SECONDS,
                                    max_connections=cfg.ws_max_sessions,
                                    max_per_client=cfg.ws_max_per_client,
                                    logins=cfg.vnc_logins,
                                    guest_timeout=cfg.guest_timeout)),
                logins=self.forwards.logins)
            await self._front.start()
            self._write_gateway_file()
            # Probed once every hop is back: the kernel rules (reconcile), the front door.
            for sb in adopted:
                rooms.readiness.watch(sb, first_delay=0.0)
        except BaseException:
            # A start that fails (its port taken, say) after adopting sandboxes leaves them
            # running and recorded for the next start; it does not destroy them.
            await self.stop(keep_sandboxes=True)
            raise
        log.info("gateway up: %s (links: %s), state %s", self.base_url, self.link_base,
                 cfg.state_dir)

    def _make_rooms(self, store: StateStore, box: SecretBox) -> _Rooms:
        """The rooms of this run, wired: each gets what it works with, nothing more."""
        roster = Roster(store, self.events)
        access = Access(roster, box, self)
        readiness = ReadinessMonitor(roster, self.forwards, self.config, self)
        sandboxes = Sandboxes(roster, self.forwards, self.config, self, readiness=readiness,
                              access=access, backends=self._backends,
                              pool=AddressPool(self.config.net.subnet, store), box=box,
                              agent_url=self.agent_url, guards=self.guards)
        return _Rooms(roster=roster, access=access, readiness=readiness, sandboxes=sandboxes)

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
        self._lock_file = take_lock(
            state_dir / "gateway.lock", f"state dir {state_dir}",
            "stop that gateway first, or give this one its own --state-dir")
        RUN_DIR.mkdir(parents=True, exist_ok=True, mode=0o755)
        bridge = self.config.net.bridge
        try:
            self._bridge_lock = take_lock(
                RUN_DIR / f"bridge-{bridge}.lock", f"bridge {bridge}",
                "give this gateway its own --bridge and --subnet")
        except BaseException:
            self._lock_file.close()
            self._lock_file = None
            raise

    def _unseal_secrets(self, box: SecretBox, rec: SandboxRecord) -> dict[str, str]:
        if not rec.secrets:
            raise DecryptError(f"sandboxes/{rec.id}: no sealed secrets (an older store)")
        doc = json.loads(box.open(rec.secrets, f"sandboxes/{rec.id}"))
        return {str(k): str(v) for k, v in doc.items()}

    async def _recover(self, rooms: _Rooms, box: SecretBox,
                       progress: Progress) -> list[RunningSandbox]:
        """Adopt every sandbox a killed gateway left running; fail and clean the others;
        the adopted ones.

        Adopted: guest services still run (same pids, same start times), the namespace
        and link exist, the secrets unseal, the forwards bind again. Their state stays
        (``ready``/``degraded``); the caller has the monitor probe them once the gateway's
        own hops are up. Any other sandbox is
        marked ``failed`` with the reason and its resources removed; its record stays
        until it is deleted, so callers see what happened.
        """
        roster = rooms.roster
        adopted: list[RunningSandbox] = []
        for rec in roster.store.sandboxes():
            state = SandboxState(rec.state)
            backend = self._backends.get(rec.backend)
            if backend is None:
                log.error("sandbox %s: unknown backend %r in the store; left alone", rec.id,
                          rec.backend)
                continue
            try:
                secrets = self._unseal_secrets(box, rec)
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
                roster.discard(rec.id)
                continue
            live = LiveSandbox(id=rec.id, ip=rec.ip, state=state, token_hash=rec.token_hash,
                               ports=backend.ports(spec), secrets=spec.secrets,
                               reason=rec.reason, netns=spec.netns)
            sb = RunningSandbox(spec=spec, live=live, token=secrets.get("token", ""),
                                backend=backend, agent_token_hash=rec.agent_token_hash)
            roster.add(sb)
            if state is SandboxState.FAILED:
                await backend.destroy(spec)  # resources of a failed one never stay
                continue
            if not why and state not in (SandboxState.READY, SandboxState.DEGRADED):
                why = f"the gateway stopped while the sandbox was {state.value}"
            if not why:
                why = await backend.adopt(spec) or ""
            if not why:
                try:
                    await rooms.sandboxes.guard(sb)
                    await rooms.sandboxes.restore_forwards(sb)
                except Exception as exc:  # whatever it is, the sandbox is not adoptable
                    why = f"its forwards could not be restored: {str(exc).splitlines()[0]}"
            if why:
                reason = f"not adopted after a gateway restart: {why}"
                progress(f"sandbox {rec.id}: {reason}")
                log.warning("sandbox %s: %s", rec.id, reason)
                await rooms.sandboxes.drop_forwards(rec.id)
                await backend.destroy(spec)
                await self.guards.release(rec.id)
                roster.set_state(sb, SandboxState.FAILED, reason)
                continue
            rooms.access.restore(sb)
            progress(f"sandbox {rec.id}: adopted ({state.value}, {rec.ip})")
            log.info("sandbox %s: adopted from a previous gateway (%s)", rec.id, state.value)
            roster.record_event("sandbox.adopted", rec.id, {"state": state.value})
            adopted.append(sb)
        # Links on our bridge that no sandbox explains (e.g. the store was deleted by hand).
        for port in await asyncio.to_thread(netlink.bridge_ports, self.config.net.bridge):
            owner = port.removeprefix("sp-").rsplit("-", 1)[0]  # sp-<id>-v (veth), -t (tap)
            if port.startswith("sp-") and owner not in roster:
                log.warning("removing stray link %s from bridge %s", port, self.config.net.bridge)
                await asyncio.to_thread(netlink.delete_link, port)
        return adopted

    async def stop(self, *, keep_sandboxes: bool = False) -> None:
        """Shut down in order; each step runs even if one before it failed.

        ``keep_sandboxes`` leaves the sandboxes running and recorded (a failed start):
        only this process's part of them (monitors, timers, forwards) stops.
        """
        rooms = self._rooms
        # 1. Event streams and session timers end, then the ports: browsers get a close
        #    code, no new sessions arrive, guest agents are no longer heard.
        self.events.close()
        if rooms is not None:
            rooms.access.close()
        if self._front is not None:
            await _step("the HTTP port", self._front.stop())
            self._front = None
        if self._http is not None:
            await _step("the HTTP app", self._http.stop())
            self._http = None
        if self._agent_port is not None:
            await _step("the agent port", self._agent_port.stop())
            self._agent_port = None
        if self._agent_http is not None:
            await _step("the agent app", self._agent_http.stop())
            self._agent_http = None
        # 2. Sandboxes: their forwards, guest processes, namespaces, links, leases (or,
        #    kept, only this process's monitors and timers).
        if rooms is not None and keep_sandboxes:
            for sb in rooms.roster:
                rooms.access.release(sb)
                await rooms.readiness.unwatch(sb.id)
            rooms.roster.clear()
        elif rooms is not None:
            for sandbox_id in rooms.roster.ids():
                await _step(f"destroying sandbox {sandbox_id}",
                            rooms.sandboxes.destroy(sandbox_id))
        # 3. Forwards left without a sandbox (none, normally) and this gateway's nft chains;
        #    only with the bridge lock held, or they would be another gateway's. Sandboxes
        #    kept running stay guarded (host isolation, anti-spoofing).
        if self._bridge_lock is not None:
            kept = keep_sandboxes and bool(await asyncio.to_thread(
                netlink.bridge_ports, self.config.net.bridge))
            await _step("the forwards", self.forwards.close(keep_guard=kept))
            if not kept:
                await _step("anti-spoofing", self.guards.close())
        # 4. The bridge, once no port is left on it (sandboxes kept running keep it).
        if self._store is not None:
            await _step(f"bridge {self.config.net.bridge}", self._remove_bridge())
        if self._lock_file is not None:
            try:
                self.gateway_file.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("gateway stop: %s stays: %s", self.gateway_file, exc)
        # 5. Store and lock last: a crash before here leaves records for the next start.
        if self._store is not None:
            self._store.close()
            self._store = None
        # The bridge lock lives in /run/sandport: deleted, so stopped gateways leave no
        # files there. The state dir's stays with the state dir.
        if self._bridge_lock is not None:
            release_lock(self._bridge_lock, delete=True)
        if self._lock_file is not None:
            release_lock(self._lock_file, delete=False)
        self._lock_file = self._bridge_lock = None
        if self._private_umask:
            release_private_umask()
            self._private_umask = False

    async def _remove_bridge(self) -> None:
        if not await asyncio.to_thread(netlink.bridge_ports, self.config.net.bridge):
            await asyncio.to_thread(netlink.delete_link, self.config.net.bridge)

    # For the HTTP app (Registry) ----------------------------------------------------------

    def lookup(self, sandbox_id: str) -> LiveSandbox | None:
        """The live sandbox with that id."""
        sb = self.roster.get(sandbox_id)
        return None if sb is None else sb.live

    def count(self) -> int:
        """How many sandboxes run."""
        return len(self.roster)

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

    # The API (SandboxApi): each call goes to the room that owns it -------------------------

    async def create_sandbox(self, **args: Unpack[CreateArgs]) -> SandboxInfo:
        """Create a sandbox and return once it is proven ready (:meth:`Sandboxes.create`,
        whose arguments these are)."""
        return await self.sandboxes.create(**args)

    async def attach(self, **args: Unpack[AttachArgs]) -> SandboxInfo:
        """Front a guest sandport did not create (:meth:`Sandboxes.attach`, whose
        arguments these are)."""
        return await self.sandboxes.attach(**args)

    async def retarget(self, sandbox_id: str, *, ip: str | None = None, gone: bool = False,
                       reason: str = "") -> SandboxInfo:
        """An attached target moved or is gone (:meth:`Sandboxes.retarget`)."""
        return await self.sandboxes.retarget(sandbox_id, ip=ip, gone=gone, reason=reason)

    async def destroy_sandbox(self, sandbox_id: str) -> None:
        """Stop and remove a sandbox (:meth:`Sandboxes.destroy`)."""
        await self.sandboxes.destroy(sandbox_id)

    def info(self, sandbox_id: str) -> SandboxInfo:
        """The printable facts of a running sandbox (:meth:`Sandboxes.info`)."""
        return self.sandboxes.info(sandbox_id)

    def sandbox_ids(self) -> list[str]:
        """Ids of the running sandboxes."""
        return self.roster.ids()

    async def add_forwards(self, sandbox_id: str, publish: list[PortMapping],
                           options: ForwardOptions | None = None) -> list[dict[str, Any]]:
        """Forward more ports of a sandbox (:meth:`Sandboxes.add_forwards`)."""
        return await self.sandboxes.add_forwards(sandbox_id, publish, options)

    async def remove_forward(self, sandbox_id: str, forward_id: str) -> None:
        """Stop one forward of a sandbox (:meth:`Sandboxes.remove_forward`)."""
        await self.sandboxes.remove_forward(sandbox_id, forward_id)

    def read_log(self, sandbox_id: str, name: str = "", offset: int = -65536,
                 limit: int = 1 << 20) -> tuple[bytes, int, list[str]]:
        """A guest log from ``offset`` (:meth:`Sandboxes.read_log`)."""
        return self.sandboxes.read_log(sandbox_id, name, offset, limit)

    async def doctor(self, sandbox_id: str, *, port: str | None = None,
                     token: str | None = None) -> Report:
        """Walk the path to a sandbox hop by hop (:meth:`ReadinessMonitor.doctor`)."""
        return await self.readiness.doctor(sandbox_id, port=port, token=token)

    def event_log(self, *, after: int = 0, sandbox_id: str | None = None,
                  limit: int = 1000) -> list[EventRecord]:
        """Recorded events after ``after`` (``GET /api/events``)."""
        return self.roster.event_log(after=after, sandbox_id=sandbox_id, limit=limit)

    def create_grant(self, sandbox_id: str, ttl: float, *, ports: tuple[str, ...] = (),
                     kinds: tuple[str, ...] = ()) -> dict[str, Any]:
        """An access token that expires (:meth:`Access.create_grant`)."""
        return self.access.create_grant(sandbox_id, ttl, ports=ports, kinds=kinds)

    def grants(self, sandbox_id: str) -> list[dict[str, Any]]:
        """The access tokens of a sandbox (:meth:`Access.grants`)."""
        return self.access.grants(sandbox_id)

    def revoke_grant(self, sandbox_id: str, grant_id: str) -> None:
        """Revoke an access token now (:meth:`Access.revoke_grant`)."""
        self.access.revoke_grant(sandbox_id, grant_id)

    def create_session(self, sandbox_id: str, ttl: float = DEFAULT_SESSION_TTL) -> SessionRecord:
        """A session on a sandbox (:meth:`Access.create_session`)."""
        return self.access.create_session(sandbox_id, ttl)

    def session(self, session_id: str) -> SessionRecord:
        """One session (:meth:`Access.session`)."""
        return self.access.session(session_id)

    def sessions(self, sandbox_id: str) -> list[SessionRecord]:
        """The sessions of a sandbox (:meth:`Access.sessions`)."""
        return self.access.sessions(sandbox_id)

    def session_counts(self) -> dict[str, int]:
        """How many sessions are in each state (:meth:`Access.session_counts`)."""
        return self.access.session_counts()

    async def wait_session(self, session_id: str, timeout: float) -> SessionRecord:
        """A session once final, or after ``timeout`` (:meth:`Access.wait_session`)."""
        return await self.access.wait_session(session_id, timeout)

    def check_agent(self, sandbox_id: str, token: str | None,
                    client_ip: str | None = None) -> RunningSandbox:
        """The sandbox whose guest agent this is (:meth:`Access.check_agent`)."""
        return self.access.check_agent(sandbox_id, token, client_ip)

    def agent_report(self, sandbox_id: str, report: dict[str, Any]) -> None:
        """Keep a guest agent's report (:meth:`Access.agent_report`)."""
        self.access.agent_report(sandbox_id, report)

    def post_credentials(self, sandbox_id: str, data: dict[str, Any],
                         session_id: str | None = None) -> tuple[CredentialRecord,
                                                                 SessionRecord | None]:
        """Store what a guest captured (:meth:`Access.post_credentials`)."""
        return self.access.post_credentials(sandbox_id, data, session_id)

    def credentials(self, sandbox_id: str) -> list[dict[str, Any]]:
        """The credentials of a sandbox, unsealed (:meth:`Access.credentials`)."""
        return self.access.credentials(sandbox_id)


def link_host(config: GatewayConfig) -> str:
    """The host part of the links a gateway without a public URL hands out.

    A wildcard listen (``0.0.0.0``, ``::``) serves other machines, so its links name this
    host's address on its default route (loopback without one); any other listen address
    is named as it is (or ``public_host``).
    """
    if config.public_host is None and config.listen_host in ("0.0.0.0", "::", ""):
        versions = (4, 6) if config.listen_host == "::" else (4,)
        for version in versions:
            found = netlink.default_source_address(version)
            if found:
                return f"[{found}]" if ":" in found else found
    return config.url_host
