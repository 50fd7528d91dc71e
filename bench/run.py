"""`make bench`: the port-forward data plane next to its peers, in one interleaved run.

Peers (each reaches the same guest services in a fresh namespace ``sp-bench-<hex>``):

    direct   the client connects to the guest address itself (no forwarder; the baseline)
    kernel   sandport's kernel forward: nftables DNAT (sandport.net.nft) on 127.0.0.1
    proxy    sandport's userspace relay (TcpForward, uvloop) in its own process
    socat    socat TCP-LISTEN,fork
    pasta    pasta -t, spliced into the namespace (if it runs)

Per round, for each peer in turn (A B C … A B C …): iperf3 with 1 stream, with 8 streams,
then sequential connect + first byte + close. Figures are medians over rounds. Prints a
table and ratio lines against the targets, writes every sample to
``bench/results/forward-<UTC timestamp>.json``. Not a test: a missed target is reported,
not an error. Needs root (namespaces, nftables).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import measure
import report
import testbed
from report import fmt, median, ratio
from testbed import progress

ALL_PEERS = ("direct", "kernel", "proxy", "socat", "pasta")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REQUIRED_TOOLS = ("ip", "nft", "iperf3")

# Targets from the issue: (label, value key, comparison, bound, unit)
TARGET_PROXY_KERNEL = 0.9
TARGET_PROXY_SOCAT = 4.0
TARGET_KERNEL_DIRECT = 0.95
TARGET_ADDED_P99_MS = 1.0
#: Issue 18: the relay's sequential connections at least as fast as pasta's (C).
TARGET_PROXY_PASTA_CONNS = 1.0
WARMUP_SECONDS = 1.0
WARMUP_CONNS = 300


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; ``--quick`` fills in what was not given explicitly."""
    ap = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Port-forward benchmark: direct vs sandport kernel (nft DNAT) vs sandport "
                    "proxy vs socat vs pasta, interleaved rounds, medians, ratios against the "
                    "targets. Writes JSON to bench/results/. Run as root.",
        epilog="Prints a table (Gb/s with 1 and 8 streams, conn/s, p50/p99 connect+first-byte "
               "latency, added p99 vs direct, CPU-s/GB) and ratio lines marked PASS/MISS "
               "against the issue's targets. Progress goes to stderr. Leftovers of a crashed "
               "run (sp-bench-* namespaces, links, nft chains, processes) are removed first.")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds (A B C … per round); default 5, --quick 1")
    ap.add_argument("--seconds", type=float, default=None,
                    help="duration of each iperf3 run; default 3, --quick 1")
    ap.add_argument("--peers", default=",".join(ALL_PEERS),
                    help="comma-separated subset of the peers (default: %(default)s)")
    ap.add_argument("--quick", action="store_true",
                    help="fast sanity run: 1 round, 1 s iperf3 runs, 0.5 s connection test")
    ap.add_argument("--conn-seconds", type=float, default=None,
                    help="time bound of the connection test per peer and round; "
                         "default 2, --quick 0.5")
    ap.add_argument("--conn-max", type=int, default=2000,
                    help="count bound of the connection test per peer and round "
                         "(default: %(default)s)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR,
                    help="where the JSON result goes (default: bench/results)")
    args = ap.parse_args(argv)
    args.rounds = args.rounds if args.rounds is not None else (1 if args.quick else 5)
    args.seconds = args.seconds if args.seconds is not None else (1.0 if args.quick else 3.0)
    if args.conn_seconds is None:
        args.conn_seconds = 0.5 if args.quick else 2.0
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in ALL_PEERS]
    if unknown or not peers:
        ap.error(f"--peers: unknown {unknown}; choose from {','.join(ALL_PEERS)}")
    args.peers = [p for p in ALL_PEERS if p in peers]  # canonical order
    if args.rounds < 1 or args.seconds <= 0 or args.conn_seconds <= 0 or args.conn_max < 1:
        ap.error("--rounds, --seconds, --conn-seconds and --conn-max must be positive")
    return args


# -- summary -----------------------------------------------------------------------------------


def _paired_diff(a: list[float | None], b: list[float | None]) -> list[float | None]:
    """Per-round differences a - b (None where either is missing)."""
    return [x - y if x is not None and y is not None else None
            for x, y in zip(a, b, strict=True)]


