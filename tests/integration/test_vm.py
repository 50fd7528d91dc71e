"""QEMU microVM sandboxes through a real gateway: TAP on the bridge, forwards, readiness,
logs, isolation from netns sandboxes, and nothing left after destroy (QEMU under TCG)."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import (
    record,
    remove_gateway_leftovers,
    require_programs,
    test_net_names,
    vm_slot,
)
from nethelpers import free_port, run_in_netns
from sandport.config import GatewayConfig, NetConfig
from sandport.control.gateway import Gateway
from sandport.errors import SandboxFailed
from sandport.forward.spec import parse_port_spec
from sandport.sandbox import profiles
from sandport.sandbox.base import GuestPort
from sandport.sandbox.qemu import _qemu_pids, tap_name

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def gw(gateway_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Gateway:
    require_programs("qemu-system-x86_64", "busybox")
    gateway: Gateway = gateway_factory(probe_interval=1.0, ready_timeout=90.0)
    return gateway


def echo_tcp(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"hello vm\n")
        got = b""
        while len(got) < 9:
            chunk = s.recv(64)
            if not chunk:
                break
            got += chunk
        return got


def echo_udp(port: int) -> bytes:
    """Send a datagram and read the echo; like any UDP client, try again (a few times):
    readiness proves the HTTP service, the UDP echo may bind a moment later."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(1)
        for _ in range(10):
            u.sendto(b"dgram vm", ("127.0.0.1", port))
            try:
                return u.recv(64)
            except OSError:
                continue
        return b""


@pytest.fixture(autouse=True)
def _one_vm_slot() -> Any:
    """Each test here runs at most one VM at a time: it takes one of the two slots."""
    with vm_slot():
        yield


def test_echo_vm_serves_tcp_udp_and_http_through_forwards(gw: Gateway, loop_thread: Any,
                                                           leftovers: Any) -> None:
    tcp, udp = free_port(), free_port(socket.SOCK_DGRAM)
    publish = parse_port_spec(f"{tcp}:7") + parse_port_spec(f"{udp}:7/udp")
    t0 = time.monotonic()
    info = loop_thread.run(gw.create_sandbox(backend="qemu", profile="echo", publish=publish),
                           timeout=180)
    record(f"qemu echo sandbox ready (TCG, HTTP through its forward): "
           f"{time.monotonic() - t0:.2f} s")
    assert info.state == "ready"
    assert echo_tcp(tcp) == b"hello vm\n"
    assert echo_udp(udp) == b"dgram vm"
    http = next(f for f in info.forwards if f["name"] == "http")
    page = httpx.get(f"http://{http['host']}/", timeout=10)
    assert page.status_code == 200 and f"sandport echo {info.id}" in page.text
    # The address came from the pool, to the guest on the kernel command line.
    assert ipaddress.ip_address(info.ip) in gw.config.net.subnet
    (pid,) = _qemu_pids(info.id)
    # QEMU itself is no host root: an unprivileged uid of its own, no capabilities, its
    # seccomp filter (issue 16).
    status = Path(f"/proc/{pid}/status").read_text()
    uid = int(status.split("Uid:\t")[1].split()[1])  # the effective uid
    assert uid >= 1_000_000, status
    assert "CapEff:\t0000000000000000" in status and "Seccomp:\t2" in status, status
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    append = argv[argv.index(b"-append") + 1].decode()
    mask = gw.config.net.subnet.netmask
    assert f"ip={info.ip}::{gw.config.net.gateway_ip}:{mask}::eth0:off" in append
    serial, nxt, names = gw.read_log(info.id)
    assert f"SANDPORT-GUEST net eth0 {info.ip}/" in serial.decode(errors="replace")
    assert "serial" in names and nxt > 0
    # The CLI's route: the API answers the serial log as text.
    r = httpx.get(f"{gw.base_url}/api/sandboxes/{info.id}/logs", timeout=10,
                  headers={"Authorization": f"Bearer {gw.admin_token}"})
    assert r.status_code == 200 and "SANDPORT-GUEST" in r.text and "serial" in r.headers["x-logs"]
    cli = subprocess.run([sys.executable, "-m", "sandport", "sandbox", "logs", info.id,
                          "--state-dir", str(gw.config.state_dir)], capture_output=True,
                         text=True, timeout=30, check=False)
    assert cli.returncode == 0 and "Run /init as init process" in cli.stdout, cli.stderr
    bad = subprocess.run([sys.executable, "-m", "sandport", "sandbox", "logs", info.id,
                          "--name", "nope", "--state-dir", str(gw.config.state_dir)],
                         capture_output=True, text=True, timeout=30, check=False)
    assert bad.returncode == 2 and "has no log 'nope'" in bad.stderr and "serial" in bad.stderr
    assert loop_thread.run(gw.roster[info.id].backend.status(  # type: ignore[attr-defined]
        gw.roster[info.id].spec)) == "running"
    # The doctor walks a VM too: its TAP on the bridge, ping, HTTP and TCP at the guest,
    # the console over QEMU's own VNC socket, each forward.
    report = loop_thread.run(gw.doctor(info.id), timeout=60)
    rows = {(r.hop, r.check): r for r in report.rows}
    assert report.healthy, [r for r in report.rows if r.status != "ok"]
    assert rows[("host network", "sandbox link")].evidence.startswith(tap_name(info.id))
    console = [r for r in report.rows if r.port == "console" and r.hop == "guest service"]
    assert console and "RFB" in console[0].evidence
    assert any(r.hop == "end to end" and r.port == "http" and "200" in r.evidence
               for r in report.rows)
    loop_thread.run(gw.destroy_sandbox(info.id), timeout=60)
    assert not _qemu_pids(info.id)
    assert tap_name(info.id) not in subprocess.run(["ip", "-o", "link"], text=True,
                                                   capture_output=True).stdout
    assert not (gw.config.state_dir / "sandboxes" / info.id).exists()  # sockets, logs, initrd
    assert leftovers(bridge=None, sandbox_ids=[info.id], state_dir=gw.config.state_dir) == []


