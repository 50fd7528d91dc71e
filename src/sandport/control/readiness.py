"""Readiness: a sandbox is ready when its services answer their protocols through the
path a user takes, and stays watched while it runs.

Owns:
    * the probes of a sandbox's paths (the primary port through its host forward, a
      desktop's VNC through the WebSocket bridge, the guest agent) and the wait for all
      of them at start (:meth:`ReadinessMonitor.await_ready`);
    * the monitor of each ready sandbox (one task per sandbox): ``ready <-> degraded``,
      ``failed`` for a VM that exited or an attached target silent past its grace;
    * restarts of exited guest services (at most :data:`MAX_RESTARTS` in
      :data:`RESTART_WINDOW` seconds);
    * the doctor's diagnosis when a sandbox degrades (:meth:`ReadinessMonitor.doctor`).

Must not touch: the table (it never adds or removes a sandbox), forwards (it probes
through them), tokens and sessions. State changes go through the :class:`Roster`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable

from sandport.config import GatewayConfig, connect_host
from sandport.control import facts
from sandport.control.forwards import ForwardTable
from sandport.control.roster import GatewayPort, Roster, RunningSandbox
from sandport.doctor import Report, diagnose
from sandport.errors import SandboxFailed
from sandport.probe import (
    ProbeResult,
    probe_agent_health,
    probe_http,
    probe_rfb_tcp,
    probe_rfb_ws,
    probe_tcp,
    wait_until,
)
from sandport.sandbox.base import AGENT_PORT
from sandport.sandbox.state import SandboxState

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
PathProbe = Callable[[], Awaitable[ProbeResult]]
MAX_RESTARTS = 3  # guest service restarts within RESTART_WINDOW before a sandbox fails
RESTART_WINDOW = 300.0


def quiet(_: str) -> None:
    """A :data:`Progress` that says nothing."""


def _insecure_client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _not_ready_hint(sb: RunningSandbox) -> str:
    """What to do about a sandbox that did not become ready (it is removed, with its
    files: no log of it is left to point at)."""
    if sb.backend.name == "external":
        primary = sb.live.ports[0]
        where = f"{sb.live.ip}:{primary.port}" + (f" in {sb.spec.netns}" if sb.spec.netns
                                                  else "")
        listen = "" if sb.spec.netns else (" (listening on its address or 0.0.0.0, not "
                                            "only 127.0.0.1)")
        return (f"sandport does not run attached targets and keeps no log of them: check "
                f"that the target's service answers on {where}{listen}, then attach it "
                "again")
    return ("the sandbox was removed, with its logs; the words above are what its path "
            "and its guest said")


class ReadinessMonitor:
    """Probes, the wait for readiness and the monitors of one gateway run."""

    def __init__(self, roster: Roster, forwards: ForwardTable, config: GatewayConfig,
                 port: GatewayPort) -> None:
        self._roster = roster
        self._forwards = forwards
        self._config = config
        self._port = port
        #: The monitor of each watched sandbox, by id (see :meth:`_monitor`).
        self._monitors: dict[str, asyncio.Task[None]] = {}

    # Probes --------------------------------------------------------------------------------

    def primary_probe(self, sb: RunningSandbox, timeout: float) -> tuple[str, PathProbe] | None:
        """``(label, probe)`` of the profile's primary port through its host forward:
        an RFB handshake for a desktop, an HTTP GET for an HTTP service, a connect for
        a TCP one. None when that forward is gone."""
        primary = sb.live.ports[0]
        fwd = self._forwards.named(sb.id, primary.name)
        if fwd is None:
            return None
        host, port = connect_host(fwd.mapping.host_ip), fwd.host_port
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

    async def await_ready(self, sb: RunningSandbox, progress: Progress) -> None:
        """PathProbe every path a user takes until each answers its protocol: the primary port
        through its host forward, a desktop's VNC through the WebSocket bridge too, and
        the guest agent. The probes are kept (``sb.probes``).

        Raises:
            SandboxFailed: a path did not answer within ``ready_timeout`` (or the guest
                died meanwhile): the hop, its answer and the guest console.
        """
        backend, spec = sb.backend, sb.spec
        password = spec.secrets.get("vnc_password")
        primary = self.primary_probe(sb, 3.0)
        if primary is None:
            raise RuntimeError(f"sandbox {spec.id} has no forward of its primary port")
        ws_url = f"{self._port.ws_base}/s/{spec.id}/ports/vnc/ws?token={sb.token}"
        # Our own certificate, probed by address: the path is what is proven, not the name.
        probe_ssl = _insecure_client_context() if self._config.tls is not None else None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.ready_timeout

        def give_up() -> str | None:  # no waiting out the timeout for what already died
            if sb.live.state in (SandboxState.STOPPING, SandboxState.STOPPED):
                return "the sandbox was deleted while it started"
            return backend.failure(spec, agent=True)

        hops: list[tuple[str, PathProbe]] = [primary]
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
                exited = backend.failure(spec, agent=True)
                raise SandboxFailed(
                    f"sandbox {spec.id} did not become ready: {label}: {result.detail} "
                    f"(stage {result.stage}, {attempts} attempts)"
                    + (f"; {exited}" if exited else "")
                    + (f"; guest console: {console}" if console else ""),
                    hint=_not_ready_hint(sb),
                )

    # Monitors ------------------------------------------------------------------------------

    def watch(self, sb: RunningSandbox, first_delay: float | None = None) -> None:
        """Start the monitor of a ready sandbox (``first_delay``: see :meth:`_monitor`)."""
        self._monitors[sb.id] = asyncio.create_task(
            self._monitor(sb, first_delay), name=f"sandbox {sb.id} readiness")

    def watching(self, sandbox_id: str) -> bool:
        """Whether the monitor of ``sandbox_id`` runs."""
        monitor = self._monitors.get(sandbox_id)
        return monitor is not None and not monitor.done()

    async def unwatch(self, sandbox_id: str) -> None:
        """Stop the monitor of a sandbox (if it has one) and wait until it has ended."""
        monitor = self._monitors.pop(sandbox_id, None)
        if monitor is not None:
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)

    async def _monitor(self, sb: RunningSandbox, first_delay: float | None = None) -> None:
        """PathProbe a ready sandbox's primary port through its host forward, every
        ``probe_interval``.

        A failed probe turns it ``degraded`` with the reason; the next good probe turns it
        ``ready`` again. A guest service that exited is restarted (``degraded`` meanwhile;
        see :meth:`_restart_services`). Ends with the sandbox. ``first_delay`` (default:
        the interval) is 0 for an adopted sandbox: its readiness is proven again at once.
        """
        interval = self._config.probe_interval
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
                self._roster.set_state(sb, SandboxState.FAILED, dead)  # a VM that exited
                return
            if dead is not None:
                if not await self._restart_services(sb, dead, restarts):
                    return
                continue  # the next probe tells whether it is back
            if await sb.backend.revive_agent(sb.spec):
                log.warning("sandbox %s: the guest agent had exited; started it again", sb.id)
                self._roster.record_event("agent.restarted", sb.id, {})
            probe = self.primary_probe(sb, timeout)
            if probe is None:
                ok, why = False, "the forward of its primary port is gone"
            else:
                result = await probe[1]()
                sb.last_probe = result
                ok, why = result.ok, f"{result.hop}: {result.detail} (stage {result.stage})"
            if sb.live.state not in (SandboxState.READY, SandboxState.DEGRADED):
                return  # it changed while we probed
            if not ok and sb.live.state is SandboxState.READY:
                self._roster.set_state(sb, SandboxState.DEGRADED, why)
                degraded_since = time.monotonic()
                await self._diagnose(sb)
            elif ok and sb.live.state is SandboxState.DEGRADED:
                sb.diagnosis, sb.live.diagnosis = None, ""
                self._roster.set_state(sb, SandboxState.READY)
            elif not ok and sb.backend.name == "external" and \
                    time.monotonic() - degraded_since > self._config.attach_grace:
                # Not ours to restart: after the grace it is failed, with the doctor's word.
                await self._diagnose(sb)
                finding = sb.live.diagnosis or why
                self._roster.set_state(sb, SandboxState.FAILED, f"no answer for "
                                       f"{self._config.attach_grace:g} s: {finding}")
                return

    async def _restart_services(self, sb: RunningSandbox, why: str, restarts: list[float]) -> bool:
        """A guest service exited: degraded, then restart the profile's services.

        More than :data:`MAX_RESTARTS` in :data:`RESTART_WINDOW` seconds, or a restart
        that fails, turns the sandbox failed (returns False: stop monitoring).
        """
        now = time.monotonic()
        restarts[:] = [t for t in restarts if now - t < RESTART_WINDOW]
        if sb.live.state is SandboxState.READY:
            self._roster.set_state(sb, SandboxState.DEGRADED, f"{why}; restarting")
        if len(restarts) >= MAX_RESTARTS:
            self._roster.set_state(sb, SandboxState.FAILED,
                                   f"{why} ({len(restarts)} restarts in "
                                   f"{RESTART_WINDOW:.0f} s)")
            return False
        restarts.append(now)
        try:
            await sb.backend.stop(sb.spec)
            await sb.backend.start(sb.spec)
        except Exception as exc:
            self._roster.set_state(sb, SandboxState.FAILED, f"restart failed: {exc}")
            return False
        log.info("sandbox %s: guest services restarted (%s)", sb.id, why)
        return True

    # Diagnosis -----------------------------------------------------------------------------

    async def doctor(self, sandbox_id: str, *, port: str | None = None,
                     token: str | None = None) -> Report:
        """Walk the path to ``sandbox_id`` (its ``port``; all by default) hop by hop and
        name the broken hop (:mod:`sandport.doctor`). ``token``: a token someone uses for
        it (a link), checked too. A sandbox that was deleted gives a report saying when."""
        sb = self._roster.get(sandbox_id)
        link = await asyncio.to_thread(sb.backend.host_link, sb.spec) if sb else ""
        return await diagnose(facts.subject(
            self._roster, self._forwards, self._config, sandbox_id=sandbox_id, port=port,
            token=token, link=link, ws_base=self._port.ws_base))

    async def _diagnose(self, sb: RunningSandbox) -> None:
        """Name the broken hop of a sandbox that degraded (``sandport doctor``), for its
        readiness details and the reasons refusals give."""
        try:
            report = await self.doctor(sb.id)
        except Exception:  # a diagnosis must never stop the monitor
            log.exception("sandbox %s: the doctor failed", sb.id)
            return
        row = report.failed
        sb.diagnosis = row
        sb.live.diagnosis = "" if row is None else \
            f"{row.hop} hop, {row.check}: {row.evidence}" + (f" — {row.fix}" if row.fix else "")
        if row is not None:
            log.warning("sandbox %s: doctor: %s", sb.id, sb.live.diagnosis)
            self._roster.record_event("sandbox.diagnosis", sb.id, row.as_json())