def _combined_per_gb(rnd: dict[str, Any], key: str) -> float | None:
    """CPU seconds per GB over the round's 1- and 8-stream runs together."""
    runs: list[dict[str, Any]] = [
        r for r in (rnd.get("iperf1"), rnd.get("iperf8"))
        if r and r.get("error") is None and r.get(key) is not None]
    nbytes = sum(r["bytes"] for r in runs)
    return sum(r[key] for r in runs) / (nbytes / 1e9) if runs and nbytes else None


def summarize(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Medians per peer; paired per-round differences against direct where it ran."""
    direct = rounds.get("direct")
    out: dict[str, dict[str, Any]] = {}
    for name, rs in rounds.items():
        def pick(test: str, key: str, rs: list[dict[str, Any]] = rs) -> list[float | None]:
            return [(r.get(test) or {}).get(key) for r in rs]

        host_gb = [_combined_per_gb(r, "host_cpu_s") for r in rs]
        summary: dict[str, Any] = {
            "gbps_1": median(pick("iperf1", "gbps")),
            "gbps_8": median(pick("iperf8", "gbps")),
            "conns_per_s": median(pick("conn", "conns_per_s")),
            "p50_ms": median(pick("conn", "p50_ms")),
            "p99_ms": median(pick("conn", "p99_ms")),
            "fwd_cpu_s_per_gb": median([_combined_per_gb(r, "fwd_cpu_s") for r in rs]),
            "host_cpu_s_per_gb": median(host_gb),
            "added_p99_ms": None,
            "extra_host_cpu_s_per_gb_vs_direct": None,
        }
        if direct is not None and name != "direct":
            d_p99 = [(r.get("conn") or {}).get("p99_ms") for r in direct]
            p99 = pick("conn", "p99_ms")
            summary["added_p99_ms"] = median(_paired_diff(p99, d_p99))
            d_gb = [_combined_per_gb(r, "host_cpu_s") for r in direct]
            summary["extra_host_cpu_s_per_gb_vs_direct"] = median(_paired_diff(host_gb, d_gb))
        out[name] = summary
    return out


def ratios(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The ratio lines of the issue, each with its target and PASS/MISS (None: not measured)."""
    def get(peer: str, key: str) -> float | None:
        value: float | None = summary.get(peer, {}).get(key)
        return value

    lines = [
        ("proxy / kernel, 1 stream", ratio(get("proxy", "gbps_1"), get("kernel", "gbps_1")),
         ">=", TARGET_PROXY_KERNEL, "x"),
        ("proxy / socat, 1 stream", ratio(get("proxy", "gbps_1"), get("socat", "gbps_1")),
         ">=", TARGET_PROXY_SOCAT, "x"),
        ("kernel / direct, 1 stream", ratio(get("kernel", "gbps_1"), get("direct", "gbps_1")),
         ">=", TARGET_KERNEL_DIRECT, "x"),
        ("added p99, proxy", get("proxy", "added_p99_ms"), "<=", TARGET_ADDED_P99_MS, "ms"),
        ("added p99, kernel", get("kernel", "added_p99_ms"), "<=", TARGET_ADDED_P99_MS, "ms"),
        ("proxy / pasta, conn/s", ratio(get("proxy", "conns_per_s"),
                                        get("pasta", "conns_per_s")),
         ">=", TARGET_PROXY_PASTA_CONNS, "x"),
    ]
    info = [
        ("proxy / kernel, 8 streams", ratio(get("proxy", "gbps_8"), get("kernel", "gbps_8"))),
        ("proxy / socat, 8 streams", ratio(get("proxy", "gbps_8"), get("socat", "gbps_8"))),
        ("kernel / direct, 8 streams", ratio(get("kernel", "gbps_8"), get("direct", "gbps_8"))),
        ("proxy / pasta, 1 stream", ratio(get("proxy", "gbps_1"), get("pasta", "gbps_1"))),
    ]
    out = []
    for label, value, op, bound, unit in lines:
        verdict = None
        if value is not None:
            ok = value >= bound if op == ">=" else value <= bound
            verdict = "PASS" if ok else "MISS"
        target = f"{op} {bound:g}{unit}" if unit == "x" else f"{op} {bound:g} {unit}"
        out.append({"what": label, "value": value, "target": target,
                    "unit": unit, "verdict": verdict})
    for label, value in info:
        out.append({"what": label, "value": value, "target": None, "unit": "x",
                    "verdict": None})
    return out


def render(summary: dict[str, dict[str, Any]], skipped: dict[str, str],
           ratio_lines: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The table and the ratio lines, as printed."""
    head = ("peer", "1-stream Gb/s", "8-stream Gb/s", "conn/s", "p50 ms", "p99 ms",
            "+p99 ms", "fwd CPU-s/GB", "host CPU-s/GB")
    rows = [head]
    for name in args.peers:
        if name not in summary:
            continue
        s = summary[name]
        fwd = s["fwd_cpu_s_per_gb"]
        fwd_text = fmt(fwd, ".3f")
        if name == "kernel":  # no process to measure: the softirq work shows up host-wide
            fwd_text = fmt(s["extra_host_cpu_s_per_gb_vs_direct"], "+.3f") + "*"
        rows.append((name, fmt(s["gbps_1"], ".2f"), fmt(s["gbps_8"], ".2f"),
                     fmt(s["conns_per_s"], ".0f"), fmt(s["p50_ms"], ".3f"),
                     fmt(s["p99_ms"], ".3f"),
                     "—" if name == "direct" else fmt(s["added_p99_ms"], "+.3f"),
                     fwd_text, fmt(s["host_cpu_s_per_gb"], ".3f")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"port-forward bench: {args.rounds} round(s), iperf3 {args.seconds:g} s, "
             f"connection test ≤{args.conn_max} or {args.conn_seconds:g} s; medians", ""]
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w)
                               for j, (c, w) in enumerate(zip(row, widths, strict=True))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("fwd CPU-s/GB: CPU time of the forwarder process tree per GB moved "
                 "(1 + 8 streams); direct has none.")
    if "kernel" in summary:
        lines.append("  * kernel: extra host CPU vs direct (DNAT work runs in softirq, not in "
                     "a process): host CPU-s/GB minus direct's, same round.")
    lines.append("host CPU-s/GB: busy CPU of the whole host (/proc/stat) per GB, iperf3 client "
                 "and server included; comparable across peers.")
    lines.append("+p99: p99 connect+first-byte latency minus direct's, paired per round.")
    for name, reason in skipped.items():
        lines.append(f"{name}: did not run: {reason}")
    lines.append("")
    width = max(len(r["what"]) for r in ratio_lines)
    for r in ratio_lines:
        if r["unit"] == "ms":
            value = fmt(r["value"], "+.3f") + " ms"
        else:
            value = fmt(r["value"], ".2f") + ("x" if r["value"] is not None else "")
        target = f"(target {r['target']})" if r["target"] else "(info)"
        verdict = r["verdict"] or ("n/a" if r["target"] else "")
        lines.append(f"{r['what'].ljust(width)}  {value:>11}  {target:<20} {verdict}".rstrip())
    return "\n".join(lines)


# -- machine ---------------------------------------------------------------------------------


# -- run -------------------------------------------------------------------------------------


def measure_round(tb: testbed.Testbed, peer: testbed.Peer, args: argparse.Namespace,
                  label: str) -> dict[str, Any]:
    """One peer's share of one round: iperf3 1 stream, 8 streams, connection test."""
    rnd: dict[str, Any] = {}
    for streams in (1, 8):
        res = measure.iperf(peer, seconds=args.seconds, streams=streams,
                            restart_server=tb.restart_iperf_server)
        rnd[f"iperf{streams}"] = res
        if res["error"]:
            progress(f"{label} {peer.name}: iperf3 -P {streams}: ERROR {res['error']}")
        else:
            fwd = res["fwd_cpu_s_per_gb"]
            progress(f"{label} {peer.name}: iperf3 -P {streams}: {res['gbps']:.2f} Gb/s, "
                     f"host {res['host_cpu_s_per_gb']:.3f} CPU-s/GB"
                     + (f", forwarder {fwd:.3f} CPU-s/GB" if fwd is not None else ""))
    conn = measure.connections(peer.byte, max_conns=args.conn_max,
                               max_seconds=args.conn_seconds)
    rnd["conn"] = conn
    if conn["count"]:
        progress(f"{label} {peer.name}: {conn['count']} connections, "
                 f"{conn['conns_per_s']:.0f}/s, p50 {conn['p50_ms']:.3f} ms, "
                 f"p99 {conn['p99_ms']:.3f} ms"
                 + (f", failures {conn['failures']}" if conn["failures"] else ""))
    else:
        progress(f"{label} {peer.name}: connection test failed: {conn['failures']}")
    return rnd


def warm_up(tb: testbed.Testbed, peer: testbed.Peer) -> dict[str, Any]:
    """A short uncounted pass through ``peer``: 1 s of iperf3, a few hundred connections."""
    progress(f"warm-up {peer.name} ...")
    res = measure.iperf(peer, seconds=WARMUP_SECONDS, streams=1,
                        restart_server=tb.restart_iperf_server)
    conn = measure.connections(peer.byte, max_conns=WARMUP_CONNS, max_seconds=WARMUP_SECONDS)
    return {"gbps": res["gbps"], "error": res["error"], "conns": conn["count"]}


def run(args: argparse.Namespace) -> int:
    """Build the testbed, measure, report; always tear down."""
    started = dt.datetime.now(dt.UTC)
    machine = report.machine_info(
                ("uvloop", "sandport"), iperf3=report.first_line(["iperf3", "--version"]),
                socat=report.package_version("socat"), passt=report.package_version("passt"))
    rounds: dict[str, list[dict[str, Any]]] = {}
    skipped: dict[str, str] = {}
    paths: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix=testbed.LOGDIR_PREFIX) as tmp:
        tb = testbed.Testbed(Path(tmp), progress)

        def body() -> Path | int:
            testbed.cleanup_leftovers(progress)
            tb.create()
            peers = []
            for name in args.peers:
                missing = {"socat": "socat", "pasta": "pasta"}.get(name)
                if missing and shutil.which(missing) is None:
                    skipped[name] = f"{missing} is not installed (apt-get install " \
                                    f"{'passt' if name == 'pasta' else name})"
                    progress(f"{name}: did not run: {skipped[name]}")
                    continue
                try:
                    peer = tb.start_peer(name)
                except Exception as exc:  # a peer that cannot start is reported, not fatal
                    skipped[name] = f"{type(exc).__name__}: {exc}"
                    progress(f"{name}: did not run: {skipped[name]}")
                    continue
                progress(f"{name}: ready ({peer.path})")
                peers.append(peer)
                paths[name] = peer.path
                rounds[name] = []
            if not peers:
                progress("no peer could start; nothing to measure")
                return 1
            # Warm-up (not counted): first connections, page cache, conntrack, CPU clocks.
            warmup: dict[str, Any] = {}
            for peer in peers:
                warmup[peer.name] = warm_up(tb, peer)
            for i in range(1, args.rounds + 1):
                for peer in peers:
                    label = f"round {i}/{args.rounds}"
                    progress(f"{label} {peer.name} ...")
                    rounds[peer.name].append(measure_round(tb, peer, args, label))
            summary = summarize(rounds)
            ratio_lines = ratios(summary)
            print(render(summary, skipped, ratio_lines, args), flush=True)
            result = {
                "bench": "forward",
                "timestamp": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "duration_s": round(testbed.elapsed(), 1),
                "config": {"rounds": args.rounds, "seconds": args.seconds,
                           "peers": args.peers, "conn_max": args.conn_max,
                           "conn_seconds": args.conn_seconds, "quick": args.quick,
                           "subnet": str(tb.subnet), "namespace": tb.ns},
                "machine": machine,
                "paths": paths,
                "skipped": skipped,
                "median": summary,
                "ratios": ratio_lines,
                "rounds": rounds,
                "warmup": warmup,
                "notes": [
                    "gbps: iperf3 -J end.sum_received.bits_per_second",
                    "fwd_cpu_s: utime+stime(+cutime+cstime) of the forwarder process tree",
                    "kernel has no forwarder process: see extra_host_cpu_s_per_gb_vs_direct",
                    "host_cpu_s: /proc/stat busy time of all CPUs, other load included",
                    "p50/p99: connect + first byte, sequential connections, warm-up excluded",
                    "pasta serves 127.0.0.1 through its spliced path into the namespace's "
                    "loopback, not through the veth",
                ],
            }
            args.out_dir.mkdir(parents=True, exist_ok=True)
            result_path: Path = args.out_dir / f"forward-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
            result_path.write_text(report.to_json(result))
            return result_path

        return testbed.finish(body, tb.teardown)


def main(argv: list[str] | None = None) -> int:
    """Entry point: arguments, root and tool checks, signal handlers, run."""
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: must run as root (it creates a network namespace, a veth pair and "
              "nftables rules): sudo make bench", file=sys.stderr)
        return 2
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        print(f"bench: missing {', '.join(missing)}: run `make setup` (or apt-get install "
              "iproute2 nftables iperf3)", file=sys.stderr)
        return 2
    testbed.interrupt_on_signals()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
