"""usernet against a real kernel: a namespace whose eth0 is a TAP device served by usernet.

busybox ``udhcpc`` inside the namespace gets its lease (address, router, DNS, MTU) from
usernet's DHCP server, and the namespace's kernel then pings the gateway address, which
only usernet answers (ARP and ICMP echo). No bridge, no veth, no host route: every frame
goes through the stack. Traffic stays inside the test's own namespace.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import eventually_sync, record, require_programs, require_root, vm_slot
from nethelpers import ECHO_SERVER, guest_server
from sandport.forward.spec import parse_port_spec
from sandport.usernet.link import LinkConfig, LinkServices
from sandport.usernet.tap import TapTransport, tap_into_netns
from sandport.usernet.udp import UdpNat

pytestmark = pytest.mark.integration

NETWORK = ipaddress.IPv4Network("10.201.240.0/24")
GATEWAY = ipaddress.IPv4Address("10.201.240.1")
GUEST = ipaddress.IPv4Address("10.201.240.15")
GATEWAY_MAC = bytes.fromhex("52540000ff01")

# udhcpc runs this on each event; it applies the lease and records what it was given.
LEASE_SCRIPT = """#!/bin/sh
case "$1" in
  deconfig) ip -4 addr flush dev "$interface"; ip link set "$interface" up ;;
  bound|renew)
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
    for r in $router; do ip route add default via "$r" dev "$interface"; break; done
    echo "ip=$ip mask=$mask router=$router dns=$dns mtu=$mtu lease=$lease serverid=$serverid" \\
      > "$LEASE_OUT" ;;
