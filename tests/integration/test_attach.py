"""Attaching guests sandport did not create: a namespace with Xvnc made by hand (plain
`ip` commands, no sandport) stands in for a VM or container of another manager.

sandport fronts it (a host forward, the WebSocket bridge, readiness, the doctor), follows
it to a new address when its owner says so (the same URL and host port keep working),
and on detach leaves it exactly as it was, with nothing of sandport behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import secrets
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from attachhelpers import HandMade, api_post, hand_made  # noqa: F401 - a fixture
from conftest import free_test_subnet, require_programs, require_root
from sandport.control.gateway import Gateway
from sandport.errors import Conflict, Forbidden, UsageError
from sandport.forward.spec import parse_port_spec
from sandport.probe import probe_rfb_ws
from sandport.proto.rfb import obfuscate_password
from uphelpers import up_factory  # noqa: F401 - a fixture

pytestmark = pytest.mark.integration


def capture(port: int, password: str, path: Path) -> Image.Image:
    from vncdotool import api

    client = api.connect(f"127.0.0.1::{port}", password=password, timeout=30)
    try:
        client.captureScreen(str(path))
    finally:
        client.disconnect()
    return Image.open(path)


def on_loop(loop_thread: Any, fn: Any, *args: Any, **kw: Any) -> Any:
    async def call() -> Any:
        return fn(*args, **kw)
    return loop_thread.run(call())


def test_a_hand_made_desktop_attached_moved_and_detached(
        gateway_factory: Any, loop_thread: Any, hand_made: HandMade, tmp_path: Path) -> None:
    gw: Gateway = gateway_factory(attach_subnets=(hand_made.network,))
    info = loop_thread.run(gw.attach(ip=hand_made.ip, name="by-hand",
                                     vnc_password=hand_made.password))
    assert info.state == "ready" and info.ip == hand_made.ip
    doc = info.as_json()
    assert doc["backend"] == "external" and doc["name"] == "by-hand"
    # A real VNC client through the host forward sees the hand-made desktop.
    assert capture(info.vnc_port, hand_made.password, tmp_path / "a.png").size == (640, 480)
    ws = f"ws://127.0.0.1:{gw.http_port}/s/{info.id}/ports/vnc/ws?token={info.token}"
    first = asyncio.run(probe_rfb_ws(ws, password=hand_made.password))
    assert first.ok and "by-hand" in first.detail, first.detail
    report = loop_thread.run(gw.doctor(info.id))
    assert report.healthy, [r for r in report.rows if r.status != "ok"]
    assert any(r.check == "route" and hand_made.host_link in r.evidence for r in report.rows)
    # Its owner re-addresses it and tells sandport: same URL, same host port.
    new_ip = str(hand_made.network.network_address + 3)
    hand_made.sh("ip", "addr", "del", f"{hand_made.ip}/{hand_made.network.prefixlen}", "dev",
                 "eth0")  # first: deleting a primary address takes its secondaries along
    hand_made.sh("ip", "addr", "add", f"{new_ip}/{hand_made.network.prefixlen}", "dev",
                 "eth0")
    moved = loop_thread.run(gw.retarget(info.id, ip=new_ip, reason="migrated"))
    assert moved.state == "ready" and moved.ip == new_ip and moved.vnc_port == info.vnc_port
    assert capture(info.vnc_port, hand_made.password, tmp_path / "b.png").size == (640, 480)
    again = asyncio.run(probe_rfb_ws(ws, password=hand_made.password))
    assert again.ok, again.detail
    events = [e.kind for e in on_loop(loop_thread, gw.event_log, sandbox_id=info.id)]
    assert "sandbox.moved" in events
    # Detach while a browser session is open: it is closed with the reason; sandport's
    # forward and files go; the namespace is exactly as it was.
    async def detach_while_open() -> tuple[int | None, str | None]:
        async with connect(ws, subprotocols=["binary"]) as session:  # type: ignore[list-item]
            await session.recv()  # the RFB banner: the session is live
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
                gw.destroy_sandbox(info.id), loop_thread.loop))
            with contextlib.suppress(ConnectionClosed):
                async with asyncio.timeout(10):
                    while True:  # what the server still sends, up to its close
                        await session.recv()
            return session.close_code, session.close_reason

    workdir = gw.config.state_dir / "sandboxes" / info.id
    code, why = asyncio.run(detach_while_open())
    assert code == 1001 and why is not None and "detached" in why, (code, why)
    assert hand_made.xvnc.poll() is None  # still running
    assert f"inet {new_ip}/" in hand_made.sh("ip", "-4", "addr", "show", "eth0")
    assert info.id not in gw.sandbox_ids() and not workdir.exists()
    assert not any(f.sandbox == info.id for f in gw.forwards)
    with pytest.raises(OSError):
        capture_connect(info.vnc_port)


def capture_connect(port: int) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_targets_outside_the_allow_list_or_unroutable_are_refused(
        gateway_factory: Any, loop_thread: Any, hand_made: HandMade) -> None:
    gw: Gateway = gateway_factory()  # no --attach-subnet: attaching is off
    with pytest.raises(Forbidden, match="not in the networks this gateway may attach"):
        loop_thread.run(gw.attach(ip=hand_made.ip))
    req = urllib.request.Request(
        f"{gw.base_url}/api/attach", method="POST", data=json.dumps(
            {"ip": hand_made.ip}).encode(),
        headers={"Authorization": f"Bearer {gw.admin_token}",
                 "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=10)
    assert refused.value.code == 403
    body = json.loads(refused.value.read())
    assert body["error"] == "forbidden_target" and "--attach-subnet" in body["message"]
    # Allowed, but a network this host has no route to.
    far = free_test_subnet()
    other: Gateway = gateway_factory(attach_subnets=(hand_made.network, far))
    with pytest.raises(UsageError, match=r"through the router|no route"):
        loop_thread.run(other.attach(ip=str(far.network_address + 9)))
    with pytest.raises(UsageError, match="reached through"):
        loop_thread.run(other.attach(ip=hand_made.ip, interface="lo"))
    # Attached once: a second attach of the same address is a conflict.
    info = loop_thread.run(other.attach(ip=hand_made.ip, vnc_password=hand_made.password))
    try:
        with pytest.raises(Conflict, match="already attached"):
            loop_thread.run(other.attach(ip=hand_made.ip))
        with pytest.raises(Forbidden):
            loop_thread.run(other.retarget(info.id, ip="10.202.0.5"))
    finally:
        loop_thread.run(other.destroy_sandbox(info.id))


def test_the_cli_and_the_sdk_attach_mark_gone_and_detach(
        gateway_factory: Any, hand_made: HandMade, tmp_path: Path) -> None:
    import sys

    from sandport.client import Client

    gw: Gateway = gateway_factory(attach_subnets=(hand_made.network,))
    secret = tmp_path / "pw.txt"
    secret.write_text(hand_made.password + "\n")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sandport", *args, "--state-dir",
                               str(gw.config.state_dir)], capture_output=True, text=True,
                              timeout=120, check=False)

    r = cli("attach", "by-cli", "--ip", hand_made.ip, "--vnc-password-file", str(secret))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["backend"] == "external" and doc["state"] == "ready" and doc["name"] == "by-cli"
    again = cli("attach", "twice", "--ip", hand_made.ip)
    assert again.returncode == 2 and "already attached" in again.stderr
    sdk = Client.from_state_dir(gw.config.state_dir)
    target = sdk.sandbox(doc["id"]).gone("the VM was stopped")
    assert target.state == "failed" and "the VM was stopped" in target.reason
    bad = cli("retarget", doc["id"])
    assert bad.returncode == 2 and "one of them" in bad.stderr
    assert cli("detach", doc["id"]).returncode == 0
    assert doc["id"] not in gw.sandbox_ids() and hand_made.xvnc.poll() is None
    assert f"inet {hand_made.ip}/" in hand_made.sh("ip", "-4", "addr", "show", "eth0")


@pytest.mark.vm
def test_a_qemu_guest_started_without_sandport_echoes_through_forwards(
        gateway_factory: Any, loop_thread: Any, tmp_path: Path) -> None:
    """The second stand-in: QEMU started by the test on a TAP of its own (no sandport),
    the echo image inside; attached as a tcp target, TCP and UDP echo through forwards."""
    import socket

    from conftest import vm_slot
    from nethelpers import free_port
    from sandport.forward.spec import parse_port_spec
    from sandport.sandbox import images
    from sandport.sandbox.qemu import host_khz

    require_root()
    require_programs("qemu-system-x86_64", "busybox")
    tag = secrets.token_hex(3)
    tap, network = f"sp-q{tag}", free_test_subnet()
    host_ip, guest_ip = network.network_address + 1, network.network_address + 2
    image = images.find_image("echo") or images.build_image("echo")
    seed = images.seed_archive({images.SEED_ENV: (
        images.seed_env({"SANDPORT_SANDBOX_ID": "by-hand"}), 0o600)})
    initrd, serial = tmp_path / "initrd.cpio", tmp_path / "serial.log"
    images.write_initrd(image, seed, initrd)
    gw: Gateway = gateway_factory(attach_subnets=(network,), ready_timeout=90.0)
    qemu: subprocess.Popen[bytes] | None = None
    try:
        for cmd in (["ip", "tuntap", "add", "dev", tap, "mode", "tap"],
                    ["ip", "addr", "add", f"{host_ip}/{network.prefixlen}", "dev", tap],
                    ["ip", "link", "set", tap, "up"]):
            subprocess.run(cmd, check=True)
        with vm_slot():
            qemu = subprocess.Popen([
                "qemu-system-x86_64", "-M", "microvm", "-accel", "tcg", "-m", "256",
                "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
                "-no-reboot", "-kernel", str(image.kernel), "-initrd", str(initrd),
                "-append", f"{images.KERNEL_CMDLINE} tsc_early_khz={host_khz()} "
                f"ip={guest_ip}::{host_ip}:{network.netmask}::eth0:off",
                "-serial", f"file:{serial}",
                "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                "-device", "virtio-net-device,netdev=n0,mac=52:54:00:12:34:57",
            ], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            tcp, udp = free_port(), free_port(socket.SOCK_DGRAM)
            publish = [*parse_port_spec(f"127.0.0.1:{tcp}:7"),
                       *parse_port_spec(f"127.0.0.1:{udp}:7/udp")]
            # attach waits (ready_timeout) until the guest's echo accepts connections
            info = loop_thread.run(gw.attach(ip=str(guest_ip), name="qemu-by-hand",
                                             profile="tcp", port=7, publish=publish,
                                             interface=tap), timeout=120)
            assert info.state == "ready"
            assert tcp_echo(tcp, b"hello attached vm\n") == b"hello attached vm\n"
            assert udp_echo(udp, b"dgram attached") == b"dgram attached"
            report = loop_thread.run(gw.doctor(info.id))
            assert report.healthy, [r for r in report.rows if r.status != "ok"]
            loop_thread.run(gw.destroy_sandbox(info.id))
            assert qemu.poll() is None  # detached: the VM runs on
    finally:
        if qemu is not None:
            qemu.kill()
            qemu.wait(10)
        subprocess.run(["ip", "link", "del", tap], check=False, capture_output=True)


def test_a_target_that_stops_answering_degrades_then_fails_with_the_doctors_reason(
        gateway_factory: Any, loop_thread: Any, hand_made: HandMade) -> None:
    from conftest import eventually_sync

    gw: Gateway = gateway_factory(attach_subnets=(hand_made.network,), probe_interval=0.3,
                                  attach_grace=1.5)
    info = loop_thread.run(gw.attach(ip=hand_made.ip, vnc_password=hand_made.password))
    hand_made.xvnc.kill()  # its owner's VNC server dies; sandport cannot restart it
    hand_made.xvnc.wait(10)
    eventually_sync(lambda: gw.info(info.id).state == "degraded", within=10)
    eventually_sync(lambda: gw.info(info.id).state == "failed", within=15)
    failed = gw.info(info.id)
    assert "no answer for 1.5 s" in failed.reason and "guest service hop" in failed.reason, \
        failed.reason
    loop_thread.run(gw.destroy_sandbox(info.id))


def test_a_container_like_namespace_serving_on_its_own_loopback(
        gateway_factory: Any, loop_thread: Any, tmp_path: Path) -> None:
    """A namespace with no link to the host at all (like a container with only its own
    loopback): Xvnc and a UDP echo listen on its 127.0.0.1. Attached with --netns, every
    connection is made inside it: VNC through the forward and the bridge, UDP echo."""
    import os
    import sys

    require_root()
    require_programs("Xvnc")
    tag = secrets.token_hex(3)
    netns = f"sp-c{tag}"
    (tmp_path / "passwd").write_bytes(obfuscate_password("ns-pw-12"))
    procs: list[subprocess.Popen[bytes]] = []
    plain: Gateway = gateway_factory()  # no --attach-subnet: not even a loopback in there
    gw: Gateway = gateway_factory(attach_subnets=(LOOPBACK,))  # namespaces' loopbacks
    try:
        subprocess.run(["ip", "netns", "add", netns], check=True)
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        with pytest.raises(Forbidden, match=r"--attach-subnet 127\.0\.0\.0/8"):
            loop_thread.run(plain.attach(ip="127.0.0.1", netns=netns))
        plain_api = api_post(plain, "/api/attach", {"ip": "127.0.0.1", "netns": netns})
        assert plain_api[0] == 403 and plain_api[1]["error"] == "forbidden_target", plain_api
        display = 200 + int(tag, 16) % 600
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", netns, "Xvnc", f":{display}", "-rfbport", "5901",
             "-SecurityTypes", "VncAuth", "-PasswordFile", str(tmp_path / "passwd"),
             "-geometry", "320x240", "-desktop", "in-a-container", "-nolisten", "tcp"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-c",
             "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
             "s.bind(('127.0.0.1', 7))\nwhile True:\n d, a = s.recvfrom(2048)\n"
             " s.sendto(d, a)\n"]))
        udp = free_udp_port()
        info = loop_thread.run(gw.attach(
            ip="127.0.0.1", netns=netns, vnc_password="ns-pw-12", name="container",
            publish=list(parse_port_spec(f"127.0.0.1:{udp}:7/udp"))))
        assert info.state == "ready"
        assert capture(info.vnc_port, "ns-pw-12", tmp_path / "c.png").size == (320, 240)
        ws = f"ws://127.0.0.1:{gw.http_port}/s/{info.id}/ports/vnc/ws?token={info.token}"
        through_bridge = asyncio.run(probe_rfb_ws(ws, password="ns-pw-12"))
        assert through_bridge.ok and through_bridge.desktop == "in-a-container"
        assert udp_echo(udp, b"in the namespace") == b"in the namespace"
        report = loop_thread.run(gw.doctor(info.id))
        assert report.healthy, [r for r in report.rows if r.status != "ok"]
        # The same namespace named by the PID of a process in it is the same target.
        with pytest.raises(Conflict, match="already attached"):
            loop_thread.run(gw.attach(ip="127.0.0.1", netns=str(procs[1].pid)))
        # The gateway's own namespace is not "another namespace": refused.
        with pytest.raises(Forbidden, match="own network namespace"):
            loop_thread.run(gw.attach(ip="127.0.0.1", netns=str(os.getpid())))
        loop_thread.run(gw.destroy_sandbox(info.id))
        assert all(p.poll() is None for p in procs)  # detached: its services run on
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
        subprocess.run(["ip", "netns", "del", netns], check=False)


LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")


def test_a_sandboxes_own_namespace_is_never_an_attach_target(
        gateway_factory: Any, loop_thread: Any) -> None:
    """A sandbox's namespace (its agent listens on 127.0.0.1:7412 in there) cannot be
    attached, even by a gateway that allows namespaces' loopbacks: not by its `sp-<id>`
    name, not by the PID of its agent, not by another name for the same namespace, not
    by another gateway; 403 forbidden_target through the API, exit 2 through the CLI."""
    import sys

    gw: Gateway = gateway_factory(attach_subnets=(LOOPBACK,))
    other: Gateway = gateway_factory(attach_subnets=(LOOPBACK,))
    info = loop_thread.run(gw.create_sandbox())
    netns = f"sp-{info.id}"
    alias = f"sp-z{secrets.token_hex(3)}"  # another name of the same namespace
    try:
        pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True,
                              check=True).stdout.split()
        assert pids, f"no process in {netns}"
        subprocess.run(["ip", "netns", "attach", alias, pids[0]], check=True)
        for gateway in (gw, other):
            for name in (netns, pids[0], alias):
                with pytest.raises(Forbidden, match=f"sandport sandbox {netns}"):
                    loop_thread.run(gateway.attach(ip="127.0.0.1", netns=name, port=7412,
                                                   profile="tcp"))
        status, doc = api_post(other, "/api/attach", {"ip": "127.0.0.1", "netns": pids[0],
                                         "profile": "tcp", "port": 7412})
        assert status == 403 and doc["error"] == "forbidden_target", (status, doc)
        assert f"sandport sandbox {netns}" in doc["message"]
        r = subprocess.run([sys.executable, "-m", "sandport", "attach", "agent", "--ip",
                            "127.0.0.1", "--netns", netns, "--profile", "tcp", "--port",
                            "7412", "--state-dir", str(gw.config.state_dir)],
                           capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 2 and f"sandport sandbox {netns}" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert [s for s in gw.sandbox_ids() if s != info.id] == [] and \
            other.sandbox_ids() == []
    finally:
        subprocess.run(["ip", "netns", "del", alias], check=False, capture_output=True)
        loop_thread.run(gw.destroy_sandbox(info.id))


def free_udp_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_kernel_forwards_to_an_attached_target_and_what_detach_gives_back(
        gateway_factory: Any, loop_thread: Any, hand_made: HandMade, tmp_path: Path) -> None:
    """nft DNAT to a guest on a link sandport does not own: masquerade and route_localnet
    on that link while a forward needs them; detach restores the link's settings."""
    from pathlib import Path as P

    setting = P(f"/proc/sys/net/ipv4/conf/{hand_made.host_link}/route_localnet")
    assert setting.read_text().strip() == "0"
    gw: Gateway = gateway_factory(attach_subnets=(hand_made.network,))
    info = loop_thread.run(gw.attach(ip=hand_made.ip, vnc_password=hand_made.password,
                                     forward_mode="kernel"))
    [fwd] = [f for f in gw.forwards.of(info.id)]
    assert fwd.mode == "kernel" and fwd.options.egress == hand_made.host_link
    assert setting.read_text().strip() == "1"
    ruleset = subprocess.run(["nft", "list", "table", "ip", "sandport"], capture_output=True,
                             text=True, check=True).stdout
    assert f'oifname "{hand_made.host_link}" ip saddr 127.0.0.0/8 masquerade' in ruleset
    assert capture(info.vnc_port, hand_made.password, tmp_path / "k.png").size == (640, 480)
    report = loop_thread.run(gw.doctor(info.id))
    assert report.healthy, [r for r in report.rows if r.status != "ok"]
    assert any(r.check.startswith("nft DNAT") and r.status == "ok" for r in report.rows)
    loop_thread.run(gw.destroy_sandbox(info.id))
    assert setting.read_text().strip() == "0"  # given back
    after = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True,
                           check=True).stdout
    assert hand_made.host_link not in after and hand_made.ip not in after
    with pytest.raises(UsageError, match="kernel forwards cannot reach into"):
        loop_thread.run(gw.attach(ip=hand_made.ip, netns=hand_made.netns,
                                  forward_mode="kernel"))


