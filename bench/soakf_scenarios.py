"""The fault soak's scenarios, each an async function on a :class:`soakf_lib.Bed`.

``kill9``   ``kill -9`` of the gateway with live streams on the kernel forward, the proxy
            forward and the bridge; bytes lost per kind, how each client ended, then a
            restart on the same state dir and the time until new connections work.
``fault``   one fault (guest service killed, guest link cut, guest stops reading, client
            stops reading) with live connections through the proxy forward or the bridge:
            how the client's connection ended, what the guest saw, the gateway's counters,
            and its RSS while the fault lasted.

Each returns a plain dict (JSON); the caller judges it (``soak_faults.py`` against the
goals, the tests with asserts).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from soakf_lib import (
    AnyClient,
    Bed,
    Sampler,
    Stream,
    TcpClient,
    WsClient,
    count_by,
    end_kind,
    now,
    open_all,
    wait_until_works,
)

KINDS = ("kernel", "proxy", "ws")
FAULTS = ("guest-killed", "link-cut", "guest-stops-reading", "client-stops-reading")
FINISH_TIMEOUT = 10.0
RECOVER_BOUND = 15.0
WATCH_GAP = 0.002  # seconds between connects to the kernel forward during a restart
GAVE_UP = "client gave up (reset)"
REPORT_WAIT = 2.0


def _metrics(bed: Bed) -> dict[str, float]:
    """The gateway's counters of this sandbox's port 7000 (proxy forward and bridge)."""
    def wanted(line: str) -> bool:
        return (line.startswith("sandport_forward_") and 'mode="proxy"' in line) or \
            (line.startswith("sandport_ws_") and 'port="7000"' in line)

    try:
        return bed.gw.metrics(wanted)
    except OSError:
        return {}


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Counters that changed (gauges: their value after)."""
    out = {}
    for key, value in after.items():
        if "_active" in key:
            out[key] = value
        elif value != before.get(key, 0.0):
            out[key] = value - before.get(key, 0.0)
    return out


async def _wait_ended(clients: list[AnyClient], until: float) -> None:
    while now() < until and any(not c.st.end for c in clients):
        await asyncio.sleep(0.02)


async def _guest_reports(bed: Bed, ids: set[str], until: float) -> dict[str, dict[str, Any]]:
    """The guest's reports of ``ids``, waiting (bounded) until all are there."""
    assert bed.guest is not None
    reports: dict[str, dict[str, Any]] = {}
    while True:
        reports = await asyncio.to_thread(bed.guest.reports)
        if ids <= set(reports) or now() >= until:
            return {k: v for k, v in reports.items() if k in ids}
        await asyncio.sleep(0.1)