def test_a_vm_and_a_netns_sandbox_at_once_are_isolated(gw: Gateway, loop_thread: Any) -> None:
    vm = loop_thread.run(gw.create_sandbox(backend="qemu", profile="echo", memory_mb=320,
                                           vcpus=2), timeout=180)
    ns = loop_thread.run(gw.create_sandbox(), timeout=60)
    try:
        (pid,) = _qemu_pids(vm.id)  # the limits it was given
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert argv[argv.index(b"-m") + 1] == b"320" and argv[argv.index(b"-smp") + 1] == b"2"
        # Both reachable from the host ...
        http = next(f for f in vm.forwards if f["name"] == "http")
        assert httpx.get(f"http://{http['host']}/", timeout=10).status_code == 200
        r = asyncio.run(_rfb(ns.vnc_host, ns.vnc_port, ns.vnc_password))
        assert r.ok, r
        # ... but not from each other: the netns sandbox cannot reach the VM.
        out = run_in_netns(f"sp-{ns.id}", _CONNECT, vm.ip, "80")
        assert out.strip() == "unreachable", out
    finally:
        for sandbox_id in (vm.id, ns.id):
            loop_thread.run(gw.destroy_sandbox(sandbox_id), timeout=60)


def test_a_vm_that_boots_but_never_serves_fails_with_its_console(
        gateway_factory: Any, loop_thread: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest boots and serves port 80, but readiness waits for 81 (a profile whose
    service never comes up): the sandbox fails after the ready timeout, and the reason
    ends with the guest's last console lines; nothing is left."""
    require_programs("qemu-system-x86_64")
    echo = profiles.PROFILES["echo"]
    broken = dataclasses.replace(echo, ports=(
        GuestPort(name="http", port=81, protocol="http"), *echo.ports[1:]))
    monkeypatch.setitem(profiles.PROFILES, "echo", broken)
    gw: Gateway = gateway_factory(ready_timeout=8.0)
    with pytest.raises(SandboxFailed) as failed:
        loop_thread.run(gw.create_sandbox(backend="qemu", profile="echo"), timeout=120)
    message = str(failed.value)
    assert "did not become ready" in message and "Connection refused" in message, message
    assert "guest console:" in message and "SANDPORT-GUEST" in message, message
    assert gw.sandbox_ids() == []
    assert not [p for p in _all_qemu() if str(gw.config.state_dir) in p]


def test_a_vm_that_exits_fails_with_qemus_words(gw: Gateway, loop_thread: Any) -> None:
    info = loop_thread.run(gw.create_sandbox(backend="qemu", profile="echo"), timeout=180)
    live = gw.lookup(info.id)
    assert live is not None
    (pid,) = _qemu_pids(info.id)
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    while live.state.value != "failed" and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert live.state.value == "failed", live.state
    assert "QEMU exited" in live.reason and "guest console:" in live.reason, live.reason
    assert time.monotonic() - t0 < gw.config.probe_interval + 2.0  # within an interval
    loop_thread.run(gw.destroy_sandbox(info.id), timeout=60)
    assert tap_name(info.id) not in subprocess.run(["ip", "-o", "link"], text=True,
                                                   capture_output=True).stdout


def test_destroy_during_boot_leaves_nothing(gw: Gateway, loop_thread: Any,
                                            leftovers: Any) -> None:
    before = set(gw.sandbox_ids())
    creating = asyncio.run_coroutine_threadsafe(
        gw.create_sandbox(backend="qemu", profile="echo"), loop_thread.loop)
    deadline = time.monotonic() + 30
    new: list[str] = []
    while time.monotonic() < deadline and not (new and _qemu_pids(new[0])):
        new = sorted(set(gw.sandbox_ids()) - before)
        time.sleep(0.02)
    assert new and _qemu_pids(new[0]), "the VM never started"
    (sandbox_id,) = new
    loop_thread.run(gw.destroy_sandbox(sandbox_id), timeout=60)  # while it boots
    with pytest.raises(SandboxFailed, match="deleted while it started"):
        creating.result(60)
    assert sandbox_id not in gw.sandbox_ids()
    assert not _qemu_pids(sandbox_id)
    assert tap_name(sandbox_id) not in subprocess.run(["ip", "-o", "link"], text=True,
                                                      capture_output=True).stdout
    assert not (gw.config.state_dir / "sandboxes" / sandbox_id).exists()
    assert leftovers(bridge=None, sandbox_ids=[sandbox_id], state_dir=gw.config.state_dir) == []


def test_a_restarted_gateway_adopts_a_running_vm(loop_thread: Any, tmp_path: Path) -> None:
    """A gateway that goes away without stopping its VMs (a crash; here: a start that
    failed after adopting, which leaves them running) -> the next one adopts the VM:
    same forward, QEMU still running, ready again."""
    bridge, subnet = test_net_names()
    cfg = GatewayConfig(listen_port=0, state_dir=tmp_path / "state", probe_interval=0.5,
                        net=NetConfig(bridge=bridge, subnet=subnet))
    port = free_port()
    try:
        first = Gateway(cfg)
        loop_thread.run(first.start())
        info = loop_thread.run(first.create_sandbox(
            backend="qemu", profile="echo", publish=parse_port_spec(f"{port}:7")), timeout=180)
        (pid,) = _qemu_pids(info.id)
        loop_thread.run(first.stop(keep_sandboxes=True))
        assert _qemu_pids(info.id) == [pid]  # the VM runs on without a gateway
        second = Gateway(cfg)
        loop_thread.run(second.start())
        try:
            again = second.info(info.id)
            assert again.state == "ready" and again.forwards == info.forwards
            assert echo_tcp(port) == b"hello vm\n"
            sb = second.roster[info.id]
            assert loop_thread.run(sb.backend.status(sb.spec)) == "running"  # type: ignore[attr-defined]
            time.sleep(1.5)  # a few probes of the adopted VM
            assert second.info(info.id).last_probe["ok"] is True  # type: ignore[index]
        finally:
            loop_thread.run(second.stop())
        assert not _qemu_pids(info.id)
    finally:
        remove_gateway_leftovers(bridge=bridge, state_dir=cfg.state_dir)


def test_profiles_name_the_backends_they_run_in(gw: Gateway, loop_thread: Any) -> None:
    from sandport.errors import UsageError

    with pytest.raises(UsageError, match="runs in the qemu backend, not netns"):
        loop_thread.run(gw.create_sandbox(profile="echo"))
    with pytest.raises(UsageError, match="unknown backend 'firecracker'"):
        loop_thread.run(gw.create_sandbox(backend="firecracker"))
    with pytest.raises(UsageError, match="limits are for qemu sandboxes"):
        loop_thread.run(gw.create_sandbox(memory_mb=512))


_CONNECT = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
    print("reached")
except OSError:
    print("unreachable")
"""


async def _rfb(host: str, port: int, password: str) -> Any:
    from sandport.probe import probe_rfb_tcp

    return await probe_rfb_tcp(host, port, password=password, timeout=5)


def _all_qemu() -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], text=True, capture_output=True).stdout
    return [line for line in out.splitlines() if "qemu-system" in line]


def test_missing_qemu_is_named_and_leaves_nothing(gw: Gateway, loop_thread: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from sandport.errors import MissingPackage
    from sandport.sandbox import qemu

    monkeypatch.setattr(qemu, "QEMU", "qemu-system-nonexistent")
    before = set(gw.sandbox_ids())
    with pytest.raises(MissingPackage, match="Debian package qemu-system-x86"):
        loop_thread.run(gw.create_sandbox(backend="qemu", profile="echo"), timeout=60)
    assert set(gw.sandbox_ids()) == before
    assert " sp-" not in subprocess.run(["ip", "-o", "link", "show", "master",
                                         gw.config.net.bridge], text=True,
                                        capture_output=True).stdout


def test_the_accelerator_is_kvm_only_where_it_is_real(tmp_path: Path) -> None:
    from sandport.sandbox.qemu import choose_accel

    kvm, pvm = tmp_path / "kvm", tmp_path / "kvm_pvm"
    assert choose_accel(kvm, pvm) == ("tcg", "no usable /dev/kvm")
    kvm.touch(mode=0o600)
    assert choose_accel(kvm, pvm) == ("kvm", "/dev/kvm is usable")
    pvm.mkdir()
    accel, why = choose_accel(kvm, pvm)
    assert accel == "tcg" and "kvm_pvm" in why
