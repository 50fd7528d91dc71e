"""Prometheus text exposition (format 0.0.4) of the gateway: its forwards, the WebSocket
bridge's routes, the sandboxes (state, readiness time, agent report age), the sessions by
state and the open event streams.

Kept dependency-free: the format is a few lines per sample. Kernel forwards report the
connections their DNAT rule translated (nft counter); bytes and active connections are
only known for userspace relays, so those samples are absent for kernel forwards.

Owns: the exposition format. Must not touch: the gateway: it renders what it is handed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sandport.bridge.model import BridgeStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_FAMILIES = (
    ("sandport_forward_bytes_total", "counter",
     "Bytes a userspace forward relayed, by direction (up: client to guest)."),
    ("sandport_forward_connections_active", "gauge",
     "Connections (TCP) or flows (UDP) a userspace forward relays now."),
    ("sandport_forward_connections_total", "counter",
     "Connections (TCP) or flows (UDP) a forward accepted; kernel: DNAT translations."),
    ("sandport_forward_failures_total", "counter",
     "Connections a forward failed or ended, by reason (refused, unreachable, timeout, "
     "limit, idle, reset, descriptors)."),
    ("sandport_forward_pipes", "gauge",
     "Splice pipes a userspace TCP forward's connections hold now (one per direction with "
     "bytes in flight; taken from the process's bounded pool)."),
    ("sandport_forward_copy_fallbacks_total", "counter",
     "Times a direction of a userspace TCP forward copied instead of splicing (the pipe "
     "pool was empty, or a pipe or splice was refused)."),
    ("sandport_sandboxes", "gauge", "Sandboxes the gateway runs."),
    ("sandport_sandbox_state", "gauge",
     "1 for the state each sandbox is in (creating, starting, ready, degraded, ...)."),
    ("sandport_sandbox_ready_seconds", "gauge",
     "Seconds from creation until the sandbox answered its protocol on every path."),
    ("sandport_sandbox_probe_seconds", "gauge",
     "Duration of the latest readiness probe; label ok says whether it passed."),
    ("sandport_sandbox_agent_report_age_seconds", "gauge",
     "Seconds since the sandbox's guest agent last reported (it reports every 10 s)."),
    ("sandport_sessions", "gauge",
     "Sessions by state (waiting, ready, completed, expired, cancelled)."),
    ("sandport_event_watchers", "gauge", "Open event streams (GET /api/events as SSE)."),
    ("sandport_ws_sessions_active", "gauge",
     "WebSocket bridge sessions open now, by sandbox and guest port."),
    ("sandport_ws_sessions_total", "counter",
     "WebSocket bridge sessions opened (upgraded), by sandbox and guest port."),
    ("sandport_ws_bytes_total", "counter",
     "Bytes the WebSocket bridge moved, by direction (to_guest, to_client)."),
    ("sandport_ws_closes_total", "counter",
     "WebSocket bridge sessions ended, by reason (target_closed, idle, keepalive, "
     "client_closed, client_went_away, client_connection_failed, target_connection_failed, "
     "...)."),
    ("sandport_ws_rfb_ready_seconds", "summary",
     "VNC targets: seconds from the WebSocket upgrade to the server's ServerInit."),
    ("sandport_ws_rfb_failed_total", "counter",
     "VNC targets: handshakes the server refused (a wrong password, mostly)."),
    ("sandport_ws_refusals_total", "counter",
     "WebSocket upgrades refused before the upgrade, by HTTP status."),
    ("sandport_ws_login_blocks_total", "counter",
     "WebSocket upgrades refused (429) because their client address failed VNC "
     "authentication too often."),
    ("sandport_accept_refusals_total", "counter",
     "Clients the gateway's port (HTTP API and WebSocket bridge) reset at accept, by "
     "reason (descriptors: the process was out of file descriptors)."),
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def render(forwards: list[dict[str, Any]], *, sandboxes: int,
           bridge: BridgeStats | None = None,
           sandbox_docs: list[dict[str, Any]] | None = None,
           sessions: dict[str, int] | None = None, watchers: int | None = None,
           now: float | None = None) -> str:
    """The exposition text for ``forwards`` (as :meth:`ForwardTable.listing` gives them),
    the WebSocket bridge's per-route counters, the sandboxes (``sandbox_docs``: their
    API documents), sessions by state and open event streams."""
    samples: dict[str, list[str]] = {name: [] for name, _, _ in _FAMILIES}
    for state, count in sorted((sessions or {}).items()):
        samples["sandport_sessions"].append(
            f"sandport_sessions{_labels([('state', state)])} {count}")
    if watchers is not None:
        samples["sandport_event_watchers"].append(f"sandport_event_watchers {watchers}")
    for doc in sandbox_docs or []:
        base = [("sandbox", doc["id"])]
        reported = (doc.get("agent") or {}).get("reported_at")
        if reported is not None and now is not None:
            samples["sandport_sandbox_agent_report_age_seconds"].append(
                f"sandport_sandbox_agent_report_age_seconds{_labels(base)} "
                f"{max(0.0, now - reported):.3f}")
        samples["sandport_sandbox_state"].append(
            f"sandport_sandbox_state{_labels([*base, ('state', doc['state'])])} 1")
        if doc.get("ready_seconds") is not None:
            samples["sandport_sandbox_ready_seconds"].append(
                f"sandport_sandbox_ready_seconds{_labels(base)} {doc['ready_seconds']}")
        last = (doc.get("readiness") or {}).get("last")
        if last:
            ok = "true" if last["ok"] else "false"
            samples["sandport_sandbox_probe_seconds"].append(
                f"sandport_sandbox_probe_seconds{_labels([*base, ('ok', ok)])} "
                f"{last['elapsed_ms'] / 1000:.6f}")
    if bridge is not None:
        _bridge_samples(samples, bridge)
    for f in forwards:
        base = [("forward", f["id"]), ("sandbox", f["sandbox"]), ("name", f["name"]),
                ("protocol", f["protocol"]), ("host", f["host"]), ("mode", f["mode"])]
        if f.get("bytes_up") is not None:
            for direction in ("up", "down"):
                samples["sandport_forward_bytes_total"].append(
                    f"sandport_forward_bytes_total{_labels([*base, ('direction', direction)])} "
                    f"{int(f[f'bytes_{direction}'])}")
        if f.get("active") is not None:
            samples["sandport_forward_connections_active"].append(
                f"sandport_forward_connections_active{_labels(base)} {int(f['active'])}")
        samples["sandport_forward_connections_total"].append(
            f"sandport_forward_connections_total{_labels(base)} {int(f['total'] or 0)}")
        if f.get("pipes") is not None:
            samples["sandport_forward_pipes"].append(
                f"sandport_forward_pipes{_labels(base)} {int(f['pipes'])}")
            samples["sandport_forward_copy_fallbacks_total"].append(
                f"sandport_forward_copy_fallbacks_total{_labels(base)} {int(f['fallbacks'])}")
        for reason, count in sorted((f.get("failures") or {}).items()):
            samples["sandport_forward_failures_total"].append(
                f"sandport_forward_failures_total{_labels([*base, ('reason', reason)])} "
                f"{int(count)}")
    samples["sandport_sandboxes"].append(f"sandport_sandboxes {sandboxes}")
    lines = []
    for name, kind, text in _FAMILIES:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *samples[name]]
    return "\n".join(lines) + "\n"


def _bridge_samples(samples: dict[str, list[str]], stats: BridgeStats) -> None:
    for (sandbox, port), rs in sorted(stats.routes.items()):
        base = [("sandbox", sandbox), ("port", port)]
        samples["sandport_ws_sessions_active"].append(
            f"sandport_ws_sessions_active{_labels(base)} {rs.sessions_active}")
        samples["sandport_ws_sessions_total"].append(
            f"sandport_ws_sessions_total{_labels(base)} {rs.sessions_total}")
        for direction, value in (("to_guest", rs.bytes_to_target),
                                 ("to_client", rs.bytes_to_client)):
            samples["sandport_ws_bytes_total"].append(
                f"sandport_ws_bytes_total{_labels([*base, ('direction', direction)])} {value}")
        if rs.rfb_ready_count:
            samples["sandport_ws_rfb_ready_seconds"] += [
                f"sandport_ws_rfb_ready_seconds_sum{_labels(base)} {rs.rfb_ready_seconds:.6f}",
                f"sandport_ws_rfb_ready_seconds_count{_labels(base)} {rs.rfb_ready_count}"]
        if rs.rfb_failed:
            samples["sandport_ws_rfb_failed_total"].append(
                f"sandport_ws_rfb_failed_total{_labels(base)} {rs.rfb_failed}")
        for reason, count in sorted(rs.closed.items()):
            samples["sandport_ws_closes_total"].append(
                f"sandport_ws_closes_total{_labels([*base, ('reason', reason)])} {count}")
    samples["sandport_ws_login_blocks_total"].append(
        f"sandport_ws_login_blocks_total {stats.login_blocks}")
    for reason in sorted({"descriptors", *stats.accept_refused}):
        samples["sandport_accept_refusals_total"].append(
            f"sandport_accept_refusals_total{_labels([('reason', reason)])} "
            f"{stats.accept_refused[reason]}")
    for status, count in sorted(stats.refused.items()):
        samples["sandport_ws_refusals_total"].append(
            f"sandport_ws_refusals_total{_labels([('status', str(status))])} {count}")
