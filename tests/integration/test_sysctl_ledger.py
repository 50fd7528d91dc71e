"""What a kernel forward on 0.0.0.0 changes on the host, and that it is given back (issue 17).

Each test runs `sandport up` in a network namespace of its own that stands in for the host
(``nsenter --net``: the guests' containers still see the host's cgroup file system), so
the host's own interfaces (``eth0``) are never touched. In it the test makes two links
with addresses in 10.201.47.0/24:

* ``sp-<tag>p``, a plain link (a ``dummy``, or an ``ifb`` where the kernel has no dummy
  driver): where remote clients arrive, so a wildcard kernel forward turns its
  ``forwarding`` on, and gives it back;
* ``sp-<tag>x``, a bridge standing in for another program's network (``docker0``,
  ``virbr0``): left alone.

Both start with ``forwarding`` 0; the namespace, with both links, is deleted afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import remove_gateway_leftovers, require_programs, require_root, test_net_names
from nethelpers import free_port
from sandport.net import nft, sysctl
from uphelpers import SANDPORT, Up

pytestmark = pytest.mark.integration


class NsHost:
    """A network namespace standing in for the host, with the test's two links."""

    def __init__(self, tmp: Path) -> None:
        tag = secrets.token_hex(3)
        self.netns, self.plain, self.other = f"sp-{tag}h", f"sp-{tag}p", f"sp-{tag}x"
        self.tmp = tmp
        self.started: list[Up] = []

    def ip(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "-n", self.netns, *args], capture_output=True, text=True,
                              check=False)

    def setting(self, ifname: str, key: str = "forwarding") -> str:
        """A setting of an interface in the namespace ("" when it has no such interface)."""
        r = subprocess.run(["ip", "netns", "exec", self.netns, "cat",
                            f"/proc/sys/net/ipv4/conf/{ifname}/{key}"],
                           capture_output=True, text=True, check=False)
        return r.stdout.strip()

    def ledger(self) -> list[dict[str, Any]]:
        """The host ledger's changes in this namespace."""
        try:
            doc = json.loads((sysctl.LEDGER_DIR / sysctl.LEDGER_FILE).read_text())
        except FileNotFoundError:
            return []
        ino = os.stat(f"/run/netns/{self.netns}").st_ino
        return [c for c in doc["changes"] if c["netns"] == ino]

    def up(self, *extra: str, state_dir: Path, bridge: str, subnet: str) -> Up:
        """`sandport up` in the namespace (an :class:`Up` whose argv starts with nsenter)."""
        up = Up.__new__(Up)
        up.bridge, up.subnet, up.state_dir, up.seen_stderr = bridge, subnet, state_dir, ""
        up.argv = ["nsenter", f"--net=/run/netns/{self.netns}", *SANDPORT, "up",
                   "--listen", "127.0.0.1:0", "--vnc-port", "0", "--state-dir", str(state_dir),
                   "--bridge", bridge, "--subnet", subnet, *extra]
        up.proc = subprocess.Popen(up.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        self.started.append(up)
        return up

    def cli(self, *args: str) -> str:
        """A `sandport` command in the namespace (where the gateway's 127.0.0.1 is)."""
        r = subprocess.run(["nsenter", f"--net=/run/netns/{self.netns}", *SANDPORT, *args],
                           capture_output=True, text=True, timeout=90, check=False)
        assert r.returncode == 0, r.stderr
        return r.stdout


@pytest.fixture
def ns_host(tmp_path: Path) -> Iterator[NsHost]:
    require_root()
    require_programs("nsenter", "Xvnc", "openbox", "xsetroot", "xmessage")
    h = NsHost(tmp_path)
    try:
        subprocess.run(["ip", "netns", "add", h.netns], check=True)
        assert h.ip("link", "set", "lo", "up").returncode == 0
        if h.ip("link", "add", h.plain, "type", "dummy").returncode != 0:
            assert h.ip("link", "add", h.plain, "type", "ifb").returncode == 0
        assert h.ip("link", "add", h.other, "type", "bridge").returncode == 0
        octet = 16 * secrets.randbelow(8)  # any /28 of 10.201.47.0/25: the namespace's own
        for link, host in ((h.plain, octet + 1), (h.other, octet + 129)):
            assert h.ip("addr", "add", f"10.201.47.{host}/28", "dev", link).returncode == 0
            assert h.ip("link", "set", link, "up").returncode == 0
            subprocess.run(["ip", "netns", "exec", h.netns, "sysctl", "-qw",
                            f"net.ipv4.conf.{link}.forwarding=0"], check=True)
        yield h
    finally:
        for up in h.started:  # a failed test leaves no gateway or sandbox behind
            if up.proc.poll() is None:
                up.proc.kill()
                up.proc.communicate()
            remove_gateway_leftovers(bridge=up.bridge, state_dir=up.state_dir)
        for up in h.started:  # and no change of the namespace's in the host's ledger
            with contextlib.suppress(subprocess.CalledProcessError):
                subprocess.run(["nsenter", f"--net=/run/netns/{h.netns}", sys.executable, "-c",
                                "import sys; from sandport.net import sysctl; "
                                "sysctl.Ledger(owner=sys.argv[1]).give_back()", up.bridge],
                               capture_output=True, check=True, timeout=30)
        for link in (h.plain, h.other):
            h.ip("link", "del", link)
        subprocess.run(["ip", "netns", "del", h.netns], capture_output=True, check=False)


def test_wildcard_kernel_forward_sets_only_entry_links_and_gives_them_back(
        ns_host: NsHost) -> None:
    h = ns_host
    bridge, subnet = test_net_names()
    up = h.up("--demo", "--forward-host", "0.0.0.0", "--forward-mode", "kernel",
              state_dir=h.tmp / "state", bridge=bridge, subnet=str(subnet))
    ready = up.wait_ready()
    assert ready["forwards"][0]["mode"] == "kernel", ready["forwards"]
    # Remote clients arrive on the plain link: forwarding on, recorded before it changed.
    assert h.setting(h.plain) == "1"
    # Another program's bridge and loopback are not sandport's: unchanged.
    assert h.setting(h.other) == "0"
    assert h.setting("lo") == "0"
    assert (h.setting(bridge), h.setting(bridge, "route_localnet")) == ("1", "1")
    changes = {c["path"]: c for c in h.ledger()}
    plain = changes[sysctl.conf(h.plain, "forwarding")]
    assert (plain["before"], plain["value"], list(plain["owners"])) == ("0", "1", [bridge])
    assert sysctl.conf(h.other, "forwarding") not in changes
    assert not any("/all/" in p or "/default/" in p or "/lo/" in p for p in changes)
    assert (sysctl.LEDGER_DIR / sysctl.LEDGER_FILE).stat().st_mode & 0o777 == 0o600

    # The forward goes (its sandbox is removed): every value is given back.
    h.cli("sandbox", "rm", ready["id"], "--state-dir", str(up.state_dir))
    assert h.setting(h.plain) == "0"
    assert (h.setting(bridge), h.setting(bridge, "route_localnet")) == ("0", "0")
    assert h.ledger() == []

    # Another wildcard kernel forward, then a clean stop: given back as well.
    port = free_port()
    created = json.loads(h.cli("sandbox", "create", "-p",
                               f"0.0.0.0:{port}:7", "--state-dir", str(up.state_dir)))
    assert [f["mode"] for f in created["forwards"] if f["host"].endswith(f":{port}")] \
        == ["kernel"], created["forwards"]
    assert (h.setting(h.plain), h.setting(h.other)) == ("1", "0")
    code, stderr = up.stop(signal.SIGINT)
    assert code == 0, stderr
    assert (h.setting(h.plain), h.setting(h.other)) == ("0", "0")
    assert h.ledger() == []


def test_a_wildcard_kernel_forward_follows_interfaces_that_come_and_go(ns_host: NsHost) -> None:
    """Issue 18, finding 3: a link that gets an address after a 0.0.0.0 kernel forward was
    made is where remote clients arrive too: its forwarding goes on (recorded), and back
    off when its address goes (it used to stay off: its clients timed out). The doctor
    names an entry link whose forwarding someone turned off."""
    h = ns_host
    bridge, subnet = test_net_names()
    up = h.up("--demo", "--forward-host", "0.0.0.0", "--forward-mode", "kernel",
              state_dir=h.tmp / "state", bridge=bridge, subnet=str(subnet))
    up.wait_ready()
    late = f"{h.plain[:-1]}l"
    if h.ip("link", "add", late, "type", "dummy").returncode != 0:
        assert h.ip("link", "add", late, "type", "ifb").returncode == 0
    subprocess.run(["ip", "netns", "exec", h.netns, "sysctl", "-qw",
                    f"net.ipv4.conf.{late}.forwarding=0"], check=True)
    assert h.ip("addr", "add", "10.201.49.1/28", "dev", late).returncode == 0
    assert h.ip("link", "set", late, "up").returncode == 0

    def within(seconds: float, what: str, value: str) -> None:
        deadline = time.monotonic() + seconds
        while h.setting(late) != value:
            log = (h.tmp / "state" / "gateway.log").read_text()[-2000:]
            assert time.monotonic() < deadline, \
                f"{what}: forwarding of {late} is {h.setting(late)!r}; gateway log:\n{log}"
            time.sleep(0.1)

    within(5, "a link with an address came", "1")
    [change] = [c for c in h.ledger() if c["path"] == sysctl.conf(late, "forwarding")]
    assert change["before"] == "0"
    assert h.setting(h.other) == "0"  # another program's bridge is still left alone

    # Someone turns it off on an entry link: the doctor names that link and the fix.
    subprocess.run(["ip", "netns", "exec", h.netns, "sysctl", "-qw",
                    f"net.ipv4.conf.{h.plain}.forwarding=0"], check=True)
    r = subprocess.run(["nsenter", f"--net=/run/netns/{h.netns}", *SANDPORT, "doctor",
                        "--json", "--state-dir", str(up.state_dir)], capture_output=True,
                       text=True, timeout=90, check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    [report] = json.loads(r.stdout)["reports"]
    failed = report["failed"]
    assert failed["hop"] == "host network", failed
    assert f"forwarding is off on {h.plain}, where remote clients come in" in \
        failed["evidence"], failed
    assert f"sysctl -w net.ipv4.conf.{h.plain}.forwarding=1" in failed["fix"], failed
    subprocess.run(["ip", "netns", "exec", h.netns, "sysctl", "-qw",
                    f"net.ipv4.conf.{h.plain}.forwarding=1"], check=True)

    assert h.ip("addr", "flush", "dev", late).returncode == 0
    within(5, "its address went", "0")
    # The ledger entry goes right after the setting is given back (never before it).
    deadline = time.monotonic() + 5
    while [c for c in h.ledger() if c["path"] == sysctl.conf(late, "forwarding")]:
        assert time.monotonic() < deadline, h.ledger()
        time.sleep(0.1)
    h.ip("link", "del", late)
    code, stderr = up.stop(signal.SIGINT)
    assert code == 0, stderr
    assert h.ledger() == []


def test_after_kill_9_the_next_start_keeps_what_adopted_forwards_need_and_gives_back_the_rest(
        ns_host: NsHost) -> None:
    h = ns_host
    bridge, subnet = test_net_names()
    where = {"state_dir": h.tmp / "state", "bridge": bridge, "subnet": str(subnet)}
    first = h.up("--demo", "--forward-host", "0.0.0.0", "--forward-mode", "kernel", **where)
    ready = first.wait_ready()
    assert (h.setting(h.plain), h.setting(h.other)) == ("1", "0")
    first.proc.kill()  # SIGKILL: no cleanup at all
    first.proc.communicate(timeout=10)
    # The kernel rules keep forwarding meanwhile, so what they need stays, recorded.
    assert h.setting(h.plain) == "1"
    [plain] = [c for c in h.ledger() if c["path"] == sysctl.conf(h.plain, "forwarding")]
    assert plain["before"] == "0"

    # The next start adopts the sandbox and its forward: still needed, still on.
    second = h.up(**where)
    second.wait_http()
    assert h.setting(h.plain) == "1"
    assert [c["before"] for c in h.ledger()
            if c["path"] == sysctl.conf(h.plain, "forwarding")] == ["0"]
    second.proc.kill()
    second.proc.communicate(timeout=10)

    # Killed again, and this time the sandbox dies too: the start after it adopts
    # nothing, and gives back what the dead forward needed.
    out = subprocess.run(["ip", "netns", "pids", f"sp-{ready['id']}"], capture_output=True,
                         text=True, check=False).stdout
    for pid in out.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while subprocess.run(["ip", "netns", "pids", f"sp-{ready['id']}"], capture_output=True,
                         text=True, check=False).stdout.strip():
        assert time.monotonic() < deadline, "the guest processes did not die"
        time.sleep(0.05)
    third = h.up(**where)
    third.wait_http()
    assert "not adopted" in third.seen_stderr, third.seen_stderr
    assert (h.setting(h.plain), h.setting(h.other)) == ("0", "0")
    assert (h.setting(bridge), h.setting(bridge, "route_localnet")) == ("0", "0")
    assert h.ledger() == []
    code, stderr = third.stop(signal.SIGINT)
    assert code == 0, stderr


def test_other_programs_links_are_told_apart_from_entry_links() -> None:
    """What a wildcard kernel forward leaves alone: bridges, their ports, veths, TAPs;
    a TUN (a VPN's link, where remote clients arrive) and a plain link are entry links."""
    require_root()
    tag = secrets.token_hex(2)
    br, veth, port, tap, tun = (f"sp-{tag}{s}" for s in ("b", "v", "w", "a", "u"))
    try:
        for cmd in (["link", "add", br, "type", "bridge"],
                    ["link", "add", veth, "type", "veth", "peer", "name", port],
                    ["link", "set", port, "master", br],
                    ["tuntap", "add", tap, "mode", "tap"],
                    ["tuntap", "add", tun, "mode", "tun"]):
            subprocess.run(["ip", *cmd], check=True, capture_output=True)
        others = nft.other_links()
        assert {n: others.get(n) for n in (br, veth, port, tap, tun)} == {
            br: "a bridge", veth: "a veth", port: f"a port of bridge {br}", tap: "a TAP",
            tun: None}
        assert others["lo"] == "loopback"
    finally:
        for link in (br, veth, tap, tun):
            subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)
