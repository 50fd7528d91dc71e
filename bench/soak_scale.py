"""`make soak`, the scale half: 10,000 idle proxy connections and 1,000 RFB sessions.

One real gateway (``sandport up --forward-mode proxy`` as a subprocess, with its own state
dir, bridge, subnet and listen address) runs one netns desktop sandbox (a real Xvnc). A
guest echo server (``soak_echo.py``) runs in the sandbox's namespace behind a proxy forward
``127.0.0.1:P -> guest:7``.

    proxy   ``--conns`` (10,000) idle TCP connections through the proxy forward, opened
            ``--batch`` (200) at a time; once all are open each is verified by an echo
            round trip; then all are closed. Goal: 0 errors, gateway growth <= 150 MB for
            the 10,000 (15,000 B each).
    ws      ``--ws-sessions`` (1,000) WebSockets through the gateway's front door
            (``/s/<id>/ports/vnc/ws?token=...``), each an RFB handshake to ServerInit with
            the sandbox's VNC password, all open at once and each verified by a
            FramebufferUpdate round trip to Xvnc; then all closed. Goal: 0 errors; Xvnc
            alive and answering a new session afterwards.

Reported per scenario: opened / verified / errors by reason, the gateway's RSS and PSS and
descriptors before, at the peak and after close (growth per connection), kernel memory
(host-wide Slab and TCP socket memory: client, gateway and guest sockets together), the
gateway's failures by reason from ``/metrics`` and its descriptor limit: a miss says why.
Prints a table and PASS/MISS lines; writes ``bench/results/soak-scale-<UTC>.json``. A miss
is a measurement (exit 0); 2: not root or a missing program; 1: setup failed or something
was left behind; 130: interrupted. Everything it made is removed, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import resource
import secrets
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import report
import soak_gateway
import soak_load
import testbed
import uvloop
from soak_gateway import (
    ProcSample,
    UpProcess,
    kernel_sample,
    listen_backlog,
    listen_overflows,
    sample_process,
    sockstat,
)
from testbed import BenchError, Proc, progress

from sandport.client import ApiError
from sandport.probe import probe_rfb_ws
from sandport.sandbox.procs import NSEXEC
from sandport.sandbox.profiles import VNC_PORT

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BENCH_DIR = Path(__file__).resolve().parent
REQUIRED = {"ip": "iproute2", "nft": "nftables", "Xvnc": "tigervnc-standalone-server",
            "crun": "crun", "prlimit": "util-linux"}
SCENARIOS = ("proxy", "ws")
#: The issue's goal: <= 150 MB of gateway growth for 10,000 idle connections.
GOAL_TOTAL_BYTES = 150_000_000
GOAL_CONNS = 10_000
GOAL_BYTES_PER_CONN = GOAL_TOTAL_BYTES / GOAL_CONNS
#: After close, the gateway's descriptors must come back to the baseline within this...
SETTLE_SECONDS = 30.0
#: ...give or take this many (an API call of the bench itself holds one for a moment).
FD_SLACK = 2
GUEST_ECHO_PORT = 7
CAP_SYS_RESOURCE = 24  # linux/capability.h
DEFAULT_STATE_DIR = Path("/var/tmp/sandport-soak-scale")
DEFAULT_BRIDGE = "sp-soak0"
DEFAULT_SUBNET = "10.201.253.0/24"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; ``--quick`` fills in what was not given explicitly."""
    ap = argparse.ArgumentParser(
        prog="bench/soak_scale.py",
        description="Scale soak: idle connections through a proxy forward and RFB sessions "
                    "through the WebSocket front door of a real `sandport up`, all open at "
                    "once, each verified by a round trip; the gateway's memory and "
                    "descriptors before, at the peak and after close. Run as root.",
        epilog="Prints a table and PASS/MISS lines against the issue's goals (0 errors; "
               "<= 150 MB gateway growth for 10,000 connections); a MISS names the "
               "gateway's failures by reason and its descriptor limit. Writes JSON to "
               "bench/results/soak-scale-<UTC>.json. Exit 0 also on MISS, 2 not root or "
               "a program missing, 1 setup failure or leftovers, 130 interrupt.")
    ap.add_argument("--quick", action="store_true",
                    help="a short run: 1,000 connections and 100 sessions (about a minute)")
    ap.add_argument("--conns", type=int, default=None,
                    help="idle proxy connections (default 10000, --quick 1000)")
    ap.add_argument("--batch", type=int, default=200,
                    help="connections opened at once (default: %(default)s)")
    ap.add_argument("--ws-sessions", type=int, default=None,
                    help="RFB sessions over WebSockets (default 1000, --quick 100)")
    ap.add_argument("--ws-batch", type=int, default=4,
                    help="sessions opened at once (default: %(default)s; Xvnc listens with "
                         "a backlog of 5, so a larger burst overflows its accept queue)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help="comma-separated subset of %(default)s")
    ap.add_argument("--timeout", type=float, default=10.0,
                    help="bound of every connect, handshake, round trip and /metrics "
                         "request, seconds (default: %(default)s)")
    ap.add_argument("--gateway-nofile", type=int, default=None, metavar="N",
                    help="run the gateway under `prlimit --nofile=N:N` (labelled in the "
                         "output); default: the limits plain `sandport up` gets")
    ap.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                    help="the gateway's state dir, removed at the end (default: %(default)s)")
    ap.add_argument("--bridge", default=DEFAULT_BRIDGE, help="default: %(default)s")
    ap.add_argument("--subnet", default=DEFAULT_SUBNET, help="default: %(default)s")
    ap.add_argument("--listen", default="127.0.0.1:0",
                    help="the gateway's HTTP address (default: %(default)s)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR,
                    help="where the JSON goes (default: bench/results)")
    ap.add_argument("--out", type=Path, default=None,
                    help="write the JSON to exactly this file instead")
    ap.add_argument("--no-lock", action="store_true",
                    help="do not take the benches' lock in /run/sandport-bench (the test "
                         "suite runs beside other work and cleans up after itself)")
    args = ap.parse_args(argv)
    if args.conns is None:
        args.conns = 1000 if args.quick else 10_000
    if args.ws_sessions is None:
        args.ws_sessions = 100 if args.quick else 1000
    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not wanted or any(s not in SCENARIOS for s in wanted):
        ap.error(f"--scenarios: choose from {','.join(SCENARIOS)}")
    args.scenarios = [s for s in SCENARIOS if s in wanted]
    if min(args.conns, args.batch, args.ws_sessions, args.ws_batch) < 1 or args.timeout <= 0:
        ap.error("--conns, --batch, --ws-sessions, --ws-batch and --timeout must be positive")
    if not args.bridge.startswith("sp-"):
        ap.error("--bridge: sandport's links are named sp-...")
    return args