def tcp_echo(port: int, message: bytes) -> bytes:
    """Send ``message`` to 127.0.0.1:``port``, half-close, read everything back."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(message)
        c.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := c.recv(65536):
            got += chunk
        return got


def udp_echo(port: int, message: bytes) -> bytes:
    """Send ``message`` to 127.0.0.1:``port`` and read the answer; like any UDP client,
    try again (a few times) when none comes."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(1)
        for _ in range(10):
            u.sendto(message, ("127.0.0.1", port))
            try:
                return u.recv(64)
            except OSError:
                continue
    return b""


def test_a_foreign_links_settings_come_back_after_a_kill_9(
        up_factory: Any, hand_made: HandMade) -> None:
    """Issue 18, finding 4: what kernel forwards changed on an attached target's link
    (``route_localnet``, ``forwarding``) is recorded before the change, so after a
    ``kill -9`` the next gateway on the state dir keeps it while the adopted forward
    needs it and gives it back when it goes (it used to be known only to the killed
    process: the link kept ``route_localnet=1`` for good)."""
    from sandport.client import Client

    conf = Path(f"/proc/sys/net/ipv4/conf/{hand_made.host_link}")

    def settings() -> tuple[str, str]:
        return ((conf / "route_localnet").read_text().strip(),
                (conf / "forwarding").read_text().strip())

    (conf / "forwarding").write_text("0")  # this test's own link: a known start
    assert settings() == ("0", "0")
    first = up_factory("--attach-subnet", str(hand_made.network))
    first.wait_http()
    sb = Client.from_state_dir(first.state_dir).attach(
        hand_made.ip, vnc_password=hand_made.password, forward_mode="kernel")
    assert settings()[0] == "1"  # 127.0.0.1 clients of the kernel forward need it
    changed = settings()
    first.proc.kill()  # SIGKILL: no clean-up at all
    first.proc.communicate(timeout=10)
    assert settings() == changed  # the DNAT rules stay, and so does what they need

    second = up_factory("--attach-subnet", str(hand_made.network), state_dir=first.state_dir,
                        bridge=first.bridge, subnet=first.subnet)
    second.wait_http()
    adopted = Client.from_state_dir(second.state_dir).sandbox(sb.id)
    assert adopted.doc["state"] == "ready", adopted.doc
    assert settings() == changed  # the adopted forward still needs them
    code, stderr = second.stop()
    assert code == 0, stderr
    assert settings() == ("0", "0"), "the settings before the first gateway came back"


