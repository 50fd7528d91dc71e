"""The gateway's port forwards: one table of every host port it publishes, in any mode.

A forward publishes one guest port of one sandbox on one host address, port and protocol
(a :class:`~sandport.forward.spec.PortMapping`). It runs in one of two modes:

``kernel``  nftables DNAT (:mod:`sandport.net.nft`): the kernel translates, nothing runs
            in user space; local clients (127.0.0.1 too) and remote ones are served and
            the guest sees a remote client's real address. The host port is *reserved* with
            a bound socket, so no other program can take it and ``ss`` names the owner.
``proxy``   the userspace relay (:mod:`sandport.forward.tcp` on splice,
            :mod:`sandport.forward.udp`): PROXY protocol, connection limits, idle timeouts
            and byte counters.

``auto`` picks ``kernel`` where it can serve what was asked and otherwise ``proxy``, and
every forward records why (:attr:`HostForward.why`). Adding forwards is all or nothing: a
conflict or a bind failure leaves the table as it was. The kernel ruleset is rewritten
atomically after every change, and once at gateway start with an empty set: that removes
whatever a gateway killed with ``kill -9`` left behind. The same transaction writes the
gateway's host isolation (:class:`~sandport.net.nft.HostGuard`: what sandboxes may reach
on the host), so the guard is there from the start and through every change.

Owns: every host port the gateway publishes (relays, reservations, its nft chains in
``ip sandport``, host isolation included) and the interface settings kernel forwards
need (made, recorded and given back by :mod:`sandport.net.nft` through the host's ledger,
:mod:`sandport.net.sysctl`). Must not touch: which
sandbox gets which forward or what is stored about it (:mod:`sandport.control.sandboxes`).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import shutil
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from sandport.bridge.throttle import LoginThrottle
from sandport.errors import MissingPackage, PortInUseError, UsageError
from sandport.forward.base import PortInUse, format_addr
from sandport.forward.rfbgate import LOGIN_BLOCKED, RfbGate
from sandport.forward.spec import PortMapping, check_overlaps
from sandport.forward.tcp import TcpForward, TcpForwardSpec
from sandport.forward.udp import UdpForward, UdpForwardSpec
from sandport.net import netlink, nft
from sandport.net.addrwatch import AddressWatch
from sandport.net.upstream import DEFAULT_GUEST_TIMEOUT

log = logging.getLogger(__name__)

MODES = ("auto", "kernel", "proxy")


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardOptions:
    """How a forward should run.

    Attributes:
        mode: ``auto``, ``kernel`` or ``proxy``.
        proxy_protocol: PROXY protocol version (1, 2) sent to the guest; proxy mode only.
        idle_timeout: Seconds of silence after which a TCP connection is closed; proxy only.
        max_connections: Most TCP connections at once; proxy only.
        netns: the network namespace (its file) the target lives in, an attached
            container's: the relay makes its upstream sockets there; proxy only.
        egress: kernel mode to an attached target: the interface it is reached through
            (its packets from 127.0.0.1 are masqueraded there, ``route_localnet`` and
            ``forwarding`` are on while a forward needs them, restored after).
    """

    mode: str = "auto"
    proxy_protocol: int | None = None
    idle_timeout: float | None = None
    max_connections: int | None = None
    netns: str = ""
    egress: str = ""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"forward mode {self.mode!r} is not one of {', '.join(MODES)}")

    def proxy_only(self) -> str | None:
        """Why these options need the userspace relay, or None."""
        if self.proxy_protocol is not None:
            return "PROXY protocol headers need the userspace relay"
        if self.max_connections is not None:
            return "a connection limit needs the userspace relay"
        if self.idle_timeout is not None:
            return "an idle timeout needs the userspace relay"
        if self.netns:
            return "a target in another network namespace needs the userspace relay"
        return None


def choose_mode(mapping: PortMapping, options: ForwardOptions, *,
                nft_available: bool) -> tuple[str, str]:
    """``(mode, why)`` for one mapping.

    Raises:
        UsageError: ``kernel`` was asked for and cannot serve this mapping.
    """
    against = options.proxy_only()
    if against is None and not is_ipv4(mapping.host_ip):
        against = "kernel forwards are IPv4 only (nft table ip sandport)"
    if against is None and not nft_available:
        against = "nft is not installed (apt-get install nftables)"
    if options.mode == "proxy":
        return "proxy", "asked for"
    if options.mode == "kernel":
        if against is not None:
            raise UsageError(f"cannot forward {mapping} in kernel mode: {against}",
                             hint="use --forward-mode proxy or auto")
        return "kernel", "asked for"
    if against is not None:
        return "proxy", against
    return "kernel", "auto: nft DNAT serves this (local and remote clients)"


@dataclass(slots=True, kw_only=True)
class HostForward:
    """One published port of a sandbox."""

    id: str
    sandbox: str
    name: str
    mapping: PortMapping
    guest_ip: str
    options: ForwardOptions
    mode: str
    why: str
    relay: TcpForward | UdpForward | None = None
    reservation: socket.socket | None = None
    created: float = field(default_factory=time.time)

    @property
    def host_port(self) -> int:
        """The bound host port (the chosen one when the mapping asked for 0)."""
        return self.mapping.host_port

    def rule(self) -> nft.DnatRule:
        """The DNAT rule of a kernel forward."""
        return nft.DnatRule(host_ip=self.mapping.host_ip, host_port=self.mapping.host_port,
                            guest_ip=self.guest_ip, guest_port=self.mapping.guest_port,
                            protocol=self.mapping.protocol, egress=self.options.egress)

    def summary(self) -> dict[str, Any]:
        """What the forward is: addresses, mode and why."""
        m = self.mapping
        return {
            "id": self.id, "sandbox": self.sandbox, "name": self.name,
            "protocol": m.protocol, "host": format_addr(m.host_ip, m.host_port),
            "guest": format_addr(self.guest_ip, m.guest_port), "mode": self.mode,
            "why": self.why,
        }

    def as_json(self, kernel_counts: dict[str, int]) -> dict[str, Any]:
        """Mode, addresses, state and counters, as ``forward list`` and the API show them."""
        doc = self.summary()
        doc["state"] = "active"
        relay = self.relay
        if isinstance(relay, TcpForward):
            st = relay.stats
            failures = st.failures
            if relay.rfb_gate is not None:
                failures = {**failures, LOGIN_BLOCKED: relay.rfb_gate.blocks}
            doc.update(data_path=relay.data_path, active=st.active, total=st.total,
                       bytes_up=st.bytes_up, bytes_down=st.bytes_down,
                       failures=failures, buffered=st.buffered,
                       pipes=st.pipes, fallbacks=st.fallbacks)
        elif isinstance(relay, UdpForward):
            us = relay.stats
            doc.update(data_path="datagram", active=us.flows_active, total=us.flows_total,
                       bytes_up=us.bytes_up, bytes_down=us.bytes_down,
                       failures={"limit": us.dropped_limit,
                                 "unreachable": us.target_unreachable,
                                 "idle": us.expired, "buffer": us.dropped_buffer})
        else:
            doc.update(data_path="kernel", active=None,
                       total=kernel_counts.get(self.rule().comment, 0),
                       bytes_up=None, bytes_down=None, failures={})
        return doc


def _reserve(mapping: PortMapping) -> socket.socket:
    """Bind (not listen) the host port of a kernel forward so nobody else can take it.

    Raises:
        PortInUseError: The port is taken.
    """
    kind = socket.SOCK_STREAM if mapping.protocol == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(socket.AF_INET, kind)
    host = "0.0.0.0" if mapping.host_ip in nft.WILDCARD else mapping.host_ip
    try:
        sock.bind((host, mapping.host_port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(mapping.host_ip, mapping.host_port,
                                 what=f"{mapping.protocol} port") from None
        raise _bind_error(mapping, exc) from None
    return sock


def _bind_error(mapping: PortMapping, exc: OSError) -> UsageError:
    """A host address this machine cannot bind (not one of its addresses, a link-local
    address without a zone...), in words."""
    return UsageError(
        f"cannot publish {mapping}: binding {format_addr(mapping.host_ip, mapping.host_port)}"
        f" failed: {exc.strerror or exc}",
        hint="use an address of this host (`ip -brief addr`), 127.0.0.1 or 0.0.0.0")


class ForwardTable:
    """Every forward of one gateway; the kernel ones share its nft chains (with the host
    isolation ``guard``, when given)."""

    def __init__(self, bridge: str, guard: nft.HostGuard | None = None) -> None:
        self.bridge = bridge
        self.guard = guard
        self._forwards: dict[str, HostForward] = {}
        self._seq = 0
        self._lock = asyncio.Lock()
        self.nft_available = shutil.which("nft") is not None
        #: While True, the kernel rules and host settings stay as a killed gateway left
        #: them (no rewrite, nothing given back): a start adopting forwards one sandbox at
        #: a time sets it; :meth:`reconcile` ends it and writes exactly this gateway's.
        self.keep_host_settings = False
        #: While a kernel forward binds 0.0.0.0: interfaces that come or go change where
        #: remote clients arrive, so the ruleset and settings are made again.
        self._watch = AddressWatch(self._interfaces_changed)
        self._ingress: list[str] = []  # where forwarding is on for remote clients
        self._refresh: asyncio.Task[None] | None = None
        self._changed_again = False
        #: Failed VNC logins by client and sandbox, shared with the WebSocket bridge: a
        #: relayed ``vnc`` port counts into it and refuses blocked clients (rfbgate).
        self.logins: LoginThrottle | None = None
        #: Seconds data to a guest may stay unacknowledged (GatewayConfig.guest_timeout).
        self.guest_timeout = DEFAULT_GUEST_TIMEOUT
        self._said_unthrottled = False

    def __iter__(self) -> Any:
        return iter(list(self._forwards.values()))

    def of(self, sandbox: str) -> list[HostForward]:
        """The forwards of one sandbox, in the order they were added."""
        return [f for f in self._forwards.values() if f.sandbox == sandbox]

    def named(self, sandbox: str, name: str) -> HostForward | None:
        """The forward of a sandbox called ``name`` (``vnc``, ``http``...), or None."""
        return next((f for f in self.of(sandbox) if f.name == name), None)

    def in_use(self) -> dict[PortMapping, str]:
        """The host side of every forward, with its owner (``sandbox 3fa9c1 (vnc)``): what
        a new forward must not take (:func:`~sandport.forward.spec.check_overlaps`)."""
        return {f.mapping: f"sandbox {f.sandbox} ({f.name})" for f in self._forwards.values()}

    async def reconcile(self) -> None:
        """Write the kernel ruleset for the current forwards (at start: none) and the guard.

        Raises:
            MissingPackage: a guard is asked for and nft is not installed: sandboxes would
                reach every host service.
        """
        if self.guard is not None and not self.nft_available:
            raise MissingPackage("nft is not installed: sandport isolates sandboxes from "
                                 "the host with nftables", hint="apt-get install nftables")
        self.keep_host_settings = False  # every adopted forward is back: give back the rest
        if self.nft_available:
            await self._apply_kernel()

    async def add(self, *, sandbox: str, guest_ip: str,
                  mappings: list[tuple[str, PortMapping]],
                  options: ForwardOptions, ids: list[str] | None = None) -> list[HostForward]:
        """Publish ``(name, mapping)`` pairs of a sandbox; all or nothing.

        ``ids`` gives the forwards their ids (a restart restores them as they were);
        by default they are numbered ``f1``, ``f2``...

        Raises:
            UsageError: overlapping host ports (the message names the owner), or a mode
                that cannot serve a mapping.
            PortInUseError: a host port is taken by another program.
        """
        async with self._lock:
            check_overlaps([m for _, m in mappings], self.in_use())
            plans = [(name, m, *choose_mode(m, options, nft_available=self.nft_available))
                     for name, m in mappings]
            added: list[HostForward] = []
            try:
                for i, (name, mapping, mode, why) in enumerate(plans):
                    added.append(await self._start(sandbox, name, mapping, guest_ip,
                                                   options, mode, why,
                                                   ids[i] if ids else None))
                if any(f.mode == "kernel" for f in added):
                    await self._apply_kernel()
            except BaseException:
                for fwd in added:
                    self._forwards.pop(fwd.id, None)
                    await _stop(fwd)
                try:
                    await self._apply_kernel()
                except Exception:  # the add's own error is what the caller hears
                    log.exception("forwards of sandbox %s: the kernel rules could not be "
                                  "rewritten after a failed add", sandbox)
                raise
            for fwd in added:
                log.info("forward %s: %s %s -> %s:%d (%s: %s)", fwd.id, fwd.mapping.protocol,
                         format_addr(fwd.mapping.host_ip, fwd.host_port), guest_ip,
                         fwd.mapping.guest_port, fwd.mode, fwd.why)
                if fwd.name == "vnc" and fwd.mode == "kernel" and self.logins is not None:
                    self._say_unthrottled(fwd)
            return added

    def _say_unthrottled(self, fwd: HostForward) -> None:
        """Once per run: failed logins through a kernel-mode VNC forward are not counted
        (no byte of it passes through sandport); a warning when remote clients reach it."""
        if self._said_unthrottled:
            return
        self._said_unthrottled = True
        host = fwd.mapping.host_ip
        remote = not host.startswith("127.") and host not in ("::1", "localhost")
        log.log(logging.WARNING if remote else logging.INFO,
                "forward %s: the VNC port %s is a kernel forward: failed VNC logins through "
                "it are not throttled (only the bridge's and proxy forwards' are); "
                "--forward-mode proxy throttles them", fwd.id,
                format_addr(host, fwd.host_port))

    async def _start(self, sandbox: str, name: str, mapping: PortMapping, guest_ip: str,
                     options: ForwardOptions, mode: str, why: str,
                     forward_id: str | None = None) -> HostForward:
        if forward_id is None:
            self._seq += 1
            forward_id = f"f{self._seq}"
        elif forward_id[1:].isdigit():  # never hand out a restored id again
            self._seq = max(self._seq, int(forward_id[1:]))
        if forward_id in self._forwards:
            raise UsageError(f"forward id {forward_id} is taken")
        fwd = HostForward(id=forward_id, sandbox=sandbox, name=name, mapping=mapping,
                          guest_ip=guest_ip, options=options, mode=mode, why=why)
        label = f"{sandbox}/{name}"
        if mode == "kernel":
            fwd.reservation = _reserve(mapping)
            port = int(fwd.reservation.getsockname()[1])
        elif mapping.protocol == "tcp":
            tcp = TcpForward(TcpForwardSpec(
                listen_host=mapping.host_ip, listen_port=mapping.host_port,
                target_host=guest_ip, target_port=mapping.guest_port, name=label,
                proxy_protocol=options.proxy_protocol, idle_timeout=options.idle_timeout,
                max_connections=options.max_connections, netns=options.netns,
                guest_timeout=self.guest_timeout))
            if name == "vnc" and self.logins is not None and options.proxy_protocol is None:
                tcp.rfb_gate = RfbGate(self.logins, sandbox)
            relay: TcpForward | UdpForward = tcp
            port = await _start_relay(relay, mapping)
            fwd.relay = relay
        else:
            relay = UdpForward(UdpForwardSpec(
                listen_host=mapping.host_ip, listen_port=mapping.host_port,
                target_host=guest_ip, target_port=mapping.guest_port, name=label,
                netns=options.netns))
            port = await _start_relay(relay, mapping)
            fwd.relay = relay
        fwd.mapping = PortMapping(host_ip=mapping.host_ip, host_port=port,
                                  guest_port=mapping.guest_port, protocol=mapping.protocol)
        self._forwards[fwd.id] = fwd
        return fwd

    async def remove(self, forward_id: str) -> HostForward | None:
        """Stop and forget one forward; None when there is no such forward."""
        async with self._lock:
            fwd = self._forwards.pop(forward_id, None)
            if fwd is None:
                return None
            if fwd.mode == "kernel":
                await self._apply_kernel()
            await _stop(fwd)
            return fwd

    async def remove_sandbox(self, sandbox: str) -> None:
        """Stop and forget every forward of a sandbox."""
        async with self._lock:
            gone = self.of(sandbox)
            for fwd in gone:
                del self._forwards[fwd.id]
            if any(f.mode == "kernel" for f in gone):
                await self._apply_kernel()
            for fwd in gone:
                await _stop(fwd)

    async def close(self, *, keep_guard: bool = False) -> None:
        """Stop every forward and delete this gateway's nft chains (``keep_guard``: all
        but the host isolation, for sandboxes that stay running)."""
        self._watch.close()
        if self._refresh is not None:
            self._refresh.cancel()
            await asyncio.gather(self._refresh, return_exceptions=True)
        async with self._lock:
            gone, self._forwards = list(self._forwards.values()), {}
            for fwd in gone:
                await _stop(fwd)
            if self.nft_available and keep_guard and self.guard is not None:
                await asyncio.to_thread(nft.apply, self.bridge, [], guard=self.guard)
            elif self.nft_available:
                await asyncio.to_thread(nft.remove, self.bridge)

    async def listing(self) -> list[dict[str, Any]]:
        """Every forward as JSON, with counters (kernel ones read from nft)."""
        counts: dict[str, int] = {}
        if self.nft_available and any(f.mode == "kernel" for f in self._forwards.values()):
            counts = await asyncio.to_thread(nft.connection_counts, self.bridge)
        return [f.as_json(counts) for f in self._forwards.values()]

    async def _apply_kernel(self) -> None:
        if self.keep_host_settings:
            # Adopting after a kill -9: the killed gateway's rules stay in force (they are
            # the ones being restored) until reconcile() writes exactly this gateway's.
            # A rewrite per adopted forward would drop the rules not restored yet, and
            # refuse new connections on those ports for that moment.
            return
        rules = [f.rule() for f in self._forwards.values() if f.mode == "kernel"]
        wildcard = any(r.host_ip in nft.WILDCARD for r in rules)

        def apply() -> list[str]:
            # Host settings (route_localnet, forwarding) are made, recorded and given back
            # by nft.apply through the host's ledger (sandport.net.sysctl).
            ingress = nft.ingress_interfaces(rules, netlink.ipv4_interfaces(),
                                             nft.other_links() if wildcard else ()) \
                if rules else []
            nft.apply(self.bridge, rules, ingress=ingress, guard=self.guard,
                      give_back=not self.keep_host_settings)
            return ingress

        self._ingress = await asyncio.to_thread(apply)
        if wildcard and not self._watch.running:
            try:
                self._watch.start()
            except OSError as exc:  # the forwards work; later interfaces are not followed
                log.warning("cannot watch interfaces for kernel forwards on 0.0.0.0: %s",
                            exc)
        elif not wildcard:
            self._watch.close()

    def _interfaces_changed(self) -> None:
        self._changed_again = True  # a change during a refresh is looked at after it
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.get_running_loop().create_task(
                self._follow_interfaces(), name="kernel forwards: interfaces changed")

    async def _follow_interfaces(self) -> None:
        """Make the kernel forwards' ruleset and settings again if the interfaces remote
        clients arrive on changed (one came, one went, an address moved)."""
        while self._changed_again:
            self._changed_again = False
            async with self._lock:
                rules = [f.rule() for f in self._forwards.values() if f.mode == "kernel"]
                try:
                    now = await asyncio.to_thread(_ingress_now, rules)
                    if now == self._ingress:
                        continue
                    log.info("kernel forwards on 0.0.0.0: remote clients now arrive on %s "
                             "(was %s)", ", ".join(now) or "none",
                             ", ".join(self._ingress) or "none")
                    await self._apply_kernel()
                except Exception:  # the next change tries again; the forwards keep working
                    log.exception("kernel forwards: following the interfaces failed")


def _ingress_now(rules: list[nft.DnatRule]) -> list[str]:
    """Where remote clients of ``rules`` arrive now (a wildcard forward: every entry link)."""
    return nft.ingress_interfaces(rules, netlink.ipv4_interfaces(), nft.other_links())


async def _start_relay(relay: TcpForward | UdpForward, mapping: PortMapping) -> int:
    try:
        await relay.start()
    except PortInUse:
        raise PortInUseError(mapping.host_ip, mapping.host_port,
                             what=f"{mapping.protocol} port") from None
    except OSError as exc:
        raise _bind_error(mapping, exc) from None
    return relay.bound_port


async def _stop(fwd: HostForward) -> None:
    if fwd.relay is not None:
        try:
            await fwd.relay.stop()
        except Exception:  # the forward is forgotten either way; its port may stay bound
            log.exception("forward %s of sandbox %s: its relay did not stop cleanly", fwd.id,
                          fwd.sandbox)
    if fwd.reservation is not None:
        fwd.reservation.close()
        fwd.reservation = None


def is_ipv4(host: str) -> bool:
    """True for an IPv4 literal (the wildcard included)."""
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv4Address)
    except ValueError:
        return False