# -- helpers ---------------------------------------------------------------------------------


class Unavailable(BenchError):
    """The machine cannot run what was asked (exit 2)."""

    status = 2


def raise_own_nofile(need: int) -> int:
    """This process holds every client socket: raise soft (and, as root, hard)
    RLIMIT_NOFILE to ``need``.

    Raising the hard limit needs CAP_SYS_RESOURCE, which a container may withhold even
    from root; then the hard limit is the bound.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return soft
    for limits in ((need, max(need, hard)), (need, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            return need
        except (ValueError, OSError):
            continue
    raise Unavailable(f"the clients need {need} descriptors, but this process's hard "
                      f"RLIMIT_NOFILE is {hard} and cannot be raised (no CAP_SYS_RESOURCE): "
                      "ask for fewer (--conns, --ws-sessions)")


def xvnc_pid(netns: str) -> int | None:
    """The Xvnc process inside ``netns``."""
    for pid in testbed.sh(["ip", "netns", "pids", netns], check=False).split():
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "Xvnc":
                return int(pid)
        except OSError:
            continue
    return None


def can_raise_hard_limit() -> bool:
    """Whether this process has CAP_SYS_RESOURCE (a container may withhold it from root)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    return False


def mib(kib: int | None) -> float | None:
    """KiB as MiB."""
    return None if kib is None else kib / 1024


def growth(before: ProcSample, at: ProcSample, key: str) -> int | None:
    """KiB gained from ``before`` to ``at`` in ``key`` (rss_kib, pss_kib)."""
    a, b = getattr(before, key), getattr(at, key)
    return None if a is None or b is None else b - a


def failures(metrics: list[tuple[str, dict[str, str], float]], forward: str) -> dict[str, int]:
    """The forward's failures by reason (non-zero only)."""
    return {labels["reason"]: int(v) for name, labels, v in metrics
            if name == "sandport_forward_failures_total" and labels.get("forward") == forward
            and v}


