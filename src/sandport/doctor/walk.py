"""The doctor's walk: each hop's checks, in order, and what they say when they fail
(evidence, and a fix that works for the case: the port, the backend, who runs the guest).

Owns: the checks (probes, netlink and /proc reads, nft reads) and their words. Must not
touch: what it checks (it changes nothing), the gateway's rooms (it is given a
:class:`~sandport.doctor.model.Subject`).
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from pathlib import Path

from sandport.doctor.model import (
    HOPS,
    PROBE_TIMEOUT,
    ForwardFacts,
    PortFacts,
    Report,
    Subject,
    Walk,
)
from sandport.net import inspect, netlink, nft
from sandport.probe import (
    ProbeResult,
    probe_agent_health,
    probe_http,
    probe_rfb_tcp,
    probe_rfb_ws,
    probe_tcp,
    run_rfb_handshake,
)
from sandport.proto.rfb import Stage
from sandport.sandbox.external import GONE_BY_OWNER


async def diagnose(subject: Subject) -> Report:
    """Walk the path of ``subject`` (see the module docstring); never raises for what it
    finds, only reports it."""
    t0 = time.monotonic()
    walk = Walk()
    await _gateway(walk, subject)
    if _route(walk, subject):
        await _host_network(walk, subject)
        await _reachability(walk, subject)
        await _services(walk, subject)
        await _end_to_end(walk, subject)
    else:  # nothing to walk: one row per hop says so
        for hop in HOPS[2:]:
            walk.add(hop, "not walked", None, "")
    return Report(sandbox=subject.sandbox, rows=tuple(walk.rows), took=time.monotonic() - t0)


def _ports(subject: Subject) -> tuple[PortFacts, ...]:
    if subject.port_asked is None:
        return subject.ports
    return tuple(p for p in subject.ports if p.matches(subject.port_asked))


async def _gateway(walk: Walk, s: Subject) -> None:
    walk.add("gateway", "process", True, f"sandport gateway, pid {s.pid}")
    for forward in s.unrun_forwards:
        walk.add("gateway", "forward in the store", False,
                 f"the store has {forward}, but the gateway does not run it",
                 "restoring it failed (see the gateway's log): a published port's forward "
                 f"comes back when removed and added again (`DELETE /api/sandboxes/"
                 f"{s.sandbox}/forwards/ID`, then `POST /api/sandboxes/{s.sandbox}/"
                 f"forwards`); one the sandbox was made with (vnc) only if you "
                 f"{_recreate(s)}")
    for port in _ports(s):
        for f in port.forwards:
            fid, proto, host, host_port, mode = f.id, f.protocol, f.host, f.host_port, f.mode
            check = f"listener {proto} {_addr(host, host_port)}"
            find = inspect.listeners if mode == "proxy" and proto == "tcp" else inspect.bound
            holders = await asyncio.to_thread(find, host_port, proto)
            ours = [h for h in holders if h.pid == s.pid]
            if ours:
                what = "listens" if find is inspect.listeners else (
                    "is bound (nft DNAT serves it)" if mode == "kernel" else "is bound")
                walk.add("gateway", check, True, f"forward {fid} ({mode}): the gateway "
                         f"{what} on {ours[0].address}", port=port.name)
            elif holders:
                other = holders[0]
                walk.add("gateway", check, False,
                         f"forward {fid} ({mode}): {other.address} is held by pid {other.pid}"
                         f" ({other.command or 'unknown'}), not by this gateway",
                         f"another program took {_addr(host, host_port)}: stop it, or remove "
                         f"the forward and publish another host port", port=port.name)
            else:
                walk.add("gateway", check, False,
                         f"forward {fid} ({mode}): nothing listens on {_addr(host, host_port)}"
                         " although the store has this forward",
                         "the forward's listener is gone (closed behind sandport's back): "
                         + (f"remove the forward (`DELETE /api/sandboxes/{s.sandbox}/"
                            f"forwards/{fid}`) and add it again (`POST /api/sandboxes/"
                            f"{s.sandbox}/forwards`)" if f.published else
                            f"it is one sandbox {s.sandbox} was made with, which comes back "
                            f"only with it: {_recreate(s)}"), port=port.name)


def _route(walk: Walk, s: Subject) -> bool:
    if not s.known:
        walk.add("route", "sandbox", False,
                 s.gone or f"no sandbox {s.sandbox!r} on this gateway",
                 "a link or token outlives its sandbox: create a new sandbox and use its "
                 "URL" if s.gone else "check the id (`sandport sandbox list`)")
        return False
    evidence = f"sandbox {s.sandbox}: {s.state}" + (f" ({s.reason})" if s.reason else "")
    if s.state == "degraded":  # routed; the walk finds what degrades it
        walk.add("route", "sandbox", False, evidence,
                 "a failing hop below says why; if every hop answers now, the next "
                 "readiness probe turns it ready again", warn=True)
    else:
        walk.add("route", "sandbox", s.state in ("ready", "starting"), evidence,
                 _state_fix(s))
    if s.port_asked is not None and not _ports(s):
        walk.add("route", "port", False,
                 f"sandbox {s.sandbox} exposes no port {s.port_asked!r}; it exposes "
                 f"{', '.join(s.known_ports)}", "ask for one of the ports it exposes")
        return False
    if s.token_facts is not None:
        t = s.token_facts
        good = t.verdict in ("own", "grant") and t.allows
        walk.add("route", "token", good, t.detail, {
            "expired": "the link expired: ask for a new one (`sandport token create`)",
            "revoked": "the link was revoked: ask for a new one",
            "other": "use the URL of the sandbox the token belongs to",
            "deleted": "the token's sandbox was deleted; a token dies with its sandbox: "
                       "create a new sandbox and use its URL",
            "unknown": "the token is wrong (a typo, or from another gateway)",
        }.get(t.verdict, "use a token whose scope includes this port (`sandport token "
              "create --port ...`)"))
    return True


def _state_fix(s: Subject) -> str:
    """What to do about a sandbox that is neither ready nor starting."""
    if not s.external:
        return (f"the sandbox is {s.state}: {s.reason or 'see its events'}; delete it "
                f"(`sandport sandbox rm {s.sandbox}`) and create another")
    again = (f"detach it (`sandport detach {s.sandbox}`) and attach it again where it runs "
             "now (`sandport attach NAME --ip ADDR ...`)")
    if s.state == "failed" and s.reason.startswith(GONE_BY_OWNER):
        return (f"the target was marked gone (`sandport retarget {s.sandbox} --gone`): "
                f"sandport closed its forwards and sends nothing to it; once it runs again, "
                f"{again}")
    if s.state == "failed":
        return (f"the attached target is failed ({s.reason or 'see its events'}); sandport "
                f"does not run it, so it cannot restart it: start the target, then {again}")
    return f"the attached target is {s.state}: {s.reason or 'see its events'}"


async def _host_network(walk: Walk, s: Subject) -> None:
    hop = "host network"
    if s.external:
        await _route_link(walk, s)
    else:
        await _bridge_and_link(walk, s)
    await _nft_rules(walk, s)
    _isolation(walk, s)
    if walk.skipped(hop, "firewall"):
        return
    drops = await asyncio.to_thread(inspect.rules_dropping, s.ip)
    if drops:
        d = drops[0]
        walk.add(hop, "firewall", False,
                 f"nft table {d.family} {d.table}, chain {d.chain}: `{d.text}` ({d.verdict}s "
                 f"traffic of {s.ip}, rule handle {d.handle})"
                 + (f"; and {len(drops) - 1} more" if len(drops) > 1 else ""),
                 f"a firewall rule outside sandport blocks the sandbox: `nft delete rule "
                 f"{d.family} {d.table} {d.chain} handle {d.handle}` if it is not wanted")
    else:
        walk.add(hop, "firewall", True, f"no nft rule drops or rejects {s.ip}")


def _isolation(walk: Walk, s: Subject) -> None:
    """sandport's guard: host isolation on the sandbox's link, anti-spoofing on its port.
    A missing guard or a spoofing guest is a warning: it explains, it does not block."""
    iso, hop = s.isolation, "host network"
    if iso is None or walk.skipped(hop, "host isolation"):
        return
    restart = f"someone changed table ip sandport: {_REWRITES}, or {_recreate(s)}"
    if not iso.guarded:
        walk.add(hop, "host isolation", False,
                 f"table ip sandport has no host isolation for {iso.link}: "
                 + ("the sandbox reaches every host service" if iso.agent else
                    "127.0.0.0/8 from it reaches the host's loopback services"),
                 restart, warn=True)
    elif iso.agent:
        walk.add(hop, "host isolation", True,
                 f"from {iso.link} only the agent port {iso.agent}, ping and replies reach "
                 f"the host; dropped so far (every sandbox of {iso.link}): "
                 f"{iso.host_drops} packet(s) to host services, {iso.localnet_drops} to "
                 "127.0.0.0/8")
    else:
        walk.add(hop, "host isolation", True,
                 f"127.0.0.0/8 from {iso.link} is dropped (route_localnet is on there for "
                 f"the kernel forward): {iso.localnet_drops} packet(s) so far")
    if not iso.port:
        return
    if not iso.port_guarded:
        walk.add(hop, "anti-spoofing", False,
                 f"{iso.port} has no anti-spoofing rules (table bridge sandport) for "
                 f"{iso.mac} / {s.ip}: the guest can send as another sandbox",
                 restart, warn=True)
    elif iso.spoof_count:
        walk.add(hop, "anti-spoofing", False,
                 f"sandport dropped {iso.spoof_count} frame(s) from {iso.port} whose source "
                 f"was not {iso.mac} / {s.ip} ({iso.spoof_words()})",
                 "something in the guest sends with an address or MAC sandport did not give "
                 "it (a changed network configuration, or an attempt to take over another "
                 "sandbox's address): only the sandbox's own pass", warn=True)
    else:
        other = dict(iso.spoofed).get("other", 0)
        walk.add(hop, "anti-spoofing", True,
                 f"{iso.port} lets only {iso.mac} / {s.ip} (IPv4, ARP) through; nothing "
                 f"spoofed so far ({other} frame(s) of other protocols dropped)")


async def _route_link(walk: Walk, s: Subject) -> None:
    """An attached target: the route to it and the interface it goes out through (or the
    namespace it lives in)."""
    if s.netns:
        there = os.path.exists(s.netns)  # noqa: ASYNC240 - a /proc or /run file, instant
        walk.add("host network", "namespace", there,
                 f"the target is inside network namespace {s.netns}" if there else
                 f"its network namespace {s.netns} is gone",
                 "the container or its namespace is gone, and a target is moved only "
                 f"within its namespace: detach it (`sandport detach {s.sandbox}`) and, if "
                 "it runs elsewhere now, attach it there (`sandport attach ... --netns`)")
        return
    if not s.link:
        walk.add("host network", "route", False, f"no route to {s.ip} from this host",
                 f"the target's network is not reachable: add a route (`ip route add {s.ip} "
                 f"dev IFACE`), or, if it moved, `sandport retarget {s.sandbox} --ip NEW`")
        return
    link = await asyncio.to_thread(inspect.link_facts, s.link)
    if not link.exists or not link.up:
        walk.add("host network", "route", False,
                 f"{s.ip} is reached through {s.link}, which "
                 + ("does not exist" if not link.exists else "is down"),
                 f"bring {s.link} up (`ip link set {s.link} up`), or, if the target "
                 f"moved, `sandport retarget {s.sandbox} --ip NEW`")
        return
    walk.add("host network", "route", True, f"{s.ip} via {s.link} (up"
             + (f", {', '.join(link.addresses)}" if link.addresses else "") + ")")


async def _bridge_and_link(walk: Walk, s: Subject) -> None:
    hop = "host network"
    br = await asyncio.to_thread(inspect.link_facts, s.bridge)
    if not br.exists:
        walk.add(hop, "bridge", False, f"bridge {s.bridge} does not exist",
                 "someone deleted sandport's bridge, and with it every sandbox's link: stop "
                 "and start `sandport up` (it makes the bridge; the stop removes every "
                 "sandbox it runs: create them again)")
    elif s.pool_gateway not in br.addresses:
        has = ", ".join(br.addresses) or "no IPv4 address"
        walk.add(hop, "bridge address", False,
                 f"bridge {s.bridge} has {has}; the pool needs {s.pool_gateway} (the guests' "
                 "gateway)", f"the bridge was re-addressed, so guests on the pool's subnet no "
                 f"longer reach it: `ip addr flush dev {s.bridge} && ip addr add "
                 f"{s.pool_gateway} dev {s.bridge}`")
    elif not br.up:
        walk.add(hop, "bridge", False, f"bridge {s.bridge} is down",
                 f"`ip link set {s.bridge} up`")
    else:
        walk.add(hop, "bridge address", True, f"{s.bridge} up with {s.pool_gateway}")
    link = await asyncio.to_thread(inspect.link_facts, s.link)
    if not link.exists:
        walk.add(hop, "sandbox link", False, f"{s.link} does not exist",
                 "the sandbox's link was deleted: delete the sandbox and create another")
    elif link.master != s.bridge:
        walk.add(hop, "sandbox link", False,
                 f"{s.link} is not a port of {s.bridge} (its master: {link.master or 'none'})",
                 f"the link was detached from the bridge: `ip link set {s.link} master "
                 f"{s.bridge} && bridge link set dev {s.link} isolated on`")
    elif not link.up:
        walk.add(hop, "sandbox link", False, f"{s.link} is down", f"`ip link set {s.link} up`")
    elif link.isolated is False:
        walk.add(hop, "sandbox link", False,
                 f"{s.link} up, a port of {s.bridge}, but not isolated: other sandboxes on "
                 "the bridge can reach this one", f"`bridge link set dev {s.link} isolated "
                 "on` (sandport sets it; someone turned it off)", warn=True)
    else:
        iso = "" if link.isolated is None else ", isolated"
        walk.add(hop, "sandbox link", True, f"{s.link} up, a port of {s.bridge}{iso}")


async def _nft_rules(walk: Walk, s: Subject) -> None:
    """The DNAT rules of the sandbox's kernel forwards: in output (local clients) and, for
    a non-loopback address, in prerouting (remote clients); ``route_localnet``."""
    pre, out = s.chains
    have = set(s.nft_rules)
    for port in _ports(s):
        for f in port.forwards:
            if f.mode != "kernel":
                continue
            fid, proto, host, host_port = f.id, f.protocol, f.host, f.host_port
            check = f"nft DNAT {proto} {_addr(host, host_port)}"
            in_out, in_pre = (out, f.rule) in have, (pre, f.rule) in have
            loopback = host.startswith("127.")
            if not in_out and not in_pre:
                walk.add("host network", check, False,
                         f"forward {fid}: no DNAT rule in table ip sandport",
                         "the table was changed by someone else: "
                         + _rewrite(s, f), port=port.name)
            elif not in_out:
                walk.add("host network", check, False,
                         f"forward {fid}: the DNAT rule for {_addr(host, host_port)} is only in "
                         f"prerouting ({pre}), not in output ({out})",
                         f"nothing listens on {_addr(host, host_port)}; the forward is in kernel "
                         "mode but the DNAT rule covers only prerouting, which local clients "
                         "never pass; sandport writes the output-chain rule too (the table "
                         "was changed by someone else): " + _rewrite(s, f), port=port.name)
            elif not in_pre and not loopback:
                walk.add("host network", check, False,
                         f"forward {fid}: the DNAT rule is only in output ({out}): clients on "
                         "other machines are not forwarded",
                         "sandport writes the prerouting rule too (the table was changed by "
                         "someone else): " + _rewrite(s, f), port=port.name)
            elif loopback and not _route_localnet(out_link := s.link if s.external
                                                  else s.bridge):
                walk.add("host network", check, False,
                         f"forward {fid}: route_localnet is off on {out_link}: packets from "
                         "127.0.0.1 are not routed to the guest",
                         f"`sysctl -w net.ipv4.conf.{out_link}.route_localnet=1` (sandport "
                         "sets it; someone reset it)", port=port.name)
            elif off := ([] if loopback else await asyncio.to_thread(_forwarding_off, host)):
                walk.add("host network", check, False,
                         f"forward {fid}: forwarding is off on {', '.join(off)}, where remote "
                         "clients come in: their connections are rewritten to the guest, "
                         "then dropped",
                         " and ".join(f"`sysctl -w net.ipv4.conf.{i}.forwarding=1`" for i in off)
                         + " (sandport turns it on while a kernel forward needs it and gives "
                         "it back after; someone reset it)", port=port.name)
            else:
                chains = "output" if loopback else "prerouting and output"
                walk.add("host network", check, True,
                         f"forward {fid}: DNAT to {s.ip} in {chains}", port=port.name)


#: What makes sandport write all of its table again (with its guard) and keeps sandboxes.
_REWRITES = ("sandport writes all of table ip sandport again whenever a kernel forward is "
             "removed or added: remove a published port's forward and add it again "
             "(`DELETE /api/sandboxes/ID/forwards/FID`, then `POST "
             "/api/sandboxes/ID/forwards`)")


def _rewrite(s: Subject, f: ForwardFacts) -> str:
    """How sandport's table is written again, for the rules of forward ``f``."""
    if f.published:
        return (f"remove the forward (`DELETE /api/sandboxes/{s.sandbox}/forwards/{f.id}`) "
                f"and add it again (`POST /api/sandboxes/{s.sandbox}/forwards`): sandport "
                "then writes all of table ip sandport again")
    return f"{_REWRITES}; or {_recreate(s)}"