esac
exit 0
"""


class DnsServer:
    """A DNS server on 127.0.0.1 that answers every A query with ANSWER (a thread)."""

    ANSWER = ipaddress.IPv4Address("10.201.240.99")

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.questions: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                query, peer = self.sock.recvfrom(512)
            except OSError:
                continue
            end = 12
            while query[end]:
                end += 1 + query[end]
            question = query[12:end + 5]  # name, type, class
            self.questions.append(question)
            answer = (b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + self.ANSWER.packed
                      if question[-4:-2] == b"\x00\x01" else b"")
            header = query[:2] + struct.pack("!HHHHH", 0x8180, 1, 1 if answer else 0, 0, 0)
            self.sock.sendto(header + question + answer, peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    server = DnsServer()
    yield server
    server.close()


@pytest.fixture
def served_netns(loop_thread: Any, dns: DnsServer
                 ) -> Iterator[tuple[str, LinkServices, TapTransport, UdpNat]]:
    require_root()
    require_programs("busybox")
    tag = secrets.token_hex(3)
    netns = f"sp-u{tag}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    transport: TapTransport | None = None
    try:
        fd = tap_into_netns(f"sp-u{tag}-t", netns, offload=False)  # plain frames
        link = LinkServices(LinkConfig(gateway_ip=GATEWAY, gateway_mac=GATEWAY_MAC,
                                       network=NETWORK, guest_ip=GUEST, mtu=65520))
        transport = TapTransport(
            fd, lambda frames: [r for f in frames for r in link.handle(f)])
        nat = UdpNat(link, transport.send, dns_upstream=("127.0.0.1", dns.port))

        async def start() -> None:
            assert transport is not None
            transport.start()

        loop_thread.run(start())
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        yield netns, link, transport, nat
    finally:
        if transport is not None:
            t = transport

            async def stop() -> None:
                nat.close()
                t.close()

            loop_thread.run(stop())
        subprocess.run(["ip", "netns", "del", netns], check=False)


def lease(netns: str, tmp_path: Path) -> dict[str, str]:
    """Run busybox udhcpc in ``netns`` against usernet; what the lease said."""
    script = tmp_path / "lease.sh"
    script.write_text(LEASE_SCRIPT)
    script.chmod(0o755)
    out = tmp_path / "lease.txt"
    r = subprocess.run(["ip", "netns", "exec", netns, "busybox", "udhcpc", "-i", "eth0",
                        "-f", "-q", "-n", "-t", "5", "-T", "1", "-s", str(script),
                        "-O", "mtu"],
                       env={**os.environ, "LEASE_OUT": str(out)}, capture_output=True,
                       text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return dict(kv.split("=", 1) for kv in out.read_text().split())


def test_udhcpc_gets_its_lease_from_usernet_and_pings_the_gateway(
        served_netns: Any, tmp_path: Path) -> None:
    netns, link, transport, _ = served_netns
    got = lease(netns, tmp_path)
    assert got["ip"] == str(GUEST) and got["router"] == str(GATEWAY)
    assert got["mask"] == "24" and got["dns"] == str(GATEWAY)
    assert got["mtu"] == "65520" and got["serverid"] == str(GATEWAY)
    addrs = subprocess.run(["ip", "-n", netns, "-4", "-o", "addr", "show", "eth0"],
                           capture_output=True, text=True, check=True).stdout
    assert f"inet {GUEST}/24" in addrs
    # The namespace's kernel ARPs for the gateway and pings it: only usernet answers.
    ping = subprocess.run(["ip", "netns", "exec", netns, "busybox", "ping", "-c", "3",
                           "-W", "2", str(GATEWAY)], capture_output=True, text=True,
                          timeout=30, check=False)
    assert ping.returncode == 0 and "3 packets received" in ping.stdout, ping.stdout
    assert link.handled["dhcp_offer"] >= 1 and link.handled["dhcp_ack"] == 1
    assert link.handled["arp_reply"] >= 1 and link.handled["icmp_echo_reply"] == 3
    assert link.guest_mac is not None and transport.frames_in >= 5
    assert not transport.errors


def test_dns_through_the_forwarder_and_udp_echo_through_a_forward(
        served_netns: Any, tmp_path: Path, dns: DnsServer, loop_thread: Any) -> None:
    netns, _, _, nat = served_netns
    lease(netns, tmp_path)
    # DNS: the guest asks the gateway; usernet forwards to the test's server on loopback.
    r = subprocess.run(["ip", "netns", "exec", netns, "busybox", "nslookup",
                        "echo.sandport.test", str(GATEWAY)], capture_output=True, text=True,
                       timeout=30, check=False)
    assert f"Address: {DnsServer.ANSWER}" in r.stdout, (r.stdout, nat.dropped, nat.relayed)
    assert any(b"\x04echo\x08sandport\x04test" in q for q in dns.questions)
    # An inbound UDP forward: host client -> 127.0.0.1:port -> usernet -> guest :7 -> back.
    port = loop_thread.run(nat.add_forward("127.0.0.1", 0, 7))
    log = tmp_path / "echo.log"
    with guest_server(netns, ECHO_SERVER, str(log)):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(2)
            for n in range(3):
                payload = f"datagram {n} ".encode() * 50
                u.sendto(payload, ("127.0.0.1", port))
                assert u.recv(65536) == payload
        # The guest saw the loopback client as the gateway address (it cannot answer
        # 127.0.0.1).
        assert log.read_text().splitlines()[0] == f"udp {GATEWAY}"
    # Egress is denied by default: the gateway's port 9 (host loopback) is not allowed.
    sent = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c",
                           "import socket, sys; socket.socket(socket.AF_INET, "
                           "socket.SOCK_DGRAM).sendto(b'x', (sys.argv[1], 9))", str(GATEWAY)],
                          capture_output=True, text=True, timeout=10, check=False)
    assert sent.returncode == 0, sent.stderr
    deadline = time.monotonic() + 3
    while not nat.dropped["udp_egress_denied"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert nat.dropped["udp_egress_denied"] == 1
    assert nat.relayed["to_guest"] >= 4 and nat.relayed["to_client"] == 3


@pytest.mark.vm
@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_a_qemu_guest_on_usernet_gets_a_lease_and_echoes_tcp_and_udp(
        loop_thread: Any, tmp_path: Path, kind: str) -> None:
    """The echo image on ``-netdev stream`` or ``-netdev dgram`` (no TAP, no bridge): its
    init's udhcpc gets the lease from usernet, and host clients reach its TCP and UDP
    echo through usernet's inbound forwards."""
    require_programs("qemu-system-x86_64")
    from sandport.sandbox import images
    from sandport.sandbox.qemu import host_khz
    from sandport.usernet.stack import Usernet
    from sandport.usernet.stream import (
        DgramTransport,
        StreamTransport,
        bind_dgram,
        listen_stream,
    )

    network = ipaddress.IPv4Network("10.201.241.0/24")
    gateway, guest = network.network_address + 1, network.network_address + 20
    image = images.find_image("echo") or images.build_image("echo")
    sock, theirs = tmp_path / "net.sock", tmp_path / "qemu.sock"
    stream: StreamTransport | DgramTransport = StreamTransport() if kind == "stream" \
        else DgramTransport(theirs)
    net = Usernet.on(stream, LinkConfig(gateway_ip=gateway, gateway_mac=GATEWAY_MAC,
                                        network=network, guest_ip=guest))
    assert net.link.config.mtu == 1500  # the default on QEMU's sockets
    link, nat = net.link, net.udp
    server = loop_thread.run(listen_stream(sock, stream)) \
        if isinstance(stream, StreamTransport) else None
    if isinstance(stream, DgramTransport):
        loop_thread.run(bind_dgram(sock, stream))
    netdev = f"stream,id=n0,server=off,addr.type=unix,addr.path={sock}" if kind == "stream" \
        else (f"dgram,id=n0,local.type=unix,local.path={theirs},"
              f"remote.type=unix,remote.path={sock}")
    port = loop_thread.run(net.add_forward("udp", "127.0.0.1", 0, 7))
    (tcp_mapping,) = parse_port_spec("127.0.0.1:0:7")  # the -p syntax
    tcp_port = loop_thread.run(net.publish(tcp_mapping))
    seed = images.seed_archive({images.SEED_ENV: (
        images.seed_env({"SANDPORT_SANDBOX_ID": "usernet1"}), 0o600)})
    initrd = tmp_path / "initrd.cpio"
    images.write_initrd(image, seed, initrd)
    serial = tmp_path / "serial.log"
    try:
        with vm_slot():
            qemu = subprocess.Popen([
                "qemu-system-x86_64", "-M", "microvm", "-accel", "tcg", "-m", "256",
                "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
                "-no-reboot", "-kernel", str(image.kernel), "-initrd", str(initrd),
                "-append", f"{images.KERNEL_CMDLINE} tsc_early_khz={host_khz()} ip=dhcp",
                "-serial", f"file:{serial}",
                "-netdev", netdev,
                "-device", "virtio-net-device,netdev=n0,mac=52:54:00:12:34:56",
            ], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE)  # fmt: skip
            try:
                deadline = time.monotonic() + 60
                text = ""
                while "services echo started" not in text and time.monotonic() < deadline:
                    assert qemu.poll() is None, qemu.communicate()[1]
                    time.sleep(0.1)
                    text = serial.read_text(errors="replace") if serial.exists() else ""
                assert f"SANDPORT-GUEST net eth0 {guest}/24 gw {gateway}" in text, text[-2000:]
                assert link.handled["dhcp_ack"] == 1 and stream.frames_in > 0
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    u.settimeout(1)
                    got = b""
                    for _ in range(10):
                        u.sendto(b"through usernet", ("127.0.0.1", port))
                        with contextlib.suppress(OSError):
                            got = u.recv(100)
                            break
                assert got == b"through usernet", (nat.dropped, nat.relayed, link.dropped)
                payload = os.urandom(300_000)  # many MSS-sized segments at MTU 1500
                assert _echo(tcp_port, payload) == payload, net.tcp.counters
            finally:
                qemu.kill()
                qemu.wait(10)
    finally:

        async def stop() -> None:
            net.close()
            if server is not None:
                server.close()
            if isinstance(stream, DgramTransport) and stream.transport is not None:
                stream.transport.close()

        loop_thread.run(stop())