def _losses(streams: list[Stream], reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Bytes lost per direction: what one side sent that the other did not receive."""
    down, up, bad, missing = [], [], 0, 0
    for st in streams:
        rep = reports.get(st.id)
        bad += st.bad
        if rep is None:
            missing += 1
            continue
        bad += int(rep["bad"])
        down.append(int(rep["sent"]) - st.recv)
        up.append(st.sent - int(rep["recv"]))
    return {"conns_compared": len(down), "no_guest_report": missing,
            "lost_down_total": sum(down), "lost_up_total": sum(up),
            "lost_down_max": max(down, default=0), "lost_up_max": max(up, default=0),
            "conns_with_loss": sum(1 for d, u in zip(down, up, strict=True) if d or u),
            "bytes_out_of_sequence": bad}


async def kill9(bed: Bed, *, counts: dict[str, int], warm: float = 2.0,
                end_bound: float = 10.0, flow_check: float = 2.0,
                restart_bound: float = 30.0,
                log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """``kill -9`` of the gateway under live streams of every kind, then a restart."""
    assert bed.paths is not None
    paths = bed.paths
    sampler = Sampler(bed.gw.pid)
    clients: dict[str, list[AnyClient]] = {}
    result: dict[str, Any] = {"counts": counts, "open_errors": {}}
    try:
        for kind in KINDS:
            opened, errors = await open_all(paths, kind, counts[kind], "k9")
            clients[kind] = opened
            result["open_errors"][kind] = errors[:5] + ([f"... {len(errors)} in all"]
                                                        if len(errors) > 5 else [])
            for c in opened:
                c.run()
            log(f"kill -9: {len(opened)} {kind} streams open"
                + (f", {len(errors)} failed: {errors[0]}" if errors else ""))
        await asyncio.sleep(warm)
        rss_before = sampler.summary(0, now())
        dead = [c.st.id for cs in clients.values() for c in cs if c.st.end]
        result["ended_before_kill"] = dead
        for cs in clients.values():
            for c in cs:
                c.st.recv_marks["kill"] = c.st.recv
        t_kill = bed.gw.kill9()
        sampler.stop()
        result["gateway_rss_before_kill"] = rss_before
        log(f"kill -9 sent to the gateway (pid {bed.gw.pid}); waiting up to {end_bound:g} s "
            "for proxy and bridge clients to see their end")
        closing = clients["proxy"] + clients["ws"]
        await _wait_ended(closing, t_kill + end_bound)
        await asyncio.sleep(max(0.0, t_kill + flow_check - now()))
        per_kind: dict[str, Any] = {}
        for kind, cs in clients.items():
            ends = [c.st.ended_at - t_kill for c in cs if c.st.ended_at is not None]
            per_kind[kind] = {
                "conns": len(cs),
                "ends": count_by([end_kind(c.st.end) for c in cs]),
                "ended": len(ends),
                "hung": sum(1 for c in cs if not c.st.end),
                "end_after_kill_max_s": max(ends, default=None),
                "end_after_kill_median_s": sorted(ends)[len(ends) // 2] if ends else None,
                "flowing_after_kill": sum(1 for c in cs if not c.st.end
                                          and c.st.recv > c.st.recv_marks["kill"]),
            }
        # Restart on the same state dir; probe every kind until it works again.
        for cs in clients.values():
            for c in cs:
                c.st.recv_marks["restart"] = c.st.recv
        bed.gw.start()
        t_start = bed.gw.started_at
        deadline = t_start + restart_bound
        watch = asyncio.ensure_future(_watch_kernel(bed, deadline))
        probes = await asyncio.gather(*(wait_until_works(paths, k, deadline) for k in KINDS))
        ready = await asyncio.to_thread(bed.gw.wait_ready, max(1.0, deadline - now()))
        t_ready = bed.gw.ready_at
        assert t_ready is not None
        log(f"restarted: ready line {ready:.2f} s after the process started")
        restart: dict[str, Any] = {"ready_line_after_start_s": ready,
                                   "kernel_probes_failed": await watch}
        for kind, (t_ok, last, tries) in zip(KINDS, probes, strict=True):
            restart[kind] = {
                "works_after_start_s": None if t_ok is None else t_ok - t_start,
                "works_after_ready_s": None if t_ok is None else t_ok - t_ready,
                "probes": tries, "last_error": last}
        await asyncio.sleep(1.0)
        for kind, cs in clients.items():
            per_kind[kind]["flowing_after_restart"] = sum(
                1 for c in cs if not c.st.end and c.st.recv > c.st.recv_marks["restart"])
        result["restart"] = restart
        # The end: every stream still open stops (half-close, read to EOF); then the
        # guest's counts against the clients'.
        await asyncio.gather(*(c.finish(FINISH_TIMEOUT) for cs in clients.values()
                               for c in cs))
        streams = {k: [c.st for c in cs] for k, cs in clients.items()}
        reports = await _guest_reports(bed, {st.id for ss in streams.values() for st in ss},
                                       now() + REPORT_WAIT)
        for kind, ss in streams.items():
            per_kind[kind].update(_losses(ss, reports))
            per_kind[kind]["final_ends"] = count_by([end_kind(st.end) for st in ss])
        result["kinds"] = per_kind
        result["gateway_tracebacks"] = bed.gw.traceback_lines()[:20]
        return result
    finally:
        sampler.stop()
        for cs in clients.values():
            for c in cs:
                c.close()


async def fault(bed: Bed, kinds: tuple[str, ...], what: str, *, conns: int,
                stall: float = 5.0, end_bound: float = 10.0,
                log: Callable[[str], None] = lambda _: None) -> list[dict[str, Any]]:
    """One fault with ``conns`` live connections of each of ``kinds`` (proxy, ws) at once;
    one result per kind (the gateway's RSS and counters are the same for all)."""
    assert bed.paths is not None
    assert bed.guest is not None
    if what not in FAULTS or not kinds or not set(kinds) <= {"proxy", "ws"}:
        raise ValueError(f"unknown fault {what!r} or kinds {kinds!r}")
    mode = {"guest-stops-reading": "stall", "client-stops-reading": "flood"}.get(what,
                                                                                  "stream")
    before = _metrics(bed)
    sampler = Sampler(bed.gw.pid)
    by_kind: dict[str, list[AnyClient]] = {}
    results: dict[str, dict[str, Any]] = {}
    try:
        for kind in kinds:
            by_kind[kind], errors = await open_all(
                bed.paths, kind, conns, f"{what}-{int(now() * 1000)}", mode)
            results[kind] = {"kind": kind, "fault": what, "conns": len(by_kind[kind]),
                             "open_errors": errors[:5], "bound_s": end_bound}
        clients = [c for cs in by_kind.values() for c in cs]
        if what == "guest-stops-reading":
            for c in clients:
                c.run(read=True, paced=False)  # as fast as it goes; the guest never reads
        elif what != "client-stops-reading":  # (that client never reads nor sends)
            for c in clients:
                c.run()
        await asyncio.sleep(1.0)
        t_fault = now()
        if what == "guest-killed":
            bed.guest.kill()
        elif what == "link-cut":
            await asyncio.to_thread(bed.link, False)
        log(f"{what} via {'+'.join(kinds)}: fault at t=0 with {len(clients)} connection(s)")
        if what in ("guest-killed", "link-cut"):
            await _wait_ended(clients, t_fault + end_bound)
            rss = sampler.summary(t_fault, now())
            for r in results.values():
                r["rss"] = rss
        else:
            # The stall: sent (or read) bytes must stop growing, and so must the gateway.
            marks: dict[str, list[int]] = {k: [] for k in kinds}
            for _ in range(max(2, int(stall / 0.5))):
                await asyncio.sleep(0.5)
                for k, cs in by_kind.items():
                    marks[k].append(sum(c.st.sent for c in cs))
            rss = sampler.summary(t_fault, now(), steady_from=t_fault + 1.0)
            flood = await _flood_progress(bed) if mode == "flood" else None
            if mode == "stall":
                # A guest that never reads again: the gateway must give it up by itself
                # (the gateway's --guest-timeout) and tell the client.
                await _wait_ended(clients, t_fault + end_bound)
            # The client gives up (a reset, SO_LINGER 0) if it is still there: a client
            # that stops reading is the gateway's to keep until then; it must let go of
            # the guest side at once.
            for c in clients:
                if not c.st.end:
                    c.st.finish(GAVE_UP)
                    _abort(c)
            t_giveup = now()
            # A guest that stopped reading cannot see a FIN (it waits behind the unread
            # bytes) nor, after a timeout, an RST (the kernel sends none): a short wait.
            reports = await _guest_reports(bed, {c.st.id for c in clients}, t_giveup + (
                REPORT_WAIT if mode == "stall" else end_bound))
            for k, cs in by_kind.items():
                ids = {c.st.id for c in cs}
                mine = {i: r for i, r in reports.items() if i in ids}
                results[k].update(
                    rss=rss, client_sent_during_stall=marks[k], guest_flood=flood,
                    guest_saw_end={i: r["end"] for i, r in mine.items()},
                    guest_saw_end_after_s=max((r["t"] - _wall(t_giveup)
                                               for r in mine.values()), default=None),
                    guest_not_ended=len(ids - set(mine)))
        for k, cs in by_kind.items():
            ends = [c.st.ended_at - t_fault for c in cs if c.st.ended_at is not None]
            results[k].update(
                ends=count_by([c.st.end[:120] if c.st.end.startswith(("ws ", "error"))
                               else end_kind(c.st.end) for c in cs]),
                hung=sum(1 for c in cs if not c.st.end),
                end_after_fault_max_s=max(ends, default=None))
        await asyncio.sleep(0.5)
        metrics = _delta(before, _metrics(bed))
        tracebacks = bed.gw.traceback_lines()[:20]
        for r in results.values():
            r["metrics"] = metrics
            r["gateway_tracebacks"] = tracebacks
        return [results[k] for k in kinds]
    finally:
        sampler.stop()
        for cs in by_kind.values():
            for c in cs:
                c.close()
        if what == "link-cut":
            await asyncio.to_thread(bed.link, True)
        if what == "guest-killed" or (bed.guest.proc is not None
                                      and bed.guest.proc.poll() is not None):
            await asyncio.to_thread(bed.guest.start)
        # The next scenario starts on a path that works again (after a link cut the
        # host's neighbour entry of the guest is FAILED until ARP answers again).
        for k in ("proxy", "ws"):
            await wait_until_works(bed.paths, k, now() + RECOVER_BOUND)


def _wall(t_mono: float) -> float:
    """A monotonic time as Unix time (the guest reports Unix time)."""
    return time.time() - (now() - t_mono)


def _abort(c: AnyClient) -> None:
    """Reset the client's connection (RST, not FIN)."""
    transport = c.writer.transport if isinstance(c, TcpClient) and c.writer is not None \
        else (c.ws.transport if isinstance(c, WsClient) and c.ws is not None else None)
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    for t in c.tasks:
        t.cancel()
    transport.abort()


async def _flood_progress(bed: Bed) -> dict[str, Any]:
    """How much the flooding guest got out: from the sandbox's socket counters (ss)."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", bed.netns, "ss", "-Htni", "state", "established",
        "sport", "= :7000", stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    acked = []
    for token in out.decode().split():
        if token.startswith("bytes_acked:"):
            acked.append(int(token.split(":")[1]))
    return {"conns": len(acked), "bytes_acked_max": max(acked, default=None)}


async def _watch_kernel(bed: Bed, deadline: float) -> dict[str, Any]:
    """New connections to the kernel forward all through a restart (until 1 s after its
    ready line), one every :data:`WATCH_GAP` s: how many were refused (the rule missing).

    Plain connects in a thread: a rule missing for a few tens of milliseconds shows."""
    assert bed.paths is not None
    addr = bed.paths.kernel

    def watch() -> dict[str, Any]:
        tries, failed, last = 0, 0, ""
        while time.monotonic() < deadline:
            ready = bed.gw.ready_at
            if ready is not None and now() > ready + 1.0:
                break
            tries += 1
            try:
                with socket.create_connection(addr, timeout=1.0) as s:
                    s.sendall(f"probe watch-{tries}\n".encode())
            except OSError as exc:
                failed, last = failed + 1, f"{type(exc).__name__}: {exc}"
            time.sleep(WATCH_GAP)
        return {"tries": tries, "failed": failed, "last_error": last}

    return await asyncio.to_thread(watch)


async def link_flap(bed: Bed, kinds: tuple[str, ...], *, conns: int, down: float,
                    resume_bound: float = 15.0,
                    log: Callable[[str], None] = lambda _: None) -> list[dict[str, Any]]:
    """The guest link down for ``down`` s, then up: do live streams resume, losing nothing?
    One result per kind."""
    assert bed.paths is not None
    by_kind: dict[str, list[AnyClient]] = {}
    results: dict[str, dict[str, Any]] = {}
    try:
        for kind in kinds:
            by_kind[kind], errors = await open_all(bed.paths, kind, conns,
                                                   f"flap-{int(now() * 1000)}")
            results[kind] = {"kind": kind, "conns": len(by_kind[kind]),
                             "open_errors": errors[:5], "down_s": down}
        clients = [c for cs in by_kind.values() for c in cs]
        for c in clients:
            c.run()
        await asyncio.sleep(1.0)
        await asyncio.to_thread(bed.link, False)
        log(f"link flap: link down for {down:g} s")
        await asyncio.sleep(down)
        for c in clients:
            c.st.recv_marks["up"] = c.st.recv
        await asyncio.to_thread(bed.link, True)
        t_up = now()
        while now() < t_up + resume_bound and any(
                not c.st.end and c.st.recv == c.st.recv_marks["up"] for c in clients):
            await asyncio.sleep(0.05)
        resumed = now() - t_up
        ended_while_down = {k: count_by([end_kind(c.st.end) for c in cs if c.st.end])
                            for k, cs in by_kind.items()}
        await asyncio.gather(*(c.finish(FINISH_TIMEOUT) for c in clients))
        reports = await _guest_reports(bed, {c.st.id for c in clients}, now() + REPORT_WAIT)
        tracebacks = bed.gw.traceback_lines()[:20]
        for k, cs in by_kind.items():
            results[k].update(
                flowing_after_link_back=sum(1 for c in cs if c.st.recv > c.st.recv_marks["up"]),
                resumed_after_s=resumed, ended_while_down=ended_while_down[k],
                hung_after_link_back=sum(1 for c in cs if not c.st.end),
                final_ends=count_by([c.st.end for c in cs]),
                gateway_tracebacks=tracebacks, **_losses([c.st for c in cs], reports))
        return [results[k] for k in kinds]
    finally:
        for cs in by_kind.values():
            for c in cs:
                c.close()
        await asyncio.to_thread(bed.link, True)
