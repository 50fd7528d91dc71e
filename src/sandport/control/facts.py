"""What the doctor is told about a sandbox: the gateway's facts as a :class:`Subject`.

Owns: turning the roster, the forward table, the store's event log and the gateway's
addresses into the doctor's plain facts (:class:`~sandport.doctor.Subject`,
:class:`~sandport.doctor.TokenFacts`, :class:`~sandport.doctor.ForwardFacts`). Plain
functions of their arguments; the walk itself is :func:`sandport.doctor.diagnose`'s.

Must not touch: anything it is handed. It reads; it changes no state, records no event
and probes nothing (the doctor probes).
"""

from __future__ import annotations

import time

from sandport.config import GatewayConfig, connect_host
from sandport.control.forwards import ForwardTable, HostForward
from sandport.control.roster import Roster, RunningSandbox
from sandport.control.store import StateStore
from sandport.control.tokens import TokenCheck, fingerprint, hash_token
from sandport.doctor import ForwardFacts, IsolationFacts, PortFacts, Subject, TokenFacts
from sandport.net import antispoof, nft
from sandport.sandbox.base import AGENT_PORT

#: How far back in the event log the doctor looks for a deleted sandbox or a token.
EVENT_HISTORY = 100_000


def forward_facts(f: HostForward) -> ForwardFacts:
    """A forward as the doctor sees it."""
    return ForwardFacts(id=f.id, protocol=f.mapping.protocol, host=f.mapping.host_ip,
                        host_port=f.host_port, mode=f.mode,
                        rule=f.rule().comment if f.mode == "kernel" else "", name=f.name)


def when(at: float) -> str:
    """A Unix time as the doctor says it: UTC, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def gone(store: StateStore, sandbox_id: str) -> str:
    """What became of a sandbox that is not here, from the event log ("" if unknown)."""
    for event in reversed(store.events(sandbox_id=sandbox_id, limit=EVENT_HISTORY)):
        if event.kind == "sandbox.deleted":
            return f"sandbox {sandbox_id} was deleted at {when(event.at)} (event " \
                   f"#{event.seq})"
        if event.kind == "sandbox.state" and event.data.get("state") == "failed":
            return f"sandbox {sandbox_id} failed at {when(event.at)}: " \
                   f"{event.data.get('reason', '')}; it is gone since"
    return ""


def token_facts(roster: Roster, sandbox_id: str, token: str, port: str | None) -> TokenFacts:
    """What ``token`` is: this sandbox's, an access token of it (in scope of ``port``?),
    expired or revoked, another sandbox's, a deleted sandbox's, or unknown."""
    sb = roster.get(sandbox_id)
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
    for other in roster:
        if other.id != sandbox_id and other.live.check(token)[0] is TokenCheck.OK:
            return TokenFacts(verdict="other", detail=f"the token belongs to sandbox "
                              f"{other.id}, not {sandbox_id}")
    mark = fingerprint(hash_token(token))
    revoked: set[str] = set()
    for event in reversed(roster.store.events(limit=EVENT_HISTORY)):
        if event.kind == "token.revoked":
            revoked.add(str(event.data.get("id")))
        elif event.kind == "sandbox.deleted" and mark in event.data.get("tokens", []):
            return TokenFacts(verdict="deleted", detail=f"the token is sandbox "
                              f"{event.sandbox_id}'s, which was deleted at "
                              f"{when(event.at)} (event #{event.seq})")
        elif event.kind == "token.created" and event.data.get("fingerprint") == mark and \
                event.data.get("id") in revoked:
            return TokenFacts(verdict="revoked", detail=f"access token "
                              f"{event.data.get('id')} of sandbox "
                              f"{event.sandbox_id} was revoked")
    return TokenFacts(verdict="unknown",
                      detail="no sandbox of this gateway has this token, now or before")


def port_facts(sb: RunningSandbox, forwards: list[HostForward]) -> list[PortFacts]:
    """The ports of a sandbox with their forwards: the profile's, then app ports published
    by number, then the guest agent's."""
    ports = []
    ours = sb.backend.name != "external"  # sandport started the profile's services
    for guest_port in sb.live.ports:
        own = [f for f in forwards if f.name == guest_port.name or
               (f.mapping.guest_port == guest_port.port and f.mapping.protocol == "tcp"
                and not guest_port.path)]
        protocol = guest_port.protocol if guest_port.protocol in ("rfb", "http") else "tcp"
        ports.append(PortFacts(
            name=guest_port.name, guest_port=guest_port.port, protocol=protocol,
            path=guest_port.path, ws=True, forwards=tuple(forward_facts(f) for f in own),
            managed=ours))
    named = {p.name for p in ports}
    for f in forwards:  # app ports published by number
        attached = f.name in named or (f.mapping.protocol == "tcp" and any(
            f.mapping.guest_port == p.guest_port and not p.path for p in ports))
        if not attached:
            named.add(f.name)
            ports.append(PortFacts(
                name=f.name, guest_port=f.mapping.guest_port,
                protocol="udp" if f.mapping.protocol == "udp" else "tcp",
                forwards=(forward_facts(f),)))
    if sb.spec.agent_url:
        ports.append(PortFacts(name="agent", guest_port=AGENT_PORT, protocol="agent",
                               managed=True))
    return ports