def _recreate(s: Subject) -> str:
    """Make the sandbox anew (what brings back the forwards it was made with)."""
    if s.external:
        return (f"detach the target (`sandport detach {s.sandbox}`) and attach it again")
    return f"delete the sandbox (`sandport sandbox rm {s.sandbox}`) and create another"


def _forwarding_off(host: str) -> list[str]:
    """The links where remote clients of a kernel forward on ``host`` arrive whose
    ``forwarding`` is off. Blocks (netlink)."""
    return [i for i in nft.entry_links(host, netlink.ipv4_interfaces())
            if _conf(i, "forwarding") != "1"]


def _conf(ifname: str, key: str) -> str:
    try:
        return Path(f"/proc/sys/net/ipv4/conf/{ifname}/{key}").read_text().strip()
    except OSError:
        return ""


def _route_localnet(link: str) -> bool:
    return _conf(link, "route_localnet") == "1"


async def _reachability(walk: Walk, s: Subject) -> None:
    if walk.skipped("guest reachability", "ping"):
        return
    if s.netns:  # its address means something only in there: pinged from inside
        await _reachability_in_netns(walk, s)
        return
    result = await asyncio.to_thread(inspect.ping, s.ip, 1.0)
    arp = await asyncio.to_thread(inspect.neighbour_state, s.ip)
    if result.ok:
        walk.add("guest reachability", "ping", True,
                 f"{s.ip} answers ICMP echo in {1000 * (result.rtt or 0):.1f} ms (ARP "
                 f"{arp or 'no entry'})")
        return
    iso = s.isolation
    if iso is not None and iso.spoof_count:
        walk.add("guest reachability", "ping", False,
                 f"{result.detail}; ARP for {s.ip} is {arp or 'absent'}; sandport's "
                 f"anti-spoofing dropped {iso.spoof_count} frame(s) from {iso.port} "
                 f"({iso.spoof_words()}): the guest sends as another address or MAC than "
                 f"{s.ip} / {iso.mac}",
                 "the guest's network was changed inside it (its address or MAC): only "
                 "what sandport gave it passes the bridge; set them back, or recreate the "
                 "sandbox")
        return
    if arp in ("failed", "incomplete", None) and s.external:
        why = (f"ARP for {s.ip} is {arp or 'absent'}: nothing on {s.link or 'its link'} "
               "answers for that address")
        fix = ("the target is not running or has another address now: check it; if it "
               f"moved, `sandport retarget {s.sandbox} --ip NEW`; if it is gone, "
               f"`sandport retarget {s.sandbox} --gone` or `sandport detach {s.sandbox}`")
    elif arp in ("failed", "incomplete", None):
        why = (f"ARP for {s.ip} is {arp or 'absent'}: nothing on {s.bridge} answers for "
               "that address")
        fix = ("the guest's network is down or has another address: check "
               f"{s.link} (host network hop)"
               + (f" and the VM's console (`sandport sandbox logs {s.sandbox}`)"
                  if s.backend == "qemu" else "")
               + f"; if it stays so, delete the sandbox (`sandport sandbox rm {s.sandbox}`) "
               "and create another")
    else:
        why = f"ARP for {s.ip} is {arp}: the guest is there but does not answer ICMP"
        fix = ("something drops ICMP to or from the guest (a firewall rule in the guest or "
               "on the host), or the guest hangs")
    walk.add("guest reachability", "ping", False, f"{result.detail}; {why}", fix)


