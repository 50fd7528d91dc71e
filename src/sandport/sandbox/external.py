"""The external backend: a guest sandport did not create, attached by address.

Most teams already have a VM manager (Firecracker under their own controller,
cloud-hypervisor, containers); sandport fronts what it runs: it records the target's
address, probes readiness the same way (RFB, HTTP, TCP through the host forward), and
exposes its ports with forwards and the WebSocket bridge. It creates nothing in the guest
and nothing on the guest's network: :meth:`ExternalBackend.destroy` (``detach``) removes
only sandport's own files; the gateway removes the forwards it made.

Safety: sandport must not become an open relay into the host's networks. A target must
lie in one of the gateway's ``attach_subnets`` (none by default: attaching is off until an
operator names the networks), must not lie in the gateway's own sandbox pool, and must be
routable from this host (the route, and the interface if one is named, are checked when
attaching).

``--netns`` (a container's namespace) changes none of that: the address in there passes
the same allow-list, and its own loopback only when the operator listed it (an
``attach_subnets`` entry such as ``127.0.0.0/8``). A namespace of sandport's own
sandboxes (``sp-<id>``, made by this gateway or another: named, or named by the PID of a
process in it) is refused: through it a caller would reach a sandbox's agent and services
behind the gateway's back.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import re
import shutil
from pathlib import Path

from pyroute2 import IPRoute, NetlinkError

from sandport.errors import Forbidden, SandboxFailed, UsageError
from sandport.net.inspect import connect_outcome, neighbour_state
from sandport.net.nsock import connect_in_netns, namespace_sockets
from sandport.sandbox.base import GuestPort, Inspection, SandboxSpec
from sandport.sandbox.profiles import get_profile

log = logging.getLogger(__name__)

#: The profiles an attached target can have: what readiness speaks to its primary port.
ATTACH_PROFILES = ("desktop", "http", "tcp")
#: How long one try waits for any answer from the target (a connection accepted or
#: refused): enough for the kernel's ARP (3 requests, 1 s apart).
ANSWER_TIMEOUT = 3.5
#: How long an attach tries before a target where nothing answers at all is refused: a
#: VM started just before its attach has its network up by then (the echo microVM's
#: kernel answers ARP about 5 s after QEMU starts under TCG; twice that on a busy host).
ANSWER_WINDOW = 15.0
#: How the reason of a target whose owner said it is gone (``retarget --gone``) begins.
GONE_BY_OWNER = "its owner says it is gone"
#: Where ``ip netns`` keeps named namespaces, sandport's sandboxes' among them.
NETNS_DIR = Path("/run/netns")
#: A sandbox's network namespace: ``sp-`` and its id (:func:`sandport.sandbox.netns.netns_name`
#: of ``secrets.token_hex(3)``), whichever gateway made it.
SANDBOX_NETNS = re.compile(r"sp-[0-9a-f]{6}")


def sandbox_namespace(netns: str | Path) -> str:
    """The sandport sandbox whose network namespace ``netns`` is (its ``sp-<id>`` name),
    or "": by name, and by identity (device and inode), so a PID's ``/proc/PID/ns/net``
    or another path to the same namespace is recognised too."""
    path = Path(netns)
    if path.parent == NETNS_DIR and SANDBOX_NETNS.fullmatch(path.name):
        return path.name
    try:
        st = os.stat(path)
        entries = list(os.scandir(NETNS_DIR))
    except OSError:
        return ""
    for entry in entries:
        if not SANDBOX_NETNS.fullmatch(entry.name):
            continue
        try:
            theirs = entry.stat()
        except OSError:  # removed meanwhile
            continue
        if (theirs.st_dev, theirs.st_ino) == (st.st_dev, st.st_ino):
            return entry.name
    return ""


def check_target(ip: ipaddress.IPv4Address, *, allowed: tuple[ipaddress.IPv4Network, ...],
                 pool: ipaddress.IPv4Network, netns: str = "") -> None:
    """Refuse a target outside the allow-list, in the pool, or not a unicast host address.
    In another namespace (``netns``, a container's) the address passes the same
    allow-list; its own loopback (the service listens on 127.0.0.1 in there) only when
    ``allowed`` lists it (e.g. ``127.0.0.0/8``). Never a namespace of sandport's own
    sandboxes, nor the gateway's own.

    Raises:
        Forbidden: not in ``allowed`` (the reason names the list and how to extend it),
            or ``netns`` is the gateway's own namespace or a sandbox's.
        UsageError: an address no guest can have (loopback outside ``netns``,
            multicast ...) or one of the gateway's own pool.
    """
    if netns:
        own, theirs = os.stat("/proc/self/ns/net"), os.stat(netns)
        if (own.st_dev, own.st_ino) == (theirs.st_dev, theirs.st_ino):
            raise Forbidden(f"{netns} is the gateway's own network namespace: a target "
                            "there is attached by its address, without --netns")
        sandbox = sandbox_namespace(netns)
        if sandbox:
            raise Forbidden(f"{netns} is the network namespace of the sandport sandbox "
                            f"{sandbox}: a sandbox's guest ports (its agent among them) are "
                            "reached through its own forwards and links, never attached")
        if ip.is_loopback:
            if not any(ip in net for net in allowed):
                raise Forbidden(
                    f"{ip} is the loopback of the namespace {netns}, and this gateway may "
                    "attach a namespace's loopback only when told so",
                    hint="start the gateway with --attach-subnet 127.0.0.0/8 to allow "
                         "targets on the loopback of other namespaces (containers')")
            return
    if ip.is_loopback or ip.is_multicast or ip.is_unspecified or ip.is_link_local or \
            ip == ipaddress.IPv4Address("255.255.255.255"):
        raise UsageError(f"{ip} cannot be a guest's address (loopback, multicast, "
                         "link-local or unspecified)")
    if ip in pool:
        raise UsageError(f"{ip} is in this gateway's own sandbox pool {pool}",
                         hint="attach guests of other managers, on other networks")
    if not any(ip in net for net in allowed):
        listed = ", ".join(map(str, allowed)) or "none"
        raise Forbidden(
            f"{ip} is not in the networks this gateway may attach targets in ({listed}): "
            "sandport does not relay into networks it was not told about",
            hint="start the gateway with --attach-subnet CIDR (repeatable) for the "
                 "networks your VM manager uses")


def route_to(ip: ipaddress.IPv4Address, interface: str = "") -> str:
    """The interface this host reaches ``ip`` through, directly (no router between).

    Raises:
        UsageError: no route, a route through a router (the guest is not on a link of
            this host: sandport sends nothing beyond its own links), or a route that does
            not go out through ``interface``.
    """
    via = None
    with IPRoute() as ipr:
        if interface and not ipr.link_lookup(ifname=interface):
            raise UsageError(f"interface {interface} does not exist",
                             hint="name the interface the target is reached through "
                                  "(`ip -brief link`)")
        try:
            routes = ipr.route("get", dst=str(ip))
        except NetlinkError as exc:
            raise UsageError(f"no route to {ip}: {exc.args[1] if len(exc.args) > 1 else exc}",
                             hint=f"add one (`ip route add {ip} dev IFACE`) or attach the "
                                  "target on a network this host is on") from None
        if not routes:
            raise UsageError(f"no route to {ip}")
        index = routes[0].get_attr("RTA_OIF")
        via = routes[0].get_attr("RTA_GATEWAY")
        links = ipr.get_links(index) if index else []
        name = links[0].get_attr("IFLA_IFNAME") if links else ""
    if via:
        raise UsageError(
            f"{ip} is reached through the router {via} on {name}, not on a network of this "
            "host: sandport attaches guests on this host's own links (a TAP, a bridge, a "
            "veth)", hint=f"if the guest is on this host, add its route (`ip route add {ip} "
            "dev IFACE`)")
    if not name or name == "lo":
        raise UsageError(f"{ip} routes to this host itself ({name or 'no interface'}), not "
                         "to a guest")
    if interface and name != interface:
        raise UsageError(f"{ip} is reached through {name}, not {interface}",
                         hint=f"fix the route (`ip route replace {ip} dev {interface}`) or "
                              "drop --interface")
    return str(name)


class ExternalBackend:
    """Targets that someone else runs (see the module docstring)."""

    name = "external"
    restarts_services = False  # not ours to restart: degraded, then failed after a grace

    def runs_agent(self, profile: str) -> bool:
        """An attached guest runs no sandport agent."""
        return False

    def ports(self, spec: SandboxSpec) -> tuple[GuestPort, ...]:
        """The profile's ports; a ``tcp`` target's primary is the port given to attach."""
        if spec.profile == "tcp":
            return (GuestPort(name="tcp", port=spec.target_port, protocol="tcp"),)
        if spec.profile == "http" and spec.target_port:
            return (GuestPort(name="http", port=spec.target_port, protocol="http"),)
        return get_profile(spec.profile).ports

    def host_link(self, spec: SandboxSpec) -> str:
        """The interface the target is reached through (given, or the route's); "" for
        a target in another namespace (no host link leads there)."""
        if spec.netns:
            return ""
        if spec.interface:
            return spec.interface
        try:
            return route_to(spec.ip)
        except UsageError:
            return ""

    async def create(self, spec: SandboxSpec) -> None:
        """Check the route to the target (or that its namespace can be entered) and that
        something answers there (:meth:`check_answers`); make sandport's own directory
        for it."""
        link = ""
        if spec.netns:
            await asyncio.to_thread(namespace_sockets, spec.netns)
        else:
            link = await asyncio.to_thread(route_to, spec.ip, spec.interface)
        await self.check_answers(spec, link)
        (spec.workdir / "logs").mkdir(parents=True, exist_ok=True)
        log.info("sandbox %s: attached %s (%s)", spec.id, spec.ip, spec.name or "no name")

    async def check_answers(self, spec: SandboxSpec, link: str = "") -> None:
        """Refuse, within :data:`ANSWER_WINDOW`, a target where nothing answers: TCP
        connections to its primary port. Accepted or refused (a reset: the target is
        there, its service may still be starting) lets readiness wait for the protocol;
        no answer at all is refused at once, naming the hop: ARP (no host on ``link``,
        the interface it is reached through, has the address), or the port (the host is
        there; something drops the port).

        Raises:
            SandboxFailed: nothing answers; the words say which hop and what to check.
        """
        host, port = str(spec.ip), self.ports(spec)[0].port
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ANSWER_WINDOW
        while True:
            try_for = max(0.5, min(ANSWER_TIMEOUT, deadline - loop.time()))
            if spec.netns:
                outcome, detail = await _connect_in(spec.netns, host, port, try_for)
            else:
                outcome, detail = await asyncio.to_thread(connect_outcome, host, port,
                                                          try_for)
            if outcome in ("open", "refused") or loop.time() >= deadline - 0.5:
                break
            await asyncio.sleep(0.5)
        if outcome == "open":
            return
        if outcome == "refused":
            log.info("sandbox %s: %s refuses port %d for now; readiness waits for it",
                     spec.id, host, port)
            return
        if spec.netns:
            raise SandboxFailed(
                f"nothing answers on {host}:{port} inside {spec.netns}: {detail}",
                hint=f"check that the target runs and serves port {port} in its namespace")
        link = link or spec.interface or "its link"
        arp = await asyncio.to_thread(neighbour_state, host)
        if arp in ("reachable", "stale", "delay", "probe", "permanent", "noarp"):
            raise SandboxFailed(
                f"nothing answers on {host}:{port} from this host: {host} answers ARP on "
                f"{link} ({arp}), but port {port} gives no answer in {ANSWER_WINDOW:g} s"
                + ("" if outcome == "timeout" else f" ({detail})"),
                hint=f"the target is there: check that its service runs on port {port} and "
                     "that no firewall in the target or on the way drops the port")
        raise SandboxFailed(
            f"nothing answers on {host}:{port} from this host: no host on {link} answers "
            f"ARP for {host} in {ANSWER_WINDOW:g} s (its ARP entry: {arp or 'none'})"
            + ("" if outcome in ("timeout", "no_route") else f"; {detail}"),
            hint=f"check that the target runs and that its address is {host} "
                 f"(`ip neigh show {host}`, `ping {host}`); attach it once it answers")

    async def start(self, spec: SandboxSpec) -> None:
        """Nothing: the target's owner runs it."""

    async def stop(self, spec: SandboxSpec) -> None:
        """Nothing: the target's owner runs it."""

    async def destroy(self, spec: SandboxSpec) -> None:
        """Detach: remove sandport's own files; the target is left as it is."""
        await asyncio.to_thread(shutil.rmtree, spec.workdir, True)

    async def inspect(self, spec: SandboxSpec) -> Inspection:
        """Whether the target's primary port accepts a connection."""
        primary = self.ports(spec)[0]
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(str(spec.ip), primary.port), 2.0)
        except (OSError, TimeoutError):
            return Inspection(exists=True, link_up=bool(self.host_link(spec)),
                              services={primary.name: False}, pids=())
        writer.close()
        return Inspection(exists=True, link_up=True, services={primary.name: True}, pids=())

    async def adopt(self, spec: SandboxSpec) -> str | None:
        """A restarted gateway keeps fronting the target (readiness is probed at once)."""
        return None

    def diagnostics(self, spec: SandboxSpec) -> str:
        """sandport sees no console of a guest it did not start."""
        return ""

    async def revive_agent(self, spec: SandboxSpec) -> bool:
        """No agent to revive."""
        return False

    def failure(self, spec: SandboxSpec, *, agent: bool = False) -> str | None:
        """sandport runs no process of the target: only its probes can tell."""
        return None


async def _connect_in(netns: str, host: str, port: int, timeout: float) -> tuple[str, str]:
    """:func:`~sandport.net.inspect.connect_outcome` inside the namespace ``netns``."""
    try:
        async with asyncio.timeout(timeout):
            sock = await connect_in_netns(asyncio.get_running_loop(), netns, host, port)
    except TimeoutError:
        return "timeout", f"no answer in {timeout:g} s"
    except ConnectionRefusedError:
        return "refused", "refused the connection"
    except OSError as exc:
        unreachable = exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH)
        return ("no_route" if unreachable else "error"), exc.strerror or str(exc)
    sock.close()
    return "open", "accepted"


