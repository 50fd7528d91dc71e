"""The bench's measurements: iperf3 throughput with CPU time, connection rate and latency."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

from testbed import Peer, host_cpu_seconds

IPERF_ATTEMPTS = 3
IPERF_GRACE = 20.0  # seconds beyond -t before the client is killed
CONNECT_TIMEOUT_MS = 3000
CONN_TIMEOUT = 2.0  # seconds for one connect+first-byte
CONN_WARMUP = 20
CONN_MAX_FAILURES = 50
GB = 1e9


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def iperf(peer: Peer, *, seconds: float, streams: int,
          restart_server: Callable[[], None]) -> dict[str, Any]:
    """One iperf3 run through ``peer``, with the CPU time it cost.

    Returns a dict with ``gbps`` (received), ``bytes``, ``retransmits``, ``fwd_cpu_s`` (the
    peer's processes; None without one), ``host_cpu_s`` (the whole host, /proc/stat), the
    per-GB figures, and ``error`` (None when it worked).
    """
    host, port = peer.iperf
    argv = ["iperf3", "-c", host, "-p", str(port), "-t", f"{seconds:g}", "-J",
            "--connect-timeout", str(CONNECT_TIMEOUT_MS)]
    if streams > 1:
        argv += ["-P", str(streams)]
    error = "no attempt"
    for attempt in range(1, IPERF_ATTEMPTS + 1):
        peer.settle()
        fwd0, host0 = peer.cpu_seconds(), host_cpu_seconds()
        try:
            r = subprocess.run(argv, capture_output=True, text=True, check=False,
                               timeout=seconds + IPERF_GRACE, start_new_session=True)
            out, err = r.stdout, r.stderr.strip()
        except subprocess.TimeoutExpired:
            out, err = "", f"iperf3 client did not finish in {seconds + IPERF_GRACE:g} s"
        peer.settle()
        fwd1, host1 = peer.cpu_seconds(), host_cpu_seconds()
        data: dict[str, Any]
        try:
            data = json.loads(out) if out.strip() else {"error": f"no output: {err}"}
        except ValueError:
            data = {"error": f"unparsable output: {out[:200]!r} {err}"}
        if "error" not in data:
            received = data["end"]["sum_received"]
            nbytes = int(received["bytes"])
            fwd = fwd1 - fwd0 if peer.procs else None
            host_cpu = host1 - host0
            return {
                "streams": streams,
                "gbps": received["bits_per_second"] / 1e9,
                "bytes": nbytes,
                "seconds": received["seconds"],
                "retransmits": data["end"].get("sum_sent", {}).get("retransmits"),
                "fwd_cpu_s": fwd,
                "host_cpu_s": host_cpu,
                "fwd_cpu_s_per_gb": fwd / (nbytes / GB) if fwd is not None and nbytes else None,
                "host_cpu_s_per_gb": host_cpu / (nbytes / GB) if nbytes else None,
                "attempts": attempt,
                "error": None,
            }
        error = str(data["error"])
        if "busy" in error or attempt == IPERF_ATTEMPTS - 1:
            restart_server()  # a server stuck "busy" does not recover by itself
        time.sleep(1.0)
    return {"streams": streams, "gbps": None, "bytes": 0, "error": error,
            "attempts": IPERF_ATTEMPTS}


def connections(addr: tuple[str, int], *, max_conns: int, max_seconds: float) -> dict[str, Any]:
    """Sequential connect + read one byte + close, bounded by count and time.

    Each sample is connect+first-byte latency (close not included); ``conns_per_s`` counts
    whole cycles (close included) over the measured time. The first :data:`CONN_WARMUP`
    cycles are not measured.
    """
    samples: list[float] = []
    failures: dict[str, int] = {}
    start = time.perf_counter()
    deadline = start + max_seconds
    measured_from = start
    for i in range(max_conns + CONN_WARMUP):
        if i == CONN_WARMUP:
            measured_from = time.perf_counter()
            deadline = measured_from + max_seconds
        elif i > CONN_WARMUP and time.perf_counter() >= deadline:
            break
        t0 = time.perf_counter()
        try:
            s = socket.create_connection(addr, timeout=CONN_TIMEOUT)
        except OSError as exc:
            key = type(exc).__name__
            failures[key] = failures.get(key, 0) + 1
        else:
            try:
                got = s.recv(1)
                t1 = time.perf_counter()
            except OSError as exc:
                got, t1 = b"", 0.0
                failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
            finally:
                s.close()
            if got:
                if i >= CONN_WARMUP:
                    samples.append((t1 - t0) * 1e3)
            elif t1:
                failures["no byte"] = failures.get("no byte", 0) + 1
        if sum(failures.values()) >= CONN_MAX_FAILURES:
            break
    elapsed = time.perf_counter() - measured_from
    n = len(samples)
    return {
        "count": n,
        "seconds": elapsed,
        "conns_per_s": n / elapsed if n and elapsed > 0 else None,
        "p50_ms": percentile(samples, 50) if n else None,
        "p99_ms": percentile(samples, 99) if n else None,
        "failures": failures,
        "samples_ms": [round(v, 3) for v in samples],
    }