async def _reachability_in_netns(walk: Walk, s: Subject) -> None:
    """A ``--netns`` target: one ICMP echo sent from inside its namespace."""
    result = await asyncio.to_thread(inspect.ping, s.ip, 1.0, s.netns)
    if result.ok:
        walk.add("guest reachability", "ping", True,
                 f"{s.ip} answers ICMP echo inside {s.netns} in "
                 f"{1000 * (result.rtt or 0):.1f} ms (pinged from inside the namespace)")
        return
    walk.add("guest reachability", "ping", False,
             f"pinged from inside {s.netns}: {result.detail}",
             f"nothing answers for {s.ip} inside {s.netns}: check the container's network "
             f"there (`nsenter --net={s.netns} ip -br addr`; its loopback must be up for "
             "127.0.0.1); if the target has another address now, detach it "
             f"(`sandport detach {s.sandbox}`) and attach it again with that one")


async def _services(walk: Walk, s: Subject) -> None:
    hop = "guest service"
    for port in _ports(s):
        if port.protocol == "udp":
            walk.add(hop, f"{port.name} udp {port.guest_port}", None,
                     "UDP has no handshake to probe", port=port.name)
            continue
        where = port.path or _addr(s.ip, port.guest_port)
        if s.netns:  # asked from inside the target's namespace, where the address is
            where += f" in {s.netns}"
        check = f"{port.name} at {where}"
        if walk.skipped(hop, check, port.name):
            continue
        if port.path:
            result = await _rfb_unix(port.path)
        else:
            result = await _probe_port(port, s.ip, port.guest_port, s, netns=s.netns)
        if result.ok:
            inside = _inside(s) if port.protocol == "agent" else ""
            walk.add(hop, check, True, result.detail + (f"; {inside}" if inside else ""),
                     port=port.name)
            continue
        walk.add(hop, check, False, _service_evidence(port, result, s),
                 _service_fix(port, result, s), port=port.name)