#: The longest name an attached target may have (shown in lists and logs).
MAX_NAME = 64
#: The longest reason its owner may give when it moved or is gone (logs, close reasons).
MAX_REASON = 200


def printable(text: str, what: str, limit: int) -> str:
    """``text`` if it is fit for a log line: at most ``limit`` characters, all printable
    (no control characters: no CR or LF to forge lines with, no tabs, no Unicode line
    separators or bidirectional overrides; ``str.isprintable``, spaces allowed).

    Raises:
        UsageError: it is longer, or carries a character that is not printable (the
            message names ``what`` and the first such character's code point).
    """
    if len(text) > limit:
        raise UsageError(f"{what} is {len(text)} characters long; at most {limit}")
    bad = next((c for c in text if not c.isprintable()), None)
    if bad is not None:
        raise UsageError(f"{what} must be printable text: it has the control character "
                         f"U+{ord(bad):04X} (no line breaks, tabs or other control "
                         "characters: it goes into logs)")
    return text


def resolve_ip(text: str) -> ipaddress.IPv4Address:
    """An IPv4 address from user input.

    Raises:
        UsageError: not an IPv4 address.
    """
    try:
        return ipaddress.IPv4Address(text.strip())
    except ValueError:
        raise UsageError(f"{text!r} is not an IPv4 address") from None