@pytest.fixture(params=["offload", "plain"])
def stack_netns(request: pytest.FixtureRequest, loop_thread: Any, dns: DnsServer
                ) -> Iterator[tuple[str, Any, Any]]:
    """A namespace served by the whole stack (Usernet) on a TAP, its lease taken; a TCP
    service of the test's own on the host's loopback, allowed as egress. ``offload``: the
    TAP has virtio-net headers (partial checksums, 64 KiB TCP segments both ways);
    ``plain``: every frame whole, every checksum computed and verified."""
    require_root()
    require_programs("busybox")
    from sandport.usernet.egress import EgressRule
    from sandport.usernet.stack import Usernet

    host_service = socket.socket()
    host_service.bind(("127.0.0.1", 0))
    host_service.listen()
    service_port = host_service.getsockname()[1]
    tag = secrets.token_hex(3)
    netns = f"sp-u{tag}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    holder: dict[str, Any] = {}
    try:
        fd = tap_into_netns(f"sp-u{tag}-t", netns, offload=request.param == "offload")
        transport = TapTransport(fd)
        net = Usernet.on(transport, LinkConfig(gateway_ip=GATEWAY, gateway_mac=GATEWAY_MAC,
                                               network=NETWORK, guest_ip=GUEST),
                         dns_upstream=("127.0.0.1", dns.port),
                         egress=(EgressRule(network=ipaddress.IPv4Network("127.0.0.1/32"),
                                            port=service_port),))
        holder.update(net=net, transport=transport)

        async def start() -> None:
            transport.start()

        loop_thread.run(start())
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        yield netns, net, (host_service, service_port)
    finally:
        if "transport" in holder:
            async def stop() -> None:
                holder["net"].close()
                holder["transport"].close()

            loop_thread.run(stop())
        subprocess.run(["ip", "netns", "del", netns], check=False)
        host_service.close()