async def _probe_port(port: PortFacts, host: str, number: int, s: Subject, *,
                      netns: str = "") -> ProbeResult:
    """Probe ``host:number`` in ``port``'s protocol (``netns``: from inside that network
    namespace: an attached container's own address)."""
    if port.protocol == "rfb":
        return await probe_rfb_tcp(host, number, password=s.vnc_password or None,
                                   timeout=PROBE_TIMEOUT, netns=netns)
    if port.protocol == "http":
        return await probe_http(host, number, timeout=PROBE_TIMEOUT, netns=netns)
    if netns:
        return await probe_tcp(host, number, timeout=PROBE_TIMEOUT, netns=netns)
    if port.protocol == "agent":
        return await probe_agent_health(host, number, sandbox_id=s.sandbox,
                                        timeout=PROBE_TIMEOUT)
    t0 = time.perf_counter()
    outcome, detail = await asyncio.to_thread(inspect.connect_outcome, host, number,
                                              PROBE_TIMEOUT)
    return ProbeResult(ok=outcome == "open", hop=f"tcp {host}:{number}", stage="connect",
                       detail=detail, elapsed=time.perf_counter() - t0)


async def _rfb_unix(path: str) -> ProbeResult:
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            reader, writer = await asyncio.open_unix_connection(path)
            try:
                async def send(data: bytes) -> None:
                    writer.write(data)
                    await writer.drain()

                return await run_rfb_handshake(lambda: reader.read(65536), send,
                                               hop=f"unix {path}", password=None,
                                               stop_at=Stage.SECURITY_TYPES)
            finally:
                writer.close()
    except (OSError, TimeoutError) as exc:
        return ProbeResult(ok=False, hop=f"unix {path}", stage="connect",
                           detail=str(exc) or type(exc).__name__,
                           elapsed=time.perf_counter() - t0)


