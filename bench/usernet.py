"""usernet next to pasta and slirp4netns: iperf3 through each, MTU 1500 and 65520.

Each peer serves a network namespace of its own through a TAP device (the user-mode
path: no veth, no bridge). iperf3 runs *inside* the namespace against an iperf3 server
on the host's loopback, reached through the peer's gateway address (each maps it to the
host's loopback), both ways (-R): the same path for all three, the TAP path of each.
Targets from the issue: usernet >= slirp4netns at MTU 65520, >= 0.5x it at 1500, here
required of each direction. usernet runs as sandport runs it, its TAP with offloads
(virtio-net headers: no checksums, TCP in 64 KiB segments whatever the MTU); usernet-plain
is the same stack with plain frames, every checksum computed (the QEMU transports' case).
Traffic goes only to the host's loopback; the namespaces use 10.201.252.0/24.

    sudo .venv/bin/python bench/usernet.py [--seconds 3]
        [--peers usernet,usernet-plain,pasta,slirp4netns]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import REPO, fmt, machine_info, ratio

NETNS = "sp-bench-un"
PEERS = ("usernet", "usernet-plain", "pasta", "slirp4netns")
MTUS = (1500, 65520)
HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(proc: subprocess.Popen[str], what: str, timeout: float = 20.0) -> None:
    """Wait for a "ready" line (usernet) or for the namespace to get its eth address."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {proc.stderr.read() if proc.stderr else ''}")
        out = subprocess.run(["ip", "-n", NETNS, "-4", "-o", "addr"], capture_output=True,
                             text=True, check=False).stdout
        if "10.201.252." in out:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not configure {NETNS} in {timeout:g} s")


def start_peer(peer: str, mtu: int, port: int) -> tuple[subprocess.Popen[str], str]:
    """The peer's process and the address the namespace reaches the host's loopback at."""
    ns_path = f"/run/netns/{NETNS}"
    if peer.startswith("usernet"):
        argv = [sys.executable, str(HERE / "usernet_serve.py"), NETNS, str(mtu), str(port),
                "plain" if peer == "usernet-plain" else "offload"]
        gateway = "10.201.252.1"
    elif peer == "pasta":
        argv = ["pasta", "-f", "--runas", "0", "--netns", ns_path, "--config-net",
                "-a", "10.201.252.2", "-n", "24", "-g", "10.201.252.1", "-m", str(mtu),
                "-I", "eth0", "-t", "none", "-u", "none", "-T", "none", "-U", "none"]
        gateway = "10.201.252.1"
    else:
        argv = ["slirp4netns", "--configure", "--mtu", str(mtu), "--cidr", "10.201.252.0/24",
                "--netns-type=path", ns_path, "eth0"]
        gateway = "10.201.252.2"
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_ready(proc, peer)
    if peer == "pasta":  # pasta announces the MTU via DHCP/NDP; set it on the link too
        subprocess.run(["ip", "-n", NETNS, "link", "set", "eth0", "mtu", str(mtu)], check=False)
    return proc, gateway


def iperf(gateway: str, port: int, seconds: float, reverse: bool) -> float | None:
    """Gb/s of one iperf3 run from inside the namespace (``reverse``: host -> guest)."""
    argv = ["ip", "netns", "exec", NETNS, "iperf3", "-c", gateway, "-p", str(port), "-t",
            str(seconds), "-J", *(["-R"] if reverse else [])]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False)
    try:
        doc = json.loads(r.stdout)
        return float(doc["end"]["sum_received"]["bits_per_second"]) / 1e9
    except (ValueError, KeyError):
        print(f"    iperf3 failed: {(r.stdout + r.stderr)[-300:]}", flush=True)
        return None


def run(peers: list[str], seconds: float) -> dict[str, dict[int, dict[str, float | None]]]:
    results: dict[str, dict[int, dict[str, float | None]]] = {}
    port = free_port()
    server = subprocess.Popen(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        for mtu in MTUS:
            for peer in peers:
                subprocess.run(["ip", "netns", "add", NETNS], check=True)
                proc = None
                try:
                    proc, gateway = start_peer(peer, mtu, port)
                    up = iperf(gateway, port, seconds, reverse=False)
                    down = iperf(gateway, port, seconds, reverse=True)
                    results.setdefault(peer, {})[mtu] = {"guest_to_host": up,
                                                         "host_to_guest": down}
                    print(f"  {peer:<13} MTU {mtu:>5}: guest->host {fmt(up, '6.2f')} Gb/s, "
                          f"host->guest {fmt(down, '6.2f')} Gb/s", flush=True)
                except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                    print(f"  {peer:<13} MTU {mtu:>5}: failed: {exc}", flush=True)
                    results.setdefault(peer, {})[mtu] = {"guest_to_host": None,
                                                         "host_to_guest": None}
                finally:
                    if proc is not None:
                        proc.send_signal(signal.SIGTERM)
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            proc.wait(5)
                        if proc.poll() is None:
                            proc.kill()
                            proc.wait()
                    for pid in subprocess.run(["ip", "netns", "pids", NETNS], text=True,
                                              capture_output=True, check=False).stdout.split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
                    subprocess.run(["ip", "netns", "del", NETNS], check=False)
    finally:
        server.kill()
        server.wait()
    return results


def main(argv: list[str] | None = None) -> int:
    """Run, print the table and the ratios, write bench/results/usernet-<time>.json."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--peers", default=",".join(PEERS))
    args = p.parse_args(argv)
    peers = [x for x in args.peers.split(",") if x]
    if os.geteuid() != 0:
        print("usernet bench: must run as root (namespaces, TAP)", file=sys.stderr)
        return 2
    missing = [t for t in ("iperf3", *(x for x in peers if not x.startswith("usernet")))
               if shutil.which(t) is None]
    if missing:
        print(f"usernet bench: missing {', '.join(missing)}: run `make setup` (apt-get "
              "install iperf3 passt slirp4netns)", file=sys.stderr)
        return 2
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True, check=False)
    print(f"usernet vs pasta vs slirp4netns: iperf3 {args.seconds:g} s each way, per MTU")
    results = run(peers, args.seconds)
    print("\nratios to slirp4netns, guest->host / host->guest (the target holds for each;"
          " it is usernet's, the others are for comparison):")
    summary: dict[str, dict[int, dict[str, object]]] = {}
    theirs = results.get("slirp4netns", {})
    for peer in (p for p in peers if p != "slirp4netns"):
        for mtu, target in ((65520, 1.0), (1500, 0.5)):
            ours = results.get(peer, {}).get(mtu, {})
            rs = [ratio(ours.get(d), theirs.get(mtu, {}).get(d))
                  for d in ("guest_to_host", "host_to_guest")]
            verdict = ""
            if peer == "usernet":
                verdict = "—" if None in rs else (
                    "PASS" if all(r is not None and r >= target for r in rs) else "MISS")
            summary.setdefault(peer, {})[mtu] = {"ratios": rs, "target": target,
                                                 "verdict": verdict}
            print(f"  {peer:<13} MTU {mtu:>5}: {fmt(rs[0], '.2f')}x / {fmt(rs[1], '.2f')}x"
                  + (f"  (target >= {target:g}x) {verdict}" if verdict else ""))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = REPO / "bench" / "results" / f"usernet-{stamp}.json"
    out.write_text(json.dumps({"results": results, "summary": summary,
                               "machine": machine_info(("sandport",))}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