def _echo(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := c.recv(65536):
            got += chunk
        return got


def test_tcp_through_usernet_forwards_and_outbound(stack_netns: Any, tmp_path: Path,
                                                    loop_thread: Any) -> None:
    import hashlib

    netns, net, (host_service, service_port) = stack_netns
    assert lease(netns, tmp_path)["mtu"] == "65520"  # the default on a TAP
    port = loop_thread.run(net.add_forward("tcp", "127.0.0.1", 0, 7))
    log = tmp_path / "echo.log"
    with guest_server(netns, ECHO_SERVER, str(log)):
        # A round trip, then three at once, each with its own data.
        assert _echo(port, b"hello usernet\n") == b"hello usernet\n"
        results: dict[int, bytes] = {}
        payloads = {n: os.urandom(200_000 + n) for n in range(3)}
        threads = [threading.Thread(target=lambda n=n: results.__setitem__(
            n, _echo(port, payloads[n]))) for n in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == payloads
        # Each ended both ways (the host's FIN first, then the guest's): none is left.
        eventually_sync(lambda: not net.tcp.flows)
        assert net.tcp.counters["closed"] == 4 and not net.tcp.counters["retransmits"]
        # 256 MiB each way on one connection, checked with sha256 both ways.
        size, chunk = 256 << 20, os.urandom(1 << 20)
        sent, got = hashlib.sha256(), hashlib.sha256()
        received = 0
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
            def writer() -> None:
                for _ in range(size // len(chunk)):
                    c.sendall(chunk)
                    sent.update(chunk)
                c.shutdown(socket.SHUT_WR)

            w = threading.Thread(target=writer)
            w.start()
            while data := c.recv(1 << 20):
                got.update(data)
                received += len(data)
            w.join(120)
        assert received == size and got.hexdigest() == sent.hexdigest()
        took = time.monotonic() - t0
        mode = "with offloads" if net.vnet else "plain"
        record(f"usernet TCP (TAP {mode}, MTU 65520): 256 MiB each way on one connection in "
               f"{took:.1f} s ({2 * size / took / 1e6:.0f} MB/s both ways together, "
               f"{net.tcp.counters['timeouts']} retransmission timeouts)")
        assert log.read_text().splitlines()[0] == f"tcp {GATEWAY}"  # loopback -> gateway
    # Outbound: from inside, the gateway address is the host's loopback (allowed port).
    host_service.settimeout(10)
    client = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c",
         "import socket, sys; s = socket.create_connection((sys.argv[1], int(sys.argv[2])),"
         " timeout=10); s.sendall(b'from the guest'); s.shutdown(socket.SHUT_WR); "
         "print(s.recv(100).decode())", str(GATEWAY), str(service_port)],
        stdout=subprocess.PIPE, text=True)
    conn, _ = host_service.accept()
    with conn:
        conn.settimeout(10)
        assert conn.recv(100) == b"from the guest"
        conn.sendall(b"hello from the host")
    out, _ = client.communicate(timeout=20)
    assert out.strip() == "hello from the host"
    # A port not on the allow-list: refused (an RST), counted.
    refused = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c",
         "import socket, sys\ntry:\n socket.create_connection((sys.argv[1], 9), timeout=5)\n"
         "except ConnectionRefusedError: print('refused')", str(GATEWAY)],
        capture_output=True, text=True, timeout=20, check=False)
    assert refused.stdout.strip() == "refused", refused.stdout + refused.stderr
    assert net.tcp.dropped["tcp_egress_denied"] == 1
