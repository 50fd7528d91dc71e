"""Network helpers shared by the tests: guest servers, clients and a "remote" host.

A remote host is a network namespace of the test's own on its own veth link to the host;
its packets reach the host through that link, as a LAN client's would through eth0.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import random
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import free_test_subnet
from sandport.net import nft
from sandport.sandbox.procs import NSEXEC

ECHO_SERVER = r"""
import socket, sys, threading
log = open(sys.argv[1], "a", buffering=1)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7)); s.listen(64)  # bound before "ready"
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 7))
def tcp():
    while True:
        c, peer = s.accept(); log.write(f"tcp {peer[0]}\n")
        def serve(c=c):
            while data := c.recv(65536): c.sendall(data)
            c.close()
        threading.Thread(target=serve, daemon=True).start()
def udp():
    while True:
        data, peer = u.recvfrom(65535); log.write(f"udp {peer[0]}\n"); u.sendto(data, peer)
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
tcp()
"""


def in_netns(netns: str, tmp: Path, code: str, *args: str, **kw: Any) -> Any:
    return subprocess.run([sys.executable, "-I", "-S", str(NSEXEC), netns, "/tmp", "--",
                           sys.executable, "-I", "-c", code, *args],
                          capture_output=True, text=True, timeout=30, check=False, **kw)


CLIENT = r"""
import socket, sys
host, port, proto = sys.argv[1], int(sys.argv[2]), sys.argv[3]
payload = b"x" * 5000 + proto.encode()
if proto == "tcp":
    s = socket.create_connection((host, port), timeout=5); s.sendall(payload); s.shutdown(1)
    got = b""
    while chunk := s.recv(65536): got += chunk
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
    s.sendto(payload, (host, port)); got = s.recvfrom(65535)[0]
print("OK" if got == payload else f"BAD {len(got)}")
"""


def client(netns: str | None, tmp: Path, host: str, port: int, proto: str) -> str:
    if netns is None:
        r = subprocess.run([sys.executable, "-I", "-c", CLIENT, host, str(port), proto],
                           capture_output=True, text=True, timeout=30, check=False)
    else:
        r = in_netns(netns, tmp, CLIENT, host, str(port), proto)
    return (r.stdout + r.stderr).strip()


#: Ports free_port() hands out lie below the kernel's ephemeral range
#: (``net.ipv4.ip_local_port_range``, 32768-60999 by default): a port picked here and bound
#: later (by a gateway the test starts) cannot be taken meanwhile by another test's
#: ``bind(0)`` or outgoing connection, which draw from that range. Each xdist worker has
#: its own span, so two workers never pick the same port either.
PORT_BASE = 20000
PORT_SPAN = 3000
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
_FIRST = PORT_BASE + (int(_WORKER) % 4 if _WORKER.isdigit() else 0) * PORT_SPAN
_picks = itertools.count(random.randrange(PORT_SPAN))


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port on 127.0.0.1 that nothing holds now, from this worker's own span."""
    for _ in range(PORT_SPAN):
        port = _FIRST + next(_picks) % PORT_SPAN
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    with socket.socket(socket.AF_INET, kind) as s:  # the whole span is taken: any port
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])



#: A guest server on TCP port 8 behind a PROXY protocol v1 sender: it answers with the
#: header line it read (the client address the guest sees), then echoes the rest.
PROXY_V1_SERVER = r"""
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8)); s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    def serve(c=c):
        f = c.makefile("rb")
        line = f.readline(108)
        c.sendall(line)
        c.close()
    threading.Thread(target=serve, daemon=True).start()
"""


@contextlib.contextmanager
def guest_server(netns: str, code: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """Run ``code`` with this interpreter inside ``netns`` until the block ends.

    The guest keeps the host's /tmp (bound onto itself): this interpreter may live under
    /tmp (a CI clone), and a private /tmp would hide it. ``code`` prints "ready" first.
    """
    proc = subprocess.Popen([sys.executable, "-I", "-S", str(NSEXEC), netns, "/tmp", "--",
                             sys.executable, "-I", "-c", code, *args],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait()


@dataclass(frozen=True, slots=True)
class RemoteHost:
    """A namespace ``netns`` at ``ip``, reaching this host at ``host_ip`` over ``link``."""

    netns: str
    link: str
    ip: str
    host_ip: str


@contextlib.contextmanager
def remote_host() -> Iterator[RemoteHost]:
    """A "remote" client host on its own /24 of the test pool; removed afterwards.

    The host side of its link does not forward by default: whoever serves remote clients
    (the gateway's kernel forwards) has to turn forwarding on for it.
    """
    net = free_test_subnet()
    tag = secrets.token_hex(3)
    netns, link = f"sp-{tag}r", f"sp-{tag}-r"
    host_if = ipaddress.IPv4Interface(f"{net.network_address + 1}/24")
    remote_if = ipaddress.IPv4Interface(f"{host_if.ip + 1}/24")
    try:
        subprocess.run(["ip", "netns", "add", netns], check=True)
        subprocess.run(["ip", "link", "add", link, "type", "veth", "peer", "name", "eth0",
                        "netns", netns], check=True)
        subprocess.run(["ip", "addr", "add", str(host_if), "dev", link], check=True)
        subprocess.run(["ip", "link", "set", link, "up"], check=True)
        for cmd in (["addr", "add", str(remote_if), "dev", "eth0"],
                    ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"],
                    ["route", "add", "default", "via", str(host_if.ip)]):
            subprocess.run(["ip", "-n", netns, *cmd], check=True)
        yield RemoteHost(netns=netns, link=link, ip=str(remote_if.ip),
                         host_ip=str(host_if.ip))
    finally:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)


@contextlib.contextmanager
def echo_guest(tmp: Path) -> Iterator[RemoteHost]:
    """A "guest" namespace with :data:`ECHO_SERVER` on port 7 (TCP and UDP)."""
    with remote_host() as r, guest_server(r.netns, ECHO_SERVER, str(tmp / "echo.log")):
        yield r


def run_in_netns(netns: str, code: str, *args: str) -> str:
    """Run ``code`` in ``netns`` and return its stdout and stderr, stripped."""
    r = in_netns(netns, Path("/tmp"), code, *args)
    return (r.stdout + r.stderr).strip()


def expected_guard_rules(bridge: str) -> list[tuple[str, str]]:
    """(chain, comment) of a gateway's host isolation, in order (no forwards)."""
    inc, fwd = nft.guard_chain_names(bridge)
    return [(inc, "sandport guard: replies to connections the host opened"),
            (inc, "sandport guard: guest agents"),
            (inc, "sandport guard: guests ping their gateway"),
            (inc, nft.localnet_comment(bridge)), (inc, nft.host_comment(bridge)),
            (inc, nft.GUARD_COMMENTS["elsewhere"]), (fwd, ""),
            (fwd, nft.GUARD_COMMENTS["routed_from"]),
            (fwd, "sandport guard: kernel forwards"), (fwd, nft.GUARD_COMMENTS["routed_into"])]