def test_the_doctor_walks_a_netns_targets_service_from_inside_its_namespace(
        gateway_factory: Any, loop_thread: Any, hand_made: HandMade) -> None:
    """Issue 18, finding 4: for a `--netns` target the doctor asks the service where it
    lives, inside the namespace (its address means nothing on the host): a VNC handshake
    there is the guest-service hop, and a server that stopped fails that hop, not only
    the end-to-end one after it (the service row used to be skipped)."""
    gw: Gateway = gateway_factory(attach_subnets=(LOOPBACK,), probe_interval=600.0)
    info = loop_thread.run(gw.attach(ip="127.0.0.1", netns=hand_made.netns,
                                     vnc_password=hand_made.password))
    try:
        report = loop_thread.run(gw.doctor(info.id))
        [row] = [r for r in report.rows if r.hop == "guest service"]
        assert row.status == "ok", row
        assert row.check == f"vnc at 127.0.0.1:5901 in /run/netns/{hand_made.netns}", row
        assert "RFB" in row.evidence, row
        hand_made.xvnc.kill()
        hand_made.xvnc.wait(10)
        report = loop_thread.run(gw.doctor(info.id))
        failed = report.failed
        assert failed is not None and failed.hop == "guest service", report.rows
        assert "connection refused" in failed.evidence, failed
        assert f"inside /run/netns/{hand_made.netns}" in failed.fix, failed
    finally:
        loop_thread.run(gw.destroy_sandbox(info.id))