def metric_sum(metrics: list[tuple[str, dict[str, str], float]], name: str,
               **match: str) -> int:
    """The sum of a metric over the samples whose labels match."""
    return int(sum(v for n, labels, v in metrics
                   if n == name and all(labels.get(k) == m for k, m in match.items())))


def by_label(metrics: list[tuple[str, dict[str, str], float]], name: str,
             label: str) -> dict[str, int]:
    """A metric's non-zero samples keyed by one label."""
    out: dict[str, int] = {}
    for n, labels, v in metrics:
        if n == name and v:
            key = labels.get(label, "")
            out[key] = out.get(key, 0) + int(v)
    return out


def active(gw: UpProcess, name: str, **match: str) -> int:
    """A gauge of the gateway summed over matching samples; -1 when /metrics is silent."""
    metrics = gw.metrics()
    return metric_sum(metrics, name, **match) if metrics else -1


def verdict(ok: bool | None) -> str | None:
    """PASS, MISS, or None (not measured)."""
    return None if ok is None else ("PASS" if ok else "MISS")


async def settle(gw: UpProcess, baseline: int, gauge: Any) -> tuple[bool, float]:
    """Wait (bounded) until the gateway's descriptors are back to ``baseline`` (+ slack)
    and ``gauge()`` is 0; (whether they came back, seconds taken)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    def back() -> bool:
        fds = sample_process(gw.pid).fds
        return fds is not None and fds <= baseline + FD_SLACK and gauge() == 0

    ok = await soak_gateway.wait_until(back, SETTLE_SECONDS)
    return ok, loop.time() - t0


def _outcome(load: soak_load.Load[Any], gateway: tuple[ProcSample, ProcSample, ProcSample],
             active_peak: int) -> dict[str, Any]:
    """What every scenario reports: counts, errors, times, the gateway's samples."""
    before, peak, after = gateway
    return {
        "asked": load.asked, "opened": load.opened, "verified": load.verified,
        "errors": dict(load.errors), "active_at_peak": active_peak,
        "open_seconds": round(load.open_seconds, 2),
        "verify_seconds": round(load.verify_seconds, 2),
        "gateway": {"before": before.as_dict(), "peak": peak.as_dict(),
                    "after": after.as_dict()},
        "gateway_rss_growth_kib": growth(before, peak, "rss_kib"),
        "gateway_pss_growth_kib": growth(before, peak, "pss_kib"),
    }


def _since(before: dict[str, int], now: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in now.items() if v - before.get(k, 0)}