def isolation_facts(forwards: ForwardTable, sb: RunningSandbox, *, bridge: str,
                    link: str) -> IsolationFacts | None:
    """sandport's guard for a sandbox, read from the tables and their counters: host
    isolation on the bridge (or on an attached target's kernel-forward link) and the
    anti-spoofing of its bridge port ``link``. None: nothing to guard, or no nft."""
    if not forwards.nft_available:
        return None
    drops = nft.guard_drops(bridge)
    if sb.backend.name == "external":
        egress = sorted({f.options.egress for f in forwards.of(sb.id)
                         if f.mode == "kernel" and f.options.egress})
        if not egress:
            return None  # sandport turned route_localnet on nowhere for it
        localnet = nft.localnet_comment(egress[0])
        return IsolationFacts(link=egress[0], guarded=localnet in drops,
                              localnet_drops=drops.get(localnet, 0))
    guard = forwards.guard
    host, localnet = nft.host_comment(bridge), nft.localnet_comment(bridge)
    mac = antispoof.sandbox_mac(sb.id)
    return IsolationFacts(
        link=bridge, guarded=guard is not None and host in drops and localnet in drops,
        host_drops=drops.get(host, 0), localnet_drops=drops.get(localnet, 0),
        agent=f"{guard.gateway_ip}:{guard.agent_port}" if guard is not None else "",
        port=link, port_guarded=antispoof.guarded(bridge).get(link) == (mac, sb.live.ip),
        mac=mac, spoofed=tuple(antispoof.spoofed(bridge).get(link, {}).items()))


def subject(roster: Roster, forwards: ForwardTable, config: GatewayConfig, *,
            sandbox_id: str, port: str | None, token: str | None, link: str,
            ws_base: str) -> Subject:
    """Everything the doctor's walk needs of ``sandbox_id`` (its ``port``, if asked; a
    ``token`` someone uses for it, if given). ``link``: the host end of its link;
    ``ws_base``: where this host reaches the WebSocket bridge."""
    sb = roster.get(sandbox_id)
    facts = token_facts(roster, sandbox_id, token, port) if token else None
    if sb is None:
        what = gone(roster.store, sandbox_id)
        if facts is not None and facts.verdict == "deleted":
            what = facts.detail
        return Subject(sandbox=sandbox_id, known=False, gone=what)
    net = config.net
    own = forwards.of(sandbox_id)
    ports = port_facts(sb, own)
    chains = nft.chain_names(net.bridge)
    nft_rules: list[tuple[str, str]] = []
    if forwards.nft_available and any(f.mode == "kernel" for f in own):
        nft_rules = nft.rules_of(net.bridge)
    running = {f.id for f in own}
    external = sb.backend.name == "external"
    # A failed sandbox's forwards were closed with it on purpose (a target gone, a guest
    # that died): the route hop says so; they are not forwards the gateway lost.
    closed = sb.live.state.value in ("failed", "stopping", "stopped")
    return Subject(
        sandbox=sandbox_id, known=True, state=sb.live.state.value,
        reason=sb.live.reason, ip=sb.live.ip, bridge=net.bridge,
        pool_gateway=f"{net.gateway_ip}/{net.subnet.prefixlen}",
        link=link, ports=tuple(ports),
        vnc_password=sb.spec.secrets.get("vnc_password"),
        service_failure=sb.backend.failure(sb.spec),
        logs="" if external else str(sb.spec.workdir / "logs"),
        backend=sb.backend.name, restarts_services=sb.backend.restarts_services,
        nft_rules=tuple(nft_rules), chains=(chains[0], chains[1]),
        ws_base=ws_base, token=sb.token,
        forward_host=connect_host(config.forward_host), token_facts=facts,
        port_asked=port, known_ports=tuple(p.name for p in ports),
        agent_report=sb.agent_report,
        agent_report_age=time.time() - sb.agent_report_at
        if sb.agent_report_at is not None else None,
        external=external, netns=sb.spec.netns,
        isolation=isolation_facts(forwards, sb, bridge=net.bridge, link=link),
        unrun_forwards=tuple(
            f"forward {r.id} ({r.protocol} {r.host_ip}:{r.host_port} -> {r.guest_port})"
            for r in roster.store.forwards(sandbox_id) if r.id not in running and not closed))