def _service_evidence(port: PortFacts, result: ProbeResult, s: Subject) -> str:
    text = f"{result.detail} (stage {result.stage})"
    if s.service_failure and result.stage == "connect":
        text += f"; {s.service_failure}"
    inside = _inside(s)
    if inside and result.stage == "connect":
        text += f"; {inside}"
    return text


def _inside(s: Subject) -> str:
    """What the guest agent last saw inside the guest: listening ports, processes."""
    report = s.agent_report
    if not report:
        return ""
    tcp = sorted({int(x.get("port", 0)) for x in report.get("listening", [])
                  if x.get("proto") == "tcp"})
    names = sorted({str(p.get("name", "")) for p in report.get("processes", [])} - {""})
    age = f" {s.agent_report_age:.0f} s ago" if s.agent_report_age is not None else ""
    return (f"the guest agent saw{age}: TCP ports {', '.join(map(str, tcp)) or 'none'} "
            f"listening; processes {', '.join(names) or 'none'}")


def _service_fix(port: PortFacts, result: ProbeResult, s: Subject) -> str:
    """The likely cause and a fix that works for this port of this backend: sandport
    restarts only what it started (a namespace desktop's Xvnc and openbox, the agent);
    a user's own service, and every port of an attached target, is the user's to start."""
    detail = result.detail.lower()
    server = {"rfb": "the VNC server", "agent": "the guest agent",
              "http": "the HTTP service"}.get(port.protocol, "the service")
    if result.stage == "auth" or "authentication" in detail:
        if s.external:
            return ("the VNC password given when the target was attached is not its "
                    f"server's: detach it (`sandport detach {s.sandbox}`) and attach it "
                    "again with the right one (--vnc-password-file)")
        return (f"the VNC password sandport stored for sandbox {s.sandbox} is not the "
                "server's: the server's password file was changed, or the store's secret; "
                f"delete the sandbox (`sandport sandbox rm {s.sandbox}`) and create another")
    if "refused" in detail:
        return _not_listening(port, s, server)
    where = f"the target {s.ip}" if s.external else "the guest"
    if "no answer" in detail or "timed out" in detail:
        return (f"{server} on {port.guest_port} accepts nothing in {PROBE_TIMEOUT:g} s: it "
                f"hangs, or a firewall in {where} drops the port")
    return (f"{server} on {port.guest_port} of {where} does not speak "
            f"{_protocol_words(port)}: check what listens there" + _log_hint(port, s))