def _delta(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else b - a


def _kernel_delta(k0: dict[str, int | None], k1: dict[str, int | None]) -> dict[str, int | None]:
    return {k: (k1[k] - v if v is not None and k1.get(k) is not None else None)  # type: ignore[operator]
            for k, v in k0.items()}


# -- scenario: idle proxy connections --------------------------------------------------------


async def scenario_proxy(gw: UpProcess, sandbox: str, port: int,
                         args: argparse.Namespace) -> dict[str, Any]:
    """Open, verify, hold and close ``args.conns`` idle connections through the forward."""
    assert gw.api is not None
    forward = next(f["id"] for f in gw.api.forwards()
                   if f["host"] == f"127.0.0.1:{port}")
    progress(f"proxy: {args.conns} idle connections to 127.0.0.1:{port} (forward {forward}, "
             f"-> guest echo :{GUEST_ECHO_PORT}), {args.batch} at a time")
    before, k0 = sample_process(gw.pid), kernel_sample()
    fails0 = failures(gw.metrics(), forward)
    api0 = len(gw.metrics_errors)
    overflows0 = listen_overflows()
    load = await soak_load.open_tcp(("127.0.0.1", port), args.conns, batch=args.batch,
                                    timeout=args.timeout, progress=progress)
    try:
        peak, k1 = sample_process(gw.pid), kernel_sample()
        guest_tcp = sockstat(f"sp-{sandbox}")
        metrics = gw.metrics()
        fails = _since(fails0, failures(metrics, forward))
        active_peak = metric_sum(metrics, "sandport_forward_connections_active",
                                 forward=forward)
        overflows = _delta(overflows0, listen_overflows())
        progress(f"proxy: {load.verified}/{args.conns} open and echoing "
                 f"(opened in {load.open_seconds:.1f} s, verified in "
                 f"{load.verify_seconds:.1f} s); gateway RSS {mib(before.rss_kib):.0f} -> "
                 f"{mib(peak.rss_kib):.0f} MiB, descriptors {before.fds} -> {peak.fds}"
                 + (f"; errors {dict(load.errors)}; gateway failures {fails}"
                    if load.errors or fails else "")
                 + ("" if metrics else "; /metrics did not answer"))
    finally:
        load.close()
    back, settle_s = await settle(gw, before.fds or 0, lambda: active(
        gw, "sandport_forward_connections_active", forward=forward))
    after, k2 = sample_process(gw.pid), kernel_sample()
    # Counters: the ones after close hold the whole burst (at the peak, a gateway out of
    # descriptors may not have answered).
    fails = _since(fails0, failures(gw.metrics(), forward)) or fails
    api_errors = gw.metrics_errors[api0:]
    progress(f"proxy: closed; gateway descriptors {after.fds} (baseline {before.fds}) after "
             f"{settle_s:.1f} s, RSS {mib(after.rss_kib):.0f} MiB")
    limit_line = gw.descriptor_line()
    rss_growth = growth(before, peak, "rss_kib")
    per_conn = (rss_growth * 1024 / load.verified
                if rss_growth is not None and load.verified else None)
    why = []
    if load.errors or fails:
        why.append(f"gateway failures by reason (/metrics): {fails or 'none counted'}")
        why.append(f"gateway RLIMIT_NOFILE {peak.nofile_soft} soft / {peak.nofile_hard} "
                   "hard" + (f" (its log: about {limit_line[1]} relayed connections)"
                             if limit_line else "")
                   + ("" if can_raise_hard_limit() else "; root here lacks "
                      "CAP_SYS_RESOURCE: no process can raise its hard limit"))
        why.append(f"listen overflows in the host namespace while opening: {overflows} "
                   "(host-wide: other programs' listeners count too)")
    if api_errors:
        why.append(f"the gateway's API did not answer /metrics within "
                   f"{gw.metrics_timeout:g} s, {len(api_errors)} time(s) while the "
                   "connections were open (the counts above were read after close): "
                   + "; ".join(api_errors[:3]))
    return {
        **_outcome(load, (before, peak, after), active_peak),
        "gateway_failures": fails,
        "host_listen_overflows": overflows,
        "gateway_rss_growth_per_conn_bytes": per_conn,
        "gateway_rss_after_close_growth_kib": growth(before, after, "rss_kib"),
        "descriptors_back": back, "settle_seconds": round(settle_s, 2),
        "api_unanswered": api_errors,
        "gateway_descriptor_log": list(limit_line) if limit_line else None,
        "kernel": {"before": k0, "peak": k1, "after": k2,
                   "peak_delta": _kernel_delta(k0, k1),
                   "guest_ns_tcp_at_peak": guest_tcp},
        "why": why,
    }


# -- scenario: RFB sessions over the WebSocket front door ------------------------------------


async def scenario_ws(gw: UpProcess, sandbox: dict[str, Any], listen: str,
                      args: argparse.Namespace) -> dict[str, Any]:
    """Open, verify, hold and close ``args.ws_sessions`` RFB sessions through the bridge."""
    sid = sandbox["id"]
    url = f"ws://{listen}/s/{sid}/ports/vnc/ws?token={sandbox['token']}"
    shown = url.split("?", 1)[0] + "?token=..."
    progress(f"ws: {args.ws_sessions} RFB sessions to {shown}, {args.ws_batch} at a time")
    xpid = xvnc_pid(f"sp-{sid}")
    before = sample_process(gw.pid)
    xbefore = sample_process(xpid) if xpid else ProcSample(pid=0, alive=False)
    overflows0 = listen_overflows(f"sp-{sid}")
    api0 = len(gw.metrics_errors)
    load = await soak_load.open_rfb(url, sandbox["vnc_password"], args.ws_sessions,
                                    batch=args.ws_batch, timeout=args.timeout,
                                    progress=progress)
    unclean = 0
    try:
        peak = sample_process(gw.pid)
        xpeak = sample_process(xpid) if xpid else ProcSample(pid=0, alive=False)
        metrics = gw.metrics()
        active_peak = metric_sum(metrics, "sandport_ws_sessions_active", sandbox=sid)
        progress(f"ws: {load.verified}/{args.ws_sessions} at ServerInit and answering "
                 f"(opened in {load.open_seconds:.1f} s); gateway RSS "
                 f"{mib(before.rss_kib):.0f} -> {mib(peak.rss_kib):.0f} MiB, descriptors "
                 f"{before.fds} -> {peak.fds}; Xvnc descriptors {xbefore.fds} -> {xpeak.fds}"
                 + (f"; errors {dict(load.errors)}" if load.errors else ""))
    finally:
        unclean = await load.close(args.timeout)
    back, settle_s = await settle(gw, before.fds or 0, lambda: active(
        gw, "sandport_ws_sessions_active", sandbox=sid))
    after = sample_process(gw.pid)
    metrics = gw.metrics()
    overflows = _delta(overflows0, listen_overflows(f"sp-{sid}"))
    backlog = listen_backlog(f"sp-{sid}", VNC_PORT)
    api_errors = gw.metrics_errors[api0:]
    fresh = await probe_rfb_ws(url, password=sandbox["vnc_password"], timeout=args.timeout)
    xafter = sample_process(xpid) if xpid else ProcSample(pid=0, alive=False)
    progress(f"ws: closed ({unclean} not cleanly); gateway descriptors {after.fds} "
             f"(baseline {before.fds}) after {settle_s:.1f} s; Xvnc "
             f"{'alive' if xafter.alive else 'GONE'}, a new session: "
             f"{'ok' if fresh.ok else 'FAILED'} ({fresh.detail})")
    rss_growth = growth(before, peak, "rss_kib")
    why = []
    if load.errors:
        why.append(f"refusals by reason (/metrics): "
                   f"{by_label(metrics, 'sandport_ws_refusals_total', 'status') or 'none'}; "
                   f"closes by reason: "
                   f"{by_label(metrics, 'sandport_ws_closes_total', 'reason') or 'none'}")
        why.append(f"gateway RLIMIT_NOFILE {peak.nofile_soft}; Xvnc RLIMIT_NOFILE "
                   f"{xpeak.nofile_soft}, descriptors at the peak {xpeak.fds}")
        why.append(f"Xvnc's accept queue (listen backlog {backlog}) overflowed {overflows} "
                   "times in the sandbox's namespace (TcpExt ListenOverflows): those "
                   "clients wait for SYN-ACK retransmits (1, 2, 4, 8 s); open fewer at "
                   "once (--ws-batch)")
    if api_errors:
        why.append(f"the gateway's API did not answer /metrics within "
                   f"{gw.metrics_timeout:g} s, {len(api_errors)} time(s): "
                   + "; ".join(api_errors[:3]))
    return {
        **_outcome(load, (before, peak, after), active_peak),
        "closed_uncleanly": unclean,
        "gateway_rss_growth_per_session_bytes": (
            rss_growth * 1024 / load.verified if rss_growth is not None and load.verified
            else None),
        "descriptors_back": back, "settle_seconds": round(settle_s, 2),
        "api_unanswered": api_errors,
        "xvnc_listen_backlog": backlog, "xvnc_listen_overflows": overflows,
        "ws_limits": "none set (sandport up's --ws-max-sessions and --ws-max-per-client "
                     "are unset by default)",
        "xvnc": {"before": xbefore.as_dict(), "peak": xpeak.as_dict(),
                 "after": xafter.as_dict(), "same_process_after": xafter.alive and
                 xafter.pid == xbefore.pid, "new_session_after": fresh.ok,
                 "new_session_detail": fresh.detail},
        "refusals_by_status": by_label(metrics, "sandport_ws_refusals_total", "status"),
        "closes_by_reason": by_label(metrics, "sandport_ws_closes_total", "reason"),
        "why": why,
    }


# -- report ----------------------------------------------------------------------------------


def _line(what: str, value: str, target: str | None, ok: bool | None) -> dict[str, Any]:
    return {"what": what, "value": value, "target": target, "verdict": verdict(ok)}


def _common_lines(name: str, r: dict[str, Any], words: str) -> list[dict[str, Any]]:
    """Every scenario: all verified with 0 errors; after it, /metrics answered throughout
    and the descriptors came back."""
    n, ok, g = r["asked"], r["verified"], r["gateway"]
    return [
        _line(f"{name}: {words}, 0 errors", f"{ok}/{n}, {sum(r['errors'].values())} errors",
              f"{n}/{n}, 0 errors", ok == n and not r["errors"]),
        _line(f"{name}: gateway API answers /metrics throughout",
              f"{len(r['api_unanswered'])} unanswered", "0 unanswered",
              not r["api_unanswered"]),
        _line(f"{name}: gateway descriptors back to baseline after close",
              f"{g['after']['fds']} (baseline {g['before']['fds']})",
              f"<= baseline + {FD_SLACK} within {SETTLE_SECONDS:g} s", r["descriptors_back"]),
    ]


def judge(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The PASS/MISS lines against the goals (and a few info lines)."""
    lines: list[dict[str, Any]] = []
    p = results.get("proxy")
    if p is not None:
        lines += _common_lines("proxy", p, "connections open and echoing")
        per = p["gateway_rss_growth_per_conn_bytes"]
        lines.insert(1, _line(
            "proxy: gateway RSS growth per connection",
            "—" if per is None else
            f"{per / 1024:.1f} KiB ({p['gateway_rss_growth_kib'] / 1024:.0f} MiB for "
            f"{p['verified']}; {per * GOAL_CONNS / 1e6:.0f} MB per 10,000)",
            f"<= {GOAL_BYTES_PER_CONN / 1024:.1f} KiB (150 MB per 10,000)",
            None if per is None else per <= GOAL_BYTES_PER_CONN))
    w = results.get("ws")
    if w is not None:
        common = _common_lines("ws", w, "RFB sessions at ServerInit and answering")
        per = w["gateway_rss_growth_per_session_bytes"]
        x = w["xvnc"]
        lines += [common[0],
                  _line("ws: gateway RSS growth per session",
                        "—" if per is None else f"{per / 1024:.1f} KiB", None, None),
                  _line("ws: Xvnc alive and answering a new session after",
                        f"{'alive' if x['same_process_after'] else 'gone'}, new session "
                        f"{'ok' if x['new_session_after'] else 'failed'}", "alive, ok",
                        x["same_process_after"] and x["new_session_after"]),
                  *common[1:]]
    return lines


def render(results: dict[str, dict[str, Any]], lines: list[dict[str, Any]],
           args: argparse.Namespace, gateway_label: str) -> str:
    """The summary table, the PASS/MISS lines and the reasons for a miss."""
    out = [f"scale soak: gateway {gateway_label}", ""]
    head = ("scenario", "asked", "verified", "errors", "gw RSS MiB before/peak/after",
            "gw PSS growth MiB", "KiB/conn", "gw fds before/peak/after")
    rows = [head]
    for name, r in results.items():
        g = r["gateway"]
        per = r.get("gateway_rss_growth_per_conn_bytes",
                    r.get("gateway_rss_growth_per_session_bytes"))
        rows.append((name, str(r["asked"]), str(r["verified"]), str(sum(r["errors"].values())),
                     "/".join(report.fmt(mib(g[k]["rss_kib"]), ".0f")
                              for k in ("before", "peak", "after")),
                     report.fmt(mib(r["gateway_pss_growth_kib"]), ".1f"),
                     report.fmt(None if per is None else per / 1024, ".1f"),
                     "/".join(str(g[k]["fds"]) for k in ("before", "peak", "after"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for i, row in enumerate(rows):
        out.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w)
                             for j, (c, w) in enumerate(zip(row, widths, strict=True))))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    out.append("")
    p = results.get("proxy")
    if p is not None:
        d = p["kernel"]["peak_delta"]
        out.append(f"proxy: kernel at the peak (host-wide, client + gateway + guest sockets): "
                   f"Slab {report.fmt(mib(d['slab_kib']), '+.0f')} MiB, TCP socket memory "
                   f"{report.fmt(mib(d['tcp_mem_kib']), '+.1f')} MiB; guest namespace TCP "
                   f"in use {p['kernel']['guest_ns_tcp_at_peak'].get('inuse')}")
    w = results.get("ws")
    if w is not None:
        x = w["xvnc"]
        out.append(f"ws: Xvnc RSS {report.fmt(mib(x['before']['rss_kib']), '.0f')} -> "
                   f"{report.fmt(mib(x['peak']['rss_kib']), '.0f')} MiB, descriptors "
                   f"{x['before']['fds']} -> {x['peak']['fds']} (its RLIMIT_NOFILE "
                   f"{x['peak']['nofile_soft']}); gateway session limits: {w['ws_limits']}")
    out.append("")
    width = max(len(line["what"]) for line in lines)
    for line in lines:
        target = f"(target {line['target']})" if line["target"] else "(info)"
        out.append(f"{line['what'].ljust(width)}  {line['value']}  {target} "
                   f"{line['verdict'] or ''}".rstrip())
    for name, r in results.items():
        for reason in r["why"]:
            out.append(f"{name}: why: {reason}")
        for reason, count in sorted(r["errors"].items(), key=lambda kv: -kv[1]):
            out.append(f"{name}: {count} x {reason}")
    return "\n".join(out)


# -- run -------------------------------------------------------------------------------------


class Run:
    """What one run starts (a fresh gateway per scenario, so neither scenario's freed
    memory flatters the other's growth), so the teardown can remove it in order."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.state_file = testbed.STATE_DIR / f"soak-scale-{secrets.token_hex(2)}.json"
        self.gw: UpProcess | None = None
        self.echo: Proc | None = None

    def record(self) -> None:
        """The benches' state file: who runs, which host processes (unless --no-lock)."""
        if self.args.no_lock:
            return
        procs = [p for p in (self.gw.proc if self.gw else None, self.echo)
                 if p is not None and p.alive()]
        testbed.STATE_DIR.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps({
            "owner_pid": os.getpid(), "owner_starttime": testbed.starttime(os.getpid()),
            "workdir": str(self.workdir),
            "procs": [{"pid": p.pid, "starttime": testbed.starttime(p.pid),
                       "argv": " ".join(p.argv)} for p in procs]}))

    def start(self, scenario: str) -> tuple[UpProcess, dict[str, Any], int]:
        """A gateway, a desktop sandbox with a proxy forward to guest port 7, and (for the
        proxy scenario) the guest echo server behind it, proven to echo."""
        a = self.args
        self.gw = UpProcess(state_dir=a.state_dir, bridge=a.bridge, subnet=a.subnet,
                            listen=a.listen, workdir=self.workdir, nofile=a.gateway_nofile,
                            metrics_timeout=a.timeout)
        api = self.gw.start()
        self.record()
        port = testbed.free_port()
        try:
            sb = api.create_sandbox(publish=[f"127.0.0.1:{port}:{GUEST_ECHO_PORT}"])
        except ApiError as exc:
            raise BenchError(f"the gateway did not make the sandbox: {exc}") from exc
        self.gw.sandbox_ids.append(sb.id)
        limits = sample_process(self.gw.pid)
        progress(f"{scenario}: gateway pid {self.gw.pid} (RLIMIT_NOFILE {limits.nofile_soft} "
                 f"soft / {limits.nofile_hard} hard), sandbox {sb.id} ready in "
                 f"{sb.doc['ready_seconds']} s at {sb.doc['ip']}")
        if scenario == "proxy":
            self.echo = Proc("echo", [
                sys.executable, "-I", "-S", str(NSEXEC), f"sp-{sb.id}", "/tmp", "--",
                sys.executable, "-I", str(BENCH_DIR / "soak_echo.py"), "--port",
                str(GUEST_ECHO_PORT), "--nofile", str(max(65536, a.conns + 1024))],
                self.workdir / "echo.log").start()
            self.record()
            m = self.echo.wait_for(r"^ready (\d+)")
            echo_probe(port, a.timeout)
            progress(f"proxy: guest echo server up (RLIMIT_NOFILE {m.group(1)})")
        return self.gw, sb.doc, port

    def teardown(self) -> list[str]:
        """Echo server, gateway (which removes its sandbox, links and rules), state dir."""
        errors: list[str] = []
        if self.echo is not None:
            self.echo.stop()
            self.echo = None
        if self.gw is not None:
            errors += self.gw.stop()
            errors += [f"left behind: {x}" for x in self.gw.leftovers()]
            self.gw = None
        if not errors:
            shutil.rmtree(self.args.state_dir, ignore_errors=True)
            if not self.args.no_lock:
                self.state_file.unlink(missing_ok=True)
                with contextlib.suppress(OSError):  # not empty: another run's file is in it
                    testbed.STATE_DIR.rmdir()
        return errors


async def measure(scenario: str, gw: UpProcess, sandbox: dict[str, Any], port: int,
                  args: argparse.Namespace) -> dict[str, Any]:
    """One scenario on its gateway."""
    if scenario == "proxy":
        return await scenario_proxy(gw, sandbox["id"], port, args)
    assert gw.api is not None
    return await scenario_ws(gw, sandbox, gw.api.url.split("://", 1)[1], args)


def echo_probe(port: int, timeout: float) -> None:
    """One echo through the forward before the clock runs."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"soak\n")
            if s.recv(16) != b"soak\n":
                raise BenchError("the guest echo server does not echo through the forward")
    except OSError as exc:
        raise BenchError(f"the guest echo server does not answer through 127.0.0.1:{port}: "
                         f"{exc}") from exc


def run(args: argparse.Namespace) -> int:
    """For each scenario: gateway, sandbox (and echo server), measure, tear down; report."""
    started = dt.datetime.now(dt.UTC)
    machine = report.machine_info(("sandport", "uvloop", "websockets"),
                                  tigervnc=report.package_version("tigervnc-standalone-server"))
    label = ("plain `sandport up` (the limits a user gets)" if args.gateway_nofile is None
             else f"UNDER `prlimit --nofile={args.gateway_nofile}:{args.gateway_nofile}` "
                  "(not what a plain `sandport up` gets)")
    with tempfile.TemporaryDirectory(prefix=testbed.LOGDIR_PREFIX) as tmp:
        r = Run(args, Path(tmp))

        def body() -> Path:
            if not args.no_lock:
                testbed.cleanup_leftovers(progress)
            r.record()
            own = raise_own_nofile(args.conns + args.ws_sessions + 1024)
            progress(f"client: RLIMIT_NOFILE {own}; gateway: {label}: state dir "
                     f"{args.state_dir}, bridge {args.bridge}, subnet {args.subnet}")
            results: dict[str, dict[str, Any]] = {}
            for scenario in args.scenarios:
                gw, sandbox, port = r.start(scenario)
                runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
                try:
                    results[scenario] = runner.run(measure(scenario, gw, sandbox, port, args))
                finally:
                    runner.close()
                errors = r.teardown()
                if errors:
                    raise BenchError(f"{scenario}: teardown: {'; '.join(errors)}")
            lines = judge(results)
            print(render(results, lines, args, label), flush=True)
            doc = {
                "bench": "soak-scale",
                "timestamp": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "duration_s": round(testbed.elapsed(), 1),
                "config": {"conns": args.conns, "batch": args.batch,
                           "ws_sessions": args.ws_sessions, "ws_batch": args.ws_batch,
                           "timeout": args.timeout, "scenarios": args.scenarios,
                           "gateway": label, "gateway_nofile": args.gateway_nofile,
                           "bridge": args.bridge, "subnet": args.subnet,
                           "client_nofile": own},
                "machine": machine,
                "results": results,
                "verdicts": lines,
                "notes": [
                    "a fresh gateway and sandbox per scenario",
                    "gateway: the `sandport up` process alone (VmRSS, smaps_rollup Pss)",
                    "kernel: host-wide /proc/meminfo and /proc/net/sockstat deltas, other "
                    "work on the machine included",
                    "growth per connection: RSS at the peak minus before, over the "
                    "connections verified",
                ],
            }
            result_path: Path
            if args.out is not None:
                result_path = args.out
            else:
                args.out_dir.mkdir(parents=True, exist_ok=True)
                result_path = args.out_dir / \
                    f"soak-scale-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
            result_path.write_text(report.to_json(doc))
            return result_path

        return testbed.finish(body, r.teardown, failed="soak failed")


def main(argv: list[str] | None = None) -> int:
    """Entry point: arguments, root and program checks, signal handlers, run."""
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("soak: must run as root (it runs a gateway: namespaces, a bridge, nftables): "
              "sudo make soak", file=sys.stderr)
        return 2
    missing = [f"{p} ({pkg})" for p, pkg in REQUIRED.items() if shutil.which(p) is None]
    if missing:
        print(f"soak: missing {', '.join(missing)}: run `make setup` (apt-get install the "
              "packages named)", file=sys.stderr)
        return 2
    testbed.interrupt_on_signals()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
