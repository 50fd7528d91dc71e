"""Sandbox lifecycle: create, attach, retarget, destroy, and each sandbox's forwards.

Owns:
    * making a sandbox (``create``: a network namespace or a microVM from a profile) and
      fronting one sandport did not make (``attach``); both enter through one
      registration (:meth:`Sandboxes._register`: record, sealed secrets, event, roster)
      and come up through one path (:meth:`Sandboxes._bring_up`: the steps, readiness,
      the monitor; a step that fails fails the sandbox and removes what was made);
    * an attached target that moved or is gone (``retarget``);
    * destroying a sandbox: monitor, sessions, forwards, bridge sessions, the guest;
    * which bridge port is guarded against spoofing for whom (:meth:`Sandboxes.guard`:
      after the link is made, before the guest runs; released once the link is gone);
    * a sandbox's host forwards (published at start, added and removed at runtime, kept
      in the store so an adopting gateway publishes them again); a ``-p`` that names a
      port the sandbox exposes sets that port's host side (:func:`~sandport.forward.spec.place`),
      checked before anything is made;
    * what a caller is told about a sandbox (:class:`SandboxInfo`) and its guest logs.

Must not touch: the gateway's own resources (its locks, bridge, HTTP ports, the store's
life): the gateway opens them before this room exists and closes them after. Probing
and monitoring are :mod:`sandport.control.readiness`'s; tokens and sessions are
:mod:`sandport.control.access`'s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Required, TypedDict
from urllib.parse import urlsplit

from sandport.config import GatewayConfig, connect_host
from sandport.control.access import Access
from sandport.control.app import LiveSandbox, desktop_link, desktop_port
from sandport.control.forwards import ForwardOptions, ForwardTable, HostForward
from sandport.control.readiness import Progress, ReadinessMonitor, quiet
from sandport.control.roster import GatewayPort, Roster, RunningSandbox
from sandport.control.secretbox import SecretBox
from sandport.control.store import ForwardRecord
from sandport.control.tokens import fingerprint, hash_token, new_token
from sandport.errors import (
    Conflict,
    PortInUseError,
    SandboxFailed,
    SandboxNotFound,
    SandportError,
    UsageError,
)
from sandport.forward.spec import ExposedPort, Placement, PortMapping, place
from sandport.net import netlink
from sandport.net.antispoof import PortGuards, sandbox_mac
from sandport.net.nsock import netns_path, same_namespace
from sandport.net.pool import AddressPool
from sandport.probe import ProbeResult
from sandport.sandbox.base import Backend, GuestPort, SandboxSpec
from sandport.sandbox.external import (
    ATTACH_PROFILES,
    GONE_BY_OWNER,
    MAX_NAME,
    MAX_REASON,
    ExternalBackend,
    check_target,
    printable,
    resolve_ip,
    route_to,
)
from sandport.sandbox.netns import netns_name
from sandport.sandbox.profiles import colour_hex, desktop_colour, get_profile
from sandport.sandbox.state import SandboxState, SessionState

log = logging.getLogger(__name__)


def _probe_json(p: ProbeResult) -> dict[str, Any]:
    return {"hop": p.hop, "ok": p.ok, "stage": str(p.stage), "detail": p.detail,
            "elapsed_ms": round(p.elapsed * 1000, 1)}


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
    #: ReadinessMonitor: the probes that declared it ready, and the monitor's latest.
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


class CreateArgs(TypedDict, total=False):
    """The arguments of :meth:`Sandboxes.create`, for callers that pass them on."""

    profile: str
    vnc_port: int
    publish: list[PortMapping] | None
    options: ForwardOptions | None
    progress: Progress
    session_ttl: float | None
    backend: str
    memory_mb: int | None
    vcpus: int | None


class AttachArgs(TypedDict, total=False):
    """The arguments of :meth:`Sandboxes.attach`, for callers that pass them on."""

    ip: Required[str]
    name: str
    profile: str
    port: int
    vnc_port: int
    publish: list[PortMapping] | None
    vnc_password: str | None
    interface: str
    netns: str
    forward_mode: str
    progress: Progress


class Sandboxes:
    """Create, attach, retarget and destroy sandboxes; publish and remove their ports."""

    def __init__(self, roster: Roster, forwards: ForwardTable, config: GatewayConfig,
                 port: GatewayPort, *, readiness: ReadinessMonitor, access: Access,
                 backends: dict[str, Backend], pool: AddressPool, box: SecretBox,
                 agent_url: str, guards: PortGuards) -> None:
        self._roster = roster
        self._forwards = forwards
        self._config = config
        self._port = port
        self._readiness = readiness
        self._access = access
        self._backends = backends
        self._pool = pool
        self._box = box
        self._agent_url = agent_url
        self._guards = guards

    # Making and fronting -------------------------------------------------------------------

    async def create(
        self, *, profile: str = "desktop", vnc_port: int = 0,
        publish: list[PortMapping] | None = None, options: ForwardOptions | None = None,
        progress: Progress = quiet, session_ttl: float | None = None,
        backend: str = "netns", memory_mb: int | None = None, vcpus: int | None = None,
    ) -> SandboxInfo:
        """Create a sandbox, start its services and return once it is proven ready.

        Args:
            profile: guest profile name.
            vnc_port: host port of the VNC forward; 0 picks a free one (or the one a
                ``publish`` mapping of guest port 5901 sets).
            publish: guest ports to forward (``-p`` specs, parsed). One that names a port
                the profile exposes (a desktop's 5901) sets that port's host side: one
                forward, named after the port, probed by readiness; every other one is
                an extra forward.
            options: mode and limits of the extra ``publish`` forwards; default: the
                gateway's forward mode. An exposed port's forward gets no PROXY header or
                limits (readiness speaks the guest's protocol to it), and the gateway's
                mode unless a ``publish`` mapping set it (then ``options``' mode).
            progress: called with a short line before each step.
            session_ttl: also open a session (``waiting`` until the sandbox is ready)
                that lasts this many seconds; its id is in the info.
            backend: ``netns`` (a network namespace) or ``qemu`` (a microVM).
            memory_mb, vcpus: a VM's memory and CPUs (default: the profile's).

        Raises:
            PortInUseError: ``vnc_port`` or a published port is taken (nothing is left
                behind).
            PortSpecError: published ports overlap each other, ``vnc_port`` or another
                sandbox's, or ``vnc_port`` and a ``publish`` mapping set VNC's host port
                differently; refused before anything is made.
            SandboxFailed: a step failed or the guest never answered; the reason says
                which hop and what it answered.
        """
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
        placement = self._place(prof.ports, vnc_port, publish)
        t0 = time.perf_counter()
        sandbox_id = self._new_id()
        address = self._pool.lease(sandbox_id)
        net = self._config.net
        spec = SandboxSpec(
            id=sandbox_id,
            profile=prof.name,
            address=ipaddress.IPv4Interface(f"{address}/{net.subnet.prefixlen}"),
            gateway=net.gateway_ip,
            bridge=net.bridge,
            workdir=self._config.state_dir / "sandboxes" / sandbox_id,
            secrets={**prof.new_secrets(), "agent_token": new_token()},
            agent_url=self._agent_url if be.runs_agent(prof.name) else "",
            memory_mb=memory_mb, vcpus=vcpus,
        )
        sb = self._register(spec, be, {"profile": prof.name})
        if session_ttl is not None:
            self._access.create_session(sandbox_id, session_ttl)

        async def steps() -> None:
            what = "network namespace" if be.name == "netns" else "microVM tap"
            progress(f"sandbox {sandbox_id}: {what}, {address} on {spec.bridge}")
            await be.create(spec)
            await self.guard(sb)  # before any guest program runs
            self._roster.set_state(sb, SandboxState.STARTING)
            progress(f"sandbox {sandbox_id}: starting {prof.summary.split(';')[0]}")
            await be.start(spec)
            await self._publish(sb, placement, options, progress)
            await self._readiness.await_ready(sb, progress)

        return await self._bring_up(sb, steps, t0)

    async def attach(
        self, *, ip: str, name: str = "", profile: str = "desktop", port: int = 0,
        vnc_port: int = 0, publish: list[PortMapping] | None = None,
        vnc_password: str | None = None, interface: str = "", netns: str = "",
        forward_mode: str = "proxy", progress: Progress = quiet,
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
            publish: ports to forward; one that names the primary port (a desktop's 5901,
                ``port``) sets its host side, as for :meth:`create`.
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
            UsageError: no route to it, a bad profile or port, the port of a forward taken,
                a name that is not printable text (control characters) or too long.
            PortSpecError: forwards that want one host port (refused before anything is
                made), as for :meth:`create`.
            Conflict: a sandbox or attached target already has this address.
            SandboxFailed: it does not answer its protocol within ``ready_timeout``.
        """
        target = resolve_ip(ip)
        printable(name, "the name", MAX_NAME)
        ns = str(netns_path(netns)) if netns else ""
        if ns and interface:
            raise UsageError("--interface and --netns exclude each other: a target in "
                             "another namespace is reached in there, not through a link")
        check_target(target, allowed=self._config.attach_subnets,
                     pool=self._config.net.subnet, netns=ns)
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
        self._check_free(target, ns)
        be = self._backends["external"]
        t0 = time.perf_counter()
        sandbox_id = self._new_id()
        spec = SandboxSpec(
            id=sandbox_id, profile=profile, address=ipaddress.IPv4Interface(f"{target}/32"),
            gateway=target, bridge=interface,
            workdir=self._config.state_dir / "sandboxes" / sandbox_id,
            secrets={"vnc_password": vnc_password} if vnc_password else {},
            name=name, interface=interface, target_port=port, netns=ns,
        )
        placement = self._place(be.ports(spec), vnc_port, publish)
        sb = self._register(spec, be, {"profile": profile, "attached": name or str(target)},
                            info={"name": name, "interface": interface, "target_port": port,
                                  "netns": ns})

        async def steps() -> None:
            progress(f"sandbox {sandbox_id}: attaching {target}" + (f" ({name})" if name else ""))
            await be.create(spec)
            self._roster.set_state(sb, SandboxState.STARTING)
            await self._publish(sb, placement, ForwardOptions(mode=forward_mode), progress)
            await self._readiness.await_ready(sb, progress)

        return await self._bring_up(sb, steps, t0)

    def _check_free(self, target: ipaddress.IPv4Address, netns: str,
                    moving: RunningSandbox | None = None) -> None:
        """Raise Conflict if another sandbox than ``moving`` has ``target`` in ``netns``."""
        for other in self._roster:
            if other is not moving and other.live.ip == str(target) and \
                    same_namespace(other.spec.netns, netns):
                raise Conflict(f"{target} is already attached as sandbox {other.id}"
                               + (f" ({other.spec.name})" if other.spec.name else ""))

    def _new_id(self) -> str:
        while True:
            sandbox_id = secrets.token_hex(3)
            # Its MAC (derived from the id) must be unique too: the bridge forwards by MAC.
            macs = {sandbox_mac(other.id) for other in self._roster}
            if sandbox_id not in self._roster and not netlink.netns_exists(
                netns_name(sandbox_id)
            ) and sandbox_mac(sandbox_id) not in macs:
                return sandbox_id

    def _register(self, spec: SandboxSpec, backend: Backend, created: dict[str, Any], *,
                  info: dict[str, Any] | None = None) -> RunningSandbox:
        """The one way a new sandbox enters the gateway (made or attached): a token, its
        record with the secrets sealed and the ``creating`` event (plus ``created``'s
        fields), backend ``info`` kept for an adopting gateway, a place in the roster."""
        token = new_token()
        agent_token = spec.secrets.get("agent_token", "")
        live = LiveSandbox(id=spec.id, ip=str(spec.address.ip), state=SandboxState.CREATING,
                           token_hash=hash_token(token), ports=backend.ports(spec),
                           secrets=spec.secrets, netns=spec.netns)
        sb = RunningSandbox(spec=spec, live=live, token=token, backend=backend,
                            agent_token_hash=hash_token(agent_token) if agent_token else "")
        # Secrets are sealed: the database alone opens no desktop and impersonates no agent.
        sealed = self._box.seal(json.dumps({"token": token, **spec.secrets}).encode(),
                                f"sandboxes/{spec.id}")
        event = {"state": live.state.value, "from": "", "reason": "", "ip": live.ip,
                 **created}
        store = self._roster.store
        seq = store.add_sandbox(
            sandbox_id=spec.id, backend=backend.name, profile=spec.profile,
            state=live.state.value, ip=live.ip, prefixlen=spec.address.network.prefixlen,
            bridge=spec.bridge, token_hash=live.token_hash,
            agent_token_hash=sb.agent_token_hash, secrets=sealed,
            event=("sandbox.state", event))
        self._roster.published(seq, "sandbox.state", spec.id, event)
        if info is not None:
            store.set_state(spec.id, live.state.value, info=info)
        self._roster.add(sb)
        return sb

    async def _bring_up(self, sb: RunningSandbox, steps: Callable[[], Awaitable[None]],
                        t0: float) -> SandboxInfo:
        """Run the steps that make a new sandbox ready; then ready and monitored. A step
        that fails fails the sandbox and removes what was made (and raises)."""
        try:
            await steps()
        except BaseException as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if sb.id not in self._roster or sb.live.state in (SandboxState.STOPPING,
                                                              SandboxState.STOPPED):
                raise SandboxFailed(f"sandbox {sb.id} was deleted while it started: "
                                    f"{reason}") from None
            self._roster.set_state_or_log(sb, SandboxState.FAILED, reason)
            await self.destroy(sb.id)
            raise
        sb.ready_seconds = round(time.perf_counter() - t0, 3)
        self._roster.set_state(sb, SandboxState.READY)
        self._readiness.watch(sb)
        log.info("sandbox %s ready in %.2f s: %s", sb.id, sb.ready_seconds,
                 "; ".join(f"{p.hop} {p.detail} ({p.elapsed * 1000:.0f} ms)" for p in sb.probes))
        return self.info(sb.id)

    async def retarget(self, sandbox_id: str, *, ip: str | None = None, gone: bool = False,
                       reason: str = "") -> SandboxInfo:
        """The owner of an attached target says it moved to ``ip``, or is ``gone``.

        Moved: live connections are closed with the reason, the forwards (same ids, same
        host ports) and the bridge go to the new address, tokens stay valid, readiness is
        proven again. Gone: the target is ``failed`` with the reason; its forwards and
        live connections are closed.

        Raises:
            SandboxNotFound: no such attached target.
            Forbidden, UsageError, Conflict: as for :meth:`attach` (the new address, the
                reason's text).
            SandboxFailed: nothing answers at the new address (as for :meth:`attach`,
                within seconds); the target stays where it was, still watched.
        """
        sb = self._roster.get(sandbox_id)
        if sb is None or sb.backend.name != "external":
            raise SandboxNotFound(f"no attached target {sandbox_id!r}")
        if gone == (ip is not None):
            raise UsageError("say where the target moved (ip) or that it is gone, one of them")
        printable(reason, "the reason", MAX_REASON)
        if sb.live.state not in (SandboxState.READY, SandboxState.DEGRADED) and not gone:
            raise Conflict(f"attached target {sandbox_id} is {sb.live.state.value}: attach "
                           "it again (detach, attach) rather than moving it")
        if ip is not None:  # checked before anything changes: a refusal loses nothing
            target = resolve_ip(ip)
            check_target(target, allowed=self._config.attach_subnets,
                         pool=self._config.net.subnet, netns=sb.spec.netns)
            self._check_free(target, sb.spec.netns, moving=sb)
            link = "" if sb.spec.netns else \
                await asyncio.to_thread(route_to, target, sb.spec.interface)
            backend = sb.backend
            assert isinstance(backend, ExternalBackend)
            try:
                await backend.check_answers(dataclasses.replace(
                    sb.spec, address=ipaddress.IPv4Interface(f"{target}/32"), gateway=target),
                    link)
            except SandboxFailed as exc:
                raise SandboxFailed(f"{exc}; the target stays at {sb.live.ip}",
                                    hint=exc.hint) from None
        await self._readiness.unwatch(sandbox_id)
        if gone:
            why = f"{GONE_BY_OWNER}{': ' + reason if reason else ''}"
            self._port.close_sessions(sandbox_id, 1001, f"the target is gone: {reason}"
                                      if reason else "the target is gone")
            await self.drop_forwards(sandbox_id)
            if sb.live.state is not SandboxState.FAILED:
                self._roster.set_state(sb, SandboxState.FAILED, why)
            return self.info(sandbox_id)
        old = sb.live.ip
        moved = f"the target moved from {old} to {target}" + (f": {reason}" if reason else "")
        self._port.close_sessions(sandbox_id, 1012, moved)  # browsers reconnect, same URL
        sb.spec = dataclasses.replace(sb.spec, address=ipaddress.IPv4Interface(f"{target}/32"),
                                      gateway=target)
        sb.live.ip = str(target)
        self._roster.store.move_sandbox(sandbox_id, str(target))
        for fwd in self._forwards.of(sandbox_id):  # same ids and host ports, new target
            await self._forwards.remove(fwd.id)
            options = fwd.options
            if options.egress:  # the new address may go out through another link
                options = dataclasses.replace(options, egress=await asyncio.to_thread(
                    sb.backend.host_link, sb.spec))
            await self._forwards.add(sandbox=sandbox_id, guest_ip=str(target),
                                     mappings=[(fwd.name, fwd.mapping)], options=options,
                                     ids=[fwd.id])
        self._roster.record_event("sandbox.moved", sandbox_id,
                                  {"from": old, "to": str(target), "reason": reason})
        if sb.live.state is SandboxState.READY:  # until readiness is proven again
            self._roster.set_state(sb, SandboxState.DEGRADED, moved)
        sb.probes.clear()
        try:
            await self._readiness.await_ready(sb, quiet)
        except SandboxFailed as exc:
            self._roster.set_state(sb, SandboxState.FAILED, str(exc).splitlines()[0])
            raise
        if sb.live.state is not SandboxState.READY:
            self._roster.set_state(sb, SandboxState.READY)
        self._readiness.watch(sb)
        return self.info(sandbox_id)

    async def destroy(self, sandbox_id: str) -> None:
        """Stop forwards and guest, remove namespace, link, files, record and lease.

        Raises:
            SandboxNotFound: no such sandbox.
        """
        sb = self._roster[sandbox_id]
        self._access.release(sb)
        await self._readiness.unwatch(sandbox_id)
        if sb.live.state is not SandboxState.STOPPING:
            self._roster.set_state_or_log(sb, SandboxState.STOPPING)
        self._access.end_sessions(sandbox_id, SessionState.CANCELLED, "the sandbox was deleted")
        # Its tokens' fingerprints: the doctor can tell a link of a deleted sandbox.
        self._roster.record_event("sandbox.deleted", sandbox_id, {"tokens": [
            fingerprint(h) for h in (sb.live.token_hash,
                                     *(g.token_hash for g in sb.live.grants.values()))]})
        await self.drop_forwards(sandbox_id)
        # Browsers see why, not a session that hangs.
        self._port.close_sessions(
            sandbox_id, 1001, "the target was detached: sandport no longer fronts it"
            if sb.backend.name == "external" else "the sandbox was destroyed")
        await sb.backend.destroy(sb.spec)
        await self._guards.release(sandbox_id)  # its port is gone with it
        self._roster.set_state_or_log(sb, SandboxState.STOPPED)
        self._roster.discard(sandbox_id)

    async def guard(self, sb: RunningSandbox) -> None:
        """Anti-spoofing on a sandbox's bridge port (made or adopted): only its own MAC
        and address pass (:mod:`sandport.net.antispoof`). Attached targets have no port
        on the bridge."""
        if sb.backend.name != "external":
            await self._guards.admit(sb.id, sb.backend.host_link(sb.spec), sb.live.ip)

    # Forwards ------------------------------------------------------------------------------

    def _place(self, ports: tuple[GuestPort, ...], vnc_port: int,
               publish: list[PortMapping] | None) -> Placement:
        """A new sandbox's forwards, checked before anything is made: its exposed ports'
        (the primary's always, on ``vnc_port`` for a desktop; another one's when a
        ``publish`` mapping names it) and the extra ones.

        Raises:
            PortSpecError: two forwards want one host port (the message names the
                other: a ``-p`` of the request, ``vnc_port`` or another sandbox's forward),
                or ``vnc_port`` and a ``-p`` set VNC's host port differently.
        """
        exposed = []
        for i, p in enumerate(ports):
            if p.path or not p.port:  # a VM's console: the bridge only
                continue
            if i:  # published only when a -p names it
                exposed.append(ExposedPort(name=p.name, guest_port=p.port))
                continue
            host_port = vnc_port if p.protocol == "rfb" else 0
            exposed.append(ExposedPort(
                name=p.name, guest_port=p.port,
                default=PortMapping(host_ip=self._config.forward_host, host_port=host_port,
                                    guest_port=p.port),
                label=f"vnc_port {host_port}" if host_port else "", fixed=host_port != 0))
        return place(publish or [], exposed, existing=self._forwards.in_use())

    async def _publish(self, sb: RunningSandbox, placement: Placement,
                       options: ForwardOptions | None, progress: Progress) -> None:
        """Forward the exposed ports (the primary's, where readiness probes), then the
        extra ones with ``options``. An exposed port's forward gets no PROXY header and
        no limits (readiness speaks the guest's protocol to it); its mode is the
        gateway's, or the one asked for when a ``-p`` set it."""
        mode = options.mode if sb.backend.name == "external" and options is not None \
            else self._config.forward_mode
        progress(f"sandbox {sb.id}: forwarding ports ({mode} mode)")
        asked = options.mode if options is not None else mode
        for name, mapping in placement.exposed:
            own = ForwardOptions(mode=asked if name in placement.asked else mode)
            try:
                await self._add_forwards(sb, [(name, mapping)], own)
            except PortInUseError as exc:
                what = "VNC port" if name == "vnc" else f"{name} port"
                raise PortInUseError(exc.host, exc.port, what=what) from None
        if placement.extra:
            await self._add_forwards(sb, list(placement.extra),
                                     options or ForwardOptions(mode=mode))

    async def _add_forwards(self, sb: RunningSandbox, mappings: list[tuple[str, PortMapping]],
                            options: ForwardOptions) -> list[HostForward]:
        """Publish ports of a sandbox and remember them (a restart publishes them again)."""
        if sb.spec.netns:  # an attached container's: relayed, sockets made in its namespace
            options = dataclasses.replace(options, mode="proxy", netns=sb.spec.netns)
        elif sb.backend.name == "external":  # kernel mode: masquerade on its link
            egress = await asyncio.to_thread(sb.backend.host_link, sb.spec)
            options = dataclasses.replace(options, egress=egress)
        added = await self._forwards.add(sandbox=sb.id, guest_ip=sb.live.ip,
                                         mappings=mappings, options=options)
        for f in added:
            m = f.mapping
            self._roster.store.add_forward(ForwardRecord(
                id=f.id, sandbox_id=sb.id, name=f.name, host_ip=m.host_ip,
                host_port=m.host_port, guest_port=m.guest_port, protocol=m.protocol,
                options=dataclasses.asdict(options)))
            self._roster.record_event("forward.added", sb.id, f.summary())
        return added

    async def add_forwards(self, sandbox_id: str, publish: list[PortMapping],
                           options: ForwardOptions | None = None) -> list[dict[str, Any]]:
        """Forward more ports of a running sandbox; all or nothing.

        Raises:
            SandboxNotFound: no such sandbox.
            Conflict: the sandbox is not running (failed, going away).
            PortInUseError, UsageError: a port is taken or already forwarded.
        """
        sb = self._roster[sandbox_id]
        if sb.live.state not in (SandboxState.READY, SandboxState.DEGRADED,
                                 SandboxState.STARTING):
            raise Conflict(f"sandbox {sandbox_id} is {sb.live.state.value}")
        added = await self._add_forwards(
            sb, [(f"{m.guest_port}/{m.protocol}", m) for m in publish],
            options or ForwardOptions(mode=self._config.forward_mode))
        return [f.summary() for f in added]

    async def remove_forward(self, sandbox_id: str, forward_id: str) -> None:
        """Stop one forward of a sandbox (its VNC forward too, if asked).

        Raises:
            SandboxNotFound: no such sandbox, or no such forward of it.
        """
        sb = self._roster[sandbox_id]
        if not any(f.id == forward_id for f in self._forwards.of(sb.id)):
            raise SandboxNotFound(f"sandbox {sandbox_id} has no forward {forward_id!r}")
        gone = await self._forwards.remove(forward_id)
        self._roster.store.remove_forward(forward_id)
        if gone is not None:
            self._roster.record_event("forward.removed", sandbox_id, gone.summary())

    async def restore_forwards(self, sb: RunningSandbox) -> None:
        """Publish the stored forwards of an adopted sandbox again: same ports, same ids."""
        for rec in self._roster.store.forwards(sb.id):
            mapping = PortMapping(host_ip=rec.host_ip, host_port=rec.host_port,
                                  guest_port=rec.guest_port, protocol=rec.protocol)
            await self._forwards.add(sandbox=sb.id, guest_ip=sb.live.ip,
                                     mappings=[(rec.name, mapping)],
                                     options=ForwardOptions(**rec.options), ids=[rec.id])

    async def drop_forwards(self, sandbox_id: str) -> None:
        """Stop every forward of a sandbox on a path that must go on (a delete, a target
        gone, a sandbox not adopted): a failure is logged with the sandbox id."""
        try:
            await self._forwards.remove_sandbox(sandbox_id)
        except (OSError, SandportError) as exc:
            log.error("sandbox %s: removing its forwards failed: %s", sandbox_id, exc)

    # What callers see ----------------------------------------------------------------------

    def _address_for_clients(self, bind_host: str) -> str:
        """Where clients reach a forward bound to ``bind_host``: a wildcard bind is reached
        at the host the gateway's links name (``--public-url``, else the address it picked
        for a wildcard listen), so a printed VNC address opens from where its link does."""
        if bind_host in ("0.0.0.0", "", "::"):
            host = urlsplit(self._port.link_base).hostname or ""
            if host and host not in ("localhost", "127.0.0.1", "::1"):
                return host
        return connect_host(bind_host)

    def info(self, sandbox_id: str) -> SandboxInfo:
        """The printable facts of a running sandbox.

        Raises:
            SandboxNotFound: no such sandbox.
        """
        sb = self._roster[sandbox_id]
        fwd = self._forwards.named(sandbox_id, "vnc")  # desktops only
        return SandboxInfo(
            id=sandbox_id,
            ip=sb.live.ip,
            state=sb.live.state.value,
            profile=sb.spec.profile,
            token=sb.token,
            desktop_url=desktop_link(self._port.link_base, sandbox_id, sb.token,
                                     desktop_port(sb.live.ports)),
            vnc_host=self._address_for_clients(fwd.mapping.host_ip if fwd is not None
                                               else self._config.forward_host),
            vnc_port=fwd.host_port if fwd is not None else 0,
            vnc_password=sb.spec.secrets.get("vnc_password", ""),
            colour=colour_hex(desktop_colour(sandbox_id)),
            ready_seconds=sb.ready_seconds,
            forwards=[f.summary() for f in self._forwards.of(sandbox_id)],
            reason=sb.live.reason,
            probes=[_probe_json(p) for p in sb.probes],
            last_probe=_probe_json(sb.last_probe) if sb.last_probe is not None else None,
            agent=sb.agent_report,
            agent_report_at=sb.agent_report_at,
            diagnosis=sb.diagnosis.as_json() if sb.diagnosis is not None else None,
            backend=sb.backend.name,
            name=sb.spec.name,
        )

    def read_log(self, sandbox_id: str, name: str = "", offset: int = -65536,
                 limit: int = 1 << 20) -> tuple[bytes, int, list[str]]:
        """A guest log from ``offset`` (negative: from the end): ``(bytes, next offset,
        every log name)``. ``name`` "" is the VM's serial console, or the first log.

        Raises:
            SandboxNotFound: no such sandbox, or no such log (the message lists them).
        """
        logs = self._roster[sandbox_id].spec.workdir / "logs"
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