def _protocol_words(port: PortFacts) -> str:
    return {"rfb": "VNC (RFB)", "http": "HTTP", "agent": "the agent's HTTP"}.get(
        port.protocol, "the expected protocol")


def _log_command(port: PortFacts, s: Subject) -> str:
    """The command that shows the log of a service sandport started ("" for others)."""
    if s.external or not port.managed:
        return ""
    name = {"rfb": "Xvnc", "agent": "agent"}.get(port.protocol) if s.backend != "qemu" \
        else None  # a VM's services log to its console, the default log
    return f"`sandport sandbox logs {s.sandbox}" + (f" --name {name}`" if name else "`")


def _log_hint(port: PortFacts, s: Subject) -> str:
    command = _log_command(port, s)
    return f" (its log: {command})" if command else ""


def _not_listening(port: PortFacts, s: Subject, server: str) -> str:
    """Nothing listens on the port (the connection was refused): who must start what."""
    number = port.guest_port
    if s.external:
        inside = f" inside {s.netns}" if s.netns else ""
        return (f"nothing listens on {_addr(s.ip, number)}{inside}: start the service on "
                f"the target and make it listen on {s.ip} (or 0.0.0.0) port {number}; "
                "sandport does not run attached targets, so it starts nothing there")
    if port.managed and s.restarts_services:
        return (f"nothing listens on {number} inside the sandbox: {server} sandport started "
                "there is not running. sandport restarts it within the probe interval; if "
                f"it keeps exiting, read its log: {_log_command(port, s)}")
    if port.managed:
        return (f"nothing listens on {number} inside the VM: {server} of its image is not "
                "running, and sandport does not restart services inside a VM: read the VM's "
                f"console (`sandport sandbox logs {s.sandbox}`), then delete the sandbox "
                f"(`sandport sandbox rm {s.sandbox}`) and create another")
    loopback = _loopback_only(s, number)
    if loopback:
        return (f"your service listens on {loopback} only, which the host cannot reach: "
                f"make it listen on 0.0.0.0:{number} (or {s.ip}:{number}) inside the sandbox")
    if s.backend == "qemu":
        return (f"nothing listens on {number} inside the VM: its image serves only its "
                "profile's ports; sandport starts no service of yours there")
    return (f"nothing listens on {number} inside the sandbox: start your service there, "
            f"listening on 0.0.0.0:{number}; sandport starts only a desktop's own services "
            f"and its agent, never yours (`ip netns exec sp-{s.sandbox} PROGRAM` runs one "
            "in the sandbox's network, but as host root outside its container: only for "
            "a program you trust)")


def _loopback_only(s: Subject, number: int) -> str:
    """``127.0.0.1:8080`` if the guest agent saw ``number`` listening on loopback only."""
    report = s.agent_report or {}
    seen = [str(x.get("address", "")) for x in report.get("listening", [])
            if x.get("proto") == "tcp" and x.get("port") == number]
    if seen and all(a.startswith("127.") or a == "::1" for a in seen):
        return _addr(seen[0], number)
    return ""


async def _end_to_end(walk: Walk, s: Subject) -> None:
    hop = "end to end"
    for port in _ports(s):
        for f in port.forwards:
            fid, proto, host, host_port, mode = f.id, f.protocol, f.host, f.host_port, f.mode
            check = f"{port.name} through {_addr(host, host_port)} ({mode})"
            if walk.skipped(hop, check, port.name):
                continue
            if proto != "tcp":
                walk.add(hop, check, None, "UDP has no handshake to probe", port=port.name)
                continue
            result = await _probe_port(port, _connect_host(host, s), host_port, s)
            walk.add(hop, check, result.ok, result.detail if result.ok else
                     f"{result.hop}: {result.detail} (stage {result.stage})",
                     "the earlier hops are fine, so the forward itself loses the connection: "
                     f"see `sandport forward list` for forward {fid} and the gateway's log",
                     port=port.name)
        if port.ws and port.protocol == "rfb" and s.ws_base:
            if walk.skipped(hop, f"{port.name} through the WebSocket bridge", port.name):
                continue
            url = f"{s.ws_base}/s/{s.sandbox}/ports/{port.name}/ws?token={s.token}"
            result = await _ws_probe(url, s)
            walk.add(hop, f"{port.name} through the WebSocket bridge", result.ok,
                     result.detail if result.ok else f"{result.detail} (stage {result.stage})",
                     "the WebSocket bridge loses what the guest serves: see the gateway's log",
                     port=port.name)


async def _ws_probe(url: str, s: Subject) -> ProbeResult:
    ssl_context = None
    if url.startswith("wss:"):
        ssl_context = ssl.create_default_context()
        ssl_context.check_hostname = False
        ssl_context.verify_mode = ssl.CERT_NONE  # our own certificate, probed by address
    return await probe_rfb_ws(url, password=s.vnc_password or None, timeout=PROBE_TIMEOUT,
                              ssl_context=ssl_context)


def _connect_host(host: str, s: Subject) -> str:
    return s.forward_host if host in ("0.0.0.0", "", "::") else host


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
